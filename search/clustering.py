"""Gradient-conflict clustering under a budget (method.md 6.3-6.5).

Within each initial cluster, the largest member's layers are clustered on the
cosine similarity of their gradients: layers that agree stay together, layers
in conflict are separated. If the new clusters do not fit the budget, the
threshold is lowered step by step until they do; below -1 everything is merged
back, and if even that does not fit the search fails with the minimum.

Linkage: complete linkage on the distance `1 - cosine`, cut just below
`1 - tau`. A flat cluster of complete linkage has every pairwise distance at most
the cut, so every pair of layers in a cluster has cosine strictly above `tau`:
no two conflicting layers ever share a cluster (single linkage would chain them
through intermediaries). Agglomerative clustering is transitive and does not
depend on the order of the layers (up to exact ties in the distances, which the
fixed depth order of a plan resolves the same way every time).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from search.matching import CoefficientMap, build_clusters, match_layers
from search.similarity import similarity_matrix
from superweights import Budget, BudgetError, Cluster, Plan, make_plan
from superweights.budget import minimum_budget
from superweights.plan import bank_layout, largest_member


def canonical_labels(labels) -> np.ndarray:
    """Labels renumbered `0, 1, ...` by first appearance."""
    first: dict = {}
    return np.array([first.setdefault(x, len(first)) for x in np.asarray(labels).tolist()], int)


def cluster_by_similarity(similarity, tau: float) -> np.ndarray:
    """`[n]` cluster labels such that every pair within a cluster has cosine > `tau`.

    Complete-linkage agglomerative clustering on `1 - similarity`. Labels are
    numbered by first appearance, so a permutation of the input permutes the
    labels' partition the same way. `tau < -1` puts everything in one cluster.

    Args:
      similarity: `[n, n]` symmetric cosine similarities.
      tau: agreement threshold in `[-1, 1]`.
    """
    similarity = np.asarray(similarity, np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square [n, n] matrix, got {similarity.shape}")
    if not np.all(np.isfinite(similarity)):
        raise ValueError("similarity has NaN or infinite entries")
    n = similarity.shape[0]
    if n < 2:
        return np.zeros(n, int)
    distance = 1.0 - np.clip((similarity + similarity.T) / 2, -1.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    tree = hierarchy.linkage(squareform(distance, checks=False), method="complete")
    cut = np.nextafter(1.0 - tau, -np.inf)
    return canonical_labels(hierarchy.fcluster(tree, t=cut, criterion="distance"))


@dataclasses.dataclass(frozen=True)
class ClusterSimilarity:
    """Gradient cosines of the leader's layers in one initial cluster.

    Attributes:
      cluster: initial cluster name.
      layers: the leader's layer ids, in depth order (the matrix's order).
      matrix: `[n, n]` cosine similarities, as nested tuples.
    """

    cluster: str
    layers: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]

    @property
    def array(self) -> np.ndarray:
        return np.array(self.matrix, np.float64).reshape(len(self.layers), len(self.layers))


@dataclasses.dataclass(frozen=True)
class RefusedSplit:
    """A threshold whose clusters did not fit the budget.

    Attributes:
      tau: the threshold tried.
      clusters: how many clusters it made.
      minimum_budget: their minimum feasible budget, above the budget.
      reason: the same in words, for `search.json` readers.
    """

    tau: float
    clusters: int
    minimum_budget: int
    reason: str


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What the search found; JSON round-trips through `to_json`/`from_json`.

    Attributes:
      clusters: the new clusters, every member's layers included.
      coefficients: `(layer id, group per level)`: the leader's layers own their
        coefficients, other members' layers share their matched layer's.
      tau: the threshold the clusters were made with (below -1: all merged).
      similarities: per initial cluster, the leader's gradient cosines.
      assignment: `(layer id, new cluster name)` for every layer.
      matches: `(layer id, leader layer id)` for every matched layer.
      leader: the member that was clustered (the largest).
      minimum_budget: the new clusters' minimum feasible budget.
      budget_params: the budget searched for, in the plan's scope.
      refused: the thresholds tried before `tau`, whose clusters did not fit.
    """

    clusters: tuple[Cluster, ...]
    coefficients: CoefficientMap
    tau: float
    similarities: tuple[ClusterSimilarity, ...]
    assignment: tuple[tuple[str, str], ...]
    matches: tuple[tuple[str, str], ...]
    leader: str
    minimum_budget: int
    budget_params: int
    refused: tuple[RefusedSplit, ...] = ()

    @property
    def cluster_of(self) -> dict[str, str]:
        return dict(self.assignment)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, raw: Mapping) -> SearchResult:
        return cls(
            clusters=tuple(
                Cluster(
                    c["name"],
                    tuple(c["spatial"]),
                    tuple(c["layers"]),
                    tuple((int(o), int(i)) for o, i in c["chain"]),
                )
                for c in raw["clusters"]
            ),
            coefficients=tuple((i, tuple(g)) for i, g in raw["coefficients"]),
            tau=float(raw["tau"]),
            similarities=tuple(
                ClusterSimilarity(
                    s["cluster"], tuple(s["layers"]), tuple(tuple(row) for row in s["matrix"])
                )
                for s in raw["similarities"]
            ),
            assignment=tuple((i, c) for i, c in raw["assignment"]),
            matches=tuple((i, t) for i, t in raw["matches"]),
            leader=raw["leader"],
            minimum_budget=int(raw["minimum_budget"]),
            budget_params=int(raw["budget_params"]),
            refused=tuple(RefusedSplit(**r) for r in raw.get("refused", ())),
        )

    @classmethod
    def from_json(cls, text: str) -> SearchResult:
        return cls.from_dict(json.loads(text))


def clusters_minimum_budget(
    plan: Plan,
    clusters,
    coefficients: CoefficientMap,
    scope: str | None = None,
    reserve_unsharing: bool = False,
) -> int:
    """The minimum feasible budget of `clusters`, counted as `make_plan` would.

    One template per (cluster, level): of the smallest sub-layer size where the
    plan allows sub-layer geometry, else full size. In `"model"` scope,
    coefficients and the per-member params count too; with `reserve_unsharing`,
    as many coefficient vectors as the bank has users.
    """
    model_scope = (scope or plan.budget.scope) == "model"
    banks = bank_layout(clusters, plan.layers, coefficients)
    return minimum_budget(
        [b.demand(reserve_unsharing) for b in banks],
        plan.unshared_params * model_scope,
        model_scope,
        sublayer=plan.sublayer_templates > 0,
    )


def resolve_budget(plan: Plan, budget: Budget | None) -> int:
    """`budget` (the plan's by default) in parameters, resolved as `make_plan` does."""
    budget = budget or plan.budget
    fixed = plan.unshared_params if budget.scope == "model" else 0
    return budget.resolve(sum(layer.size for layer in plan.layers) + fixed)


def split_leader(
    plan: Plan, similarities: tuple[ClusterSimilarity, ...], tau: float
) -> dict[str, str]:
    """`{leader layer id: new cluster name}`: each initial cluster split at `tau`.

    An unsplit cluster keeps its name; the parts of a split one are named
    `"{name}_{label}"`, labels by first appearance in depth order.
    """
    assignment, parent_of = {}, {c.name: c.name for c in plan.clusters}
    for entry in similarities:
        labels = cluster_by_similarity(entry.array, tau)
        split = labels.max(initial=0) > 0
        for layer_id, label in zip(entry.layers, labels, strict=True):
            name = f"{entry.cluster}_{label}" if split else entry.cluster
            if parent_of.setdefault(name, entry.cluster) != entry.cluster:
                raise ValueError(
                    f"cluster {entry.cluster} splits into {name}, the name of another cluster; "
                    "rename the plan's clusters"
                )
            assignment[layer_id] = name
    return assignment


def leader_similarities(
    plan: Plan, gradients: Mapping[str, np.ndarray], leader: str
) -> tuple[ClusterSimilarity, ...]:
    """The leader's gradient cosines within each initial cluster that holds its layers."""
    result = []
    for cluster in plan.clusters:
        ids = tuple(i for i in cluster.layers if plan.layer[i].member == leader)
        if not ids:
            continue
        missing = [i for i in ids if i not in gradients]
        if missing:
            raise ValueError(
                f"no gradient for the largest member's layers {missing[:5]}; "
                f"the search needs dL/dW of every layer of {leader!r}"
            )
        for i in ids:
            if np.shape(gradients[i]) != plan.layer[i].shape:
                raise ValueError(
                    f"gradient of {i} has shape {np.shape(gradients[i])}, "
                    f"the layer {plan.layer[i].shape}"
                )
        matrix = similarity_matrix([gradients[i] for i in ids])
        result.append(ClusterSimilarity(cluster.name, ids, tuple(map(tuple, matrix.tolist()))))
    return tuple(result)


def search_clusters(
    plan: Plan,
    gradients: Mapping[str, np.ndarray],
    budget: Budget | None = None,
    *,
    tau: float = 0.1,
    step: float = 0.05,
    reserve_unsharing: bool = False,
    share_copies: bool = False,
) -> SearchResult:
    """Splits the plan's clusters by gradient conflict, under the budget.

    Args:
      plan: the search plan (initial clusters).
      gradients: `{layer id: dL/dW [*spatial, in, out]}`, averaged over batches;
        every layer of the largest member, and one member of each other depth.
      budget: the final model's budget; the plan's by default.
      tau: starting threshold: layers whose cosine is above it may share.
      step: how much tau drops each time the clusters do not fit.
      reserve_unsharing: the final plan will keep room for unsharing
        (`make_plan`); its minimum then counts that room.
      share_copies: let a member with the same architecture as an earlier one
        share that member's coefficients (it then composes the same kernels);
        by default it owns its own (`search.matching.copies`).

    Raises:
      BudgetError: when even the merged-back clusters exceed the budget; the
        message states their minimum.
    """
    if not (np.isfinite(tau) and np.isfinite(step) and step > 0):
        raise ValueError(f"tau must be finite and step positive, got tau={tau}, step={step}")
    leader = largest_member(plan.layers)
    similarities = leader_similarities(plan, gradients, leader)
    matches = match_layers(plan, gradients, leader)
    budget_params = resolve_budget(plan, budget)
    scope = (budget or plan.budget).scope
    attempt, refused = 0, []
    while True:
        current = round(tau - attempt * step, 10)
        clusters, coefficients, assignment = build_clusters(
            plan, split_leader(plan, similarities, current), matches, share_copies
        )
        minimum = clusters_minimum_budget(plan, clusters, coefficients, scope, reserve_unsharing)
        if minimum <= budget_params:
            return SearchResult(
                clusters=clusters,
                coefficients=coefficients,
                tau=current,
                similarities=similarities,
                assignment=tuple(assignment.items()),
                matches=tuple(matches.items()),
                leader=leader,
                minimum_budget=minimum,
                budget_params=budget_params,
                refused=tuple(refused),
            )
        refused.append(
            RefusedSplit(
                current,
                len(clusters),
                minimum,
                f"{len(clusters)} clusters need at least {minimum:,} parameters, "
                f"over the budget of {budget_params:,} ({scope} scope)",
            )
        )
        if current < -1:
            break
        attempt += 1
    raise BudgetError(
        f"a budget of {budget_params:,} parameters is below the minimum feasible {minimum:,} "
        f"even with every initial cluster merged back ({scope} scope); raise the budget to "
        f"at least {minimum:,} or start from fewer clusters (bins)"
    )


def searched_plan(
    plan: Plan, result: SearchResult, budget: Budget | None = None, **allocation
) -> Plan:
    """The final model's Plan: `result`'s clusters and coefficients under `budget`.

    `allocation` goes to `make_plan` (`cap`, `passes`, `fill`, `reserve_unsharing`,
    `sublayer_templates`, which is the search plan's unless given).
    """
    allocation.setdefault("sublayer_templates", plan.sublayer_templates)
    return make_plan(
        plan.layers,
        plan.unshared,
        result.clusters,
        result.coefficients,
        budget or plan.budget,
        **allocation,
    )
