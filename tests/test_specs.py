import jax
import jax.numpy as jnp
import pytest
from flax import linen, nnx

from superweights import (
    LayerSpec,
    ParamSpec,
    SharingRule,
    Trace,
    forward_order,
    linen_member,
    nnx_member,
)
from superweights.specs import split_params


class Scrambled(nnx.Module):
    """Attributes declared (and named) in an order unlike the order of use."""

    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(6, 2, rngs=rngs)
        self.zeta = nnx.Conv(4, 6, (1, 1), rngs=rngs)  # used second
        self.alpha = nnx.Conv(5, 4, (3, 3), rngs=rngs)  # used third
        self.mid = nnx.Conv(3, 5, (3, 3), rngs=rngs)  # used first
        self.unused = nnx.Conv(3, 3, (3, 3), rngs=rngs)

    def __call__(self, x, train: bool = False):
        x = self.alpha(self.zeta(self.mid(x)[..., :4])[..., :5])
        return self.head(jnp.concatenate([x, x[..., :2]], -1).mean((1, 2)))


class LinenScrambled(linen.Module):
    def setup(self):
        self.b_last = linen.Conv(2, (1, 1))
        self.a_first = linen.Conv(4, (3, 3))
        self.c_middle = linen.Conv(4, (3, 3))

    def __call__(self, x, train: bool = False):
        return self.b_last(self.c_middle(self.a_first(x))).mean((1, 2))


def test_layer_spec_properties():
    layer = LayerSpec("net", "block.conv.kernel", (3, 3, 16, 32), "float32", depth=2)
    assert layer.id == "net:block.conv.kernel"
    assert layer.spatial == (3, 3)
    assert layer.matrix == (32, 16)  # (out, in)
    assert layer.size == 3 * 3 * 16 * 32
    dense = LayerSpec("net", "fc.kernel", (8, 4), "float32", depth=0)
    assert (dense.spatial, dense.matrix, dense.size) == ((), (4, 8), 32)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("head.kernel", "head"),
        ("head.bias", "head"),
        ("stages.0.head.kernel", "head"),
        ("bn.scale", "norm"),
        ("block.bn1.bias", "norm"),
        ("stages.1.0.norm.scale", "norm"),
        ("BatchNorm_0.scale", "norm"),  # Linen's default name
        ("LayerNorm_1.bias", "norm"),
        ("conv.bias", "bias"),
        ("fc.bias", "bias"),
        ("fc.kernel", "other"),
        ("bn.mean", "other"),
        ("header.kernel", "other"),  # "head" must be a whole path component
    ],
)
def test_param_spec_kind(path, kind):
    spec = ParamSpec("m", path, (4,), "float32")
    assert spec.kind == kind
    assert spec.size == 4


def test_param_spec_size_of_a_scalar_and_a_matrix():
    assert ParamSpec("m", "scale", (), "float32").size == 1
    assert ParamSpec("m", "w", (3, 5), "float32").size == 15


def test_sharing_rule_defaults_share_convolutions_only():
    rule = SharingRule()
    assert rule.selects("stem.kernel", (3, 3, 3, 16))
    assert rule.selects("block.shortcut.kernel", (1, 1, 16, 32))
    assert rule.selects("conv1d.kernel", (5, 4, 4))
    assert not rule.selects("fc.kernel", (64, 10))  # dense: excluded by default
    assert not rule.selects("head.kernel", (1, 1, 64, 10))  # the head, even as a conv
    assert not rule.selects("conv.bias", (16,))
    assert not rule.selects("bn.scale", (16,))
    assert not rule.selects("odd.kernel", (16,))  # 1-D "kernel"
    assert not rule.selects("conv.weight", (3, 3, 3, 16))  # not a kernel name


def test_sharing_rule_share_dense():
    rule = SharingRule(share_dense=True)
    assert rule.selects("fc.kernel", (64, 10))
    assert rule.selects("stem.kernel", (3, 3, 3, 16))
    assert not rule.selects("head.kernel", (64, 10))
    assert not rule.selects("fc.bias", (10,))


def test_sharing_rule_custom_excludes_and_names():
    rule = SharingRule(exclude=("shortcut*", "stem"))
    assert not rule.selects("block.shortcut_conv.kernel", (1, 1, 4, 8))
    assert not rule.selects("stem.kernel", (3, 3, 3, 16))
    assert rule.selects("block.conv.kernel", (3, 3, 4, 8))
    # the default `head` exclusion is replaced, not extended
    assert rule.selects("head.kernel", (1, 1, 4, 8))
    # patterns match whole components, case-sensitively
    assert rule.selects("block.my_shortcut.kernel", (1, 1, 4, 8))
    assert SharingRule(kernel_names=("w",)).selects("conv.w", (3, 3, 4, 8))
    assert not SharingRule(kernel_names=("w",)).selects("conv.kernel", (3, 3, 4, 8))


def test_forward_order_of_a_function_follows_first_use():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones((2, 2)), "d": 1.0}

    def apply(p, x):
        return p["a"] @ (p["c"] @ x) + p["b"].sum() + p["c"].sum()

    assert forward_order(apply, params, jnp.ones((2, 2))) == ["c", "a", "b", "d"]
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.float32), params)
    sample = jax.ShapeDtypeStruct((2, 2), jnp.float32)
    assert forward_order(apply, abstract, sample) == ["c", "a", "b", "d"]


def test_a_kernel_contracted_over_its_leading_axes_is_read_as_a_matrix():
    from superweights import trace_params

    params = {
        "split_out": jnp.ones((6, 2, 3)),  # x @ [6, 2*3]: contracted over axis 0
        "split_in": jnp.ones((2, 3, 4)),  # [.., 2, 3] @ [2*3, 4]: axes 0 and 1
        "trailing": jnp.ones((5, 3, 4)),  # contracted over axis 2: no matrix view
        "twice": jnp.ones((6, 2, 3)),  # read by two different products
    }

    def apply(p, x):
        h = jnp.einsum("bi,ihd->bhd", x, p["split_out"])
        y = jnp.einsum("bhd,hdo->bo", h, p["split_in"])
        z = jnp.einsum("bo,xyo->bxy", y, p["trailing"])
        t = jnp.einsum("bi,ihd->bhd", x, p["twice"]).sum()
        return z.sum() + t + jnp.einsum("bd,ihd->bih", h[:, 0], p["twice"]).sum()

    trace = trace_params(apply, params, jnp.ones((1, 6)))
    assert trace.contracted == {"split_out": 1, "split_in": 2}
    assert trace.dense == set(params)  # no convolution reads any of them
    rule = SharingRule(share_dense=True, kernel_names=tuple(params), keep_output=False)
    layers, _ = split_params("m", params, trace, rule)
    shapes = {layer.path: (layer.shape, layer.held_shape) for layer in layers}
    assert shapes["split_out"] == ((6, 6), (6, 2, 3))
    assert shapes["split_in"] == ((6, 4), (2, 3, 4))
    assert shapes["trailing"] == ((5, 3, 4), None)
    assert layers[0].read({"split_out": jnp.arange(36.0).reshape(6, 2, 3)}).shape == (6, 6)


def test_forward_order_of_an_nnx_model_follows_calls_not_names():
    member = nnx_member("m", nnx.eval_shape(lambda: Scrambled(nnx.Rngs(0))))
    order = forward_order(
        lambda p, x: member.apply_fn(p, member.state, x, False)[0],
        member.params,
        jax.ShapeDtypeStruct((1, 5, 5, 3), jnp.float32),
    )
    kernels = [p for p in order if p.endswith("kernel")]
    assert kernels == [
        "mid.kernel",
        "zeta.kernel",
        "alpha.kernel",
        "head.kernel",
        "unused.kernel",  # never read: last, after the used ones
    ]
    assert order.index("mid.bias") < order.index("zeta.kernel")
    assert sorted(order) == sorted(p for p in _paths(member.params))


def test_forward_order_of_a_linen_model_follows_calls_not_names():
    x = jnp.ones((1, 5, 5, 3))
    member = linen_member("m", LinenScrambled(), x, jax.random.key(0))
    order = forward_order(
        lambda p, x: member.apply_fn(p, member.state, x, False)[0], member.params, x
    )
    assert [p for p in order if p.endswith("kernel")] == [
        "a_first.kernel",
        "c_middle.kernel",
        "b_last.kernel",
    ]


def _paths(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _paths(value, path + ".")
        else:
            yield path


def test_split_params_assigns_depth_in_the_given_order():
    params = {
        "head": {"kernel": jnp.ones((6, 2)), "bias": jnp.ones(2)},
        "late": {"kernel": jnp.ones((1, 1, 4, 6), jnp.bfloat16)},
        "early": {"kernel": jnp.ones((3, 3, 3, 4)), "bias": jnp.ones(4)},
    }
    order = ["early.kernel", "early.bias", "late.kernel", "head.kernel", "head.bias"]
    layers, unshared = split_params("net", params, Trace.from_order(order), SharingRule())
    assert layers == [
        LayerSpec("net", "early.kernel", (3, 3, 3, 4), "float32", 0),
        LayerSpec("net", "late.kernel", (1, 1, 4, 6), "bfloat16", 1),
    ]
    assert unshared == [
        ParamSpec("net", "early.bias", (4,), "float32"),
        ParamSpec("net", "head.kernel", (6, 2), "float32", "excluded by the pattern 'head'"),
        ParamSpec("net", "head.bias", (2,), "float32"),
    ]
    trace = Trace.from_order(order)
    layers, unshared = split_params("net", params, trace, SharingRule(share_dense=True))
    assert [x.path for x in layers] == ["early.kernel", "late.kernel"]  # head still excluded
