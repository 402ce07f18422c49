"""Building the models a run trains: budgeted ones and their dense baseline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import archs
import superweights
from superweights import Budget, BudgetedModel, Member, SharingRule, nnx_member
from superweights.budget import SUBLAYER_TEMPLATES
from superweights.model import apply_members

COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
"""What the members compute in, by name (`--dtype`); None is the models' own float32.
Params, bank, coefficients and optimizer state are float32 under either."""


def compute_dtype(name: str):
    """The dtype `name` stands for in `COMPUTE_DTYPES`; `ValueError` naming the choices."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {name!r}")
    return COMPUTE_DTYPES[name]


@dataclasses.dataclass(frozen=True, eq=False)
class DenseModel:
    """Members with their own full weights: the unshared baseline.

    Same interface as `superweights.BudgetedModel`; params are `{member: params}`.
    """

    members: tuple[Member, ...]
    vectorize: bool | None = None

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        del key  # the members carry their own initial values
        params = {m.name: jax.tree_util.tree_map(jnp.asarray, m.params) for m in self.members}
        return params, {m.name: m.state for m in self.members}

    def apply(self, params, state, x, train=False, rng=None):
        return apply_members(self.members, params, state, x, train, self.vectorize, rng)

    def weight_decay_mask(self, params):
        return jax.tree_util.tree_map(lambda _: True, params)

    @property
    def trainable_params(self) -> int:
        return sum(x.size for m in self.members for x in jax.tree_util.tree_leaves(m.params))


def member_names(arch_names: list[str]) -> list[str]:
    """Unique member names: an architecture listed n > 1 times becomes `name_1 .. name_n`."""
    counts = {name: arch_names.count(name) for name in arch_names}
    seen: dict[str, int] = {}
    names = []
    for name in arch_names:
        seen[name] = seen.get(name, 0) + 1
        names.append(f"{name}_{seen[name]}" if counts[name] > 1 else name)
    return names


def create_members(
    arch_names: list[str],
    *,
    num_classes: int,
    in_channels: int,
    seed: int,
    dtype: str = "float32",
    **kwargs,
) -> dict[str, nnx.Module]:
    """`{member name: module}` from the registry; each member gets its own init seed.

    The same architecture may be listed several times (an ensemble of equals);
    its members are then named `arch_1`, `arch_2`, ... (see `member_names`).
    `dtype` names what they compute in (`COMPUTE_DTYPES`); their params are
    float32 and initialised alike under either.
    """
    if not arch_names:
        raise ValueError("give at least one member architecture")
    if compute_dtype(dtype) is not None:
        kwargs["dtype"] = compute_dtype(dtype)
    return {
        name: archs.create(
            arch,
            num_classes=num_classes,
            in_channels=in_channels,
            rngs=nnx.Rngs(seed + i),
            **kwargs,
        )
        for i, (name, arch) in enumerate(zip(member_names(arch_names), arch_names, strict=True))
    }


def build_budgeted(
    modules: dict[str, nnx.Module],
    budget: Budget,
    sample_input: jax.Array,
    *,
    bins: int = 4,
    share_dense: bool = False,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
    fill: bool = True,
    reserve_unsharing: bool = False,
    dtype: str = "float32",
) -> BudgetedModel:
    """A budgeted model of `modules`; `dtype` names the dtype its composed kernels are
    handed in (`COMPUTE_DTYPES`), that of the members' computation."""
    rule = SharingRule(share_dense=share_dense)
    return superweights.budgeted(
        modules,
        budget,
        sample_input=sample_input,
        bins=bins,
        rule=rule,
        sublayer_templates=sublayer_templates,
        fill=fill,
        reserve_unsharing=reserve_unsharing,
        dtype=compute_dtype(dtype),
    )


def build_dense(modules: dict[str, nnx.Module]) -> DenseModel:
    return DenseModel(tuple(nnx_member(name, module) for name, module in modules.items()))
