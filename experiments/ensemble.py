"""Ensemble evaluation and anytime prediction (method.md section 8).

Members' logits are numpy arrays `[n, classes]`; the ensemble predicts the mean of the
members' softmaxes. Anytime prediction orders members by FLOPs and reports the ensemble of
every cheapest-first prefix (or every subset) against the FLOPs it costs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np

import archs
from superweights import Plan, compose, init_bank

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ENSEMBLE = "ensemble"
SUBSETS = ("prefixes", "all")


# --- metrics --------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """`[..., classes]` log-probabilities in float64, by log-sum-exp (stable for huge logits)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_of_softmaxes(log_probs: Sequence[np.ndarray]) -> np.ndarray:
    """`[n, classes]` log of the mean softmax, from the members' `[n, classes]` log-probs."""
    stacked = np.stack(log_probs)  # [members, n, classes]
    top = stacked.max(axis=0)
    return top + np.log(np.exp(stacked - top).mean(axis=0))


def accuracy(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the `[n]` labels that are the argmax of `[n, classes]` scores."""
    return float(np.mean(np.argmax(log_probs, axis=-1) == labels))


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the `[n]` labels under `[n, classes]` log-probs."""
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def disagreement(predictions: Sequence[np.ndarray]) -> float:
    """Mean over member pairs of the fraction of examples where their `[n]` predictions differ.

    0 for a single member.
    """
    pairs = list(itertools.combinations(predictions, 2))
    if not pairs:
        return 0.0
    return float(np.mean([np.mean(a != b) for a, b in pairs]))


def ensemble_metrics(logits: Mapping[str, np.ndarray], labels: np.ndarray) -> dict:
    """Accuracy and NLL of every member and of the ensemble, and the members' diversity.

    Args:
      logits: `{member: [n, classes]}`.
      labels: `[n]` integer classes.

    Returns:
      `{"accuracy/<member>", "nll/<member>"}` for every member and for `"ensemble"` (the mean
      of the members' softmaxes), `"accuracy"` and `"nll"` of the ensemble, and `"diversity"`:
      the mean pairwise disagreement of the members' argmax predictions.
    """
    if not logits:
        raise ValueError("no members given")
    if ENSEMBLE in logits:
        raise ValueError(f"a member may not be named {ENSEMBLE!r}")
    labels = np.asarray(labels)
    log_probs = {name: log_softmax(x) for name, x in logits.items()}
    log_probs[ENSEMBLE] = mean_of_softmaxes(list(log_probs.values()))
    metrics = {}
    for name, scores in log_probs.items():
        metrics[f"accuracy/{name}"] = accuracy(scores, labels)
        metrics[f"nll/{name}"] = nll(scores, labels)
    metrics["accuracy"] = metrics[f"accuracy/{ENSEMBLE}"]
    metrics["nll"] = metrics[f"nll/{ENSEMBLE}"]
    metrics["diversity"] = disagreement([np.argmax(x, axis=-1) for x in logits.values()])
    return metrics


# --- FLOPs ----------------------------------------------------------------------------------


def member_flops(
    apply_fn: Callable[..., tuple[Any, Any]], params: Any, state: Any, sample_input: Any
) -> int:
    """XLA's FLOP estimate of one inference forward pass on `sample_input` `[batch, ...]`.

    `apply_fn(params, state, x, train) -> (logits, state)` as in `superweights.Member`; for a
    budgeted member pass its composed params (`BudgetedModel.member_params`), so the cost of
    composing them is left out (see `compose_flops`). Arrays or `jax.ShapeDtypeStruct`s.
    """
    return archs.count_flops(
        lambda p, s, x: apply_fn(p, s, x, False)[0], params, state, sample_input
    )


def flops_per_member(
    members: Sequence[Any], member_params: Mapping[str, Any], state: Mapping[str, Any], sample_input
) -> dict[str, int]:
    """`{member: member_flops}` for `superweights.Member`s with params and state by name."""
    return {
        m.name: member_flops(m.apply_fn, member_params[m.name], state[m.name], sample_input)
        for m in members
    }


def compose_flops(plan: Plan) -> int:
    """FLOPs of composing every shared weight from the bank, counted from the plan.

    Each bank's SuperWeights are one product `[groups, num_templates] @ [num_templates, L]`:
    `2 * groups * num_templates * L` (a multiply-add is 2 FLOPs; the zero-padded partial
    template counts as a whole one, as it is multiplied like one). A sub-layer bank's blocks
    make the same `L` entries per group from `k` templates each, so the same count. Cropping,
    concatenating and reshaping pieces into kernels are memory moves, counted as 0.
    Independent of the batch.
    """
    return sum(2 * len(b.groups) * b.num_templates * b.piece_size for b in plan.banks)


def compose_flops_measured(plan: Plan, bank: dict | None = None) -> int:
    """XLA's FLOP estimate of `superweights.compose(plan, bank)`, to compare with `compose_flops`.

    `bank` defaults to the plan's abstract bank. XLA counts what it runs after its rewrites, so
    the figures differ slightly: a bank with a single template (a contraction of length 1)
    becomes an elementwise product, 1 FLOP per entry instead of 2, and fusion may recompute a
    cheap product in each kernel that reads it.
    """
    if bank is None:
        bank = jax.eval_shape(functools.partial(init_bank, plan), jax.random.key(0))
    return archs.count_flops(functools.partial(compose, plan), bank)


# --- anytime prediction ---------------------------------------------------------------------


def by_flops(flops: Mapping[str, int]) -> list[str]:
    """Member names, cheapest first (ties keep the given order)."""
    return sorted(flops, key=flops.get)


def member_subsets(order: Sequence[str], subsets: str) -> list[tuple[str, ...]]:
    """Cheapest-first prefixes of `order`, or (`"all"`) every non-empty subset in its order."""
    if subsets == "prefixes":
        return [tuple(order[:k]) for k in range(1, len(order) + 1)]
    if subsets == "all":
        sizes = range(1, len(order) + 1)
        return [c for k in sizes for c in itertools.combinations(order, k)]
    raise ValueError(f"unknown subsets {subsets!r}; choose one of {SUBSETS}")


def anytime_curve(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    flops: Mapping[str, int],
    *,
    compose_cost: int = 0,
    subsets: str = "prefixes",
) -> list[dict]:
    """Ensemble accuracy and NLL of member subsets against the FLOPs they cost.

    Members are ordered by FLOPs, cheapest first. The FLOPs of a subset are its members' own
    (`flops`, all for the same input batch) plus `compose_cost` once: the weights are composed
    from the bank once per evaluation, then reused by every member, so composing is paid once
    however many members run (0 for fully-parameterized members). It is the cost of composing
    all weights, an upper bound for subsets that leave some out.

    Args:
      logits: `{member: [n, classes]}`.
      labels: `[n]` integer classes.
      flops: `{member: FLOPs of its forward pass}`, covering every member of `logits`.
      compose_cost: FLOPs of composing the weights (`compose_flops`).
      subsets: `"prefixes"` (the n cheapest-first prefixes) or `"all"` (the 2^n - 1 subsets).

    Returns:
      One entry per subset, by increasing FLOPs: `{"members": tuple of names, "flops": int,
      "accuracy": float, "nll": float}`.
    """
    missing = sorted(set(logits) - set(flops))
    if missing:
        raise ValueError(f"no FLOPs given for members {missing}")
    order = by_flops({name: flops[name] for name in logits})
    labels = np.asarray(labels)
    log_probs = {name: log_softmax(x) for name, x in logits.items()}
    curve = []
    for members in member_subsets(order, subsets):
        scores = mean_of_softmaxes([log_probs[name] for name in members])
        curve.append(
            {
                "members": members,
                "flops": int(sum(flops[name] for name in members) + compose_cost),
                "accuracy": accuracy(scores, labels),
                "nll": nll(scores, labels),
            }
        )
    return sorted(curve, key=lambda entry: (entry["flops"], len(entry["members"])))


def exit_flops(
    apply_fn: Callable[..., tuple[Any, Any]], params: Any, state: Any, sample_input: Any
) -> list[int]:
    """FLOPs of reaching each early exit of a member with logits `[batch, exits, classes]`.

    Each count is XLA's estimate for computing that exit's logits alone: the compiler drops
    the layers after it, so exit e costs the network up to e plus its head.
    """
    outputs = jax.eval_shape(
        lambda p, s, x: apply_fn(p, s, x, False)[0], params, state, sample_input
    )
    return [
        archs.count_flops(
            lambda p, s, x, e=e: apply_fn(p, s, x, False)[0][:, e], params, state, sample_input
        )
        for e in range(outputs.shape[1])
    ]


def exit_curve(
    logits: np.ndarray, labels: np.ndarray, flops: Sequence[int], *, compose_cost: int = 0
) -> list[dict]:
    """Accuracy and NLL of each early exit (`logits [n, exits, classes]`) against its FLOPs.

    Entries have the keys of `anytime_curve` (`members` names the exit), so both plot alike.
    """
    if logits.shape[1] != len(flops):
        raise ValueError(f"{logits.shape[1]} exits but {len(flops)} FLOP counts")
    labels = np.asarray(labels)
    curve = []
    for e, cost in enumerate(flops):
        scores = log_softmax(logits[:, e])
        curve.append(
            {
                "members": (f"exit {e + 1}",),
                "flops": int(cost + compose_cost),
                "accuracy": accuracy(scores, labels),
                "nll": nll(scores, labels),
            }
        )
    return curve


def is_chain(curve: Sequence[dict]) -> bool:
    """True when every entry's members extend the previous entry's (a prefix curve)."""
    members = [entry["members"] for entry in curve]
    steps = zip(members[:-1], members[1:], strict=True)
    return all(b[: len(a)] == a and len(b) == len(a) + 1 for a, b in steps)


def pareto_front(curve: Sequence[dict]) -> list[dict]:
    """Entries more accurate than every cheaper one, by increasing FLOPs."""
    front: list[dict] = []
    for entry in sorted(curve, key=lambda e: e["flops"]):
        if not front or entry["accuracy"] > front[-1]["accuracy"]:
            front.append(entry)
    return front


def anytime_figure(
    curves: Mapping[str, Sequence[dict]],
    path: str | Path,
    *,
    title: str = "Anytime prediction: ensemble accuracy against FLOPs",
) -> Path:
    """PNG of accuracy against total FLOPs (log scale), one line per `anytime_curve`.

    Points are labelled with their number of members. A prefix curve is drawn through all its
    points; a curve of all subsets shows every subset as a point and a line along its Pareto
    front (the best accuracy reachable within a FLOP count).
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for index, (label, curve) in enumerate(curves.items()):
        color = plt.get_cmap("tab10")(index % 10)
        line = curve if is_chain(curve) else pareto_front(curve)
        if line is not curve:
            ax.scatter(
                [e["flops"] for e in curve],
                [100 * e["accuracy"] for e in curve],
                color=color,
                alpha=0.35,
                s=18,
            )
        ax.plot(
            [e["flops"] for e in line],
            [100 * e["accuracy"] for e in line],
            marker="o",
            color=color,
            label=label,
        )
        for entry in curve:
            ax.annotate(
                str(len(entry["members"])),
                (entry["flops"], 100 * entry["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=color,
            )
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per evaluation (members + weight composition)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="points: number of members", fontsize=8, title_fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- comparison -----------------------------------------------------------------------------


def parameter_saving(params: int, reference: int) -> float:
    """Percent fewer parameters `params` has than `reference` (negative when it has more)."""
    return 100.0 * (1.0 - params / reference)


def _cell(value: Any, fmt: str, scale: float = 1) -> str:
    """`value * scale` formatted with `fmt`, or `-` when missing."""
    return "-" if value is None else format(scale * value, fmt)


def comparison_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table of ensembles side by side, and the first's parameter saving on the second.

    Args:
      rows: `{name: {"params", "accuracy", "nll", "diversity"}}`, e.g. an `ensemble_metrics`
        result plus `"params"`; missing entries show as `-`.
    """
    lines = [
        "| ensemble | parameters | accuracy (%) | NLL | diversity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        cells = [
            _cell(row.get("params"), ","),
            _cell(row.get("accuracy"), ".2f", scale=100),
            _cell(row.get("nll"), ".3f"),
            _cell(row.get("diversity"), ".3f"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = list(rows)
    if len(names) >= 2:
        first, second = names[:2]
        saving = parameter_saving(rows[first]["params"], rows[second]["params"])
        fewer = "fewer" if saving >= 0 else "more"
        lines.append("")
        lines.append(
            f"{first} uses {abs(saving):.1f}% {fewer} parameters than {second} "
            f"({rows[first]['params']:,} vs {rows[second]['params']:,})."
        )
    return "\n".join(lines)
