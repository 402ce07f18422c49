"""How sharing is found: gradient similarity, clustering under a budget, matching, unsharing."""

from search.clustering import (
    Candidate,
    Capacity,
    ClusterSimilarity,
    SearchResult,
    canonical_labels,
    capacity_refusal,
    cluster_by_similarity,
    cluster_plan,
    clusters_minimum_budget,
    search_clusters,
    searched_plan,
)
from search.gradients import layer_weights, weight_gradients
from search.matching import build_clusters, match_layers, matched_groups
from search.similarity import common_crop, cosine_similarity, layer_gradients, similarity_matrix
from search.unshare import (
    coefficient_gradient_groups,
    expand_coefficients,
    expand_optimizer_state,
    layer_coefficient_gradients,
    source_rows,
    unshare_plan,
)

__all__ = [
    "Candidate",
    "Capacity",
    "ClusterSimilarity",
    "SearchResult",
    "build_clusters",
    "canonical_labels",
    "capacity_refusal",
    "cluster_by_similarity",
    "cluster_plan",
    "clusters_minimum_budget",
    "coefficient_gradient_groups",
    "common_crop",
    "cosine_similarity",
    "expand_coefficients",
    "expand_optimizer_state",
    "layer_coefficient_gradients",
    "layer_gradients",
    "layer_weights",
    "match_layers",
    "matched_groups",
    "search_clusters",
    "searched_plan",
    "similarity_matrix",
    "source_rows",
    "unshare_plan",
    "weight_gradients",
]
