"""Pre-activation Wide ResNet for CIFAR-sized images (Zagoruyko & Komodakis, 2016)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from archs.layers import batch_norm, conv, linear


def stage_widths(width: float) -> tuple[int, int, int]:
    """Channels of the three stages: 16k, 32k, 64k, rounded to integers (at least 1)."""
    return tuple(max(1, round(base * width)) for base in (16, 32, 64))


class PreActBlock(nnx.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 with an identity or 1x1-conv shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None
    ):
        self.bn1 = batch_norm(in_channels, rngs, dtype)
        self.conv1 = conv(in_channels, out_channels, 3, stride, rngs, dtype)
        self.bn2 = batch_norm(out_channels, rngs, dtype)
        self.conv2 = conv(out_channels, out_channels, 3, 1, rngs, dtype)
        if in_channels != out_channels or stride != 1:
            self.shortcut = conv(in_channels, out_channels, 1, stride, rngs, dtype)
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, h / stride, w / stride, out_channels]."""
        out = nnx.relu(self.bn1(x, use_running_average=not train))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = nnx.relu(self.bn2(out, use_running_average=not train))
        return self.conv2(out) + residual


class ExitHead(nnx.Module):
    """BN-ReLU-global average pool-Linear: a classifier on an intermediate feature map."""

    def __init__(self, channels: int, num_classes: int, *, rngs: nnx.Rngs, dtype=None):
        self.bn = batch_norm(channels, rngs, dtype)
        self.head = linear(channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, channels] -> [b, num_classes]."""
        x = nnx.relu(self.bn(x, use_running_average=not train))
        return self.head(jnp.mean(x, axis=(1, 2)))


class WideResNet(nnx.Module):
    """WRN-depth-width: a 3x3 stem, 3 stages of (depth - 4) / 6 pre-activation blocks, and a head.

    Stage widths are 16k, 32k, 64k with strides 1, 2, 2; convs use Kaiming-normal (fan_out) init.
    A fractional width factor k (e.g. 0.5, for a reduced-width baseline) rounds each stage's
    channel count to the nearest integer (at least 1).
    Input [b, h, w, in_channels], output logits [b, num_classes]; with `exits=True`, early-exit
    heads after the first two stages make it [b, 3, num_classes] (exits in depth order, the
    final head last). `dtype` (e.g. `jnp.bfloat16`) is the dtype every layer computes in;
    params stay float32.
    """

    def __init__(
        self,
        depth: int = 28,
        width: float = 10,
        *,
        num_classes: int,
        in_channels: int = 3,
        exits: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, ...); "
                f"got {depth}."
            )
        if not width > 0:
            raise ValueError(f"WideResNet width factor must be positive; got {width}.")
        blocks_per_stage = (depth - 4) // 6
        widths = stage_widths(width)

        self.stem = conv(in_channels, 16, 3, 1, rngs, dtype)
        stages = []
        channels = 16
        for stage_width, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = []
            for i in range(blocks_per_stage):
                block_stride = stride if i == 0 else 1
                blocks.append(
                    PreActBlock(channels, stage_width, block_stride, rngs=rngs, dtype=dtype)
                )
                channels = stage_width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.final_bn = batch_norm(channels, rngs, dtype)
        self.head = linear(channels, num_classes, dtype=dtype, rngs=rngs)
        self.exit_heads = (
            nnx.List([ExitHead(w, num_classes, rngs=rngs, dtype=dtype) for w in widths[:2]])
            if exits
            else None
        )

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, num_classes] (or [b, 3, num_classes] with exits)."""
        x = self.stem(x)
        early = []
        for index, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train=train)
            if self.exit_heads is not None and index < len(self.exit_heads):
                early.append(self.exit_heads[index](x, train=train))
        x = nnx.relu(self.final_bn(x, use_running_average=not train))
        logits = self.head(jnp.mean(x, axis=(1, 2)))
        return jnp.stack([*early, logits], axis=1) if early else logits
