import contextlib
import csv
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import augment
from experiments.checkpoint import Checkpoints
from experiments.cli import RunConfig, config_from_args, main, parse_args
from experiments.models import build_budgeted, create_members
from search import SearchResult
from superweights import Budget
from superweights.plan import Plan

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "wrn-10-1", "--train-size", "96", "--test-size", "48", "--batch-size", "32"]
TINY_EPOCHS = 2


def run(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def wrn10_minimum() -> int:
    """Smallest feasible banks budget of wrn-10-1 on 8x8x1 inputs with 4 bins."""
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    sample = jnp.zeros((1, 8, 8, 1))
    return build_budgeted(modules, Budget(fraction=1.0), sample).plan.minimum_budget


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budgeted")
    argv = ["train", *TINY, "--budget", "80%", "--epochs", str(TINY_EPOCHS), "--quiet"]
    code, stdout, stderr = run([*argv, "--output-dir", str(out)])
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    argv = ["train", *TINY, "--dense", "--epochs", "1", "--quiet", "--output-dir", str(out)]
    code, stdout, stderr = run(argv)
    return code, stdout, stderr, out, argv


# --- npas report ----------------------------------------------------------------------------


def test_report_prints_the_table_and_the_minimum_budget(capsys, wrn10_minimum):
    assert main(["report", "--arch", "wrn-10-1", "--image-shape", "8,8,1", "--budget", "80%"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrn-10-1 at budget 80.00% (banks scope)\n")
    assert "cluster  kernel  level  out x in" in out
    for cluster in ("c0", "c1", "c2", "c3"):
        assert f"\n     {cluster}" in out
    assert "total trainable" in out and "dense model (no sharing)" in out
    assert f"the smallest feasible budget is {wrn10_minimum:,}, and full-size" in out


def test_report_of_an_infeasible_budget_exits_2_with_the_minimum(capsys, wrn10_minimum):
    # 1% of wrn-10-1's shared kernels is below one smallest template per cluster and level.
    code = main(["report", "--arch", "wrn-10-1", "--image-shape", "8,8,1", "--budget", "1%"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("npas: error: ")
    assert f"minimum feasible {wrn10_minimum:,}" in captured.err


def test_report_at_the_minimum_budget_is_feasible(capsys, wrn10_minimum):
    argv = ["report", "--arch", "wrn-10-1", "--image-shape", "8,8,1"]
    assert main([*argv, "--budget", str(wrn10_minimum)]) == 0
    assert f"spent {wrn10_minimum:,} (100.00%)" in capsys.readouterr().out
    assert main([*argv, "--budget", str(wrn10_minimum - 1)]) == 2
    assert f"at least {wrn10_minimum:,}" in capsys.readouterr().err


def test_report_of_an_unknown_arch_exits_2_listing_names(capsys):
    assert main(["report", "--arch", "resnet-7", "--image-shape", "8,8,1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npas: error: Unknown model 'resnet-7'; available: ")
    for name in ("wrn-<depth>-<width>", "resnet-18", "resnet-50-imagenet", "vit-tiny"):
        assert name in err


def test_report_of_an_impossible_wrn_depth_exits_2(capsys):
    assert main(["report", "--arch", "wrn-11-1", "--image-shape", "8,8,1"]) == 2
    assert "depth must be 6n + 4" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["8,8", "8,8,1,1", "8,x,1", ""])
def test_report_with_a_bad_image_shape_exits_2(capsys, shape):
    assert main(["report", "--arch", "wrn-10-1", "--image-shape", shape]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("npas: error: ")


def test_report_explains_the_image_shape_format(capsys):
    assert main(["report", "--image-shape", "32,32"]) == 2
    assert "height,width,channels" in capsys.readouterr().err


def test_report_with_an_unreadable_budget_exits_2(capsys):
    assert main(["report", "--arch", "wrn-10-1", "--image-shape", "8,8,1", "--budget", "lots"]) == 2
    assert "cannot read budget 'lots'" in capsys.readouterr().err


def test_the_default_job_is_feasible(capsys):
    # `npas report` with the digits' image shape builds exactly the plan `npas train` would.
    assert main(["report", "--image-shape", "8,8,1"]) == 0
    assert f"{RunConfig.arch} at budget" in capsys.readouterr().out


# --- npas train -----------------------------------------------------------------------------


def test_train_writes_config_plan_report_metrics_and_summary(budgeted_run):
    code, stdout, stderr, out = budgeted_run
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "clusters.png",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "plan.json",
        "report.txt",
        "search.json",
        "search_checkpoints",
        "similarity.png",
        "summary.json",
    ]
    for figure in ("clusters.png", "similarity.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = SearchResult.from_json((out / "search.json").read_text())
    assert sorted(i for c in found.clusters for i in c.layers) == sorted(
        layer.id for layer in Plan.from_json((out / "plan.json").read_text()).layers
    )
    assert "search: tau" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "wrn-10-1" and config["budget"] == "80%"
    assert config["loop"]["epochs"] == TINY_EPOCHS and config["loop"]["batch_size"] == 32
    assert config["train_size"] == 96 and config["test_size"] == 48

    plan = Plan.from_json((out / "plan.json").read_text())
    assert plan.budget == Budget(fraction=0.8)
    assert plan.spent <= plan.budget_params
    assert "the smallest feasible budget is" in (out / "report.txt").read_text()

    lines = (out / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in epochs] == list(range(1, TINY_EPOCHS + 1))
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, TINY_EPOCHS + 1))
    assert float(rows[-1]["test_accuracy"]) == epochs[-1]["test_accuracy"]
    assert "test_accuracy" in epochs[-1]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == "wrn-10-1" and summary["dataset"] == "digits"
    assert summary["dense"] is False
    assert summary["budget"] == "80.00% (banks scope)"
    assert summary["trainable_params"] == plan.trainable_params
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["test_accuracy"] == epochs[-1]["test_accuracy"]
    assert summary["epoch"] == TINY_EPOCHS

    assert "wrn-10-1 at budget 80.00% (banks scope)" in stdout
    assert "training on digits: 96 train / 48 test images, 2 epochs" in stdout
    assert f"final test accuracy: {summary['test_accuracy']:.2%}" in stdout


def test_train_config_records_the_augmentation_used(budgeted_run):
    config = json.loads(budgeted_run[3].joinpath("config.json").read_text())
    assert config["loop"]["augmentation"] == dataclasses.asdict(augment.preset("digits"))


def test_train_dense_reports_its_trainable_params(dense_run):
    code, stdout, stderr, out, _ = dense_run
    assert code == 0, stderr
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    expected = build_budgeted(modules, Budget(fraction=1.0), jnp.zeros((1, 8, 8, 1)))
    dense_params = expected.plan.dense_params
    assert f"wrn-10-1 (dense, no sharing): {dense_params:,} trainable parameters" in stdout
    assert not (out / "plan.json").exists() and not (out / "report.txt").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense"] is True and summary["budget"] is None
    assert summary["trainable_params"] == dense_params
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_train_again_into_the_same_directory_keeps_one_line_per_epoch(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    assert run([*argv[:-1], str(out)])[0] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.fixture
def nothing_compiles(monkeypatch):
    """Fails the test if training gets as far as building its jitted steps."""

    def refuse(*args, **kwargs):
        raise AssertionError("the train or eval step was built before the config was refused")

    for name in ("make_train_step", "make_eval_step"):
        monkeypatch.setattr(f"experiments.train.{name}", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--bins", "0"], "--bins must be at least 1"),
        (["--eval-every", "-1"], "--eval-every must not be negative"),
        (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
        (["--lr", "0"], "--lr must be positive, got 0.0"),
        (["--tau", "1.5"], "--tau is a cosine similarity, in [-1, 1]; got 1.5"),
        (["--epochs", "2", "--search-epochs", "3"], "--search-epochs (3) must be at most"),
        (
            ["--epochs", "2", "--search-epochs", "1", "--unshare-epoch", "2"],
            "--unshare-epoch must be in [0, 1]",
        ),
        (["--compare-dense"], "--compare-dense needs a budgeted ensemble"),
        (["--arch", "wrn-10-1,"], "has an empty member name"),
        (["--arch", "wrn-11-1"], "depth must be 6n + 4"),
        (["--arch", "vgg-16"], "Unknown model 'vgg-16'; available: resnet-18"),
        (["--exits", "--arch", "resnet-18"], "--exits needs Wide ResNet members"),
        (["--budget=-5%"], "cannot read budget '-5%'"),
        (["--budget", "1%"], "below the minimum feasible 1,301"),
        (["--test-size", "1000"], "test_size must be in [0, 360], got 1000"),
        (["--dense", "--train-size", "16"], "batch size 32 exceeds the 16 training examples"),
        (["--coordinator", "localhost:1"], "needs --num-processes and --process-id"),
    ],
)
def test_train_with_bad_arguments_exits_2_before_compiling(capsys, nothing_compiles, args, message):
    assert main(["train", *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npas: error: ")
    assert message in err


def test_train_cifar10_without_data_exits_2_naming_what_is_expected(capsys, tmp_path):
    assert main(["train", "--dataset", "cifar10", "--quiet"]) == 2
    assert "cifar10 has no default location; pass data_dir" in capsys.readouterr().err

    missing = tmp_path / "cifar"
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npas: error: CIFAR-10: directory")
    assert str(missing) in err
    for name in ("data_batch_1", "data_batch_5", "test_batch", "cifar-10-batches-py"):
        assert name in err


def test_argparse_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as error:
        main(["train", "--dataset", "imagenet"])
    assert error.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err


def test_module_entry_point_prints_train_help():
    result = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "train", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: npas train")
    for flag in ("--arch", "--budget", "--dense", "--epochs", "--output-dir", "--quiet"):
        assert flag in result.stdout
    assert "wrn-<depth>-<width>" in result.stdout


# --- end to end -----------------------------------------------------------------------------

E2E_EPOCHS = 10  # the CLI default is 15; 10 keeps the pair near a minute on 2 CPU cores


def test_budgeted_digits_model_learns_and_keeps_up_with_the_dense_one(tmp_path):
    """The default job (search included) on the full digits set, at 25% and dense."""
    common = ["train", "--quiet", "--epochs", str(E2E_EPOCHS)]
    summaries = {}
    for name, extra in (("budgeted", []), ("dense", ["--dense"])):
        out = tmp_path / name
        code, _, stderr = run([*common, *extra, "--output-dir", str(out)])
        assert code == 0, stderr
        summaries[name] = json.loads((out / "summary.json").read_text())
    budgeted, dense = summaries["budgeted"], summaries["dense"]
    assert budgeted["arch"] == dense["arch"] == RunConfig.arch
    assert budgeted["budget"] == "25.00% (banks scope)"
    assert budgeted["trainable_params"] < 0.3 * dense["trainable_params"]
    accuracies = {name: s["test_accuracy"] for name, s in summaries.items()}
    assert accuracies["budgeted"] > 0.8, accuracies
    assert accuracies["dense"] > 0.8, accuracies
    assert accuracies["dense"] - accuracies["budgeted"] <= 0.05, accuracies


def test_an_ensemble_is_set_beside_the_fully_parameterized_one(tmp_path):
    out = tmp_path / "ensemble"
    argv = [
        "train",
        "--quiet",
        "--arch",
        "wrn-10-1,wrn-16-1",
        "--scope",
        "model",
        "--budget",
        "83%",
        "--train-size",
        "96",
        "--test-size",
        "48",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--search-epochs",
        "1",
        "--compare-dense",
        "--output-dir",
        str(out),
    ]
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    budgeted = json.loads((out / "summary.json").read_text())
    dense = json.loads((out / "dense" / "summary.json").read_text())
    assert (
        dense["dense"] is True
        and dense["trainable_params"] == budgeted["fully_parameterized_params"]
    )
    assert budgeted["trainable_params"] <= 0.83 * dense["trainable_params"]
    table = (out / "comparison.md").read_text()
    assert "| SuperWeight ensemble | " + f"{budgeted['trainable_params']:,}" in table
    assert "| fully-parameterized ensemble | " + f"{dense['trainable_params']:,}" in table
    saving = 100 * (1 - budgeted["trainable_params"] / dense["trainable_params"])
    assert f"uses {saving:.1f}% fewer parameters" in table
    assert 0 <= budgeted["diversity"] <= 1
    assert [e["members"] for e in budgeted["anytime"]][-1] == ["wrn-10-1", "wrn-16-1"]
    assert (out / "anytime.png").read_bytes()[:4] == b"\x89PNG"


def test_early_exits_get_an_anytime_curve_of_their_own(tmp_path):
    out = tmp_path / "exits"
    argv = [
        "train",
        "--quiet",
        *TINY,
        "--exits",
        "--budget",
        "80%",
        "--epochs",
        "1",
        "--search-epochs",
        "1",
        "--output-dir",
        str(out),
    ]
    code, stdout, stderr = run(argv)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["anytime_exits"]["wrn-10-1"]
    assert [e["members"] for e in curve] == [["exit 1"], ["exit 2"], ["exit 3"]]
    flops = [e["flops"] for e in curve]
    assert flops == sorted(flops) and len(set(flops)) == 3
    assert curve[-1]["accuracy"] == summary["test_accuracy"]
    assert "wrn-10-1, exit 1:" in stdout
    assert (out / "anytime.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "search_epochs"),
    [([], 3), (["--epochs", "2"], 2), (["--epochs", "2", "--search-epochs", "1"], 1)],
)
def test_the_default_search_phase_is_three_epochs_or_the_whole_run_if_shorter(args, search_epochs):
    config = config_from_args(parse_args(["train", *args]))
    assert config.search.search_epochs == search_epochs


def test_a_budgeted_run_checkpoints_every_n_epochs(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--budget", "80%", "--epochs", "4", "--search-epochs", "1"]
    code, _, stderr = run([*argv, "--checkpoint-every", "2", "--quiet", "--output-dir", str(out)])
    assert code == 0, stderr
    assert Checkpoints(out / "checkpoints").steps() == [6, 12]  # 3 steps an epoch
    assert Checkpoints(out / "search_checkpoints").steps() == [3]  # its end


def test_resuming_with_other_settings_is_refused_but_not_with_other_saving(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    code, _, stderr = run([*argv[:-1], str(out), "--lr", "0.05"])
    assert code == 2
    assert "holds checkpoints of a run with other settings (optim)" in stderr
    code, stdout, stderr = run([*argv[:-1], str(out), "--checkpoint-every", "2"])
    assert code == 0, stderr
    assert "resuming training from step" in stdout


def test_search_summary_says_why_thresholds_were_refused():
    from conftest import chain_specs

    from experiments.cli import search_summary
    from search import search_clusters, searched_plan
    from superweights import cluster_coefficients, initial_clusters, make_plan

    layers = chain_specs("net", [((3, 3), 8, 8)] * 2)
    clusters = initial_clusters(layers, 1)
    paper_only = make_plan(
        layers,
        [],
        clusters,
        cluster_coefficients(clusters, layers),
        Budget(params=600),
        sublayer_templates=0,
    )
    rng = np.random.default_rng(0)  # unrelated gradients: the first split needs 2 x 576
    grads = {x.id: rng.normal(size=x.shape) for x in layers}
    result = search_clusters(paper_only, grads)
    text = search_summary(result, searched_plan(paper_only, result))
    assert len(result.clusters) == 1 and result.refused
    assert f"{len(result.refused)} thresholds refused first; at tau 0.10: 2 clusters need" in text
    assert "1,152 parameters, over the budget of 600 (banks scope)" in text
