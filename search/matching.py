"""Placing the other members' layers in the largest member's clusters (method.md 6.6).

The search splits clusters using the largest member (the *leader*) only. Every
layer of another member then joins the new cluster of one leader layer from the
same initial cluster, and shares that layer's coefficients. Everything is keyed
by explicit layer ids.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from search.similarity import cosine_similarity
from superweights import Cluster, Plan, make_cluster
from superweights.plan import largest_member

CoefficientMap = tuple[tuple[str, tuple[str, ...]], ...]


def member_depths(plan: Plan) -> dict[str, int]:
    """`{member: number of its shared layers}`."""
    depths = {member: 0 for member in plan.members}
    for layer in plan.layers:
        depths[layer.member] += 1
    return depths


def position_references(plan: Plan, leader: str) -> dict[str, str]:
    """`{member: earlier member of the same depth}`; the leader counts as placed first.

    Members are placed in the plan's order after the leader. A member whose
    depth equals that of one placed before it is matched by position to it.
    """
    depths = member_depths(plan)
    placed = [leader]
    references = {}
    for member in plan.members:
        if member == leader:
            continue
        same_depth = [m for m in placed if depths[m] == depths[member]]
        if same_depth:
            references[member] = same_depth[0]
        placed.append(member)
    return references


def copies(plan: Plan, leader: str | None = None) -> dict[str, str]:
    """`{member: earlier member}` for members whose shared layers have the same shapes, in
    the same order, as a member placed before them (the leader counts as placed first).

    Such a copy, matched by position, would compose exactly its partner's kernels if it
    shared its coefficients: a duplicate network, an ensemble member that adds nothing.
    """
    leader = leader or largest_member(plan.layers)
    shapes: dict[str, list] = {m: [] for m in plan.members}
    for layer in plan.layers:
        shapes[layer.member].append(layer.shape)
    placed = [leader] + [m for m in plan.members if m != leader]
    found = {}
    for i, member in enumerate(placed[1:], start=1):
        twin = next((m for m in placed[:i] if shapes[m] == shapes[member]), None)
        if twin is not None and shapes[member]:
            found[member] = twin
    return found


def most_similar(gradient, candidates: Mapping[str, np.ndarray]) -> str:
    """The candidate id whose gradient has the highest cosine with `gradient` (first on ties)."""
    ids = list(candidates)
    scores = [cosine_similarity(gradient, candidates[i]) for i in ids]
    return ids[int(np.argmax(scores))]


def match_layers(plan: Plan, gradients: Mapping[str, np.ndarray], leader: str | None = None):
    """`{layer id: leader layer id}` for every layer of the other members.

    Within each initial cluster of `plan`, a layer joins the leader layer whose
    gradient is most similar (cosine on the common crop), unless its member has
    the depth of a member placed earlier (the leader included, see
    `position_references`): then it takes the match of that member's layer at the
    same position within the cluster (by gradient after all if the two hold
    different numbers of layers there). Layers of clusters without any leader
    layer are not matched (they stay where they are).

    Args:
      plan: the search plan; its clusters are the initial clusters.
      gradients: `{layer id: dL/dW [*spatial, in, out]}`; needed for the leader's
        layers and for layers matched by gradient.
      leader: the member the search clustered; the largest one by default.
    """
    leader = leader or largest_member(plan.layers)
    references = position_references(plan, leader)
    matches: dict[str, str] = {}
    for cluster in plan.clusters:
        by_member: dict[str, list[str]] = {}
        for layer_id in cluster.layers:
            by_member.setdefault(plan.layer[layer_id].member, []).append(layer_id)
        leader_ids = by_member.pop(leader, [])
        if not leader_ids:
            continue
        target = {i: i for i in leader_ids}
        for member in plan.members:
            own = by_member.get(member)
            if not own:
                continue
            partner = references.get(member)
            reference = leader_ids if partner == leader else by_member.get(partner)
            if reference is not None and len(reference) == len(own):
                for layer_id, partner_id in zip(own, reference, strict=True):
                    target[layer_id] = target[partner_id]
            else:
                candidates = {i: _gradient(gradients, plan, i) for i in leader_ids}
                for layer_id in own:
                    gradient = _gradient(gradients, plan, layer_id)
                    target[layer_id] = most_similar(gradient, candidates)
            matches.update({i: target[i] for i in own})
    return matches


def _gradient(gradients: Mapping[str, np.ndarray], plan: Plan, layer_id: str) -> np.ndarray:
    if layer_id not in gradients:
        raise ValueError(
            f"no gradient for layer {layer_id}: it is matched by gradient similarity; "
            "collect gradients for one member of each depth"
        )
    grad = np.asarray(gradients[layer_id])
    if grad.shape != plan.layer[layer_id].shape:
        raise ValueError(
            f"gradient of {layer_id} has shape {grad.shape}, the layer {plan.layer[layer_id].shape}"
        )
    return grad


def matched_groups(own_level: int, target_id: str, target_level: int, layer_id: str):
    """Coefficient groups of a layer at levels `0..own_level` that shares `target_id`'s.

    Levels the target reaches use the target's groups (it owns them); levels
    above the target's own level have no vector to share and use `layer_id`'s.
    """
    return tuple(target_id if w <= target_level else layer_id for w in range(own_level + 1))


def build_clusters(
    plan: Plan,
    leader_assignment: Mapping[str, str],
    matches: Mapping[str, str],
    share_copies: bool = False,
) -> tuple[tuple[Cluster, ...], CoefficientMap, dict[str, str]]:
    """The final clusters, coefficient map and `{layer id: new cluster name}`.

    Leader layers go to `leader_assignment[id]` and own their coefficients;
    matched layers follow their leader layer and share its coefficients
    (`matched_groups`), except the layers of a copy of an earlier member
    (`copies`: the same architecture), which own theirs so that the copy composes
    kernels of its own from the shared templates; any other layer keeps its
    cluster and owns its coefficients. `share_copies=True` lets copies share
    too, as the method has it. Clusters are ordered by initial cluster, then by
    first leader layer; layers inside a cluster keep the plan's order.
    """
    assignment = {}
    order: list[str] = []
    for cluster in plan.clusters:
        for layer_id in sorted(cluster.layers, key=lambda i: i not in leader_assignment):
            if layer_id in leader_assignment:
                name = leader_assignment[layer_id]
            elif layer_id in matches:
                name = leader_assignment[matches[layer_id]]
            else:
                name = cluster.name
            assignment[layer_id] = name
            if name not in order:
                order.append(name)
    members = {name: [] for name in order}
    for layer in plan.layers:
        members[assignment[layer.id]].append(layer)
    clusters = tuple(make_cluster(name, members[name]) for name in order)

    level = {}
    for cluster in clusters:
        for layer_id in cluster.layers:
            level[layer_id] = cluster.level_of(plan.layer[layer_id])
    duplicates = {} if share_copies else copies(plan)
    coefficients = []
    for cluster in clusters:
        for layer_id in cluster.layers:
            if layer_id in matches and plan.layer[layer_id].member not in duplicates:
                target = matches[layer_id]
                groups = matched_groups(level[layer_id], target, level[target], layer_id)
            else:
                groups = (layer_id,) * (level[layer_id] + 1)
            coefficients.append((layer_id, groups))
    return clusters, tuple(coefficients), assignment
