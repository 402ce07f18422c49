"""Shared tiny models, inputs and spec builders for the superweights tests."""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from archs.layers import lecun_normal
from superweights import LayerSpec, ParamSpec

REPO = Path(__file__).resolve().parents[1]
COMPILATION_CACHE = str(REPO / ".jax_cache")
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

TEST_XLA_FLAGS = (
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_backend_optimization_level=1",
    "--xla_cpu_use_fusion_emitters=false",
)
"""XLA's settings for every test process and the processes the tests start. Most of the
suite's time is compiling small programs, few of which run for long: LLVM optimises less and
fused loops take XLA's older emitter, each compile quicker, the code it makes a little
slower. xdist runs one test process per core, so each computes on one thread instead of
several that contend for the cores. The programs compute the same operations; their
rounding may differ from that without these options, and training grows such differences
(the default job, 10 epochs: 98.06% test accuracy with them, 98.33% without). Every test
process has the same options."""


def supported_xla_flags(flags: tuple[str, ...]) -> str:
    """`flags` less any this jaxlib's XLA does not know (it stops a process on one), found by
    starting JAX in a child process: once a session, in the process that starts the others."""

    def starts(candidates) -> bool:
        probe = [sys.executable, "-c", "import jax; jax.devices()"]
        env = {**os.environ, "XLA_FLAGS": " ".join(candidates)}
        return subprocess.run(probe, env=env, capture_output=True, timeout=300).returncode == 0

    return " ".join(flags if starts(flags) else [f for f in flags if starts([f])])


if "NPAS_TEST_XLA_FLAGS" not in os.environ:  # xdist's workers inherit both settings
    os.environ["NPAS_TEST_XLA_FLAGS"] = supported_xla_flags(TEST_XLA_FLAGS)
    # read when JAX first starts its CPU backend, after this module's imports
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, (os.environ.get("XLA_FLAGS"), os.environ["NPAS_TEST_XLA_FLAGS"]))
    )


def subprocess_env(xla_flags: str = "", **extra: str) -> dict[str, str]:
    """The environment for a child Python process: the tests' compilation cache and XLA
    settings (`xla_flags` added to them), unbuffered output."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip(),
        **extra,
    }


NUM_CLASSES = 5
IMAGE_SHAPE = (4, 6, 6, 3)


class TinyCNN(nnx.Module):
    """stem 3x3 (3 -> w), BN, 3x3 (w -> 2w) plus a 1x1 shortcut (w -> 2w), dense head.

    Kernels start from Flax's default initialiser, drawn with `archs.layers.lecun_normal`
    (the same values, one compiled draw for every width and shape).
    """

    def __init__(
        self,
        rngs: nnx.Rngs,
        width: int = 4,
        num_classes: int = NUM_CLASSES,
        param_dtype=jnp.float32,
    ):
        conv = dict(rngs=rngs, param_dtype=param_dtype, kernel_init=lecun_normal)
        self.stem = nnx.Conv(3, width, (3, 3), **conv)
        self.bn = nnx.BatchNorm(width, rngs=rngs, param_dtype=param_dtype)
        self.conv = nnx.Conv(width, 2 * width, (3, 3), **conv)
        self.shortcut = nnx.Conv(width, 2 * width, (1, 1), use_bias=False, **conv)
        self.head = nnx.Linear(2 * width, num_classes, **conv)

    def __call__(self, x, train: bool = False):
        x = self.stem(x)
        x = nnx.relu(self.bn(x, use_running_average=not train))
        x = self.conv(x) + self.shortcut(x)
        return self.head(x.mean((1, 2)))


class LinenCNN(linen.Module):
    """The same layout as TinyCNN in Linen; its BatchNorm keeps Linen's default name."""

    width: int = 4

    @linen.compact
    def __call__(self, x, train: bool = False):
        init = dict(kernel_init=lecun_normal)
        x = linen.Conv(self.width, (3, 3), name="stem", **init)(x)
        x = linen.relu(linen.BatchNorm(use_running_average=not train)(x))
        y = linen.Conv(2 * self.width, (3, 3), name="conv", **init)(x)
        x = y + linen.Conv(2 * self.width, (1, 1), use_bias=False, name="shortcut", **init)(x)
        return linen.Dense(NUM_CLASSES, name="head", **init)(x.mean((1, 2)))


def normal(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 values `[*shape]`, drawn on the host: test inputs need no
    random-number program compiled for each shape (about 0.4 s each on a CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture
def images() -> jax.Array:
    return normal(1, IMAGE_SHAPE)


def conv(member: str, path: str, spatial: tuple[int, ...], cin: int, cout: int, depth: int):
    """A LayerSpec of a float32 kernel `[*spatial, cin, cout]`."""
    return LayerSpec(member, path, (*spatial, cin, cout), "float32", depth)


def chain_specs(member: str, kernels: list[tuple[tuple[int, ...], int, int]]) -> list[LayerSpec]:
    """LayerSpecs `l0, l1, ...` of one member from `(spatial, in, out)` triples, in order."""
    return [
        conv(member, f"l{depth}.kernel", spatial, cin, cout, depth)
        for depth, (spatial, cin, cout) in enumerate(kernels)
    ]


def norm_params(layers: list[LayerSpec]) -> list[ParamSpec]:
    """A BatchNorm scale and bias per layer, like the per-member params of a CNN."""
    return [
        ParamSpec(x.member, f"{x.path.split('.')[0]}_bn.{leaf}", (x.shape[-1],), "float32")
        for x in layers
        for leaf in ("scale", "bias")
    ]


WALL_CLOCK = ("time", "images_per_second", "input_seconds", "step_seconds")
"""Fields of a run's files that differ between two runs of the same settings."""


def without_wall_clock(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in WALL_CLOCK}


def run_files(out: Path) -> tuple[dict, list[dict], list[dict]]:
    """summary.json, metrics.jsonl and metrics.csv of a run, wall-clock fields left out."""
    summary = without_wall_clock(json.loads((out / "summary.json").read_text()))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return summary, [without_wall_clock(r) for r in lines], [without_wall_clock(r) for r in rows]


def saved_steps(directory: Path) -> list[int]:
    """The steps of the checkpoints that landed in `directory`."""
    return sorted(int(p.name) for p in directory.glob("*") if p.is_dir() and p.name.isdigit())


def kill_once(argv: list[str], landed) -> dict:
    """Starts `npas` on `argv` and kills it (SIGKILL) as soon as `landed()` holds.

    The child and the processes it started (input workers) are killed together, as a
    crash of the machine would, so that none is left behind. Returns what was seen:
    whether the child was still running when killed, and the checkpoint steps of both
    phases at that moment.
    """
    out = Path(argv[argv.index("--output-dir") + 1])
    command = [sys.executable, "-m", "experiments.cli", *argv]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches its workers
    )
    deadline = time.time() + 600  # catches a hang only
    while not landed(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    running = process.poll() is None
    with contextlib.suppress(ProcessLookupError):  # a group that is gone already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return {
        "running": running,
        "search": saved_steps(out / "search_checkpoints"),
        "training": saved_steps(out / "checkpoints"),
        "searched": (out / "search.json").exists(),
    }


def run_npas(argv: list[str]) -> tuple[int, str, str]:
    """`npas` on `argv` in this process: exit code, stdout, stderr."""
    from experiments.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


SHARED_RUNS = {
    "sweep",
    "uninterrupted",
    "budgeted_run",
    "dense_run",
    "npas_run",
    "split_run",
    "searches",
    "host_devices",
}
"""Module-scoped fixtures that train: every test using one of a module's runs is kept on one
xdist worker (`--dist loadgroup`), so that the run is made once, not once per worker."""


GC_THRESHOLDS = (20_000, 20, 20)
"""Python's garbage collection, in the test processes: every 20,000 allocations instead of
700, and the older generations as rarely. Tracing and lowering allocate millions of small
objects, and at Python's thresholds a test process spent about 5% of its time collecting
(test_npas, test_sublayer, test_model and test_compose in one process: 5,000 collections,
4.9 to 6.5 s of about 95 s; at these, 80 and 1.0 to 1.2 s, the same peak memory). Set
as this module is imported, before the test modules and what they import."""
gc.set_threshold(*GC_THRESHOLDS)


def pytest_collection_finish(session):
    """Freezes the objects that importing the test modules made (JAX, Flax, the library:
    about 290,000), which live as long as the process: the full garbage collections that a
    long test process runs skip them (each walked them for about 0.17 s)."""
    del session
    gc.freeze()


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups the tests of each module's shared runs; puts tests marked `heavy` first.

    xdist hands out the groups first (the largest first), then single tests in this
    order: heavy ones started early leave no worker with a long test at the end.
    """
    del config
    for item in items:
        shared = SHARED_RUNS.intersection(getattr(item, "fixturenames", ()))
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable
