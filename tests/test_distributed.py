import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from experiments import distributed

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from experiments.data import load_digits, subset
from experiments.models import build_budgeted, create_members
from experiments.train import LoopConfig, OptimConfig, train
from superweights import Budget

batch = int(sys.argv[1])
digits = subset(load_digits(), 128, 64)
modules = create_members(["wrn-10-1"], num_classes=10, in_channels=1, seed=0)
model = build_budgeted(modules, Budget(fraction=0.8), jnp.zeros((1, 8, 8, 1)))
losses = []
try:
    state, metrics = train(model, digits, LoopConfig(epochs=2, batch_size=batch,
                           eval_batch_size=64), OptimConfig(), progress=False,
                           on_epoch=lambda m: losses.append(m["train_loss"]))
except ValueError as error:
    print(json.dumps({"error": str(error)}))
    raise SystemExit(0)
template = state.params["bank"]["templates"]["c0_l0"]
print(json.dumps({"devices": jax.device_count(), "losses": losses,
                  "accuracy": metrics["test_accuracy"],
                  "replicated_on": len(template.sharding.device_set)}))
"""


def run_on(devices: int, batch: int = 32) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(batch)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_host_devices_train_like_one():
    one, two = run_on(1), run_on(2)
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["replicated_on"] == 2
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1 / 64)


def test_a_batch_that_does_not_divide_over_the_devices_is_refused():
    assert "does not divide over 2 devices" in run_on(2, batch=31)["error"]


def test_one_process_needs_no_distributed_start(monkeypatch):
    monkeypatch.delenv("NPAS_COORDINATOR", raising=False)
    distributed.initialize()
    assert jax.process_count() == 1
