import jax
import numpy as np
import pytest
from conftest import chain_specs

from search.matching import (
    build_clusters,
    copies,
    match_layers,
    matched_groups,
    member_depths,
    position_references,
)
from superweights import (
    Budget,
    cluster_coefficients,
    compose,
    init_bank,
    initial_clusters,
    make_plan,
    own_coefficients,
)

BIG = [((3, 3), 8, 8)] * 4


def plan_of(layers, bins=1):
    clusters = initial_clusters(layers, bins)
    coefficients = cluster_coefficients(clusters, layers)
    return make_plan(layers, [], clusters, coefficients, Budget(fraction=1.0), fill=False)


def leader_gradients(seed=0):
    rng = np.random.default_rng(seed)
    return {x.id: rng.normal(size=x.shape) for x in chain_specs("big", BIG)}


def like(gradient, shape, seed, noise=0.1):
    """`gradient`'s top-left block of `shape` plus a little noise."""
    block = gradient[..., : shape[-2], : shape[-1]]
    return block + noise * np.random.default_rng(seed).normal(size=shape)


def test_a_layer_joins_the_most_similar_leader_layer():
    small = chain_specs("small", [((3, 3), 4, 8), ((3, 3), 8, 8)])
    plan = plan_of(chain_specs("big", BIG) + small)
    grads = leader_gradients()
    grads["small:l0.kernel"] = like(grads["big:l3.kernel"], small[0].shape, 1)
    grads["small:l1.kernel"] = like(grads["big:l1.kernel"], small[1].shape, 2)
    matches = match_layers(plan, grads)
    assert matches == {"small:l0.kernel": "big:l3.kernel", "small:l1.kernel": "big:l1.kernel"}


def test_members_of_a_placed_depth_match_by_position():
    small = chain_specs("small", [((3, 3), 4, 8), ((3, 3), 8, 8)])
    twin = chain_specs("twin", [((3, 3), 4, 4), ((3, 3), 4, 4)])
    narrow = chain_specs("narrow", [((3, 3), 4, 4)] * 4)
    plan = plan_of(chain_specs("big", BIG) + small + twin + narrow)
    assert member_depths(plan) == {"big": 4, "small": 2, "twin": 2, "narrow": 4}
    assert position_references(plan, "big") == {"twin": "small", "narrow": "big"}
    grads = leader_gradients()
    grads["small:l0.kernel"] = like(grads["big:l2.kernel"], small[0].shape, 1)
    grads["small:l1.kernel"] = like(grads["big:l0.kernel"], small[1].shape, 2)
    # Twin's own gradients point elsewhere: position wins, and narrow needs none.
    grads["twin:l0.kernel"] = like(grads["big:l3.kernel"], twin[0].shape, 3)
    grads["twin:l1.kernel"] = like(grads["big:l3.kernel"], twin[1].shape, 4)
    matches = match_layers(plan, grads)
    assert matches["twin:l0.kernel"] == matches["small:l0.kernel"] == "big:l2.kernel"
    assert matches["twin:l1.kernel"] == matches["small:l1.kernel"] == "big:l0.kernel"
    assert [matches[f"narrow:l{d}.kernel"] for d in range(4)] == [
        f"big:l{d}.kernel" for d in range(4)
    ]


def test_position_matching_stays_within_the_initial_cluster():
    small = chain_specs("small", [((3, 3), 4, 4)] * 2)
    narrow = chain_specs("narrow", [((3, 3), 4, 4)] * 4)
    plan = plan_of(chain_specs("big", BIG) + small + narrow, bins=2)
    grads = leader_gradients()
    grads["small:l0.kernel"] = like(grads["big:l1.kernel"], small[0].shape, 1)
    grads["small:l1.kernel"] = like(grads["big:l2.kernel"], small[1].shape, 2)
    matches = match_layers(plan, grads)
    assert matches["small:l0.kernel"] == "big:l1.kernel"
    assert matches["small:l1.kernel"] == "big:l2.kernel"
    assert matches["narrow:l3.kernel"] == "big:l3.kernel"


def test_a_missing_gradient_is_named():
    small = chain_specs("small", [((3, 3), 4, 4)] * 2)
    plan = plan_of(chain_specs("big", BIG) + small)
    with pytest.raises(ValueError, match="small:l0.kernel"):
        match_layers(plan, leader_gradients())


def test_matched_groups_follow_the_target_and_own_the_rest():
    assert matched_groups(0, "t", 2, "x") == ("t",)
    assert matched_groups(2, "t", 2, "x") == ("t", "t", "t")
    assert matched_groups(2, "t", 0, "x") == ("t", "x", "x")


def test_build_clusters_shares_the_matched_layers_coefficients():
    big = chain_specs("big", BIG)
    small = chain_specs("small", [((3, 3), 3, 4), ((3, 3), 8, 16)])
    layers = big + small
    plan = plan_of(layers)
    leader = {x.id: ("c0_0" if x.depth < 2 else "c0_1") for x in big}
    matches = {"small:l0.kernel": "big:l3.kernel", "small:l1.kernel": "big:l0.kernel"}
    clusters, coefficients, assignment = build_clusters(plan, leader, matches)
    assert [c.layers for c in clusters] == [
        ("big:l0.kernel", "big:l1.kernel", "small:l1.kernel"),
        ("big:l2.kernel", "big:l3.kernel", "small:l0.kernel"),
    ]
    assert assignment["small:l0.kernel"] == "c0_1"
    groups = dict(coefficients)
    # c0_1's chain is (4, 3), (8, 8): the small layer is level 0, the leader's level 1.
    assert groups["small:l0.kernel"] == ("big:l3.kernel",)
    assert groups["big:l3.kernel"] == ("big:l3.kernel",) * 2
    # c0_0's chain is (8, 8), (16, 8): the small layer is above its target's level.
    assert groups["small:l1.kernel"] == ("big:l0.kernel", "small:l1.kernel")

    final = make_plan(layers, [], clusters, coefficients, Budget(fraction=1.0))
    weights = compose(final, init_bank(final, jax.random.key(0)))
    assert {i: w.shape for i, w in weights.items()} == {x.id: x.shape for x in layers}
    np.testing.assert_array_equal(weights["small:l0.kernel"], weights["big:l3.kernel"][..., :3, :4])
    np.testing.assert_array_equal(weights["small:l1.kernel"][..., :8, :8], weights["big:l0.kernel"])
    assert not np.allclose(weights["small:l0.kernel"], weights["big:l2.kernel"][..., :3, :4])


def test_copies_are_members_with_an_earlier_members_shapes():
    small = chain_specs("small", [((3, 3), 4, 4)] * 2)
    again = chain_specs("again", [((3, 3), 4, 4)] * 2)
    narrow = chain_specs("narrow", [((3, 3), 4, 4)] * 4)  # the leader's depth, not its shapes
    twin = chain_specs("twin", BIG)
    plan = plan_of(chain_specs("big", BIG) + small + again + narrow + twin)
    assert copies(plan) == {"again": "small", "twin": "big"}


def test_a_copy_owns_its_coefficients_and_composes_its_own_kernels():
    big, twin = chain_specs("big", BIG), chain_specs("twin", BIG)
    layers = big + twin
    plan = plan_of(layers)
    leader = {x.id: "c0" for x in big}
    matches = {f"twin:l{d}.kernel": f"big:l{d}.kernel" for d in range(4)}
    clusters, coefficients, _ = build_clusters(plan, leader, matches)
    assert clusters[0].layers == tuple(x.id for x in layers)  # placed with its matches
    assert dict(coefficients) == {x.id: (x.id,) for x in layers}  # but owns its vectors
    final = make_plan(layers, [], clusters, coefficients, Budget(params=2_000))
    weights = compose(final, init_bank(final, jax.random.key(0)))
    assert not np.allclose(weights["twin:l0.kernel"], weights["big:l0.kernel"])
    # share_copies: the method's literal sharing, and then the copy's kernels are the same
    _, shared, _ = build_clusters(plan, leader, matches, share_copies=True)
    assert dict(shared)["twin:l2.kernel"] == ("big:l2.kernel",)
    final = make_plan(layers, [], clusters, shared, Budget(params=2_000))
    weights = compose(final, init_bank(final, jax.random.key(0)))
    np.testing.assert_array_equal(weights["twin:l0.kernel"], weights["big:l0.kernel"])


def test_a_single_member_owns_its_coefficients():
    big = chain_specs("big", BIG)
    plan = plan_of(big)
    assert match_layers(plan, leader_gradients()) == {}
    leader = {x.id: "c0" for x in big}
    clusters, coefficients, _ = build_clusters(plan, leader, {})
    assert clusters == plan.clusters
    assert coefficients == own_coefficients(clusters, big)
