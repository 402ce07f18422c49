"""Budgets below one full-size template per bank: sub-layer templates built from blocks."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import normal
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.models import build_budgeted, create_members
from search.unshare import (
    coefficient_gradient_groups,
    expand_coefficients,
    layer_coefficient_gradients,
    unshare_plan,
)
from superweights import (
    Budget,
    BudgetError,
    Plan,
    budget_report,
    compose,
    init_bank,
    initial_clusters,
    make_plan,
    own_coefficients,
    tree,
)
from superweights.compose import pieces

IMAGE = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


@functools.cache
def layout(arch: str, scope: str):
    """`(layers, unshared, clusters, coefficients)` of `arch` with 4 bins, from shapes only."""
    modules = nnx.eval_shape(lambda: create_members([arch], num_classes=10, in_channels=3, seed=0))
    plan = build_budgeted(
        modules, Budget(fraction=1.0, scope=scope), IMAGE, share_dense=arch.startswith("vit")
    ).plan
    return plan.layers, plan.unshared, plan.clusters, plan.coefficients


def plan_at(arch: str, budget: Budget, **kwargs) -> Plan:
    layers, unshared, clusters, coefficients = layout(arch, budget.scope)
    return make_plan(layers, unshared, clusters, coefficients, budget, **kwargs)


def bank_entries(plan: Plan) -> int:
    """Entries `init_bank` creates, from its abstract output."""
    bank = jax.eval_shape(functools.partial(init_bank, plan), jax.random.key(0))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(bank))


# --- budgets from 1% ----------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["banks", "model"])
@pytest.mark.parametrize("arch", ["wrn-16-4", "wrn-28-10", "resnet-18", "vit-tiny"])
def test_tight_budgets_fit_the_models(arch, scope):
    for fraction in (0.01, 0.02, 0.05, 0.1):
        budget = Budget(fraction=fraction, scope=scope)
        if (arch, scope, fraction) == ("vit-tiny", "model", 0.01):
            # Its per-member biases, norms, position embedding and head alone are 0.83%.
            with pytest.raises(BudgetError, match=r"minimum is 1\.18% of the model's") as info:
                plan_at(arch, budget)
            minimum = int(str(info.value).split("minimum feasible ")[1].split()[0].replace(",", ""))
            assert plan_at(arch, Budget(params=minimum, scope=scope)).spent == minimum
            continue
        plan = plan_at(arch, budget)
        assert plan.sublayer and all(b.sublayer for b in plan.banks if b.piece_size > 5000)
        assert plan.spent <= plan.budget_params
        assert plan.spent >= 0.99 * plan.budget_params
        assert bank_entries(plan) == plan.template_params + plan.coefficient_params
        # the block coefficients never outnumber the templates they combine, bank by bank
        assert all(b.coefficient_params <= 1.1 * b.template_params for b in plan.banks)


def test_above_the_floor_the_plan_is_the_paper_geometry():
    for fraction in (0.25, 0.3, 0.5):  # the floor is 23.9% with the authors' 5 clusters
        budget = Budget(fraction=fraction)
        plan = plan_at("wrn-28-10", budget)
        assert not plan.sublayer
        paper_only = plan_at("wrn-28-10", budget, sublayer_templates=0)
        assert plan == dataclasses.replace(paper_only, sublayer_templates=plan.sublayer_templates)


def test_report_shows_geometry_and_blocks_per_bank():
    plan = plan_at("wrn-16-4", Budget(fraction=0.05))
    text = budget_report(plan)
    header = text.splitlines()[0].split()
    assert header[:8] == ["cluster", "kernel", "level", "out", "x", "in", "L", "geometry"]
    rows = [line.split() for line in text.splitlines()[2 : 2 + len(plan.banks)]]
    for row, bank in zip(rows, plan.banks, strict=True):
        assert row[5] == ("sub-layer" if bank.sublayer else "full")
        assert (row[6], row[7]) == (f"{bank.size:,}", f"{bank.blocks:,}")
        assert bank.blocks == math.ceil(bank.piece_size / bank.size)
    assert "full-size templates in every bank need" in text


arch_names = st.sampled_from(["wrn-16-4", "wrn-28-10", "resnet-18", "vit-tiny"])


@settings(max_examples=40, deadline=None)
@given(
    arch=arch_names,
    percent=st.floats(0.5, 100.0),
    scope=st.sampled_from(["banks", "model"]),
    bins=st.integers(1, 6),
    templates=st.integers(1, 4),
)
def test_no_plan_exceeds_its_budget(arch, percent, scope, bins, templates):
    layers, unshared, _, _ = layout(arch, scope)
    clusters = initial_clusters(layers, bins)
    coefficients = own_coefficients(clusters, layers)

    def plan(budget: Budget) -> Plan:
        return make_plan(
            layers, unshared, clusters, coefficients, budget, sublayer_templates=templates
        )

    budget = Budget(fraction=percent / 100, scope=scope)
    try:
        result = plan(budget)
    except BudgetError as error:
        minimum = int(str(error).split("minimum feasible ")[1].split()[0].replace(",", ""))
        reference = sum(x.size for x in layers) + (scope == "model") * sum(p.size for p in unshared)
        assert budget.resolve(reference) < minimum
        assert plan(Budget(params=minimum, scope=scope)).spent == minimum
        return
    assert result.spent <= result.budget_params
    assert result.spent == result.budget_params - result.leftover
    assert bank_entries(result) == result.template_params + result.coefficient_params
    with pytest.raises(BudgetError, match=f"minimum feasible {result.minimum_budget:,} "):
        plan(Budget(params=result.minimum_budget - 1, scope=scope))
    assert plan(Budget(params=result.minimum_budget, scope=scope)).spent <= (result.minimum_budget)


# --- composition --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight_model():
    """WRN-16-2 on 8x8 digits-shaped inputs at 3% of its shared kernels."""
    modules = create_members(["wrn-16-2"], num_classes=10, in_channels=1, seed=0)
    model = build_budgeted(modules, Budget(fraction=0.03), jnp.zeros((1, 8, 8, 1)))
    assert all(b.sublayer for b in model.plan.banks)
    params, state = model.init(jax.random.key(1))
    return modules, model, params, state


def test_a_piece_is_its_blocks_laid_end_to_end(tight_model):
    _, model, params, _ = tight_model
    bank = params["bank"]
    for spec in model.plan.banks:
        coefficients = np.asarray(bank["coefficients"][spec.key], np.float64)
        templates = np.asarray(bank["templates"][spec.key], np.float64)
        assert coefficients.shape == (len(spec.groups), spec.blocks, spec.templates)
        assert templates.shape == (spec.templates, spec.size)
        for g in range(len(spec.groups)):
            blocks = [coefficients[g, n] @ templates for n in range(spec.blocks)]
            expected = np.concatenate(blocks)[: spec.piece_size]
            np.testing.assert_allclose(pieces(spec, bank)[g], expected, rtol=1e-5, atol=1e-6)


def test_each_blocks_coefficient_rows_are_orthogonal_unit_vectors_of_their_own():
    plan = plan_at("wrn-16-2", Budget(fraction=0.03), sublayer_templates=4)
    bank = jax.jit(functools.partial(init_bank, plan))(jax.random.key(0))
    assert any(len(s.groups) <= s.templates for s in plan.banks)  # wide banks, 4 templates
    for spec in plan.banks:
        coefficients = np.asarray(bank["coefficients"][spec.key], np.float64)
        assert coefficients.shape == (len(spec.groups), spec.blocks, spec.templates)
        np.testing.assert_allclose(np.linalg.norm(coefficients, axis=-1), 1.0, rtol=1e-5)
        for n in range(spec.blocks):
            rows = coefficients[:, n]  # [groups, templates]
            if len(spec.groups) <= spec.templates:
                np.testing.assert_allclose(rows @ rows.T, np.eye(len(spec.groups)), atol=1e-5)
        # every block is drawn on its own
        assert np.unique(coefficients.round(6), axis=1).shape[1] == spec.blocks


def test_export_then_plain_apply_gives_the_same_logits(tight_model):
    modules, model, params, state = tight_model
    images = normal(2, (4, 8, 8, 1))
    logits, _ = model.apply(params, state, images)
    plain = modules["wrn-16-2"]
    weights = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(weights, model.export(params)["wrn-16-2"])
    nnx.update(plain, weights)
    plain.eval()
    np.testing.assert_allclose(plain(images), logits["wrn-16-2"], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_template_and_coefficient(tight_model):
    _, model, params, state = tight_model
    images = normal(3, (4, 8, 8, 1))

    def loss(bank):
        logits, _ = model.apply({**params, "bank": bank}, state, images, train=True)
        return sum(jnp.sum(jnp.sin(x)) for x in logits.values())

    grads = jax.jit(jax.grad(loss))(params["bank"])
    for spec in model.plan.banks:
        assert (jnp.abs(grads["templates"][spec.key]) > 0).all(), spec.key
        assert (jnp.abs(grads["coefficients"][spec.key]) > 0).all(), spec.key


def test_composed_weights_have_their_layers_own_scale(tight_model):
    # Each composed kernel starts at the standard deviation of the kernel its layer's own
    # initialiser draws (the unbudgeted model's); a scale off by sqrt(2) gives 0.71 or 1.41.
    _, model, params, _ = tight_model
    own = {
        layer.id: layer.read(tree.flatten(member.params))
        for member in model.members
        for layer in model.plan.layers
        if layer.member == member.name
    }
    for layer_id, weight in compose(model.plan, params["bank"]).items():
        if weight.size >= 4096:
            ratio = float(jnp.std(weight)) / float(jnp.std(own[layer_id]))
            assert 0.8 < ratio < 1.25, layer_id


def test_sublayer_plans_round_trip_and_old_files_load():
    plan = plan_at("wrn-16-4", Budget(fraction=0.02))
    assert Plan.from_json(plan.to_json()) == plan
    full = plan_at("wrn-16-4", Budget(fraction=0.5))
    raw = json.loads(full.to_json())
    del raw["sublayer_templates"]
    for bank in raw["banks"]:
        del bank["template_size"]
    assert Plan.from_json(json.dumps(raw)) == full


# --- coefficient sharing and unsharing ---------------------------------------------------------


def test_unsharing_splits_block_coefficients_as_real_copies():
    modules = create_members(["wrn-10-1", "wrn-10-1"], num_classes=10, in_channels=1, seed=0)
    sample = jnp.zeros((1, 8, 8, 1))
    model = build_budgeted(modules, Budget(fraction=0.05), sample)
    plan = model.plan
    # Both members' layers share one coefficient vector per position, as matched layers do.
    leader = {i: i.replace("wrn-10-1_2:", "wrn-10-1_1:") for i, _ in plan.coefficients}
    tied = tuple((i, tuple(leader[g] for g in groups)) for i, groups in plan.coefficients)
    plan = make_plan(plan.layers, plan.unshared, plan.clusters, tied, plan.budget)
    assert plan.sublayer
    params, _ = dataclasses.replace(model, plan=plan).init(jax.random.key(0))
    rng = np.random.default_rng(0)
    weight_grads = {layer.id: rng.normal(size=layer.shape) for layer in plan.layers}
    grads = layer_coefficient_gradients(plan, params["bank"], weight_grads)
    first = plan.layers[0].id
    assert grads[first, 0].shape == plan.bank[plan.cluster_of[first].name, 0].coefficient_shape[1:]
    split = coefficient_gradient_groups(plan, grads, threshold=0.9)
    assert split != plan.coefficients  # random gradients disagree: every sharer splits off
    with pytest.raises(BudgetError, match="unsharing adds"):
        unshare_plan(plan, split)  # the plan spends its whole budget on templates
    roomy = dataclasses.replace(plan, budget_params=plan.budget_params + 100_000)
    new = unshare_plan(roomy, split)
    assert new.coefficient_params > plan.coefficient_params
    new_bank = expand_coefficients(roomy, new, params["bank"])
    before, after = compose(plan, params["bank"]), compose(new, new_bank)
    for layer_id, weight in before.items():
        np.testing.assert_allclose(after[layer_id], weight, rtol=1e-6, atol=1e-7)


def test_an_ensemble_with_early_exits_from_one_sub_layer_bank():
    modules = create_members(
        ["wrn-16-1", "wrn-10-1"], num_classes=10, in_channels=1, seed=0, exits=True
    )
    budget = Budget(fraction=0.05, scope="model")
    model = build_budgeted(modules, budget, jnp.zeros((1, 8, 8, 1)))
    plan = model.plan
    assert plan.sublayer and plan.spent <= plan.budget_params
    assert {layer.member for layer in plan.layers} == {"wrn-16-1", "wrn-10-1"}
    params, state = model.init(jax.random.key(0))
    assert sum(np.size(x) for x in jax.tree_util.tree_leaves(params)) == plan.trainable_params
    images = normal(1, (2, 8, 8, 1))
    logits, _ = model.apply(params, state, images)
    exported = model.export(params)
    for name, module in modules.items():
        weights = nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(weights, exported[name])
        nnx.update(module, weights)
        module.eval()
        plain = module(images)
        for ours, theirs in zip(
            jax.tree_util.tree_leaves(logits[name]), jax.tree_util.tree_leaves(plain), strict=True
        ):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
