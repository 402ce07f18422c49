import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import augment
from experiments.augment import Augmentation, cutout, random_crop, random_flip

KEY = jax.random.key(0)


def positive_images(shape, dtype=jnp.float32, seed=1) -> jax.Array:
    """Random values in [1, 2): no pixel is zero, so zeroed pixels are easy to find."""
    values = np.random.default_rng(seed).uniform(1.0, 2.0, shape).astype(np.float32)
    return jnp.asarray(values).astype(dtype)  # drawn on the host: no program per shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "apply",
    [
        lambda k, x: random_crop(k, x, 2),
        random_flip,
        lambda k, x: cutout(k, x, 3),
        lambda k, x: augment.augment(k, x, augment.preset("cifar")),
    ],
    ids=["crop", "flip", "cutout", "cifar"],
)
def test_shape_and_dtype_are_preserved(apply, dtype):
    images = positive_images((5, 7, 6, 3), dtype)
    out = apply(KEY, images)
    assert out.shape == images.shape
    assert out.dtype == dtype


def test_random_crop_output_is_a_window_of_the_zero_padded_input():
    padding, (height, width) = 2, (5, 6)
    images = np.asarray(positive_images((16, height, width, 2)))
    out = np.asarray(random_crop(KEY, jnp.asarray(images), padding))
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = []
    for image, result in zip(padded, out, strict=True):
        matches = [
            (i, j)
            for i, j in itertools.product(range(2 * padding + 1), repeat=2)
            if np.array_equal(image[i : i + height, j : j + width], result)
        ]
        assert len(matches) == 1, "every output must be exactly one window of the padded input"
        offsets.append(matches[0])
    # The offsets are random: not every image is left in place, and they vary over the batch.
    assert len(set(offsets)) > 1
    assert any(offset != (padding, padding) for offset in offsets)


def test_random_crop_without_padding_is_the_identity():
    images = positive_images((4, 5, 5, 1))
    np.testing.assert_array_equal(random_crop(KEY, images, 0), images)


def test_random_flip_gives_the_image_or_its_mirror_and_both_occur():
    images = np.asarray(positive_images((64, 4, 5, 2)))
    out = np.asarray(random_flip(KEY, jnp.asarray(images)))
    kept = [np.array_equal(o, x) for o, x in zip(out, images, strict=True)]
    mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images, strict=True)]
    assert all(k != m for k, m in zip(kept, mirrored, strict=True))  # exactly one of the two
    assert any(kept) and any(mirrored)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_cutout_zeroes_one_clipped_square_and_leaves_the_rest(size):
    batch, height, width = 32, 6, 7
    images = np.asarray(positive_images((batch, height, width, 3)))
    out = np.asarray(cutout(KEY, jnp.asarray(images), size))
    zeroed = np.all(out == 0, axis=-1)
    # Pixels are zeroed in every channel or in none; the rest are untouched.
    np.testing.assert_array_equal(np.any(out == 0, axis=-1), zeroed)
    np.testing.assert_array_equal(out[~zeroed], images[~zeroed])
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    clipped = 0
    for mask in zeroed:
        assert 1 <= mask.sum() <= size * size
        squares = [
            (rows >= r - size // 2)
            & (rows < r - size // 2 + size)
            & (cols >= c - size // 2)
            & (cols < c - size // 2 + size)
            for r in range(height)
            for c in range(width)
        ]
        assert any(np.array_equal(mask, square) for square in squares)
        clipped += mask.sum() < size * size
    if size > 1:
        assert clipped > 0  # some squares cross the border and are clipped there


@pytest.mark.parametrize("config", ["cifar", "mnist", "digits"])
def test_same_key_same_output_other_key_other_output(config):
    images = positive_images((4, 32, 32, 3))
    aug = augment.preset(config)
    first = augment.augment(KEY, images, aug)
    np.testing.assert_array_equal(first, augment.augment(KEY, images, aug))
    assert not np.array_equal(first, augment.augment(jax.random.key(1), images, aug))


def test_augment_jits_and_matches_eager():
    images = positive_images((8, 8, 8, 3))
    aug = augment.preset("cifar")
    jitted = jax.jit(augment.augment, static_argnums=2)
    np.testing.assert_array_equal(jitted(KEY, images, aug), augment.augment(KEY, images, aug))


def test_augment_with_nothing_enabled_is_the_identity():
    images = positive_images((4, 5, 5, 2))
    np.testing.assert_array_equal(augment.augment(KEY, images, Augmentation()), images)


def test_augment_applies_crop_flip_cutout_with_split_keys_in_order():
    images = positive_images((8, 8, 8, 3))
    crop_key, flip_key, cutout_key = jax.random.split(KEY, 3)
    expected = cutout(cutout_key, random_flip(flip_key, random_crop(crop_key, images, 4)), 3)
    config = Augmentation(crop_padding=4, flip=True, cutout=3)
    np.testing.assert_array_equal(augment.augment(KEY, images, config), expected)


def test_presets():
    assert augment.preset("none") == Augmentation()
    assert augment.preset("cifar") == Augmentation(crop_padding=4, flip=True, cutout=16)
    assert augment.preset("digits").crop_padding == 1


def test_unknown_preset_raises_and_lists_the_names():
    with pytest.raises(ValueError, match="unknown augmentation 'autoaugment'") as error:
        augment.preset("autoaugment")
    for name in augment.PRESETS:
        assert repr(name) in str(error.value)
