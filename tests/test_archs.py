import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx

import archs
from archs import ResNet, ViT, WideResNet, layers


def param_count(model: nnx.Module) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def params_dict(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def batch_stats(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def abstract(name: str, num_classes: int = 10, **kwargs) -> nnx.Module:
    return nnx.eval_shape(
        lambda: archs.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs)
    )


def output_shape(model: nnx.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of `model(x)` traced abstractly, so it works for models from `abstract`."""
    graphdef, state = nnx.split(model)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return jax.eval_shape(apply, state, jax.ShapeDtypeStruct(input_shape, jnp.float32)).shape


def images(shape: tuple[int, ...] = (2, 8, 8, 3)) -> jax.Array:
    return normal(1, shape) * 3.0 + 1.0


def small_vit(**kwargs) -> ViT:
    config = dict(patch_size=4, dim=32, depth=2, heads=4, mlp_dim=64, image_size=8)
    return ViT(**(config | kwargs), num_classes=10, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def wrn_10_1() -> WideResNet:
    return archs.create("wrn-10-1", num_classes=10, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def resnet_18() -> ResNet:
    return archs.create("resnet-18", num_classes=10, rngs=nnx.Rngs(0))


# Wide ResNet


def test_wrn_output_shape(wrn_10_1):
    logits = wrn_10_1(images())
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    assert output_shape(wrn_10_1, (2, 32, 32, 3)) == (2, 10)


@pytest.mark.parametrize(("name", "in_channels"), [("wrn-16-2", 1), ("wrn-28-10", 3)])
def test_wrn_abstract_output_shape(name, in_channels):
    model = abstract(name, num_classes=7, in_channels=in_channels)
    assert output_shape(model, (3, 32, 32, in_channels)) == (3, 7)


def test_wrn_10_1_param_count_by_hand():
    model = abstract("wrn-10-1")
    stem = 3 * 3 * 3 * 16
    stage1 = 2 * 3 * 3 * 16 * 16  # 16 -> 16: identity shortcut
    stage2 = 3 * 3 * 16 * 32 + 3 * 3 * 32 * 32 + 16 * 32  # plus a 1x1 shortcut
    stage3 = 3 * 3 * 32 * 64 + 3 * 3 * 64 * 64 + 32 * 64
    conv_params = stem + stage1 + stage2 + stage3
    kernels = [leaf for leaf in jax.tree.leaves(params_dict(model)) if leaf.ndim == 4]
    assert sum(k.size for k in kernels) == conv_params == 76_720

    bn_params = 2 * (16 + 16 + 16 + 32 + 32 + 64 + 64)  # scale and bias: 2 BNs a block, 1 final
    head_params = 64 * 10 + 10
    assert param_count(model) == conv_params + bn_params + head_params == 77_850


def test_wrn_param_paths():
    params = params_dict(abstract("wrn-10-1"))
    assert params["stem"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stages"][1][0]["conv1"]["kernel"].shape == (3, 3, 16, 32)
    assert params["stages"][1][0]["shortcut"]["kernel"].shape == (1, 1, 16, 32)
    assert "shortcut" not in params["stages"][0][0]
    assert params["head"]["kernel"].shape == (64, 10)


def test_wrn_wide_first_block_has_shortcut():
    params = params_dict(abstract("wrn-16-4"))
    assert params["stages"][0][0]["shortcut"]["kernel"].shape == (1, 1, 16, 64)
    assert "shortcut" not in params["stages"][0][1]


@pytest.mark.parametrize(("num_classes", "expected"), [(10, 36_479_194), (100, 36_536_884)])
def test_wrn_28_10_param_count(num_classes, expected):
    assert param_count(abstract("wrn-28-10", num_classes)) == expected


@pytest.mark.parametrize("depth", [0, 4, 8, 12, 27])
def test_wrn_bad_depth_raises(depth):
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth, 1, num_classes=10, rngs=nnx.Rngs(0))


def test_registry_wrn_bad_depth_raises():
    with pytest.raises(ValueError, match="6n"):
        abstract("wrn-20-2")


# ResNet


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet-18", 11_173_962), ("resnet-34", 21_282_122), ("resnet-50-imagenet", 23_528_522)],
)
def test_resnet_param_counts(name, expected):
    assert param_count(abstract(name)) == expected


def test_resnet_50_imagenet_matches_reference_count():
    assert param_count(abstract("resnet-50-imagenet", num_classes=1000)) == 25_557_032


def test_resnet_18_runs(resnet_18):
    logits = resnet_18(images())
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet-34", 8), ("resnet-50", 8), ("resnet-18-imagenet", 32), ("resnet-50-imagenet", 64)],
)
def test_resnet_abstract_output_shape(name, size):
    assert output_shape(abstract(name, num_classes=5), (2, size, size, 3)) == (2, 5)


def test_resnet_stems_and_projection():
    cifar = params_dict(abstract("resnet-18"))
    imagenet = params_dict(abstract("resnet-18-imagenet"))
    assert cifar["stem_conv"]["kernel"].shape == (3, 3, 3, 64)
    assert imagenet["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    first_block = params_dict(abstract("resnet-50"))["stages"][0][0]
    assert first_block["shortcut"]["conv"]["kernel"].shape == (1, 1, 64, 256)
    assert first_block["shortcut"]["bn"]["scale"].shape == (256,)


def test_resnet_bad_args_raise():
    with pytest.raises(ValueError, match="18"):
        ResNet(20, num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="imagenet"):
        ResNet(18, "tiny", num_classes=10, rngs=nnx.Rngs(0))


def test_conv_kernels_are_hwio_without_bias():
    flat = dict(nnx.to_flat_state(nnx.state(abstract("resnet-50"), nnx.Param)))
    conv_paths = [path for path, leaf in flat.items() if leaf.shape and len(leaf.shape) == 4]
    assert len(conv_paths) == 53
    for path in conv_paths:
        assert path[:-1] + ("bias",) not in flat


# ViT


def test_vit_output_shape():
    model = small_vit()
    logits = model(images())
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    assert output_shape(model, (3, 16, 24, 3)) == (3, 10)  # resized position embedding


def test_vit_has_only_dense_kernels():
    params = params_dict(small_vit())
    assert all(leaf.ndim <= 2 for leaf in jax.tree.leaves(params))
    attn = params["blocks"][0]["attn"]
    for projection in ("query", "key", "value", "out"):
        assert attn[projection]["kernel"].shape == (32, 32)
    assert params["patch_embed"]["kernel"].shape == (4 * 4 * 3, 32)


def test_vit_tiny_registry_kwargs():
    model = abstract("vit-tiny", patch_size=2, image_size=8)
    assert model.pos_embed.shape == (16, 192)
    assert output_shape(model, (2, 8, 8, 3)) == (2, 10)


def test_vit_rejects_indivisible_images():
    with pytest.raises(ValueError, match="divisible"):
        small_vit()(jnp.ones((1, 10, 10, 3)))


# Registry


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        abstract("resnet-19")
    for name in ("resnet-18", "resnet-50-imagenet", "vit-tiny", "wrn-<depth>-<width>"):
        assert name in str(info.value)


def test_available_lists_all_names():
    names = archs.available()
    for name in ("resnet-18", "resnet-34", "resnet-50", "resnet-18-imagenet", "vit-tiny"):
        assert name in names
    assert any(name.startswith("wrn-") for name in names)


def test_register_custom_model():
    class Tiny(nnx.Module):
        def __init__(self, *, num_classes, in_channels, rngs, hidden=4):
            self.head = nnx.Linear(in_channels, num_classes, rngs=rngs)
            self.hidden = hidden

        def __call__(self, x, train=False):
            return self.head(x.mean(axis=(1, 2)))

    archs.register("test-tiny", Tiny)
    model = archs.create("test-tiny", num_classes=3, in_channels=2, rngs=nnx.Rngs(0), hidden=9)
    assert model.hidden == 9
    assert model(jnp.ones((1, 4, 4, 2))).shape == (1, 3)
    assert "test-tiny" in archs.available()
    with pytest.raises(ValueError, match="taken"):
        archs.register("test-tiny", Tiny)
    with pytest.raises(ValueError, match="taken"):
        archs.register("wrn-16-8", Tiny)


# Train / eval behaviour and transforms


@pytest.mark.parametrize("fixture", ["wrn_10_1", "resnet_18"])
def test_batch_stats_update_only_in_train(fixture, request):
    model = nnx.clone(request.getfixturevalue(fixture))
    x = images()
    before = batch_stats(model)

    eval_logits = model(x, train=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, batch_stats(model)))

    train_logits = model(x, train=True)
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, batch_stats(model))
    assert all(jax.tree.leaves(changed))
    assert not np.allclose(eval_logits, train_logits)


def test_functional_jit_matches_eager(wrn_10_1):
    graphdef, params, rest = nnx.split(wrn_10_1, nnx.Param, ...)
    x = images()

    @jax.jit
    def apply(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x, train=False)

    np.testing.assert_allclose(apply(params, rest, x), wrn_10_1(x), rtol=1e-4, atol=1e-4)


def test_vit_jit_matches_eager():
    model = small_vit()
    x = images()
    jitted = nnx.jit(lambda model, x: model(x, train=True))
    np.testing.assert_allclose(jitted(model, x), model(x), rtol=1e-4, atol=1e-4)


def test_nnx_jit_train_step_updates_stats(wrn_10_1):
    model = nnx.clone(wrn_10_1)
    before = batch_stats(model)
    forward = nnx.jit(lambda model, x: model(x, train=True))
    assert forward(model, images()).shape == (2, 10)
    unchanged = jax.tree.map(np.array_equal, before, batch_stats(model))
    assert not any(jax.tree.leaves(unchanged))


@pytest.mark.parametrize("name", ["wrn-16-2", "resnet-50", "resnet-34-imagenet", "vit-tiny"])
def test_abstract_init(name):
    leaves = jax.tree.leaves(nnx.state(abstract(name)))
    assert leaves
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


# FLOPs


def test_count_flops_linear():
    batch, features_in, features_out = 8, 64, 32
    layer = nnx.Linear(features_in, features_out, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    flops = archs.count_flops(apply, state, jnp.ones((batch, features_in)))
    expected = 2 * batch * features_in * features_out
    assert abs(flops - expected) <= 0.05 * expected


# Mixed precision


def conv_and_dot_dtypes(fn, *args) -> set[str]:
    """Operand dtypes of every convolution and matrix product in the jaxpr of `fn(*args)`."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("wrn-10-1", {}),
        ("wrn-10-1", {"exits": True}),
        ("resnet-18", {}),
        ("vit-tiny", dict(image_size=8, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32)),
    ],
)
def test_built_in_architectures_compute_in_bf16_on_the_same_float32_params(name, kwargs):
    full = archs.create(name, num_classes=10, rngs=nnx.Rngs(0), **kwargs)
    half = archs.create(name, num_classes=10, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kwargs)
    full_params, half_params = params_dict(full), params_dict(half)
    for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(half_params), strict=True):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    x = images()
    graphdef, state = nnx.split(half)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x, train=True)

    assert conv_and_dot_dtypes(apply, state, x) == {"bfloat16"}
    # in eval mode (batch statistics of two images would magnify any rounding); each forward
    # is one compiled program, not one per layer's operation
    forward = nnx.jit(lambda model, x, train: model(x, train=train), static_argnums=2)
    expected, out = forward(full, x, False), forward(half, x, False)
    assert out.dtype == jnp.bfloat16 and out.shape == expected.shape
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(out.astype(jnp.float32), expected, atol=0.03 * scale)
    assert not np.array_equal(out.astype(jnp.float32), expected)  # computed in bf16 indeed
    assert forward(half, x, True).dtype == jnp.bfloat16
    stats = [x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.BatchStat))]
    assert all(d == jnp.float32 for d in stats)  # running statistics stay float32


# Initialisers: JAX's values, drawn in a few lengths


def test_draws_are_powers_of_two_of_at_least_2_to_the_16():
    assert [layers.draw_length(n) for n in (1, 144, 65536)] == [65536] * 3
    assert [layers.draw_length(n) for n in (65537, 147456, 262144)] == [131072, 262144, 262144]


INITIALISERS_AND_JAXS_OWN = [
    (layers.kaiming_normal, jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")),
    (layers.lecun_normal, jax.nn.initializers.lecun_normal()),
]


@pytest.mark.parametrize(
    ("ours", "jax_own"), INITIALISERS_AND_JAXS_OWN, ids=["kaiming-normal", "lecun-normal"]
)
@pytest.mark.parametrize("shape", [(3, 3, 1, 16), (1, 1, 16, 32), (300, 10), (3, 3, 128, 128)])
def test_the_initialisers_give_jaxs_values_bit_for_bit(ours, jax_own, shape):
    key = jax.random.key(sum(shape))
    np.testing.assert_array_equal(ours(key, shape), jax_own(key, shape, jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_the_initialisers_give_jaxs_values_in_half_precision_too(dtype):
    key, shape = jax.random.key(5), (3, 3, 8, 16)
    for ours, jax_own in INITIALISERS_AND_JAXS_OWN:
        value = ours(key, shape, dtype)
        assert value.dtype == dtype
        np.testing.assert_array_equal(value, jax_own(key, shape, dtype))


def test_built_in_models_start_from_jaxs_initialisers_values(monkeypatch):
    def built():
        wrn = archs.create("wrn-10-1", num_classes=10, exits=True, rngs=nnx.Rngs(3))
        return params_dict(wrn), params_dict(small_vit())

    ours = built()
    kaiming = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    monkeypatch.setattr(layers, "kaiming_normal", kaiming)
    monkeypatch.setattr(layers, "lecun_normal", jax.nn.initializers.lecun_normal())
    reference = built()
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)
