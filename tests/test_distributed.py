import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from conftest import subprocess_env

from experiments import distributed

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from experiments.data import load_digits, subset
from experiments.models import build_budgeted, create_members
from experiments.train import LoopConfig, OptimConfig, train
from superweights import Budget


def train_on_every_device(batches):
    \"\"\"wrn-10-1 at 80% trained 3 epochs on digits, once for each batch size: its losses,
    accuracy and devices, or the refusal.\"\"\"
    digits = subset(load_digits(), 128, 64)
    modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    model = build_budgeted(modules, Budget(fraction=0.8), jnp.zeros((1, 8, 8, 1)))
    results = []
    for batch in batches:
        losses = []
        try:
            state, metrics = train(model, digits, LoopConfig(epochs=3, batch_size=batch,
                                   eval_batch_size=64), OptimConfig(), progress=False,
                                   on_epoch=lambda m: losses.append(m["train_loss"]))
        except ValueError as error:
            results.append({"error": str(error)})
            continue
        template = state.params["bank"]["templates"]["c0_l0"]
        results.append({"devices": jax.device_count(), "losses": losses,
                        "accuracy": metrics["test_accuracy"],
                        "replicated_on": len(template.sharding.device_set)})
    return results


if __name__ == "__main__":
    for result in train_on_every_device(map(int, sys.argv[1:])):
        print(json.dumps(result))
"""
"""The model, data and loop are test_checkpoint's, whose single-device programs they share."""


def run_here(*batches: int) -> list[dict]:
    """SCRIPT's results in this process, on its one device."""
    namespace = {"__name__": "test_distributed_script"}
    exec(compile(SCRIPT, "test_distributed_script", "exec"), namespace)  # noqa: S102
    return namespace["train_on_every_device"](batches)


def run_on(devices: int, *batches: int) -> list[dict]:
    """SCRIPT's results in a child process on `devices` host devices."""
    env = subprocess_env(xla_flags=f"--xla_force_host_platform_device_count={devices}")
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
    """Batch 32 on this process's one device; batches 32 and 31 on two in a child."""
    assert jax.device_count() == 1
    (one,) = run_here(32)
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
