"""Which weights of a model take part in sharing, read off its abstract params.

A kernel is read as `[*spatial, in, out]` (Flax's HWIO for convolutions,
`[in, out]` for dense layers). Layers are ordered by first use in the forward
pass, found by tracing the model once: no naming convention is needed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from superweights import tree


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One shared weight tensor of one member.

    Attributes:
      member: name of the member (network) it belongs to.
      path: dotted path of the kernel inside the member's params.
      shape: kernel shape `[*spatial, in, out]`.
      dtype: dtype name of the kernel, e.g. `"float32"`.
      depth: position among the member's shared layers in forward order.
    """

    member: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    depth: int

    @property
    def id(self) -> str:
        return f"{self.member}:{self.path}"

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[:-2]

    @property
    def matrix(self) -> tuple[int, int]:
        """`(out, in)`: the kernel seen as a matrix, spatial dims carried along."""
        return self.shape[-1], self.shape[-2]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A parameter that stays per member (norms, biases, heads, excluded kernels)."""

    member: str
    path: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        """`"head"`, `"norm"` (scale/bias of a normalisation), `"bias"` or `"other"`."""
        parts = self.path.split(".")
        if "head" in parts:
            return "head"
        lowered = [p.lower() for p in parts]
        if parts[-1] in ("scale", "bias") and any("norm" in p or "bn" in p for p in lowered):
            return "norm"
        if parts[-1] == "bias":
            return "bias"
        return "other"


@dataclasses.dataclass(frozen=True)
class SharingRule:
    """Selects the kernels that draw from the bank.

    Attributes:
      share_dense: also share 2-D (dense) kernels; convolutions are always shared.
      exclude: glob patterns; a kernel whose path has a component matching one
        stays per member (the classifier `head` by default).
      kernel_names: leaf names that hold kernels.
    """

    share_dense: bool = False
    exclude: tuple[str, ...] = ("head",)
    kernel_names: tuple[str, ...] = ("kernel",)

    def selects(self, path: str, shape: Sequence[int]) -> bool:
        parts = path.split(".")
        if parts[-1] not in self.kernel_names or len(shape) < 2:
            return False
        if len(shape) == 2 and not self.share_dense:
            return False
        return not any(fnmatch.fnmatchcase(p, pattern) for p in parts for pattern in self.exclude)


def forward_order(apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> list[str]:
    """Param paths sorted by first use when tracing `apply_fn(params, inputs)`.

    Arrays or `jax.ShapeDtypeStruct`s both work. Params the trace never reads
    keep their flatten order, after the used ones.
    """
    closed = jax.make_jaxpr(apply_fn)(params, inputs)
    n_params = len(jax.tree_util.tree_leaves(params))
    param_of_var = {id(v): i for i, v in enumerate(closed.jaxpr.invars[:n_params])}
    first_use = [len(closed.jaxpr.eqns)] * n_params
    for index, eqn in reversed(list(enumerate(closed.jaxpr.eqns))):
        for var in eqn.invars:
            if id(var) in param_of_var:
                first_use[param_of_var[id(var)]] = index
    paths = list(tree.flatten(params))
    rank = {p: (first_use[i], i) for i, p in enumerate(paths)}
    return sorted(paths, key=rank.get)


def split_params(
    member: str,
    params: Mapping[str, Any],
    order: Sequence[str],
    rule: SharingRule,
) -> tuple[list[LayerSpec], list[ParamSpec]]:
    """Sorts a member's params into shared layers (in `order`) and per-member params."""
    flat = tree.flatten(params)
    layers, unshared = [], []
    for path in order:
        leaf = flat[path]
        shape, dtype = tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name
        if rule.selects(path, shape):
            layers.append(LayerSpec(member, path, shape, dtype, depth=len(layers)))
        else:
            unshared.append(ParamSpec(member, path, shape, dtype))
    return layers, unshared
