"""Budgeted models: any Flax model whose kernels are composed from a bank.

    model = archs.create("wrn-16-4", num_classes=10, rngs=nnx.Rngs(0))
    budgeted = superweights.budgeted(model, Budget(fraction=0.1), sample_input=x[:1])
    params, state = budgeted.init(jax.random.key(0))
    logits, state = budgeted.apply(params, state, x, train=True, rng=key)

Models with several inputs take them as the model does,
`budgeted.apply(params, state, ids, attention_mask=mask)`; `rng` feeds the
models' dropout in training. The model's own code is untouched: its params
pytree is computed from the bank by `compose` and handed to the model's
ordinary apply.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from superweights import tree
from superweights.budget import SUBLAYER_TEMPLATES, Budget
from superweights.compose import (
    bank_noise,
    bank_scales,
    check_bank,
    compose_kernels,
    init_bank,
    kernel_scale,
)
from superweights.members import (
    Inputs,
    Member,
    TrainKwarg,
    abstract,
    check_inputs,
    check_outputs,
    make_members,
)
from superweights.plan import (
    Plan,
    cluster_coefficients,
    initial_clusters,
    make_plan,
    own_coefficients,
)
from superweights.specs import SharingRule, split_params
from superweights.trace import trace_params


def apply_members(
    members,
    member_params: Mapping[str, Any],
    state: Mapping[str, Any],
    inputs,
    train: bool,
    vectorize: bool | None = None,
    rng: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict]:
    """Runs every member on its own params: `({member: logits}, {member: new state})`.

    `rng` (training with dropout) is folded in with each member's position, so
    members draw independent streams.

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
    keys = {
        m.name: None if rng is None else jax.random.fold_in(rng, i) for i, m in enumerate(members)
    }
    logits, new_state = {}, {}
    for group in groups.values():
        if len(group) == 1:
            (member,) = group
            logits[member.name], new_state[member.name] = member(
                member_params[member.name], state[member.name], inputs, train, keys[member.name]
            )
            continue
        stack = functools.partial(jax.tree_util.tree_map, lambda *xs: jnp.stack(xs))
        stacked_out, stacked_state = jax.vmap(
            lambda p, s, k, first=group[0]: first(p, s, inputs, train, k)
        )(
            stack(*(member_params[m.name] for m in group)),
            stack(*(state[m.name] for m in group)),
            None if rng is None else stack(*(keys[m.name] for m in group)),
        )
        for index, member in enumerate(group):
            logits[member.name] = stacked_out[index]
            new_state[member.name] = jax.tree_util.tree_map(lambda a, i=index: a[i], stacked_state)
    return {m.name: logits[m.name] for m in members}, {m.name: new_state[m.name] for m in members}


@dataclasses.dataclass(frozen=True, eq=False)
class BudgetedModel:
    """Members whose shared kernels are composed from one bank under a Plan.

    Trainable params: `{"bank": bank pytree, "unshared": {member: {path: array}}}`.
    State (not trained by gradient): `{member: nested state}`.

    Attributes:
      dtype: the dtype the composed kernels are handed to the members in, cast
        once per step after composing in the bank's float32 (`jnp.bfloat16` for
        members computing in bf16); None: the models' own param dtype. Params,
        state and `export` keep their own dtypes whatever it is.
      vectorize: run members of one architecture under `jax.vmap` (True), one
        after another (False), or as suits the backend (None, `apply_members`).
    """

    plan: Plan
    members: tuple[Member, ...]
    dtype: Any = None
    vectorize: bool | None = None

    def __post_init__(self):
        check_dtype(self.dtype)
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
                index = getattr(spec, "index", None)  # ParamSpecs have none
                if shape is not None and index is not None:
                    shape = shape[1:] if index < shape[0] else None
                expected = getattr(spec, "model_shape", spec.shape)
                if shape != expected:
                    raise ValueError(
                        f"param {member.name}:{spec.path} has shape {shape} in the model but "
                        f"{expected} in the plan; the plan belongs to another model"
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
        scales = bank_scales(self.plan, self.initial_scales())
        noise = bank_noise(self.plan, key)  # a program shared by plans, compiled once
        bank = jax.jit(functools.partial(init_bank, self.plan))(key, scales=scales, noise=noise)
        params = {"bank": bank, "unshared": unshared}
        return params, {m.name: m.state for m in self.members}

    def initial_scales(self) -> dict[str, float | None]:
        """`{layer id: RMS of the kernel the unmodified model starts with}` (None: unknown)."""
        flat = {m.name: tree.flatten(m.params) for m in self.members}

        def scale(layer) -> float | None:
            held = flat[layer.member].get(layer.path)
            concrete = held is not None and not isinstance(held, jax.ShapeDtypeStruct)
            return kernel_scale(layer.read(flat[layer.member])) if concrete else None

        return {layer.id: scale(layer) for layer in self.plan.layers}

    def check_params(self, params) -> None:
        """Raises `ValueError` naming the first entry of `params` that is not this plan's."""
        if not isinstance(params, Mapping) or set(params) != {"bank", "unshared"}:
            raise ValueError(
                "params are {'bank': ..., 'unshared': ...} as BudgetedModel.init returns them, "
                f"got {type(params).__name__}"
                + (f" with keys {sorted(params)}" if isinstance(params, Mapping) else "")
            )
        check_bank(self.plan, params["bank"])
        for spec in self.plan.unshared:
            given = params["unshared"].get(spec.member, {}).get(spec.path)
            shape = None if given is None else tuple(np.shape(given))
            if shape != spec.shape:
                found = "missing" if shape is None else list(shape)
                raise ValueError(
                    f"unshared param {spec.member}:{spec.path} is {found} in the params but "
                    f"{list(spec.shape)} in the plan; these params belong to another plan"
                )

    def member_params(self, params: dict) -> dict[str, Any]:
        """`{member: params pytree}` as each unmodified model expects, kernels in `dtype`."""
        return self.composed(params, self.dtype)

    def composed(self, params: dict, dtype=None) -> dict[str, Any]:
        """`{member: params pytree}` with the shared kernels in `dtype` (None: their own)."""
        self.check_params(params)
        kernels = compose_kernels(self.plan, params["bank"], dtype)
        return {
            m.name: tree.unflatten_like(
                m.params, {**params["unshared"][m.name], **kernels.get(m.name, {})}
            )
            for m in self.members
        }

    def apply(
        self,
        params: dict,
        state: dict,
        *inputs,
        train: bool = False,
        rng: jax.Array | None = None,
        **keyword_inputs,
    ) -> tuple[dict[str, jax.Array], dict]:
        """`({member: logits [batch, classes]}, new state)` for the models' inputs.

        `inputs` and `keyword_inputs` are what each model takes (one batch `x`,
        or e.g. `ids, attention_mask=mask`), or one `Inputs`. `rng`, a key
        fresh every step, feeds dropout in training.
        """
        packed = pack_inputs(inputs, keyword_inputs)
        for member in self.members:
            check_inputs(member, packed)
        return apply_members(
            self.members,
            self.member_params(params),
            state,
            packed,
            train,
            vectorize=self.vectorize,
            rng=rng,
        )

    def export(self, params: dict) -> dict[str, Any]:
        """Plain dense params per member (numpy) in the models' own dtypes, for the
        unmodified models: float32 however the members compute."""
        return jax.tree_util.tree_map(np.asarray, jax.jit(self.composed)(params))

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


def check_dtype(dtype) -> None:
    """Raises `ValueError` unless `dtype` is None or a floating-point dtype."""
    if dtype is None:
        return
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(
            f"dtype {dtype!r} is not a floating-point dtype; give e.g. jnp.bfloat16 (members "
            "computing in bf16) or None (the models' own param dtype)"
        )


def pack_inputs(inputs: tuple, keyword_inputs: dict):
    """One input as it is, several (or keywords) as one `Inputs`."""
    if len(inputs) == 1 and not keyword_inputs:
        return inputs[0]
    if not inputs and not keyword_inputs:
        raise TypeError("apply needs the models' inputs")
    return Inputs(*inputs, **keyword_inputs)


def layer_specs(members, sample_input, rule: SharingRule):
    """Shared layers and per-member params of all members, in forward order."""
    layers, unshared = [], []
    for member in members:
        trace = trace_params(
            lambda p, inputs, m=member: m(p, inputs[1], inputs[0], False)[0],
            member.params,
            (abstract(sample_input), member.state),
        )
        shared, own = split_params(member.name, member.params, trace, rule)
        layers += shared
        unshared += own
    if not layers:
        raise ValueError(no_shareable_kernel(unshared, rule))
    return layers, unshared


def no_shareable_kernel(unshared, rule: SharingRule) -> str:
    """Why nothing can be shared, and what to do about it."""
    kept = [p for p in unshared if p.reason]
    if not kept:
        return (
            "the models have no kernel to share (no param named "
            f"{' or '.join(rule.kernel_names)} with two or more dimensions); name the kernels "
            "with SharingRule(kernel_names=...) or write a superweights.Member"
        )
    listed = "; ".join(f"{p.member}:{p.path} {list(p.shape)}: {p.reason}" for p in kept[:4])
    if len(kept) > 4:
        listed += f" ({len(kept)} kernels in all)"
    hint = (
        " Dense layers are shared with SharingRule(share_dense=True)."
        if any("dense" in p.reason for p in kept)
        else ""
    )
    return f"no kernel of the models is shared: {listed}.{hint}"


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
    train_kwarg: TrainKwarg | str = "auto",
    key: jax.Array | None = None,
    dtype=None,
) -> BudgetedModel:
    """A budgeted model with the initial (depth-binned) clusters.

    Args:
      models: one model or `{name: model}`; each an NNX module, a Linen module,
        an object with a Linen `.module` and its `.params` (kept as the initial
        values), or a `Member` (`superweights.members`).
      budget: the parameter budget, a `Budget`.
      sample_input: one input batch (any pytree of arrays or
        `jax.ShapeDtypeStruct`s; several inputs as one `Inputs(ids,
        attention_mask=mask)`), used to trace the forward order and to
        initialise Linen modules.
      bins: depth bins of the initial clusters: each kernel kind (1x1, 3x3,
        ...) of the largest member gets `max(1, round(bins * n_kind / depth))`
        contiguous bins, as in the authors' code (`initial_clusters`).
      rule: which kernels are shared: by default convolutions and stacked
        convolutions, not the output layer (the classifier, found in the trace)
        nor a path component named `head`.
      shared_coefficients: one coefficient vector per (cluster, level) for all
        its layers (the search model); otherwise each layer owns its own.
      fill: spend what the paper's allocation rule leaves over.
      sublayer_templates: templates per bank for budgets below one full-size
        template per bank, built from template-sized blocks; 0 refuses them.
      reserve_unsharing: keep room in the budget for every layer to own its
        coefficients, so that a later `search.unshare_plan` always fits.
      train_kwarg: how the models are told train or eval mode: `"auto"` reads
        each `__call__` for `train`, `training`, `is_training`, `deterministic`
        or `use_running_average`; a keyword name, `(name, value in training)`,
        or None (no keyword: Linen batch statistics follow `mutable`, NNX
        submodules get `deterministic`/`use_running_average` set).
      key: for initialising Linen modules.
      dtype: the dtype the composed kernels are handed to the models in (cast
        once per step; composition, bank and optimizer state stay float32), e.g.
        `jnp.bfloat16` when the models compute in bf16. How a model computes is
        its own setting (`dtype=` of Flax layers, of `archs.create`); None hands
        the kernels in the models' param dtype.
    """
    check_dtype(dtype)
    if not isinstance(budget, Budget):
        raise TypeError(
            f"budget is a {type(budget).__name__}; write it as a Budget, e.g. "
            "Budget(fraction=0.1), Budget(params=50_000) or Budget.parse('10%')"
        )
    key = jax.random.key(0) if key is None else key
    members = make_members(models, sample_input, key, train_kwarg)
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
    return BudgetedModel(plan, tuple(members), dtype)


def from_plan(
    plan: Plan, models, *, sample_input=None, train_kwarg="auto", key=None, dtype=None
) -> BudgetedModel:
    """Re-attaches a saved Plan to the models it was made for (shapes are checked)."""
    key = jax.random.key(0) if key is None else key
    members = tuple(make_members(models, sample_input, key, train_kwarg))
    return BudgetedModel(plan, members, dtype)
