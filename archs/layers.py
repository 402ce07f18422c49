"""Layer constructors shared by the convolutional models.

`dtype` is the dtype a layer computes in (None: its inputs' and params'); params
are float32 whatever it is, as Flax's `param_dtype` keeps them.
"""

from __future__ import annotations

from flax import nnx

# Kaiming-normal over fan_out (He et al., 2015), the init used by the reference ResNet and WRN code.
kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


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
