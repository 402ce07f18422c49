import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import chain_specs

from search.unshare import (
    coefficient_gradient_groups,
    expand_coefficients,
    expand_optimizer_state,
    layer_coefficient_gradients,
    source_rows,
    split_name,
    unshare_plan,
)
from superweights import (
    Budget,
    BudgetError,
    cluster_coefficients,
    compose,
    init_bank,
    initial_clusters,
    make_plan,
    own_coefficients,
)
from superweights.report import budget_report, budget_summary

# One cluster, chain (8, 8) -> (16, 8): level 0 read by all four layers, level 1 by l3.
LAYERS = chain_specs("net", [((3, 3), 8, 8)] * 3 + [((3, 3), 8, 16)])
IDS = [x.id for x in LAYERS]
DENSE = sum(x.size for x in LAYERS)  # 3 * 576 + 1152 = 2880, the largest budget


def shared_plan(budget=None, coefficients=cluster_coefficients, **allocation):
    clusters = initial_clusters(LAYERS, 1)
    # 2500 in banks scope: one 576-entry template per level, two more at level 0, 196 left over
    budget = budget or Budget(params=2_500)
    allocation.setdefault("fill", False)
    return make_plan(LAYERS, [], clusters, coefficients(clusters, LAYERS), budget, **allocation)


def targets(seed=0):
    """dL/dW of a linear loss: l0, l1, l3 agree on their common block, l2 opposes them."""
    big = np.random.default_rng(seed).normal(size=(3, 3, 8, 16)).astype(np.float32)
    block = big[..., :8, :8]
    return {IDS[0]: block, IDS[1]: block, IDS[2]: -block, IDS[3]: big}


def linear_loss(plan, bank, target):
    weights = compose(plan, bank)
    return sum(jnp.vdot(weights[i], target[i]) for i in target)


def split_plan():
    plan = shared_plan()
    bank = init_bank(plan, jax.random.key(0))
    grads = layer_coefficient_gradients(plan, bank, targets())
    return plan, bank, unshare_plan(plan, coefficient_gradient_groups(plan, grads))


# --- per-layer coefficient gradients -----------------------------------------------------------


def test_layer_coefficient_gradients_match_the_bank_gradient():
    target = targets()
    for coefficients in (own_coefficients, cluster_coefficients):
        plan = shared_plan(coefficients=coefficients)
        bank = init_bank(plan, jax.random.key(1))
        per_layer = layer_coefficient_gradients(plan, bank, target)
        assert set(per_layer) == {(i, 0) for i in IDS} | {(IDS[3], 1)}
        bank_grad = jax.grad(functools.partial(linear_loss, plan))(bank, target)["coefficients"]
        for key, rows in bank_grad.items():
            spec = next(b for b in plan.banks if b.key == key)
            for row, group in enumerate(spec.groups):
                summed = sum(
                    g
                    for (i, w), g in per_layer.items()
                    if w == spec.level and plan.groups_of[i][w] == group
                )
                np.testing.assert_allclose(summed, rows[row], rtol=1e-5, atol=1e-5)


# --- which layers split ------------------------------------------------------------------------


def test_disagreeing_sharers_are_split_off_with_fresh_names():
    plan = shared_plan()
    bank = init_bank(plan, jax.random.key(0))
    grads = layer_coefficient_gradients(plan, bank, targets())
    groups = dict(coefficient_gradient_groups(plan, grads))
    assert groups == {
        IDS[0]: ("c0",),
        IDS[1]: ("c0",),
        IDS[2]: ("c0~1",),
        IDS[3]: ("c0", "c0"),
    }
    # The same whatever order the gradients come in.
    reordered = dict(reversed(list(grads.items())))
    assert dict(coefficient_gradient_groups(plan, reordered)) == groups


def test_threshold_is_inclusive_and_missing_gradients_are_named():
    plan = shared_plan()
    k = plan.bank["c0", 0].num_templates
    a, b = np.zeros(k), np.zeros(k)
    a[0], b[:2] = 1.0, (3.0, 4.0)  # cosine exactly 0.6
    grads = {(IDS[0], 0): a, (IDS[1], 0): a, (IDS[2], 0): b, (IDS[3], 0): a}
    assert dict(coefficient_gradient_groups(plan, grads, 0.6))[IDS[2]] == ("c0~1",)
    assert dict(coefficient_gradient_groups(plan, grads, 0.59))[IDS[2]] == ("c0",)
    del grads[(IDS[1], 0)]
    with pytest.raises(ValueError, match="l1"):
        coefficient_gradient_groups(plan, grads)


def test_split_names_are_unique():
    assert split_name("c0", set()) == "c0~1"
    assert split_name("c0", {"c0~1", "c0~2"}) == "c0~3"


# --- the new plan ------------------------------------------------------------------------------


def test_unshared_plan_keeps_banks_and_templates():
    plan, _, new = split_plan()
    assert new.clusters == plan.clusters
    assert [(b.key, b.templates, b.partial) for b in new.banks] == [
        (b.key, b.templates, b.partial) for b in plan.banks
    ]
    assert new.bank["c0", 0].groups == ("c0", "c0~1")
    assert new.bank["c0", 1].groups == ("c0",)
    assert new.template_params == plan.template_params
    assert new.leftover == plan.leftover
    rows = source_rows(plan, new)
    assert {key: v.tolist() for key, v in rows.items()} == {"c0_l0": [0, 0], "c0_l1": [0]}


def test_unsharing_never_merges_groups():
    plan = shared_plan(coefficients=own_coefficients)
    merged = tuple((i, ("together",) * len(g)) for i, g in plan.coefficients)
    with pytest.raises(ValueError, match="split"):
        unshare_plan(plan, merged)


def test_unsharing_over_a_model_scope_budget_raises():
    loose = shared_plan(Budget(fraction=1.0, scope="model"))
    tight = shared_plan(Budget(params=loose.minimum_budget, scope="model"))
    grads = layer_coefficient_gradients(tight, init_bank(tight, jax.random.key(0)), targets())
    with pytest.raises(BudgetError, match="budget"):
        unshare_plan(tight, coefficient_gradient_groups(tight, grads))


@pytest.mark.parametrize("sublayer_templates", [0, 2])
def test_a_plan_that_reserves_room_unshares_within_any_budget(sublayer_templates):
    # Model scope at the smallest feasible budget with the reserve: one vector per user
    # (4 at level 0, 1 at level 1) is counted, so even every layer owning its vectors fits.
    def plan_at(budget, **allocation):
        return shared_plan(
            Budget(params=budget, scope="model"),
            reserve_unsharing=True,
            sublayer_templates=sublayer_templates,
            **allocation,
        )

    tight = plan_at(plan_at(DENSE).minimum_budget, fill=True)
    assert tight.reserve_unsharing and tight.reserved > 0
    # the reserve is what three more level-0 vectors cost: (users - groups) * vector entries
    level0 = tight.banks[0]
    assert tight.reserved == (4 - 1) * math.prod(level0.coefficient_shape[1:])
    assert tight.spent + tight.reserved + tight.leftover == tight.budget_params
    own = tuple((i, (i,) * len(g)) for i, g in tight.coefficients)  # the most unsharing can do
    unshared = unshare_plan(tight, own)
    assert unshared.spent <= tight.budget_params
    assert unshared.reserved == 0
    assert unshared.spent + unshared.leftover == tight.budget_params
    # without the reserve the same budget plans templates in that room, and unsharing fails
    greedy = shared_plan(
        Budget(params=tight.budget_params, scope="model"),
        fill=True,
        sublayer_templates=sublayer_templates,
    )
    assert greedy.spent == greedy.budget_params
    with pytest.raises(BudgetError, match="leave room"):
        unshare_plan(greedy, own)


def test_the_report_shows_the_reserve_as_its_own_line():
    plan = shared_plan(Budget(fraction=1.0, scope="model"), reserve_unsharing=True)
    text = budget_report(plan)
    assert f"reserved for unsharing{plan.reserved:>18,}" in text
    assert f"reserved {plan.reserved:,} for coefficient unsharing" in text
    assert budget_summary(plan)["reserved_for_unsharing"] == plan.reserved
    assert "reserved" not in budget_report(shared_plan(Budget(fraction=1.0, scope="model")))


# --- copies of coefficients and optimizer state -------------------------------------------------


def test_split_groups_start_as_copies():
    plan, bank, new = split_plan()
    new_bank = expand_coefficients(plan, new, bank)
    assert new_bank["coefficients"]["c0_l0"].shape == (2, plan.banks[0].num_templates)
    assert new_bank["templates"]["c0_l0"] is bank["templates"]["c0_l0"]
    before, after = compose(plan, bank), compose(new, new_bank)
    for i in IDS:
        np.testing.assert_array_equal(before[i], after[i])

    as_numpy = jax.tree_util.tree_map(np.array, bank["coefficients"])
    expanded = expand_coefficients(plan, new, as_numpy)
    expanded["c0_l0"][1] += 1.0
    np.testing.assert_array_equal(expanded["c0_l0"][0], as_numpy["c0_l0"][0])
    assert not np.shares_memory(expanded["c0_l0"], as_numpy["c0_l0"])


def train(plan, bank, optimizer, state, target, steps):
    loss = jax.jit(jax.grad(functools.partial(linear_loss, plan)))
    for _ in range(steps):
        grads = loss(bank, target)
        updates, state = optimizer.update(grads, state, bank)
        bank = optax.apply_updates(bank, updates)
    return bank, state


def test_split_coefficients_diverge_while_sharers_stay_equal():
    plan, bank, new = split_plan()
    optimizer = optax.sgd(0.01, momentum=0.9)
    target = targets()
    bank, state = train(plan, bank, optimizer, optimizer.init(bank), target, 3)
    new_bank = expand_coefficients(plan, new, bank)
    new_state = expand_optimizer_state(plan, new, bank, state)
    rows = new_bank["coefficients"]["c0_l0"]
    np.testing.assert_array_equal(rows[0], rows[1])

    new_bank, _ = train(new, new_bank, optimizer, new_state, target, 3)
    rows = new_bank["coefficients"]["c0_l0"]
    assert not np.allclose(rows[0], rows[1])
    weights = compose(new, new_bank)
    np.testing.assert_array_equal(weights[IDS[0]], weights[IDS[1]])
    np.testing.assert_array_equal(weights[IDS[0]], weights[IDS[3]][..., :8, :8])
    assert not np.allclose(weights[IDS[0]], weights[IDS[2]])


def test_optimizer_state_rows_copy_their_source_group():
    plan, bank, new = split_plan()
    params = {"bank": bank, "unshared": {"net": {"bn.scale": jnp.ones(4)}}}
    target = targets()
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["bank"]["coefficients"] = jax.tree_util.tree_map(lambda _: False, bank["coefficients"])
    optimizers = {
        "momentum": optax.sgd(0.01, momentum=0.9),
        "adam": optax.adam(1e-3),
        "masked decay": optax.chain(
            optax.masked(optax.add_decayed_weights(5e-4), mask), optax.sgd(0.01, momentum=0.9)
        ),
        "masked momentum": optax.masked(optax.sgd(0.01, momentum=0.9), mask),
        "partition": optax.partition(
            {True: optax.sgd(0.1, momentum=0.9), False: optax.adam(1e-3)}, mask
        ),
    }
    for name, optimizer in optimizers.items():
        state = optimizer.init(params)
        grads = {"bank": jax.grad(functools.partial(linear_loss, plan))(bank, target)}
        grads["unshared"] = jax.tree_util.tree_map(jnp.ones_like, params["unshared"])
        _, state = optimizer.update(grads, state, params)
        new_params = expand_coefficients(plan, new, params)
        new_state = expand_optimizer_state(plan, new, params, state)
        shapes = jax.tree_util.tree_map(jnp.shape, new_params)
        for leaf in jax.tree_util.tree_leaves(new_state):
            assert jnp.ndim(leaf) == 0 or jnp.shape(leaf) in jax.tree_util.tree_leaves(
                shapes, is_leaf=lambda x: isinstance(x, tuple)
            ), name
        # By value: the split gives c0_l0 a second group copied from its only one, so every
        # state leaf of the coefficients' shape gains a row equal to its old row 0; every
        # other leaf keeps its values.
        old_leaves = jax.tree_util.tree_leaves(state)
        new_leaves = jax.tree_util.tree_leaves(new_state)
        assert len(old_leaves) == len(new_leaves), name
        rows, grown = plan.bank["c0", 0].coefficient_shape, 0
        for old, now in zip(old_leaves, new_leaves, strict=True):
            old, now = np.asarray(old), np.asarray(now)
            if old.shape == rows and now.shape != rows:
                assert now.shape == (2, *rows[1:]), name
                np.testing.assert_array_equal(now, old[[0, 0]], err_msg=name)
                grown += bool(np.abs(old).max() > 0)
            else:
                np.testing.assert_array_equal(now, old, err_msg=name)
        # Momentum, Adam's two moments and the partition's Adam hold nonzero copies; the
        # masked optimizers keep no state for the coefficients, or a momentum trace only.
        expected = {"momentum": 1, "adam": 2, "masked decay": 1, "masked momentum": 0}
        assert grown == expected.get(name, 2), name
        optimizer.update(jax.tree_util.tree_map(jnp.zeros_like, new_params), new_state, new_params)

    state = optax.sgd(0.01, momentum=0.9).init(params)
    state = jax.tree_util.tree_map(lambda x: x + 1.0, state)
    trace = expand_optimizer_state(plan, new, params, state)[0].trace
    old_rows = state[0].trace["bank"]["coefficients"]["c0_l0"]
    np.testing.assert_array_equal(trace["bank"]["coefficients"]["c0_l0"][1], old_rows[0])
    assert trace["bank"]["templates"]["c0_l0"] is state[0].trace["bank"]["templates"]["c0_l0"]


def test_optimizer_state_without_param_copies_passes_through():
    plan, bank, new = split_plan()
    for optimizer in (optax.sgd(0.1), optax.scale(0.5)):
        state = optimizer.init(bank)
        assert expand_optimizer_state(plan, new, bank, state) == state
    custom = (jnp.asarray(3), {"count": jnp.zeros(())}, optax.EmptyState())
    passed = expand_optimizer_state(plan, new, bank, custom)
    assert all(
        a is b
        for a, b in zip(
            jax.tree_util.tree_leaves(passed), jax.tree_util.tree_leaves(custom), strict=True
        )
    )
    assert jax.tree_util.tree_structure(passed) == jax.tree_util.tree_structure(custom)
