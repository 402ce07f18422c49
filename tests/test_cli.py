import contextlib
import csv
import dataclasses
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_files, subprocess_env
from conftest import run_npas as run

from experiments import augment
from experiments.checkpoint import Checkpoints
from experiments.cli import config_from_args, main, parse_args
from experiments.config import RunConfig
from experiments.models import COMPUTE_DTYPES, build_budgeted, create_members
from experiments.rundir import LOCK, MARKER, lock_holder
from experiments.settings import DATASET_NAMES, DEFAULT_AUGMENTATION, DTYPES
from search import SearchResult
from superweights import Budget
from superweights.budget import SUBLAYER_TEMPLATES
from superweights.plan import Plan

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "wrn-10-1", "--train-size", "96", "--test-size", "48", "--batch-size", "32"]
TINY_EPOCHS = 4
BUDGETED = ["--budget", "80%", "--epochs", str(TINY_EPOCHS), "--search-epochs", "2"]
BUDGETED += ["--unshare-epoch", "1", "--checkpoint-every", "2"]
"""test_checkpoint's killed run's settings (it saves every 2 steps): the two share programs."""


@pytest.fixture(scope="module")
def wrn10_minimum() -> int:
    """Smallest feasible banks budget of wrn-10-1 on 8x8x1 inputs with 4 bins."""
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    sample = jnp.zeros((1, 8, 8, 1))
    return build_budgeted(modules, Budget(fraction=1.0), sample).plan.minimum_budget


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budgeted")
    argv = ["train", *TINY, *BUDGETED, "--quiet"]
    code, stdout, stderr = run([*argv, "--output-dir", str(out)])
    return code, stdout, stderr, out, argv


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
    code, stdout, stderr, out, _ = budgeted_run
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".npas-lock",
        ".npas-run",
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
    assert "training on digits: 96 train / 48 test images, 4 epochs" in stdout
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
    """Fails the test if a run gets as far as loading data or building its jitted steps."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded or a step built before the config was refused")

    for name in ("make_train_step", "make_eval_step"):
        monkeypatch.setattr(f"experiments.train.{name}", refuse)
    monkeypatch.setattr("experiments.run.load_dataset", refuse)


BAD_SETTINGS = [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--bins", "0"], "--bins must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must not be negative"),
    (["--checkpoint-steps", "-1"], "--checkpoint-steps must not be negative"),
    (["--sublayer-templates", "-1"], "--sublayer-templates must not be negative"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    (["--train-size", "0"], "--train-size must be at least 1, got 0"),
    (["--test-size", "0"], "--test-size must be at least 1, got 0"),
    (["--test-size", "1000"], "--test-size 1000 is more than the 360 images digits holds"),
    (["--dense", "--train-size", "16"], "--batch-size 32 exceeds the 16 training images"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--lr", "-0.1"], "--lr must be positive, got -0.1"),
    (["--lr", "inf"], "--lr must be a finite number (positive), got inf"),
    (["--lr", "nan"], "--lr must be a finite number (positive), got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--weight-decay=-1e-4"], "--weight-decay must be zero or more"),
    (["--similarity", "cosine"], "--similarity must be one of gradients, weights; got 'cosine'"),
    (["--tau", "1.5"], "--tau is a cosine similarity, in [-1, 1]; got 1.5"),
    (["--dtype", "float16"], "--dtype must be one of float32, bfloat16; got 'float16'"),
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
    (["--budget", "1%"], "below the minimum feasible 1,301"),
    (["--budget", "150%"], "above the model's own size"),
    (["--budget", "1e12"], "--dense"),
    (["--budget", "0%"], "is zero"),
    (["--budget", "0.0001k"], "is zero"),
    (["--budget=-5000"], "negative"),
    (["--budget=-5%"], "negative"),
    (["--budget", "1.5"], "ambiguous: write a percentage (150%) or a whole count (2)"),
    (["--budget", "lots"], "cannot read budget 'lots'"),
    (["--output-dir", "{file}"], "is a file, not a directory"),
    (["--output-dir", "{file}/run"], "which is a file"),
    (["--data-dir", "{file}"], "is a file, not a directory"),
    (["--data-dir", "{missing}"], "digits ships with scikit-learn and takes no data_dir"),
    (["--dataset", "mnist"], "mnist has no default location; pass --data-dir"),
    (["--dataset", "cifar100", "--data-dir", "{missing}"], "missing does not exist; expected"),
    (["--coordinator", "localhost:1"], "needs --num-processes and --process-id"),
    (["--output-dir", ""], "--output-dir is empty; give a directory name"),
    (["--output-dir", "{mine}"], "is not empty and holds no npas run (config.json, notes.txt)"),
    (["--output-dir", "{mine}/" + "x" * 300], "of 300 bytes; the file system takes names of at"),
    (["--dataset", "mnist", "--data-dir", "{no_pixels}"], "holds images of shape [0, 0]"),
]


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    """An IDX file: big-endian magic, one big-endian uint32 per dim, then the data."""
    return b"".join(x.to_bytes(4, "big") for x in (magic, *dims)) + payload


def user_folders(root: Path) -> dict[str, Path]:
    """A folder of the user's own files, and MNIST files whose images have no pixels."""
    mine, no_pixels = root / "mine", root / "no-pixels"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("my notes")
    no_pixels.mkdir()
    for split, n in (("train", 60), ("t10k", 10)):
        (no_pixels / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(0x803, (n, 0, 0)))
        labels = idx_bytes(0x801, (n,), bytes(n))
        (no_pixels / f"{split}-labels-idx1-ubyte").write_bytes(labels)
    return {"mine": mine, "no_pixels": no_pixels}


@pytest.mark.parametrize("args, message", BAD_SETTINGS)
def test_train_with_bad_arguments_exits_2_before_loading_or_compiling(
    capsys, nothing_compiles, tmp_path, args, message
):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    folders = user_folders(tmp_path)
    args = [a.format(file=file, missing=tmp_path / "missing", **folders) for a in args]
    assert main(["train", *TINY, *args]) == 2  # nothing_compiles: no data loaded, no step built
    err = capsys.readouterr().err
    assert err.startswith("npas: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert file.read_text() == "not a directory"
    assert sorted(p.name for p in folders["mine"].iterdir()) == ["config.json", "notes.txt"]
    assert (folders["mine"] / "config.json").read_text() == '{"mine": true}'


def test_a_refused_setting_changes_no_file_of_an_existing_run(capsys, nothing_compiles, dense_run):
    *_, out, argv = dense_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in (["--lr", "inf"], ["--test-size", "0"], ["--weight-decay", "nan"]):
        assert main([*argv, *bad]) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert capsys.readouterr().err.count("npas: error: ") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-classes", "0"], "--num-classes must be at least 2, got 0"),
        (["--num-classes", "1"], "--num-classes must be at least 2"),
        (["--image-shape", "32x32"], "--image-shape takes height,width,channels"),
        (["--image-shape", "0,8,1"], "positive whole numbers"),
        (["--budget", "150%"], "above the model's own size"),
        (["--bins", "0"], "--bins must be at least 1"),
    ],
)
def test_report_with_bad_arguments_exits_2_in_one_line(capsys, args, message):
    assert main(["report", "--arch", "wrn-10-1", "--image-shape", "8,8,1", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npas: error: ") and err.count("\n") == 1, err
    assert message in err


def test_train_cifar10_without_data_exits_2_naming_what_is_expected(capsys, tmp_path):
    assert main(["train", "--dataset", "cifar10", "--quiet"]) == 2
    assert "cifar10 has no default location; pass --data-dir" in capsys.readouterr().err

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
        timeout=600,  # catches a hang only
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: npas train")
    for flag in ("--arch", "--budget", "--dense", "--epochs", "--output-dir", "--quiet"):
        assert flag in result.stdout
    assert "wrn-<depth>-<width>" in result.stdout


HEAVY_MODULES = ("jax", "flax", "optax", "orbax", "sklearn", "numpy")

LIGHT_CALL = """
import sys
from experiments.cli import main
try:
    main(sys.argv[1:])
finally:
    print(sorted(name for name in {heavy} if name in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["train", "--help"], 0),
        (["report", "--help"], 0),
        (["train", "--epochs", "ten"], 2),
        (["train", "--dataset", "imagenet"], 2),
        (["report", "--scope", "layers"], 2),
    ],
)
def test_help_and_argument_errors_answer_before_jax_is_imported(argv, code):
    """What makes `--help` fast, asserted without a clock: nothing heavy is loaded."""
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_CALL.format(heavy=HEAVY_MODULES), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang only
    )
    assert result.returncode == code, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_help_names_every_registered_architecture():
    help_text = " ".join(help_text_of(["train", "--help"]).split())
    # the names a fresh interpreter knows (tests register more in this one)
    listing = "import archs; print(' '.join(archs.available()))"
    names = subprocess.run(
        [sys.executable, "-c", listing], cwd=REPO, capture_output=True, text=True, timeout=600
    ).stdout.split()
    assert "resnet-50-imagenet" in names
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text), name


def help_text_of(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(argv)
    return out.getvalue()


def test_settings_defaults_agree_with_the_modules_that_use_them():
    assert RunConfig.sublayer_templates == SUBLAYER_TEMPLATES
    assert tuple(COMPUTE_DTYPES) == DTYPES
    assert set(DEFAULT_AUGMENTATION) == set(DATASET_NAMES)
    assert set(DEFAULT_AUGMENTATION.values()) <= set(augment.PRESETS)


# --- end to end -----------------------------------------------------------------------------

E2E_EPOCHS = 10  # the CLI default is 15; 10 keeps the run near a minute on 2 CPU cores
E2E_ACCURACY = 0.95
"""At 10 epochs the default job scored 98.06%, 97.50% and 98.33% (seeds 0-2, the tests' XLA
settings); 95% is its lowest seed less two and a half points. It also bounds the budgeted
model's gap to the full one to 5 points, whatever the full model scores (at most 100%)."""


def wide_resnet_params(depth: int, width: int, in_channels: int, num_classes: int) -> int:
    """Trainable parameters of a plain WRN-`depth`-`width` by formula, not by building one:
    a 3x3 stem to 16 channels; three stages of (depth - 4) / 6 pre-activation blocks, each
    batch norm (scale, bias) + 3x3 conv + batch norm + 3x3 conv, with a 1x1 projection where
    the width changes; a final batch norm; a dense head with bias. No conv has a bias.
    WRN-28-1, 1 channel, 10 classes: 144 + 18,688 + 70,112 + 279,488 + 128 + 650 = 369,210."""
    blocks = (depth - 4) // 6
    total, previous = 9 * in_channels * 16, 16
    for stage in (16 * width, 32 * width, 64 * width):
        for block in range(blocks):
            c_in = previous if block == 0 else stage
            total += 2 * c_in + 9 * c_in * stage + 2 * stage + 9 * stage * stage
            total += c_in * stage if c_in != stage else 0
        previous = stage
    return total + 2 * previous + previous * num_classes + num_classes


@pytest.mark.heavy
def test_the_default_job_learns_the_digits_with_a_quarter_of_the_parameters(tmp_path):
    """The default job (search included) on the full digits set: 25% of the shared kernels,
    at least E2E_ACCURACY on the test set."""
    out = tmp_path / "default"
    # checkpoints only at the ends: where they land changes no result (test_checkpoint)
    argv = ["train", "--quiet", "--epochs", str(E2E_EPOCHS), "--checkpoint-every", "0"]
    code, _, stderr = run([*argv, "--output-dir", str(out)])
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == RunConfig.arch == "wrn-28-1" and summary["dataset"] == "digits"
    assert summary["budget"] == "25.00% (banks scope)" and summary["search"] is True
    # 25% of the shared kernels, plus what is never shared (norms, head, coefficients)
    dense = wide_resnet_params(28, 1, in_channels=1, num_classes=10)
    assert 0.25 * dense < summary["trainable_params"] < 0.3 * dense
    assert summary["test_accuracy"] >= E2E_ACCURACY, summary["test_accuracy"]


@pytest.mark.heavy
def test_an_ensemble_is_set_beside_the_fully_parameterized_one(tmp_path):
    out = tmp_path / "ensemble"
    # test_ensemble_sweep's two arms, so that the two modules share compiled programs
    argv = [
        "train", "--quiet", "--preset", "digits-ensemble", "--arch", "wrn-16-1,wrn-10-1",
        "--budget", "83%", "--train-size", "128", "--test-size", "64", "--batch-size", "32",
        "--epochs", "2", "--search-epochs", "1", "--gradient-batches", "2",
        "--unshare-epoch", "1", "--compare-dense", "--output-dir", str(out),
    ]  # fmt: skip
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


@pytest.mark.heavy
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


def test_resuming_with_other_settings_is_refused_but_not_with_other_saving(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    code, _, stderr = run([*argv[:-1], str(out), "--lr", "0.05"])
    assert code == 2
    assert "holds checkpoints of a run with other settings (--lr was 0.1, now 0.05)" in stderr
    code, stdout, stderr = run([*argv[:-1], str(out), "--checkpoint-every", "2"])
    assert code == 0, stderr
    assert "resuming training from step" in stdout


def test_resuming_in_another_dtype_is_refused(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    code, _, stderr = run([*argv[:-1], str(out), "--dtype", "bfloat16"])
    assert code == 2
    assert (
        'holds checkpoints of a run with other settings (--dtype was "float32", now "bfloat16")'
        in stderr
    )


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "older"
    shutil.copytree(first, out)
    saved = json.loads((out / "config.json").read_text())
    del saved["dtype"], saved["search"]["similarity"]  # settings added since
    (out / "config.json").write_text(json.dumps(saved))
    code, stdout, stderr = run([*argv[:-1], str(out)])
    assert code == 0, stderr
    assert "resuming training from step" in stdout


@pytest.mark.heavy
def test_a_bf16_run_checkpoints_float32_params_and_resumes_to_the_same_end(tmp_path):
    argv = ["train", *TINY, "--budget", "80%", "--epochs", "2", "--no-search", "--quiet"]
    argv += ["--dtype", "bfloat16"]
    whole = tmp_path / "whole"
    code, stdout, stderr = run([*argv, "--output-dir", str(whole)])
    assert code == 0, stderr
    assert "computing in bfloat16" in stdout
    assert json.loads((whole / "config.json").read_text())["dtype"] == "bfloat16"
    assert Checkpoints(whole / "checkpoints").steps() == [3, 6]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if killed before the last epoch's save
    for name in ("summary.json", "metrics.csv"):
        (resumed / name).unlink()
    code, stdout, stderr = run([*argv, "--output-dir", str(resumed)])
    assert code == 0, stderr
    assert "resuming training from step 3 (epoch 2" in stdout
    assert run_files(resumed) == run_files(whole)
    saved = ocp.StandardCheckpointer().metadata(whole / "checkpoints" / "6" / "state")
    leaves = jax.tree_util.tree_leaves(saved.item_metadata)
    dtypes = {str(x.dtype) for x in leaves}
    assert dtypes == {"float32", "int32", "uint32"}  # params and optimizer, step, key


def test_search_summary_says_why_thresholds_were_refused():
    from conftest import chain_specs

    from experiments.run import search_summary
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


def test_a_run_resumed_after_unsharing_keeps_the_record_and_ends_the_same(budgeted_run, tmp_path):
    """Saved every 2 epochs and killed at the epoch boundary after unsharing: the resumed
    run's files equal the whole's."""
    *_, whole, argv = budgeted_run
    assert Checkpoints(whole / "checkpoints").steps() == [6, 12]  # 3 steps an epoch
    assert Checkpoints(whole / "search_checkpoints").steps() == [6]  # its end
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")  # as if killed before the last epoch's save
    for name in ("summary.json", "metrics.csv"):
        (resumed / name).unlink()
    code, stdout, stderr = run([*argv, "--output-dir", str(resumed)])
    assert code == 0, stderr
    assert "resuming training from step 6 (epoch 3" in stdout
    expected, got = run_files(whole), run_files(resumed)
    assert set(expected[0]["unshare"]) == {"vectors_before", "vectors_after"}
    assert got[0] == expected[0]
    assert got[1] == expected[1] and got[2] == expected[2]


def test_a_corrupt_latest_checkpoint_survives_every_rerun_with_the_same_summary(tmp_path):
    """Corrupt the last checkpoint, rerun; twice: each time the uninterrupted run's files."""
    argv = ["train", *TINY, "--dense", "--epochs", "2", "--quiet"]
    whole, out = tmp_path / "whole", tmp_path / "damaged"
    assert run([*argv, "--output-dir", str(whole)])[0] == 0
    shutil.copytree(whole, out)
    for aside in ("6.corrupt", "6.corrupt-1"):
        for path in (out / "checkpoints" / "6").rglob("*"):
            if path.is_file():
                path.write_bytes(b"garbage")
        (out / "summary.json").unlink()
        code, stdout, stderr = run([*argv, "--output-dir", str(out)])
        assert code == 0, stderr
        assert f"moved to {out / 'checkpoints' / aside}; trying the one before" in stdout
        assert "resuming training from step 3 (epoch 2" in stdout
        assert run_files(out) == run_files(whole)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "3",
        "6",
        "6.corrupt",
        "6.corrupt-1",
    ]


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"config.json": '{"arch": '}, r"config.json is damaged \(Expecting value"),
        ({"metrics.jsonl": '{"epoch": 1}\n{"epo'}, r"metrics.jsonl is damaged at line 2"),
    ],
)
def test_a_damaged_run_file_is_named_and_nothing_else_changes(dense_run, tmp_path, damage, message):
    *_, first, argv = dense_run
    out = tmp_path / "damaged"
    shutil.copytree(first, out)
    for name, text in damage.items():
        (out / name).write_text(text)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, stderr = run([*argv[:-1], str(out)])
    assert code == 2
    assert stderr.startswith(f"npas: error: {out}") and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --- the run directory: owned, locked ---------------------------------------------------------


def start_npas(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "experiments.cli", *argv]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_lock(out: Path, process: subprocess.Popen, limit_s: float = 600) -> bool:
    """True once `process` holds `out`'s run lock (its pid in the lock file)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if (out / LOCK).read_text().strip() == str(process.pid):
                return True
        time.sleep(0.05)
    return False


def test_a_second_run_on_a_running_runs_directory_is_refused_naming_its_pid(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--dense", "--epochs", "500", "--quiet", "--output-dir", str(out)]
    first = start_npas(argv)
    try:
        assert wait_for_lock(out, first), first.communicate(timeout=600)
        code, _, err = run(argv)
        assert code == 2
        assert err == (
            f"npas: error: {out} is in use by another npas run (process {first.pid}); wait for "
            "it to end or stop it, or give another --output-dir\n"
        )
    finally:
        first.terminate()  # SIGTERM: it stops, with or without a checkpoint, and says so
        _, stderr = first.communicate(timeout=600)  # catches a hang only
    assert first.returncode == 130, stderr
    assert stderr.startswith("npas: stopped") and "Traceback" not in stderr, stderr
    assert lock_holder(out) is None  # released on the way out


def test_sigterm_before_the_first_step_exits_130_with_a_message(tmp_path):
    out = tmp_path / "run"
    argv = ["train", *TINY, "--dense", "--epochs", "1", "--quiet", "--output-dir", str(out)]
    process = start_npas(argv)
    assert wait_for_lock(out, process), process.communicate(timeout=600)
    process.send_signal(signal.SIGTERM)  # the lock is taken before the data is loaded
    _, stderr = process.communicate(timeout=600)  # catches a hang only
    assert process.returncode == 130, stderr
    assert stderr.startswith("npas: stopped") and stderr.count("\n") == 1, stderr
    assert "run the same command again" in stderr


def test_a_lock_left_by_a_dead_process_is_taken_over(dense_run, tmp_path):
    *_, first, argv = dense_run
    out = tmp_path / "again"
    shutil.copytree(first, out)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    dead = int(ended.stdout)
    (out / LOCK).write_text(f"{dead}\n")
    code, stdout, stderr = run([*argv[:-1], str(out)])
    assert code == 0, stderr
    assert f"took over {out}'s lock from process {dead}, which has ended" in stdout


def test_a_marker_file_of_other_content_does_not_make_a_directory_a_run(tmp_path, nothing_compiles):
    out = tmp_path / "mine"
    out.mkdir()
    (out / MARKER).write_text("my own file of that name")
    code, _, err = run(["train", *TINY, "--dense", "--output-dir", str(out)])
    assert code == 2
    assert f"{out} is not empty and holds no npas run (.npas-run)" in err
    assert (out / MARKER).read_text() == "my own file of that name"
