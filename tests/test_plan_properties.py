"""Random plans over the registry's architectures and ensembles of them: budgets always hold.

For any members, budget, scope, bins, templates and fill: the plan never spends more
than its budget, its report counts what `init` creates, the minimum it states is
feasible and one parameter less is not.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.models import build_budgeted, create_members
from superweights import (
    Budget,
    BudgetError,
    budget_summary,
    init_bank,
    initial_clusters,
    make_plan,
    own_coefficients,
)

ARCHS = ["wrn-10-1", "wrn-16-2", "wrn-28-1", "resnet-18", "vit-tiny"]
IMAGE = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


@functools.cache
def member_layout(arch: str) -> tuple:
    """`(shared layers, unshared params)` of one `arch` member named "m", from shapes only."""
    modules = nnx.eval_shape(lambda: create_members([arch], num_classes=10, in_channels=3, seed=0))
    (name,) = modules
    plan = build_budgeted(
        modules, Budget(fraction=1.0), IMAGE, share_dense=arch.startswith("vit")
    ).plan
    rename = functools.partial(dataclasses.replace, member="m")
    assert {x.member for x in (*plan.layers, *plan.unshared)} == {name}
    return tuple(map(rename, plan.layers)), tuple(map(rename, plan.unshared))


def ensemble_layout(archs: list[str]) -> tuple[list, list]:
    """The layers and unshared params of members `m0, m1, ...` built as `archs`."""
    layers, unshared = [], []
    for index, arch in enumerate(archs):
        own_layers, own_unshared = member_layout(arch)
        layers += [dataclasses.replace(x, member=f"m{index}") for x in own_layers]
        unshared += [dataclasses.replace(p, member=f"m{index}") for p in own_unshared]
    return layers, unshared


def minimum_in(error: BudgetError) -> int:
    return int(str(error).split("minimum feasible ")[1].split()[0].replace(",", ""))


@settings(max_examples=40, deadline=None)
@given(
    archs=st.lists(st.sampled_from(ARCHS), min_size=1, max_size=3),
    percent=st.floats(0.5, 100.0),
    scope=st.sampled_from(["banks", "model"]),
    bins=st.integers(1, 6),
    templates=st.integers(0, 3),
    fill=st.booleans(),
)
def test_random_plans_keep_their_budget_and_their_word(
    archs, percent, scope, bins, templates, fill
):
    layers, unshared = ensemble_layout(archs)
    clusters = initial_clusters(layers, bins)
    coefficients = own_coefficients(clusters, layers)

    def plan(budget: Budget):
        return make_plan(
            layers,
            unshared,
            clusters,
            coefficients,
            budget,
            fill=fill,
            sublayer_templates=templates,
        )

    budget = Budget(fraction=percent / 100, scope=scope)
    try:
        result = plan(budget)
    except BudgetError as error:
        minimum = minimum_in(error)
        reference = sum(x.size for x in layers) + (scope == "model") * sum(p.size for p in unshared)
        assert budget.resolve(reference) < minimum
        if minimum <= reference:  # a minimum above the model is no budget at all
            assert plan(Budget(params=minimum, scope=scope)).spent <= minimum
        return
    assert result.spent + result.reserved <= result.budget_params
    assert result.spent == result.budget_params - result.leftover
    bank = jax.eval_shape(functools.partial(init_bank, result), jax.random.key(0))
    created = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(bank))
    created += sum(p.size for p in unshared)
    assert budget_summary(result)["trainable"] == created
    assert plan(Budget(params=result.minimum_budget, scope=scope)).spent <= result.minimum_budget
    if result.minimum_budget > 1:
        try:
            plan(Budget(params=result.minimum_budget - 1, scope=scope))
        except BudgetError as error:
            assert minimum_in(error) == result.minimum_budget
        else:
            raise AssertionError(f"{result.minimum_budget - 1:,} planned below the minimum")
