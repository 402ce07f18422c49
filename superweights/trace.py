"""What one trace of a model says about its params: order, stacks and output layer.

The model's apply is traced once to a jaxpr (abstract values only, nothing is
computed) and walked, nested jaxprs included (`jit`, `scan`, `cond`,
`custom_jvp`, `remat`...):

- *order*: params by first use in the forward pass;
- *stacked*: params fed to a `scan` as scanned-over inputs, so that their
  leading axis is a layer axis (`nn.scan`, `nnx.scan` over layers);
- *output*: the last param of two or more dimensions that the output depends
  on, in trace order (a classifier, when it is a kernel).

A param cast to another dtype before use (a layer computing in bf16 on float32
params) is followed through the cast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core

from superweights import tree


@dataclasses.dataclass(frozen=True)
class Trace:
    """Facts about a member's params from one trace.

    Attributes:
      order: param paths by first use (unread ones last, in flatten order).
      first_use: `{path: position of its first read}` in the walk.
      stacked: `{path: n_layers}` for params whose leading axis is scanned over.
      scan_start: `{path: position of the scan that reads the stack}`.
      output: path of the output layer's param, or None.
      dense: params read by a matrix product (`dot_general`) and never by a
        convolution: dense kernels even with three or more dimensions
        (`DenseGeneral`, attention projections).
      contracted: `{path: k}` for dense params of three or more dimensions
        (per layer) that every product contracts over their first `k` axes:
        the kernel is the matrix `[prod(shape[:k]), prod(shape[k:])]`.
    """

    order: tuple[str, ...]
    first_use: dict[str, int]
    stacked: dict[str, int]
    scan_start: dict[str, int]
    output: str | None
    dense: frozenset[str] = frozenset()
    contracted: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_order(cls, order, output: str | None = None) -> Trace:
        """A trace that only states an order (no stacks), e.g. for hand-made params."""
        return cls(tuple(order), {p: i for i, p in enumerate(order)}, {}, {}, output)

    def rank(self, path: str, index: int | None = None) -> tuple[int, int, int]:
        """Sort key of a layer: slices of stacks interleave as the scan runs them."""
        use = self.first_use.get(path, 1 << 30)
        if index is None:
            return (use, 0, 0)
        return (self.scan_start.get(path, use), index, use)


CASTS = ("convert_element_type",)
"""Primitives whose output is their param in another dtype (mixed precision): reads of
the output are reads of the param."""


def _closed(value) -> core.Jaxpr | None:
    if isinstance(value, core.ClosedJaxpr):
        return value.jaxpr
    if isinstance(value, core.Jaxpr):
        return value
    return None


def _inner_jaxprs(eqn) -> list[tuple[core.Jaxpr, list]]:
    """`(inner jaxpr, the outer vars its inputs are)` for the eqn's nested jaxprs."""
    found = []
    for name, value in eqn.params.items():
        values = value if isinstance(value, tuple | list) else (value,)
        for item in values:
            inner = _closed(item)
            if inner is None:
                continue
            outer = list(eqn.invars)
            if name == "branches":  # cond: the first operand is the branch index
                outer = outer[1:]
            if len(inner.invars) == len(outer):
                found.append((inner, outer))
    return found


class _Walk:
    """Numbers every eqn, nested ones included, and records each param's reads."""

    def __init__(self):
        self.position = 0
        self.first_use: dict[int, int] = {}
        self.last_use: dict[int, int] = {}
        self.stacked: dict[int, int] = {}
        self.scan_start: dict[int, int] = {}
        self.touched: set[int] = set()
        self.primitives: dict[int, set[str]] = {}
        self.contractions: dict[int, set[tuple]] = {}

    def jaxpr(self, jaxpr: core.Jaxpr, origin: dict[int, int]) -> None:
        for eqn in jaxpr.eqns:
            self.eqn(eqn, origin)

    def eqn(self, eqn, origin: dict[int, int]) -> None:
        """`origin`: `{id(var): param index}` for the vars that are params."""
        start = self.position
        reads = [(i, origin[id(v)]) for i, v in enumerate(eqn.invars) if id(v) in origin]
        if eqn.primitive.name == "scan":
            scanned = eqn.params["num_consts"] + eqn.params["num_carry"]
            for position, param in reads:
                if position >= scanned:
                    self.stacked.setdefault(param, int(eqn.params["length"]))
                    self.scan_start.setdefault(param, start)
        if eqn.primitive.name == "dot_general":
            contract, batch = eqn.params["dimension_numbers"]  # (lhs, rhs) each
            for position, param in reads:
                rank = eqn.invars[position].aval.ndim
                read = (rank, tuple(contract[position]), tuple(batch[position]))
                self.contractions.setdefault(param, set()).add(read)
        if reads:
            for inner, outer in _inner_jaxprs(eqn):
                pairs = zip(inner.invars, outer, strict=True)
                self.jaxpr(inner, {id(i): origin[id(o)] for i, o in pairs if id(o) in origin})
        for _, param in reads:
            self.primitives.setdefault(param, set()).add(eqn.primitive.name)
            self.touched.add(param)
            self.first_use.setdefault(param, start)
            self.last_use[param] = max(self.last_use.get(param, start), self.position)
        if eqn.primitive.name in CASTS and reads:
            origin[id(eqn.outvars[0])] = reads[0][1]  # a layer computing in bf16 reads a cast
        self.position += 1


def _leading_contraction(reads: set[tuple]) -> int | None:
    """`k` when every read of a param of rank 3 or more contracts its first `k` axes.

    The order in which they are paired with the other operand's does not matter:
    the kernel is the same matrix `[prod(shape[:k]), prod(shape[k:])]`.
    """
    if len(reads) != 1:
        return None
    ((rank, contract, batch),) = reads
    k = len(contract)
    if rank < 3 or batch or not 0 < k < rank or sorted(contract) != list(range(k)):
        return None
    return k


def _on_output_path(jaxpr: core.Jaxpr) -> list[bool]:
    """Per top-level eqn: does the output depend on it (nested jaxprs taken whole)."""
    live = {id(v) for v in jaxpr.outvars if not isinstance(v, core.Literal)}
    on_path = [False] * len(jaxpr.eqns)
    for index in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[index]
        if any(id(v) in live for v in eqn.outvars):
            on_path[index] = True
            live.update(id(v) for v in eqn.invars if not isinstance(v, core.Literal))
    return on_path


def trace_params(fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> Trace:
    """Traces `fn(params, inputs) -> output` (arrays or `jax.ShapeDtypeStruct`s).

    The output layer is the param of two or more dimensions read last among
    those the output depends on; a weight-tied output (an embedding read again
    at the end) is thus the embedding, which is no kernel.
    """
    jaxpr = jax.make_jaxpr(fn)(params, inputs).jaxpr
    leaves = jax.tree_util.tree_leaves(params)
    paths = list(tree.flatten(params))
    origin = {id(v): i for i, v in enumerate(jaxpr.invars[: len(leaves)])}
    walk = _Walk()
    feeds_output: set[int] = set()
    for eqn, on_path in zip(jaxpr.eqns, _on_output_path(jaxpr), strict=True):
        walk.touched = set()
        walk.eqn(eqn, origin)
        if on_path:
            feeds_output |= walk.touched
    candidates = [p for p in feeds_output if leaves[p].ndim >= 2]
    output = max(candidates, key=lambda p: (walk.last_use[p], p), default=None)
    unread = walk.position
    first_use = {p: walk.first_use.get(i, unread) for i, p in enumerate(paths)}
    rank = {p: (first_use[p], i) for i, p in enumerate(paths)}
    dense = {
        paths[i]
        for i, used_by in walk.primitives.items()
        if "dot_general" in used_by and "conv_general_dilated" not in used_by
    }
    contracted = {
        paths[i]: k
        for i, reads in walk.contractions.items()
        if paths[i] in dense and (k := _leading_contraction(reads)) is not None
    }
    return Trace(
        order=tuple(sorted(paths, key=rank.get)),
        first_use=first_use,
        stacked={paths[i]: n for i, n in walk.stacked.items()},
        scan_start={paths[i]: s for i, s in walk.scan_start.items()},
        output=None if output is None else paths[output],
        dense=frozenset(dense),
        contracted=contracted,
    )


def forward_order(fn: Callable[[Any, Any], Any], params: Any, inputs: Any) -> list[str]:
    """Param paths sorted by first use when tracing `fn(params, inputs)`.

    Params the trace never reads keep their flatten order, after the used ones.
    """
    return list(trace_params(fn, params, inputs).order)
