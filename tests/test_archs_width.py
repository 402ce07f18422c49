"""Fractional Wide ResNet widths: `wrn-28-0.5` and `create("wrn-28-1", width=0.5)`."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import archs
from archs.wide_resnet import stage_widths


def abstract(name: str, **kwargs) -> nnx.Module:
    return nnx.eval_shape(
        lambda: archs.create(name, num_classes=10, in_channels=1, rngs=nnx.Rngs(0), **kwargs)
    )


def channels(model) -> list[int]:
    """Output channels of every stage's last conv."""
    return [stage[-1].conv2.kernel.shape[-1] for stage in model.stages]


def param_count(model) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    ("width", "expected"),
    [(1, (16, 32, 64)), (10, (160, 320, 640)), (0.5, (8, 16, 32)), (0.3, (5, 10, 19))],
)
def test_stage_widths_scale_and_round(width, expected):
    assert stage_widths(width) == expected


def test_stage_widths_are_at_least_one_channel():
    assert stage_widths(0.01) == (1, 1, 1)


def test_integer_names_are_unchanged():
    model = abstract("wrn-16-2")
    assert channels(model) == [32, 64, 128]
    assert model.stages[0][0].shortcut is not None  # 16 -> 32 channels


def test_fractional_name_scales_the_channels():
    model = abstract("wrn-16-0.5")
    assert channels(model) == [8, 16, 32]
    assert model.stem.kernel.shape[-1] == 16  # the stem keeps 16 channels
    assert model.head.kernel.shape == (32, 10)


def test_width_keyword_replaces_the_width_in_the_name():
    by_keyword = abstract("wrn-16-1", width=0.5)
    by_name = abstract("wrn-16-0.5")
    assert channels(by_keyword) == channels(by_name) == [8, 16, 32]
    assert param_count(by_keyword) == param_count(by_name)


def test_fractional_model_runs_and_is_smaller():
    model = archs.create("wrn-10-0.75", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    assert model(jnp.ones((2, 8, 8, 1))).shape == (2, 10)
    assert param_count(model) < param_count(abstract("wrn-10-1"))


@pytest.mark.parametrize("width", [0, -1, 0.0])
def test_non_positive_width_raises(width):
    with pytest.raises(ValueError, match="positive"):
        abstract("wrn-10-1", width=width)
