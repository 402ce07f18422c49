import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

from experiments.models import DenseModel, build_budgeted, build_dense, create_members
from superweights import Budget, BudgetedModel, BudgetError

ARCH = "wrn-10-1"
SAMPLE = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)


def param_count(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return normal(3, (4, 8, 8, 1))


@pytest.fixture(scope="module")
def modules() -> dict:
    return create_members([ARCH], num_classes=10, in_channels=1, seed=0)


def test_create_members_builds_each_name_with_its_own_seed():
    pair = create_members(["wrn-10-1", "wrn-16-1"], num_classes=7, in_channels=2, seed=5)
    assert list(pair) == ["wrn-10-1", "wrn-16-1"]
    assert pair["wrn-10-1"].head.out_features == 7
    assert pair["wrn-10-1"].stem.in_features == 2
    assert param_count(pair["wrn-16-1"]) > param_count(pair["wrn-10-1"])
    # Member i is initialised from seed + i.
    again = create_members(["wrn-16-1"], num_classes=7, in_channels=2, seed=6)
    np.testing.assert_array_equal(
        pair["wrn-16-1"].stem.kernel[...], again["wrn-16-1"].stem.kernel[...]
    )
    other = create_members(["wrn-10-1"], num_classes=7, in_channels=2, seed=6)
    assert not np.array_equal(pair["wrn-10-1"].stem.kernel[...], other["wrn-10-1"].stem.kernel[...])


def test_create_members_names_repeated_architectures_apart():
    members = create_members([ARCH, "wrn-16-1", ARCH], num_classes=10, in_channels=1, seed=0)
    assert list(members) == [f"{ARCH}_1", "wrn-16-1", f"{ARCH}_2"]
    first, second = members[f"{ARCH}_1"].stem.kernel[...], members[f"{ARCH}_2"].stem.kernel[...]
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_create_members_rejects_an_empty_list():
    with pytest.raises(ValueError, match="at least one"):
        create_members([], num_classes=10, in_channels=1, seed=0)


def test_create_members_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown model 'wrn-x'"):
        create_members(["wrn-x"], num_classes=10, in_channels=1, seed=0)


def test_members_named_bfloat16_compute_in_it_on_the_float32_params(images):
    half = create_members([ARCH], num_classes=10, in_channels=1, seed=0, dtype="bfloat16")
    full = create_members([ARCH], num_classes=10, in_channels=1, seed=0, dtype="float32")
    assert half[ARCH].stem.dtype == jnp.bfloat16 and full[ARCH].stem.dtype is None
    np.testing.assert_array_equal(half[ARCH].stem.kernel[...], full[ARCH].stem.kernel[...])
    assert half[ARCH](images).dtype == jnp.bfloat16
    model = build_budgeted(half, Budget(fraction=0.5), SAMPLE, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    assert build_budgeted(full, Budget(fraction=0.5), SAMPLE).dtype is None


@pytest.mark.parametrize("dtype", ["float16", "bf16", "int8"])
def test_an_unknown_compute_dtype_is_refused_naming_the_choices(dtype):
    with pytest.raises(ValueError, match=f"dtype must be one of float32, bfloat16; got '{dtype}'"):
        create_members([ARCH], num_classes=10, in_channels=1, seed=0, dtype=dtype)


def test_dense_model_init_apply_and_trainable_params(modules, images):
    model = build_dense(modules)
    assert isinstance(model, DenseModel)
    assert model.trainable_params == param_count(modules[ARCH])
    params, state = model.init(jax.random.key(0))
    assert list(params) == [ARCH] and list(state) == [ARCH]
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == model.trainable_params
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))

    logits, new_state = model.apply(params, state, images, train=False)
    assert list(logits) == [ARCH]
    assert logits[ARCH].shape == (4, 10)
    np.testing.assert_allclose(logits[ARCH], modules[ARCH](images, train=False), rtol=1e-5)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)

    _, trained_state = model.apply(params, state, images, train=True)
    old_mean = state[ARCH]["final_bn"]["mean"]
    assert not np.allclose(trained_state[ARCH]["final_bn"]["mean"], old_mean)

    mask = model.weight_decay_mask(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    assert all(jax.tree_util.tree_leaves(mask))


def test_dense_params_match_the_budgeted_plan_of_the_same_model(modules):
    dense = build_dense(modules)
    budgeted = build_budgeted(modules, Budget(fraction=0.8), SAMPLE)
    assert dense.trainable_params == budgeted.plan.dense_params


@pytest.mark.parametrize(
    "budget", [Budget(fraction=0.8), Budget(fraction=1.0), Budget(params=60_000)]
)
def test_build_budgeted_spends_at_most_the_budget(modules, budget):
    model = build_budgeted(modules, budget, SAMPLE)
    assert isinstance(model, BudgetedModel)
    plan = model.plan
    assert plan.minimum_budget <= plan.spent <= plan.budget_params
    if budget.fraction is not None and budget.fraction < 1:
        assert plan.trainable_params < plan.dense_params
    if budget.params is not None:
        assert plan.budget_params == budget.params


def test_build_budgeted_model_scope_counts_every_trainable_param(modules):
    plan = build_budgeted(modules, Budget(fraction=0.9, scope="model"), SAMPLE).plan
    assert plan.spent == plan.trainable_params <= plan.budget_params


class ConvMLP(nnx.Module):
    """A conv, a hidden dense layer and a head: the one dense kernel that may be shared."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x, train=False):
        x = nnx.relu(self.conv(x)).mean((1, 2))
        return self.head(nnx.relu(self.hidden(x)))


def test_build_budgeted_passes_bins(modules):
    # wrn-10-1: 7 3x3 layers and 2 1x1 shortcuts. 4 bins: round(28 / 9) = 3 3x3 bins and
    # one 1x1 bin; 2 bins: round(14 / 9) = 2 and max(1, round(4 / 9)) = 1.
    default = build_budgeted(modules, Budget(fraction=0.9), SAMPLE).plan
    assert len(default.clusters) == 4
    two_bins = build_budgeted(modules, Budget(fraction=0.9), SAMPLE, bins=2).plan
    assert len(two_bins.clusters) == 3
    assert two_bins.full_size_minimum < default.full_size_minimum


@pytest.mark.parametrize("share_dense", [False, True])
def test_build_budgeted_passes_share_dense(share_dense):
    modules = {"mlp": ConvMLP(nnx.Rngs(0))}
    plan = build_budgeted(modules, Budget(fraction=1.0), SAMPLE, share_dense=share_dense).plan
    shared = {layer.path for layer in plan.layers}
    unshared = {param.path for param in plan.unshared}
    assert "conv.kernel" in shared
    assert ("hidden.kernel" in shared) == share_dense
    assert ("hidden.kernel" in unshared) != share_dense
    assert "head.kernel" in unshared  # the classifier stays per member either way


def test_build_budgeted_below_the_minimum_raises_with_the_minimum(modules):
    minimum = build_budgeted(modules, Budget(fraction=0.9), SAMPLE).plan.minimum_budget
    with pytest.raises(BudgetError, match=f"at least {minimum:,}"):
        build_budgeted(modules, Budget(params=minimum - 1), SAMPLE)
    plan = build_budgeted(modules, Budget(params=minimum), SAMPLE).plan
    assert plan.spent == minimum


def test_budgeted_model_apply_and_weight_decay_mask(modules, images):
    model = build_budgeted(modules, Budget(fraction=0.8), SAMPLE)
    params, state = model.init(jax.random.key(0))
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == model.plan.trainable_params
    logits, _ = model.apply(params, state, images)
    assert logits[ARCH].shape == (4, 10)
    assert np.all(np.isfinite(logits[ARCH]))
    mask = model.weight_decay_mask(params)
    assert not any(jax.tree_util.tree_leaves(mask["bank"]["coefficients"]))
    assert all(jax.tree_util.tree_leaves(mask["bank"]["templates"]))
    assert all(jax.tree_util.tree_leaves(mask["unshared"]))
