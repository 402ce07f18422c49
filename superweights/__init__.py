"""SuperWeight networks: budgeted Flax models whose kernels come from a shared bank."""

from superweights.budget import Budget, BudgetError, allocate, minimum_budget
from superweights.compose import compose, init_bank, superweights
from superweights.model import (
    BudgetedModel,
    Member,
    budgeted,
    from_plan,
    layer_specs,
    linen_member,
    nnx_member,
)
from superweights.plan import (
    BankSpec,
    Cluster,
    Level,
    Plan,
    chain_levels,
    cluster_coefficients,
    initial_clusters,
    make_cluster,
    make_plan,
    own_coefficients,
    size_chain,
)
from superweights.report import budget_report, budget_summary
from superweights.specs import LayerSpec, ParamSpec, SharingRule, forward_order

__all__ = [
    "BankSpec",
    "Budget",
    "BudgetError",
    "BudgetedModel",
    "Cluster",
    "LayerSpec",
    "Level",
    "Member",
    "ParamSpec",
    "Plan",
    "SharingRule",
    "allocate",
    "budget_report",
    "budget_summary",
    "budgeted",
    "chain_levels",
    "cluster_coefficients",
    "compose",
    "forward_order",
    "from_plan",
    "init_bank",
    "initial_clusters",
    "layer_specs",
    "linen_member",
    "make_cluster",
    "make_plan",
    "minimum_budget",
    "nnx_member",
    "own_coefficients",
    "size_chain",
    "superweights",
]
