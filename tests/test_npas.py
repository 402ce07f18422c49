"""The NPAS pipeline: dL/dW, gradient batches, search phase, final run, unsharing mid-run."""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import search
from experiments import npas
from experiments import train as train_module
from experiments.data import load_digits, subset
from experiments.npas import SearchConfig, gradient_batches, members_loss
from experiments.train import (
    LoopConfig,
    OptimConfig,
    Phase,
    TrainState,
    make_optimizer,
    train,
)
from superweights import (
    Budget,
    BudgetedModel,
    Member,
    budgeted,
    compose,
    make_plan,
    own_coefficients,
    tree,
)
from superweights.plan import bank_layout

NUM_CLASSES = 10
SAMPLE = jnp.zeros((1, 8, 8, 1))
# One initial cluster of the wide/narrow pair needs 1,188 bank params, every wide layer in a
# cluster of its own 1,800: the search may split, but not all the way.
BUDGET = Budget(params=1500)
LOOP = LoopConfig(epochs=2, batch_size=16, eval_batch_size=32)
OPTIM = OptimConfig(learning_rate=0.05)
CONFIG = SearchConfig(search_epochs=1, gradient_batches=2, unshare_epoch=1, unshare_batches=2)
STEPS = 64 // 16  # training steps per epoch on the 64 training digits


class SmallCNN(nnx.Module):
    """3x3 stem (1 -> w), BN, 3x3 (w -> w), strided 3x3 (w -> 2w), dense head.

    The convolution kernels start at zero: budgeted models compose them from the bank, and
    zeros are quick to make.
    """

    def __init__(self, width: int, rngs: nnx.Rngs):
        conv = dict(kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.stem = nnx.Conv(1, width, (3, 3), **conv)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.conv1 = nnx.Conv(width, width, (3, 3), **conv)
        self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, **conv)
        self.head = nnx.Linear(2 * width, NUM_CLASSES, rngs=rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.bn(self.stem(x), use_running_average=not train))
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean((1, 2)))


def pair() -> dict[str, SmallCNN]:
    """A wide member (the search's leader) and a narrow one of the same depth."""
    return {"wide": SmallCNN(8, nnx.Rngs(0)), "narrow": SmallCNN(4, nnx.Rngs(1))}


def is_finite_metrics(metrics: dict) -> bool:
    values = [v for k, v in metrics.items() if k != "epoch"]
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def digits():
    return subset(load_digits(), 64, 32)


@pytest.fixture(scope="module")
def search_model():
    """The search model of the pair: one initial cluster, coefficients shared by all layers."""
    model = budgeted(pair(), BUDGET, sample_input=SAMPLE, bins=1, shared_coefficients=True)
    params, state = model.init(jax.random.key(0))
    return model, params, state


def weight_gradients(model, params, state, batches) -> dict[str, np.ndarray]:
    """`search.weight_gradients` with the training loss of the pipeline."""
    return search.weight_gradients(model, params, state, batches, members_loss)


def reference_gradients(model, params, state, images, labels) -> dict[str, np.ndarray]:
    """dL/dW by hand: jax.grad of the members' summed mean cross-entropy in eval mode."""

    def loss(member_params):
        total = 0.0
        for member in model.members:
            logits, _ = member.apply_fn(
                member_params[member.name], state[member.name], images, False
            )
            total += optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return total

    grads = jax.jit(jax.grad(loss))(model.member_params(params))
    return {
        layer.id: np.asarray(tree.flatten(grads[layer.member])[layer.path])
        for layer in model.plan.layers
    }


# --- weight_gradients ---------------------------------------------------------------------------


def test_weight_gradients_match_a_hand_computed_grad_of_the_composed_weights(search_model, digits):
    model, params, state = search_model
    images, labels = digits.train_images[:16], digits.train_labels[:16]
    grads = weight_gradients(model, params, state, [(images, labels)])
    assert set(grads) == {layer.id for layer in model.plan.layers}
    assert len(grads) == 6
    for layer in model.plan.layers:
        assert isinstance(grads[layer.id], np.ndarray)
        assert grads[layer.id].shape == layer.shape
    expected = reference_gradients(model, params, state, images, labels)
    for layer_id, grad in grads.items():
        np.testing.assert_allclose(grad, expected[layer_id], rtol=1e-4, atol=1e-6)
        assert np.abs(grad).max() > 0


def test_weight_gradients_are_a_derivative_of_the_eval_loss_wrt_one_kernel(search_model, digits):
    """A central difference of the loss along the gradient of one composed kernel agrees."""
    model, params, state = search_model
    images, labels = digits.train_images[:16], digits.train_labels[:16]
    grads = weight_gradients(model, params, state, [(images, labels)])
    layer = model.plan.layer["wide:conv1.kernel"]
    member = next(m for m in model.members if m.name == "wide")
    base = tree.flatten(model.member_params(params)["wide"])
    direction = grads[layer.id] / np.linalg.norm(grads[layer.id])

    @jax.jit
    def wide_loss(kernel):
        flat = {**base, layer.path: kernel}
        logits, _ = member.apply_fn(
            tree.unflatten_like(member.params, flat), state["wide"], images, False
        )
        # The narrow member's loss does not depend on this kernel.
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def loss(step: float) -> float:
        return float(wide_loss(base[layer.path] + step * direction))

    eps = 1e-3
    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    analytic = float(np.vdot(grads[layer.id], direction))
    assert analytic > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-2)


def test_weight_gradients_average_over_batches(search_model, digits):
    model, params, state = search_model
    first = (digits.train_images[:16], digits.train_labels[:16])
    second = (digits.train_images[16:32], digits.train_labels[16:32])
    one = weight_gradients(model, params, state, [first])
    other = weight_gradients(model, params, state, [second])
    twice = weight_gradients(model, params, state, iter([first, first]))
    both = weight_gradients(model, params, state, [first, second])
    for layer_id in one:
        np.testing.assert_allclose(twice[layer_id], one[layer_id], rtol=1e-6, atol=1e-8)
        mean = (one[layer_id] + other[layer_id]) / 2
        np.testing.assert_allclose(both[layer_id], mean, rtol=1e-5, atol=1e-7)
        assert not np.allclose(one[layer_id], other[layer_id])


def test_the_gradients_program_takes_the_statistics_as_an_argument(
    search_model, digits, monkeypatch
):
    """The running statistics are an argument of the gradients' program, not constants baked
    into it: a measurement later in training (the unsharing's) is the same program, which a
    persistent compilation cache serves, and it uses the statistics it is given."""
    model, params, state = search_model
    batch = (digits.train_images[:16], digits.train_labels[:16])
    programs = []  # the gradients' program as lowered at each call, in StableHLO
    jit = jax.jit

    def recording_jit(fun, **kwargs):
        jitted = jit(fun, **kwargs)
        if fun.__name__ != "member_grads":
            return jitted

        def call(*args):
            programs.append(jitted.lower(*args).as_text())
            return jitted(*args)

        return call

    monkeypatch.setattr(jax, "jit", recording_jit)
    before = weight_gradients(model, params, state, [batch])
    moved = jax.tree_util.tree_map(lambda x: 1.5 * x + 0.25, state)  # later statistics
    after = weight_gradients(model, params, moved, [batch])
    monkeypatch.undo()
    assert len(programs) == 2 and programs[0] == programs[1]
    expected = reference_gradients(model, params, moved, *batch)
    for layer_id, grad in after.items():
        np.testing.assert_allclose(grad, expected[layer_id], rtol=1e-4, atol=1e-6)
        assert not np.allclose(grad, before[layer_id])


def test_weight_gradients_of_no_batches_raise(search_model):
    model, params, state = search_model
    with pytest.raises(ValueError, match="no batches"):
        weight_gradients(model, params, state, [])


# --- gradient_batches ---------------------------------------------------------------------------


def test_gradient_batches_count_and_shapes(digits):
    sample = gradient_batches(digits, batch_size=16, count=3, seed=0)
    assert len(sample) == 3
    for images, labels in sample:
        assert images.shape == (16, 8, 8, 1) and images.dtype == np.float32
        assert labels.shape == (16,) and labels.dtype == np.int32


def test_gradient_batches_are_one_shuffled_epoch_with_its_remainder(digits):
    sample = gradient_batches(digits, batch_size=24, count=10, seed=0)
    assert [len(labels) for _, labels in sample] == [24, 24, 16]  # no more than one epoch
    images = np.concatenate([x for x, _ in sample])
    labels = np.concatenate([y for _, y in sample])
    # Every training example exactly once, with its own label, not in the dataset's order.
    index = {x.tobytes(): i for i, x in enumerate(digits.train_images)}
    order = [index[x.tobytes()] for x in images]
    assert sorted(order) == list(range(64))
    assert order != list(range(64))
    np.testing.assert_array_equal(labels, digits.train_labels[order])


def test_gradient_batches_are_deterministic_for_a_seed(digits):
    a = gradient_batches(digits, 16, 2, seed=3)
    b = gradient_batches(digits, 16, 2, seed=3)
    c = gradient_batches(digits, 16, 2, seed=4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])


# --- run_search ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searches(digits):
    """Two search phases with the same seed: `[(searcher, result, state, log lines)]`."""
    runs = []
    for _ in range(2):
        logs: list[str] = []
        found = npas.run_search(
            pair(),
            digits,
            BUDGET,
            SAMPLE,
            LOOP,
            OPTIM,
            CONFIG,
            bins=1,
            progress=False,
            log=logs.append,
        )
        runs.append((*found, logs))
    return runs


def test_run_search_clusters_cover_every_layer_exactly_once(searches):
    searcher, result, state, logs = searches[0]
    assert isinstance(result, search.SearchResult)
    assert logs == ["search phase: 1 epochs on the initial clusters"]
    # The search model shares one coefficient vector per bank, over one initial cluster.
    assert len(searcher.plan.clusters) == 1
    assert all(len(bank.groups) == 1 for bank in searcher.plan.banks)
    assert int(state.step) == CONFIG.search_epochs * STEPS
    ids = [layer.id for layer in searcher.plan.layers]
    clustered = [i for cluster in result.clusters for i in cluster.layers]
    assert sorted(clustered) == sorted(ids)
    assert len(set(clustered)) == len(clustered) == 6
    found = result.cluster_of
    assert set(found) == set(ids)
    for cluster in result.clusters:
        assert all(found[i] == cluster.name for i in cluster.layers)
    assert result.leader == "wide"
    assert dict(result.matches).keys() == {i for i in ids if i.startswith("narrow:")}
    for narrow, wide in result.matches:
        assert found[narrow] == found[wide] and wide.startswith("wide:")


def cropped_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two kernels `[*spatial, in, out]` on their common top-left block."""
    cin, cout = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    a, b = a[..., :cin, :cout].ravel(), b[..., :cin, :cout].ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_weights_similarity_compares_the_trained_kernels(digits):
    config = dataclasses.replace(CONFIG, similarity="weights")
    searcher, result, state = npas.run_search(
        pair(),
        digits,
        BUDGET,
        SAMPLE,
        LOOP,
        OPTIM,
        config,
        bins=1,
        progress=False,
        log=lambda _: None,
    )
    assert result.measure == "weights"
    # Every layer owns its coefficients in this search phase, so the kernels can differ.
    assert all(len(bank.groups) == bank.users for bank in searcher.plan.banks)
    kernels = {
        layer.id: np.asarray(tree.flatten(params)[layer.path])
        for member, params in searcher.member_params(state.params).items()
        for layer in searcher.plan.layers
        if layer.member == member
    }
    (entry,) = result.similarities
    assert entry.layers == ("wide:stem.kernel", "wide:conv1.kernel", "wide:conv2.kernel")
    expected = [
        [cropped_cosine(kernels[a], kernels[b]) for b in entry.layers] for a in entry.layers
    ]
    np.testing.assert_allclose(entry.array, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(entry.array - np.eye(3)).max() > 1e-3  # the kernels are not all alike
    plan = search.searched_plan(searcher.plan, result, BUDGET)
    assert plan.spent <= plan.budget_params == 1500


def banks_scope_spend(plan) -> int:
    """Parameters a plan spends in banks scope, counted from its banks: whole and partial
    templates, and the block coefficients of sub-layer banks (`[groups, blocks, templates]`)."""
    spent = 0
    for bank in plan.banks:
        size = bank.template_size or bank.piece_size
        spent += bank.templates * size + bank.partial
        if size < bank.piece_size:
            blocks = -(-bank.piece_size // size)
            spent += len(bank.groups) * blocks * (bank.templates + (bank.partial > 0))
    return spent


def test_run_search_result_makes_a_plan_within_the_budget(searches):
    searcher, result, _, _ = searches[0]
    final = budgeted(pair(), BUDGET, sample_input=SAMPLE, bins=1)
    plan = search.searched_plan(final.plan, result, BUDGET)
    assert plan.budget_params == result.budget_params == 1500
    assert banks_scope_spend(plan) <= 1500
    assert plan.clusters == result.clusters
    assert plan.coefficients == result.coefficients
    # Every wide layer in a cluster of its own needs 72 + 576 + 1,152 = 1,800 at full size
    # (the narrow layers' kernels nest inside their matched wide ones'), over the budget;
    # with sub-layer templates its minimum (brute force over every template size) fits.
    wide = [layer.id for layer in searcher.plan.layers if layer.member == "wide"]
    apart = {layer_id: f"solo{n}" for n, layer_id in enumerate(wide)}
    clusters, coefficients, _ = search.build_clusters(searcher.plan, apart, dict(result.matches))
    paper_only = dataclasses.replace(searcher.plan, sublayer_templates=0)
    assert search.clusters_minimum_budget(paper_only, clusters, coefficients) == 1800
    banks = bank_layout(clusters, searcher.plan.layers, coefficients)
    minimum = sum(
        min(
            [b.piece_size]
            + [t + len(b.groups) * -(-b.piece_size // t) for t in range(1, b.piece_size)]
        )
        for b in banks
    )
    assert search.clusters_minimum_budget(searcher.plan, clusters, coefficients) == minimum < 1500


def test_run_search_clusters_the_gradients_of_its_trained_state(searches, digits):
    searcher, result, state, _ = searches[0]
    sample = gradient_batches(digits, LOOP.batch_size, CONFIG.gradient_batches, LOOP.seed + 1)
    grads = weight_gradients(searcher, state.params, state.model_state, sample)
    # the run unshares later, so its search counted the room unsharing keeps
    reserve = npas.unshares(CONFIG, LOOP)
    assert (
        search.search_clusters(
            searcher.plan, grads, BUDGET, tau=CONFIG.tau, reserve_unsharing=reserve
        )
        == result
    )
    # The initial weights (train's init key) give other gradients: the phase trained.
    init_key, _ = jax.random.split(jax.random.key(LOOP.seed))
    fresh, model_state = searcher.init(init_key)
    untrained = weight_gradients(searcher, fresh, model_state, sample)
    assert search.search_clusters(searcher.plan, untrained, BUDGET).similarities != (
        result.similarities
    )


def test_run_search_is_deterministic_given_the_seed(searches):
    (_, first, state_a, _), (_, second, state_b, _) = searches
    assert first.clusters == second.clusters
    assert first.coefficients == second.coefficients
    assert first.assignment == second.assignment
    assert first.matches == second.matches
    assert first.tau == second.tau
    for a, b in zip(first.similarities, second.similarities, strict=True):
        assert a.layers == b.layers
        np.testing.assert_array_equal(a.array, b.array)
    for a, b in zip(
        jax.tree_util.tree_leaves(state_a.params),
        jax.tree_util.tree_leaves(state_b.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# --- run_npas -----------------------------------------------------------------------------------


def dry_train(model, dataset, loop, optim, *, phase=None, **_):
    """`train` without a step: the initial state as `train` makes it, then the interventions."""
    init_key, train_key = jax.random.split(jax.random.key(loop.seed))
    initial, interventions = (phase or Phase()).initial, (phase or Phase()).interventions
    params, model_state = initial if initial is not None else model.init(init_key)
    optimizer = make_optimizer(optim, loop.epochs, model.weight_decay_mask(params))
    state = TrainState(jnp.array(0), params, model_state, optimizer.init(params), train_key)
    for epoch in sorted(interventions):
        model, state = interventions[epoch](model, state)
    return state, {"epoch": loop.epochs}


class TrainCalls:
    """Records every `train` call of the pipeline: its keyword arguments and its result.

    With `dry`, nothing is trained (`dry_train`): no train step is compiled.
    """

    def __init__(self, dry: bool = False):
        self.run = dry_train if dry else train
        self.calls: list[tuple[dict, tuple]] = []

    def __call__(self, model, dataset, loop, optim, **kwargs):
        result = self.run(model, dataset, loop, optim, **kwargs)
        self.calls.append(({"model": model, **kwargs}, result))
        return result


def test_run_npas_without_search_trains_the_initial_clusters(digits, monkeypatch):
    calls = TrainCalls(dry=True)
    monkeypatch.setattr(npas, "train", calls)
    logs: list[str] = []
    loop = LoopConfig(epochs=1, batch_size=16, eval_batch_size=32)
    config = SearchConfig(search=False, unshare_epoch=0)
    out = npas.run_npas(
        pair(),
        digits,
        BUDGET,
        SAMPLE,
        loop,
        OPTIM,
        config,
        bins=1,
        progress=False,
        log=logs.append,
    )
    initial = budgeted(pair(), BUDGET, sample_input=SAMPLE, bins=1).plan
    assert out["search"] is None and out["searcher"] is None and out["unshare"] is None
    assert out["initial_plan"] == initial
    assert out["model"].plan == initial
    assert len(initial.clusters) == 1
    # The final model's layers own their coefficients.
    assert all(groups == (i,) * len(groups) for i, groups in initial.coefficients)
    assert logs == []
    assert len(calls.calls) == 1  # no search phase
    kwargs, (state, metrics) = calls.calls[0]
    assert kwargs["model"].plan == initial
    assert kwargs["phase"].initial is None and kwargs["phase"].interventions == {}
    assert kwargs["phase"].stop_after is None  # the whole run, not a search phase
    assert out["state"] is state and out["metrics"] is metrics


@pytest.fixture(scope="module")
def npas_run(digits):
    """Search, then the final run from scratch with unsharing after epoch 1 of 2."""
    calls = TrainCalls()
    epochs, logs = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(npas, "train", calls)
        out = npas.run_npas(
            pair(),
            digits,
            BUDGET,
            SAMPLE,
            LOOP,
            OPTIM,
            CONFIG,
            bins=1,
            progress=False,
            log=logs.append,
            on_epoch=epochs.append,
        )
    return out, calls.calls, epochs, logs


def test_run_npas_with_search_and_unsharing_runs_end_to_end(npas_run, searches, digits):
    out, calls, epochs, logs = npas_run
    result = out["search"]
    # The search phase is run_search's, with the same seed.
    assert result == searches[0][1]
    assert out["searcher"].plan == searches[0][0].plan
    assert out["initial_plan"].clusters == result.clusters
    assert out["initial_plan"].coefficients == result.coefficients
    assert out["initial_plan"].spent <= out["initial_plan"].budget_params == 1500
    assert [m["epoch"] for m in epochs] == [1, 2]
    assert out["metrics"] == epochs[-1]
    assert is_finite_metrics(out["metrics"])
    assert {"test_accuracy/wide", "test_accuracy/narrow", "test_accuracy/ensemble"} <= set(
        out["metrics"]
    )
    assert int(out["state"].step) == LOOP.epochs * STEPS
    assert logs[0] == "search phase: 1 epochs on the initial clusters"
    assert logs[1].startswith(f"search: tau {result.tau:.2f}, 1 initial clusters -> ")
    assert any(line.startswith("unsharing: ") for line in logs)
    # Search phase then the final run, from scratch, unsharing after epoch 1.
    (search_kwargs, _), (final_kwargs, _) = calls
    assert search_kwargs["phase"].stop_after == CONFIG.search_epochs
    assert not search_kwargs["phase"].evaluate  # its metrics are not kept: no test pass
    assert final_kwargs["phase"].initial is None and final_kwargs["phase"].evaluate
    assert set(final_kwargs["phase"].interventions) == {1}


def test_run_npas_returns_the_unshared_model_that_fits_its_state(npas_run, digits):
    out, _, _, _ = npas_run
    initial, plan = out["initial_plan"], out["model"].plan
    assert plan.clusters == initial.clusters
    search.source_rows(initial, plan)  # only splits of the initial groups
    vectors = {
        "vectors_before": sum(len(b.groups) for b in initial.banks),
        "vectors_after": sum(len(b.groups) for b in plan.banks),
    }
    assert out["unshare"] == vectors
    assert vectors["vectors_after"] >= vectors["vectors_before"]
    state = out["state"]
    for bank in plan.banks:
        shape = state.params["bank"]["coefficients"][bank.key].shape
        assert shape == (len(bank.groups), bank.num_templates)
    logits, _ = out["model"].apply(state.params, state.model_state, digits.test_images[:8])
    assert set(logits) == {"wide", "narrow"}
    assert all(x.shape == (8, NUM_CLASSES) and np.isfinite(x).all() for x in logits.values())


def test_run_npas_warm_start_starts_from_the_search_phase(digits, monkeypatch):
    calls = TrainCalls()
    monkeypatch.setattr(npas, "train", calls)
    config = SearchConfig(
        search_epochs=1, gradient_batches=2, unshare_epoch=1, unshare_batches=2, warm_start=True
    )
    out = npas.run_npas(
        pair(),
        digits,
        BUDGET,
        SAMPLE,
        LOOP,
        OPTIM,
        config,
        bins=1,
        progress=False,
        log=lambda _: None,
    )
    assert is_finite_metrics(out["metrics"])
    assert int(out["state"].step) == LOOP.epochs * STEPS
    (_, (search_state, _)), (final_kwargs, _) = calls.calls
    params, model_state = final_kwargs["phase"].initial
    final = final_kwargs["model"]
    assert final.plan == out["initial_plan"]
    fresh, _ = final.init(jax.random.key(LOOP.seed))
    same = lambda a, b: all(  # noqa: E731
        np.array_equal(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )
    assert same(params["unshared"], search_state.params["unshared"])
    assert same(model_state, search_state.model_state)
    assert same(params["bank"]["coefficients"], fresh["bank"]["coefficients"])
    searched = search_state.params["bank"]
    for part in ("templates", "partial"):
        for key, value in params["bank"][part].items():
            kept = key in searched[part] and searched[part][key].shape == value.shape
            np.testing.assert_array_equal(
                value, searched[part][key] if kept else fresh["bank"][part][key]
            )


# --- unsharing inside training ------------------------------------------------------------------


def counted(member: Member, traces: collections.Counter) -> Member:
    """`member` whose apply counts its training-mode calls: one per trace of a train step."""

    def apply_fn(p, s, x, train):
        traces[member.name] += bool(train)
        return member.apply_fn(p, s, x, train)

    return Member(member.name, member.params, member.state, apply_fn)


def twin_model(traces: collections.Counter) -> BudgetedModel:
    """A wide member and two identical narrow twins, each twin layer sharing the coefficients
    of the wide layer at its depth (clusters: the stems, the conv1s, the conv2s).

    The twins start equal and see the same data, so their gradients always agree; the wide
    member's disagree with theirs.
    """
    modules = {
        "wide": SmallCNN(8, nnx.Rngs(0)),
        "twin_a": SmallCNN(4, nnx.Rngs(1)),
        "twin_b": SmallCNN(4, nnx.Rngs(1)),
    }
    base = budgeted(modules, Budget(fraction=1.0), sample_input=SAMPLE, bins=3)
    plan = base.plan
    wide = {layer.depth: layer.id for layer in plan.layers if layer.member == "wide"}
    matches = {
        layer.id: wide[layer.depth] for layer in plan.layers if layer.member.startswith("twin")
    }
    leaders = {i: plan.cluster_of[i].name for i in wide.values()}
    # twins are copies of one another: let them share, to exercise unsharing
    clusters, coefficients, _ = search.build_clusters(plan, leaders, matches, share_copies=True)
    shared = make_plan(plan.layers, plan.unshared, clusters, coefficients, plan.budget)
    return BudgetedModel(shared, tuple(counted(m, traces) for m in base.members))


def train_with_unsharing(digits, threshold: float):
    traces: collections.Counter = collections.Counter()
    model = twin_model(traces)
    loop = LoopConfig(epochs=3, batch_size=16, eval_batch_size=32)
    config = SearchConfig(unshare_threshold=threshold, unshare_batches=2)
    record: dict = {}
    intervene = npas.unshare_intervention(digits, loop, config, lambda _: None, record)
    seen = {}

    def spy(model, state):
        seen["before"] = (model, state)
        seen["after"] = intervene(model, state)
        return seen["after"]

    builds = []
    make_train_step = train_module.make_train_step

    def counting_make_train_step(*args):
        builds.append(args[0])
        return make_train_step(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "make_train_step", counting_make_train_step)
        state, metrics = train(
            model, digits, loop, OPTIM, progress=False, phase=Phase(interventions={1: spy})
        )
    return model, state, metrics, record, seen, traces, builds


@pytest.fixture(scope="module")
def split_run(digits):
    """Unsharing with a threshold so high that any disagreement splits."""
    return train_with_unsharing(digits, threshold=0.9999)


def level0(plan, cluster):
    return plan.bank[cluster, 0]


def test_twin_model_shares_coefficients_across_members(split_run):
    model = split_run[0]
    plan = model.plan
    assert [len(c.layers) for c in plan.clusters] == [3, 3, 3]
    for cluster in plan.clusters:
        wide, twin_a, twin_b = cluster.layers
        assert wide.startswith("wide:")
        bank = level0(plan, cluster.name)
        # One vector at level 0, read by all three; several templates, so cosines are not +-1.
        assert bank.groups == (wide,) and bank.users == 3
        assert bank.num_templates >= 2
        assert plan.coefficient_row(twin_a, 0) == plan.coefficient_row(wide, 0)
        assert plan.groups_of[twin_b] == plan.groups_of[twin_a] == (wide,)


def test_disagreeing_sharers_get_their_own_vector(split_run):
    model, state, metrics, record, _, _, _ = split_run
    old, new = model.plan, record["plan"]
    assert record["unshare"] == {
        "vectors_before": sum(len(b.groups) for b in old.banks),
        "vectors_after": sum(len(b.groups) for b in old.banks) + 3,
    }
    assert new.clusters == old.clusters
    assert [(b.key, b.templates, b.partial) for b in new.banks] == [
        (b.key, b.templates, b.partial) for b in old.banks
    ]
    for cluster in new.clusters:
        wide, twin_a, twin_b = cluster.layers
        assert level0(new, cluster.name).groups == (wide, f"{wide}~1")
        assert new.groups_of[wide] == old.groups_of[wide]
        # The twins agree: they stay on one (new) vector.
        assert new.groups_of[twin_a] == new.groups_of[twin_b] == (f"{wide}~1",)
        assert new.coefficient_row(twin_a, 0) == new.coefficient_row(twin_b, 0) == 1
    assert int(state.step) == 3 * STEPS
    assert is_finite_metrics(metrics)


def test_split_off_vectors_start_as_copies_with_their_optimizer_state(split_run):
    _, _, _, record, seen, _, _ = split_run
    (old_model, before), (new_model, after) = seen["before"], seen["after"]
    assert new_model.plan == record["plan"]
    for cluster in old_model.plan.clusters:
        key = level0(old_model.plan, cluster.name).key
        old_rows = np.asarray(before.params["bank"]["coefficients"][key])
        new_rows = np.asarray(after.params["bank"]["coefficients"][key])
        assert old_rows.shape[0] == 1 and new_rows.shape[0] == 2
        np.testing.assert_array_equal(new_rows, old_rows[[0, 0]])
    # The composed weights do not change at the split.
    old_weights = compose(old_model.plan, before.params["bank"])
    new_weights = compose(new_model.plan, after.params["bank"])
    for layer_id, weight in old_weights.items():
        np.testing.assert_allclose(new_weights[layer_id], weight, rtol=1e-6, atol=1e-7)
    # The momentum of a split-off vector is a copy of its source's.
    momenta = 0
    old_leaves = dict(jax.tree_util.tree_flatten_with_path(before.opt_state)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]:
        names = [getattr(k, "key", None) for k in path]
        if "coefficients" in names and np.ndim(leaf) == 2:
            old = np.asarray(old_leaves[path])
            if names[-1].endswith("_l0"):
                np.testing.assert_array_equal(np.asarray(leaf), old[[0, 0]])
                assert np.abs(old).max() > 0
                momenta += 1
            else:
                np.testing.assert_array_equal(np.asarray(leaf), old)
    assert momenta == 3


def test_split_off_vectors_diverge_and_sharers_stay_tied(split_run):
    _, state, _, record, _, _, _ = split_run
    plan = record["plan"]
    bank = state.params["bank"]
    for cluster in plan.clusters:
        rows = np.asarray(bank["coefficients"][level0(plan, cluster.name).key])
        assert rows.shape[0] == 2
        assert not np.allclose(rows[0], rows[1], rtol=1e-4, atol=1e-6)
    # The twins read one vector (and identical everything else): identical kernels.
    weights = compose(plan, bank)
    for cluster in plan.clusters:
        _, twin_a, twin_b = cluster.layers
        np.testing.assert_array_equal(weights[twin_a], weights[twin_b])


def test_training_continues_with_one_recompilation(split_run):
    model, _, _, record, _, traces, builds = split_run
    # Traced once per member for the first plan and once after the split, never per epoch.
    assert traces == {"wide": 2, "twin_a": 2, "twin_b": 2}
    assert len(builds) == 2
    assert builds[0].plan == model.plan and builds[1].plan == record["plan"]


def test_agreeing_sharers_stay_shared(digits):
    model, state, metrics, record, seen, traces, builds = train_with_unsharing(
        digits, threshold=-1.0
    )
    vectors = sum(len(b.groups) for b in model.plan.banks)
    assert record["unshare"] == {"vectors_before": vectors, "vectors_after": vectors}
    assert "plan" not in record  # the run's model is its first one (`run_npas`)
    # the same model and state come back, so the compiled step goes on: one build, one trace
    assert seen["after"][0] is seen["before"][0] and seen["after"][1] is seen["before"][1]
    assert len(builds) == 1
    assert traces == {"wide": 1, "twin_a": 1, "twin_b": 1}
    for bank in model.plan.banks:
        assert state.params["bank"]["coefficients"][bank.key].shape[0] == len(bank.groups)
    assert is_finite_metrics(metrics)


# --- model-scope budgets ------------------------------------------------------------------------


def search_on_random_gradients(
    modules,
    dataset,
    budget,
    sample_input,
    loop,
    optim,
    config,
    *,
    bins=4,
    rule=None,
    sublayer_templates=2,
    **_,
):
    """Stands in for `run_search` without the search phase: clusters random gradients."""
    searcher = budgeted(
        modules,
        budget,
        sample_input=sample_input,
        bins=bins,
        rule=rule,
        shared_coefficients=True,
        sublayer_templates=sublayer_templates,
    )
    rng = np.random.default_rng(0)
    grads = {layer.id: rng.normal(size=layer.shape) for layer in searcher.plan.layers}
    result = search.search_clusters(
        searcher.plan,
        grads,
        budget,
        tau=config.tau,
        step=config.tau_step,
        reserve_unsharing=npas.unshares(config, loop),
    )
    return searcher, result, None


def trainable_params(params) -> int:
    return sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params))


MODEL_SCOPE_PARAMS = 2_500
"""A model-scope budget for the pair, just below its own 2,600 parameters in that scope."""


def dry_model_scope_run(digits, monkeypatch, config: SearchConfig) -> dict:
    """`run_npas` of the pair at 2,500 params in model scope, searched on random gradients."""
    monkeypatch.setattr(npas, "run_search", search_on_random_gradients)
    monkeypatch.setattr(npas, "train", TrainCalls(dry=True))
    budget = Budget(params=MODEL_SCOPE_PARAMS, scope="model")
    quiet = dict(progress=False, log=lambda _: None)
    return npas.run_npas(pair(), digits, budget, SAMPLE, LOOP, OPTIM, config, bins=1, **quiet)


def test_run_npas_with_a_model_scope_budget_unshares_within_it(digits, monkeypatch):
    config = SearchConfig(unshare_epoch=1, unshare_batches=2, unshare_threshold=0.9999)
    out = dry_model_scope_run(digits, monkeypatch, config)
    # The final plan kept room for every layer's own vectors (fill spent only the rest), so
    # the disagreeing sharers are split off and the model stays within its budget.
    initial, final = out["initial_plan"], out["model"].plan
    assert initial.reserve_unsharing and initial.reserved > 0
    assert initial.spent + initial.reserved + initial.leftover == MODEL_SCOPE_PARAMS
    assert out["unshare"]["vectors_after"] > out["unshare"]["vectors_before"]
    assert final.coefficient_params > initial.coefficient_params
    assert final.spent + final.reserved <= MODEL_SCOPE_PARAMS
    assert final.reserved == initial.reserved - (final.spent - initial.spent)
    assert trainable_params(out["state"].params) == final.trainable_params <= MODEL_SCOPE_PARAMS


def test_run_npas_without_unsharing_reserves_nothing(digits, monkeypatch):
    out = dry_model_scope_run(digits, monkeypatch, SearchConfig(unshare_epoch=0))
    plan = out["model"].plan
    assert not plan.reserve_unsharing and plan.reserved == 0
    assert plan.spent == MODEL_SCOPE_PARAMS  # fill spends the whole budget


def test_run_npas_accepts_a_model_scope_budget_that_the_searched_plan_fits(digits, monkeypatch):
    monkeypatch.setattr(npas, "run_search", search_on_random_gradients)
    monkeypatch.setattr(npas, "train", TrainCalls(dry=True))
    budget = Budget(params=1535, scope="model")
    paper = dict(bins=1, sublayer_templates=0)  # the full-size geometry only
    searcher, result, _ = search_on_random_gradients(
        pair(), digits, budget, SAMPLE, LOOP, OPTIM, SearchConfig(), **paper
    )
    # The search's clusters fit (the final plan below spends at most 1,535), but every
    # layer owning its coefficients in the initial clusters does not.
    own = search.clusters_minimum_budget(
        searcher.plan,
        searcher.plan.clusters,
        own_coefficients(searcher.plan.clusters, searcher.plan.layers),
    )
    assert own > 1535
    loop = LoopConfig(epochs=1, batch_size=16, eval_batch_size=32)
    config = SearchConfig(unshare_epoch=0)
    out = npas.run_npas(
        pair(),
        digits,
        budget,
        SAMPLE,
        loop,
        OPTIM,
        config,
        **paper,
        progress=False,
        log=lambda _: None,
    )
    assert out["initial_plan"].clusters == result.clusters
    assert out["initial_plan"].spent <= 1535
    assert trainable_params(out["state"].params) <= 1535
