"""Which weights of a model take part in sharing, read off its abstract params.

A kernel is read as `[*spatial, in, out]` (Flax's HWIO for convolutions,
`[in, out]` for dense layers). Layers are ordered by first use in the forward
pass, found by tracing the model once (`superweights.trace`): no naming
convention is needed. A kernel stacked over layers (`nn.scan`, `nnx.scan`:
`[n_layers, *spatial, in, out]`) is `n_layers` layers, one per slice.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from superweights import tree
from superweights.trace import Trace


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One shared weight tensor of one member.

    Attributes:
      member: name of the member (network) it belongs to.
      path: dotted path of the kernel inside the member's params.
      shape: kernel shape `[*spatial, in, out]`.
      dtype: dtype name of the kernel, e.g. `"float32"`.
      depth: position among the member's shared layers in forward order.
      index: the slice of a stacked kernel `[n_layers, ...]` this layer is
        (`path` names the whole stack); None for an ordinary kernel.
      held_shape: the kernel's shape in the model where it differs from
        `shape`: a dense kernel with several input or output axes
        (`DenseGeneral`, attention projections) shared as the matrix `shape`.
    """

    member: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    depth: int
    index: int | None = None
    held_shape: tuple[int, ...] | None = None

    @property
    def id(self) -> str:
        suffix = "" if self.index is None else f"[{self.index}]"
        return f"{self.member}:{self.path}{suffix}"

    def read(self, flat: Mapping[str, Any]) -> Any:
        """This layer's kernel out of `{path: array}` (its slice, for a stacked kernel)."""
        value = flat[self.path]
        value = value if self.index is None else value[self.index]
        return value if self.held_shape is None else value.reshape(self.shape)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The kernel's shape as the model holds it (one slice of a stack)."""
        return self.shape if self.held_shape is None else self.held_shape

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
    """A parameter that stays per member (norms, biases, heads, excluded kernels).

    `reason` says why a kernel is kept out of sharing (empty for the others).
    """

    member: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    reason: str = ""

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def kind(self) -> str:
        """`"head"`, `"norm"` (scale/bias of a normalisation), `"bias"` or `"other"`."""
        parts = self.path.split(".")
        if "head" in parts or self.reason == OUTPUT_LAYER:
            return "head"
        lowered = [p.lower() for p in parts]
        if parts[-1] in ("scale", "bias") and any("norm" in p or "bn" in p for p in lowered):
            return "norm"
        if parts[-1] == "bias":
            return "bias"
        return "other"


OUTPUT_LAYER = "the output layer (the last kernel before the logits)"


@dataclasses.dataclass(frozen=True)
class SharingRule:
    """Selects the kernels that draw from the bank.

    Attributes:
      share_dense: also share 2-D (dense) kernels; convolutions are always shared.
      exclude: glob patterns; a kernel whose path has a component matching one
        stays per member (`head` by default: classifiers and early-exit heads).
      kernel_names: leaf names that hold kernels.
      keep_output: keep the output layer dense, whatever its name: the last
        kernel the logits depend on, in trace order (the classifier).
      stacked: glob patterns of kernel paths whose leading axis is a layer axis,
        for stacks the trace cannot see (`nnx.vmap` layers called in a Python
        loop); stacks run by a scan are found without it.
    """

    share_dense: bool = False
    exclude: tuple[str, ...] = ("head",)
    kernel_names: tuple[str, ...] = ("kernel",)
    keep_output: bool = True
    stacked: tuple[str, ...] = ()

    def is_kernel(self, path: str, shape: Sequence[int]) -> bool:
        return path.split(".")[-1] in self.kernel_names and len(shape) >= 2

    def is_stacked(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.stacked)

    def reason_kept_out(self, path: str, shape: Sequence[int], dense: bool = False) -> str:
        """Why a kernel (one layer's shape) stays per member; "" if it is shared.

        `dense`: the trace saw it in matrix products only, whatever its rank.
        """
        parts = path.split(".")
        for pattern in self.exclude:
            if any(fnmatch.fnmatchcase(p, pattern) for p in parts):
                return f"excluded by the pattern {pattern!r}"
        if (dense or len(shape) == 2) and not self.share_dense:
            return "a dense kernel (share_dense=False)"
        return ""

    def selects(self, path: str, shape: Sequence[int], dense: bool = False) -> bool:
        return self.is_kernel(path, shape) and not self.reason_kept_out(path, shape, dense)


def split_params(
    member: str,
    params: Mapping[str, Any],
    trace: Trace,
    rule: SharingRule,
) -> tuple[list[LayerSpec], list[ParamSpec]]:
    """Sorts a member's params into shared layers (in forward order) and per-member params.

    A stacked kernel (`trace.stacked`, or matched by `rule.stacked`) gives one
    layer per slice; its slices keep their place in the forward order.
    """
    flat = tree.flatten(params)
    stacks = {**{p: int(flat[p].shape[0]) for p in flat if rule.is_stacked(p)}, **trace.stacked}
    entries, unshared = [], []
    for path in trace.order:
        leaf = flat[path]
        shape, dtype = tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name
        stack = stacks.get(path)
        layer_shape = shape[1:] if stack else shape
        if not rule.is_kernel(path, layer_shape):
            unshared.append(ParamSpec(member, path, shape, dtype))
            continue
        reason = rule.reason_kept_out(path, layer_shape, path in trace.dense)
        if not reason and rule.keep_output and path == trace.output and not stack:
            reason = OUTPUT_LAYER
        if reason:
            unshared.append(ParamSpec(member, path, shape, dtype, reason))
            continue
        held = None
        if (k := trace.contracted.get(path)) is not None:
            held = layer_shape
            layer_shape = (math.prod(held[:k]), math.prod(held[k:]))
        for index in range(stack) if stack else (None,):
            entries.append((trace.rank(path, index), path, layer_shape, dtype, index, held))
    entries.sort(key=lambda entry: entry[0])
    layers = [
        LayerSpec(member, path, shape, dtype, depth=depth, index=index, held_shape=held)
        for depth, (_, path, shape, dtype, index, held) in enumerate(entries)
    ]
    return layers, unshared
