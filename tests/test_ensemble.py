import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import ensemble
from experiments.ensemble import (
    anytime_curve,
    anytime_figure,
    comparison_table,
    compose_flops,
    compose_flops_measured,
    ensemble_metrics,
    member_flops,
)
from superweights import (
    Budget,
    LayerSpec,
    initial_clusters,
    make_plan,
    nnx_member,
    own_coefficients,
)

LABELS = np.array([0, 1, 2, 0])
# Softmax probabilities of three members on four examples (3 classes); the logits below are
# their logs, shifted per row by a large constant that the softmax must ignore.
PROBS = {
    "a": [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.6, 0.2, 0.2], [0.2, 0.6, 0.2]],  # predicts 0 1 0 1
    "b": [[0.2, 0.6, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2]],  # predicts 1 1 2 0
    "c": [[0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6], [0.6, 0.2, 0.2]],  # predicts 0 2 2 0
}
SHIFT = np.array([[0.0], [1e3], [-1e3], [3e3]])


def hand_logits() -> dict[str, np.ndarray]:
    return {name: np.log(np.array(p)) + SHIFT for name, p in PROBS.items()}


def test_ensemble_metrics_by_hand():
    metrics = ensemble_metrics(hand_logits(), LABELS)
    # a: right on examples 0, 1 -> 2/4; p(label) = .6 .6 .2 .2
    assert metrics["accuracy/a"] == pytest.approx(0.5)
    assert metrics["nll/a"] == pytest.approx(-(2 * math.log(0.6) + 2 * math.log(0.2)) / 4)
    # b: right on 1, 2, 3 -> 3/4; p(label) = .2 .6 .6 .6
    assert metrics["accuracy/b"] == pytest.approx(0.75)
    assert metrics["nll/b"] == pytest.approx(-(math.log(0.2) + 3 * math.log(0.6)) / 4)
    # c: right on 0, 2, 3 -> 3/4; p(label) = .6 .2 .6 .6
    assert metrics["accuracy/c"] == pytest.approx(0.75)
    assert metrics["nll/c"] == pytest.approx(-(math.log(0.2) + 3 * math.log(0.6)) / 4)
    # Mean softmax: ex0 [1.4, 1.0, .6]/3, ex1 [.6, 1.4, 1.0]/3, ex2 [1.0, .6, 1.4]/3,
    # ex3 [1.4, 1.0, .6]/3: all right, each with p(label) = 1.4/3.
    assert metrics["accuracy/ensemble"] == metrics["accuracy"] == pytest.approx(1.0)
    assert metrics["nll/ensemble"] == metrics["nll"] == pytest.approx(-math.log(1.4 / 3))
    # Disagreement: a-b differ on 0, 2, 3 (3/4); a-c on 1, 2, 3 (3/4); b-c on 0, 1 (2/4).
    assert metrics["diversity"] == pytest.approx((0.75 + 0.75 + 0.5) / 3)


def test_single_member_has_no_diversity_and_is_its_own_ensemble():
    metrics = ensemble_metrics({"b": hand_logits()["b"]}, LABELS)
    assert metrics["diversity"] == 0.0
    assert metrics["accuracy"] == metrics["accuracy/b"] == pytest.approx(0.75)
    assert metrics["nll"] == pytest.approx(metrics["nll/b"])


def test_ensemble_of_identical_members_equals_the_member():
    logits = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 7, 50)
    metrics = ensemble_metrics({"x": logits, "y": logits.copy(), "z": logits.copy()}, labels)
    assert metrics["diversity"] == 0.0
    assert metrics["accuracy"] == metrics["accuracy/x"]
    assert metrics["nll"] == pytest.approx(metrics["nll/x"], rel=1e-12)


def test_metrics_are_finite_for_huge_logits():
    logits = {"a": np.array([[1e4, -1e4], [-1e4, 1e4]], np.float32), "b": np.zeros((2, 2))}
    metrics = ensemble_metrics(logits, np.array([0, 0]))
    # a: p(label) = 1 then e^-2e4; the mean with b's 1/2 is 3/4 then 1/4
    assert metrics["nll/a"] == pytest.approx(1e4)
    assert metrics["nll"] == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)


# --- FLOPs ----------------------------------------------------------------------------------


class OneLinear(nnx.Module):
    def __init__(self, features_in: int, features_out: int):
        self.dense = nnx.Linear(features_in, features_out, rngs=nnx.Rngs(0))

    def __call__(self, x, train: bool = False):
        return self.dense(x)


class OneConv(nnx.Module):
    def __init__(self, channels_in: int, channels_out: int):
        self.conv = nnx.Conv(channels_in, channels_out, (3, 3), padding="VALID", rngs=nnx.Rngs(0))

    def __call__(self, x, train: bool = False):
        return self.conv(x)


def test_member_flops_of_a_linear_layer():
    member = nnx_member("linear", OneLinear(32, 16))
    flops = member_flops(member.apply_fn, member.params, member.state, jnp.ones((8, 32)))
    # 2 * batch * in * out multiply-adds; XLA adds the bias (8 * 16 = 128, under 2%)
    assert flops == pytest.approx(2 * 8 * 32 * 16, rel=0.05)


def test_member_flops_of_a_convolution():
    member = nnx_member("conv", OneConv(3, 4))
    flops = member_flops(member.apply_fn, member.params, member.state, jnp.ones((2, 8, 8, 3)))
    # VALID 3x3 on 8x8: 6x6 outputs, each 9 * 3 inputs per output channel
    assert flops == pytest.approx(2 * 2 * (6 * 6) * (3 * 3 * 3) * 4, rel=0.05)


def tiny_plan():
    """One member, one cluster of two 3x3 kernels: l0 [3, 3, 2, 4], l1 [3, 3, 4, 4]."""
    layers = [
        LayerSpec("m", "l0.kernel", (3, 3, 2, 4), "float32", 0),
        LayerSpec("m", "l1.kernel", (3, 3, 4, 4), "float32", 1),
    ]
    clusters = initial_clusters(layers, bins=1)
    coefficients = own_coefficients(clusters, layers)
    return make_plan(layers, [], clusters, coefficients, Budget(params=180))


def test_compose_flops_of_a_tiny_plan_by_hand():
    plan = tiny_plan()
    # Size chain (out, in): (4, 2) then (4, 4). Level 0 builds [4, 2]: 9 * 4 * 2 = 72 entries,
    # read by both layers (own coefficients: 2 groups). Level 1 adds 2 input columns for 4
    # rows: 9 * 4 * 2 = 72 entries, read by l1 only (1 group). A budget of 180 template
    # entries (of the model's 72 + 144 = 216) buys one template per level and a partial one
    # of 36 (3 rows) at level 0, the first bank of those the 36 left could go to.
    banks = [(b.piece_size, b.templates, b.partial, len(b.groups)) for b in plan.banks]
    assert banks == [(72, 1, 36, 2), (72, 1, 0, 1)]
    # the partial template is multiplied like a whole one: level 0 has 2 templates
    hand = 2 * 2 * 2 * 72 + 2 * 1 * 1 * 72  # 2 * groups * num_templates * L per bank = 720
    assert compose_flops(plan) == hand
    # XLA turns level 1's single-template product into an elementwise one (72, not 144 FLOPs):
    # the same order of magnitude, slightly below the multiply-add count.
    measured = compose_flops_measured(plan)
    assert 0.5 * hand <= measured <= 2 * hand


# --- anytime prediction ---------------------------------------------------------------------

FLOPS = {"a": 300, "b": 100, "c": 200}


def test_anytime_prefixes_are_cheapest_first_with_compose_cost_once():
    logits = hand_logits()
    curve = anytime_curve(logits, LABELS, FLOPS, compose_cost=50)
    assert [entry["members"] for entry in curve] == [("b",), ("b", "c"), ("b", "c", "a")]
    assert [entry["flops"] for entry in curve] == [100 + 50, 300 + 50, 600 + 50]
    single, full = ensemble_metrics({"b": logits["b"]}, LABELS), ensemble_metrics(logits, LABELS)
    assert curve[0]["accuracy"] == single["accuracy"]
    assert curve[-1]["accuracy"] == full["accuracy"]
    assert curve[-1]["nll"] == pytest.approx(full["nll"])


def test_anytime_all_subsets():
    logits = {**hand_logits(), "d": np.zeros((4, 3))}
    curve = anytime_curve(logits, LABELS, {**FLOPS, "d": 400}, compose_cost=7, subsets="all")
    assert len(curve) == 2**4 - 1
    assert len({entry["members"] for entry in curve}) == 15
    costs = {**FLOPS, "d": 400}
    for entry in curve:
        assert entry["flops"] == sum(costs[name] for name in entry["members"]) + 7
    assert [entry["flops"] for entry in curve] == sorted(entry["flops"] for entry in curve)
    with pytest.raises(ValueError, match="subsets"):
        anytime_curve(logits, LABELS, costs, subsets="some")


def test_anytime_needs_flops_for_every_member():
    with pytest.raises(ValueError, match="FLOPs"):
        anytime_curve(hand_logits(), LABELS, {"a": 1, "b": 2})


def test_anytime_figure_writes_a_png(tmp_path):
    logits = hand_logits()
    curves = {
        "SuperWeights": anytime_curve(logits, LABELS, FLOPS, compose_cost=50),
        "all subsets": anytime_curve(logits, LABELS, FLOPS, subsets="all"),
    }
    path = anytime_figure(curves, tmp_path / "anytime.png")
    assert path == tmp_path / "anytime.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_table_states_the_saving():
    rows = {
        "SuperWeight ensemble": {
            "params": 830_000,
            "accuracy": 0.8012,
            "nll": 0.7,
            "diversity": 0.2,
        },
        "fully-parameterized ensemble": {"params": 1_000_000, "accuracy": 0.79, "nll": 0.8},
    }
    table = comparison_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| ensemble | parameters |")
    assert "| SuperWeight ensemble | 830,000 | 80.12 | 0.700 | 0.200 |" in lines
    assert "| fully-parameterized ensemble | 1,000,000 | 79.00 | 0.800 | - |" in lines
    # 1 - 830,000 / 1,000,000 = 17%
    assert "17.0% fewer parameters" in table


def test_exit_flops_grow_with_depth_and_the_last_exit_costs_the_whole_member():
    import archs as registry
    from superweights import nnx_member

    model = registry.create("wrn-10-1", num_classes=10, in_channels=1, rngs=nnx.Rngs(0), exits=True)
    member = nnx_member("m", model)
    batch = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
    costs = ensemble.exit_flops(member.apply_fn, member.params, member.state, batch)
    whole = ensemble.member_flops(member.apply_fn, member.params, member.state, batch)
    assert len(costs) == 3 and costs[0] < costs[1] < costs[2]
    assert costs[2] <= whole and costs[2] > 0.9 * whole  # the earlier heads are all it skips


def test_exit_curve_scores_each_exit_at_its_own_cost():
    labels = np.array([0, 1])
    # exit 1 is wrong on both examples, exit 2 right on both
    logits = np.array([[[0.0, 5.0], [5.0, 0.0]], [[5.0, 0.0], [0.0, 5.0]]])
    curve = ensemble.exit_curve(logits, labels, [10, 30], compose_cost=5)
    assert [e["members"] for e in curve] == [("exit 1",), ("exit 2",)]
    assert [e["flops"] for e in curve] == [15, 35]
    assert [e["accuracy"] for e in curve] == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 exits but 1 FLOP counts"):
        ensemble.exit_curve(logits, labels, [10])
