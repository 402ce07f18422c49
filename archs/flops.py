"""FLOP counting from XLA's compiled cost analysis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def count_flops(fn: Callable[..., Any], *args: Any) -> int:
    """XLA's estimate of the floating-point operations of one call `fn(*args)`.

    The figure comes from the cost analysis of the compiled program for the default backend, so
    it counts what XLA executes after fusion (a multiply-add is 2 FLOPs) and can differ slightly
    across backends and versions. `args` may be arrays or `jax.ShapeDtypeStruct`s.
    """
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    if not analysis or "flops" not in analysis:
        raise RuntimeError("XLA's cost analysis did not report FLOPs for this backend.")
    return int(analysis["flops"])
