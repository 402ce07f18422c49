"""Image augmentation on device, one batch at a time: crop, flip, cutout.

Every function maps `(key, images [batch, h, w, c]) -> images` of the same
shape, so the whole pipeline jits inside the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.settings import AUGMENTATIONS as PRESETS
from experiments.settings import Augmentation


def preset(name: str) -> Augmentation:
    if name not in PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Zero-pads by `padding` and crops back to the original size at random offsets."""
    batch, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flips = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flips, images[:, :, ::-1], images)


def cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Zeroes a `size` x `size` square (clipped at the border) at a random centre."""
    batch, height, width, _ = images.shape
    centres = jax.random.randint(key, (batch, 2), 0, jnp.array([height, width]))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top = centres[:, 0, None, None] - size // 2
    left = centres[:, 1, None, None] - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(inside[..., None], 0.0, images)


def augment(key: jax.Array, images: jax.Array, config: Augmentation) -> jax.Array:
    """Applies `config` to a batch `[batch, h, w, c]`."""
    crop_key, flip_key, cutout_key = jax.random.split(key, 3)
    if config.crop_padding:
        images = random_crop(crop_key, images, config.crop_padding)
    if config.flip:
        images = random_flip(flip_key, images)
    if config.cutout:
        images = cutout(cutout_key, images, config.cutout)
    return images
