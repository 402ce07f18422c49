"""The library checks its own inputs: saved plans, params of another plan, budgets, members."""

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import TinyCNN
from flax import nnx

from superweights import Budget, Plan, PlanError, budgeted


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
        (lambda raw: raw["banks"][0].update(templates="2"), "a value of the wrong type"),
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
