"""Train-step time, compile time and memory: budgeted model against the plain one.

    python -m experiments.benchmarks.train_step --arch wrn-16-4 --budget 10% --batch-size 128
    python -m experiments.benchmarks.train_step --arch wrn-28-10 --budget 5% --dtype bfloat16

Both models are built from the same architecture and stepped with the same
jitted train step (SGD, Nesterov, weight decay) in one process; timings are
interleaved round by round so that load on the machine hits both alike, and the
median per step is reported, with the images per second it makes. Compile time
is lowering plus XLA compilation: the command turns JAX's persistent compilation
cache off for its process (`without_persistent_cache`), so that a compile is never
a read of an earlier one from the directory `JAX_COMPILATION_CACHE_DIR` names. Memory is XLA's
own account of the compiled step (arguments, outputs and temporaries) and, where
the backend reports it, the device's peak use. `--dtype bfloat16` has the
members compute in bf16 (params, bank and optimizer state stay float32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import augment
from experiments.config import ConfigError, parse_image_shape
from experiments.models import COMPUTE_DTYPES, build_budgeted, build_dense, create_members
from experiments.train import OptimConfig, TrainState, make_optimizer, make_train_step
from superweights import Budget, BudgetError


def image_shape_argument(text: str) -> tuple[int, int, int]:
    """`--image-shape`'s parser: `"32,32,3"` -> `(32, 32, 3)`; anything else is a usage error."""
    try:
        return parse_image_shape(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--image-shape ")) from None


def without_persistent_cache() -> None:
    """Turns JAX's persistent compilation cache off for this process.

    JAX decides whether to use the cache at its first compile, so this is called
    first thing; a benchmark's compile times are then XLA's own. A process that
    has already compiled with the cache on keeps it, and its compile times may be
    reads of earlier compiles.
    """
    jax.config.update("jax_enable_compilation_cache", False)


def compiled_step(model, batch_size: int, image_shape, num_classes: int, seed: int = 0, batch=None):
    """`(compiled step, initial state, batch, compile seconds, memory bytes)`.

    `batch`, `(inputs, labels)`, replaces the random images (e.g. token ids).
    """
    params, model_state = model.init(jax.random.key(seed))
    optimizer = make_optimizer(OptimConfig(), 1000, model.weight_decay_mask(params))
    state = TrainState(
        jnp.array(0), params, model_state, optimizer.init(params), jax.random.key(seed + 1)
    )
    step = make_train_step(model, optimizer, augment.preset("none"))
    if batch is None:
        rng = np.random.default_rng(seed)
        images = rng.standard_normal((batch_size, *image_shape), np.float32)
        labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
    else:
        images, labels = batch
    start = time.perf_counter()
    compiled = step.lower(state, images, labels).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = None
    if memory is not None:
        total = sum(
            getattr(memory, f"{part}_size_in_bytes", 0)
            for part in ("argument", "output", "temp", "generated_code")
        )
    return compiled, state, (images, labels), seconds, total


def time_steps(compiled, state, batch, steps: int):
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, *batch)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / steps


def measure(models: dict, args, compile_model) -> dict:
    """Compiles every model's step, warms it up, then times all in interleaved rounds.

    `compile_model(model)` returns what `compiled_step` does; `args` holds
    `compiles`, `warmup`, `rounds` and `steps`. The first compile in a process
    also pays for one-time tracing caches, so each model is compiled
    `compiles` times and the fastest is kept. The metrics of each model's first
    step (untimed, from its initial state) are kept as `first_metrics`.
    """
    runs = {}
    for name, model in models.items():
        attempts = [compile_model(model) for _ in range(max(1, args.compiles))]
        compiled, state, batch, _, memory = attempts[-1]
        seconds = min(attempt[3] for attempt in attempts)
        state, first = compiled(state, *batch)
        if args.warmup > 1:
            state, _ = time_steps(compiled, state, batch, args.warmup - 1)
        runs[name] = {
            "compiled": compiled,
            "state": state,
            "batch": batch,
            "compile_s": seconds,
            "memory": memory,
            "first_metrics": {k: float(v) for k, v in first.items()},
            "times": [],
        }
    for _ in range(args.rounds):  # interleaved: load on the machine hits every model alike
        for run in runs.values():
            run["state"], seconds = time_steps(
                run["compiled"], run["state"], run["batch"], args.steps
            )
            run["times"].append(seconds)
    return runs


def images_per_second(run: dict) -> float:
    """Training images a second at the run's median step time."""
    return len(run["batch"][1]) / statistics.median(run["times"])


def print_runs(runs: dict, models: dict, title: str, *, rounds: int, steps: int) -> None:
    """One line per model, then each budgeted model's ratios to `runs["plain"]`."""
    device = jax.devices()[0]
    print(f"{title}, on {jax.device_count()} {device.platform} device(s) ({device.device_kind})")
    plain = runs["plain"]
    for name, run in runs.items():
        model = models[name]
        params = model.plan.trainable_params if name != "plain" else model.trainable_params
        memory = f"{run['memory'] / 2**20:.1f} MiB" if run["memory"] else "n/a"
        print(
            f"{name:>14}: {params:>11,} params, step {1e3 * statistics.median(run['times']):9.2f}"
            f" ms (median of {rounds}x{steps}), {images_per_second(run):8.1f} images/s, "
            f"compile {run['compile_s']:6.2f} s, XLA memory {memory}"
        )
    for name, run in runs.items():
        if name == "plain":
            continue
        step_ratio = statistics.median(run["times"]) / statistics.median(plain["times"])
        line = (
            f"{name:>14} / plain: step-time ratio {step_ratio:.3f}, "
            f"compile-time ratio {run['compile_s'] / plain['compile_s']:.3f}"
        )
        if run["memory"] and plain["memory"]:
            line += f", memory ratio {run['memory'] / plain['memory']:.3f}"
        print(line)


def resolve_budget(text: str, modules, sample) -> tuple[Budget, str]:
    """The asked-for budget, or, if it is infeasible, the smallest feasible whole percent."""
    budget = Budget.parse(text)
    try:
        build_budgeted(modules, budget, sample)
        return budget, ""
    except BudgetError:
        probe = build_budgeted(modules, Budget(fraction=1.0), sample).plan
        reference = sum(layer.size for layer in probe.layers)
        percent = int(np.ceil(100 * probe.minimum_budget / reference))
        note = (
            f"{budget.describe()} is below this model's smallest feasible budget "
            f"({probe.minimum_budget:,} = {probe.minimum_budget / reference:.1%}); "
            f"measuring at {percent}% instead"
        )
        return Budget(fraction=percent / 100), note


def budgeted_and_plain(
    arch: str, budgets: list[str], *, num_classes: int, image_shape, dtype: str = "float32"
) -> dict:
    """`{"budget 5.00%": model, ..., "plain": model}`: one architecture at each budget,
    and unbudgeted, all on the same initial members computing in `dtype`.

    An infeasible budget is measured at the smallest feasible whole percentage
    (`resolve_budget`), and said so.
    """
    modules = create_members(
        [arch], num_classes=num_classes, in_channels=image_shape[-1], seed=0, dtype=dtype
    )
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    models = {}
    for text in budgets:
        budget, note = resolve_budget(text.strip(), modules, sample)
        if note:
            print(note)
        name = f"budget {budget.describe().split()[0]}"
        models[name] = build_budgeted(modules, budget, sample, dtype=dtype)
    models["plain"] = build_dense(modules)
    return models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wrn-16-4")
    parser.add_argument(
        "--budget", default="10%", help="one budget or several, comma-separated (1%%,5%%,10%%)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-shape", type=image_shape_argument, default="32,32,3")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--dtype", default="float32", choices=tuple(COMPUTE_DTYPES), help="what members compute in"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument(
        "--compiles", type=int, default=2, help="compiles per model; the fastest is reported"
    )
    args = parser.parse_args(argv)
    without_persistent_cache()
    image_shape = args.image_shape
    models = budgeted_and_plain(
        args.arch,
        args.budget.split(","),
        num_classes=args.num_classes,
        image_shape=image_shape,
        dtype=args.dtype,
    )
    runs = measure(
        models,
        args,
        lambda model: compiled_step(model, args.batch_size, image_shape, args.num_classes),
    )
    print_runs(
        runs,
        models,
        f"{args.arch}, batch {args.batch_size}, {image_shape}, {args.dtype}",
        rounds=args.rounds,
        steps=args.steps,
    )
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        print(f"device peak memory (whole process) {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
