"""Training on an image folder (ImageNet's layout) from the command line: a run, a run
killed mid-epoch and resumed, the same run on two processes joined by a coordinator, and the
refusals of bad folders."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_once, run_files, saved_steps, subprocess_env
from conftest import run_npas as run

from experiments.cli import main
from experiments.imagefolder import write_image_folder

TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 12, 3, ("ant", "bee", "cat", "dog")
BATCH = 8
STEPS = len(CLASSES) * TRAIN_PER_CLASS // BATCH  # 48 images: 6 steps an epoch
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return write_image_folder(
        root, classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS
    )


def folder_argv(root, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "image_folder", "--data-dir", str(root), "--image-size", "16",
        "--arch", "wrn-10-1", "--budget", "80%", "--batch-size", str(BATCH), "--epochs", "2",
        "--search-epochs", "1", "--unshare-epoch", "1", "--checkpoint-steps", "2",
        "--workers", "1", "--quiet", *extra,
    ]  # fmt: skip


"""One worker process: the runs read through one, and the pipeline's tests resume two."""


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    code, stdout, stderr = run(folder_argv(folder, "--output-dir", str(out)))
    assert code == 0, stderr
    return out, stdout


def test_a_run_on_an_image_folder_reads_its_classes_and_splits(uninterrupted):
    out, stdout = uninterrupted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "image_folder"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert "training on image_folder: 48 train / 12 test images, 2 epochs" in stdout
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for epoch in epochs:  # the time waiting for input is split from the steps' time
        assert epoch["input_seconds"] >= 0 and epoch["step_seconds"] > 0
    plan = json.loads((out / "plan.json").read_text())
    head = [x for x in plan["layers"] if x["path"].endswith("kernel") and len(x["shape"]) == 2]
    assert all(x["shape"][-1] == len(CLASSES) for x in head)  # classes from the folders


def test_a_run_killed_mid_epoch_resumes_on_the_next_batch_and_ends_the_same(
    folder, uninterrupted, tmp_path, capsys
):
    argv = folder_argv(folder, "--output-dir", str(tmp_path))
    # the final training saves every 2 steps; step 8 is in epoch 2 (steps 7-12), mid-epoch
    seen = kill_once(argv, lambda out: max(saved_steps(out / "checkpoints"), default=0) >= 8)
    assert seen["running"] and seen["searched"], seen
    killed_at = max(seen["training"])
    assert 8 <= killed_at < 2 * STEPS and killed_at % STEPS, seen  # inside an epoch
    assert main(argv) == 0
    assert f"resuming training from step {killed_at} " in capsys.readouterr().out
    assert run_files(tmp_path) == run_files(uninterrupted[0])


# --- two processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_joined_by_a_coordinator_train_like_one(folder, uninterrupted, tmp_path):
    """The uninterrupted run again, on two processes of one device each: each reads and
    decodes only its own images (by threads: `--workers 0`)."""
    coordinator = f"localhost:{free_port()}"
    argv = folder_argv(folder, "--output-dir", str(tmp_path / "two"), "--workers", "0")
    argv += ["--coordinator", coordinator, "--num-processes", "2"]
    # each host writes to files: a pipe read after the other host's could fill and block it
    logs = [(tmp_path / f"host{i}.out", tmp_path / f"host{i}.err") for i in range(2)]
    hosts = []
    try:
        for index, (out, err) in enumerate(logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                host = subprocess.Popen(
                    [sys.executable, "-m", "experiments.cli", *argv],
                    cwd=REPO,
                    env=subprocess_env(
                        xla_flags="--xla_force_host_platform_device_count=1",
                        NPAS_PROCESS_ID=str(index),
                    ),
                    stdout=stdout,
                    stderr=stderr,
                )
            hosts.append(host)
        for host in hosts:
            host.wait(timeout=600)  # catches a hang only
    finally:
        for host in hosts:
            host.kill()  # no-op for a host that has exited
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    for host, (_, stderr) in zip(hosts, outputs, strict=True):
        assert host.returncode == 0, stderr

    one = json.loads((uninterrupted[0] / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("trainable_params", "clusters", "tau", "unshare"):
        assert two[key] == one[key], key
    # The same global batches, but batch statistics and gradients summed over two devices, in
    # another order than over one: a rounding difference that training grows. (Two processes of
    # one device each equal one process of two devices bit for bit.) Before the unsharing, 12
    # steps: 2.8e-5 relative. After it the difference grows fast and depends on the processor's
    # XLA code: at the end 7e-5 on one machine, 2.9e-3 on another. A gradient summed over the
    # processes and not averaged, a step twice as long, is off by 46% in the first epoch here.
    losses = {
        name: [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").open()]
        for name, out in (("one", uninterrupted[0]), ("two", tmp_path / "two"))
    }
    assert losses["two"][0] == pytest.approx(losses["one"][0], rel=1e-3)
    assert losses["two"][-1] == pytest.approx(losses["one"][-1], rel=2e-2)
    assert two["train_loss"] == losses["two"][-1] and one["train_loss"] == losses["one"][-1]
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 12)  # 12 images
    assert "final test accuracy" in outputs[0][0]
    assert "final test accuracy" not in outputs[1][0]  # the second host trains silently
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert epochs == [1, 2]  # written once, by the first host
    assert (tmp_path / "two" / "checkpoints").is_dir()


# --- bad folders ------------------------------------------------------------------------------


def refusal(root, *extra: str) -> str:
    code, _, stderr = run(folder_argv(root, *extra))
    assert code == 2, stderr
    assert stderr.startswith("npas: error: ") and len(stderr.strip().splitlines()) == 1, stderr
    return stderr


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "train" in refusal(tmp_path / "empty")


def test_a_class_with_no_images_is_refused(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    for image in (root / "val" / "bee").iterdir():
        image.unlink()
    stderr = refusal(root)
    assert "bee" in stderr and "val" in stderr


def test_train_and_val_with_different_classes_are_refused(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    (root / "val" / "dog").rename(root / "val" / "eel")
    stderr = refusal(root)
    assert "dog" in stderr and "eel" in stderr


@pytest.mark.heavy
def test_a_file_that_is_not_an_image_is_refused_or_skipped_as_asked(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    (root / "train" / "cat" / "notes.jpg").write_text("not a picture")
    stderr = refusal(root)
    assert "notes.jpg" in stderr and "--bad-images skip" in stderr
    code, stdout, stderr = run(
        folder_argv(root, "--bad-images", "skip", "--epochs", "1", "--search-epochs", "1")
        + ["--unshare-epoch", "0", "--no-search", "--workers", "0"]
    )
    assert code == 0, stderr
    assert "skipped 1 files that are not images" in stdout and "notes.jpg" in stdout
    assert "48 train / 12 test images" in stdout


def test_an_image_that_does_not_decode_stops_the_run_naming_it_not_a_worker(folder, tmp_path):
    root = copy_of(folder, tmp_path)
    broken = root / "train" / "ant" / "ant_0000.jpg"
    broken.write_bytes(broken.read_bytes()[:3] + b"\0" * 200)  # a JPEG's header, no image
    code, _, stderr = run(folder_argv(root, "--epochs", "1", "--no-search", "--unshare-epoch", "0"))
    assert code == 2, stderr
    assert "ant_0000.jpg: not a readable image" in stderr
    assert "Traceback" not in stderr


def test_image_folder_augmentations_must_be_of_its_kind(folder):
    assert "image folders do not do" in refusal(folder, "--augment", "cifar")
    code, _, stderr = run(["train", "--augment", "imagenet", "--epochs", "1"])
    assert code == 2 and "held in memory" in stderr, stderr
