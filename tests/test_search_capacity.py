"""The search's split rule over random layer chains, gradients and budgets.

Whatever the search splits, the final plan keeps the initial clusters' capacity: where
the initial plan (the no-search model, made here with `make_plan` directly) has
full-size templates the final one has too, and below that floor no bank of the final
plan has fewer templates or a smaller template-to-piece ratio than the initial plan's
weakest bank. Both plans stay within the budget, and a budget the initial clusters
cannot meet fails the search too.
"""

import numpy as np
from conftest import chain_specs, norm_params
from hypothesis import given, settings
from hypothesis import strategies as st

from search.clustering import search_clusters, searched_plan
from superweights import (
    Budget,
    BudgetError,
    cluster_coefficients,
    initial_clusters,
    make_plan,
    own_coefficients,
)

CHANNELS = (4, 8, 12, 16)


@st.composite
def layer_chains(draw):
    """A member of 4 to 10 layers: 3x3 kernels of random widths and a few 1x1 ones."""
    count = draw(st.integers(4, 10))
    widths = draw(st.lists(st.sampled_from(CHANNELS), min_size=count + 1, max_size=count + 1))
    spatial = draw(
        st.lists(st.sampled_from([(3, 3), (3, 3), (1, 1)]), min_size=count, max_size=count)
    )
    return chain_specs("net", [(s, widths[i], widths[i + 1]) for i, s in enumerate(spatial)])


def weakest(plan) -> tuple[int, float]:
    """(fewest templates in a bank, smallest T / L of a bank), read off the banks."""
    return (
        min(b.templates for b in plan.banks),
        min((b.template_size or b.piece_size) / b.piece_size for b in plan.banks),
    )


@settings(max_examples=60, deadline=None)
@given(
    layers=layer_chains(),
    seed=st.integers(0, 2**16),
    fraction=st.floats(0.01, 1.0),
    scope=st.sampled_from(["banks", "model"]),
    bins=st.integers(1, 3),
    sublayer_templates=st.integers(0, 2),
    fill=st.booleans(),
)
def test_the_final_plan_keeps_the_initial_capacity(
    layers, seed, fraction, scope, bins, sublayer_templates, fill
):
    unshared = norm_params(layers)
    budget = Budget(fraction=fraction, scope=scope)
    clusters = initial_clusters(layers, bins)
    search = make_plan(
        layers,
        unshared,
        clusters,
        cluster_coefficients(clusters, layers),
        Budget(fraction=1.0),
        sublayer_templates=sublayer_templates,
    )
    allocation = {"fill": fill, "sublayer_templates": sublayer_templates}
    rng = np.random.default_rng(seed)
    gradients = {x.id: rng.normal(size=x.shape) for x in layers}
    try:
        initial = make_plan(
            layers, unshared, clusters, own_coefficients(clusters, layers), budget, **allocation
        )
    except BudgetError:
        try:
            search_clusters(search, gradients, budget, fill=fill)
        except BudgetError:
            return
        raise AssertionError("the search met a budget the initial clusters cannot") from None
    result = search_clusters(search, gradients, budget, fill=fill)
    final = searched_plan(search, result, budget, **allocation)
    assert final.spent <= final.budget_params == initial.budget_params
    assert len(final.clusters) >= len(initial.clusters)
    if not initial.sublayer:
        assert not final.sublayer
    else:
        templates, ratio = weakest(final)
        initial_templates, initial_ratio = weakest(initial)
        assert templates >= initial_templates
        assert ratio >= initial_ratio - 1e-6  # the record rounds ratios to 6 places
