"""SuperWeight networks: budgeted Flax models whose kernels come from a shared bank."""

from superweights.budget import Budget, BudgetError, allocate, minimum_budget
from superweights.compose import compose, compose_kernels, init_bank, superweights
from superweights.members import Inputs, Member, linen_member, nnx_member
from superweights.model import BudgetedModel, budgeted, from_plan, layer_specs
from superweights.plan import (
    BankSpec,
    Cluster,
    Level,
    Plan,
    PlanError,
    chain_levels,
    check_plan,
    cluster_coefficients,
    initial_clusters,
    make_cluster,
    make_plan,
    own_coefficients,
    size_chain,
)
from superweights.report import budget_report, budget_summary
from superweights.specs import LayerSpec, ParamSpec, SharingRule
from superweights.trace import Trace, forward_order, trace_params

__all__ = [
    "BankSpec",
    "Budget",
    "BudgetError",
    "BudgetedModel",
    "Cluster",
    "Inputs",
    "LayerSpec",
    "Level",
    "Member",
    "ParamSpec",
    "Plan",
    "PlanError",
    "SharingRule",
    "Trace",
    "allocate",
    "budget_report",
    "budget_summary",
    "budgeted",
    "chain_levels",
    "check_plan",
    "cluster_coefficients",
    "compose",
    "compose_kernels",
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
    "trace_params",
]
