import csv
import dataclasses
import statistics
import warnings

import pytest

from experiments import ensemble_sweep, presets
from experiments.ensemble_sweep import FULL, EnsembleSweep, Result, markdown_table, run_config

TINY = presets.with_overrides(
    ensemble_sweep.SWEEPS["digits"].base,
    train_size=128,
    test_size=64,
    loop={"epochs": 2, "batch_size": 32},
    search={"search_epochs": 1, "gradient_batches": 2, "unshare_epoch": 1},
)
"""test_cli's ensemble beside the full one is this sweep's two arms: they share programs."""
MEMBERS = "wrn-16-1,wrn-10-1"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("ensembles")
    lines: list[str] = []
    # one seed: the spread over seeds is checked on results made by hand below
    config = EnsembleSweep(TINY, (("depths", MEMBERS),), budgets=("83%",), seeds=(0,))
    results = ensemble_sweep.run_ensemble_sweep(config, out, log=lines.append)
    return results, out, lines


def test_every_arm_and_seed_is_one_row(sweep):
    results, out, _ = sweep
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], r["seed"]) for r in rows] == [(FULL, "0"), ("83%", "0")]
    for row, result in zip(rows, results, strict=True):
        assert int(row["trainable_params"]) == result.trainable_params
        assert 0 <= result.accuracy <= 1 and result.nll > 0 and 0 <= result.diversity <= 1
        assert set(result.member_accuracy) == {"wrn-16-1", "wrn-10-1"}
        assert "wrn-16-1=" in row["member_accuracy"] and "wrn-10-1=" in row["member_accuracy"]


def test_the_superweight_arm_is_within_its_share_of_the_full_ensemble(sweep):
    results, _, _ = sweep
    full = {r.seed: r.trainable_params for r in results if r.arm == FULL}
    for r in results:
        if r.arm == "83%":
            assert r.trainable_params <= int(0.83 * full[r.seed])
            assert r.trainable_params > 0.8 * full[r.seed]
            # unsharing was planned, so it ran (it never lacks room) and is recorded
            assert r.unshare.endswith("vectors") and "skipped" not in r.unshare


def test_the_table_and_figure_are_written(sweep):
    results, out, lines = sweep
    table = (out / "results.md").read_text()
    assert table.startswith("| ensemble | arm | seeds | params | % of full | accuracy | NLL |")
    assert "| depths (wrn-16-1,wrn-10-1) | full ensemble | 1 |" in table
    assert "| depths (wrn-16-1,wrn-10-1) | SuperWeights 83% | 1 |" in table
    assert (out / "ensembles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert lines[0].startswith("[1/2] depths")
    assert lines[-1] == markdown_table(results)


def test_results_read_back_from_the_csv_and_merge(sweep, tmp_path):
    results, out, _ = sweep
    again = ensemble_sweep.read_results(out / "results.csv")
    assert [(r.arm, r.seed, r.trainable_params, r.unshare) for r in again] == [
        (r.arm, r.seed, r.trainable_params, r.unshare) for r in results
    ]
    for a, b in zip(again, results, strict=True):
        assert a.member_accuracy == b.member_accuracy
        assert (a.accuracy, a.nll, a.diversity) == (b.accuracy, b.nll, b.diversity)
    merged = tmp_path / "merged"
    assert (
        ensemble_sweep.main(["--from-csv", str(out / "results.csv"), "--output-dir", str(merged)])
        == 0
    )
    assert (merged / "results.md").read_text() == markdown_table(results) + "\n"
    assert (merged / "ensembles.png").exists()


def result(arm, seed, accuracy, params=100):
    return Result("e", "a,b", arm, seed, params, accuracy, 0.5, 0.1, {"a": accuracy}, "", 1.0)


def test_the_table_gives_mean_and_sample_spread():
    results = [result(FULL, s, a) for s, a in ((0, 0.9), (1, 0.8), (2, 0.7))]
    results += [result("60%", 0, 0.85, params=60)]
    table = markdown_table(results)
    spread = statistics.stdev([0.9, 0.8, 0.7])
    assert f"| 80.00 ± {100 * spread:.2f} |" in table
    assert "| SuperWeights 60% | 1 | 60 | 60.0% | 85.00 |" in table


def test_the_figure_of_the_full_arm_alone_is_drawn_without_a_legend_warning(tmp_path):
    # the sweep rewrites its figure after every run, the first time with no budgeted arm yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensemble_sweep.write_results([result(FULL, 0, 0.9)], tmp_path)
        ensemble_sweep.write_results([result(FULL, 0, 0.9), result("60%", 0, 0.85, 60)], tmp_path)
    assert (tmp_path / "ensembles.png").read_bytes()[:4] == b"\x89PNG"


def test_run_config_sets_the_arm_and_keeps_the_recipe():
    full = run_config(TINY, MEMBERS, FULL, 3)
    budgeted = run_config(TINY, MEMBERS, "60%", 3)
    assert full.dense and not budgeted.dense
    assert (budgeted.budget, budgeted.scope, budgeted.loop.seed) == ("60%", "model", 3)
    assert dataclasses.replace(full, dense=False, budget="60%") == budgeted


def test_the_no_search_arm_trains_the_budget_on_the_initial_clusters():
    args = ensemble_sweep.parse_args(["--preset", "digits", "--budgets", "83%", "--no-search-arm"])
    sweep = ensemble_sweep.sweep_from_args(args)
    assert sweep.arms == (FULL, "83%", "83% no search")
    searched = run_config(TINY, MEMBERS, "83%", 1)
    plain = run_config(TINY, MEMBERS, "83% no search", 1)
    assert searched.search.search and not plain.search.search
    assert plain.budget == "83%"
    assert dataclasses.replace(plain, search=searched.search) == searched
    without = ensemble_sweep.sweep_from_args(ensemble_sweep.parse_args(["--budgets", "83%"]))
    assert without.arms == (FULL, "83%")


def test_an_infeasible_budget_is_refused_before_training(tmp_path):
    config = EnsembleSweep(TINY, (("depths", MEMBERS),), budgets=("0.5%",), seeds=(0,))
    with pytest.raises(ensemble_sweep.BudgetError, match="below its minimum"):
        ensemble_sweep.run_ensemble_sweep(config, tmp_path, log=lambda _: None)
    assert not (tmp_path / "results.csv").exists()


def test_command_line_overrides():
    args = ensemble_sweep.parse_args(["--preset", "fashion", "--seeds", "4,5", "--epochs", "3"])
    sweep = ensemble_sweep.sweep_from_args(args)
    assert sweep.seeds == (4, 5) and sweep.base.loop.epochs == 3
    assert sweep.budgets == ("83%", "60%") and sweep.base.scope == "model"
    args = ensemble_sweep.parse_args(["--preset", "digits", "--ensembles", "equal"])
    assert [label for label, _ in ensemble_sweep.sweep_from_args(args).ensembles] == ["equal"]
    with pytest.raises(ValueError, match="unknown ensembles"):
        ensemble_sweep.sweep_from_args(ensemble_sweep.parse_args(["--ensembles", "none"]))
    with pytest.raises(ValueError, match="whole numbers"):
        ensemble_sweep.sweep_from_args(ensemble_sweep.parse_args(["--seeds", "a"]))
