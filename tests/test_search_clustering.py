import itertools
import math

import jax
import numpy as np
import pytest
from conftest import chain_specs, norm_params

from search.clustering import (
    SearchResult,
    canonical_labels,
    cluster_by_similarity,
    clusters_minimum_budget,
    search_clusters,
    searched_plan,
)
from search.similarity import similarity_matrix
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

SQUARE = 3 * 3 * 8 * 8  # one 3x3 8->8 kernel


def partition(labels) -> set[frozenset[int]]:
    groups: dict = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, set()).add(index)
    return {frozenset(g) for g in groups.values()}


def two_directions(cosine: float, shape=(3, 3, 8, 8), seed=0):
    """Two unit kernels whose cosine is exactly `cosine` (up to rounding)."""
    rng = np.random.default_rng(seed)
    e1, e2 = rng.normal(size=(2, math.prod(shape)))
    e1 /= np.linalg.norm(e1)
    e2 -= e2 @ e1 * e1
    e2 /= np.linalg.norm(e2)
    return e1.reshape(shape), (cosine * e1 + math.sqrt(1 - cosine**2) * e2).reshape(shape)


def search_plan(layers, budget=None, unshared=(), bins=1, sublayer_templates=0):
    """The search model's plan; the paper's geometry only unless `sublayer_templates`."""
    clusters = initial_clusters(layers, bins)
    coefficients = cluster_coefficients(clusters, layers)
    budget = budget or Budget(fraction=1.0)
    return make_plan(
        layers,
        list(unshared),
        clusters,
        coefficients,
        budget,
        fill=False,
        sublayer_templates=sublayer_templates,
    )


def square_layers(n=4, member="net"):
    return chain_specs(member, [((3, 3), 8, 8)] * n)


def grouped_gradients(layers, cosine):
    """Layers 0, 1 along one direction, 2, 3 along another at `cosine` to it."""
    a, b = two_directions(cosine)
    return {x.id: (a if x.depth < 2 else b) for x in layers}


# --- cluster_by_similarity --------------------------------------------------------------------


def test_opposite_groups_split_and_aligned_stay_together():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 3, 4, 4))
    grads = [base, 2 * base, -base, -3 * base]
    labels = cluster_by_similarity(similarity_matrix(grads), 0.1)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    aligned = cluster_by_similarity(similarity_matrix([base, base + 0.01, 2 * base]), 0.1)
    np.testing.assert_array_equal(aligned, [0, 0, 0])


def test_every_pair_in_a_cluster_agrees_above_tau():
    rng = np.random.default_rng(2)
    similarity = similarity_matrix(list(rng.normal(size=(12, 6))))
    for tau in (-0.5, 0.0, 0.3, 0.9):
        labels = cluster_by_similarity(similarity, tau)
        for i, j in itertools.combinations(range(12), 2):
            if labels[i] == labels[j]:
                assert similarity[i, j] > tau


def test_cosine_exactly_at_tau_separates():
    similarity = np.array([[1.0, 0.5], [0.5, 1.0]])
    np.testing.assert_array_equal(cluster_by_similarity(similarity, 0.5), [0, 1])
    np.testing.assert_array_equal(cluster_by_similarity(similarity, 0.49), [0, 0])


def test_below_minus_one_merges_everything():
    similarity = similarity_matrix([np.ones(3), -np.ones(3), np.array([1.0, -1.0, 0.0])])
    np.testing.assert_array_equal(cluster_by_similarity(similarity, -1.05), [0, 0, 0])


def test_single_and_empty_input():
    np.testing.assert_array_equal(cluster_by_similarity(np.ones((1, 1)), 0.1), [0])
    assert cluster_by_similarity(np.zeros((0, 0)), 0.1).shape == (0,)
    with pytest.raises(ValueError, match="square"):
        cluster_by_similarity(np.ones((2, 3)), 0.1)


def test_permuting_the_layers_permutes_the_partition():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(3, 10))
    points = np.concatenate([c + 0.6 * rng.normal(size=(4, 10)) for c in centres])
    similarity = similarity_matrix(list(points))
    labels = cluster_by_similarity(similarity, 0.2)
    for seed in range(5):
        order = np.random.default_rng(seed).permutation(len(points))
        permuted = cluster_by_similarity(similarity[np.ix_(order, order)], 0.2)
        back = np.empty_like(permuted)
        back[order] = permuted
        assert partition(back) == partition(labels)
        assert permuted[0] == 0


def test_canonical_labels_number_by_first_appearance():
    np.testing.assert_array_equal(canonical_labels([7, 3, 7, 1, 3]), [0, 1, 0, 2, 1])


# --- search_clusters --------------------------------------------------------------------------


def test_search_splits_conflicting_layers_when_the_budget_allows():
    layers = square_layers()
    plan = search_plan(layers)
    result = search_clusters(plan, grouped_gradients(layers, -0.32), Budget(params=2 * SQUARE))
    assert result.tau == 0.1
    assert [c.layers for c in result.clusters] == [
        ("net:l0.kernel", "net:l1.kernel"),
        ("net:l2.kernel", "net:l3.kernel"),
    ]
    assert [c.name for c in result.clusters] == ["c0_0", "c0_1"]
    assert result.cluster_of["net:l3.kernel"] == "c0_1"
    assert result.minimum_budget == 2 * SQUARE


def test_search_lowers_tau_until_the_clusters_fit():
    layers = square_layers()
    plan = search_plan(layers)
    result = search_clusters(plan, grouped_gradients(layers, -0.32), Budget(params=SQUARE + 10))
    assert result.tau == pytest.approx(-0.35)
    assert len(result.clusters) == 1
    assert result.minimum_budget == SQUARE
    # Every refused threshold is recorded with why: 2 clusters need 2 full templates.
    assert [r.tau for r in result.refused] == pytest.approx([0.1 - 0.05 * n for n in range(9)])
    assert {(r.clusters, r.minimum_budget) for r in result.refused} == {(2, 2 * SQUARE)}
    assert f"{2 * SQUARE:,} parameters, over the budget of {SQUARE + 10:,}" in (
        result.refused[0].reason
    )
    assert SearchResult.from_json(result.to_json()) == result


def test_a_split_that_affords_full_size_templates_is_taken_and_stays_full_size():
    # Two groups of layers with opposite gradients (cosine -0.32 < tau 0.1). The budget,
    # 2 * SQUARE + 10, holds one full-size template for each half: the split's plan keeps
    # the paper's geometry, so the first threshold's split is taken.
    layers = square_layers()
    plan = search_plan(layers, sublayer_templates=1)
    budget = Budget(params=2 * SQUARE + 10)
    result = search_clusters(plan, grouped_gradients(layers, -0.32), budget)
    assert (result.tau, len(result.clusters), result.refused) == (0.1, 2, ())
    final = searched_plan(plan, result, budget, fill=False)
    assert not final.sublayer
    assert [(b.piece_size, b.templates) for b in final.banks] == [(SQUARE, 1), (SQUARE, 1)]
    assert result.tried[-1].taken and result.tried[-1].capacity.geometry == "full"


def test_a_split_that_would_force_sublayer_templates_is_refused_and_recorded():
    # The same conflict at SQUARE + 10: the merged cluster affords one full-size template,
    # two clusters would need 2 * SQUARE at full size, so their plan would be sub-layer
    # (worked by hand: each half gets one template of at most (SQUARE + 10) / 2 entries).
    # The rule refuses every split down to the threshold where the halves merge again.
    layers = square_layers()
    plan = search_plan(layers, sublayer_templates=2)
    budget = Budget(params=SQUARE + 10)
    result = search_clusters(plan, grouped_gradients(layers, -0.32), budget)
    assert (result.tau, len(result.clusters)) == (pytest.approx(-0.35), 1)
    assert result.initial.geometry == "full"
    assert [c.tau for c in result.refused] == pytest.approx([0.1 - 0.05 * n for n in range(9)])
    for refused in result.refused:
        assert refused.clusters == 2 and refused.capacity.geometry == "sub-layer"
        assert max(refused.capacity.ratios) <= (SQUARE + 10) / 2 / SQUARE
        assert "where the initial clusters afford full-size ones" in refused.reason
    assert result.tried[-1].taken and result.tried[-1].reason.startswith("the initial clusters")
    assert not searched_plan(plan, result, budget).sublayer
    assert SearchResult.from_json(result.to_json()) == result


def test_below_the_floor_a_split_that_shrinks_the_templates_is_refused():
    # At SQUARE // 2 even the merged cluster is sub-layer: one template T of 4 own
    # coefficient rows costs T + 4 * ceil(SQUARE / T) <= 288, so T is about 270 (T/L ~ 0.47).
    # Two clusters must fit two such banks in the same 288: T/L falls to about 0.23.
    layers = square_layers()
    plan = search_plan(layers, sublayer_templates=1)
    budget = Budget(params=SQUARE // 2)
    result = search_clusters(plan, grouped_gradients(layers, -0.32), budget)
    assert len(result.clusters) == 1 and result.initial.geometry == "sub-layer"
    assert 0.4 < result.initial.smallest_ratio < 0.5
    # Kept whole, the search's final plan is the no-search model's own plan.
    no_search = make_plan(
        layers,
        [],
        plan.clusters,
        own_coefficients(plan.clusters, layers),
        budget,
        sublayer_templates=1,
    )
    assert searched_plan(plan, result, budget) == no_search
    split = result.refused[0]
    assert split.clusters == 2 and split.capacity.smallest_ratio < 0.25
    assert "where the initial clusters keep 1 of T/L" in split.reason
    # Independent gradients (every cosine near 0 < tau) would split into four: refused too.
    rng = np.random.default_rng(0)
    unrelated = {x.id: rng.normal(size=x.shape) for x in layers}
    apart = search_clusters(plan, unrelated, budget)
    assert len(apart.clusters) == 1 and apart.refused[0].clusters == 4


def test_search_merges_everything_back_at_the_end():
    layers = square_layers()
    plan = search_plan(layers)
    result = search_clusters(plan, grouped_gradients(layers, -1.0), Budget(params=SQUARE))
    assert result.tau < -1
    assert result.clusters == plan.clusters
    assert result.coefficients == own_coefficients(plan.clusters, layers)


def test_search_raises_with_the_minimum_when_even_merged_is_infeasible():
    layers = square_layers()
    plan = search_plan(layers)
    with pytest.raises(BudgetError, match=f"{SQUARE:,}"):
        search_clusters(plan, grouped_gradients(layers, 0.5), Budget(params=SQUARE - 1))


def test_search_counts_coefficients_and_unshared_params_in_model_scope():
    layers = square_layers()
    unshared = norm_params(layers)
    fixed = sum(p.size for p in unshared)
    plan = search_plan(layers, unshared=unshared)
    grads = grouped_gradients(layers, -0.32)
    # Split: 2 clusters x (one template + 2 own coefficient vectors); merged: one + 4.
    split = fixed + 2 * (SQUARE + 2)
    merged = fixed + SQUARE + 4
    result = search_clusters(plan, grads, Budget(params=split, scope="model"))
    assert (len(result.clusters), result.minimum_budget) == (2, split)
    result = search_clusters(plan, grads, Budget(params=split - 1, scope="model"))
    assert (len(result.clusters), result.minimum_budget) == (1, merged)
    final = searched_plan(plan, result, Budget(params=split - 1, scope="model"), fill=False)
    assert final.minimum_budget == merged


def test_minimum_budget_is_the_brute_force_minimum():
    # A chain of 3x3 kernels 3->4, 4->8, 8->8 and a 1x1 4->8, two bins. The minimum is one
    # template per bank at its cheapest size, found here by trying every size T of every
    # bank: T + groups * ceil(L / T) below full size, L (+ groups in model scope) at full size.
    layers = chain_specs("net", [((3, 3), 3, 4), ((3, 3), 4, 8), ((3, 3), 8, 8), ((1, 1), 4, 8)])
    unshared = norm_params(layers)
    # Without sub-layer templates it is one full-size template per bank.
    for scope, sublayer in itertools.product(("banks", "model"), (0, 1)):
        plan = search_plan(layers, Budget(fraction=1.0, scope=scope), unshared, 2, sublayer)
        model_scope = scope == "model"
        expected = sum(p.size for p in unshared) * model_scope
        for bank in plan.banks:
            piece, groups = bank.piece_size, len(bank.groups)
            sizes = [t + groups * -(-piece // t) for t in range(1, piece)] * sublayer
            expected += min([*sizes, piece + groups * model_scope])
        assert clusters_minimum_budget(plan, plan.clusters, plan.coefficients) == expected


def test_search_needs_every_gradient_of_the_largest_member():
    layers = square_layers()
    grads = grouped_gradients(layers, 0.0)
    del grads["net:l2.kernel"]
    with pytest.raises(ValueError, match="l2"):
        search_clusters(search_plan(layers), grads)
    with pytest.raises(ValueError, match="step"):
        search_clusters(search_plan(layers), grouped_gradients(layers, 0.0), step=0.0)


def mixed_layers():
    """A leader with two 3x3 stages and a 1x1 shortcut, and a shallower second member."""
    big = chain_specs(
        "big",
        [((3, 3), 3, 8), ((3, 3), 8, 8), ((3, 3), 8, 16), ((1, 1), 8, 16), ((3, 3), 16, 16)],
    )
    small = chain_specs("small", [((3, 3), 3, 4), ((3, 3), 4, 8), ((1, 1), 4, 8)])
    return big + small


def mixed_gradients(layers, seed=0):
    rng = np.random.default_rng(seed)
    grads = {x.id: rng.normal(size=x.shape) for x in layers}
    grads["big:l1.kernel"][..., :3, :] = -grads["big:l0.kernel"]
    return grads


def test_search_result_makes_a_plan_that_composes_the_model_shapes():
    layers = mixed_layers()
    unshared = norm_params(layers)
    plan = search_plan(layers, unshared=unshared, bins=2)
    budget = Budget(fraction=1.0)
    result = search_clusters(plan, mixed_gradients(layers), budget)
    final = searched_plan(plan, result, budget)
    assert {c.name for c in final.clusters} == {c for _, c in result.assignment}
    assert final.spent <= final.budget_params
    weights = compose(final, init_bank(final, jax.random.key(0)))
    assert {i: w.shape for i, w in weights.items()} == {x.id: x.shape for x in layers}


def test_search_result_round_trips_through_json():
    layers = mixed_layers()
    plan = search_plan(layers, bins=2)
    result = search_clusters(plan, mixed_gradients(layers), Budget(fraction=1.0))
    again = SearchResult.from_json(result.to_json())
    assert again == result
    np.testing.assert_array_equal(again.similarities[0].array, result.similarities[0].array)
    assert SearchResult.from_dict(result.to_dict()) == result


def test_search_does_not_depend_on_the_order_of_the_layers():
    layers = mixed_layers()
    grads = mixed_gradients(layers)
    result = search_clusters(search_plan(layers, bins=2), grads, Budget(fraction=1.0))
    assert len(result.clusters) > 2  # big:l1 conflicts with big:l0: a split to reproduce
    shuffled = [layers[i] for i in np.random.default_rng(1).permutation(len(layers))]
    reordered = {i: grads[i] for i in reversed(list(grads))}
    again = search_clusters(search_plan(shuffled, bins=2), reordered, Budget(fraction=1.0))
    assert {frozenset(c.layers) for c in again.clusters} == {
        frozenset(c.layers) for c in result.clusters
    }
    assert dict(again.matches) == dict(result.matches)
    assert again.tau == result.tau


def test_single_member_owns_its_coefficients():
    layers = square_layers()
    result = search_clusters(search_plan(layers), grouped_gradients(layers, -0.5))
    assert result.matches == ()
    assert result.coefficients == own_coefficients(result.clusters, layers)
