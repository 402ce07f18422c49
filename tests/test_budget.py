import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from superweights import Budget, BudgetError, allocate, minimum_budget
from superweights.budget import BankDemand, bank_cost, full_size_minimum, smallest_template

# --- Budget ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"params": 10, "fraction": 0.1},
        {"params": 0},
        {"params": -5},
        {"params": 2.5},
        {"params": math.inf},
        {"fraction": 0.0},
        {"fraction": -0.1},
        {"fraction": math.nan},
        {"fraction": math.inf},
        {"params": 10, "scope": "layers"},
    ],
)
def test_budget_rejects_bad_arguments(kwargs):
    with pytest.raises(BudgetError):
        Budget(**kwargs)


def test_budget_is_a_value_error_and_accepts_valid_forms():
    assert issubclass(BudgetError, ValueError)
    assert Budget(params=100).params == 100
    assert Budget(params=100.0).resolve(100) == 100  # a whole float is a count
    assert Budget(fraction=0.1, scope="model").scope == "model"
    assert Budget(fraction=1.0).resolve(50) == 50  # the whole model is a budget


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"params": "1000"}, r"params must be a number, got '1000' \(str\).*Budget.parse"),
        ({"params": True}, r"params must be a number, got True \(bool\)"),
        ({"fraction": "10%"}, r"fraction must be a number, got '10%' \(str\)"),
        ({"params": 0}, r"params must be positive, got 0 \(zero\)"),
        ({"fraction": -0.5}, r"fraction must be positive, got -0.5 \(negative\)"),
        ({"fraction": 1.5}, r"150% is above the model's own size.*--dense"),
        ({"fraction": 1.000001}, r"a budget of 100.0001% is above the model's own size"),
    ],
)
def test_budget_says_what_is_wrong_with_its_arguments(kwargs, message):
    with pytest.raises(BudgetError, match=message):
        Budget(**kwargs)


def test_a_budget_above_the_model_is_refused_naming_its_size():
    assert Budget(params=50).resolve(50) == 50
    with pytest.raises(BudgetError, match=r"above the model's own size, 50 parameters in model"):
        Budget(params=51, scope="model").resolve(50)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0%", "budget '0%' is zero: give a positive"),
        ("0", "budget '0' is zero"),
        ("0.0001k", "budget '0.0001k' is zero once rounded to whole parameters"),
        ("-5000", "budget '-5000' is negative"),
        ("-5%", "budget '-5%' is negative"),
        ("-3k", "budget '-3k' is negative"),
        ("1.5", r"budget '1.5' is ambiguous: write a percentage \(150%\) or a whole count \(2\)"),
        ("2.6", r"write a percentage \(260%\) or a whole count \(3\)"),
        ("150%", "above the model's own size"),
        ("lots", "cannot read budget 'lots'"),
    ],
)
def test_budget_parse_names_what_it_read(text, message):
    with pytest.raises(BudgetError, match=message):
        Budget.parse(text)


def test_budget_resolve():
    assert Budget(params=1234).resolve(10**9) == 1234  # a count ignores the reference
    assert Budget(fraction=0.25).resolve(1000) == 250
    assert Budget(fraction=0.1).resolve(1005) == 100  # 100.5 rounded down: never above


def test_budget_describe():
    assert Budget(params=250000).describe() == "250,000 (banks scope)"
    assert Budget(fraction=0.1, scope="model").describe() == "10.00% (model scope)"


@pytest.mark.parametrize(
    ("text", "params", "fraction"),
    [
        ("10%", None, 0.1),
        (" 12.5 % ", None, 0.125),
        ("0.1", None, 0.1),
        ("1", None, 1.0),  # <= 1 reads as a fraction
        ("250k", 250_000, None),
        ("250K", 250_000, None),
        ("1.5M", 1_500_000, None),
        ("2g", 2_000_000_000, None),
        ("250000", 250_000, None),
        ("250,000", 250_000, None),
        ("250_000", 250_000, None),
        ("2", 2, None),  # a whole number above 1 is a count
        ("1e6", 1_000_000, None),
        ("100%", None, 1.0),  # the whole model
    ],
)
def test_budget_parse(text, params, fraction):
    budget = Budget.parse(text, scope="model")
    assert (budget.params, budget.fraction, budget.scope) == (params, fraction, "model")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "ten",
        "%",
        "k",
        "12x",
        "1.2.3",
        "nan",
        "inf",
        "-inf%",
        "1e400",
        "nank",
        "-5",
        "0",
        "0%",
        "-3k",
        "0.0001k",
    ],
)
def test_budget_parse_rejects_garbage(text):
    with pytest.raises(BudgetError):
        Budget.parse(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789.,_%kKmMgGeE+- naif", max_size=8))
def test_budget_parse_returns_a_valid_budget_or_budget_error(text):
    try:
        budget = Budget.parse(text)
    except BudgetError:
        return
    assert (budget.params is None) != (budget.fraction is None)
    if budget.params is not None:
        assert isinstance(budget.params, int) and budget.params > 0
    else:
        assert 0 < budget.fraction <= 1


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**13), 10**13),
    ),
    st.sampled_from(["", "%", "k", "M", "g"]),
)
def test_budget_parse_of_numbers_is_a_budget_or_says_why(value, suffix):
    """Every number in every form reads as the budget it names, or as a one-line refusal."""
    text = f"{value}{suffix}"
    try:
        budget = Budget.parse(text)
    except BudgetError as error:
        message = str(error)
        assert "\n" not in message and repr(text) in message
        return
    scale = {"": 1, "%": 0.01, "k": 1e3, "M": 1e6, "g": 1e9}[suffix]
    amount = float(value) * scale
    if budget.fraction is not None:
        assert budget.fraction == pytest.approx(amount) and 0 < budget.fraction <= 1
    else:
        assert budget.params == round(amount) >= 1


# --- allocate: the paper's two-phase rule, worked by hand -----------------------------------


def test_full_size_minimum():
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    assert full_size_minimum(demands, fixed=0, count_coefficients=False) == 30
    assert minimum_budget(demands, 0, False, sublayer=False) == 30
    # model scope: + one coefficient per group per template, + the per-member params
    assert full_size_minimum(demands, fixed=7, count_coefficients=True) == 7 + 10 + 3 + 20 + 1


def test_phase_one_adds_only_while_templates_below_users():
    # A: L=10, 3 users; B: L=20, 1 user. Budget 55 = minimum 30 + 25.
    # Phase 1: A 1->2 (left 15), A 2->3 (left 5); A is then at its 3 users, B has 1 user.
    # Phase 2: nothing fits in 5. Without fill 5 is left over.
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    allocation = allocate(demands, 55, fill=False)
    assert allocation.templates == allocation.paper_templates == (3, 1)
    assert allocation.partial == (0, 0)
    assert (allocation.spent, allocation.leftover) == (50, 5)


def test_fill_spends_the_rest_as_one_partial_template():
    # As above, then the 5 left become a partial template of 5 < L entries; on ties the
    # first bank (A: min(10 - 1, 5) = 5 = B's min(20 - 1, 5)) takes it.
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    allocation = allocate(demands, 55, fill=True)
    assert allocation.templates == allocation.paper_templates == (3, 1)
    assert allocation.partial == (5, 0)
    assert (allocation.spent, allocation.leftover) == (55, 0)


def test_each_addition_only_if_it_fits():
    # A: L=10, B: L=3, both 2 users; budget 13 + 5. Phase 1 pass 1: A does not fit in 5,
    # B does (left 2); then nothing fits.
    demands = [BankDemand(10, 2, 2), BankDemand(3, 2, 2)]
    allocation = allocate(demands, 18, fill=False)
    assert allocation.templates == (1, 2)
    assert (allocation.spent, allocation.leftover) == (16, 2)


def test_phase_two_round_robin_up_to_the_cap():
    # A: L=1, 2 users; B: L=2, 1 user; budget 3 + 100.
    # Phase 1: A -> 2 (left 99). Phase 2, 7 passes adding 1 to each bank below 8:
    # A 3..8 in passes 1-6, B 2..8 in passes 1-7. Spent 8*1 + 8*2 = 24, left 79.
    demands = [BankDemand(1, 2, 2), BankDemand(2, 1, 1)]
    allocation = allocate(demands, 103, fill=False)
    assert allocation.templates == allocation.paper_templates == (8, 8)
    assert (allocation.spent, allocation.leftover) == (24, 79)


def test_fill_goes_past_the_cap_round_robin():
    # As above; fill then sweeps over both banks (3 per sweep): 26 sweeps spend 78, the
    # 27th adds one more to A only (1 left, B costs 2). A = 8 + 27, B = 8 + 26, nothing left.
    demands = [BankDemand(1, 2, 2), BankDemand(2, 1, 1)]
    allocation = allocate(demands, 103, fill=True)
    assert allocation.paper_templates == (8, 8)
    assert allocation.templates == (35, 34)
    assert allocation.partial == (0, 0)  # a partial template must be smaller than L = 1
    assert (allocation.spent, allocation.leftover) == (103, 0)


def test_seven_passes_in_each_phase():
    # One bank, 20 users, L=1, cap raised to 30 so that only the pass counts limit it:
    # phase 1 adds 7 (1 -> 8), phase 2 adds 7 more (-> 15).
    allocation = allocate([BankDemand(1, 20, 1)], 1000, cap=30, fill=False)
    assert allocation.templates == (15,)
    assert allocation.leftover == 1000 - 15
    # with the paper's cap of 8, phase 2 adds nothing once phase 1 reached 8
    assert allocate([BankDemand(1, 20, 1)], 1000, fill=False).templates == (8,)
    # one user: phase 1 adds nothing, phase 2 reaches the cap in 7 passes
    assert allocate([BankDemand(1, 1, 1)], 1000, fill=False).templates == (8,)
    assert allocate([BankDemand(1, 1, 1)], 1000, cap=20, fill=False).templates == (8,)


def test_model_scope_counts_coefficients_and_fixed_params():
    # L=10, 2 groups: a template costs 10 + 2 coefficients. Fixed 100: minimum 112.
    demands = [BankDemand(10, 2, 2)]
    kwargs = dict(fixed=100, count_coefficients=True)
    at_minimum = allocate(demands, 112, **kwargs)
    assert (at_minimum.templates, at_minimum.spent, at_minimum.leftover) == ((1,), 112, 0)
    # 124 = 112 + 12: exactly one more whole template
    assert allocate(demands, 124, **kwargs).templates == (2,)
    # 123: 11 left < 12. A partial of 9 entries costs 9 + 2 coefficients = 11.
    partial = allocate(demands, 123, **kwargs)
    assert (partial.templates, partial.partial, partial.leftover) == ((1,), (9,), 0)
    # 113: 1 left cannot pay even the partial template's 2 coefficients: reported
    tiny = allocate(demands, 113, **kwargs)
    assert (tiny.partial, tiny.spent, tiny.leftover) == ((0,), 112, 1)


def test_partial_template_goes_where_it_absorbs_most():
    # model scope, 7 left after the minimum; L=10 with 4 groups absorbs 7 - 4 = 3 entries,
    # L=10 with 1 group absorbs 7 - 1 = 6: the second bank gets a partial of 6.
    demands = [BankDemand(10, 1, 4), BankDemand(10, 1, 1)]
    minimum = full_size_minimum(demands, 0, True)
    allocation = allocate(demands, minimum + 7, count_coefficients=True, cap=1)
    assert allocation.templates == (1, 1)
    assert allocation.partial == (0, 6)
    assert allocation.leftover == 0


def test_infeasible_budget_states_the_minimum():
    demands = [BankDemand(1234, 2, 2), BankDemand(1000, 1, 1)]
    with pytest.raises(BudgetError, match="2,234") as info:
        allocate(demands, 2233, sublayer_templates=0)
    assert "2,233" in str(info.value) and "full-size" in str(info.value)
    with pytest.raises(BudgetError, match="per-member"):
        allocate(demands, 2233 + 50, fixed=50, count_coefficients=True, sublayer_templates=0)
    assert allocate(demands, 2234).spent == 2234


@settings(max_examples=30, deadline=None)
@given(
    demands=st.lists(
        st.builds(
            BankDemand,
            piece_size=st.integers(1, 300),
            users=st.integers(1, 6),
            groups=st.integers(1, 6),
        ),
        min_size=1,
        max_size=6,
    ),
    extra=st.integers(0, 3000),
    fixed=st.integers(0, 500),
    model_scope=st.booleans(),
    fill=st.booleans(),
)
def test_allocation_never_exceeds_the_budget(demands, extra, fixed, model_scope, fill):
    fixed = fixed if model_scope else 0
    minimum = full_size_minimum(demands, fixed, model_scope)
    budget = minimum + extra
    allocation = allocate(demands, budget, fixed=fixed, count_coefficients=model_scope, fill=fill)
    spent = fixed + sum(
        k * d.piece_size + m + (k + (m > 0)) * d.groups * model_scope
        for k, m, d in zip(allocation.templates, allocation.partial, demands, strict=True)
    )
    assert spent == allocation.spent == budget - allocation.leftover <= budget
    assert all(k >= 1 for k in allocation.templates)
    assert all(0 <= m < d.piece_size for m, d in zip(allocation.partial, demands, strict=True))
    assert sum(m > 0 for m in allocation.partial) <= 1
    # the paper's rule alone never passes the cap, and fill never removes templates
    assert all(k <= 8 for k in allocation.paper_templates)
    assert all(
        k >= p for k, p in zip(allocation.templates, allocation.paper_templates, strict=True)
    )
    if fill:
        # nothing else fits: every whole template costs more than what is left, and in the
        # banks scope the partial template takes all of it
        costs = [d.piece_size + d.groups * model_scope for d in demands]
        assert allocation.leftover < min(costs)
        if not model_scope:
            assert allocation.leftover == 0
        else:
            assert allocation.leftover <= min(d.groups for d in demands)
    else:
        assert allocation.templates == allocation.paper_templates
        assert allocation.partial == (0,) * len(demands)


# --- below the full-size floor: sub-layer templates -----------------------------------------


def test_sublayer_minimum_worked_by_hand():
    # A: L=10, 3 groups. A template of T < 10 costs T + 3 * ceil(10 / T): 11 at T=5, 12 at
    # T=6, 13 at T=4; the full template costs 10 in banks scope, so A stays whole.
    # B: L=20, 1 group: T + ceil(20 / T) is 9 at T=4 and T=5 (the larger one is kept).
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    assert smallest_template(demands[0], False) == 10
    assert smallest_template(demands[1], False) == 5
    assert bank_cost(demands[1], 1, 5, False) == 5 + 4
    assert minimum_budget(demands, 0, False) == 10 + 9
    # In model scope the whole template of A costs 10 + 3 coefficients, more than T=5's 11.
    assert smallest_template(demands[0], True) == 5
    assert minimum_budget(demands, 7, True) == 7 + 11 + 9


def brute_force_minimum(demand: BankDemand, count_coefficients: bool) -> int:
    """The least cost of one template by trying every size: T + groups * ceil(L / T) below
    full size, L (+ groups in model scope) at full size."""
    piece, groups = demand.piece_size, demand.groups
    below = [t + groups * -(-piece // t) for t in range(1, piece)]
    return min([*below, piece + groups * count_coefficients])


def test_smallest_template_is_the_least_cost_size_by_brute_force():
    for piece in range(1, 121):
        for groups in range(1, 9):
            for count_coefficients in (False, True):
                demand = BankDemand(piece, groups, groups)
                size = smallest_template(demand, count_coefficients)
                assert 1 <= size <= piece
                cost = bank_cost(demand, 1, size, count_coefficients)
                assert cost == brute_force_minimum(demand, count_coefficients), demand


@pytest.mark.parametrize(
    ("demand", "size", "cost"),
    [
        # L=27, 5 groups: T=9 is 3 blocks, 9 + 5 * 3 = 24; T=14 is 2 blocks, 14 + 5 * 2 = 24
        # (the larger size is kept); T=10 costs 10 + 15 = 25 and T=8 costs 8 + 20 = 28.
        (BankDemand(27, 5, 5), 14, 24),
        # L=190, 20 groups: T=64 is 3 blocks, 64 + 20 * 3 = 124; T=48 is 4 blocks, 48 + 80 =
        # 128; T=95 is 2 blocks, 95 + 40 = 135; near sqrt(20 * 190) = 61, T=62 costs 62 + 80.
        (BankDemand(190, 20, 20), 64, 124),
    ],
)
def test_smallest_template_worked_by_hand(demand, size, cost):
    assert smallest_template(demand, False) == size
    assert bank_cost(demand, 1, size, False) == cost


def test_the_stated_minimum_is_feasible_and_one_less_is_not_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        demands = [
            BankDemand(int(rng.integers(1, 400)), int(g), int(g))
            for g in rng.integers(1, 12, size=rng.integers(1, 5))
        ]
        fixed = int(rng.integers(0, 50))
        count_coefficients = bool(rng.integers(2))
        minimum = fixed + sum(brute_force_minimum(d, count_coefficients) for d in demands)
        assert minimum_budget(demands, fixed, count_coefficients) == minimum
        fits = allocate(demands, minimum, fixed=fixed, count_coefficients=count_coefficients)
        assert fits.spent <= minimum
        with pytest.raises(BudgetError, match=f"minimum feasible {minimum:,} "):
            allocate(demands, minimum - 1, fixed=fixed, count_coefficients=count_coefficients)


def test_budget_below_the_floor_gets_smaller_templates():
    # Full-size floor 30; budget 24 with 2 templates per bank: A at T=5 costs
    # 2 * (5 + 3 * 2) = 22, which leaves no room for B. One template each: A stays whole
    # (10), B grows from T=5 (9) to the largest size that fits in 14: T=12, 12 + 2 blocks.
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    allocation = allocate(demands, 24)
    assert allocation.templates == (1, 1)
    assert allocation.template_sizes == (10, 12)
    assert allocation.paper_templates == (0, 0) and allocation.partial == (0, 0)
    assert (allocation.spent, allocation.leftover) == (24, 0)


def test_budget_below_the_absolute_minimum_names_it():
    demands = [BankDemand(10, 3, 3), BankDemand(20, 1, 1)]
    assert allocate(demands, 19).spent == 19
    with pytest.raises(BudgetError, match="minimum feasible 19 ") as info:
        allocate(demands, 18)
    assert "sub-layer" in str(info.value)


def test_at_and_above_the_floor_the_paper_geometry_is_kept():
    demands = [BankDemand(100, 3, 3), BankDemand(200, 1, 1), BankDemand(9, 2, 2)]
    floor = full_size_minimum(demands, 0, False)
    for budget in (floor, floor + 57, 5 * floor):
        allocation = allocate(demands, budget)
        assert allocation == allocate(demands, budget, sublayer_templates=0)
        assert allocation.template_sizes == (100, 200, 9)
    assert max(allocate(demands, floor - 1).template_sizes[:2]) < 200


@settings(max_examples=60, deadline=None)
@given(
    demands=st.lists(
        st.builds(
            BankDemand,
            piece_size=st.integers(1, 5000),
            users=st.integers(1, 6),
            groups=st.integers(1, 6),
        ),
        min_size=1,
        max_size=6,
    ),
    share=st.floats(0.0, 1.2),
    fixed=st.integers(0, 500),
    model_scope=st.booleans(),
    templates=st.integers(1, 4),
)
def test_sublayer_allocation_never_exceeds_the_budget(
    demands, share, fixed, model_scope, templates
):
    fixed = fixed if model_scope else 0
    low = minimum_budget(demands, fixed, model_scope)
    high = full_size_minimum(demands, fixed, model_scope)
    budget = low + int(share * (high - low))
    allocation = allocate(
        demands, budget, fixed=fixed, count_coefficients=model_scope, sublayer_templates=templates
    )
    # The spend counted from the sizes: a full-size template is L entries (+ one coefficient
    # per group in model scope), a partial one m entries (+ its coefficients); a sub-layer
    # template is T entries plus one coefficient per group and block, ceil(L / T) blocks.
    spent = fixed
    for d, k, t, m in zip(
        demands, allocation.templates, allocation.template_sizes, allocation.partial, strict=True
    ):
        if t == d.piece_size:
            spent += k * (t + d.groups * model_scope) + m + (m > 0) * d.groups * model_scope
        else:
            spent += k * (t + d.groups * -(-d.piece_size // t))
    assert spent == allocation.spent == budget - allocation.leftover <= budget
    assert all(
        1 <= t <= d.piece_size for t, d in zip(allocation.template_sizes, demands, strict=True)
    )
    if budget < high:
        assert all(1 <= k <= templates for k in allocation.templates)
        assert allocation.partial == (0,) * len(demands)
    else:
        assert allocation.template_sizes == tuple(d.piece_size for d in demands)
    with pytest.raises(BudgetError, match=f"minimum feasible {low:,} "):
        allocate(demands, low - 1, fixed=fixed, count_coefficients=model_scope)
