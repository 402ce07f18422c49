import dataclasses
import math

import pytest
from conftest import chain_specs, conv, norm_params
from hypothesis import given, settings
from hypothesis import strategies as st

from superweights import (
    Budget,
    BudgetError,
    LayerSpec,
    Level,
    ParamSpec,
    Plan,
    chain_levels,
    cluster_coefficients,
    initial_clusters,
    make_cluster,
    make_plan,
    own_coefficients,
    size_chain,
)
from superweights.plan import describe_bins

# The WRN-28-7 example of method.md section 3, as (out, in).
WRN_SHAPES = [(16, 3), (64, 16), (112, 16), (64, 64), (112, 112)]


def wrn_layers() -> list[LayerSpec]:
    return [conv("wrn", f"l{d}.kernel", (3, 3), i, o, d) for d, (o, i) in enumerate(WRN_SHAPES)]


def bank_minimum(clusters, coefficients, unshared, scope) -> int:
    """One template per (cluster, level), derived from the geometry, not from `allocate`."""
    groups = dict(coefficients)
    total = 0
    for cluster in clusters:
        for w, level in enumerate(cluster.levels):
            total += level.piece_size
            if scope == "model":
                total += len({groups[i][w] for i in cluster.layers if len(groups[i]) > w})
    if scope == "model":
        total += sum(p.size for p in unshared)
    return total


def plan_for(layers, unshared, budget, bins=4, shared=False, **kwargs) -> Plan:
    clusters = initial_clusters(layers, bins)
    coefficients = (cluster_coefficients if shared else own_coefficients)(clusters, layers)
    return make_plan(layers, unshared, clusters, coefficients, budget, **kwargs)


# --- geometry -------------------------------------------------------------------------------


def test_size_chain_is_distinct_and_sorted_by_size_then_out():
    shapes = [(4, 2), (2, 4), (4, 2), (1, 1), (3, 3), (8, 1)]
    # sizes: 8, 8, 8, 1, 9, 8 -> (1,1); then the size-8 ties by out: (2,4), (4,2), (8,1); (3,3)
    assert size_chain(shapes) == ((1, 1), (2, 4), (4, 2), (8, 1), (3, 3))
    assert size_chain(WRN_SHAPES[::-1]) == tuple(WRN_SHAPES)


def test_chain_levels_on_the_wrn_example():
    levels = chain_levels(size_chain(WRN_SHAPES), spatial_size=9)
    expected = [
        # target, kept block, B_in, B_out, cropped entries
        ((16, 3), (0, 0), (0, 3), (16, 3), 0),
        ((64, 16), (16, 3), (16, 13), (48, 16), 0),
        ((112, 16), (64, 16), (0, 0), (48, 16), 0),
        # level 3 crops rows 64..111 (48 rows x 16 cols x 9) and adds B_in [64, 48]
        ((64, 64), (64, 16), (64, 48), (0, 0), 9 * 48 * 16),
        # level 4 adds B_in [64, 48] and B_out [48, 112]
        ((112, 112), (64, 64), (64, 48), (48, 112), 0),
    ]
    assert [(x.target, x.keep, x.add_in, x.add_out, x.cropped) for x in levels] == expected
    assert all(x.spatial_size == 9 for x in levels)
    # piece sizes: 9 * (B_in + B_out entries)
    assert [x.piece_size for x in levels] == [
        9 * 16 * 3,
        9 * (16 * 13 + 48 * 16),
        9 * 48 * 16,
        9 * 64 * 48,
        9 * (64 * 48 + 48 * 112),
    ]
    # every piece adds the new area plus what the previous level lost to crops
    assert sum(x.piece_size for x in levels) == 9 * 112 * 112 + 9 * 48 * 16


def test_level_piece_size_counts_both_blocks_and_spatial():
    level = Level((5, 4), (3, 2), (3, 2), (2, 4), 0, spatial_size=4)
    assert level.piece_size == 4 * (3 * 2 + 2 * 4)


def test_cluster_levels_and_level_of():
    layers = wrn_layers()
    cluster = make_cluster("c0", layers)
    assert cluster.spatial == (3, 3)
    assert cluster.chain == tuple(WRN_SHAPES)
    assert cluster.levels == chain_levels(cluster.chain, 9)
    assert [cluster.level_of(x) for x in layers] == [0, 1, 2, 3, 4]
    assert cluster.layers == tuple(f"wrn:l{d}.kernel" for d in range(5))


def test_make_cluster_rejects_mixed_kernel_sizes():
    layers = [conv("m", "a.kernel", (3, 3), 2, 2, 0), conv("m", "b.kernel", (1, 1), 2, 2, 1)]
    with pytest.raises(ValueError, match="mixes kernel sizes"):
        make_cluster("c0", layers)


# --- initial clusters -----------------------------------------------------------------------


def cluster_depths(clusters, layers) -> list[list[int]]:
    by_id = {x.id: x for x in layers}
    return [[by_id[i].depth for i in c.layers] for c in clusters]


def test_initial_clusters_contiguous_depth_bins():
    layers = chain_specs("m", [((3, 3), 4, 4)] * 8)
    clusters = initial_clusters(layers, bins=4)
    assert cluster_depths(clusters, layers) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [c.name for c in clusters] == ["c0", "c1", "c2", "c3"]
    # uneven: 7 layers in 3 bins -> 3, 2, 2 (np.array_split)
    clusters = initial_clusters(layers[:7], bins=3)
    assert cluster_depths(clusters, layers) == [[0, 1, 2], [3, 4], [5, 6]]


def test_initial_clusters_bins_per_kernel_kind_by_the_authors_rule():
    # 6 3x3 and 2 1x1 layers, interleaved. Bins per kind: max(1, round(bins * n / depth))
    # with depth 8: 3x3 round(4 * 6 / 8) = 3, 1x1 round(4 * 2 / 8) = 1; 1x1 numbered first.
    kinds = [(3, 3), (3, 3), (1, 1), (3, 3), (3, 3), (1, 1), (3, 3), (3, 3)]
    layers = chain_specs("m", [(k, 4, 4) for k in kinds])
    clusters = initial_clusters(layers, bins=4)
    assert [c.spatial for c in clusters] == [(1, 1)] + [(3, 3)] * 3
    assert cluster_depths(clusters, layers) == [[2, 5], [0, 1], [3, 4], [6, 7]]
    # 1 bin: round(6 / 8) = 1 and max(1, round(2 / 8)) = 1, one cluster per kind
    clusters = initial_clusters(layers, bins=1)
    assert [c.spatial for c in clusters] == [(1, 1), (3, 3)]
    # a WRN-28: 25 3x3 and 3 1x1 layers, 4 bins -> round(3.57) = 4 and max(1, round(0.43)) = 1
    layers = chain_specs("m", [((3, 3), 4, 4)] * 25 + [((1, 1), 4, 4)] * 3)
    clusters = initial_clusters(layers, bins=4)
    assert [c.spatial for c in clusters] == [(1, 1)] + [(3, 3)] * 4
    assert [len(c.layers) for c in clusters] == [3, 7, 6, 6, 6]  # earlier bins take the excess
    # Python's rounding (half to even): 5 bins, 3 : 2 layers -> round(3.0) = 3, round(2.0) = 2;
    # 2 bins, 3 : 1 layers -> round(1.5) = 2 and max(1, round(0.5)) = 1
    layers = chain_specs("m", [((3, 3), 4, 4)] * 3 + [((1, 1), 4, 4)] * 2)
    assert [c.spatial for c in initial_clusters(layers, bins=5)] == [(1, 1)] * 2 + [(3, 3)] * 3
    layers = chain_specs("m", [((3, 3), 4, 4)] * 3 + [((1, 1), 4, 4)])
    assert [c.spatial for c in initial_clusters(layers, bins=2)] == [(1, 1)] + [(3, 3)] * 2


def test_describe_bins_names_the_rule_and_the_counts():
    layers = chain_specs("m", [((3, 3), 4, 4)] * 25 + [((1, 1), 4, 4)] * 3)
    text = describe_bins(layers, 4)
    assert "largest member (m, 28 shared layers)" in text
    assert "1x1: 3 layers -> 1 bin; 3x3: 25 layers -> 4 bins" in text


def test_initial_clusters_never_more_bins_than_layers():
    layers = chain_specs("m", [((3, 3), 4, 4)] * 2)
    assert cluster_depths(initial_clusters(layers, bins=5), layers) == [[0], [1]]


def test_other_members_binned_by_relative_depth():
    big = chain_specs("big", [((3, 3), 8, 8)] * 8)
    small = chain_specs("small", [((3, 3), 4, 4)] * 4)
    # the small member comes first in the list; the largest member still sets the bins
    clusters = initial_clusters(small + big, bins=4)
    assert len(clusters) == 4
    for b, cluster in enumerate(clusters):
        assert set(cluster.layers) == {
            f"small:l{b}.kernel",
            f"big:l{2 * b}.kernel",
            f"big:l{2 * b + 1}.kernel",
        }
        assert cluster.chain == ((4, 4), (8, 8))


def test_kernel_kinds_only_in_other_members_get_one_cluster():
    big = chain_specs("big", [((3, 3), 8, 8)] * 4)
    small = chain_specs("small", [((3, 3), 2, 2), ((5, 5), 2, 2), ((5, 5), 2, 2)])
    clusters = initial_clusters(big + small, bins=2)
    assert [c.spatial for c in clusters] == [(3, 3), (3, 3), (5, 5)]
    assert clusters[2].layers == ("small:l1.kernel", "small:l2.kernel")


@pytest.mark.parametrize("bins", [0, -1, 2.5, "4"])
def test_initial_clusters_reject_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        initial_clusters(chain_specs("m", [((3, 3), 4, 4)]), bins=bins)


def test_initial_clusters_without_layers_hint_at_share_dense():
    with pytest.raises(ValueError, match="share_dense"):
        initial_clusters([], bins=4)


# --- coefficients, banks and the plan -------------------------------------------------------


def two_level_layers() -> list[LayerSpec]:
    # one 3x3 cluster with chain (4, 2) -> (8, 4); l1 and l2 share the larger shape
    return chain_specs("m", [((3, 3), 2, 4), ((3, 3), 4, 8), ((3, 3), 4, 8)])


def test_coefficient_groups():
    layers = two_level_layers()
    clusters = initial_clusters(layers, bins=1)
    assert own_coefficients(clusters, layers) == (
        ("m:l0.kernel", ("m:l0.kernel",)),
        ("m:l1.kernel", ("m:l1.kernel", "m:l1.kernel")),
        ("m:l2.kernel", ("m:l2.kernel", "m:l2.kernel")),
    )
    assert cluster_coefficients(clusters, layers) == (
        ("m:l0.kernel", ("c0",)),
        ("m:l1.kernel", ("c0", "c0")),
        ("m:l2.kernel", ("c0", "c0")),
    )


def test_banks_users_groups_and_fan_in():
    layers = two_level_layers()
    minimum = 9 * 8 * 4  # the chain nests: one template per level = the largest layer
    plan = plan_for(layers, [], Budget(params=minimum), bins=1)
    level0, level1 = plan.banks
    assert (level0.key, level0.piece_size, level0.users, level0.fan_in) == ("c0_l0", 72, 3, 18)
    assert (level1.key, level1.piece_size, level1.users, level1.fan_in) == ("c0_l1", 216, 2, 36)
    assert level0.groups == ("m:l0.kernel", "m:l1.kernel", "m:l2.kernel")
    assert level1.groups == ("m:l1.kernel", "m:l2.kernel")
    assert (level0.templates, level1.templates, plan.leftover) == (1, 1, 0)
    assert plan.coefficient_row("m:l2.kernel", 0) == 2
    assert plan.coefficient_row("m:l2.kernel", 1) == 1
    shared = plan_for(layers, [], Budget(params=minimum), bins=1, shared=True)
    assert [b.groups for b in shared.banks] == [("c0",), ("c0",)]
    assert shared.coefficient_row("m:l2.kernel", 1) == 0


def test_plan_parameter_counts():
    layers = two_level_layers()
    unshared = norm_params(layers)  # 2 * (4 + 8 + 8) = 40
    # banks scope, 72 + 216 + 100: phase 1 adds one template to level 0 (72, 3 users) and one
    # to level 1 (216 does not fit in 28); fill then makes a 28-entry partial template.
    plan = plan_for(layers, unshared, Budget(params=72 + 216 + 100), bins=1)
    assert [(b.templates, b.partial) for b in plan.banks] == [(2, 28), (1, 0)]
    assert plan.paper_templates == (2, 1)
    assert plan.template_params == 2 * 72 + 28 + 216 == plan.spent == 388
    assert plan.coefficient_params == 3 * 3 + 2 * 1  # groups x (templates + partial)
    assert plan.unshared_params == 40
    assert plan.trainable_params == 388 + 11 + 40
    assert plan.dense_params == 9 * (2 * 4 + 4 * 8 + 4 * 8) + 40
    assert plan.members == ("m",)
    assert plan.budget_params == 388 and plan.leftover == 0


def test_model_scope_counts_everything():
    layers = two_level_layers()
    unshared = norm_params(layers)
    plan = plan_for(layers, unshared, Budget(fraction=0.5, scope="model"), bins=1)
    assert plan.budget_params == int(0.5 * plan.dense_params)
    assert plan.spent == plan.trainable_params <= plan.budget_params


def test_fraction_budget_resolves_against_the_scope():
    layers = two_level_layers()
    plan = plan_for(layers, norm_params(layers), Budget(fraction=0.75), bins=1)
    assert plan.budget_params == int(0.75 * 9 * (8 + 32 + 32))  # shared kernels only


def test_make_plan_checks_its_inputs():
    layers = two_level_layers()
    clusters = initial_clusters(layers, bins=1)
    coefficients = own_coefficients(clusters, layers)
    with pytest.raises(ValueError, match="exactly once"):
        make_plan(layers[:2], [], clusters, coefficients, Budget(fraction=1.0))
    with pytest.raises(ValueError, match="exactly once"):
        make_plan(layers, [], clusters * 2, coefficients, Budget(fraction=1.0))
    with pytest.raises(ValueError, match="no coefficient groups"):
        make_plan(layers, [], clusters, coefficients[:1], Budget(fraction=1.0))


def test_infeasible_plan_states_the_minimum():
    layers = wrn_layers()
    minimum = 9 * 112 * 112 + 9 * 48 * 16  # the largest layer plus the cropped entries
    assert minimum == 119_808
    with pytest.raises(BudgetError, match="119,808"):
        plan_for(layers, [], Budget(params=minimum - 1), bins=1, sublayer_templates=0)
    plan = plan_for(layers, [], Budget(params=minimum), bins=1)
    assert plan.spent == minimum == plan.full_size_minimum
    assert all(b.templates == 1 and b.partial == 0 and not b.sublayer for b in plan.banks)
    # with sub-layer templates (the default) one parameter less is a smaller geometry
    below = plan_for(layers, [], Budget(params=minimum - 1), bins=1)
    assert below.sublayer and below.spent <= minimum - 1
    assert below.minimum_budget < minimum // 10


def test_plan_json_round_trip_and_hash():
    layers = wrn_layers() + chain_specs("other", [((1, 1), 3, 8), ((), 8, 4)])
    unshared = norm_params(layers) + [ParamSpec("other", "head.kernel", (4, 10), "float32")]
    for budget in (Budget(params=150_000), Budget(params=150_000, scope="model")):
        plan = plan_for(layers, unshared, budget, bins=3)
        again = Plan.from_json(plan.to_json())
        assert again == plan
        assert hash(again) == hash(plan)
        assert {plan: 1}[again] == 1
        assert again.clusters[0].levels == plan.clusters[0].levels
        assert again.to_json() == plan.to_json()
    changed = dataclasses.replace(plan, leftover=plan.leftover + 1)
    assert changed != plan


# --- property: budgets are met and used -----------------------------------------------------

KINDS = [(3, 3), (1, 1), ()]


@st.composite
def members(draw):
    """1-2 members of 1-6 layers each (3x3, 1x1 or dense) with per-member params."""
    layers, unshared = [], []
    for name in ("a", "b")[: draw(st.integers(1, 2))]:
        kernels = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(KINDS), st.sampled_from([2, 4, 8, 12]), st.integers(2, 16)
                ),
                min_size=1,
                max_size=6,
            )
        )
        own = chain_specs(name, kernels)
        layers += own
        # a CIFAR-100 head: enough per-member params that a model-scope leftover of at most
        # one coefficient per layer is below 1% of any feasible budget
        unshared += norm_params(own) + [
            ParamSpec(name, "head.kernel", (16, 100), "float32"),
            ParamSpec(name, "head.bias", (100,), "float32"),
        ]
    return layers, unshared


@settings(max_examples=30, deadline=None)
@given(
    model=members(),
    bins=st.integers(1, 5),
    scope=st.sampled_from(["banks", "model"]),
    shared=st.booleans(),
    position=st.floats(0, 1),
)
def test_plans_meet_and_use_every_feasible_budget(model, bins, scope, shared, position):
    layers, unshared = model
    clusters = initial_clusters(layers, bins)
    coefficients = (cluster_coefficients if shared else own_coefficients)(clusters, layers)
    minimum = bank_minimum(clusters, coefficients, unshared, scope)
    dense = sum(x.size for x in layers) + (scope == "model") * sum(p.size for p in unshared)

    def plan(budget: int, sublayer_templates: int = 0) -> Plan:
        budget = Budget(budget, scope=scope)
        return make_plan(
            layers, unshared, clusters, coefficients, budget, sublayer_templates=sublayer_templates
        )

    with pytest.raises(BudgetError, match=f"minimum feasible {minimum:,} "):
        plan(min(minimum - 1, dense))
    if minimum > dense:
        # one template per bank (plus its coefficients) costs more than the model itself,
        # e.g. one layer per cluster in model scope: no budget is feasible
        with pytest.raises(BudgetError, match="above the model's own size"):
            plan(minimum)
        return
    assert plan(minimum).spent == minimum
    assert plan(minimum, sublayer_templates=2) == dataclasses.replace(
        plan(minimum), sublayer_templates=2
    )

    budget = minimum + round(position * max(dense - minimum, 0))
    result = plan(budget)
    assert result.budget_params == budget
    assert result.spent <= budget
    assert result.spent == budget - result.leftover
    assert result.spent / result.budget_params >= 0.99
    assert all(b.templates >= 1 for b in result.banks)
    assert all(0 <= b.partial < b.piece_size for b in result.banks)
    # every cluster is one kernel kind, and every layer is in exactly one cluster
    assert sorted(i for c in clusters for i in c.layers) == sorted(x.id for x in layers)
    by_id = {x.id: x for x in layers}
    assert all(len({by_id[i].spatial for i in c.layers}) == 1 for c in clusters)
    # one template per level costs the largest layer plus what crops waste
    for cluster in clusters:
        largest = math.prod(cluster.spatial) * math.prod(cluster.chain[-1])
        pieces = sum(level.piece_size for level in cluster.levels)
        assert pieces == largest + sum(level.cropped for level in cluster.levels)
    assert Plan.from_json(result.to_json()) == result


@settings(max_examples=30, deadline=None)
@given(model=members(), bins=st.integers(1, 5))
def test_initial_clusters_are_contiguous_per_member_and_kind(model, bins):
    layers, _ = model
    clusters = initial_clusters(layers, bins)
    by_id = {x.id: x for x in layers}
    for member in {x.member for x in layers}:
        for kind in {x.spatial for x in layers if x.member == member}:
            runs = [
                [by_id[i].depth for i in c.layers if by_id[i].member == member]
                for c in clusters
                if c.spatial == kind
            ]
            runs = [r for r in runs if r]
            flat = [d for r in runs for d in r]
            expected = [x.depth for x in layers if x.member == member and x.spatial == kind]
            assert flat == expected  # in order: contiguous runs, earlier bins first
            sizes = [len(r) for r in runs]
            assert max(sizes) - min(sizes) <= 1  # balanced bins
