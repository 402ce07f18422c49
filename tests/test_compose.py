import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, TinyCNN, chain_specs, normal
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from superweights import (
    Budget,
    SharingRule,
    cluster_coefficients,
    compose,
    init_bank,
    initial_clusters,
    layer_specs,
    make_plan,
    nnx_member,
    own_coefficients,
    superweights,
    tree,
)
from superweights.compose import (
    SHORTEST_DRAW,
    bank_noise,
    draw_length,
    noise_size,
    template_matrix,
)


def plan_for(layers, budget, bins=1, shared=False, unshared=()):
    clusters = initial_clusters(layers, bins)
    coefficients = (cluster_coefficients if shared else own_coefficients)(clusters, layers)
    return make_plan(layers, list(unshared), clusters, coefficients, budget)


def two_level_layers():
    # one 3x3 cluster, chain (out, in) = (4, 2) -> (8, 4): level 1 crops nothing
    return chain_specs("m", [((3, 3), 2, 4), ((3, 3), 4, 8)])


def partial_template_layers():
    # two_level_layers with a second layer at level 0: dense 72 + 72 + 288 = 432, and one
    # template per level (72 + 216 = 288) leaves room for a second 72-entry template at level
    # 0 (3 users) plus a partial one
    return chain_specs("m", [((3, 3), 2, 4), ((3, 3), 2, 4), ((3, 3), 4, 8)])


def random_bank(plan, seed=0) -> dict:
    """A bank of standard normal entries (cheaper than `init_bank`'s orthogonal rows)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    return {
        "templates": {b.key: normal(b.templates, b.piece_size) for b in plan.banks},
        "partial": {b.key: normal(b.partial) for b in plan.banks if b.partial},
        "coefficients": {b.key: normal(len(b.groups), b.num_templates) for b in plan.banks},
    }


# --- composition by hand --------------------------------------------------------------------


def test_compose_places_pieces_by_hand():
    # chain (out, in) = (2, 1) -> (3, 2), 1x1 kernels; one template per level.
    # level 0 is B_out [2, 1]: kernel[in=0, out=o] = p0[o].
    # level 1 keeps [2, 1] and adds B_in [2, 1] (p1[0:2], input 1, outputs 0..1) and then
    # B_out [1, 2] (p1[2:4], output 2, inputs 0..1), so as [in, out]:
    #   [[p0[0], p0[1], p1[2]],
    #    [p1[0], p1[1], p1[3]]]
    layers = chain_specs("m", [((1, 1), 1, 2), ((1, 1), 2, 3)])
    plan = plan_for(layers, Budget(params=6))
    assert [(b.piece_size, b.templates, b.partial) for b in plan.banks] == [(2, 1, 0), (4, 1, 0)]
    bank = {
        "templates": {"c0_l0": jnp.array([[1.0, 2.0]]), "c0_l1": jnp.array([[3.0, 4, 5, 6]])},
        "partial": {},
        # own coefficients: level 0 has a row for l0 (x1) and one for l1 (x2)
        "coefficients": {"c0_l0": jnp.array([[1.0], [2.0]]), "c0_l1": jnp.array([[1.0]])},
    }
    weights = compose(plan, bank)
    np.testing.assert_array_equal(weights["m:l0.kernel"], [[[[1.0, 2.0]]]])
    np.testing.assert_array_equal(weights["m:l1.kernel"][0, 0], [[2.0, 4.0, 5.0], [3.0, 4.0, 6.0]])


def test_compose_lays_out_wide_blocks_by_hand():
    # chain (out, in) = (2, 1) -> (3, 3). Level 1 keeps [2, 1], adds B_in [2, 2] laid out as
    # [new in, kept out]: kernel[1 + i, o] = p1[2 i + o]; then B_out [1, 3] laid out as
    # [in, new out]: kernel[i, 2] = p1[4 + i]. As [in, out]:
    #   [[p0[0], p0[1], p1[4]],
    #    [p1[0], p1[1], p1[5]],
    #    [p1[2], p1[3], p1[6]]]
    layers = chain_specs("m", [((1, 1), 1, 2), ((1, 1), 3, 3)])
    plan = plan_for(layers, Budget(params=9), shared=True)
    assert [b.piece_size for b in plan.banks] == [2, 7]
    bank = {
        "templates": {
            "c0_l0": jnp.array([[10.0, 11.0]]),
            "c0_l1": jnp.arange(7.0)[None],
        },
        "partial": {},
        "coefficients": {"c0_l0": jnp.array([[1.0]]), "c0_l1": jnp.array([[1.0]])},
    }
    kernel = compose(plan, bank)["m:l1.kernel"][0, 0]
    np.testing.assert_array_equal(kernel, [[10.0, 11.0, 4.0], [0.0, 1.0, 5.0], [2.0, 3.0, 6.0]])


def test_compose_crops_by_hand():
    # chain (out, in) = (2, 2) -> (4, 1) (equal sizes, fewer outputs first). Level 1 crops
    # input column 1 away (2 entries) and adds B_out [2, 1]. Level 0 as [in, out]:
    # kernel[i, o] = p0[2 i + o]; level 1: [[p0[0], p0[1], p1[0], p1[1]]].
    layers = chain_specs("m", [((1, 1), 2, 2), ((1, 1), 1, 4)])
    plan = plan_for(layers, Budget(params=6), shared=True)
    (cluster,) = plan.clusters
    assert cluster.chain == ((2, 2), (4, 1))
    assert [level.cropped for level in cluster.levels] == [0, 2]
    bank = {
        "templates": {"c0_l0": jnp.array([[1.0, 2, 3, 4]]), "c0_l1": jnp.array([[5.0, 6]])},
        "partial": {},
        "coefficients": {"c0_l0": jnp.array([[1.0]]), "c0_l1": jnp.array([[1.0]])},
    }
    weights = compose(plan, bank)
    np.testing.assert_array_equal(weights["m:l0.kernel"][0, 0], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(weights["m:l1.kernel"][0, 0], [[1.0, 2.0, 5.0, 6.0]])


def test_superweights_are_coefficients_times_templates_with_padded_partial():
    layers = partial_template_layers()
    # 72 + 216 minimum + 100: level 0 gets a second template and a 28-entry partial one
    plan = plan_for(layers, Budget(params=72 + 216 + 100))
    spec = plan.banks[0]
    assert (spec.templates, spec.partial) == (2, 28)
    bank = random_bank(plan)
    matrix = template_matrix(spec, bank)
    assert matrix.shape == (3, 72)
    np.testing.assert_array_equal(matrix[:2], bank["templates"]["c0_l0"])
    np.testing.assert_array_equal(matrix[2, :28], bank["partial"]["c0_l0"])
    np.testing.assert_array_equal(matrix[2, 28:], np.zeros(72 - 28))
    pieces = superweights(plan, bank)
    # own coefficients: one row per layer reading the level (l0, l1, l2 at level 0; l2 at 1)
    assert pieces["c0_l0"].shape == (3, 72) and pieces["c0_l1"].shape == (1, 216)
    np.testing.assert_allclose(
        pieces["c0_l0"], bank["coefficients"]["c0_l0"] @ matrix, rtol=1e-6, atol=1e-7
    )


# --- the bank -------------------------------------------------------------------------------


def test_init_bank_initialises_every_entry():
    kernels = [((3, 3), 2, 4)] + [((3, 3), 4, 8)] * 3 + [((1, 1), 4, 8)] * 2
    layers = chain_specs("m", kernels)
    # dense 72 + 3 * 288 + 2 * 32 = 1000, banks: 1x1 (32, 2 users), 3x3 level 0 (72, 4 users)
    # and level 1 (216, 3 users). 900 - 320 for one template each = 580 buys 32 + 72 + 216,
    # 72, 72 up to the users, then 32 + 72 up to the cap, and a 12-entry partial of the 1x1:
    # templates (3, 5, 2), several coefficient rows per bank
    plan = plan_for(layers, Budget(params=900), bins=2)
    assert [(b.templates, b.partial) for b in plan.banks] == [(3, 12), (5, 0), (2, 0)]
    bank = init_bank(plan, jax.random.key(3))
    assert set(bank["templates"]) == {b.key for b in plan.banks}
    assert set(bank["partial"]) == {b.key for b in plan.banks if b.partial}
    for spec in plan.banks:
        templates = np.asarray(bank["templates"][spec.key])
        assert templates.shape == (spec.templates, spec.piece_size)
        assert np.isfinite(templates).all()
        assert (templates.std(axis=1) > 0).all()
        if spec.piece_size * spec.templates >= 200:  # He scale for the level's fan-in
            assert templates.std() == pytest.approx(math.sqrt(2 / spec.fan_in), rel=0.25)
        if spec.partial:
            partial = np.asarray(bank["partial"][spec.key])
            assert partial.shape == (spec.partial,)
            assert np.isfinite(partial).all() and partial.std() > 0
        rows = np.asarray(bank["coefficients"][spec.key])
        assert rows.shape == (len(spec.groups), spec.num_templates)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
        if rows.shape[0] <= rows.shape[1]:
            np.testing.assert_allclose(rows @ rows.T, np.eye(rows.shape[0]), atol=1e-5)
    # the values are slices of one draw: slices that overlapped would repeat values (a bank's
    # templates and partial template share one scale, so an overlap repeats them exactly)
    drawn = [bank[part][key].ravel() for part in ("templates", "partial") for key in bank[part]]
    drawn = np.concatenate(drawn)
    assert np.unique(drawn).size == drawn.size


def test_init_bank_depends_on_the_key_and_dtype():
    plan = plan_for(two_level_layers(), Budget(fraction=1.0))
    a, b = init_bank(plan, jax.random.key(0)), init_bank(plan, jax.random.key(1))
    assert not np.allclose(a["templates"]["c0_l0"], b["templates"]["c0_l0"])
    again = init_bank(plan, jax.random.key(0))
    np.testing.assert_array_equal(a["templates"]["c0_l0"], again["templates"]["c0_l0"])
    half = init_bank(plan, jax.random.key(0), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half))


def test_a_bank_drawn_from_the_shared_longer_draw_is_the_one_drawn_in_its_program():
    """`BudgetedModel.init` draws a bank's noise in a program of a power-of-two length (one
    program for many plans); the bank must be the one `init_bank` draws itself, bit for bit."""
    small = plan_for(two_level_layers(), Budget(fraction=1.0))
    large = plan_for(partial_template_layers(), Budget(params=400))
    # the noise of each: templates, partial template and coefficient rows of every bank
    sizes = {
        plan: sum(
            b.templates * b.size + b.partial + len(b.groups) * b.num_templates * max(b.blocks, 1)
            for b in plan.banks
        )
        for plan in (small, large)
    }
    assert noise_size(small) == sizes[small] and noise_size(large) == sizes[large]
    assert sizes[small] != sizes[large]
    key = jax.random.key(7)
    for plan in (small, large):
        noise = bank_noise(plan, key)
        assert noise.shape == (SHORTEST_DRAW,)  # both plans: one length, one program
        initialise = jax.jit(functools.partial(init_bank, plan))
        expected = initialise(key)  # its own draw, of exactly its size
        given = initialise(key, noise=noise)
        for got, want in zip(jax.tree.leaves(given), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("size", "length"),
    [
        (1, 65_536),
        (65_536, 65_536),
        (65_537, 131_072),
        (1_048_576, 1_048_576),  # 2^20
        (1_048_577, 2_097_152),  # 2 x 2^20, also the next power of two
        (3 * 1_048_576 + 5, 4 * 1_048_576),  # 4 x 2^20, also the next power of two
        (4 * 1_048_576 + 1, 5 * 1_048_576),  # not 2^23
    ],
)
def test_the_bank_draw_is_a_power_of_two_then_a_multiple_of_2_to_the_20(size, length):
    assert draw_length(size) == length


# --- shapes, dtypes, gradients --------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_composed_shapes_and_dtypes_match_the_model(param_dtype):
    member = nnx_member("m", TinyCNN(nnx.Rngs(0), param_dtype=param_dtype))
    sample = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    layers, unshared = layer_specs([member], sample, SharingRule())
    assert [x.path for x in layers] == ["stem.kernel", "conv.kernel", "shortcut.kernel"]
    # one 3x3 cluster (out, in) = (4, 3) -> (8, 4) costing 288, one 1x1 of 32; dense 428
    clusters = initial_clusters(layers, 1)
    plan = make_plan(
        layers, unshared, clusters, own_coefficients(clusters, layers), Budget(fraction=0.8)
    )
    weights = jax.jit(lambda key: compose(plan, init_bank(plan, key)))(jax.random.key(0))
    flat = {f"m:{k}": v for k, v in tree.flatten(member.params).items()}
    assert set(weights) == {x.id for x in layers}
    for layer_id, weight in weights.items():
        assert weight.shape == flat[layer_id].shape
        assert weight.dtype == flat[layer_id].dtype == param_dtype
        assert jnp.isfinite(weight.astype(jnp.float32)).all()


def test_gradients_reach_templates_partial_templates_and_coefficients():
    layers = partial_template_layers()
    plan = plan_for(layers, Budget(params=72 + 216 + 100))
    bank = jax.jit(init_bank, static_argnums=0)(plan, jax.random.key(0))
    targets = {x.id: normal(i, x.shape) for i, x in enumerate(layers)}

    def loss(bank):
        weights = compose(plan, bank)
        return sum(jnp.sum(weights[i] * targets[i]) for i in weights)

    grads = jax.jit(jax.grad(loss))(bank)
    assert jax.tree.structure(grads) == jax.tree.structure(bank)
    for spec in plan.banks:
        # every template row and every partial entry is read by some layer
        assert (jnp.abs(grads["templates"][spec.key]).sum(axis=1) > 0).all()
        assert (jnp.abs(grads["coefficients"][spec.key]) > 0).all()
    assert (jnp.abs(grads["partial"]["c0_l0"]) > 0).all()


# --- exact nesting --------------------------------------------------------------------------


def test_shared_coefficients_nest_the_smaller_kernel_in_the_larger():
    layers = two_level_layers()
    # the whole model, 360: 72 above one template per level buys level 0 a second one
    plan = plan_for(layers, Budget(fraction=1.0), shared=True)
    assert plan.banks[0].num_templates > 1
    weights = compose(plan, init_bank(plan, jax.random.key(0)))
    small, big = weights["m:l0.kernel"], weights["m:l1.kernel"]
    assert small.shape == (3, 3, 2, 4) and big.shape == (3, 3, 4, 8)
    np.testing.assert_array_equal(small, big[..., :2, :4])
    assert jnp.abs(big[..., 2:, :]).sum() > 0 and jnp.abs(big[..., :, 4:]).sum() > 0


def test_own_coefficients_do_not_nest():
    layers = two_level_layers()
    plan = plan_for(layers, Budget(fraction=1.0), shared=False)
    assert plan.banks[0].num_templates > 1
    weights = compose(plan, init_bank(plan, jax.random.key(0)))
    difference = weights["m:l0.kernel"] - weights["m:l1.kernel"][..., :2, :4]
    assert jnp.abs(difference).max() > 1e-3


def test_compose_under_jit_equals_eager():
    layers = chain_specs("m", [((3, 3), 3, 4), ((3, 3), 4, 8), ((1, 1), 4, 8), ((3, 3), 8, 8)])
    # dense 1004; 95% buys the 1x1 bank a second template and a partial one
    plan = plan_for(layers, Budget(fraction=0.95), bins=2)
    assert any(b.partial for b in plan.banks)
    bank = random_bank(plan)
    eager = compose(plan, bank)
    jitted = jax.jit(compose, static_argnums=0)(plan, bank)
    assert set(jitted) == set(eager)
    for layer_id, weight in eager.items():
        np.testing.assert_allclose(jitted[layer_id], weight, rtol=1e-5, atol=1e-6)  # sum order


@settings(max_examples=20, deadline=None)
@given(
    kernels=st.lists(
        st.tuples(st.sampled_from([(3, 3), (1, 1)]), st.integers(1, 6), st.integers(1, 6)),
        min_size=1,
        max_size=5,
    ),
    bins=st.integers(1, 3),
    extra=st.integers(0, 400),
)
def test_composed_shapes_and_nesting_hold_for_random_chains(kernels, bins, extra):
    layers = chain_specs("m", kernels)
    clusters = initial_clusters(layers, bins)
    minimum = sum(level.piece_size for c in clusters for level in c.levels)
    dense = sum(layer.size for layer in layers)
    plan = plan_for(layers, Budget(params=min(minimum + extra, dense)), bins=bins, shared=True)
    weights = jax.jit(compose, static_argnums=0)(plan, random_bank(plan))
    for layer in layers:
        assert weights[layer.id].shape == layer.shape
        assert weights[layer.id].dtype == jnp.float32
        assert jnp.isfinite(weights[layer.id]).all()
    # with one coefficient vector per level, a smaller layer is the top-left corner of a
    # larger one whenever no level in between crops into the smaller one's block
    for cluster in plan.clusters:
        by_shape = {plan.layer[i].matrix: weights[i] for i in cluster.layers}
        for r, (out, inp) in enumerate(cluster.chain):
            for s in range(r + 1, len(cluster.chain)):
                kept = [cluster.levels[w].keep for w in range(r + 1, s + 1)]
                if all(rows >= out and cols >= inp for rows, cols in kept):
                    big = by_shape[cluster.chain[s]]
                    np.testing.assert_array_equal(by_shape[(out, inp)], big[..., :inp, :out])


def test_kernels_composed_for_bf16_members_are_the_float32_ones_cast_once():
    from superweights import compose_kernels

    member = nnx_member("m", TinyCNN(nnx.Rngs(0)))
    sample = jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32)
    layers, unshared = layer_specs([member], sample, SharingRule())
    clusters = initial_clusters(layers, 1)
    plan = make_plan(
        layers, unshared, clusters, own_coefficients(clusters, layers), Budget(fraction=0.8)
    )
    bank = init_bank(plan, jax.random.key(0))
    full = compose_kernels(plan, bank)["m"]
    half = jax.jit(lambda b: compose_kernels(plan, b, jnp.bfloat16))(bank)["m"]
    assert set(half) == set(full) == {x.path for x in layers}
    for path, kernel in half.items():
        assert full[path].dtype == jnp.float32 and kernel.dtype == jnp.bfloat16
        np.testing.assert_array_equal(kernel, full[path].astype(jnp.bfloat16))
    # composition itself runs in float32: every product reads float32 operands
    jaxpr = jax.make_jaxpr(lambda b: compose_kernels(plan, b, jnp.bfloat16))(bank).jaxpr
    products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert products and all(v.aval.dtype == jnp.float32 for e in products for v in e.invars)
