"""Classic post-activation ResNets (He et al., 2016) with a CIFAR or ImageNet stem."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from archs.layers import batch_norm, conv, linear

Stem = Literal["cifar", "imagenet"]


class Projection(nnx.Module):
    """1x1 conv + BN shortcut used when a block changes shape."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None
    ):
        self.conv = conv(in_channels, out_channels, 1, stride, rngs, dtype)
        self.bn = batch_norm(out_channels, rngs, dtype)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, added to the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
        out_channels = channels * self.expansion
        self.conv1 = conv(in_channels, channels, 3, stride, rngs, dtype)
        self.bn1 = batch_norm(channels, rngs, dtype)
        self.conv2 = conv(channels, out_channels, 3, 1, rngs, dtype)
        self.bn2 = batch_norm(out_channels, rngs, dtype)
        if in_channels != out_channels or stride != 1:
            self.shortcut = Projection(in_channels, out_channels, stride, rngs=rngs, dtype=dtype)
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, h / stride, w / stride, channels]."""
        residual = x if self.shortcut is None else self.shortcut(x, train=train)
        out = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        out = self.bn2(self.conv2(out), use_running_average=not train)
        return nnx.relu(out + residual)


class Bottleneck(nnx.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN (4x wider), plus shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None):
        out_channels = channels * self.expansion
        self.conv1 = conv(in_channels, channels, 1, 1, rngs, dtype)
        self.bn1 = batch_norm(channels, rngs, dtype)
        self.conv2 = conv(channels, channels, 3, stride, rngs, dtype)
        self.bn2 = batch_norm(channels, rngs, dtype)
        self.conv3 = conv(channels, out_channels, 1, 1, rngs, dtype)
        self.bn3 = batch_norm(out_channels, rngs, dtype)
        if in_channels != out_channels or stride != 1:
            self.shortcut = Projection(in_channels, out_channels, stride, rngs=rngs, dtype=dtype)
        else:
            self.shortcut = None

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, h / stride, w / stride, 4 * channels]."""
        residual = x if self.shortcut is None else self.shortcut(x, train=train)
        out = nnx.relu(self.bn1(self.conv1(x), use_running_average=not train))
        out = nnx.relu(self.bn2(self.conv2(out), use_running_average=not train))
        out = self.bn3(self.conv3(out), use_running_average=not train)
        return nnx.relu(out + residual)


BLOCKS_PER_STAGE = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nnx.Module):
    """ResNet-18/34/50 with 4 stages of widths 64, 128, 256, 512 and strides 1, 2, 2, 2.

    `stem="cifar"` is a 3x3 stride-1 conv; `stem="imagenet"` is a 7x7 stride-2 conv followed by
    a 3x3 stride-2 max pool. Convs use Kaiming-normal (fan_out) init. `dtype` (e.g.
    `jnp.bfloat16`) is the dtype every layer computes in; params stay float32.
    Input [b, h, w, in_channels], output logits [b, num_classes].
    """

    def __init__(
        self,
        depth: int = 18,
        stem: Stem = "cifar",
        *,
        num_classes: int,
        in_channels: int = 3,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if depth not in BLOCKS_PER_STAGE:
            valid = sorted(BLOCKS_PER_STAGE)
            raise ValueError(f"ResNet depth must be one of {valid}; got {depth}.")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet'; got {stem!r}.")
        block_cls, num_blocks = BLOCKS_PER_STAGE[depth]
        self.stem_type = stem

        if stem == "cifar":
            self.stem_conv = conv(in_channels, 64, 3, 1, rngs, dtype)
        else:
            self.stem_conv = conv(in_channels, 64, 7, 2, rngs, dtype)
        self.stem_bn = batch_norm(64, rngs, dtype)

        stages = []
        channels = 64
        stage_specs = zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks, strict=True)
        for stage_width, stride, count in stage_specs:
            blocks = []
            for i in range(count):
                stride_i = stride if i == 0 else 1
                blocks.append(block_cls(channels, stage_width, stride_i, rngs=rngs, dtype=dtype))
                channels = stage_width * block_cls.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = linear(channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[b, h, w, in_channels] -> [b, num_classes]."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        if self.stem_type == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                x = block(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2)))
