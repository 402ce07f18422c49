"""Composition time alone, scaling with the number of members, one against two devices.

    python -m experiments.benchmarks.scaling --arch wrn-16-2 --budget 40% --batch-size 64

Each part prints its figures measured side by side in this one run (medians of
interleaved rounds). The device comparison starts two child processes, one
with `--xla_force_host_platform_device_count=2`, since the device count is
fixed when JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from experiments.benchmarks.train_step import compiled_step, image_shape_argument, time_steps
from experiments.models import build_budgeted, build_dense, create_members
from superweights import Budget, compose


def median_seconds(fn, *args, rounds: int = 5, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


def composition(args, shape) -> None:
    modules = create_members([args.arch], num_classes=10, in_channels=shape[-1], seed=0)
    model = build_budgeted(modules, Budget.parse(args.budget), jnp.zeros((1, *shape)))
    params, _ = model.init(jax.random.key(0))
    forward = jax.jit(lambda bank: compose(model.plan, bank))
    backward = jax.jit(
        jax.grad(lambda bank: sum(jnp.sum(w) for w in compose(model.plan, bank).values()))
    )
    compiled, state, batch, _, _ = compiled_step(model, args.batch_size, shape, 10)
    _, step = time_steps(compiled, state, batch, 3)
    fwd, bwd = median_seconds(forward, params["bank"]), median_seconds(backward, params["bank"])
    print(
        f"composition of {args.arch} at {args.budget}: forward {1e3 * fwd:.2f} ms, "
        f"forward+backward {1e3 * bwd:.2f} ms; one train step (batch {args.batch_size}) "
        f"{1e3 * step:.1f} ms, so composing is {100 * bwd / step:.1f}% of a step"
    )


def members(args, shape) -> None:
    print(f"step time against members (each {args.arch}, batch {args.batch_size}):")
    base = None
    for count in range(1, args.max_members + 1):
        modules = create_members([args.arch] * count, num_classes=10, in_channels=shape[-1], seed=0)
        sample = jnp.zeros((1, *shape))
        row = {}
        for name, model in (
            ("budgeted", build_budgeted(modules, Budget.parse(args.budget), sample)),
            ("dense", build_dense(modules)),
        ):
            compiled, state, batch, _, _ = compiled_step(model, args.batch_size, shape, 10)
            state, _ = time_steps(compiled, state, batch, 1)
            row[name] = statistics.median(
                time_steps(compiled, state, batch, 3)[1] for _ in range(3)
            )
        base = base or row["budgeted"]
        print(
            f"  {count} member(s): budgeted {1e3 * row['budgeted']:.1f} ms "
            f"({row['budgeted'] / base:.2f}x one member), dense {1e3 * row['dense']:.1f} ms, "
            f"budgeted/dense {row['budgeted'] / row['dense']:.3f}"
        )


CHILD = """
import json, sys, time, jax, jax.numpy as jnp
from experiments.benchmarks.train_step import compiled_step, time_steps
from experiments.models import build_budgeted, create_members
from superweights import Budget
arch, budget, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
shape = tuple(json.loads(sys.argv[4]))
modules = create_members([arch], num_classes=10, in_channels=shape[-1], seed=0)
model = build_budgeted(modules, Budget.parse(budget), jnp.zeros((1, *shape)))
compiled, state, batch, _, _ = compiled_step(model, batch_size, shape, 10)
state, _ = time_steps(compiled, state, batch, 2)
times = [time_steps(compiled, state, batch, 3)[1] for _ in range(3)]
print(json.dumps({"devices": jax.device_count(), "step": sorted(times)[1]}))
"""


def devices(args, shape) -> None:
    results = {}
    for count in (1, 2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                args.arch,
                args.budget,
                str(args.batch_size),
                json.dumps(shape),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        results[count] = json.loads(done.stdout.strip().splitlines()[-1])["step"]
    print(
        f"one against two host devices ({args.arch}, batch {args.batch_size}): "
        f"1 device {1e3 * results[1]:.1f} ms, 2 devices {1e3 * results[2]:.1f} ms, "
        f"ratio {results[2] / results[1]:.3f} (forced host devices share this machine's cores)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wrn-16-2")
    parser.add_argument("--budget", default="40%")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-shape", type=image_shape_argument, default="32,32,3")
    parser.add_argument("--max-members", type=int, default=3)
    parser.add_argument("--parts", default="composition,members,devices")
    args = parser.parse_args(argv)
    shape = args.image_shape
    device = jax.devices()[0]
    print(f"on {jax.device_count()} {device.platform} device(s) ({device.device_kind})")
    parts = {"composition": composition, "members": members, "devices": devices}
    for name in args.parts.split(","):
        parts[name](args, shape)


if __name__ == "__main__":
    main()
