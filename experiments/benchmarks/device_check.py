"""The device check: one command that says whether an accelerator runs the library well.

    python -m experiments.benchmarks.device_check            # one GPU, at most 8 minutes
    python -m experiments.benchmarks.device_check --smoke    # tiny sizes, on the CPU (CI)

It prints the device, then runs four checks, each ending in a PASS or FAIL line:

1. benchmark: the train step (`train_step.py`) of WRN-28-10 at CIFAR-100's
   shape, batch 128, at 1%, 5%, 10% and 25% against the plain model, in
   float32 and in bf16: step-time, compile-time and memory ratios, images per
   second. Fails when a first step's loss is not finite, or a bf16 one is not
   within 5% of the float32 one of the same model.
2. composition: composing the kernels (forward and backward) alone, as a
   share of each budget's step.
3. ensemble: four equal members under `jax.vmap` against a loop over them;
   fails unless both give every member the same logits.
4. training: two epochs of a budgeted WRN-16-4 (bf16) on CIFAR-shaped data;
   fails unless the loss falls and the params stay float32.

No check starts after the time limit (`--time-limit`, 7 minutes by default,
so that the last one ends within 8); one that cannot start fails. The exit
code is 1 when any check failed, 0 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.augment import preset
from experiments.benchmarks.scaling import median_seconds
from experiments.benchmarks.train_step import (
    budgeted_and_plain,
    compiled_step,
    images_per_second,
    measure,
    print_runs,
    without_persistent_cache,
)
from experiments.data import Dataset
from experiments.models import build_budgeted, create_members
from experiments.train import LoopConfig, OptimConfig, all_finite, make_eval_step, train
from superweights import Budget, compose_kernels


class CheckFailed(Exception):
    """A check's result is wrong; the message says what was found."""


@dataclasses.dataclass(frozen=True)
class CheckConfig:
    """Sizes of every check; `FULL` for one GPU, `SMOKE` for the CPU."""

    arch: str = "wrn-28-10"
    num_classes: int = 100
    image_shape: tuple[int, int, int] = (32, 32, 3)
    batch_size: int = 128
    budgets: tuple[str, ...] = ("1%", "5%", "10%", "25%")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    compiles: int = 1
    warmup: int = 2
    rounds: int = 3
    steps: int = 5
    bf16_loss_tolerance: float = 0.05
    ensemble_arch: str = "wrn-16-4"
    ensemble_members: int = 4
    ensemble_budget: str = "25%"
    train_arch: str = "wrn-16-4"
    train_budget: str = "10%"
    train_dtype: str = "bfloat16"
    train_classes: int = 10
    train_images: int = 5120
    test_images: int = 1024
    epochs: int = 2
    time_limit_s: float = 420.0


FULL = CheckConfig()
SMOKE = CheckConfig(
    arch="wrn-10-1",
    num_classes=10,
    image_shape=(8, 8, 3),
    batch_size=8,
    budgets=("10%",),
    warmup=1,
    rounds=1,
    steps=1,
    ensemble_arch="wrn-10-1",
    ensemble_members=2,
    ensemble_budget="50%",
    train_arch="wrn-10-1",
    train_images=128,
    test_images=32,
    time_limit_s=900.0,
)


@dataclasses.dataclass
class Deadline:
    """The time left of the check's limit, counted from its creation."""

    limit_s: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, what: str) -> None:
        """Raises `CheckFailed` once the limit is spent, before `what` starts."""
        if self.elapsed() > self.limit_s:
            raise CheckFailed(
                f"{what} not started: {self.elapsed():.0f} s of the {self.limit_s:.0f}-s limit "
                "were spent before it"
            )


def cifar_shaped(
    num_train: int, num_test: int, image_shape, num_classes: int, seed: int = 0
) -> Dataset:
    """Images `[n, h, w, c]` that are their class's coarse pattern plus noise.

    CIFAR in shape only: nothing is read from disk, and a network learns it in
    an epoch or two, so a falling loss is a fair test of training.
    """
    rng = np.random.default_rng(seed)
    height, width, channels = image_shape
    coarse = rng.standard_normal((num_classes, 4, 4, channels))
    patterns = coarse.repeat(-(-height // 4), axis=1).repeat(-(-width // 4), axis=2)
    patterns = patterns[:, :height, :width]

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.standard_normal((n, height, width, channels))
        return (patterns[labels] + noise).astype(np.float32), labels

    return Dataset("cifar-shaped", *split(num_train), *split(num_test), num_classes)


def print_device() -> None:
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    memory = f", {stats['bytes_limit'] / 2**30:.1f} GiB" if "bytes_limit" in stats else ""
    print(
        f"device: {jax.device_count()} x {device.platform} ({device.device_kind}{memory}); "
        f"jax {jax.__version__}, backend {jax.default_backend()}"
    )


def check_benchmark(config: CheckConfig, results: dict, deadline: Deadline) -> None:
    """Budgeted against plain train steps in every dtype; first-step losses compared."""
    image_shape, classes = config.image_shape, config.num_classes

    def compile_model(model):
        return compiled_step(model, config.batch_size, image_shape, classes)

    for dtype in config.dtypes:
        deadline.check(f"the {dtype} benchmark")
        models = budgeted_and_plain(
            config.arch,
            list(config.budgets),
            num_classes=classes,
            image_shape=image_shape,
            dtype=dtype,
        )
        compile_model(models["plain"])  # untimed: one-time costs (autotuning, caches) paid here
        runs = measure(models, config, compile_model)
        title = f"{config.arch}, batch {config.batch_size}, {image_shape}, {dtype}"
        print_runs(runs, models, title, rounds=config.rounds, steps=config.steps)
        for run in runs.values():  # what later checks read stays; device memory is freed
            del run["compiled"], run["state"]
        results[dtype] = (models, runs)
    for name in results[config.dtypes[0]][1]:
        losses = {
            dtype: runs[name]["first_metrics"]["loss"] for dtype, (_, runs) in results.items()
        }
        print(
            f"{name:>14}: first-step loss " + ", ".join(f"{d} {x:.4f}" for d, x in losses.items())
        )
    problems = loss_problems(results, config.bf16_loss_tolerance)
    if problems:
        raise CheckFailed("; ".join(problems))


def loss_problems(results: dict, tolerance: float) -> list[str]:
    """What is wrong with the first-step losses `results[dtype][1][model]["first_metrics"]`:
    any not finite, or any more than `tolerance` (relative) from the first dtype's."""
    reference, (_, expected) = next(iter(results.items()))
    problems = []
    for dtype, (_, runs) in results.items():
        for name, run in runs.items():
            loss, want = run["first_metrics"]["loss"], expected[name]["first_metrics"]["loss"]
            if not (math.isfinite(loss) and math.isfinite(want)):
                problems.append(f"{name} in {dtype}: first-step loss {loss}")
            elif abs(loss - want) > tolerance * abs(want):
                problems.append(
                    f"{name}: {dtype} first-step loss {loss:.4f} is more than {tolerance:.0%} "
                    f"from {reference}'s {want:.4f}"
                )
    return problems


def check_composition(config: CheckConfig, results: dict, deadline: Deadline) -> None:
    """Composition alone (float32 bank to kernels, and back) as a share of each step."""
    del config
    if not results:
        raise CheckFailed("needs the benchmark's step times, which did not come")
    models, _ = next(iter(results.values()))
    for name, model in models.items():
        if name == "plain":
            continue
        deadline.check(f"composition at {name}")
        bank = model.init(jax.random.key(0))[0]["bank"]

        def composed(bank, model=model):
            return compose_kernels(model.plan, bank, model.dtype)

        def total(bank, model=model):
            leaves = jax.tree_util.tree_leaves(composed(bank, model))
            return sum(jnp.sum(w.astype(jnp.float32)) for w in leaves)

        gradient = jax.jit(jax.grad(total))
        if not bool(all_finite(gradient(bank))):
            raise CheckFailed(f"composition at {name}: gradients that are not finite")
        forward, both = median_seconds(jax.jit(composed), bank), median_seconds(gradient, bank)
        shares = ", ".join(
            f"{100 * both / statistics.median(runs[name]['times']):.2f}% of a {dtype} step"
            for dtype, (_, runs) in results.items()
        )
        print(
            f"composition at {name}: forward {1e3 * forward:.2f} ms, forward+backward "
            f"{1e3 * both:.2f} ms; {shares}"
        )


def check_ensemble(config: CheckConfig, results: dict, deadline: Deadline) -> None:
    """Equal members under `jax.vmap` against a loop: the same logits, and their step times."""
    del results
    deadline.check("the ensemble")
    shape = config.image_shape
    modules = create_members(
        [config.ensemble_arch] * config.ensemble_members,
        num_classes=config.num_classes,
        in_channels=shape[-1],
        seed=0,
    )
    model = build_budgeted(
        modules, Budget.parse(config.ensemble_budget), jnp.zeros((1, *shape), jnp.float32)
    )
    models = {
        "vmap": dataclasses.replace(model, vectorize=True),
        "loop": dataclasses.replace(model, vectorize=False),
    }
    params, state = model.init(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (config.batch_size, *shape))
    logits = {
        name: make_eval_step(m)(params, state, images) for name, m in models.items()
    }  # eval mode: the same running statistics for both
    for member, expected in logits["loop"].items():
        scale = float(jnp.abs(expected).max())
        gap = float(jnp.abs(logits["vmap"][member] - expected).max())
        if not gap <= 1e-2 * scale:
            raise CheckFailed(
                f"member {member}'s logits differ by {gap:.3g} under vmap and in a loop "
                f"(largest logit {scale:.3g})"
            )

    def compile_model(m):
        return compiled_step(m, config.batch_size, shape, config.num_classes)

    runs = measure(models, config, compile_model)
    times = {name: statistics.median(run["times"]) for name, run in runs.items()}
    print(
        f"{config.ensemble_members} x {config.ensemble_arch} at {config.ensemble_budget} "
        f"(one bank), batch {config.batch_size}: vmap {1e3 * times['vmap']:.2f} ms "
        f"({images_per_second(runs['vmap']):.1f} images/s), loop {1e3 * times['loop']:.2f} ms "
        f"({images_per_second(runs['loop']):.1f} images/s), vmap/loop "
        f"{times['vmap'] / times['loop']:.3f}; compile vmap {runs['vmap']['compile_s']:.1f} s, "
        f"loop {runs['loop']['compile_s']:.1f} s"
    )


def check_training(config: CheckConfig, results: dict, deadline: Deadline) -> None:
    """A budgeted model trained a few epochs on CIFAR-shaped data: its loss must fall."""
    del results
    deadline.check("the training")
    shape = config.image_shape
    dataset = cifar_shaped(config.train_images, config.test_images, shape, config.train_classes)
    modules = create_members(
        [config.train_arch],
        num_classes=config.train_classes,
        in_channels=shape[-1],
        seed=0,
        dtype=config.train_dtype,
    )
    model = build_budgeted(
        modules,
        Budget.parse(config.train_budget),
        jnp.zeros((1, *shape), jnp.float32),
        dtype=config.train_dtype,
    )
    loop = LoopConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        eval_batch_size=config.batch_size,
        augmentation=preset("none"),
    )
    epochs: list[dict] = []
    state, metrics = train(
        model, dataset, loop, OptimConfig(), progress=False, on_epoch=epochs.append
    )
    losses = [m["train_loss"] for m in epochs]
    print(
        f"{config.train_arch} at {config.train_budget} ({config.train_dtype}), "
        f"{len(dataset.train_images):,} CIFAR-shaped images: train loss by epoch "
        f"{', '.join(f'{x:.4f}' for x in losses)}; test accuracy {metrics['test_accuracy']:.2%}; "
        f"{epochs[-1]['images_per_second']:.1f} images/s in the last epoch"
    )
    if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
        raise CheckFailed(f"the train loss did not fall: {losses}")
    kept = {str(x.dtype) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))}
    if not kept <= {"float32", "int32"}:
        raise CheckFailed(f"params and optimizer state are {sorted(kept)}, not float32")


Check = Callable[[CheckConfig, dict, Deadline], None]

CHECKS: tuple[tuple[str, Check], ...] = (
    ("benchmark", check_benchmark),
    ("composition", check_composition),
    ("ensemble", check_ensemble),
    ("training", check_training),
)


def run_checks(config: CheckConfig) -> list[str]:
    """Runs every check in order, printing PASS or FAIL for each; the names of the failed."""
    deadline, results, failed = Deadline(config.time_limit_s), {}, []
    for name, check in CHECKS:
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        try:
            check(config, results, deadline)
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the next check
            if not isinstance(error, CheckFailed):
                traceback.print_exc(file=sys.stderr)
            failed.append(name)
            print(f"FAIL {name} ({time.perf_counter() - start:.0f} s): {error}", flush=True)
        else:
            print(f"PASS {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
    if "peak_bytes_in_use" in stats:
        print(f"\ndevice peak memory (whole process) {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
    passed = len(CHECKS) - len(failed)
    print(
        f"\ndevice check: {passed} of {len(CHECKS)} checks passed in {deadline.elapsed():.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU and CI")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds after which no further check starts (default {FULL.time_limit_s:.0f}; "
        f"{SMOKE.time_limit_s:.0f} with --smoke)",
    )
    args = parser.parse_args(argv)
    config = SMOKE if args.smoke else FULL
    if args.time_limit is not None:
        config = dataclasses.replace(config, time_limit_s=args.time_limit)
    without_persistent_cache()  # compile times are XLA's, not reads of a cache
    print_device()
    return 1 if run_checks(config) else 0


if __name__ == "__main__":
    sys.exit(main())
