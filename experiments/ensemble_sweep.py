"""SuperWeight ensembles against the fully-parameterized ensemble of the same members.

python -m experiments.ensemble_sweep --preset fashion --seeds 0,1,2   # Fashion-MNIST subset
python -m experiments.ensemble_sweep --preset digits --seeds 0,1,2    # embedded digits

For every ensemble (members of different depths from one bank, and equal members) and seed it
trains the fully-parameterized ensemble, then SuperWeight ensembles of the same members with
the search and unsharing at each budget (model scope: a share of the full ensemble's
trainable parameters, 83% and 60% by default), and with `--no-search-arm` the same budgets
on the initial clusters, without the search. Every run has the base config's recipe.
Writes `results.csv` (a row per run), `results.md` (mean ± spread over the seeds: ensemble
accuracy, NLL, diversity and each member's accuracy) and `ensembles.png` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import presets  # noqa: E402
from experiments.budget_sweep import (  # noqa: E402
    NO_DATA_DIR,
    budget_slug,
    parse_seeds,
    sweep_parser,
)
from experiments.config import RunConfig  # noqa: E402
from experiments.run import run_training  # noqa: E402
from superweights import BudgetError  # noqa: E402

FULL = "full"
"""The arm of the fully-parameterized ensemble (no budget)."""
NO_SEARCH = " no search"
"""Suffix of an arm that trains the budget on the initial clusters (`"83% no search"`)."""
METRICS = ("accuracy", "nll", "diversity")


@dataclasses.dataclass(frozen=True)
class EnsembleSweep:
    """Ensembles (`(label, comma-separated members)`), budgets and seeds on one recipe."""

    base: RunConfig
    ensembles: tuple[tuple[str, str], ...]
    budgets: tuple[str, ...] = ("83%", "60%")
    seeds: tuple[int, ...] = (0, 1, 2)
    no_search: bool = False

    @property
    def arms(self) -> tuple[str, ...]:
        """The full ensemble, each budget, and each budget without the search if asked."""
        plain = tuple(f"{b}{NO_SEARCH}" for b in self.budgets) if self.no_search else ()
        return (FULL, *self.budgets, *plain)


def _ensemble_base(name: str) -> RunConfig:
    return presets.with_overrides(presets.get(name), scope="model", compare_dense=False)


SWEEPS = {
    # Fashion-MNIST, 3,000 training and 2,000 test images (one image is 0.05 points),
    # 10 epochs: about an hour for the whole sweep on 2 CPU cores.
    "fashion": EnsembleSweep(
        base=presets.with_overrides(
            _ensemble_base("fashion_mnist-ensemble"), train_size=3000, loop={"epochs": 10}
        ),
        ensembles=(
            ("depths", "wrn-16-1,wrn-10-1"),
            ("equal", "wrn-10-1,wrn-10-1,wrn-10-1"),
        ),
    ),
    # the embedded digits (1,437 / 360 images), 15 epochs
    "digits": EnsembleSweep(
        base=_ensemble_base("digits-ensemble"),
        ensembles=(
            ("depths", "wrn-16-1,wrn-10-1"),
            ("equal", "wrn-10-1,wrn-10-1,wrn-10-1"),
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Result:
    """One trained ensemble: its arm (a budget, or `FULL`) and what it scored on the test set."""

    ensemble: str
    members: str
    arm: str
    seed: int
    trainable_params: int
    accuracy: float
    nll: float
    diversity: float
    member_accuracy: dict[str, float]
    unshare: str
    seconds: float


def run_config(base: RunConfig, members: str, arm: str, seed: int) -> RunConfig:
    """`base` for one arm: the full ensemble (`dense`) or a budgeted one at `arm`, searched
    unless the arm ends in `NO_SEARCH`."""
    loop = dataclasses.replace(base.loop, seed=seed)
    if arm == FULL:
        return dataclasses.replace(base, arch=members, dense=True, loop=loop)
    searched = not arm.endswith(NO_SEARCH)
    search = dataclasses.replace(base.search, search=searched)
    budget = arm.removesuffix(NO_SEARCH)
    return dataclasses.replace(
        base, arch=members, budget=budget, dense=False, loop=loop, search=search
    )


def unshare_text(record: dict | None) -> str:
    """What unsharing did in a run, in a few words ('' where it was not planned)."""
    if not record:
        return ""
    if "skipped" in record:
        return "skipped"
    return f"{record['vectors_before']} -> {record['vectors_after']} vectors"


def run_ensemble_sweep(
    sweep: EnsembleSweep,
    output_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    verbose: bool = False,
) -> list[Result]:
    """Trains every arm of every ensemble once per seed; writes the results as they come."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not sweep.seeds:
        raise ValueError("give at least one seed")
    for budget in sweep.budgets:  # refuse a bad budget before anything trains
        for _, members in sweep.ensembles:
            minimum_budget_check(run_config(sweep.base, members, budget, sweep.seeds[0]))
    arms = sweep.arms
    total = len(sweep.ensembles) * len(arms) * len(sweep.seeds)
    results: list[Result] = []
    for label, members in sweep.ensembles:
        for seed in sweep.seeds:
            for arm in arms:
                slug = FULL if arm == FULL else budget_slug(arm.removesuffix(NO_SEARCH))
                slug += "-no-search" if arm.endswith(NO_SEARCH) else ""
                name = f"{label}-{slug}-s{seed}"
                log(f"[{len(results) + 1}/{total}] {label} ({members}), {arm}, seed {seed}")
                config = run_config(sweep.base, members, arm, seed)
                config = dataclasses.replace(config, output_dir=str(out / "runs" / name))
                start = time.perf_counter()
                summary = run_training(config, progress=verbose, log=log if verbose else _silent)
                result = Result(
                    label,
                    members,
                    arm,
                    seed,
                    summary["trainable_params"],
                    summary["test_accuracy"],
                    summary["ensemble_nll"],
                    summary["diversity"],
                    summary["member_accuracy"],
                    unshare_text(summary.get("unshare")),
                    time.perf_counter() - start,
                )
                results.append(result)
                log(
                    f"    {result.trainable_params:,} params, accuracy {result.accuracy:.2%}, "
                    f"NLL {result.nll:.3f}, diversity {result.diversity:.3f}"
                    + (f", unsharing {result.unshare}" if result.unshare else "")
                    + f" ({result.seconds:.0f}s)"
                )
                write_results(results, out)
    log(markdown_table(results))
    return results


def minimum_budget_check(config: RunConfig) -> None:
    params, minimum = presets.budget_params(config)
    if params < minimum:
        raise BudgetError(
            f"{config.arch} at {config.budget} ({config.scope} scope) is {params:,} parameters, "
            f"below its minimum of {minimum:,}"
        )


def _silent(_: str) -> None:
    pass


# --- outputs -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
    """The runs of one ensemble at one arm, over the seeds."""

    runs: tuple[Result, ...]

    @property
    def first(self) -> Result:
        return self.runs[0]

    def mean(self, field: str) -> float:
        return statistics.fmean(getattr(r, field) for r in self.runs)

    def spread(self, field: str) -> float:
        """Sample standard deviation over the seeds (0 for one seed)."""
        if len(self.runs) < 2:
            return 0.0
        return statistics.stdev(getattr(r, field) for r in self.runs)

    def member_accuracy(self, member: str) -> tuple[float, float]:
        values = [r.member_accuracy[member] for r in self.runs]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def arms(results: Sequence[Result]) -> list[Arm]:
    """Results grouped by (ensemble, arm), in order of first appearance."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.ensemble, r.arm), []).append(r)
    return [Arm(tuple(runs)) for runs in groups.values()]


def results_csv(results: Sequence[Result]) -> str:
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(Result)]
    writer = csv.DictWriter(buffer, fields, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = dataclasses.asdict(r)
        row["member_accuracy"] = ";".join(f"{m}={a}" for m, a in r.member_accuracy.items())
        row["seconds"] = f"{r.seconds:.1f}"
        writer.writerow(row)
    return buffer.getvalue()


def read_results(path: str | Path) -> list[Result]:
    """The rows of a `results.csv` written by `results_csv`, back as `Result`s."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(f))
    results = []
    for row in rows:
        members = dict(part.split("=") for part in row["member_accuracy"].split(";") if part)
        results.append(
            Result(
                row["ensemble"],
                row["members"],
                row["arm"],
                int(row["seed"]),
                int(row["trainable_params"]),
                float(row["accuracy"]),
                float(row["nll"]),
                float(row["diversity"]),
                {m: float(a) for m, a in members.items()},
                row["unshare"],
                float(row["seconds"]),
            )
        )
    return results


def _mean_spread(value: float, spread: float, runs: int, percent: bool) -> str:
    text = f"{100 * value:.2f}" if percent else f"{value:.3f}"
    if runs > 1:
        text += f" ± {100 * spread:.2f}" if percent else f" ± {spread:.3f}"
    return text


def markdown_table(results: Sequence[Result]) -> str:
    """Per ensemble and arm: parameters (and % of the full ensemble), ensemble accuracy (%),
    NLL, diversity and member accuracies (%), as mean ± sample std over the seeds."""
    lines = [
        "| ensemble | arm | seeds | params | % of full | accuracy | NLL | diversity | "
        "members' accuracy | unsharing |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    grouped = arms(results)
    full = {a.first.ensemble: a.mean("trainable_params") for a in grouped if a.first.arm == FULL}
    for arm in grouped:
        r, n = arm.first, len(arm.runs)
        params = arm.mean("trainable_params")
        share = f"{params / full[r.ensemble]:.1%}" if r.ensemble in full else "-"
        members = ", ".join(
            f"{m} {_mean_spread(*arm.member_accuracy(m), n, percent=True)}"
            for m in r.member_accuracy
        )
        unsharing = "; ".join(sorted({x.unshare for x in arm.runs if x.unshare})) or "-"
        label = "full ensemble" if r.arm == FULL else f"SuperWeights {r.arm}"
        lines.append(
            f"| {r.ensemble} ({r.members}) | {label} | {n} | {round(params):,} | {share} | "
            f"{_mean_spread(arm.mean('accuracy'), arm.spread('accuracy'), n, True)} | "
            f"{_mean_spread(arm.mean('nll'), arm.spread('nll'), n, False)} | "
            f"{_mean_spread(arm.mean('diversity'), arm.spread('diversity'), n, False)} | "
            f"{members} | {unsharing} |"
        )
    return "\n".join(lines)


def ensembles_figure(results: Sequence[Result], path: str | Path) -> Path:
    """Accuracy, NLL and diversity against the share of the full ensemble's parameters:
    one line per ensemble, mean ± spread over the seeds."""
    grouped = arms(results)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    titles = {"accuracy": "test accuracy (%)", "nll": "test NLL", "diversity": "diversity"}
    for label in dict.fromkeys(a.first.ensemble for a in grouped):
        ensemble = [a for a in grouped if a.first.ensemble == label]
        full = next((a for a in ensemble if a.first.arm == FULL), None)
        if full is None:
            continue
        plain = [a for a in ensemble if a.first.arm.endswith(NO_SEARCH)]
        searched = [a for a in ensemble if a not in plain]
        for line, suffix in ((searched, ""), (plain + [full], ", no search")):
            if len(line) < 2:
                continue
            line.sort(key=lambda a: a.mean("trainable_params"))
            shares = [
                100 * a.mean("trainable_params") / full.mean("trainable_params") for a in line
            ]
            for ax, metric in zip(axes, METRICS, strict=True):
                scale = 100 if metric == "accuracy" else 1
                ax.errorbar(
                    shares,
                    [scale * a.mean(metric) for a in line],
                    yerr=[scale * a.spread(metric) for a in line],
                    marker="o" if not suffix else "s",
                    linestyle="-" if not suffix else "--",
                    capsize=3,
                    label=f"{label} ({line[0].first.members}){suffix}",
                )
    for ax, metric in zip(axes, METRICS, strict=True):
        ax.set_xlabel("parameters (% of the fully-parameterized ensemble)")
        ax.set_title(titles[metric])
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # no line yet while the first arms run
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_results(results: Sequence[Result], out: Path) -> None:
    """`results.csv`, `results.md` and `ensembles.png` under `out`."""
    (out / "results.csv").write_text(results_csv(results))
    (out / "results.md").write_text(markdown_table(results) + "\n")
    ensembles_figure(results, out / "ensembles.png")


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(
        "python -m experiments.ensemble_sweep",
        __doc__.splitlines()[0],
        SWEEPS,
        "fashion",
        "runs/ensemble-<preset>",
        "83%%,60%%",
    )
    parser.add_argument(
        "--ensembles", default=None, help="comma-separated labels of the preset's ensembles"
    )
    parser.add_argument(
        "--no-search-arm",
        action="store_true",
        help="train every budget on the initial clusters too (the no-search baseline)",
    )
    return parser.parse_args(argv)


def sweep_from_args(args: argparse.Namespace) -> EnsembleSweep:
    sweep = SWEEPS[args.preset]
    base = sweep.base
    if args.epochs is not None:
        base = presets.with_overrides(base, loop={"epochs": args.epochs})
    if base.dataset not in NO_DATA_DIR:
        raise ValueError(f"--preset {args.preset} needs a data set found without --data-dir")
    budgets = sweep.budgets
    if args.budgets:
        budgets = tuple(b.strip() for b in args.budgets.split(","))
    seeds = parse_seeds(args.seeds) if args.seeds else sweep.seeds
    ensembles = sweep.ensembles
    if args.ensembles:
        wanted = [x.strip() for x in args.ensembles.split(",")]
        known = [label for label, _ in sweep.ensembles]
        unknown = [x for x in wanted if x not in known]
        if unknown:
            raise ValueError(f"unknown ensembles {unknown}; --preset {args.preset} has {known}")
        ensembles = tuple(e for e in sweep.ensembles if e[0] in wanted)
    return dataclasses.replace(
        sweep,
        base=base,
        budgets=budgets,
        seeds=seeds,
        ensembles=ensembles,
        no_search=args.no_search_arm,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir or f"runs/ensemble-{args.preset}"
    start = time.perf_counter()
    try:
        if args.from_csv:
            results = [r for path in args.from_csv for r in read_results(path)]
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_results(results, Path(output_dir))
            print(markdown_table(results))
        else:
            run_ensemble_sweep(sweep_from_args(args), output_dir, verbose=args.verbose)
    except (BudgetError, ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"ensemble_sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output_dir}/results.csv, results.md, ensembles.png")
    print(f"sweep wall time: {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
