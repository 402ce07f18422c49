"""Accuracy against trainable parameters: SuperWeights and their baselines at several budgets.

python -m experiments.budget_sweep --preset small                 # digits, 2 CPU cores
python -m experiments.budget_sweep --preset small --seeds 0,1,2   # mean and spread
python -m experiments.budget_sweep --preset fashion               # Fashion-MNIST subset
python -m experiments.budget_sweep --preset cifar100 --data-dir ~/data/cifar-100-python

At every feasible budget it trains (a) the SuperWeight model with the gradient search,
(b) the same with the search comparing the layers' weights instead (`--similarity weights`),
(c) the same with the initial clusters only, (d) the same Wide ResNet at the width whose
parameter count is closest to (a)'s trainable parameters; and (e) the full model once
(method.md section 10); all of it once per seed (`--methods` picks some). All runs share the
base config's recipe. Writes `results.csv` (a row per run, rewritten after every run),
`results.md` (mean and spread over the seeds) and `accuracy_vs_params.png` to
`--output-dir`, and each run's own files under `runs/`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from flax import nnx  # noqa: E402

import archs  # noqa: E402
from archs.registry import WRN_PATTERN  # noqa: E402
from experiments import presets  # noqa: E402
from experiments.config import RunConfig, initial_plan  # noqa: E402
from experiments.data import DATA_SHAPES  # noqa: E402
from experiments.run import run_training  # noqa: E402
from superweights import Budget, BudgetError  # noqa: E402

METHODS = ("search", "search-weights", "no-search", "reduced-width", "full")
LABELS = {
    "search": "SuperWeights + search",
    "search-weights": "SuperWeights + search (weights)",
    "no-search": "SuperWeights, no search",
    "reduced-width": "reduced width",
    "full": "full model",
}
COLUMNS = (
    "method",
    "budget",
    "seed",
    "arch",
    "trainable_params",
    "test_accuracy",
    "seconds",
    "clusters",
)
NO_DATA_DIR = ("digits", "fashion_mnist")
"""Data sets found without `--data-dir` (embedded, or where Debian installs them)."""
WIDTH_STEP = 1 / 64
"""Grid of reduced widths: the 64k channels of the last stage change by one per step."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: one base run (its recipe shared by every run), the budgets and the seeds."""

    base: RunConfig
    budgets: tuple[str, ...] = ("2%", "5%", "10%", "25%", "50%")
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = METHODS


SWEEPS = {
    # WRN-28-1's smallest feasible budget is 0.83% (23.8% with full-size templates only):
    # 0.5% is there to show the skip.
    "small": SweepConfig(
        base=presets.get("digits-wrn-28-1-b25"),
        budgets=("0.5%", "2%", "5%", "10%", "25%"),
    ),
    # Fashion-MNIST (6,000 / 2,000 images): a test set where one image is 0.05 points.
    # WRN-16-1's full-size templates need 29.1%; below it the templates are sub-layer.
    "fashion": SweepConfig(
        base=presets.get("fashion_mnist-wrn-16-1-b50"),
        budgets=("2%", "5%", "10%", "25%", "30%", "50%"),
    ),
    # WRN-28-10 at SSN's low budgets and the paper's (full-size templates from 23.9%).
    "cifar100": SweepConfig(
        base=presets.get("cifar100-wrn-28-10-b25"),
        budgets=("1%", "2%", "5%", "10%", "15%", "25%", "50%"),
    ),
}


@dataclasses.dataclass(frozen=True)
class Result:
    """One trained model's row of the results table."""

    method: str
    budget: str | None
    seed: int
    arch: str
    trainable_params: int
    test_accuracy: float
    seconds: float
    clusters: int = 0


# --- budgets and the reduced-width baseline ---------------------------------------------------


def feasible_budgets(base: RunConfig, budgets: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(budgets the model can meet, a note for each one it cannot)`."""
    minimum, full = presets.minimum_budget(base)
    kept, notes = [], []
    for budget in budgets:
        if Budget.parse(budget, base.scope).resolve(full) >= minimum:
            kept.append(budget)
            continue
        notes.append(
            f"skipped budget {budget}: below {base.arch}'s smallest feasible budget "
            f"{minimum:,} = {minimum / full:.2%} ({base.scope} scope) with {base.bins} bins"
        )
    return kept, notes


@functools.cache
def wrn_params(depth: int, width: float, *, num_classes: int, in_channels: int) -> int:
    """Trainable parameters of `wrn-<depth>-<width>`, from abstract shapes."""
    model = nnx.eval_shape(
        lambda: archs.create(
            f"wrn-{depth}-1",
            width=width,
            num_classes=num_classes,
            in_channels=in_channels,
            rngs=nnx.Rngs(0),
        )
    )
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


def closest_width(
    param_count: Callable[[float], int], target: int, widths: Sequence[float]
) -> float:
    """The width among sorted `widths` whose `param_count` is closest to `target`.

    `param_count` must increase with the width; it is bisected, so called O(log n) times.
    Ties go to the smaller width.
    """
    count = functools.cache(param_count)
    lo, hi = 0, len(widths) - 1
    while lo < hi:  # the first width with count >= target (or the last one)
        mid = (lo + hi) // 2
        if count(widths[mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo == 0:
        return widths[0]
    below, above = widths[lo - 1], widths[lo]
    return below if target - count(below) <= abs(count(above) - target) else above


def width_name(depth: int, width: float) -> str:
    """`wrn-28-1` for an integral width, `wrn-28-0.4375` otherwise."""
    text = str(int(width)) if float(width).is_integer() else repr(float(width))
    return f"wrn-{depth}-{text}"


def reduced_width_arch(arch: str, target: int, *, num_classes: int, in_channels: int) -> str:
    """The `wrn-D-k` (k on a 1/64 grid, at most `arch`'s own width) closest to `target` params."""
    match = WRN_PATTERN.fullmatch(arch)
    if not match:
        raise ValueError(f"the reduced-width baseline needs a Wide ResNet (wrn-D-K); got {arch!r}")
    depth, full_width = int(match[1]), float(match[2])
    widths = [n * WIDTH_STEP for n in range(1, round(full_width / WIDTH_STEP) + 1)]
    count = functools.partial(wrn_params, depth, num_classes=num_classes, in_channels=in_channels)
    return width_name(depth, closest_width(count, target, widths))


# --- the runs ----------------------------------------------------------------------------------


def budget_slug(budget: str) -> str:
    """`"15%"` -> `"b15"`, `"1.5M"` -> `"b1.5M"`: a folder name."""
    return "b" + re.sub(r"[^0-9A-Za-z.]", "", budget)


def method_config(
    base: RunConfig, method: str, budget: str | None, arch: str, seed: int | None = None
) -> RunConfig:
    """`base` set up for one method and seed; only the model, budget and seed change."""
    if seed is not None:
        base = dataclasses.replace(base, loop=dataclasses.replace(base.loop, seed=seed))
    if method in ("search", "search-weights", "no-search"):
        similarity = "weights" if method == "search-weights" else "gradients"
        search = dataclasses.replace(
            base.search, search=method != "no-search", similarity=similarity
        )
        return dataclasses.replace(base, arch=arch, budget=budget, dense=False, search=search)
    return dataclasses.replace(base, arch=arch, dense=True)


def run_sweep(
    sweep: SweepConfig,
    output_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    verbose: bool = False,
    keep_runs: bool = True,
) -> list[Result]:
    """Trains every method at every feasible budget, then the full model, once per seed;
    writes the results.

    The reduced-width baseline's width is chosen once per budget, from the first seed's
    searched model. With `keep_runs`, each run's own files (plan, metrics, figures) go to
    `runs/<method-budget-seed>`.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = sweep.base
    shape, num_classes = DATA_SHAPES[base.dataset]
    budgets, notes = feasible_budgets(base, sweep.budgets)
    for note in notes:
        log(note)
    if not budgets:
        raise BudgetError(f"no budget of {list(sweep.budgets)} is feasible for {base.arch}")
    seeds = tuple(sweep.seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    methods = [m for m in METHODS if m in sweep.methods]
    unknown = set(sweep.methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"methods are among {', '.join(METHODS)}; got {list(sweep.methods)}")
    budgeted = [m for m in methods if m != "full"]
    total = (len(budgeted) * len(budgets) + ("full" in methods)) * len(seeds)
    results: list[Result] = []

    def run(method: str, budget: str | None, arch: str, seed: int) -> Result:
        name = method if budget is None else f"{method}-{budget_slug(budget)}"
        name += f"-s{seed}" if len(seeds) > 1 else ""
        config = method_config(base, method, budget, arch, seed)
        run_dir = str(out / "runs" / name) if keep_runs else None
        config = dataclasses.replace(config, output_dir=run_dir)
        seed_text = f", seed {seed}" if len(seeds) > 1 else ""
        log(
            f"[{len(results) + 1}/{total}] {LABELS[method]}, {arch}, "
            f"budget {budget or '-'}{seed_text}"
        )
        start = time.perf_counter()
        summary = run_training(config, progress=verbose, log=log if verbose else _silent)
        result = Result(
            method,
            budget,
            seed,
            arch,
            summary["trainable_params"],
            summary["test_accuracy"],
            time.perf_counter() - start,
            summary.get("clusters", 0),
        )
        log(
            f"    {result.trainable_params:,} trainable params, test accuracy "
            f"{result.test_accuracy:.2%} ({result.seconds:.0f}s)"
        )
        results.append(result)
        (out / "results.csv").write_text(results_csv(results))
        return result

    for budget in budgets:
        reduced = None
        for seed in seeds:
            trained = [run(m, budget, base.arch, seed) for m in budgeted if m != "reduced-width"]
            if "reduced-width" in methods:
                target = trained[0].trainable_params if trained else None
                reduced = reduced or reduced_width_arch(
                    base.arch,
                    target or initial_plan(base, Budget.parse(budget, base.scope)).trainable_params,
                    num_classes=num_classes,
                    in_channels=shape[2],
                )
                run("reduced-width", budget, reduced, seed)
    if "full" in methods:
        for seed in seeds:
            run("full", None, base.arch, seed)
    write_results(results, notes, out)
    log(markdown_table(results))
    return results


def _silent(_: str) -> None:
    pass


# --- outputs -----------------------------------------------------------------------------------


def results_csv(results: Sequence[Result]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        row = dataclasses.asdict(result)
        writer.writerow(row | {"budget": result.budget or "", "seconds": f"{result.seconds:.1f}"})
    return buffer.getvalue()


def read_results(path: str | Path) -> list[Result]:
    """The rows of a `results.csv` written by `results_csv`, back as `Result`s."""
    with Path(path).open() as f:
        return [
            Result(
                row["method"],
                row["budget"] or None,
                int(row["seed"]),
                row["arch"],
                int(row["trainable_params"]),
                float(row["test_accuracy"]),
                float(row["seconds"]),
                int(row.get("clusters") or 0),
            )
            for row in csv.DictReader(f)
        ]


def method_label(result: Result) -> str:
    if result.method in ("reduced-width", "full"):
        return f"{LABELS[result.method]} ({result.arch})"
    return LABELS[result.method]


@dataclasses.dataclass(frozen=True)
class Row:
    """The runs of one method at one budget, over the seeds."""

    runs: tuple[Result, ...]

    @property
    def first(self) -> Result:
        return self.runs[0]

    @property
    def trainable_params(self) -> int:
        """The mean over the seeds (the search may find other clusters per seed)."""
        return round(statistics.fmean(r.trainable_params for r in self.runs))

    @property
    def accuracy(self) -> float:
        return statistics.fmean(r.test_accuracy for r in self.runs)

    @property
    def spread(self) -> float:
        """Sample standard deviation of the accuracy over the seeds (0 for one seed)."""
        if len(self.runs) < 2:
            return 0.0
        return statistics.stdev(r.test_accuracy for r in self.runs)


def rows(results: Sequence[Result]) -> list[Row]:
    """Results grouped by (method, budget, arch), in order of first appearance."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.method, r.budget, r.arch), []).append(r)
    return [Row(tuple(runs)) for runs in groups.values()]


def markdown_table(results: Sequence[Result]) -> str:
    """| method | budget | trainable params | test accuracy | clusters |: per method and budget,
    the mean accuracy, `± std` over the seeds where there are several, and each seed's number
    of clusters in the final model."""
    lines = [
        "| method | budget | trainable params | test accuracy | clusters |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows(results):
        accuracy = f"{row.accuracy:.2%}"
        if len(row.runs) > 1:
            accuracy += f" ± {row.spread:.2%}"
        dense = row.first.method in ("reduced-width", "full")
        clusters = "-" if dense else "/".join(str(r.clusters) for r in row.runs)
        lines.append(
            f"| {method_label(row.first)} | {row.first.budget or '-'} | "
            f"{row.trainable_params:,} | {accuracy} | {clusters} |"
        )
    return "\n".join(lines)


def accuracy_figure(results: Sequence[Result], path: str | Path) -> Path:
    """Test accuracy against trainable parameters (log x): one line per method, the full
    model as a point and a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    grouped = rows(results)
    for method in METHODS[:-1]:  # every method but the full model, which is one point
        line = sorted((r for r in grouped if r.first.method == method), key=_params)
        if line:
            ax.errorbar(
                [r.trainable_params for r in line],
                [100 * r.accuracy for r in line],
                yerr=[100 * r.spread for r in line],
                marker="o",
                capsize=3,
                label=LABELS[method],
            )
    for r in grouped:
        if r.first.method == "full":
            ax.axhline(100 * r.accuracy, color="black", linestyle="--", linewidth=0.8)
            ax.plot(r.trainable_params, 100 * r.accuracy, "k*", markersize=10)
            ax.plot([], [], "k*--", label=f"{LABELS['full']} ({r.first.arch})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _params(row: Row) -> int:
    return row.trainable_params


def write_results(results: Sequence[Result], notes: Sequence[str], out: Path) -> None:
    """`results.csv`, `results.md` (the table, then the notes) and `accuracy_vs_params.png`."""
    (out / "results.csv").write_text(results_csv(results))
    text = markdown_table(results) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (out / "results.md").write_text(text)
    accuracy_figure(results, out / "accuracy_vs_params.png")


# --- command line ------------------------------------------------------------------------------


def sweep_parser(
    prog: str, description: str, choices: Sequence[str], default: str, output: str, budgets: str
) -> argparse.ArgumentParser:
    """The options every sweep script takes: preset, output, budgets, seeds, epochs, verbose,
    and `--from-csv` to merge earlier results."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default=default, choices=sorted(choices))
    parser.add_argument("--output-dir", default=None, help=f"default: {output}")
    parser.add_argument("--budgets", default=None, help=f"comma-separated, e.g. {budgets}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument("--verbose", action="store_true", help="every run's own log")
    parser.add_argument(
        "--from-csv",
        nargs="+",
        default=None,
        metavar="CSV",
        help="train nothing: write the table and figure of these results.csv files together",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = sweep_parser(
        "python -m experiments.budget_sweep",
        __doc__.splitlines()[0],
        SWEEPS,
        "small",
        "runs/budget-sweep-<preset>",
        "15%%,25%%",
    )
    parser.add_argument("--data-dir", default=None, help="the data set's files (CIFAR)")
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated among {','.join(METHODS)} (default all)"
    )
    return parser.parse_args(argv)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`"0,1,2"` -> `(0, 1, 2)`; a clear error for anything else."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds takes whole numbers like 0,1,2; got {text!r}") from None


def sweep_from_args(args: argparse.Namespace) -> SweepConfig:
    sweep = SWEEPS[args.preset]
    base = sweep.base
    if args.data_dir is not None:
        base = presets.with_overrides(base, data_dir=args.data_dir)
    if args.epochs is not None:
        base = presets.with_overrides(base, loop={"epochs": args.epochs})
    if base.data_dir is None and base.dataset not in NO_DATA_DIR:
        raise ValueError(f"--preset {args.preset} trains on {base.dataset}: pass --data-dir")
    budgets = sweep.budgets
    if args.budgets:
        budgets = tuple(b.strip() for b in args.budgets.split(","))
    seeds = parse_seeds(args.seeds) if args.seeds else sweep.seeds
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHODS
    return SweepConfig(base=base, budgets=budgets, seeds=seeds, methods=methods)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir or f"runs/budget-sweep-{args.preset}"
    start = time.perf_counter()
    try:
        if args.from_csv:
            results = [r for path in args.from_csv for r in read_results(path)]
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            write_results(results, [], Path(output_dir))
            print(markdown_table(results))
        else:
            run_sweep(sweep_from_args(args), output_dir, verbose=args.verbose)
    except (BudgetError, ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"budget_sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output_dir}/results.csv, results.md, accuracy_vs_params.png")
    print(f"sweep wall time: {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
