import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_softmax, softmax

from experiments.augment import Augmentation
from experiments.data import ArrayRecords, Split, load_digits, subset
from experiments.models import build_budgeted, create_members
from experiments.train import (
    LoopConfig,
    OptimConfig,
    Phase,
    TrainState,
    all_finite,
    classification_metrics,
    learning_rate_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
    predict,
    train,
)
from superweights import Budget

NUM_CLASSES = 10


class LinearModel:
    """A softmax regression with the train/eval model interface; compiles in milliseconds."""

    def __init__(self, features: int, classes: int = NUM_CLASSES, members=("linear",)):
        self.features, self.classes, self.members = features, classes, members

    def init(self, key):
        params = {}
        for i, name in enumerate(self.members):
            k = jax.random.fold_in(key, i)
            params[name] = {
                "w": 0.01 * jax.random.normal(k, (self.features, self.classes)),
                "b": jnp.zeros(self.classes),
            }
        return params, {name: {"calls": jnp.array(0)} for name in self.members}

    def apply(self, params, state, x, train=False, rng=None):
        del rng  # no dropout
        flat = x.reshape(len(x), -1)
        logits = {n: flat @ params[n]["w"] + params[n]["b"] for n in self.members}
        new_state = {n: {"calls": state[n]["calls"] + train} for n in self.members}
        return logits, new_state

    def weight_decay_mask(self, params):
        return {n: {"w": True, "b": False} for n in params}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def small_digits(digits):
    return subset(digits, 256, 96)


# --- learning rate schedule and optimiser ---------------------------------------------------


def test_learning_rate_decays_by_decay_at_30_60_80_percent():
    config = OptimConfig(learning_rate=0.1, decay=0.2)
    schedule = learning_rate_schedule(config, total_steps=100)
    expected = {
        0: 0.1,
        29: 0.1,
        30: 0.02,
        59: 0.02,
        60: 0.004,
        79: 0.004,
        80: 0.0008,
        99: 0.0008,
    }
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-6), step


def test_learning_rate_milestones_round_to_the_nearest_step():
    config = OptimConfig(learning_rate=1.0, milestones=(0.5,), decay=0.1)
    schedule = learning_rate_schedule(config, total_steps=7)  # 3.5 -> 4 (round half to even)
    assert float(schedule(3)) == pytest.approx(1.0)
    assert float(schedule(4)) == pytest.approx(0.1)


def test_learning_rate_milestones_on_the_same_step_all_apply():
    config = OptimConfig(learning_rate=0.1, decay=0.2)
    schedule = learning_rate_schedule(config, total_steps=3)  # milestones at steps 1, 2, 2
    assert float(schedule(1)) == pytest.approx(0.02)
    assert float(schedule(2)) == pytest.approx(0.1 * 0.2**3)


def test_weight_decay_only_where_the_mask_is_true():
    config = OptimConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.01)
    params = {
        "decayed": {"kernel": jnp.array([2.0, -3.0, 0.5])},
        "kept": {"scale": jnp.array([4.0, -1.0]), "coefficients": jnp.array([[1.5]])},
    }
    mask = {"decayed": {"kernel": True}, "kept": {"scale": False, "coefficients": False}}
    optimizer = make_optimizer(config, total_steps=10, mask=mask)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    # The decayed gradient wd * p goes through Nesterov momentum: g + momentum * g on step 1.
    factor = 1 - config.learning_rate * config.weight_decay * (1 + config.momentum)
    old_kernel = np.asarray(params["decayed"]["kernel"])
    new_kernel = np.asarray(new["decayed"]["kernel"])
    np.testing.assert_allclose(new_kernel, old_kernel * factor, rtol=1e-6)
    assert np.all(np.abs(new_kernel) < np.abs(old_kernel))
    assert np.all(np.sign(new_kernel) == np.sign(old_kernel))
    for name in ("scale", "coefficients"):
        np.testing.assert_array_equal(new["kept"][name], params["kept"][name])


def test_optimizer_uses_the_schedule():
    config = OptimConfig(learning_rate=0.5, momentum=0.0, weight_decay=0.0, milestones=(0.5,))
    params = {"w": jnp.array([1.0])}
    optimizer = make_optimizer(config, total_steps=4, mask={"w": True})
    state = optimizer.init(params)
    steps = []
    for _ in range(4):
        updates, state = optimizer.update({"w": jnp.array([1.0])}, state, params)
        steps.append(float(updates["w"][0]))
    np.testing.assert_allclose(steps, [-0.5, -0.5, -0.1, -0.1], rtol=1e-6)


# --- metrics --------------------------------------------------------------------------------


def test_classification_metrics_of_one_member():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.5, 0.0]])
    labels = np.array([0, 1, 1, 0])
    metrics = classification_metrics({"m": logits}, labels)
    expected_nll = -np.mean([log_softmax(row)[y] for row, y in zip(logits, labels, strict=True)])
    assert metrics["accuracy/m"] == pytest.approx(0.75)
    assert metrics["accuracy"] == metrics["accuracy/m"]
    assert metrics["nll/m"] == pytest.approx(expected_nll, rel=1e-5)
    assert set(metrics) == {"accuracy", "accuracy/m", "nll/m"}


def test_classification_metrics_ensemble_is_the_mean_of_softmaxes():
    a = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    b = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.5], [0.0, 0.0, 5.0], [0.0, 0.0, 3.0]])
    labels = np.array([0, 1, 2, 2])
    metrics = classification_metrics({"a": a, "b": b}, labels)
    mean_probability = (softmax(a, axis=-1) + softmax(b, axis=-1)) / 2
    rows = np.arange(len(labels))
    assert metrics["accuracy/a"] == pytest.approx(0.75)
    assert metrics["accuracy/b"] == pytest.approx(0.5)
    assert metrics["accuracy/ensemble"] == pytest.approx(
        np.mean(mean_probability.argmax(-1) == labels)
    )
    assert metrics["accuracy/ensemble"] == pytest.approx(1.0)
    assert metrics["accuracy"] == metrics["accuracy/ensemble"]
    assert metrics["nll/ensemble"] == pytest.approx(
        -np.mean(np.log(mean_probability[rows, labels])), rel=1e-5
    )
    # Not the softmax of the mean logits.
    of_mean_logits = -np.mean(log_softmax((a + b) / 2, axis=-1)[rows, labels])
    assert abs(metrics["nll/ensemble"] - of_mean_logits) > 1e-3
    assert metrics["nll/a"] == pytest.approx(-np.mean(log_softmax(a, axis=-1)[rows, labels]))


def test_classification_metrics_nll_is_finite_for_a_certain_wrong_answer():
    metrics = classification_metrics({"m": np.array([[200.0, 0.0]])}, np.array([1]))
    assert metrics["accuracy"] == 0.0
    assert metrics["nll/m"] == pytest.approx(-math.log(1e-12))


# --- predict --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5)])
def test_predict_pads_the_last_batch_and_returns_n_rows(n, batch_size):
    model = LinearModel(features=6, members=("a", "b"))
    params, state = model.init(jax.random.key(0))
    images = np.random.default_rng(0).normal(size=(n, 2, 3, 1)).astype(np.float32)
    jitted = make_eval_step(model)
    seen = []

    def eval_step(p, s, x):
        seen.append(np.array(x))
        return jitted(p, s, x)

    labels = np.arange(n, dtype=np.int32)
    out = predict(eval_step, params, state, Split(ArrayRecords(images, labels)), batch_size)
    assert set(out) == {"a", "b"}
    expected, _ = model.apply(params, state, jnp.asarray(images))
    for name in ("a", "b"):
        assert out[name].shape == (n, NUM_CLASSES)
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-6)
    assert len(seen) == math.ceil(n / batch_size)
    assert all(x.shape == (batch_size, 2, 3, 1) and x.dtype == np.float32 for x in seen)
    np.testing.assert_array_equal(np.concatenate(seen)[:n], images)
    padding = np.concatenate(seen)[n:]  # copies of the last image
    assert len(padding) == math.ceil(n / batch_size) * batch_size - n
    np.testing.assert_array_equal(padding, np.broadcast_to(images[-1], padding.shape))


def test_predict_matches_an_unpadded_forward_of_a_real_network(digits):
    module = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    model = build_budgeted(module, Budget(fraction=0.8), jnp.zeros((1, 8, 8, 1)))
    params, state = model.init(jax.random.key(0))
    images = digits.test_images[:11]
    test = Split(ArrayRecords(images, digits.test_labels[:11]))
    out = predict(make_eval_step(model), params, state, test, batch_size=4)
    expected, _ = model.apply(params, state, jnp.asarray(images), train=False)
    assert out["wrn-10-1"].shape == (11, 10)
    np.testing.assert_allclose(out["wrn-10-1"], expected["wrn-10-1"], rtol=1e-4, atol=1e-5)


# --- train ----------------------------------------------------------------------------------


def test_train_budgeted_wrn_lowers_the_loss_and_reports_test_metrics(digits):
    # test_checkpoint's and test_distributed's model, data and schedule: one compiled step
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    model = build_budgeted(modules, Budget(fraction=0.8), jnp.zeros((1, 8, 8, 1)))
    loop = LoopConfig(epochs=3, batch_size=32, eval_batch_size=64, eval_every=2)
    epochs = []
    state, metrics = train(
        model, subset(digits, 128, 64), loop, OptimConfig(), progress=False, on_epoch=epochs.append
    )
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    losses = [m["train_loss"] for m in epochs]
    assert losses[0] < 1.5 * math.log(10)  # starts near chance, not diverged
    assert losses[-1] < 0.8 * losses[0]
    assert metrics == epochs[-1]
    # Tested every `eval_every` epochs and at the end only.
    assert "test_accuracy" not in epochs[0]
    assert {"test_accuracy", "test_accuracy/wrn-10-1", "test_nll/wrn-10-1"} <= set(epochs[1])
    assert {"test_accuracy", "test_accuracy/wrn-10-1", "test_nll/wrn-10-1"} <= set(metrics)
    assert metrics["test_accuracy"] > 0.3  # chance is 0.1
    assert math.isfinite(metrics["test_nll/wrn-10-1"])
    assert int(state.step) == 3 * (128 // 32)
    times = [m["time"] for m in epochs]
    assert times == sorted(times) and times[0] > 0


def test_train_steps_drop_the_remainder_and_call_on_epoch_once_per_epoch(small_digits):
    data = subset(small_digits, 100, 20)
    model = LinearModel(features=64)
    calls = []
    loop = LoopConfig(epochs=4, batch_size=32, eval_batch_size=16, augmentation=Augmentation())
    state, metrics = train(model, data, loop, OptimConfig(), progress=False, on_epoch=calls.append)
    assert [m["epoch"] for m in calls] == [1, 2, 3, 4]
    assert int(state.step) == 4 * 3  # 100 // 32 full batches per epoch
    assert int(state.model_state["linear"]["calls"]) == 12  # state threads through the steps
    assert metrics == calls[-1]
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_a_phase_that_does_not_evaluate_never_runs_the_model_in_eval_mode(small_digits):
    data = subset(small_digits, 64, 20)
    model = LinearModel(features=64)
    modes = []
    apply = model.apply
    model.apply = lambda *args, train=False, **kwargs: (
        modes.append(train) or apply(*args, train=train, **kwargs)
    )
    loop = LoopConfig(epochs=3, batch_size=32, eval_every=1, augmentation=Augmentation())
    calls = []
    quiet = Phase(stop_after=2, evaluate=False)
    _, metrics = train(
        model, data, loop, OptimConfig(), progress=False, phase=quiet, on_epoch=calls.append
    )
    assert [m["epoch"] for m in calls] == [1, 2] and metrics == calls[-1]
    assert not any(k.startswith("test_") for m in calls for k in m)
    assert modes == [True]  # one trace of the train step, none of an eval step
    _, metrics = train(model, data, loop, OptimConfig(), progress=False, phase=Phase(stop_after=2))
    assert modes[1:] == [True, False] and 0 <= metrics["test_accuracy"] <= 1


def test_train_is_deterministic_given_the_seed(small_digits):
    model = LinearModel(features=64)
    loop = LoopConfig(epochs=2, batch_size=64, augmentation=Augmentation(crop_padding=1))
    first, a = train(model, small_digits, loop, OptimConfig(), progress=False)
    second, b = train(model, small_digits, loop, OptimConfig(), progress=False)
    np.testing.assert_array_equal(first.params["linear"]["w"], second.params["linear"]["w"])
    assert a["train_loss"] == b["train_loss"]
    # Only the seed changes: the same recipe and augmentation.
    other, _ = train(
        model, small_digits, dataclasses.replace(loop, seed=1), OptimConfig(), progress=False
    )
    assert not np.array_equal(first.params["linear"]["w"], other.params["linear"]["w"])


def test_train_with_batch_larger_than_the_train_set_raises(small_digits):
    data = subset(small_digits, 20, 10)
    with pytest.raises(ValueError, match="batch size 32 exceeds the 20 training examples"):
        train(LinearModel(features=64), data, LoopConfig(batch_size=32), OptimConfig())


def test_train_raises_when_the_loss_is_not_finite(small_digits):
    model = LinearModel(features=64)
    loop = LoopConfig(epochs=3, batch_size=32)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(model, small_digits, loop, OptimConfig(learning_rate=1e30), progress=False)


# --- mixed precision ------------------------------------------------------------------------


def test_a_bf16_step_has_the_float32_losses_and_keeps_params_and_optimizer_in_float32(digits):
    """wrn-10-1 computing in bf16 against the same model in float32, same params and batches:
    the losses agree to bf16's precision, and everything trained or kept stays float32."""
    from experiments.augment import preset

    images, labels = jnp.asarray(digits.train_images[:32]), jnp.asarray(digits.train_labels[:32])
    sample = jnp.zeros((1, 8, 8, 1))
    losses, states = {}, {}
    for dtype in ("float32", "bfloat16"):
        modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0, dtype=dtype)
        model = build_budgeted(modules, Budget(fraction=0.8), sample, dtype=dtype)
        params, model_state = model.init(jax.random.key(0))
        optimizer = make_optimizer(OptimConfig(), 100, model.weight_decay_mask(params))
        state = TrainState(
            jnp.array(0), params, model_state, optimizer.init(params), jax.random.key(1)
        )
        step = make_train_step(model, optimizer, preset("none"))
        losses[dtype] = []
        for _ in range(3):
            state, metrics = step(state, images, labels)
            assert metrics["loss"].dtype == jnp.float32
            losses[dtype].append(float(metrics["loss"]))
        states[dtype] = (model, state)
    # The first step's loss differs by the rounding of bf16 alone; later ones also follow
    # updates computed in bf16, and drift further apart.
    np.testing.assert_allclose(losses["bfloat16"][0], losses["float32"][0], rtol=0.01)
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
    assert losses["bfloat16"] != losses["float32"]  # the members did compute in bf16
    model, state = states["bfloat16"]
    for part in (state.params, state.opt_state, state.model_state):
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(part) if hasattr(leaf, "dtype")}
        assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(model.export(state.params)))
    eval_logits = make_eval_step(model)(state.params, state.model_state, images)
    assert eval_logits["wrn-10-1"].dtype == jnp.float32


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_entry_anywhere_makes_a_tree_not_finite(bad):
    tree = {
        "kernel": np.ones((3, 3, 2, 4), np.float32),
        "bias": np.zeros(4, np.float32),
        "half": np.full((2, 5), 2.5, jnp.bfloat16),
    }
    assert bool(all_finite(tree))
    assert bool(all_finite({}))  # nothing to check
    for name, leaf in tree.items():
        for index in [(0,) * leaf.ndim, tuple(n - 1 for n in leaf.shape)]:
            broken = np.array(leaf)
            broken[index] = bad
            assert not bool(all_finite({**tree, name: broken})), (name, index)
