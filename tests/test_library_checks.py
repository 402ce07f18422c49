"""The library checks its own inputs: saved plans, params of another plan, budgets, members."""

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import TinyCNN
from flax import nnx

from superweights import (
    Budget,
    LayerSpec,
    Plan,
    PlanError,
    budgeted,
    initial_clusters,
    make_plan,
    own_coefficients,
)


@pytest.fixture(scope="module")
def model():
    x = jnp.zeros((2, 6, 6, 3))
    return budgeted(TinyCNN(nnx.Rngs(0), width=8), Budget(fraction=0.6), sample_input=x)


def edited(plan: Plan, edit) -> str:
    """`plan`'s JSON after `edit(raw dict)` changed it in place."""
    raw = json.loads(plan.to_json())
    edit(raw)
    return json.dumps(raw)


def test_a_saved_plan_loads_as_it_was(model):
    assert Plan.from_json(model.plan.to_json()) == model.plan


def test_a_plan_with_more_templates_than_its_budget_pays_for_is_refused(model):
    def more_templates(raw):
        raw["banks"][0]["templates"] = 10**6

    with pytest.raises(PlanError, match=r"spends [\d,]+ parameters .* against a budget of"):
        Plan.from_json(edited(model.plan, more_templates))


def test_a_plan_whose_budget_was_raised_by_hand_is_refused(model):
    def raise_budget(raw):
        raw["budget_params"] *= 2

    with pytest.raises(PlanError, match="budget_params .* is not its budget"):
        Plan.from_json(edited(model.plan, raise_budget))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", "the plan has no field 'layers', 'unshared', 'clusters'"),
        ("[1, 2]", "a plan is a JSON object, got a list"),
        ("{'layers': }", "a plan is JSON text, and this is not"),
    ],
)
def test_a_plan_that_is_not_one_is_named(text, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(text)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["layers"][0].pop("shape"), r"the plan's layers\[0\] is malformed"),
        (lambda raw: raw.update(layers="all"), "the plan's field 'layers' is a list"),
        (lambda raw: raw.update(budget={"fraction": 2.0}), "field 'budget' is malformed"),
        (lambda raw: raw["clusters"][0]["layers"].pop(), "is in no cluster"),
        (lambda raw: raw["clusters"][0]["layers"].append("x:y"), "in a cluster but not among"),
        (lambda raw: raw["coefficients"].pop(), "coefficients must name every layer"),
        (lambda raw: raw["banks"].pop(), "the plan has no bank for level"),
        (lambda raw: raw["banks"][0].update(piece_size=7), "does not match its level: piece 7"),
        (lambda raw: raw["banks"][0].update(templates="2"), "templates is a count, a whole"),
        (lambda raw: raw["layers"].append(raw["layers"][0]), "lists layer .* twice"),
    ],
)
def test_a_damaged_plan_names_what_is_wrong(model, edit, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(edited(model.plan, edit))


def test_params_of_another_plan_name_the_bank_entry_and_both_shapes(model):
    x = jnp.zeros((2, 6, 6, 3))
    smaller = budgeted(TinyCNN(nnx.Rngs(0), width=8), Budget(fraction=0.3), sample_input=x)
    params, state = smaller.init(jax.random.key(0))
    entry = r"bank entry templates/c\d_l\d is \[\d+, \d+\] in the params but \[\d+, \d+\] in"
    with pytest.raises(ValueError, match=entry + " the plan; these params belong to another"):
        model.export(params)
    with pytest.raises(ValueError, match="bank entry"):
        model.apply(params, state, x)
    own, _ = model.init(jax.random.key(0))
    del own["unshared"]["model"]["head.bias"]
    with pytest.raises(ValueError, match=r"unshared param model:head.bias is missing"):
        model.export(own)
    with pytest.raises(ValueError, match=r"params are \{'bank': ..., 'unshared': ...\}"):
        model.export({"bank": params["bank"]})


@pytest.mark.parametrize("budget", [0.5, "10%", 50_000])
def test_budgeted_says_how_to_write_a_budget(budget):
    x = jnp.zeros((2, 6, 6, 3))
    with pytest.raises(TypeError, match=r"write it as a Budget, e.g. Budget\(fraction=0.1\)"):
        budgeted(TinyCNN(nnx.Rngs(0)), budget, sample_input=x)


def test_members_with_other_input_channels_name_the_member_that_cannot_run():
    class OneChannel(TinyCNN):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)

    x = jnp.zeros((2, 6, 6, 3))
    models = {"rgb": TinyCNN(nnx.Rngs(0)), "grey": OneChannel(nnx.Rngs(1))}
    with pytest.raises(ValueError, match="member 'grey' cannot run on sample_input"):
        budgeted(models, Budget(fraction=0.5), sample_input=x)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["banks"][0].update(templates=1.5), "templates is a count, a whole"),
        (lambda raw: raw["banks"][0].update(templates=-1), "templates is a count, a whole"),
        (lambda raw: raw["banks"][0].update(fan_in=True), "fan_in is a count"),
    ],
)
def test_a_plan_with_a_count_that_is_no_whole_number_is_refused(model, edit, message):
    with pytest.raises(PlanError, match=r"the plan's banks\[0\] is malformed: .*" + message):
        Plan.from_json(edited(model.plan, edit))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"bins": True}, "bins must be a whole number of at least 1, got True"),
        ({"bins": 0}, "bins must be a whole number of at least 1, got 0"),
        ({"sublayer_templates": -1}, "sublayer_templates must be a whole number of at least 0"),
        ({"sublayer_templates": 1.0}, "sublayer_templates must be a whole number"),
    ],
)
def test_budgeted_refuses_counts_that_are_not_whole_numbers(setting, message):
    x = jnp.zeros((2, 6, 6, 3))
    with pytest.raises(ValueError, match=message):
        budgeted(TinyCNN(nnx.Rngs(0)), Budget(fraction=0.5), sample_input=x, **setting)


@pytest.mark.parametrize(
    "inputs, given",
    [
        (jnp.zeros((2, 6, 6, 1)), r"\[2, 6, 6, 1\] \(conv_general_dilated"),  # other channels
        (jnp.zeros((2, 6, 6)), r"\[2, 6, 6\]$"),  # another rank: refused before any trace
        (jnp.zeros((2, 36 * 3)), r"\[2, 108\]$"),
    ],
)
def test_apply_names_the_member_the_inputs_it_takes_and_those_given(model, inputs, given):
    params, state = model.init(jax.random.key(0))
    expected = r"member 'model' takes inputs shaped like its sample_input, \[batch, 6, 6, 3\]; "
    with pytest.raises(ValueError, match=expected + "apply was given " + given):
        model.apply(params, state, inputs)


def test_apply_takes_other_spatial_sizes_the_model_can_run_on(model):
    params, state = model.init(jax.random.key(0))
    logits, _ = model.apply(params, state, jnp.zeros((3, 10, 10, 3)))  # global pooling
    assert logits["model"].shape == (3, 5)


@pytest.mark.parametrize(
    "sample, message",
    [
        ([[1, 2, 3]], "sample_input is a list; give an array"),
        ((jnp.zeros((1, 6, 6, 3)),), "sample_input is a tuple; give an array"),
        ({"x": 3}, r"sample_input holds a int \(3\); give arrays"),
    ],
)
def test_a_sample_input_that_is_no_array_is_named(sample, message):
    with pytest.raises(TypeError, match=message):
        budgeted(TinyCNN(nnx.Rngs(0)), Budget(fraction=0.5), sample_input=sample)


def test_a_budget_below_the_minimum_states_the_minimum_with_one_bin():
    from superweights import BudgetError

    layers = [
        LayerSpec("m", f"l{depth}.kernel", (3, 3, 16, 16), "float32", depth) for depth in range(8)
    ]
    four_bins = minimum_of(layers, bins=4)
    one_bin = minimum_of(layers, bins=1)
    assert one_bin < four_bins
    shared = 8 * 9 * 16 * 16
    clusters = initial_clusters(layers, 4)
    with pytest.raises(BudgetError) as error:
        make_plan(layers, [], clusters, own_coefficients(clusters, layers), Budget(params=10))
    assert (
        f"(the minimum is {four_bins / shared:.2%} of the shared kernels' {shared:,} parameters "
        f"in banks scope; with bins=1 (one cluster per kernel size) it would be {one_bin:,}, "
        f"{one_bin / shared:.2%})"
    ) in str(error.value)


def minimum_of(layers, bins: int) -> int:
    clusters = initial_clusters(layers, bins)
    plan = make_plan(layers, [], clusters, own_coefficients(clusters, layers), Budget(fraction=1.0))
    return plan.minimum_budget
