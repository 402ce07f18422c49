"""What the search measures: per-layer gradients (or weights) of a budgeted model.

These need only a `BudgetedModel`, its params and a loss, so a search fits into any
training loop:

    grads = search.weight_gradients(model, params, state, batches, loss)
    result = search.search_clusters(model.plan, grads, budget)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from search.similarity import layer_gradients
from superweights import BudgetedModel
from superweights.model import apply_members

Loss = Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]
"""`loss(logits, labels) -> scalar`, with `logits` as `{member: [batch, classes]}`."""


def weight_gradients(
    model: BudgetedModel,
    params: dict,
    model_state: Mapping[str, Any],
    batches: Iterable[tuple[Any, jax.Array]],
    loss: Loss,
) -> dict[str, np.ndarray]:
    """`{layer id: dL/dW}` averaged over `batches`, with respect to the composed weights.

    The members run in evaluation mode (running statistics, no dropout), so the
    gradients measure the weights alone; the search phase's augmentation is
    left out by passing plain batches.

    Args:
      model: the search model; its plan names the layers.
      params: its params, `{"bank": ..., "unshared": ...}`.
      model_state: its state (batch statistics), as `init` and `apply` return it.
      batches: `(inputs, labels)` pairs; each inputs as `apply` takes them.
      loss: `loss({member: logits}, labels) -> scalar`, e.g. the sum of the
        members' mean cross-entropies.
    """

    # The state is an argument, not a constant of the program: a later measurement (later
    # statistics, batches of the same shape) is the same program, which JAX's persistent
    # compilation cache can serve (each call still traces its own `jax.jit`).
    @jax.jit
    def member_grads(member_params, model_state, inputs, labels):
        def total(p):
            logits, _ = apply_members(model.members, p, model_state, inputs, train=False)
            return loss(logits, labels)

        return jax.grad(total)(member_params)

    member_params = jax.jit(model.member_params)(params)
    summed, count = None, 0
    for inputs, labels in batches:
        grads = member_grads(member_params, model_state, inputs, labels)
        summed = grads if summed is None else jax.tree_util.tree_map(np.add, summed, grads)
        count += 1
    if not count:
        raise ValueError("no batches to average gradients over")
    mean = jax.tree_util.tree_map(lambda g: np.asarray(g) / count, summed)
    return layer_gradients(model.plan, mean)


def layer_weights(model: BudgetedModel, params: dict) -> dict[str, np.ndarray]:
    """`{layer id: W}`: every shared layer's composed kernel, `[*spatial, in, out]`.

    The weights themselves, for a search that compares layers by what they are
    rather than by where their loss pulls them (`--similarity weights`).
    """
    return layer_gradients(model.plan, jax.jit(model.member_params)(params))
