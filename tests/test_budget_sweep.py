import csv
import dataclasses
import random

import pytest

from experiments import budget_sweep, presets
from experiments.budget_sweep import (
    COLUMNS,
    Result,
    SweepConfig,
    closest_width,
    feasible_budgets,
    method_config,
    reduced_width_arch,
    width_name,
    wrn_params,
)
from experiments.config import initial_plan
from superweights import Budget

# wrn-10-1 on digits: the smallest feasible banks budget is 1.70%, so 1% is skipped; 5% is
# below the full-size floor (66%). One trained budget keeps the sweep's end-to-end run short;
# the arms' configs at other budgets are checked without training below.
TINY = presets.with_overrides(
    presets.get("digits-wrn-28-1-b25"),
    arch="wrn-10-1",
    train_size=128,
    test_size=64,
    loop={"epochs": 1, "batch_size": 32},
    search={"search_epochs": 1, "gradient_batches": 2, "unshare_epoch": 0},
)
BUDGETS = ("1%", "5%")
EXPECTED_ROWS = [
    ("search", "5%"),
    ("search-weights", "5%"),
    ("no-search", "5%"),
    ("reduced-width", "5%"),
    ("full", ""),
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    lines: list[str] = []
    sweep = SweepConfig(TINY, BUDGETS)
    results = budget_sweep.run_sweep(sweep, out, log=lines.append, keep_runs=False)
    return results, out, lines


def digits_wrn_params(depth: int, width: float) -> int:
    return wrn_params(depth, width, num_classes=10, in_channels=1)


# --- the sweep ---------------------------------------------------------------------------------


def test_sweep_writes_the_csv_with_one_row_per_run(sweep):
    results, out, _ = sweep
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert [(r["method"], r["budget"]) for r in rows] == EXPECTED_ROWS
    for row, result in zip(rows, results, strict=True):
        assert int(row["trainable_params"]) == result.trainable_params > 0
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        assert float(row["seconds"]) > 0
    archs = [r["arch"] for r in rows]
    assert archs[:3] == ["wrn-10-1"] * 3 and archs[-1] == "wrn-10-1"
    assert archs[3].startswith("wrn-10-") and archs[3] != "wrn-10-1"  # reduced width


def test_sweep_budgets_and_baselines_have_the_expected_sizes(sweep):
    results, _, _ = sweep
    by_key = {(r.method, r.budget): r for r in results}
    full = by_key["full", None]
    assert full.trainable_params == digits_wrn_params(10, 1)
    for budget in ("5%",):
        searched = by_key["search", budget].trainable_params
        reduced = by_key["reduced-width", budget]
        assert reduced.trainable_params == digits_wrn_params(10, float(reduced.arch.split("-")[2]))
        width = float(reduced.arch.split("-")[2])  # the closest width on the 1/64 grid
        for neighbour in (width - 1 / 64, width + 1 / 64):
            gap = abs(digits_wrn_params(10, neighbour) - searched)
            assert abs(reduced.trainable_params - searched) <= gap
        assert searched < full.trainable_params


def test_sweep_writes_the_markdown_table_and_the_figure(sweep):
    results, out, lines = sweep
    text = (out / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| method | budget | trainable params | test accuracy | clusters |"
    assert len(table) == 2 + len(EXPECTED_ROWS)
    assert table[2].startswith("| SuperWeights + search | 5% | ")
    assert table[-1].startswith(f"| full model (wrn-10-1) | - | {results[-1].trainable_params:,} |")
    for line, result in zip(table[2:], results, strict=True):
        dense = result.method in ("reduced-width", "full")
        assert line.endswith(" | - |" if dense else f"% | {result.clusters} |")
        assert dense or result.clusters >= 1
    assert "\n".join(table) in "\n".join(lines)  # the table is printed too
    png = (out / "accuracy_vs_params.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (out / "runs").exists()  # keep_runs=False: no per-run files


def test_sweep_skips_infeasible_budgets_with_a_note(sweep):
    results, out, lines = sweep
    assert "1%" not in {r.budget for r in results}
    note = "skipped budget 1%: below wrn-10-1's smallest feasible budget 1,301 = 1.70%"
    assert lines[0].startswith(note)
    assert f"- {note}" in (out / "results.md").read_text()
    progress = [line for line in lines if line.startswith("[")]
    assert progress[0] == "[1/5] SuperWeights + search, wrn-10-1, budget 5%"
    assert progress[1] == "[2/5] SuperWeights + search (weights), wrn-10-1, budget 5%"
    assert progress[-1] == "[5/5] full model, wrn-10-1, budget -"


def brute_force_minimum(config) -> tuple[int, int]:
    """`(smallest feasible banks budget, shared kernels' size)` of `config`'s initial clusters,
    by brute force: each bank's cheapest single template over every size T, which costs
    T + groups * ceil(L / T) below full size and L at full size."""
    plan = initial_plan(config, Budget(fraction=1.0))
    minimum = sum(
        min(
            [b.piece_size]
            + [t + len(b.groups) * -(-b.piece_size // t) for t in range(1, b.piece_size)]
        )
        for b in plan.banks
    )
    return minimum, sum(layer.size for layer in plan.layers)


def test_feasible_budgets_keeps_the_order_and_notes_the_minimum():
    base = presets.get("digits-wrn-28-1-b25")
    kept, notes = feasible_budgets(base, ("2%", "0.5%", "5%", "0.1%", "200k"))
    assert kept == ["2%", "5%", "200k"]
    assert [n.split(":")[0] for n in notes] == ["skipped budget 0.5%", "skipped budget 0.1%"]
    minimum, size = brute_force_minimum(base)
    assert f"{minimum:,} = {minimum / size:.2%} (banks scope) with 4 bins" in notes[0]


def test_no_feasible_budget_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no budget"):
        budget_sweep.run_sweep(SweepConfig(TINY, ("1%",)), tmp_path, log=lambda _: None)


# --- the reduced-width solver ------------------------------------------------------------------


def test_closest_width_matches_brute_force_on_a_wrn_grid():
    widths = [n / 64 for n in range(1, 33)]  # the solver's grid for wrn-10-0.5
    counts = [digits_wrn_params(10, w) for w in widths]
    assert counts == sorted(set(counts))  # increasing, as the bisection needs
    calls = []

    def count(width: float) -> int:
        calls.append(width)
        return digits_wrn_params(10, width)

    for target in (1, 5_000, 12_345, 20_000, counts[-1] - 1, counts[-1], 10**7):
        best = min(range(len(widths)), key=lambda i: (abs(counts[i] - target), i))
        calls.clear()
        assert closest_width(count, target, widths) == widths[best]
        assert len(calls) <= 7  # bisection: O(log n) evaluations, cached
        arch = reduced_width_arch("wrn-10-0.5", target, num_classes=10, in_channels=1)
        assert arch == width_name(10, widths[best])


def test_closest_width_against_brute_force_on_random_increasing_counts():
    rng = random.Random(0)
    for _ in range(200):
        widths = sorted(rng.sample(range(1, 1000), rng.randint(1, 30)))
        table = dict(zip(widths, sorted(rng.sample(range(10**6), len(widths))), strict=True))
        target = rng.randint(-10, 10**6 + 10)
        best = min(widths, key=lambda w: (abs(table[w] - target), w))
        assert closest_width(table.__getitem__, target, widths) == best


def test_closest_width_breaks_ties_towards_the_smaller_width():
    assert closest_width(lambda w: 10 * w, 15, [1, 2, 3]) == 1


def test_reduced_width_is_never_wider_than_the_model():
    assert reduced_width_arch("wrn-16-2", 10**9, num_classes=10, in_channels=1) == "wrn-16-2"


def test_reduced_width_needs_a_wide_resnet():
    with pytest.raises(ValueError, match="Wide ResNet"):
        reduced_width_arch("resnet-18", 1000, num_classes=10, in_channels=3)
    with pytest.raises(ValueError, match="Wide ResNet"):
        reduced_width_arch("wrn-16-1,wrn-10-1", 1000, num_classes=10, in_channels=3)


@pytest.mark.parametrize(
    ("width", "name"), [(1, "wrn-28-1"), (10.0, "wrn-28-10"), (0.4375, "wrn-28-0.4375")]
)
def test_width_name(width, name):
    assert width_name(28, width) == name


# --- configs -----------------------------------------------------------------------------------


def test_every_method_keeps_the_base_recipe():
    base = presets.get("cifar100-wrn-28-10-b25")
    for method, budget, arch in [
        ("search", "15%", "wrn-28-10"),
        ("search-weights", "15%", "wrn-28-10"),
        ("no-search", "15%", "wrn-28-10"),
        ("reduced-width", "15%", "wrn-28-3.5"),
        ("full", None, "wrn-28-10"),
    ]:
        config = method_config(base, method, budget, arch)
        assert (config.loop, config.optim, config.dataset) == (base.loop, base.optim, base.dataset)
        assert config.arch == arch and config.dense == (method in ("reduced-width", "full"))
        if not config.dense:
            assert config.budget == budget and config.search.search == (method != "no-search")
            similarity = "weights" if method == "search-weights" else "gradients"
            assert config.search.similarity == similarity
            rest = dataclasses.replace(config.search, search=base.search.search)
            assert dataclasses.replace(rest, similarity=base.search.similarity) == base.search


def test_sweep_presets_and_command_line_overrides():
    assert budget_sweep.SWEEPS["small"].base.dataset == "digits"
    assert budget_sweep.SWEEPS["cifar100"].base == presets.get("cifar100-wrn-28-10-b25")
    args = budget_sweep.parse_args(
        ["--preset", "cifar100", "--data-dir", "/data", "--budgets", "15%, 50%", "--epochs", "2"]
    )
    sweep = budget_sweep.sweep_from_args(args)
    assert sweep.budgets == ("15%", "50%")
    assert sweep.base.data_dir == "/data" and sweep.base.loop.epochs == 2
    assert sweep.base.loop.batch_size == 128
    with pytest.raises(ValueError, match="--data-dir"):
        budget_sweep.sweep_from_args(budget_sweep.parse_args(["--preset", "cifar100"]))


def test_results_csv_leaves_the_full_models_budget_empty():
    text = budget_sweep.results_csv([Result("full", None, 3, "wrn-10-1", 7, 0.5, 1.25, 0)])
    assert text == "method,budget,seed,arch,trainable_params,test_accuracy,seconds,clusters\n" + (
        "full,,3,wrn-10-1,7,0.5,1.2,0\n"
    )


def test_the_table_gives_mean_and_spread_over_seeds():
    accuracies = (0.90, 0.92, 0.97)
    runs = [
        Result("search", "5%", s, "wrn-10-1", 100 + s, a, 1.0, 4 + s)
        for s, a in enumerate(accuracies)
    ]
    runs.append(Result("full", None, 0, "wrn-10-1", 900, 0.99, 1.0))
    table = budget_sweep.markdown_table(runs).splitlines()
    mean = sum(accuracies) / 3
    spread = (sum((a - mean) ** 2 for a in accuracies) / 2) ** 0.5
    assert table[2] == f"| SuperWeights + search | 5% | 101 | {mean:.2%} ± {spread:.2%} | 4/5/6 |"
    assert table[3] == "| full model (wrn-10-1) | - | 900 | 99.00% | - |"
    assert len(table) == 4


def test_results_read_back_from_csv_make_the_same_table(tmp_path):
    runs = [
        Result("search", "5%", 0, "wrn-10-1", 101, 0.9, 1.5, 6),
        Result("no-search", "5%", 0, "wrn-10-1", 101, 0.8, 1.5, 5),
        Result("full", None, 0, "wrn-10-1", 900, 0.99, 2.0, 0),
    ]
    path = tmp_path / "results.csv"
    path.write_text(budget_sweep.results_csv(runs))
    assert budget_sweep.read_results(path) == runs
    out = tmp_path / "merged"
    assert budget_sweep.main(["--from-csv", str(path), str(path), "--output-dir", str(out)]) == 0
    table = (out / "results.md").read_text().splitlines()
    assert table[2] == "| SuperWeights + search | 5% | 101 | 90.00% ± 0.00% | 6/6 |"


def test_seeds_from_the_command_line():
    args = budget_sweep.parse_args(["--preset", "small", "--seeds", "0,1,2"])
    assert budget_sweep.sweep_from_args(args).seeds == (0, 1, 2)
    assert budget_sweep.SWEEPS["small"].seeds == (0,)
    with pytest.raises(ValueError, match="--seeds"):
        budget_sweep.sweep_from_args(budget_sweep.parse_args(["--seeds", "0,x"]))
    config = method_config(presets.get("digits-wrn-28-1-b25"), "search", "5%", "wrn-28-1", 7)
    assert config.loop.seed == 7


def test_the_fashion_sweep_budgets_are_all_feasible():
    sweep = budget_sweep.SWEEPS["fashion"]
    assert sweep.base == presets.get("fashion_mnist-wrn-16-1-b50")
    kept, notes = budget_sweep.feasible_budgets(sweep.base, sweep.budgets)
    minimum, size = brute_force_minimum(sweep.base)
    assert kept == list(sweep.budgets) and notes == [] and minimum < 0.02 * size
    kept, notes = budget_sweep.feasible_budgets(sweep.base, ("1%", "2%"))
    assert kept == ["2%"] and f"{minimum:,} = {minimum / size:.2%}" in notes[0]
