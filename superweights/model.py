"""Budgeted models: any Flax model whose kernels are composed from a bank.

    model = archs.create("wrn-16-4", num_classes=10, rngs=nnx.Rngs(0))
    budgeted = superweights.budgeted(model, Budget(fraction=0.1), sample_input=x[:1])
    params, state = budgeted.init(jax.random.key(0))
    logits, state = budgeted.apply(params, state, x, train=True)

The model's own code is untouched: its params pytree is computed from the bank
by `compose` and handed to the model's ordinary apply.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from superweights import tree
from superweights.budget import SUBLAYER_TEMPLATES, Budget
from superweights.compose import compose, init_bank
from superweights.plan import (
    Plan,
    cluster_coefficients,
    initial_clusters,
    make_plan,
    own_coefficients,
)
from superweights.specs import SharingRule, forward_order, split_params

ApplyFn = Callable[[Any, Any, jax.Array, bool], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """A network as the library sees it: initial values and a pure apply.

    Attributes:
      name: unique name, e.g. `"wrn-16-4"`.
      params: nested dict of the trainable params (initial values).
      state: nested dict of everything else (e.g. batch statistics).
      apply_fn: `(params, state, x, train) -> (logits, new_state)`.
      signature: hashable; members with equal, non-None signatures compute the
        same function of their params and run together under `jax.vmap`.
    """

    name: str
    params: Any
    state: Any
    apply_fn: ApplyFn
    signature: Any = None


def nnx_member(name: str, module) -> Member:
    """Wraps a Flax NNX module whose call is `module(x, train=...)`."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    params_def = jax.tree_util.tree_structure(params)
    rest_def = jax.tree_util.tree_structure(rest)

    def apply_fn(p, s, x, train):
        as_state = jax.tree_util.tree_unflatten
        model = nnx.merge(
            graphdef,
            as_state(params_def, jax.tree_util.tree_leaves(p)),
            as_state(rest_def, jax.tree_util.tree_leaves(s)),
        )
        logits = model(x, train=train)
        return logits, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])

    pure_params, pure_rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    signature = ("nnx", graphdef, _shapes(pure_params), _shapes(pure_rest))
    return Member(name, pure_params, pure_rest, apply_fn, signature)


def _shapes(tree_) -> tuple:
    return tuple((p, tuple(x.shape), str(x.dtype)) for p, x in tree.flatten(tree_).items())


def linen_member(name: str, module, sample_input: jax.Array, key: jax.Array) -> Member:
    """Wraps a Flax Linen module whose call is `module.apply(vars, x, train=...)`."""
    variables = module.init(key, sample_input, train=False)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def apply_fn(p, s, x, train):
        if train and s:
            logits, new_state = module.apply({"params": p, **s}, x, train=True, mutable=list(s))
            return logits, dict(new_state)
        return module.apply({"params": p, **s}, x, train=train), s

    return Member(name, params, state, apply_fn, ("linen", module, _shapes(variables)))


def apply_members(
    members,
    member_params: Mapping[str, Any],
    state: Mapping[str, Any],
    x,
    train: bool,
    vectorize: bool | None = None,
) -> tuple[dict[str, jax.Array], dict]:
    """Runs every member on its own params: `({member: logits}, {member: new state})`.

    With `vectorize`, members with the same signature (same architecture) run as
    one `jax.vmap` over their stacked params and state instead of one after
    another. `None` vectorizes on accelerators but not on the CPU, where XLA
    turns a vmapped convolution into a grouped one that ran 5-6x slower than a
    loop over the members (experiments/benchmarks/scaling.py).
    """
    if vectorize is None:
        vectorize = jax.default_backend() != "cpu"
    groups: dict[Any, list[Member]] = {}
    for member in members:
        key = member.name if member.signature is None or not vectorize else member.signature
        groups.setdefault(key, []).append(member)
    logits, new_state = {}, {}
    for group in groups.values():
        if len(group) == 1:
            (member,) = group
            logits[member.name], new_state[member.name] = member.apply_fn(
                member_params[member.name], state[member.name], x, train
            )
            continue
        stack = functools.partial(jax.tree_util.tree_map, lambda *xs: jnp.stack(xs))
        stacked_out, stacked_state = jax.vmap(
            lambda p, s, fn=group[0].apply_fn: fn(p, s, x, train)
        )(stack(*(member_params[m.name] for m in group)), stack(*(state[m.name] for m in group)))
        for index, member in enumerate(group):
            logits[member.name] = stacked_out[index]
            new_state[member.name] = jax.tree_util.tree_map(lambda a, i=index: a[i], stacked_state)
    return {m.name: logits[m.name] for m in members}, {m.name: new_state[m.name] for m in members}


def as_member(name: str, model, sample_input, key) -> Member:
    """A Member from an NNX module, a Linen module or a Member."""
    if isinstance(model, Member):
        return model
    from flax import linen, nnx

    if isinstance(model, nnx.Module):
        return nnx_member(name, model)
    if isinstance(model, linen.Module):
        return linen_member(name, model, sample_input, key)
    raise TypeError(
        f"member {name!r} is a {type(model).__name__}; expected a flax.nnx.Module, "
        "a flax.linen.Module or a superweights.Member"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetedModel:
    """Members whose shared kernels are composed from one bank under a Plan.

    Trainable params: `{"bank": bank pytree, "unshared": {member: {path: array}}}`.
    State (not trained by gradient): `{member: nested state}`.
    """

    plan: Plan
    members: tuple[Member, ...]

    def __post_init__(self):
        names = [m.name for m in self.members]
        if sorted(names) != sorted(self.plan.members):
            raise ValueError(f"members {names} do not match the plan's {list(self.plan.members)}")
        for member in self.members:
            flat = tree.flatten(member.params)
            planned = [
                x for x in (*self.plan.layers, *self.plan.unshared) if x.member == member.name
            ]
            for spec in planned:
                shape = tuple(flat[spec.path].shape) if spec.path in flat else None
                if shape != spec.shape:
                    raise ValueError(
                        f"param {member.name}:{spec.path} has shape {shape} in the model but "
                        f"{spec.shape} in the plan; the plan belongs to another model"
                    )
            extra = sorted(set(flat) - {spec.path for spec in planned})
            if extra:
                raise ValueError(
                    f"params {extra[:5]} of member {member.name!r} are not in the plan; "
                    "the plan belongs to another model"
                )

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        """Fresh bank, the members' own initial unshared params, their initial state."""
        unshared = {}
        for member in self.members:
            flat = tree.flatten(member.params)
            own = [p.path for p in self.plan.unshared if p.member == member.name]
            unshared[member.name] = {path: jnp.asarray(flat[path]) for path in own}
        bank = jax.jit(functools.partial(init_bank, self.plan))(key)
        params = {"bank": bank, "unshared": unshared}
        return params, {m.name: m.state for m in self.members}

    def member_params(self, params: dict) -> dict[str, Any]:
        """`{member: params pytree}` exactly as each unmodified model expects."""
        composed = compose(self.plan, params["bank"])
        result = {}
        for member in self.members:
            flat = dict(params["unshared"][member.name])
            for layer in self.plan.layers:
                if layer.member == member.name:
                    flat[layer.path] = composed[layer.id]
            result[member.name] = tree.unflatten_like(member.params, flat)
        return result

    def apply(
        self, params: dict, state: dict, x: jax.Array, train: bool = False
    ) -> tuple[dict[str, jax.Array], dict]:
        """`({member: logits [batch, classes]}, new state)` for input `x`."""
        return apply_members(self.members, self.member_params(params), state, x, train)

    def export(self, params: dict) -> dict[str, Any]:
        """Plain dense params per member (numpy), for the unmodified models."""
        return jax.tree_util.tree_map(np.asarray, jax.jit(self.member_params)(params))

    def weight_decay_mask(self, params: dict) -> dict:
        """True for every trainable leaf but the coefficients."""
        mask = jax.tree_util.tree_map(lambda _: True, params)
        mask["bank"]["coefficients"] = jax.tree_util.tree_map(
            lambda _: False, params["bank"]["coefficients"]
        )
        return mask

    def report(self) -> str:
        from superweights.report import budget_report

        return budget_report(self.plan)


def _members(models, sample_input, key) -> list[Member]:
    if not isinstance(models, Mapping):
        models = {"model": models}
    if not models:
        raise ValueError("give at least one model")
    keys = jax.random.split(key, len(models))
    return [
        as_member(name, model, sample_input, k)
        for (name, model), k in zip(models.items(), keys, strict=True)
    ]


def check_outputs(members, sample_input) -> None:
    """Raises unless every member maps `sample_input` to logits with one class count."""
    x = jax.ShapeDtypeStruct(np.shape(sample_input), jnp.result_type(sample_input))
    classes = {}
    for member in members:
        out = jax.eval_shape(
            lambda p, s, x, m=member: m.apply_fn(p, s, x, False)[0], member.params, member.state, x
        )
        classes[member.name] = out.shape[-1]
    if len(set(classes.values())) > 1:
        raise ValueError(
            f"members predict different numbers of classes {classes}; one bank's members "
            "must share the task"
        )


def layer_specs(members, sample_input, rule: SharingRule):
    """Shared layers and per-member params of all members, in forward order."""
    layers, unshared = [], []
    for member in members:
        x = jax.ShapeDtypeStruct(np.shape(sample_input), jnp.result_type(sample_input))
        order = forward_order(
            lambda p, inputs, m=member: m.apply_fn(p, inputs[1], inputs[0], False)[0],
            member.params,
            (x, member.state),
        )
        shared, own = split_params(member.name, member.params, order, rule)
        layers += shared
        unshared += own
    return layers, unshared


def budgeted(
    models,
    budget: Budget,
    *,
    sample_input: jax.Array,
    bins: int = 4,
    rule: SharingRule | None = None,
    shared_coefficients: bool = False,
    fill: bool = True,
    cap: int = 8,
    passes: int = 7,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
    reserve_unsharing: bool = False,
    key: jax.Array | None = None,
) -> BudgetedModel:
    """A budgeted model with the initial (depth-binned) clusters.

    Args:
      models: one model or `{name: model}`; each an NNX module, a Linen module
        (called with `train=`) or a `Member`.
      budget: the parameter budget.
      sample_input: one input batch (or its `jax.ShapeDtypeStruct`), used to
        trace the forward order and to initialise Linen modules.
      bins: depth bins of the initial clusters: each kernel kind (1x1, 3x3,
        ...) of the largest member gets `max(1, round(bins * n_kind / depth))`
        contiguous bins, as in the authors' code (`initial_clusters`).
      rule: which kernels are shared (convolutions, not the `head`, by default).
      shared_coefficients: one coefficient vector per (cluster, level) for all
        its layers (the search model); otherwise each layer owns its own.
      fill: spend what the paper's allocation rule leaves over.
      sublayer_templates: templates per bank for budgets below one full-size
        template per bank, built from template-sized blocks; 0 refuses them.
      reserve_unsharing: keep room in the budget for every layer to own its
        coefficients, so that a later `search.unshare_plan` always fits.
      key: for initialising Linen modules.
    """
    key = jax.random.key(0) if key is None else key
    members = _members(models, sample_input, key)
    check_outputs(members, sample_input)
    layers, unshared = layer_specs(members, sample_input, rule or SharingRule())
    clusters = initial_clusters(layers, bins)
    coefficients = (cluster_coefficients if shared_coefficients else own_coefficients)(
        clusters, layers
    )
    plan = make_plan(
        layers,
        unshared,
        clusters,
        coefficients,
        budget,
        cap=cap,
        passes=passes,
        fill=fill,
        sublayer_templates=sublayer_templates,
        reserve_unsharing=reserve_unsharing,
    )
    return BudgetedModel(plan, tuple(members))


def from_plan(plan: Plan, models, *, sample_input=None, key=None) -> BudgetedModel:
    """Re-attaches a saved Plan to the models it was made for (shapes are checked)."""
    key = jax.random.key(0) if key is None else key
    return BudgetedModel(plan, tuple(_members(models, sample_input, key)))
