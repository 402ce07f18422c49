"""Parameter budgets and how templates are allocated under one (method.md section 4)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

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
        if self.params is not None and not (
            math.isfinite(self.params) and int(self.params) == self.params and self.params > 0
        ):
            raise BudgetError(f"params must be a positive whole number, got {self.params}")
        if self.fraction is not None and not (math.isfinite(self.fraction) and self.fraction > 0):
            raise BudgetError(f"fraction must be positive and finite, got {self.fraction}")

    def resolve(self, reference: int) -> int:
        """Budget in parameters, given the full model's size in this scope."""
        if self.params is not None:
            return int(self.params)
        return int(self.fraction * reference)

    def describe(self) -> str:
        amount = f"{self.params:,}" if self.params is not None else f"{self.fraction:.2%}"
        return f"{amount} ({self.scope} scope)"

    @classmethod
    def parse(cls, text: str, scope: str = "banks") -> Budget:
        """`"10%"` or `"0.1"` -> a fraction; `"250000"` or `"250k"`, `"1.5M"` -> a count."""
        cleaned = text.strip().lower().replace(",", "").replace("_", "")

        def number(digits: str) -> float:
            value = float(digits)
            if not math.isfinite(value):
                raise ValueError(f"not a finite number: {digits!r}")
            return value

        try:
            if cleaned.endswith("%"):
                return cls(fraction=number(cleaned[:-1]) / 100, scope=scope)
            for suffix, factor in (("k", 1e3), ("m", 1e6), ("g", 1e9)):
                if cleaned.endswith(suffix):
                    return cls(params=round(number(cleaned[:-1]) * factor), scope=scope)
            value = number(cleaned)
        except (ValueError, OverflowError) as error:
            raise BudgetError(
                f"cannot read budget {text!r}: use a fraction (0.1), a percentage (10%) "
                "or a parameter count (250000, 250k, 1.5M)"
            ) from error
        if value <= 1:
            return cls(fraction=value, scope=scope)
        return cls(params=round(value), scope=scope)


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
      paper_templates: templates per bank by the paper's two-phase rule alone.
    """

    templates: tuple[int, ...]
    partial: tuple[int, ...]
    spent: int
    leftover: int
    paper_templates: tuple[int, ...]


def minimum_budget(demands: Sequence[BankDemand], fixed: int, count_coefficients: bool) -> int:
    """Parameters needed for one template per bank (plus `fixed` per-member ones)."""
    return fixed + sum(d.piece_size + d.groups * count_coefficients for d in demands)


def allocate(
    demands: Sequence[BankDemand],
    budget: int,
    *,
    fixed: int = 0,
    count_coefficients: bool = False,
    cap: int = 8,
    passes: int = 7,
    fill: bool = True,
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
    """
    minimum = minimum_budget(demands, fixed, count_coefficients)
    if budget < minimum:
        counted = "one template per cluster and level" + (
            " plus per-member params" if fixed else ""
        )
        raise BudgetError(
            f"a budget of {budget:,} parameters is below the minimum feasible {minimum:,} "
            f"for these clusters ({counted}); raise the budget to at least {minimum:,} "
            "or use fewer clusters (bins)"
        )
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
    return Allocation(tuple(counts), tuple(partial), budget - left, left, paper)
