"""Parameter budgets and how templates are allocated under one (method.md section 4)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

SCOPES = ("banks", "model")


class BudgetError(ValueError):
    """The budget cannot be met: too small, or malformed."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parameter budget, as a count or as a fraction of the unshared model.

    Attributes:
      params: the number of trainable parameters allowed.
      fraction: the budget as a fraction of the model's own size in `scope`
        (0.1 = 10%). Give exactly one of `params` and `fraction`.
      scope: what the budget counts. `"banks"`: the shared templates only (the
        paper's count). `"model"`: everything trainable, i.e. templates,
        coefficients and the per-member norms, biases and heads.
    """

    params: int | None = None
    fraction: float | None = None
    scope: str = "banks"

    def __post_init__(self):
        if (self.params is None) == (self.fraction is None):
            raise BudgetError("give a budget as exactly one of params=N or fraction=F")
        if self.scope not in SCOPES:
            raise BudgetError(f"unknown budget scope {self.scope!r}; choose one of {SCOPES}")
        if self.params is not None:
            _check_amount("params", self.params, "a count of parameters, e.g. params=50_000")
            if int(self.params) != self.params:
                raise BudgetError(f"params must be a whole number, got {self.params}")
        else:
            _check_amount("fraction", self.fraction, "a fraction of the model, e.g. fraction=0.1")
            if self.fraction > 1:
                raise BudgetError(
                    f"a budget of {100 * self.fraction:.10g}% is above the model's own size; "
                    "give at most 100%, or train the full model without sharing (npas train "
                    "--dense)"
                )

    def resolve(self, reference: int) -> int:
        """Budget in parameters, given the full model's size in this scope.

        Raises `BudgetError` above `reference`: nothing is left to share there.
        """
        fraction = self.fraction
        params = int(self.params) if fraction is None else int(fraction * reference)
        if params > reference:
            raise BudgetError(
                f"a budget of {self.describe()} is above the model's own size, {reference:,} "
                f"parameters in {self.scope} scope; give at most that (100%), or train the "
                "full model without sharing (npas train --dense)"
            )
        return params

    def counted(self, unshared_params: int) -> tuple[int, bool]:
        """`(fixed, count_coefficients)`: what this scope counts besides the templates.

        Model scope counts the per-member params (`unshared_params`) and every
        coefficient; banks scope neither (block coefficients of sub-layer banks
        count in both, see `bank_cost`).
        """
        model_scope = self.scope == "model"
        return (unshared_params if model_scope else 0), model_scope

    def describe(self) -> str:
        amount = f"{int(self.params):,}" if self.params is not None else f"{self.fraction:.2%}"
        return f"{amount} ({self.scope} scope)"

    @classmethod
    def parse(cls, text: str, scope: str = "banks") -> Budget:
        """`"10%"` or `"0.1"` -> a fraction; `"250000"` or `"250k"`, `"1.5M"` -> a count.

        A bare number up to 1 is a fraction and a whole number above 1 a count;
        one between (`"1.5"`) is refused as ambiguous.
        """
        if not isinstance(text, str):
            raise BudgetError(f"Budget.parse reads text such as '10%' or '250k', got {text!r}")
        cleaned = text.strip().lower().replace(",", "").replace("_", "")
        factor, kind = 1.0, None
        if cleaned.endswith("%"):
            cleaned, factor, kind = cleaned[:-1], 0.01, "fraction"
        elif cleaned[-1:] in COUNT_SUFFIXES:
            cleaned, factor, kind = cleaned[:-1], COUNT_SUFFIXES[cleaned[-1]], "params"
        try:
            value = float(cleaned)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise BudgetError(
                f"cannot read budget {text!r}: use a fraction (0.1), a percentage (10%) "
                "or a parameter count (250000, 250k, 1.5M)"
            )
        value *= factor
        if not math.isfinite(value):
            raise BudgetError(f"budget {text!r} is too large to be a number of parameters")
        if kind is None:
            if value > 1 and value != round(value):
                raise BudgetError(
                    f"budget {text!r} is ambiguous: write a percentage ({value * 100:g}%) or "
                    f"a whole count ({round(value)})"
                )
            kind = "fraction" if value <= 1 else "params"
        if kind == "params":
            value = round(value)
        if value <= 0:
            sign = "zero" if value == 0 else "negative"
            rounded = " once rounded to whole parameters" if kind == "params" else ""
            raise BudgetError(
                f"budget {text!r} is {sign}{rounded}: give a positive fraction (0.1), "
                "percentage (10%) or parameter count (250k)"
            )
        try:
            return cls(**{kind: value}, scope=scope)
        except BudgetError as error:
            raise BudgetError(f"budget {text!r}: {error}") from None


COUNT_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}
"""Suffixes of parameter counts in `Budget.parse`: thousands, millions, billions."""


def _check_amount(name: str, value, example: str) -> None:
    """A budget amount is a real number, finite and positive."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(
            f"{name} must be a number, got {value!r} ({type(value).__name__}); give {example}, "
            "or read text with Budget.parse('10%')"
        )
    if not math.isfinite(value):
        raise BudgetError(f"{name} must be finite, got {value}")
    if value <= 0:
        raise BudgetError(
            f"{name} must be positive, got {value} ({'zero' if value == 0 else 'negative'})"
        )


@dataclasses.dataclass(frozen=True)
class BankDemand:
    """What one bank costs and how many templates it could use.

    Attributes:
      piece_size: entries of one template, L.
      users: layers that read this bank.
      groups: coefficient vectors over this bank (one entry each per template).
    """

    piece_size: int
    users: int
    groups: int


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Templates per bank, plus at most one partial template spending the remainder.

    Attributes:
      templates: whole templates per bank, in bank order.
      partial: entries of the partial template per bank (0 = none).
      spent: parameters used in the budget's scope.
      leftover: parameters of the budget left unspent.
      paper_templates: templates per bank by the paper's two-phase rule alone
        (zeros where the budget is below the full-size floor).
      template_sizes: entries of one template per bank: the piece size, or
        less in sub-layer geometry.
    """

    templates: tuple[int, ...]
    partial: tuple[int, ...]
    spent: int
    leftover: int
    paper_templates: tuple[int, ...]
    template_sizes: tuple[int, ...]


SUBLAYER_TEMPLATES = 1
"""Templates per bank below the full-size floor (sub-layer geometry); see `allocate`."""


def bank_cost(demand: BankDemand, templates: int, size: int, count_coefficients: bool) -> int:
    """Parameters of a bank with `templates` templates of `size` entries each.

    At full size (`size >= piece_size`) a coefficient vector holds one entry per
    template, counted only with `count_coefficients` (model scope). Below it
    (sub-layer geometry) the piece is `ceil(L / size)` blocks, each with its own
    coefficients over the templates; those are counted in every scope, since
    they are of the same order as the templates.
    """
    if size >= demand.piece_size:
        return templates * (demand.piece_size + demand.groups * count_coefficients)
    blocks = -(-demand.piece_size // size)
    return templates * (size + demand.groups * blocks)


def smallest_template(demand: BankDemand, count_coefficients: bool) -> int:
    """The template size of least cost for one template (the larger on a tie).

    One template of `T` entries costs `T + groups * ceil(L / T)` below full size
    (`L + groups` or `L` at full size, see `bank_cost`), least near
    `sqrt(groups * L)`. The search is exact: every `T <= sqrt(L)`, and for each
    block count `b <= sqrt(L) + 1` the smallest `T` with `ceil(L / T) = b`,
    which is `ceil(L / b)`; together they hold a least-cost size for every
    block count.
    """
    piece = demand.piece_size
    root = math.isqrt(piece)
    counts = np.arange(1, root + 2)
    sizes = np.unique(np.clip(np.concatenate([counts, -(-piece // counts)]), 1, piece))
    costs = sizes + demand.groups * -(-piece // sizes)
    costs[sizes == piece] = bank_cost(demand, 1, piece, count_coefficients)
    best = np.flatnonzero(costs == costs.min())
    return int(sizes[best[-1]])


def full_size_minimum(demands: Sequence[BankDemand], fixed: int, count_coefficients: bool) -> int:
    """Parameters needed for one full-size template per bank (the paper's floor)."""
    return fixed + sum(d.piece_size + d.groups * count_coefficients for d in demands)


def minimum_budget(
    demands: Sequence[BankDemand],
    fixed: int,
    count_coefficients: bool,
    sublayer: bool = True,
) -> int:
    """The smallest feasible budget: one template per bank, sub-layer sized if allowed."""
    if not sublayer:
        return full_size_minimum(demands, fixed, count_coefficients)
    return fixed + sum(
        bank_cost(d, 1, smallest_template(d, count_coefficients), count_coefficients)
        for d in demands
    )


FULL, SUBLAYER = "full", "sub-layer"
"""The two geometries of a plan's banks (see `geometry`)."""


def geometry(
    demands: Sequence[BankDemand],
    budget: int,
    fixed: int,
    count_coefficients: bool,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
) -> str:
    """How `budget` shapes the banks: the one place this is decided.

    `FULL` (the paper's geometry) from one full-size template per bank up,
    `SUBLAYER` below that when `sublayer_templates > 0` (`allocate_sublayer`).
    The allocation, the plan and the search's split rule all follow it.

    Raises:
      BudgetError: below the minimum feasible budget; the message states it.
    """
    full = full_size_minimum(demands, fixed, count_coefficients)
    if budget >= full:
        return FULL
    if sublayer_templates <= 0:
        raise _below_minimum(budget, full, fixed, sublayer=False)
    minimum = minimum_budget(demands, fixed, count_coefficients)
    if budget < minimum:
        raise _below_minimum(budget, minimum, fixed, sublayer=True)
    return SUBLAYER


def _below_minimum(budget: int, minimum: int, fixed: int, sublayer: bool) -> BudgetError:
    template = (
        "smallest sub-layer template with its coefficients" if sublayer else ("full-size template")
    )
    counted = f"one {template} per cluster and level"
    if fixed:
        counted += f", plus {fixed:,} per-member params that are never shared"
    return BudgetError(
        f"a budget of {budget:,} parameters is below the minimum feasible {minimum:,} "
        f"for these clusters ({counted}); raise the budget to at least {minimum:,} "
        "or use fewer clusters (bins)"
    )


def _fit_sizes(
    demands: Sequence[BankDemand], room: int, count_coefficients: bool, templates: int
) -> list[int] | None:
    """Template sizes, one per bank, that spend at most `room` with `templates` each.

    Every bank's size is its piece size scaled by one common ratio (clamped to
    `[smallest_template, L]`), the largest ratio that fits; what is left then
    grows the banks one by one, largest piece first. None if nothing fits.
    """
    floors = [smallest_template(d, count_coefficients) for d in demands]

    def sizes_at(ratio: float) -> list[int]:
        return [
            min(d.piece_size, max(lo, math.ceil(ratio * d.piece_size)))
            for d, lo in zip(demands, floors, strict=True)
        ]

    def cost(sizes: Sequence[int]) -> int:
        return sum(
            bank_cost(d, templates, t, count_coefficients)
            for d, t in zip(demands, sizes, strict=True)
        )

    if cost(floors) > room:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(sizes_at(middle)) <= room else (low, middle)
    sizes = sizes_at(low)  # fits: `low` only ever moves to a ratio that fits
    for i in sorted(range(len(demands)), key=lambda i: -demands[i].piece_size):
        others = cost(sizes) - bank_cost(demands[i], templates, sizes[i], count_coefficients)
        low, high = sizes[i], demands[i].piece_size
        while low < high:  # the largest size of this bank that still fits
            middle = (low + high + 1) // 2
            fits = others + bank_cost(demands[i], templates, middle, count_coefficients) <= room
            low, high = (middle, high) if fits else (low, middle - 1)
        sizes[i] = low
    return sizes


def allocate_sublayer(
    demands: Sequence[BankDemand],
    budget: int,
    *,
    fixed: int = 0,
    count_coefficients: bool = False,
    templates: int = SUBLAYER_TEMPLATES,
) -> Allocation:
    """Templates smaller than their pieces, for budgets below the full-size floor.

    Each bank gets `templates` templates (fewer, down to one, when the budget
    cannot hold that many of the smallest size), all of one size per bank
    chosen by `_fit_sizes`. A piece of L entries is then `ceil(L / size)`
    blocks, each a learned combination of the bank's templates.
    """
    minimum = minimum_budget(demands, fixed, count_coefficients)
    if budget < minimum:
        raise _below_minimum(budget, minimum, fixed, sublayer=True)
    for count in range(max(1, templates), 0, -1):
        sizes = _fit_sizes(demands, budget - fixed, count_coefficients, count)
        if sizes is not None:
            break
    spent = fixed + sum(
        bank_cost(d, count, t, count_coefficients) for d, t in zip(demands, sizes, strict=True)
    )
    zeros = (0,) * len(demands)
    return Allocation((count,) * len(demands), zeros, spent, budget - spent, zeros, tuple(sizes))


def allocate(
    demands: Sequence[BankDemand],
    budget: int,
    *,
    fixed: int = 0,
    count_coefficients: bool = False,
    cap: int = 8,
    passes: int = 7,
    fill: bool = True,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
) -> Allocation:
    """Templates per bank under `budget` (method.md section 4).

    The paper's rule: one template per bank; then up to `passes` round-robin
    passes adding a template to each bank that has fewer templates than users;
    then up to `passes` more adding one to each bank below `cap`. Each addition
    only if it fits. With `fill`, what is left is spent too, so that the budget
    is used: more passes of the first kind without limit, then of the second
    kind without cap, then one partial template (a template whose first m
    entries are trainable and the rest zero) on the bank that absorbs the most.

    Args:
      demands: one per bank, in round-robin order (clusters, then levels).
      budget: parameters allowed in the scope.
      fixed: per-member parameters counted against the budget (model scope).
      count_coefficients: whether a template's coefficients count (model scope).
      sublayer_templates: below the full-size floor (one full template per
        bank), templates per bank of the sub-layer geometry (`allocate_sublayer`);
        0 refuses such budgets, as the paper's method does.
    """
    if geometry(demands, budget, fixed, count_coefficients, sublayer_templates) == SUBLAYER:
        return allocate_sublayer(
            demands,
            budget,
            fixed=fixed,
            count_coefficients=count_coefficients,
            templates=sublayer_templates,
        )
    minimum = full_size_minimum(demands, fixed, count_coefficients)
    costs = [d.piece_size + d.groups * count_coefficients for d in demands]
    counts = [1] * len(demands)
    left = budget - minimum

    def sweep(may_grow) -> bool:
        nonlocal left
        grew = False
        for i, cost in enumerate(costs):
            if may_grow(i) and cost <= left:
                counts[i] += 1
                left -= cost
                grew = True
        return grew

    def below_users(i):
        return counts[i] < demands[i].users

    def below_cap(i):
        return counts[i] < cap

    for _ in range(passes):
        sweep(below_users)
    for _ in range(passes):
        sweep(below_cap)
    paper = tuple(counts)

    partial = [0] * len(demands)
    if fill:
        while sweep(below_users):
            pass
        while sweep(lambda i: True):
            pass
        best, best_entries = None, 0
        for i, d in enumerate(demands):
            entries = min(d.piece_size - 1, left - d.groups * count_coefficients)
            if entries > best_entries:
                best, best_entries = i, entries
        if best is not None:
            partial[best] = best_entries
            left -= best_entries + demands[best].groups * count_coefficients
    sizes = tuple(d.piece_size for d in demands)
    return Allocation(tuple(counts), tuple(partial), budget - left, left, paper, sizes)
