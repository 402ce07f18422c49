"""Layer constructors shared by the convolutional models.

`dtype` is the dtype a layer computes in (None: its inputs' and params'); params
are float32 whatever it is, as Flax's `param_dtype` keeps them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

SHORTEST_DRAW = 1 << 16
"""The fewest random values `variance_scaling` draws at once (see there)."""

TRUNCATED_STDDEV = 0.87962566103423978
"""The standard deviation of a standard normal truncated to (-2, 2)."""


def draw_length(size: int) -> int:
    """The length drawn for `size` values: a power of two, at least `SHORTEST_DRAW`."""
    return max(SHORTEST_DRAW, 1 << (size - 1).bit_length())


def variance_scaling(scale: float, mode: str, distribution: str):
    """`jax.nn.initializers.variance_scaling(scale, mode, distribution)` for a kernel
    `[*receptive field, in, out]`: the same values, bit for bit, faster to compile.

    JAX draws value i from the key and i alone (its default, partitionable
    threefry), so the first n values of a longer draw are the draw of n. XLA
    compiles one random-number program per length drawn, about 0.4 s each on a
    CPU; lengths rounded up to a power of two, at least 2^16, let all the kernels
    of a small model share one (`archs.create("wrn-10-1")`: 8 compiles become 1).
    `mode` is "fan_in" or "fan_out"; `distribution` "normal" or "truncated_normal".
    """
    if mode not in ("fan_in", "fan_out") or distribution not in ("normal", "truncated_normal"):
        raise ValueError(f"unsupported variance scaling: {mode!r}, {distribution!r}")

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(shape)
        size = math.prod(shape)
        receptive = math.prod(shape[:-2])
        fan = receptive * shape[-2] if mode == "fan_in" else receptive * shape[-1]
        stddev = jnp.sqrt(jnp.array(scale / fan, dtype))
        length = (draw_length(size),)
        if distribution == "normal":
            values = jax.random.normal(key, length, dtype)
        else:
            values = jax.random.truncated_normal(key, -2, 2, length, dtype)
            stddev = stddev / jnp.array(TRUNCATED_STDDEV, dtype)
        return values[:size].reshape(shape) * stddev

    return init


kaiming_normal = variance_scaling(2.0, "fan_out", "normal")
"""Kaiming-normal over fan_out (He et al., 2015): the reference ResNet and WRN code's init."""

lecun_normal = variance_scaling(1.0, "fan_in", "truncated_normal")
"""Flax's default for dense kernels (`nnx.Linear`), with the same values."""


def conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, rngs: nnx.Rngs, dtype=None
) -> nnx.Conv:
    """Bias-free square conv with "same"-style symmetric padding; kernel is [k, k, in, out]."""
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=kernel // 2,
        use_bias=False,
        kernel_init=kaiming_normal,
        dtype=dtype,
        rngs=rngs,
    )


def batch_norm(num_features: int, rngs: nnx.Rngs, dtype=None) -> nnx.BatchNorm:
    """Batch statistics are computed in float32 whatever `dtype` is (Flax does so)."""
    return nnx.BatchNorm(num_features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.Linear:
    """A dense layer `[in, out]` with a zero bias, initialised as `nnx.Linear` is."""
    return nnx.Linear(in_features, out_features, kernel_init=lecun_normal, dtype=dtype, rngs=rngs)
