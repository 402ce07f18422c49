"""Gradient similarity between layers of different shapes (method.md 6.2-6.3).

Kernels are `[*spatial, in, out]`. Two kernels are compared on their common
top-left block, the part that a nested SuperWeight would share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from superweights import Plan, tree


def common_crop(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both kernels cropped to their shared top-left block `[*spatial, :min_in, :min_out]`.

    Arrays of fewer than two dims (e.g. coefficient vectors) are returned as
    they are and must have the same shape.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim < 2 or b.ndim < 2:
        if a.shape != b.shape:
            raise ValueError(f"cannot compare vectors of shapes {a.shape} and {b.shape}")
        return a, b
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"kernels of shapes {a.shape} and {b.shape} differ in their spatial dims; "
            "only layers of the same kernel size can be compared"
        )
    rows, cols = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    return a[..., :rows, :cols], b[..., :rows, :cols]


def cosine_similarity(a, b) -> float:
    """Cosine of two kernels on their common crop; 0 when either crop is all zeros."""
    a, b = common_crop(a, b)
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    norms = np.linalg.norm(x) * np.linalg.norm(y)
    if norms == 0:
        return 0.0
    return float(np.clip(np.dot(x, y) / norms, -1.0, 1.0))


def similarity_matrix(gradients: Sequence[Any]) -> np.ndarray:
    """`[n, n]` pairwise cosine similarities: symmetric, ones on the diagonal."""
    n = len(gradients)
    matrix = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = cosine_similarity(gradients[i], gradients[j])
    return matrix


def layer_gradients(plan: Plan, member_grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`{layer id: dL/dW}` from `{member: gradient of its composed params pytree}`.

    The gradient of the loss with respect to each member's params (what
    `jax.grad` gives through `BudgetedModel.member_params`) holds one entry per
    kernel; this picks the shared ones out by their plan ids.
    """
    flat = {member: tree.flatten(grads) for member, grads in member_grads.items()}
    result = {}
    for layer in plan.layers:
        if layer.member in flat:
            grad = np.asarray(layer.read(flat[layer.member]))
            if grad.shape != layer.shape:
                raise ValueError(
                    f"gradient of {layer.id} has shape {grad.shape}, the plan says {layer.shape}"
                )
            result[layer.id] = grad
    return result
