"""Coefficient unsharing during training (method.md section 7).

Layers that share one coefficient vector at a level but whose gradients with
respect to it disagree (cosine at or below a threshold) get their own copy.
The plan keeps its clusters, banks and templates; only coefficient groups
split. The trained coefficient rows and the optimizer state are expanded so
that every split-off group starts from a real copy of its source row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from search.clustering import cluster_by_similarity
from search.matching import CoefficientMap
from search.similarity import similarity_matrix
from superweights import BudgetError, Plan, compose, own_coefficients
from superweights.plan import bank_layout

LevelKey = tuple[str, int]


def split_name(group: str, taken: set[str]) -> str:
    """A fresh group name derived from `group`: `"{group}~1"`, `"{group}~2"`, ..."""
    n = 1
    while f"{group}~{n}" in taken:
        n += 1
    return f"{group}~{n}"


def coefficient_gradient_groups(
    plan: Plan,
    coefficient_grads: Mapping[LevelKey, Any],
    threshold: float = 0.9,
) -> CoefficientMap:
    """A new coefficient map where disagreeing sharers of a vector are split off.

    For every group shared by several layers at a level, the layers' gradients
    with respect to that vector are clustered (`cluster_by_similarity`), so
    every pair left in one group has cosine above `threshold`. The part holding
    the group's first layer keeps the name; the others get `split_name`s.

    Args:
      plan: the plan being trained.
      coefficient_grads: `{(layer id, level): dL/dalpha}` (`[k]`, or `[blocks, k]`)
        accumulated over
        many batches, e.g. from `layer_coefficient_gradients`; needed for every
        layer that shares a group.
      threshold: cosine at or below which two layers stop sharing.
    """
    groups = {i: list(g) for i, g in plan.coefficients}
    clusters = {c.name: c for c in plan.clusters}
    for bank in plan.banks:
        cluster = clusters[bank.cluster]
        users: dict[str, list[str]] = {}
        for layer_id in cluster.layers:
            if len(groups[layer_id]) > bank.level:
                users.setdefault(groups[layer_id][bank.level], []).append(layer_id)
        taken = set(bank.groups)
        for group, ids in users.items():
            if len(ids) < 2:
                continue
            row = bank.coefficient_shape[1:]
            vectors = [_vector(coefficient_grads, (i, bank.level), row) for i in ids]
            labels = cluster_by_similarity(similarity_matrix(vectors), threshold)
            names = [group]
            for _ in range(1, labels.max() + 1):
                names.append(split_name(group, taken))
                taken.add(names[-1])
            for layer_id, label in zip(ids, labels, strict=True):
                groups[layer_id][bank.level] = names[label]
    return tuple((i, tuple(groups[i])) for i, _ in plan.coefficients)


def _vector(grads: Mapping[LevelKey, Any], key: LevelKey, shape: tuple[int, ...]) -> np.ndarray:
    """The gradient of one coefficient row (`[k]`, or `[blocks, k]` below full size), flat."""
    if key not in grads:
        raise ValueError(f"no coefficient gradient for layer {key[0]} at level {key[1]}")
    vector = np.asarray(grads[key])
    if vector.shape != shape:
        raise ValueError(f"coefficient gradient of {key} has shape {vector.shape}, not {shape}")
    return vector.reshape(-1)


def _with_coefficients(plan: Plan, coefficients: CoefficientMap) -> Plan:
    """`plan` with new coefficient groups, the same banks and templates; unchecked budget."""
    levels = {i: plan.cluster_of[i].level_of(plan.layer[i]) for i in plan.layer}
    given = dict(coefficients)
    wrong = [i for i in levels if i in given and len(given[i]) != levels[i] + 1]
    if wrong:
        raise ValueError(
            f"layers {wrong[:5]} need one coefficient group per level 0..r of their cluster"
        )
    layout = bank_layout(plan.clusters, plan.layers, coefficients)
    banks = tuple(
        dataclasses.replace(old, groups=new.groups)
        for old, new in zip(plan.banks, layout, strict=True)
    )
    new = dataclasses.replace(plan, coefficients=tuple(coefficients), banks=banks)
    return dataclasses.replace(new, leftover=plan.budget_params - new.spent - new.reserved)


def unshare_plan(plan: Plan, new_coefficients: CoefficientMap) -> Plan:
    """`plan` with `new_coefficients`: same clusters, banks and templates, new groups.

    Raises:
      ValueError: when a new group takes layers from two old groups (unsharing
        splits groups, it never merges them).
      BudgetError: when, in `"model"` scope, the extra coefficients exceed the
        budget (the templates are never reduced to make room).
    """
    new = _with_coefficients(plan, new_coefficients)
    source_rows(plan, new)
    if new.spent + new.reserved > plan.budget_params:
        raise BudgetError(
            f"unsharing adds {new.coefficient_params - plan.coefficient_params:,} coefficient "
            f"params and the plan would spend {new.spent:,} > its budget of "
            f"{plan.budget_params:,} ({plan.budget.scope} scope); raise the budget by "
            f"{new.spent - plan.budget_params:,}, unshare with a lower threshold, or leave "
            "room for coefficients when planning"
        )
    return new


def source_rows(old_plan: Plan, new_plan: Plan) -> dict[str, np.ndarray]:
    """`{bank key: [new groups]}`: the old coefficient row each new row copies."""
    if old_plan.clusters != new_plan.clusters or old_plan.layers != new_plan.layers:
        raise ValueError("the plans differ in layers or clusters; only coefficient groups may")
    clusters = {c.name: c for c in new_plan.clusters}
    rows = {}
    for bank in new_plan.banks:
        old_bank = old_plan.bank[bank.cluster, bank.level]
        if (old_bank.num_templates, old_bank.size) != (bank.num_templates, bank.size):
            raise ValueError(f"bank {bank.key} changed its number or size of templates")
        source: dict[str, set[int]] = {g: set() for g in bank.groups}
        for layer_id in clusters[bank.cluster].layers:
            groups = new_plan.groups_of[layer_id]
            if len(groups) > bank.level:
                source[groups[bank.level]].add(old_plan.coefficient_row(layer_id, bank.level))
        merged = [g for g, old in source.items() if len(old) > 1]
        if merged:
            raise ValueError(
                f"groups {merged[:5]} of bank {bank.key} take layers from several old groups; "
                "unsharing may only split groups"
            )
        rows[bank.key] = np.array([min(source[g]) for g in bank.groups], np.int64)
    return rows


def _coefficient_key(plan: Plan, path: tuple, leaf: Any) -> str | None:
    """The bank key when `path` leads to a coefficient matrix of `plan`, else None.

    Matches `{bank key: [groups, ...]}` on its own, or under a `"coefficients"` key
    (a bank, or params holding a bank).
    """
    keys = [getattr(k, "key", None) for k in path]
    if not keys or keys[-1] not in {b.key for b in plan.banks}:
        return None
    if len(keys) > 1 and keys[-2] != "coefficients":
        return None
    bank = next(b for b in plan.banks if b.key == keys[-1])
    expected = bank.coefficient_shape
    if np.shape(leaf) != expected:
        raise ValueError(
            f"coefficients {jax.tree_util.keystr(path)} have shape {np.shape(leaf)}, "
            f"the plan's bank {bank.key} needs {expected}"
        )
    return bank.key


def expand_coefficients(old_plan: Plan, new_plan: Plan, tree: Any) -> Any:
    """`tree` with every coefficient matrix `[old groups, k]` -> `[new groups, k]`.

    Each new row is a copy of its source group's row (`source_rows`), so the
    composed weights are unchanged right after unsharing. `tree` is the bank's
    `{bank key: [groups, ...]}` coefficients, a bank, or params holding one under
    `"coefficients"`; every other leaf is returned as it is.
    """
    rows = source_rows(old_plan, new_plan)

    def expand(path, leaf):
        key = _coefficient_key(old_plan, path, leaf)
        return leaf if key is None else leaf[rows[key]]

    return jax.tree_util.tree_map_with_path(expand, tree)


def expand_optimizer_state(old_plan: Plan, new_plan: Plan, params: Any, opt_state: Any) -> Any:
    """`opt_state` with every copy of the params' coefficient matrices expanded.

    Optax states hold trees with the params' structure (SGD's momentum, Adam's
    moments, under `optax.masked` or `optax.partition` too, masked leaves being
    `MaskedNode`s). Each subtree of `opt_state` that has the structure of
    `params` gets its coefficient leaves expanded like `expand_coefficients`
    does; counts, empty states and anything else pass through unchanged.

    Args:
      params: the params the optimizer was initialised with, before expansion.
    """
    rows = source_rows(old_plan, new_plan)
    leaves, params_def = jax.tree_util.tree_flatten_with_path(params)
    targets = {}
    for index, (path, leaf) in enumerate(leaves):
        key = _coefficient_key(old_plan, path, leaf)
        if key is not None:
            targets[index] = (key, np.shape(leaf))
    if not targets:
        raise ValueError("params hold no coefficient matrices of the old plan")

    def mirror(node):
        try:
            items = params_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return None
        for index, (key, shape) in targets.items():
            if hasattr(items[index], "shape") and np.shape(items[index]) == shape:
                items[index] = items[index][rows[key]]
        return params_def.unflatten(items)

    def visit(node):
        if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node)):
            return node
        expanded = mirror(node)
        if expanded is not None:
            return expanded
        children, node_def = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        return node_def.unflatten([visit(child) for child in children])

    return visit(opt_state)


def layer_coefficient_gradients(
    plan: Plan, bank: Mapping[str, Any], weight_grads: Mapping[str, Any]
) -> dict[LevelKey, jax.Array]:
    """`{(layer id, level): dL/dalpha}` (one coefficient row each) from `{layer id: dL/dW}`.

    Layers sharing a vector read the same row, so the bank's own gradient sums
    their contributions. Here every layer gets its own copy of its row (the
    weights do not change) and the gradient is pulled back through `compose`
    to each copy. Layers missing from `weight_grads` count as zero gradient.
    """
    return jax.jit(functools.partial(_layer_coefficient_gradients, plan))(bank, weight_grads)


def _layer_coefficient_gradients(
    plan: Plan, bank: Mapping[str, Any], weight_grads: Mapping[str, Any]
) -> dict[LevelKey, jax.Array]:
    untied = _with_coefficients(plan, own_coefficients(plan.clusters, plan.layers))
    untied_bank = dict(bank)
    untied_bank["coefficients"] = expand_coefficients(plan, untied, bank["coefficients"])

    def weights(coefficients):
        return compose(untied, {**untied_bank, "coefficients": coefficients})

    composed, pull_back = jax.vjp(weights, untied_bank["coefficients"])
    cotangent = {
        i: jnp.asarray(weight_grads[i], w.dtype) if i in weight_grads else jnp.zeros_like(w)
        for i, w in composed.items()
    }
    (grads,) = pull_back(cotangent)
    return {
        (i, w): grads[untied.bank[untied.cluster_of[i].name, w].key][untied.coefficient_row(i, w)]
        for i, groups in untied.coefficients
        for w in range(len(groups))
    }
