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
import math
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from search.matching import CoefficientMap, build_clusters, match_layers
from search.similarity import similarity_matrix
from superweights import Budget, BudgetError, Cluster, Plan, make_plan
from superweights.budget import FULL, SUBLAYER, minimum_budget
from superweights.plan import bank_layout, largest_member, model_size


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
class Capacity:
    """What a plan's banks can compose from.

    Attributes:
      geometry: `"full"` or `"sub-layer"` (`superweights.budget.geometry`).
      templates: whole templates per bank, in bank order.
      ratios: template-to-piece ratio `T / L` per bank (1.0 at full size).
    """

    geometry: str
    templates: tuple[int, ...]
    ratios: tuple[float, ...]

    @classmethod
    def of(cls, plan: Plan) -> Capacity:
        return cls(
            SUBLAYER if plan.sublayer else FULL,
            tuple(b.templates for b in plan.banks),
            tuple(round(b.size / b.piece_size, 6) for b in plan.banks),
        )

    @property
    def fewest_templates(self) -> int:
        return min(self.templates)

    @property
    def smallest_ratio(self) -> float:
        return min(self.ratios)

    def describe(self) -> str:
        if self.geometry == FULL:
            return f"full-size templates, {self.fewest_templates} to {max(self.templates)} per bank"
        return (
            f"sub-layer templates, {self.fewest_templates} per bank or more, "
            f"T/L {self.smallest_ratio:.3f} or more"
        )


def capacity_refusal(candidate: Capacity, initial: Capacity) -> str | None:
    """Why a split leaving `candidate` is refused against the `initial` clusters' plan; None
    if it is taken.

    The rule: a split never costs the banks their composition. Where the initial
    clusters afford one full-size template per bank, the split must too (the
    authors' floor: their budget loop counts each new cluster's largest layer).
    Below that floor a split spreads the same budget over more pieces, so it
    must leave no bank with fewer templates, nor with a smaller
    template-to-piece ratio, than the initial plan's weakest bank.
    """
    if initial.geometry == FULL:
        if candidate.geometry == FULL:
            return None
        return (
            f"would leave sub-layer templates (T/L down to {candidate.smallest_ratio:.3f}) "
            "where the initial clusters afford full-size ones"
        )
    fewer = candidate.fewest_templates < initial.fewest_templates
    smaller = candidate.smallest_ratio < initial.smallest_ratio
    if not (fewer or smaller):
        return None
    return (
        f"would leave {candidate.fewest_templates} template(s) of T/L "
        f"{candidate.smallest_ratio:.3f} in its weakest bank, where the initial clusters keep "
        f"{initial.fewest_templates} of T/L {initial.smallest_ratio:.3f}"
    )


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One threshold the search tried: its clusters, the capacity their plan would leave,
    and whether it was taken.

    Attributes:
      tau: the threshold.
      clusters: how many clusters it made.
      minimum_budget: their minimum feasible budget.
      capacity: the capacity of their plan under the budget; None if it does not fit.
      taken: whether the search ended here.
      reason: why it was taken or refused, in words.
    """

    tau: float
    clusters: int
    minimum_budget: int
    capacity: Capacity | None
    taken: bool
    reason: str

    @classmethod
    def from_dict(cls, raw: Mapping) -> Candidate:
        capacity = raw.get("capacity")
        if capacity is not None:
            capacity = Capacity(
                capacity["geometry"], tuple(capacity["templates"]), tuple(capacity["ratios"])
            )
        return cls(
            float(raw["tau"]),
            int(raw["clusters"]),
            int(raw["minimum_budget"]),
            capacity,
            bool(raw.get("taken", False)),
            raw["reason"],
        )


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """What the search found; JSON round-trips through `to_json`/`from_json`.

    Attributes:
      clusters: the new clusters, every member's layers included.
      coefficients: `(layer id, group per level)`: the leader's layers own their
        coefficients, other members' layers share their matched layer's.
      tau: the threshold the clusters were made with (below -1: all merged).
      similarities: per initial cluster, the leader's cosines.
      assignment: `(layer id, new cluster name)` for every layer.
      matches: `(layer id, leader layer id)` for every matched layer.
      leader: the member that was clustered (the largest).
      minimum_budget: the new clusters' minimum feasible budget.
      budget_params: the budget searched for, in the plan's scope.
      tried: every threshold tried, the last one taken, with the capacity each
        would leave and why it was taken or refused.
      initial: the capacity of the initial clusters' plan, the rule's reference.
      measure: what the cosines were taken of: `"gradients"` (dL/dW) or `"weights"`.
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
    tried: tuple[Candidate, ...] = ()
    initial: Capacity | None = None
    measure: str = "gradients"

    @property
    def cluster_of(self) -> dict[str, str]:
        return dict(self.assignment)

    @property
    def refused(self) -> tuple[Candidate, ...]:
        """The thresholds tried before `tau` and refused."""
        return tuple(c for c in self.tried if not c.taken)

    @property
    def split(self) -> bool:
        """Whether the search kept any split of the initial clusters."""
        return len({c for _, c in self.assignment}) > len({s.cluster for s in self.similarities})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, raw: Mapping) -> SearchResult:
        initial = raw.get("initial")
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
            tried=tuple(Candidate.from_dict(c) for c in raw.get("tried", raw.get("refused", ()))),
            initial=None
            if initial is None
            else Capacity(
                **{
                    "geometry": initial["geometry"],
                    "templates": tuple(initial["templates"]),
                    "ratios": tuple(initial["ratios"]),
                }
            ),
            measure=raw.get("measure", "gradients"),
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
    budget = dataclasses.replace(plan.budget, scope=scope or plan.budget.scope)
    fixed, count_coefficients = budget.counted(plan.unshared_params)
    banks = bank_layout(clusters, plan.layers, coefficients)
    return minimum_budget(
        [b.demand(reserve_unsharing) for b in banks],
        fixed,
        count_coefficients,
        sublayer=plan.sublayer_templates > 0,
    )


def resolve_budget(plan: Plan, budget: Budget | None) -> int:
    """`budget` (the plan's by default) in parameters, resolved as `make_plan` does."""
    budget = budget or plan.budget
    return budget.resolve(model_size(plan.layers, plan.unshared, budget))


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


class _Split(NamedTuple):
    """The initial clusters split at one threshold, and the capacity of their plan."""

    clusters: tuple[Cluster, ...]
    coefficients: CoefficientMap
    assignment: dict[str, str]
    minimum: int
    capacity: Capacity | None  # None: the clusters do not fit the budget


def search_clusters(
    plan: Plan,
    gradients: Mapping[str, np.ndarray],
    budget: Budget | None = None,
    *,
    tau: float = 0.1,
    step: float = 0.05,
    reserve_unsharing: bool = False,
    share_copies: bool = False,
    fill: bool = True,
    measure: str = "gradients",
) -> SearchResult:
    """Splits the plan's clusters by gradient conflict, as far as capacity allows.

    From `tau` down in steps of `step`, the initial clusters are split at the
    threshold and the final plan those clusters would get under the budget is
    made; the first split whose plan keeps the initial clusters' capacity
    (`capacity_refusal`) is taken. Below -1 everything is merged back, which
    always keeps it.

    Args:
      plan: the search plan (initial clusters).
      gradients: `{layer id: dL/dW [*spatial, in, out]}`, averaged over batches;
        every layer of the largest member, and one member of each other depth.
        Any per-layer arrays of the layers' shapes will do (`measure` names them).
      budget: the final model's budget; the plan's by default.
      tau: starting threshold: layers whose cosine is above it may share.
      step: how much tau drops each time a split is refused.
      reserve_unsharing, fill: as the final plan will be made (`make_plan`).
      share_copies: let a member with the same architecture as an earlier one
        share that member's coefficients (it then composes the same kernels);
        by default it owns its own (`search.matching.copies`).
      measure: what `gradients` hold, recorded in the result.

    Raises:
      BudgetError: when even the merged-back clusters exceed the budget; the
        message states their minimum.
    """
    if not (np.isfinite(tau) and np.isfinite(step) and step > 0):
        raise ValueError(f"tau must be finite and step positive, got tau={tau}, step={step}")
    leader = largest_member(plan.layers)
    similarities = leader_similarities(plan, gradients, leader)
    matches = match_layers(plan, gradients, leader)
    budget = budget or plan.budget
    budget_params = resolve_budget(plan, budget)
    allocation = {"fill": fill, "reserve_unsharing": reserve_unsharing}
    made: dict[tuple, _Split] = {}

    def split_at(threshold: float) -> _Split:
        leader_assignment = split_leader(plan, similarities, threshold)
        key = tuple(sorted(leader_assignment.items()))
        if key not in made:
            clusters, coefficients, assignment = build_clusters(
                plan, leader_assignment, matches, share_copies
            )
            minimum = clusters_minimum_budget(
                plan, clusters, coefficients, budget.scope, reserve_unsharing
            )
            try:
                final = cluster_plan(plan, clusters, coefficients, budget, **allocation)
                capacity = Capacity.of(final)
            except BudgetError:
                capacity = None
            made[key] = _Split(clusters, coefficients, assignment, minimum, capacity)
        return made[key]

    merged = split_at(-math.inf)
    initial = merged.capacity
    if initial is None:
        raise BudgetError(
            f"a budget of {budget_params:,} parameters is below the minimum feasible "
            f"{merged.minimum:,} even with every initial cluster merged back ({budget.scope} "
            f"scope); raise the budget to at least {merged.minimum:,} or start from fewer "
            "clusters (bins)"
        )
    tried, attempt = [], 0
    while True:
        current = round(tau - attempt * step, 10)
        clusters, coefficients, assignment, minimum, capacity = split_at(current)
        if capacity is None:
            refusal = (
                f"{len(clusters)} clusters need at least {minimum:,} parameters, "
                f"over the budget of {budget_params:,} ({budget.scope} scope)"
            )
        else:
            refusal = capacity_refusal(capacity, initial)
            refusal = refusal and f"{len(clusters)} clusters {refusal}"
        if refusal is None or current < -1:
            unsplit = len(clusters) == len(merged.clusters)
            reason = "the initial clusters" if unsplit else f"{len(clusters)} clusters"
            tried.append(
                Candidate(
                    current,
                    len(clusters),
                    minimum,
                    capacity,
                    True,
                    f"{reason}: {capacity.describe()}",
                )
            )
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
                tried=tuple(tried),
                initial=initial,
                measure=measure,
            )
        tried.append(Candidate(current, len(clusters), minimum, capacity, False, refusal))
        attempt += 1


def cluster_plan(
    plan: Plan, clusters, coefficients: CoefficientMap, budget: Budget, **allocation
) -> Plan:
    """The plan `clusters` get under `budget`, allocated as `plan` was unless `allocation`
    (`make_plan`'s keywords) says otherwise."""
    allocation.setdefault("sublayer_templates", plan.sublayer_templates)
    return make_plan(plan.layers, plan.unshared, clusters, coefficients, budget, **allocation)


def searched_plan(
    plan: Plan, result: SearchResult, budget: Budget | None = None, **allocation
) -> Plan:
    """The final model's Plan: `result`'s clusters and coefficients under `budget`.

    `allocation` goes to `make_plan` (`cap`, `passes`, `fill`, `reserve_unsharing`,
    `sublayer_templates`, which is the search plan's unless given).
    """
    return cluster_plan(
        plan, result.clusters, result.coefficients, budget or plan.budget, **allocation
    )
