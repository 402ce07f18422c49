"""Models written as public Flax model zoos write them, each budgeted in one call.

Each is trained a few steps (its loss falls) and exported exactly: the
unmodified model on the exported params gives the budgeted model's logits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import normal
from flax import linen as nn
from flax import nnx

from superweights import Budget, Inputs, SharingRule, budgeted
from superweights.members import linen_member, train_mode

CLASSES = 3


def fit(model, inputs: Inputs, labels, steps: int = 12, rate: float = 3e-3):
    """Trains `model` with Adam on one batch; the losses, first to last, and the result."""
    params, state = model.init(jax.random.key(0))
    optimizer = optax.adam(rate)
    opt_state = optimizer.init(params)

    def loss_fn(params, state, key):
        logits, new_state = model.apply(params, state, inputs, train=True, rng=key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits["model"], labels).mean()
        return loss, new_state

    @jax.jit
    def step(params, state, opt_state, key):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for key in jax.random.split(jax.random.key(1), steps):
        params, state, opt_state, loss = step(params, state, opt_state, key)
        losses.append(float(loss))
    return losses, params, state


def assert_learns(losses):
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


# --- A Linen ResNet with no train flag: batch statistics follow `mutable`.


class BottleneckFreeBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        norm = nn.BatchNorm(use_running_average=not self.is_mutable_collection("batch_stats"))
        y = nn.relu(norm(nn.Conv(self.features, (3, 3), use_bias=False)(x)))
        return x + nn.Conv(self.features, (3, 3), use_bias=False)(y)


class MutableResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        for _ in range(2):
            x = BottleneckFreeBlock(8)(x)
        return nn.Dense(CLASSES, name="fc")(x.mean((1, 2)))


def images_and_labels(n=16, shape=(8, 8, 3)):
    x = normal(3, (n, *shape))
    return x, jnp.arange(n) % CLASSES


def test_linen_resnet_without_a_train_flag_trains_and_exports_exactly():
    x, labels = images_and_labels()
    module = MutableResNet()
    assert train_mode(module.__call__) is None
    model = budgeted(module, Budget(fraction=0.5), sample_input=x[:1], bins=1)
    assert [layer.path for layer in model.plan.layers][0] == "Conv_0.kernel"
    losses, params, state = fit(model, Inputs(x), labels)
    assert_learns(losses)
    init_stats = model.init(jax.random.key(0))[1]["model"]["batch_stats"]
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.abs(a - b).max()), state["model"]["batch_stats"], init_stats
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # statistics were updated in training
    exported = model.export(params)["model"]
    plain = module.apply({"params": exported, **state["model"]}, x)
    logits, _ = model.apply(params, state, x)
    np.testing.assert_allclose(plain, logits["model"], rtol=1e-5, atol=1e-5)


def test_a_linen_member_starts_from_the_values_of_the_modules_own_init():
    """Its params and state are what Linen's own `init` gives for the same key streams."""
    x = images_and_labels()[0][:1]
    key = jax.random.key(4)
    member = linen_member("model", MutableResNet(), x, key)
    params_key, dropout_key = jax.random.split(key)  # the streams a Linen init is given
    expected = MutableResNet().init({"params": params_key, "dropout": dropout_key}, x)
    got = {"params": member.params, **member.state}
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


# --- A transformer classifier taking ids and a mask, with dropout and `deterministic=`.


class EncoderBlock(nn.Module):
    dim: int
    rate: float = 0.1

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        attention_mask = nn.make_attention_mask(mask, mask)
        y = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=self.rate)(
            nn.LayerNorm()(x), mask=attention_mask, deterministic=deterministic
        )
        x = x + nn.Dropout(self.rate)(y, deterministic=deterministic)
        y = nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x))))
        return x + nn.Dropout(self.rate)(y, deterministic=deterministic)


class TextClassifier(nn.Module):
    vocab: int = 20
    dim: int = 16

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        x = nn.Embed(self.vocab, self.dim)(input_ids)
        for _ in range(2):
            x = EncoderBlock(self.dim)(x, attention_mask, deterministic)
        weights = attention_mask[..., None] / attention_mask.sum(-1, keepdims=True)[..., None]
        return nn.Dense(CLASSES, name="classifier")((x * weights).sum(1))


def tokens(n=16, length=6, vocab=20):
    ids = jax.random.randint(jax.random.key(4), (n, length), 0, vocab)
    mask = (jnp.arange(length)[None] < (2 + jnp.arange(n)[:, None] % (length - 1))).astype(int)
    return ids, mask, (ids[:, 0] % CLASSES)


@pytest.mark.heavy
def test_transformer_with_dropout_and_a_mask_trains_and_exports_exactly():
    ids, mask, labels = tokens()
    module = TextClassifier()
    assert train_mode(module.__call__) == ("deterministic", False)
    model = budgeted(
        module,
        Budget(fraction=0.5),
        sample_input=Inputs(ids[:1], attention_mask=mask[:1]),
        rule=SharingRule(share_dense=True),
        bins=2,
    )
    assert model.members[0].needs_rng
    projections = {
        layer.path.split(".")[-2]: (layer.shape, layer.held_shape)
        for layer in model.plan.layers
        if "MultiHeadDotProductAttention_0" in layer.path and "EncoderBlock_0" in layer.path
    }
    assert projections == {  # [dim, heads, head dim] kernels shared as dim x dim matrices
        "query": ((16, 16), (16, 2, 8)),
        "key": ((16, 16), (16, 2, 8)),
        "value": ((16, 16), (16, 2, 8)),
        "out": ((16, 16), (2, 8, 16)),
    }
    kept = {p.path: p.reason for p in model.plan.unshared if p.reason}
    assert "output layer" in kept["classifier.kernel"]
    assert "model:classifier.kernel" in model.report()
    params, state = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match="pass rng="):
        model.apply(params, state, ids, attention_mask=mask, train=True)
    first, _ = model.apply(
        params, state, ids, attention_mask=mask, train=True, rng=jax.random.key(5)
    )
    again, _ = model.apply(
        params, state, ids, attention_mask=mask, train=True, rng=jax.random.key(6)
    )
    assert not np.allclose(first["model"], again["model"])  # dropout draws from the key
    losses, params, state = fit(model, Inputs(ids, attention_mask=mask), labels, steps=20)
    assert_learns(losses)
    exported = model.export(params)["model"]
    plain = module.apply({"params": exported}, ids, mask, deterministic=True)
    logits, _ = model.apply(params, state, ids, attention_mask=mask)
    np.testing.assert_allclose(plain, logits["model"], rtol=1e-5, atol=1e-5)


@dataclasses.dataclass
class OutputWithLogits:
    logits: jax.Array


class ClassifierWithOutputObject(nn.Module):
    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        return OutputWithLogits(TextClassifier()(input_ids, attention_mask, deterministic))


@dataclasses.dataclass
class PretrainedStyleModel:
    """What transformer libraries hand out: a Linen `.module` and its `.params`."""

    module: nn.Module
    params: dict


def test_an_object_with_module_and_params_keeps_its_weights_as_initial_values():
    ids, mask, labels = tokens()
    module = ClassifierWithOutputObject()
    pretrained = module.init(jax.random.key(9), ids[:1], mask[:1])["params"]
    model = budgeted(
        PretrainedStyleModel(module, pretrained),
        Budget(fraction=0.6),
        sample_input=Inputs(ids[:1], attention_mask=mask[:1]),
        rule=SharingRule(share_dense=True),
    )
    params, state = model.init(jax.random.key(0))
    unshared = params["unshared"]["model"]
    embedding = "TextClassifier_0.Embed_0.embedding"
    np.testing.assert_array_equal(
        unshared[embedding], pretrained["TextClassifier_0"]["Embed_0"]["embedding"]
    )
    losses, params, state = fit(model, Inputs(ids, attention_mask=mask), labels, steps=20)
    assert_learns(losses)
    exported = model.export(params)["model"]
    plain = module.apply({"params": exported}, ids, mask).logits
    np.testing.assert_allclose(
        plain,
        model.apply(params, state, ids, attention_mask=mask)[0]["model"],
        rtol=1e-5,
        atol=1e-5,
    )


# --- Stacked layers: `nn.scan` and `nnx.scan`.


class ScannedBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(self.dim)(nn.relu(nn.Dense(2 * self.dim)(x))), None


class LinenScanned(nn.Module):
    layers: int = 4
    dim: int = 16

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim)(x)
        stack = nn.scan(
            ScannedBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = stack(self.dim, name="blocks")(x, None)
        return nn.Dense(CLASSES, name="logits")(x)


def vectors_and_labels(n=16, dim=8):
    x = normal(7, (n, dim))
    return x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)


def test_an_nn_scan_stack_is_one_layer_per_slice_and_composes_the_stack():
    x, labels = vectors_and_labels()
    module = LinenScanned()
    model = budgeted(
        module, Budget(fraction=0.4), sample_input=x[:1], rule=SharingRule(share_dense=True), bins=2
    )
    stacked = [layer for layer in model.plan.layers if layer.index is not None]
    assert len(stacked) == 2 * module.layers
    first = [(layer.path, layer.index) for layer in stacked[:4]]
    assert first == [  # interleaved as the scan runs them (Dense_1 is called first)
        ("blocks.Dense_1.kernel", 0),
        ("blocks.Dense_0.kernel", 0),
        ("blocks.Dense_1.kernel", 1),
        ("blocks.Dense_0.kernel", 1),
    ]
    assert {layer.shape for layer in stacked} == {(16, 32), (32, 16)}
    assert "logits.kernel" in [p.path for p in model.plan.unshared]
    losses, params, state = fit(model, Inputs(x), labels)
    assert_learns(losses)
    exported = model.export(params)["model"]
    assert exported["blocks"]["Dense_1"]["kernel"].shape == (module.layers, 16, 32)
    plain = module.apply({"params": exported}, x)
    np.testing.assert_allclose(
        plain, model.apply(params, state, x)[0]["model"], rtol=1e-5, atol=1e-5
    )


def test_a_stack_of_dense_kernels_is_not_shared_without_share_dense():
    x, _ = vectors_and_labels()
    with pytest.raises(ValueError, match=r"share_dense=True"):
        budgeted(LinenScanned(), Budget(fraction=0.5), sample_input=x[:1])


class NnxBlock(nnx.Module):
    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(dim, dim, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(dim, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        return x + self.drop(nnx.relu(self.norm(self.conv(x))))


class NnxScanned(nnx.Module):
    """No train flag: `deterministic` and `use_running_average` are set per mode."""

    def __init__(self, layers: int, dim: int, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, dim, (3, 3), rngs=rngs)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(dim, rngs)

        self.blocks = make(rngs)
        self.classifier = nnx.Linear(dim, CLASSES, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, block):
            return block(x)

        return self.classifier(run(self.stem(x), self.blocks).mean((1, 2)))


def test_an_nnx_scan_stack_with_dropout_and_no_train_flag_trains_and_exports_exactly():
    x, labels = images_and_labels()
    module = NnxScanned(3, 8, nnx.Rngs(0, dropout=1))
    model = budgeted(module, Budget(fraction=0.5), sample_input=x[:1], bins=2)
    stacked = [layer for layer in model.plan.layers if layer.index is not None]
    assert [layer.index for layer in stacked] == [0, 1, 2]
    assert model.members[0].needs_rng
    params, state = model.init(jax.random.key(0))
    eval_a, _ = model.apply(params, state, x)
    eval_b, _ = model.apply(params, state, x)
    np.testing.assert_array_equal(eval_a["model"], eval_b["model"])  # deterministic in eval
    losses, params, state = fit(model, Inputs(x), labels)
    assert_learns(losses)
    exported = model.export(params)["model"]
    graphdef, weights, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    nnx.replace_by_pure_dict(weights, exported)
    nnx.replace_by_pure_dict(rest, state["model"])
    plain_module = nnx.merge(graphdef, weights, rngs, rest)
    plain_module.eval()
    logits, _ = model.apply(params, state, x)
    np.testing.assert_allclose(plain_module(x), logits["model"], rtol=1e-5, atol=1e-5)


# --- Overrides, hand-written members and the messages when a model cannot be budgeted.


class EvalModeNet(nn.Module):
    """Told its mode by a keyword no convention uses: `eval_mode`."""

    @nn.compact
    def __call__(self, x, eval_mode: bool = True):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Dropout(0.5, deterministic=eval_mode)(nn.Conv(8, (3, 3))(x))
        return nn.Dense(CLASSES)(x.mean((1, 2)))


def test_train_kwarg_names_a_keyword_the_signature_does_not_reveal():
    x, _ = images_and_labels(n=4)
    module = EvalModeNet()
    assert train_mode(module.__call__) is None
    assert train_mode(module.__call__, ("eval_mode", False)) == ("eval_mode", False)
    detected = budgeted(module, Budget(fraction=0.8), sample_input=x[:1])
    assert not detected.members[0].needs_rng  # never told to train: dropout stays off
    model = budgeted(
        module, Budget(fraction=0.8), sample_input=x[:1], train_kwarg=("eval_mode", False)
    )
    assert model.members[0].needs_rng
    params, state = model.init(jax.random.key(0))
    a, _ = model.apply(params, state, x, train=True, rng=jax.random.key(1))
    b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(2))
    assert not np.allclose(a["model"], b["model"])
    eval_a, _ = model.apply(params, state, x)
    eval_b, _ = model.apply(params, state, x)
    np.testing.assert_array_equal(eval_a["model"], eval_b["model"])


def test_keep_output_false_shares_the_classifier_with_share_dense():
    ids, mask, _ = tokens()
    sample = Inputs(ids[:1], attention_mask=mask[:1])
    shared = SharingRule(share_dense=True, keep_output=False)
    model = budgeted(TextClassifier(), Budget(fraction=0.5), sample_input=sample, rule=shared)
    assert "classifier.kernel" in [layer.path for layer in model.plan.layers]
    assert "classifier.kernel" not in [p.path for p in model.plan.unshared]


def test_a_hand_written_member_gets_the_rng_key_it_names():
    """A Member for a function no module wraps: `rng` reaches it only in training."""
    from superweights import Member

    seen = []

    def apply_fn(params, state, x, train, rng=None):
        seen.append(rng is None)
        h = jax.lax.conv_general_dilated(
            x, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        if train:
            h = h * jax.random.bernoulli(rng, 0.5, h.shape) * 2.0
        return h.mean((1, 2)) @ params["out"], state

    init = normal(0, (3, 3, 3, 8)) * 0.1
    member = Member(
        "hand",
        {"conv": init, "out": jnp.ones((8, CLASSES))},
        {},
        apply_fn,
        needs_rng=True,
    )
    x = normal(1, (4, 6, 6, 3))
    model = budgeted(
        {"hand": member},
        Budget(fraction=0.9),
        sample_input=x,
        rule=SharingRule(kernel_names=("conv",)),
    )
    assert [layer.path for layer in model.plan.layers] == ["conv"]
    params, state = model.init(jax.random.key(2))
    a, _ = model.apply(params, state, x, train=True, rng=jax.random.key(3))
    b, _ = model.apply(params, state, x, train=True, rng=jax.random.key(4))
    assert a["hand"].shape == (4, CLASSES)
    assert not np.allclose(a["hand"], b["hand"])
    with pytest.raises(ValueError, match="pass rng="):
        model.apply(params, state, x, train=True)
    assert not seen[-1]


def test_an_unsupported_model_type_is_refused_with_what_to_do():
    x, _ = images_and_labels(n=2)
    with pytest.raises(TypeError, match=r"member 'model' is a dict.*Bring your own model"):
        budgeted({"model": {"conv": x}}, Budget(fraction=0.5), sample_input=x)


def test_a_sample_input_the_model_cannot_take_names_the_member():
    x, _ = images_and_labels(n=2, shape=(8, 8, 5))
    module = NnxScanned(2, 8, nnx.Rngs(0))  # its stem takes 3 channels
    with pytest.raises(ValueError, match=r"member 'small' cannot run on sample_input"):
        budgeted({"small": module}, Budget(fraction=0.5), sample_input=x)


# --- transformers' Flax conventions: NCHW pixel values, text models' several inputs.


@dataclasses.dataclass
class ClassifierOutput:
    logits: jax.Array


class PixelModule(nn.Module):
    """Takes NHWC pixel values, as transformers' Flax vision modules do."""

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        x = nn.relu(nn.Conv(8, (3, 3))(pixel_values))
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return ClassifierOutput(nn.Dense(CLASSES, name="classifier")(x.mean((1, 2))))


@dataclasses.dataclass
class PixelModel:
    """As transformers' Flax vision models: a Linen `.module`, its `.params`, and a call that
    takes NCHW pixel values and hands its module NHWC."""

    module: nn.Module
    params: dict
    main_input_name: str = "pixel_values"

    def __call__(self, pixel_values, params=None):
        nhwc = jnp.transpose(pixel_values, (0, 2, 3, 1))
        return self.module.apply({"params": params or self.params}, nhwc)


def test_an_object_taking_nchw_pixel_values_is_budgeted_and_applied_in_nchw():
    pixels = normal(3, (4, 3, 8, 8))  # NCHW
    module = PixelModule()
    zoo = PixelModel(
        module, module.init(jax.random.key(0), pixels[:1].transpose(0, 2, 3, 1))["params"]
    )
    model = budgeted(zoo, Budget(fraction=0.5), sample_input=pixels[:1])
    params, state = model.init(jax.random.key(0))
    logits, _ = model.apply(params, state, pixels)
    exported = model.export(params)["model"]
    np.testing.assert_allclose(logits["model"], zoo(pixels, exported).logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[batch, 3, 8, 8\]; apply was given \[4, 8, 8, 3\]"):
        model.apply(params, state, pixels.transpose(0, 2, 3, 1))  # NHWC: the module's, not its


class TextModule(nn.Module):
    """Every input required, as transformers' Flax text modules (BERT) take them."""

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        position_ids,
        head_mask,
        deterministic: bool = True,
    ):
        assert head_mask is None
        x = nn.Embed(50, 16)(input_ids) + nn.Embed(2, 16)(token_type_ids)
        x = x + nn.Embed(16, 16)(position_ids)
        mask = nn.make_attention_mask(attention_mask, attention_mask)
        attention = nn.SelfAttention(2, dropout_rate=0.1)
        x = x + attention(nn.LayerNorm()(x), mask=mask, deterministic=deterministic)
        x = x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))
        return ClassifierOutput(nn.Dense(CLASSES, name="classifier")(x[:, 0]))


@pytest.mark.heavy
def test_a_text_module_gets_the_inputs_its_models_own_call_fills_in():
    ids = jax.random.randint(jax.random.key(4), (8, 7), 0, 50)
    mask = jnp.ones_like(ids).at[:, 5:].set(0)
    labels = jnp.arange(8) % CLASSES
    model = budgeted(
        TextModule(),
        Budget(fraction=0.5),
        sample_input=Inputs(ids[:1], attention_mask=mask[:1]),
        rule=SharingRule(share_dense=True),
    )
    losses, params, state = fit(model, Inputs(ids, attention_mask=mask), labels)
    assert_learns(losses)
    logits, _ = model.apply(params, state, ids, attention_mask=mask)
    by_hand = TextModule().apply(
        {"params": model.export(params)["model"]},
        ids,
        mask,
        jnp.zeros_like(ids),
        jnp.broadcast_to(jnp.arange(7), ids.shape),
        None,
    )
    np.testing.assert_allclose(logits["model"], by_hand.logits, atol=1e-5)


# --- transformers' own Flax models (4.x), where transformers is installed.


def test_transformers_flax_vit_takes_nchw_pixel_values_as_its_own_call_does():
    transformers = pytest.importorskip("transformers", minversion="4.0")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=CLASSES,
    )
    vit = transformers.FlaxViTForImageClassification(config, seed=0)
    pixels = normal(3, (8, 3, 8, 8))  # NCHW, as vit(pixels) takes
    model = budgeted(
        vit, Budget(fraction=0.5), sample_input=pixels[:1], rule=SharingRule(share_dense=True)
    )
    losses, params, state = fit(model, pixels, jnp.arange(8) % CLASSES)
    assert_learns(losses)
    logits, _ = model.apply(params, state, pixels)
    exported = vit(pixels, params=model.export(params)["model"]).logits
    np.testing.assert_allclose(logits["model"], exported, atol=1e-4)


def test_transformers_flax_bert_takes_ids_and_a_mask_as_its_own_call_does():
    transformers = pytest.importorskip("transformers", minversion="4.0")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    bert = transformers.FlaxBertForSequenceClassification(config, seed=0)
    ids = jax.random.randint(jax.random.key(4), (8, 7), 0, 50)
    mask = jnp.ones_like(ids).at[:, 5:].set(0)
    model = budgeted(
        bert,
        Budget(fraction=0.5),
        sample_input=Inputs(ids[:1], attention_mask=mask[:1]),
        rule=SharingRule(share_dense=True),
    )
    losses, params, state = fit(model, Inputs(ids, attention_mask=mask), jnp.arange(8) % CLASSES)
    assert_learns(losses)
    logits, _ = model.apply(params, state, ids, attention_mask=mask)
    exported = bert(ids, attention_mask=mask, params=model.export(params)["model"]).logits
    np.testing.assert_allclose(logits["model"], exported, atol=1e-4)
