"""Create models by name, e.g. `create("wrn-28-10", num_classes=100, rngs=nnx.Rngs(0))`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flax import nnx

from archs.resnet import ResNet
from archs.vit import ViT
from archs.wide_resnet import WideResNet

Constructor = Callable[..., nnx.Module]
"""Called as `constructor(num_classes=..., in_channels=..., rngs=..., **kwargs)`."""

WRN_PATTERN = re.compile(r"wrn-(\d+)-(\d+(?:\.\d+)?)")
WRN_NAME = "wrn-<depth>-<width>"


def _number(text: str) -> int | float:
    """`"10"` -> 10, `"0.5"` -> 0.5."""
    return float(text) if "." in text else int(text)


def _resnet(depth: int, stem: str) -> Constructor:
    def constructor(**kwargs: Any) -> nnx.Module:
        return ResNet(depth, stem, **kwargs)

    return constructor


def _vit_tiny(**kwargs: Any) -> nnx.Module:
    """ViT-Ti widths with 4x4 patches for 32x32 images; pass e.g. image_size=8, patch_size=2."""
    config = dict(patch_size=4, dim=192, depth=12, heads=3, mlp_dim=768, image_size=32)
    return ViT(**(config | kwargs))


_MODELS: dict[str, Constructor] = {
    **{f"resnet-{d}": _resnet(d, "cifar") for d in (18, 34, 50)},
    **{f"resnet-{d}-imagenet": _resnet(d, "imagenet") for d in (18, 34, 50)},
    "vit-tiny": _vit_tiny,
}


def available() -> list[str]:
    """Known model names; `wrn-<depth>-<width>` stands for any depth 6n + 4 and width > 0.

    The width factor may be fractional (`wrn-28-0.5`: stages of 8, 16, 32 channels).
    """
    return sorted([*_MODELS, WRN_NAME])


def register(name: str, constructor: Constructor) -> None:
    """Makes `create(name, ...)` call `constructor(num_classes=, in_channels=, rngs=, **kwargs)`."""
    if name in _MODELS or name == WRN_NAME or WRN_PATTERN.fullmatch(name):
        raise ValueError(f"Model name {name!r} is already taken.")
    _MODELS[name] = constructor


def create(
    name: str, *, num_classes: int, in_channels: int = 3, rngs: nnx.Rngs, **kwargs: Any
) -> nnx.Module:
    """Builds the model called `name`; extra keyword args go to its constructor.

    A Wide ResNet's `width=` keyword, if given, replaces the width factor in its name:
    `create("wrn-28-1", width=0.5, ...)` builds `wrn-28-0.5`.
    """
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, rngs=rngs, **kwargs)
    if match := WRN_PATTERN.fullmatch(name):
        width = kwargs.pop("width", _number(match[2]))
        return WideResNet(int(match[1]), width, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(available())}.")
    return _MODELS[name](**kwargs)
