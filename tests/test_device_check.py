import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env

from experiments.benchmarks import device_check
from experiments.benchmarks.device_check import (
    CheckFailed,
    Deadline,
    cifar_shaped,
    loss_problems,
    main,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_the_smoke_mode_runs_every_check_on_the_cpu_and_exits_0(capsys, monkeypatch):
    # in this process (the entry point is `sys.exit(main())`), whose compiles keep the tests'
    # persistent cache: turning it off here could take it from every later test of this worker
    calls = []
    monkeypatch.setattr(device_check, "without_persistent_cache", lambda: calls.append("off"))
    code = main(["--smoke"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert calls == ["off"]
    assert out.startswith("device: 1 x cpu")
    for check in ("benchmark", "composition", "ensemble", "training"):
        assert f"\nPASS {check} (" in out
    for dtype in ("float32", "bfloat16"):
        assert f"wrn-10-1, batch 8, (8, 8, 3), {dtype}, on 1 cpu device(s)" in out
    assert out.count("budget 10.00% / plain: step-time ratio") == 2
    assert "images/s, compile" in out and "memory ratio" in out
    assert "budget 10.00%: first-step loss float32 " in out
    assert "composition at budget 10.00%: forward " in out
    assert "2 x wrn-10-1 at 50% (one bank), batch 8: vmap " in out
    assert "wrn-10-1 at 10% (bfloat16), 128 CIFAR-shaped images: train loss by epoch" in out
    assert re.search(r"\ndevice check: 4 of 4 checks passed in \d+ s$", out.rstrip())


PERSISTENT_CACHE_OFF = """
import jax
from experiments.benchmarks.train_step import without_persistent_cache
without_persistent_cache()
print(jax.jit(lambda x: 2 * x + 1)(20))
"""


def test_benchmark_compiles_neither_read_nor_write_the_persistent_cache(tmp_path):
    """A compile read back from the cache would be timed as a compile (the smoke check's plain
    step: read in 0.33 s, compiled in 2.6 s; its compile-time ratio 9.6 where the true one is
    1.8). The benchmarks and the device check turn the cache off first thing."""
    cache = tmp_path / "cache"  # every compile would be written there (minimum time 0 s)
    done = subprocess.run(
        [sys.executable, "-c", PERSISTENT_CACHE_OFF],
        cwd=REPO,
        env=subprocess_env(JAX_COMPILATION_CACHE_DIR=str(cache)),
        capture_output=True,
        text=True,
        timeout=600,  # catches a hang only
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["41"]
    assert not cache.exists() or not any(cache.iterdir())


def passing(config, results, deadline):
    print("all well")


def wrong(config, results, deadline):
    raise CheckFailed("the loss rose")


def crashing(config, results, deadline):
    raise RuntimeError("out of memory")


def test_any_failed_check_makes_the_exit_code_1_and_the_others_still_run(monkeypatch, capsys):
    checks = (("first", wrong), ("second", crashing), ("third", passing))
    monkeypatch.setattr(device_check, "CHECKS", checks)
    assert main(["--smoke"]) == 1
    out, err = capsys.readouterr()
    assert "\nFAIL first (0 s): the loss rose\n" in out
    assert "\nFAIL second (0 s): out of memory\n" in out
    assert "all well\nPASS third (0 s)\n" in out
    assert "device check: 1 of 3 checks passed in 0 s; failed: first, second" in out
    assert "RuntimeError: out of memory" in err  # an unexpected error keeps its traceback
    assert "CheckFailed" not in err

    monkeypatch.setattr(device_check, "CHECKS", (("only", passing),))
    assert main(["--smoke"]) == 0
    assert "device check: 1 of 1 checks passed" in capsys.readouterr().out


def test_no_check_starts_once_the_time_limit_is_spent():
    Deadline(60).check("anything")  # time left: nothing raised
    with pytest.raises(CheckFailed, match=r"the training not started: \d+ s of the 0-s limit"):
        Deadline(0, start=0.0).check("the training")


def results_with(losses: dict[str, dict[str, float]]) -> dict:
    """`{dtype: (models, runs)}` as the benchmark leaves them, from `{dtype: {model: loss}}`."""
    return {
        dtype: (None, {name: {"first_metrics": {"loss": loss}} for name, loss in by_model.items()})
        for dtype, by_model in losses.items()
    }


def test_first_step_losses_must_be_finite_and_close_to_float32s():
    close = results_with(
        {"float32": {"a": 4.60, "plain": 4.70}, "bfloat16": {"a": 4.65, "plain": 4.69}}
    )
    assert loss_problems(close, tolerance=0.05) == []
    apart = results_with({"float32": {"a": 4.0}, "bfloat16": {"a": 4.3}})
    assert loss_problems(apart, tolerance=0.05) == [
        "a: bfloat16 first-step loss 4.3000 is more than 5% from float32's 4.0000"
    ]
    assert loss_problems(apart, tolerance=0.1) == []
    broken = results_with({"float32": {"a": 4.0}, "bfloat16": {"a": float("nan")}})
    assert loss_problems(broken, tolerance=0.05) == ["a in bfloat16: first-step loss nan"]


def test_cifar_shaped_data_is_each_class_a_pattern_plus_noise():
    data = cifar_shaped(200, 50, (32, 32, 3), 10, seed=3)
    assert data.train_images.shape == (200, 32, 32, 3) and data.test_images.shape == (50, 32, 32, 3)
    assert data.train_images.dtype == np.float32 and data.train_labels.dtype == np.int32
    assert set(np.unique(data.train_labels)) <= set(range(10)) and data.num_classes == 10
    # images of one class lie closer to their class mean than to another class's
    means = np.stack([data.train_images[data.train_labels == c].mean(0) for c in range(10)])
    distances = ((data.test_images[:, None] - means[None]) ** 2).sum((2, 3, 4))
    assert np.mean(distances.argmin(1) == data.test_labels) > 0.9
    again = cifar_shaped(200, 50, (32, 32, 3), 10, seed=3)
    np.testing.assert_array_equal(again.train_images, data.train_images)


@pytest.mark.parametrize("module", ["train_step", "scaling"])
@pytest.mark.parametrize("text", ["8x8x1", "8,8", "8,0,3"])
def test_a_malformed_image_shape_is_a_usage_error(module, text, capsys):
    benchmark = importlib.import_module(f"experiments.benchmarks.{module}")
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--image-shape", text])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --image-shape: takes height,width,channels" in error
    assert f"got {text!r}" in error and "Traceback" not in error
