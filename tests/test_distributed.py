import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import run_npas, subprocess_env

from experiments import distributed
from experiments.imagefolder import write_image_folder

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from experiments.data import load_digits, subset
from experiments.models import build_budgeted, create_members
from experiments.train import LoopConfig, OptimConfig, train
from superweights import Budget

digits = subset(load_digits(), 128, 64)
modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
model = build_budgeted(modules, Budget(fraction=0.8), jnp.zeros((1, 8, 8, 1)))
for batch in map(int, sys.argv[1:]):
    losses = []
    try:
        state, metrics = train(model, digits, LoopConfig(epochs=3, batch_size=batch,
                               eval_batch_size=64), OptimConfig(), progress=False,
                               on_epoch=lambda m: losses.append(m["train_loss"]))
    except ValueError as error:
        print(json.dumps({"error": str(error)}))
        continue
    template = state.params["bank"]["templates"]["c0_l0"]
    print(json.dumps({"devices": jax.device_count(), "losses": losses,
                      "accuracy": metrics["test_accuracy"],
                      "replicated_on": len(template.sharding.device_set)}))
"""


def run_on(devices: int, *batches: int) -> list[dict]:
    """One line of results for each batch size, trained in one process on `devices`.

    The model, data and loop are test_checkpoint's, whose single-device programs they share.
    """
    env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *map(str, batches)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(batches) :]]


@pytest.fixture(scope="module")
def host_devices() -> dict:
    """Batch 32 on one device; batches 32 and 31 on two."""
    (one,) = run_on(1, 32)
    two, uneven = run_on(2, 32, 31)
    return {"one": one, "two": two, "uneven": uneven}


def test_two_host_devices_train_like_one(host_devices):
    one, two = host_devices["one"], host_devices["two"]
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["replicated_on"] == 2
    # float32: two devices sum the batch's gradients in another order (seen: 1.4e-5 relative
    # after one step); a wrong average over devices would be off by far more
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1 / 64)


def test_a_batch_that_does_not_divide_over_the_devices_is_refused(host_devices):
    assert "does not divide over 2 devices" in host_devices["uneven"]["error"]


def test_one_process_needs_no_distributed_start(monkeypatch):
    monkeypatch.delenv("NPAS_COORDINATOR", raising=False)
    distributed.initialize()
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    ("arguments", "environment", "message"),
    [
        (("localhost:1234", None, 0), {}, "needs --num-processes and --process-id"),
        (("localhost:1234", 2, None), {}, "needs --num-processes and --process-id"),
        ((None, 2, 0), {}, "need --coordinator"),
        (("localhost:1234", 2, 2), {}, r"process id 2 is not in 0\.\.1"),
        ((None, None, None), {"NPAS_COORDINATOR": "h:1", "NPAS_NUM_PROCESSES": "two"}, "two"),
    ],
)
def test_an_incomplete_multi_host_start_is_refused_before_connecting(
    monkeypatch, arguments, environment, message
):
    for name in ("NPAS_COORDINATOR", "NPAS_NUM_PROCESSES", "NPAS_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(*arguments)
    assert jax.process_count() == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def npas_train(folder: Path, out: Path, *extra: str) -> list[str]:
    """A short run on an image folder: each process reads and decodes only its own images.

    The folder and the settings are test_image_folder_runs' (read here by threads), so that
    the single-process run shares that module's compiled programs.
    """
    return [
        sys.executable, "-m", "experiments.cli", "train", "--quiet",
        "--dataset", "image_folder", "--data-dir", str(folder), "--image-size", "16",
        "--workers", "0", "--arch", "wrn-10-1", "--budget", "80%", "--batch-size", "8",
        "--epochs", "2", "--search-epochs", "1", "--unshare-epoch", "1",
        "--output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.heavy
def test_two_processes_joined_by_a_coordinator_train_like_one(tmp_path):
    folder = write_image_folder(
        tmp_path / "images", classes=("ant", "bee", "cat", "dog"), train_per_class=12,
        val_per_class=3,
    )  # fmt: skip
    code, _, stderr = run_npas(npas_train(folder, tmp_path / "one")[3:])  # in this process
    assert code == 0, stderr

    coordinator = f"localhost:{free_port()}"
    two = ("--coordinator", coordinator, "--num-processes", "2")
    # each host writes to files: a pipe read after the other host's could fill and block it
    logs = [(tmp_path / f"host{i}.out", tmp_path / f"host{i}.err") for i in range(2)]
    hosts = []
    try:
        for index, (out, err) in enumerate(logs):
            with out.open("w") as stdout, err.open("w") as stderr:
                host = subprocess.Popen(
                    npas_train(folder, tmp_path / "two", *two),
                    cwd=REPO,
                    env=subprocess_env(
                        XLA_FLAGS="--xla_force_host_platform_device_count=1",
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
        assert "leaked shared_memory" not in stderr  # the workers' batches were freed

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for key in ("trainable_params", "clusters", "tau", "unshare"):
        assert two[key] == one[key], key
    # the same global batches; batch statistics summed over two devices in another order, a
    # rounding difference that 18 steps and an unsharing grow: 1.4e-6 relative from one initial
    # bank, 7e-5 from another (each the same in one process and in two, bit for bit)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 12)  # 12 images
    assert "final test accuracy" in outputs[0][0]
    assert "final test accuracy" not in outputs[1][0]  # the second host trains silently
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert epochs == [1, 2]  # written once, by the first host
    assert (tmp_path / "two" / "checkpoints").is_dir()
