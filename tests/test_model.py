import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import IMAGE_SHAPE, NUM_CLASSES, LinenCNN, TinyCNN, normal
from flax import linen as nn
from flax import nnx

import archs
from superweights import (
    Budget,
    BudgetedModel,
    Member,
    Plan,
    SharingRule,
    budgeted,
    compose,
    from_plan,
    nnx_member,
    tree,
)

# TinyCNN / LinenCNN share stem 3x3 (out, in) = (4, 3), conv 3x3 (8, 4), shortcut 1x1 (8, 4).
# With bins=1: one 3x3 cluster whose chain nests (4*3 -> 8*4, one template per level costs
# 9 * 32 = 288) and one 1x1 cluster (32). Minimum 320 of 428 shared kernel entries.
BUDGET = Budget(fraction=0.8)  # 342 parameters in the banks


def batch_mean_and_var_after_stem(member_params, x):
    """Batch statistics of `stem(x)` (a SAME 3x3 convolution plus bias)."""
    stem = member_params["stem"]
    y = jax.lax.conv_general_dilated(
        x, stem["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y = y + stem["bias"]
    return y.mean((0, 1, 2)), y.var((0, 1, 2))


@pytest.fixture(scope="module")
def nnx_budgeted():
    x = jnp.zeros(IMAGE_SHAPE)
    model = budgeted(TinyCNN(nnx.Rngs(0)), BUDGET, sample_input=x, bins=1)
    params, state = model.init(jax.random.key(0))
    return model, params, state


@pytest.fixture(scope="module")
def linen_budgeted():
    x = jnp.zeros(IMAGE_SHAPE)
    model = budgeted(LinenCNN(), BUDGET, sample_input=x, bins=1, key=jax.random.key(2))
    params, state = model.init(jax.random.key(0))
    return model, params, state


def test_budgeted_nnx_model_plan_and_apply(nnx_budgeted, images):
    model, params, state = nnx_budgeted
    plan = model.plan
    assert [x.path for x in plan.layers] == ["stem.kernel", "conv.kernel", "shortcut.kernel"]
    # the 1x1 shortcut's cluster comes first (smallest kernel first)
    assert [c.chain for c in plan.clusters] == [((8, 4),), ((4, 3), (8, 4))]
    assert plan.budget_params == int(0.8 * 428) and plan.spent <= plan.budget_params
    assert {p.path for p in plan.unshared} == {
        "stem.bias",
        "bn.scale",
        "bn.bias",
        "conv.bias",
        "head.kernel",
        "head.bias",
    }
    assert set(params) == {"bank", "unshared"}
    assert set(params["unshared"]["model"]) == {p.path for p in plan.unshared}
    logits, new_state = model.apply(params, state, images)
    assert logits["model"].shape == (IMAGE_SHAPE[0], NUM_CLASSES)
    assert jnp.isfinite(logits["model"]).all()
    jax.tree.map(np.testing.assert_array_equal, new_state, state)  # eval: stats unchanged


def test_budgeted_linen_model_plan_and_apply(linen_budgeted, images):
    model, params, state = linen_budgeted
    assert [x.path for x in model.plan.layers] == [
        "stem.kernel",
        "conv.kernel",
        "shortcut.kernel",
    ]
    assert set(state["model"]) == {"batch_stats"}
    logits, new_state = model.apply(params, state, images)
    assert logits["model"].shape == (IMAGE_SHAPE[0], NUM_CLASSES)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_train_mode_updates_batch_statistics(kind, nnx_budgeted, linen_budgeted, images):
    model, params, state = nnx_budgeted if kind == "nnx" else linen_budgeted
    _, new_state = model.apply(params, state, images, train=True)
    old = state["model"]["bn"] if kind == "nnx" else state["model"]["batch_stats"]["BatchNorm_0"]
    new = (
        new_state["model"]["bn"]
        if kind == "nnx"
        else new_state["model"]["batch_stats"]["BatchNorm_0"]
    )
    # running stats start at mean 0, var 1; momentum 0.99 (both Flax APIs' default)
    np.testing.assert_array_equal(old["mean"], np.zeros(4))
    mean, var = batch_mean_and_var_after_stem(model.member_params(params)["model"], images)
    np.testing.assert_allclose(new["mean"], 0.01 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.99 + 0.01 * var, rtol=1e-4, atol=1e-6)


def test_export_runs_on_the_unmodified_nnx_model(nnx_budgeted, images):
    model, params, state = nnx_budgeted
    exported = model.export(params)["model"]
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(exported))
    composed = compose(model.plan, params["bank"])
    np.testing.assert_allclose(exported["conv"]["kernel"], composed["model:conv.kernel"])
    # a freshly initialised model: only the exported values may matter
    graphdef, weights, rest = nnx.split(TinyCNN(nnx.Rngs(42)), nnx.Param, ...)
    nnx.replace_by_pure_dict(weights, exported)
    plain = nnx.merge(graphdef, weights, rest)
    expected, _ = model.apply(params, state, images)
    np.testing.assert_allclose(plain(images, train=False), expected["model"], atol=1e-6)
    # also with the running statistics of a training step
    _, trained_state = model.apply(params, state, images, train=True)
    nnx.replace_by_pure_dict(rest, trained_state["model"])
    plain = nnx.merge(graphdef, weights, rest)
    expected, _ = model.apply(params, trained_state, images)
    np.testing.assert_allclose(plain(images, train=False), expected["model"], atol=1e-6)


def test_export_runs_on_the_unmodified_linen_model(linen_budgeted, images):
    model, params, state = linen_budgeted
    exported = model.export(params)["model"]
    _, trained_state = model.apply(params, state, images, train=True)
    for stats in (state, trained_state):
        plain = LinenCNN().apply({"params": exported, **stats["model"]}, images, train=False)
        expected, _ = model.apply(params, stats, images)
        np.testing.assert_allclose(plain, expected["model"], atol=1e-6)


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_from_plan_with_a_reloaded_plan_reproduces_the_params(
    kind, nnx_budgeted, linen_budgeted, images
):
    model, params, state = nnx_budgeted if kind == "nnx" else linen_budgeted
    plan = Plan.from_json(model.plan.to_json())
    fresh = TinyCNN(nnx.Rngs(5)) if kind == "nnx" else LinenCNN()
    again = from_plan(plan, fresh, sample_input=images)
    assert again.plan == model.plan
    jax.tree.map(
        np.testing.assert_array_equal, again.member_params(params), model.member_params(params)
    )
    logits, _ = again.apply(params, state, images)
    np.testing.assert_array_equal(logits["model"], model.apply(params, state, images)[0]["model"])


def test_from_plan_rejects_another_model(nnx_budgeted, images):
    model, _, _ = nnx_budgeted

    def abstract(**kwargs):
        return nnx.eval_shape(lambda: TinyCNN(nnx.Rngs(0), **kwargs))

    with pytest.raises(ValueError, match="another model"):
        from_plan(model.plan, abstract(width=8))
    with pytest.raises(ValueError, match="another model"):  # same kernels, other head
        from_plan(model.plan, abstract(num_classes=NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="do not match"):
        from_plan(model.plan, {"other": abstract()})
    assert from_plan(model.plan, abstract()).plan is model.plan
    with pytest.raises(TypeError, match="expected a flax"):
        from_plan(model.plan, object())


def test_weight_decay_mask_is_false_exactly_on_coefficients(nnx_budgeted):
    model, params, _ = nnx_budgeted
    mask = model.weight_decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = tree.flatten(mask)
    assert any(path.startswith("bank.coefficients.") for path in flat)
    for path, value in flat.items():
        assert value is (not path.startswith("bank.coefficients.")), path
    # with optax: decay reaches the templates and the unshared params, not the coefficients
    decay = optax.add_decayed_weights(1.0, mask=mask)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = decay.update(zeros, decay.init(params), params)
    values = tree.flatten(params)
    for path, update in tree.flatten(updates).items():
        expected = values[path] if flat[path] else np.zeros_like(values[path])
        np.testing.assert_array_equal(update, expected)


def test_report_mentions_every_cluster_and_the_totals(linen_budgeted):
    model, _, _ = linen_budgeted
    plan = model.plan
    text = model.report()
    rows = [line.split() for line in text.splitlines()]
    assert {row[0] for row in rows if row} >= {c.name for c in plan.clusters}
    for total in (
        plan.template_params,
        plan.coefficient_params,
        plan.trainable_params,
        plan.dense_params,
        plan.budget_params,
        plan.spent,
    ):
        assert f"{total:,}" in text
    assert "total trainable" in text
    # Linen names its BatchNorm `BatchNorm_0`: its scale and bias are per-member norms
    norms = sum(p.size for p in plan.unshared if p.path.startswith("BatchNorm_0."))
    assert norms == 8
    assert any(line.split()[-1] == f"{norms:,}" for line in text.splitlines() if "norm" in line)


def test_budgeted_members_share_one_bank(images):
    models = {"small": TinyCNN(nnx.Rngs(0)), "wide": TinyCNN(nnx.Rngs(1), width=8)}
    model = budgeted(models, Budget(fraction=1.0), sample_input=images, bins=1)
    assert model.plan.members == ("small", "wide")
    # the wide member's conv (16, 8) is the top of the chain; both stems are at the bottom
    assert model.plan.clusters[1].chain == ((4, 3), (8, 3), (8, 4), (16, 8))
    params, state = model.init(jax.random.key(0))
    logits, _ = jax.jit(model.apply)(params, state, images)
    assert {k: v.shape for k, v in logits.items()} == {
        "small": (IMAGE_SHAPE[0], NUM_CLASSES),
        "wide": (IMAGE_SHAPE[0], NUM_CLASSES),
    }


class Mlp(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(6 * 6 * 3, 8, rngs=rngs)
        self.head = nnx.Linear(8, NUM_CLASSES, rngs=rngs)

    def __call__(self, x, train: bool = False):
        return self.head(nnx.relu(self.fc(x.reshape(x.shape[0], -1))))


def test_a_member_without_shared_layers_may_come_first(images):
    models = {"mlp": Mlp(nnx.Rngs(0)), "cnn": TinyCNN(nnx.Rngs(1))}
    model = budgeted(models, Budget(fraction=1.0), sample_input=images, bins=1)
    assert {x.member for x in model.plan.layers} == {"cnn"}
    params, state = model.init(jax.random.key(0))
    logits, _ = model.apply(params, state, images)
    expected = Mlp(nnx.Rngs(0))(images)  # its params are all its own initial ones
    np.testing.assert_allclose(logits["mlp"], expected, atol=1e-6)


def test_dense_models_need_share_dense(images):
    with pytest.raises(ValueError, match="share_dense"):
        budgeted(Mlp(nnx.Rngs(0)), Budget(fraction=0.5), sample_input=images)
    model = budgeted(
        Mlp(nnx.Rngs(0)),
        Budget(fraction=1.0),  # one layer in one cluster: the minimum is its size
        sample_input=images,
        rule=SharingRule(share_dense=True),
    )
    assert [x.path for x in model.plan.layers] == ["fc.kernel"]  # the head stays own


def test_shared_coefficients_and_member_passthrough(images):
    member = nnx_member("net", TinyCNN(nnx.Rngs(0)))
    assert isinstance(member, Member)
    model = budgeted({"net": member}, BUDGET, sample_input=images, bins=1, shared_coefficients=True)
    assert all(b.groups == (b.cluster,) for b in model.plan.banks)
    assert isinstance(model, BudgetedModel) and model.members == (member,)


def test_budgeted_model_trains(images):
    model = budgeted(TinyCNN(nnx.Rngs(0)), BUDGET, sample_input=images, bins=1)
    params, state = model.init(jax.random.key(0))
    labels = jax.random.randint(jax.random.key(3), (IMAGE_SHAPE[0],), 0, NUM_CLASSES)
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(params)

    def loss_fn(params, state):
        logits, new_state = model.apply(params, state, images, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits["model"], labels)
        return loss.mean(), new_state

    @jax.jit
    def step(params, state, opt_state):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for _ in range(12):
        params, state, opt_state, loss = step(params, state, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_members_of_one_architecture_run_vmapped_with_the_outputs_of_a_loop():
    import archs
    from superweights.model import apply_members

    modules = {
        name: archs.create("wrn-10-1", num_classes=10, in_channels=1, rngs=nnx.Rngs(seed))
        for seed, name in enumerate(["a", "b", "c"])
    }
    modules["wide"] = archs.create("wrn-10-2", num_classes=10, in_channels=1, rngs=nnx.Rngs(9))
    x = normal(0, (4, 8, 8, 1))
    model = budgeted(modules, Budget(fraction=0.9), sample_input=x[:1])
    signatures = [m.signature for m in model.members]
    assert signatures[0] == signatures[1] == signatures[2] != signatures[3]
    params, state = model.init(jax.random.key(1))
    member_params = model.member_params(params)
    traced = []

    def counting(member):
        def apply_fn(p, s, x, train):
            traced.append(member.name)
            return member.apply_fn(p, s, x, train)

        return dataclasses.replace(member, apply_fn=apply_fn)

    counted = [counting(m) for m in model.members]
    logits, new_state = jax.jit(lambda p, s: apply_members(counted, p, s, x, True, vectorize=True))(
        member_params, state
    )
    assert sorted(traced) == ["a", "wide"]  # one call for the three equals, under vmap
    traced.clear()
    jax.eval_shape(lambda: apply_members(counted, member_params, state, x, True, vectorize=False))
    assert sorted(traced) == ["a", "b", "c", "wide"]
    for member in model.members:
        alone, alone_state = jax.jit(lambda p, s, m=member: m.apply_fn(p, s, x, True))(
            member_params[member.name], state[member.name]
        )
        np.testing.assert_allclose(logits[member.name], alone, atol=1e-5)
        for got, want in zip(
            jax.tree_util.tree_leaves(new_state[member.name]),
            jax.tree_util.tree_leaves(alone_state),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_members_predicting_different_class_counts_are_refused():
    import archs

    modules = {
        "ten": archs.create("wrn-10-1", num_classes=10, in_channels=1, rngs=nnx.Rngs(0)),
        "five": archs.create("wrn-10-1", num_classes=5, in_channels=1, rngs=nnx.Rngs(1)),
    }
    with pytest.raises(ValueError, match="different numbers of classes"):
        budgeted(modules, Budget(fraction=0.9), sample_input=jnp.zeros((1, 8, 8, 1)))


# --- mixed precision ------------------------------------------------------------------------


class LinenAttention(nn.Module):
    """Attention (DenseGeneral kernels [dim, heads, head_dim]) and an MLP, in `dtype`."""

    dtype: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, dtype=self.dtype)(x)
        x = x + nn.Dense(16, dtype=self.dtype)(nn.gelu(nn.Dense(32, dtype=self.dtype)(x)))
        return nn.Dense(NUM_CLASSES, dtype=self.dtype, name="classifier")(x.mean(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: (LinenAttention(dtype), jnp.zeros((1, 6, 8))),
        lambda dtype: (
            archs.create("wrn-10-1", num_classes=10, rngs=nnx.Rngs(0), dtype=dtype),
            jnp.zeros((1, 8, 8, 3)),
        ),
    ],
    ids=["linen-attention", "wrn-10-1"],
)
def test_a_model_computing_in_bf16_is_planned_as_its_float32_self(make):
    """The trace follows a layer's cast of its float32 params: same layers, order, shapes,
    dense kernels seen as matrices, output layer kept out."""
    plans = {}
    for dtype in (None, jnp.bfloat16):
        model, x = make(dtype)
        rule = SharingRule(share_dense=True)
        plans[dtype] = budgeted(model, Budget(fraction=0.5), sample_input=x, rule=rule).plan
    full, half = plans[None], plans[jnp.bfloat16]
    assert [(x.id, x.shape, x.held_shape) for x in half.layers] == [
        (x.id, x.shape, x.held_shape) for x in full.layers
    ]
    assert half.unshared == full.unshared and half == full


@pytest.fixture(scope="module")
def wrn_in_both_dtypes():
    """wrn-10-1 computing in bf16 and in float32, on the same float32 params."""
    x = normal(3, (4, 8, 8, 3))
    modules = {
        dtype: archs.create("wrn-10-1", num_classes=10, rngs=nnx.Rngs(0), dtype=dtype)
        for dtype in (None, jnp.bfloat16)
    }
    models = {
        "float32": budgeted(modules[None], BUDGET, sample_input=x[:1]),
        "layers cast": budgeted(modules[jnp.bfloat16], BUDGET, sample_input=x[:1]),
        "bf16": budgeted(modules[jnp.bfloat16], BUDGET, sample_input=x[:1], dtype=jnp.bfloat16),
    }
    params, state = models["float32"].init(jax.random.key(0))
    return models, params, state, x


def test_bf16_members_get_their_kernels_cast_once_and_keep_float32_params(wrn_in_both_dtypes):
    models, params, state, x = wrn_in_both_dtypes
    model = models["bf16"]
    assert model.plan == models["float32"].plan
    for leaf in jax.tree.leaves(model.init(jax.random.key(0))):  # bank, unshared, state
        assert leaf.dtype == jnp.float32
    shared = {layer.path for layer in model.plan.layers}
    member_params = jax.jit(model.member_params)(params)["model"]
    for path, value in tree.flatten(member_params).items():
        assert value.dtype == (jnp.bfloat16 if path in shared else jnp.float32), path
    logits, new_state = jax.jit(lambda p, s: model.apply(p, s, x, train=True))(params, state)
    assert logits["model"].dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_state))
    # a cast once after composing is the cast the layers would make themselves
    by_layers, _ = jax.jit(lambda p, s: models["layers cast"].apply(p, s, x, train=True))(
        params, state
    )
    np.testing.assert_array_equal(logits["model"], by_layers["model"])
    full, _ = models["float32"].apply(params, state, x, train=False)
    half, _ = model.apply(params, state, x, train=False)
    scale = float(jnp.abs(full["model"]).max())
    np.testing.assert_allclose(half["model"].astype(jnp.float32), full["model"], atol=0.03 * scale)


def test_export_of_a_bf16_model_is_the_float32_composition(wrn_in_both_dtypes):
    models, params, _, _ = wrn_in_both_dtypes
    exported = models["bf16"].export(params)["model"]
    expected = models["float32"].export(params)["model"]
    flat, want = tree.flatten(exported), tree.flatten(expected)
    assert set(flat) == set(want)
    for path, value in flat.items():
        assert value.dtype == np.float32, path
        np.testing.assert_array_equal(value, want[path])


@pytest.mark.parametrize("dtype", [jnp.int8, "bf16", bool])
def test_a_dtype_that_is_not_floating_point_is_refused(dtype, images):
    with pytest.raises(ValueError, match="is not a floating-point dtype; give e.g. jnp.bfloat16"):
        budgeted(TinyCNN(nnx.Rngs(0)), BUDGET, sample_input=images[:1], dtype=dtype)
