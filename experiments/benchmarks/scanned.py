"""Train step of a scanned transformer: budgeted against plain, time and compile.

    python -m experiments.benchmarks.scanned --layers 12 --dim 256 --seq 128 --budget 25%

The transformer is written as model zoos write it, in Linen with its blocks
under `nn.scan` (one kernel `[layers, ...]` per projection) and dropout driven
by `deterministic=`; it goes to `superweights.budgeted` untouched. Its stacked
kernels are composed stack by stack, so the budgeted step keeps the scan and
its compile time does not grow with the depth. Both models run the same jitted
train step in one process, timed in interleaved rounds and compiled without
the persistent cache (see `train_step`).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import linen as nn

from experiments.benchmarks.train_step import (
    compiled_step,
    measure,
    print_runs,
    without_persistent_cache,
)
from experiments.models import DenseModel
from superweights import Budget, SharingRule, budgeted
from superweights.members import make_members


class Block(nn.Module):
    """Pre-norm encoder block: self-attention and a 4x MLP, with dropout."""

    dim: int
    heads: int
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        attention = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.rate)
        y = attention(nn.LayerNorm()(x), deterministic=deterministic)
        x = x + nn.Dropout(self.rate, deterministic=deterministic)(y)
        y = nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x))))
        return x + nn.Dropout(self.rate, deterministic=deterministic)(y), None


class ScannedTransformer(nn.Module):
    """Token ids `[batch, seq]` -> logits `[batch, classes]`; `layers` blocks under `nn.scan`."""

    vocab: int
    seq: int
    dim: int
    heads: int
    layers: int
    classes: int
    rate: float = 0.1

    @nn.compact
    def __call__(self, ids, deterministic: bool = True):
        x = nn.Embed(self.vocab, self.dim)(ids)
        x = x + self.param("position", nn.initializers.normal(0.02), (self.seq, self.dim))
        stack = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.layers,
        )
        x, _ = stack(self.dim, self.heads, self.rate, name="blocks")(x, deterministic)
        return nn.Dense(self.classes, name="classifier")(nn.LayerNorm()(x).mean(1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="25%", help="of the shared kernels' parameters")
    parser.add_argument("--bins", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument(
        "--compiles", type=int, default=2, help="compiles per model; the fastest is reported"
    )
    args = parser.parse_args(argv)
    without_persistent_cache()
    module = ScannedTransformer(
        args.vocab, args.seq, args.dim, args.heads, args.layers, args.classes
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, (args.batch_size, args.seq)).astype(np.int32)
    labels = rng.integers(0, args.classes, args.batch_size).astype(np.int32)
    model = budgeted(
        module,
        Budget.parse(args.budget),
        sample_input=ids[:1],
        rule=SharingRule(share_dense=True),
        bins=args.bins,
    )
    stacked = sum(layer.index is not None for layer in model.plan.layers)
    print(
        f"{len(model.plan.layers)} shared layers ({stacked} of them slices of "
        f"{len({layer.path for layer in model.plan.layers if layer.index is not None})} "
        f"stacked kernels), {len(model.plan.clusters)} clusters"
    )
    plain = DenseModel(tuple(make_members(module, ids[:1], jax.random.key(0))))
    models = {f"budget {args.budget}": model, "plain": plain}
    runs = measure(
        models,
        args,
        lambda m: compiled_step(m, args.batch_size, None, args.classes, batch=(ids, labels)),
    )
    title = (
        f"scanned transformer ({args.layers} layers, dim {args.dim}, seq {args.seq}), "
        f"batch {args.batch_size}"
    )
    print_runs(runs, models, title, rounds=args.rounds, steps=args.steps)


if __name__ == "__main__":
    main()
