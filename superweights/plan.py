"""The Plan: clusters, size chains, pieces, coefficient keys and templates.

A Plan is static (frozen, hashable) and round-trips through JSON, so it can be
saved beside a checkpoint and used as a static argument of jitted functions.
Geometry follows method.md section 3; allocation section 4; clusters section 5.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from superweights.budget import (
    SUBLAYER_TEMPLATES,
    Allocation,
    BankDemand,
    Budget,
    BudgetError,
    allocate,
    full_size_minimum,
    minimum_budget,
)
from superweights.specs import LayerSpec, ParamSpec

Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Level:
    """What one level of a size chain adds to the running weight `[out, in]`.

    The running weight is cropped to `keep`, then gains `add_in` (new input
    columns for the kept rows) and `add_out` (new output rows over the full new
    input width). Spatial dims (`spatial_size` entries) are carried along.
    """

    target: Shape
    keep: Shape
    add_in: Shape
    add_out: Shape
    cropped: int
    spatial_size: int

    @property
    def piece_size(self) -> int:
        """L: entries one template of this level holds."""
        blocks = self.add_in[0] * self.add_in[1] + self.add_out[0] * self.add_out[1]
        return self.spatial_size * blocks


def size_chain(shapes: Iterable[Shape]) -> tuple[Shape, ...]:
    """Distinct `(out, in)` shapes, smallest first (ties by out, then in)."""
    return tuple(sorted(set(shapes), key=lambda s: (s[0] * s[1], s[0], s[1])))


def chain_levels(chain: Sequence[Shape], spatial_size: int) -> tuple[Level, ...]:
    """The level-by-level construction of every shape in `chain`."""
    levels, (rows, cols) = [], (0, 0)
    for out, inp in chain:
        keep = (min(rows, out), min(cols, inp))
        add_in = (keep[0], inp - cols) if inp > cols else (0, 0)
        add_out = (out - rows, inp) if out > rows else (0, 0)
        cropped = spatial_size * (rows * cols - keep[0] * keep[1])
        levels.append(Level((out, inp), keep, add_in, add_out, cropped, spatial_size))
        rows, cols = out, inp
    return tuple(levels)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Layers (across members) that draw from the same banks.

    Attributes:
      name: e.g. `"c0"`.
      spatial: kernel spatial dims shared by all its layers, e.g. `(3, 3)`.
      layers: layer ids, in depth order of each member.
      chain: the size chain of its distinct `(out, in)` shapes.
    """

    name: str
    spatial: tuple[int, ...]
    layers: tuple[str, ...]
    chain: tuple[Shape, ...]

    @functools.cached_property
    def levels(self) -> tuple[Level, ...]:
        return chain_levels(self.chain, math.prod(self.spatial))

    def level_of(self, layer: LayerSpec) -> int:
        return self.chain.index(layer.matrix)


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """Templates of one (cluster, level) and the coefficient vectors over them.

    At full size a template holds the level's whole piece of L entries. In
    sub-layer geometry (budgets below one full template per bank) it holds
    `template_size` < L entries, and a piece is `blocks = ceil(L / template_size)`
    blocks laid end to end (the last one cropped), each block its own learned
    combination of the templates: a coefficient vector is `[blocks, templates]`.

    Attributes:
      cluster: cluster name.
      level: level in the cluster's size chain.
      piece_size: L, entries of the level's piece.
      templates: number of whole templates.
      partial: entries of one extra partial template (0 = none; full size only).
      groups: coefficient-vector names over this bank, one row each.
      users: number of layers reading the bank.
      fan_in: fan-in of the level's target shape (sets the init scale).
      template_size: entries of one template; 0 (plans saved before sub-layer
        geometry) means `piece_size`.
    """

    cluster: str
    level: int
    piece_size: int
    templates: int
    partial: int
    groups: tuple[str, ...]
    users: int
    fan_in: int
    template_size: int = 0

    @property
    def key(self) -> str:
        return f"{self.cluster}_l{self.level}"

    @property
    def size(self) -> int:
        """Entries of one template: the piece size, or less in sub-layer geometry."""
        return self.template_size or self.piece_size

    @property
    def blocks(self) -> int:
        """Template-sized blocks that make up the piece (1 at full size)."""
        return -(-self.piece_size // self.size)

    @property
    def sublayer(self) -> bool:
        return self.blocks > 1

    @property
    def num_templates(self) -> int:
        """Rows of the template matrix, partial template included."""
        return self.templates + (self.partial > 0)

    @property
    def coefficient_shape(self) -> tuple[int, ...]:
        """`[groups, templates]`, or `[groups, blocks, templates]` below full size."""
        if self.sublayer:
            return (len(self.groups), self.blocks, self.num_templates)
        return (len(self.groups), self.num_templates)

    @property
    def template_params(self) -> int:
        return self.templates * self.size + self.partial

    @property
    def coefficient_params(self) -> int:
        return math.prod(self.coefficient_shape)

    @property
    def group_params(self) -> int:
        """Entries of one coefficient vector: `templates`, or `blocks * templates`."""
        return math.prod(self.coefficient_shape[1:])

    @property
    def unsharing_room(self) -> int:
        """Coefficient params unsharing can still add: one vector per user at most."""
        return (self.users - len(self.groups)) * self.group_params

    def demand(self, reserve_unsharing: bool = False) -> BankDemand:
        """What the allocation sees; with `reserve_unsharing`, one vector per user."""
        groups = self.users if reserve_unsharing else len(self.groups)
        return BankDemand(self.piece_size, self.users, groups)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about a budgeted model.

    Attributes:
      layers: every shared layer of every member.
      unshared: every per-member parameter (norms, biases, heads, ...).
      clusters: the sharing clusters.
      coefficients: `(layer id, group name per level 0..r)` for every layer;
        layers with the same group at a level share that coefficient vector.
      banks: one per (cluster, level), with its allocated templates.
      budget: the budget the plan was made for.
      budget_params: that budget in parameters.
      leftover: parameters of the budget left unspent.
      paper_templates: templates per bank by the paper's rule alone (zeros
        below the full-size floor).
      sublayer_templates: templates per bank the allocation uses below the
        full-size floor; 0 if such budgets are refused.
      reserve_unsharing: the allocation kept room for every layer to own its
        coefficients (`reserved`), so that unsharing always fits the budget.
    """

    layers: tuple[LayerSpec, ...]
    unshared: tuple[ParamSpec, ...]
    clusters: tuple[Cluster, ...]
    coefficients: tuple[tuple[str, tuple[str, ...]], ...]
    banks: tuple[BankSpec, ...]
    budget: Budget
    budget_params: int
    leftover: int
    paper_templates: tuple[int, ...]
    sublayer_templates: int = SUBLAYER_TEMPLATES
    reserve_unsharing: bool = False

    @functools.cached_property
    def members(self) -> tuple[str, ...]:
        names = [layer.member for layer in self.layers] + [p.member for p in self.unshared]
        return tuple(dict.fromkeys(names))

    @functools.cached_property
    def layer(self) -> dict[str, LayerSpec]:
        return {layer.id: layer for layer in self.layers}

    @functools.cached_property
    def cluster_of(self) -> dict[str, Cluster]:
        return {layer_id: c for c in self.clusters for layer_id in c.layers}

    @functools.cached_property
    def bank(self) -> dict[tuple[str, int], BankSpec]:
        return {(b.cluster, b.level): b for b in self.banks}

    @functools.cached_property
    def groups_of(self) -> dict[str, tuple[str, ...]]:
        return dict(self.coefficients)

    def coefficient_row(self, layer_id: str, level: int) -> int:
        """Row of the (cluster, level) coefficient matrix that `layer_id` uses."""
        bank = self.bank[self.cluster_of[layer_id].name, level]
        return bank.groups.index(self.groups_of[layer_id][level])

    @property
    def template_params(self) -> int:
        return sum(b.template_params for b in self.banks)

    @property
    def coefficient_params(self) -> int:
        return sum(b.coefficient_params for b in self.banks)

    @property
    def unshared_params(self) -> int:
        return sum(p.size for p in self.unshared)

    @property
    def trainable_params(self) -> int:
        return self.template_params + self.coefficient_params + self.unshared_params

    @property
    def dense_params(self) -> int:
        """Trainable parameters of the members with no sharing at all."""
        return sum(layer.size for layer in self.layers) + self.unshared_params

    @property
    def sublayer(self) -> bool:
        """Whether any bank is in sub-layer geometry."""
        return any(b.sublayer for b in self.banks)

    def _floor_args(self) -> tuple[list[BankDemand], int, bool]:
        fixed, count_coefficients = self.budget.counted(self.unshared_params)
        return [b.demand(self.reserve_unsharing) for b in self.banks], fixed, count_coefficients

    @property
    def reserved(self) -> int:
        """Budget kept for the coefficient vectors unsharing may still add.

        Counted where coefficients count against the budget: every bank in model
        scope, sub-layer banks in banks scope. 0 unless `reserve_unsharing`.
        """
        if not self.reserve_unsharing:
            return 0
        _, count_coefficients = self.budget.counted(self.unshared_params)
        return sum(b.unsharing_room for b in self.banks if count_coefficients or b.sublayer)

    @property
    def minimum_budget(self) -> int:
        """The smallest feasible budget for these clusters, in the budget's scope."""
        return minimum_budget(*self._floor_args(), sublayer=self.sublayer_templates > 0)

    @property
    def full_size_minimum(self) -> int:
        """The budget from which every bank holds full-size templates (the paper's floor)."""
        return full_size_minimum(*self._floor_args())

    @property
    def spent(self) -> int:
        """Parameters counted against the budget in its scope.

        Banks scope counts the templates (the paper's count) and, in sub-layer
        banks, the block coefficients, which there are of the templates' order.
        """
        if self.budget.scope == "banks":
            return self.template_params + sum(
                b.coefficient_params for b in self.banks if b.sublayer
            )
        return self.trainable_params

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan `to_json` wrote; `PlanError` names what is missing, wrong or inconsistent."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanError(f"a plan is JSON text, and this is not ({error})") from None
        if not isinstance(raw, dict):
            raise PlanError(f"a plan is a JSON object, got a {type(raw).__name__}")
        missing = [name for name in PLAN_FIELDS if name not in raw]
        if missing:
            raise PlanError(
                f"the plan has no field {', '.join(map(repr, missing))}; it needs "
                f"{', '.join(PLAN_FIELDS)} (write plans with Plan.to_json)"
            )
        plan = cls(
            layers=_records(raw, "layers", lambda x: LayerSpec(**_tuples(x))),
            unshared=_records(raw, "unshared", lambda x: ParamSpec(**_tuples(x))),
            clusters=_records(
                raw,
                "clusters",
                lambda c: Cluster(
                    c["name"], tuple(c["spatial"]), tuple(c["layers"]), _shapes(c["chain"])
                ),
            ),
            coefficients=_records(raw, "coefficients", lambda x: (x[0], tuple(x[1]))),
            banks=_records(raw, "banks", _bank_spec),
            budget=_field(raw, "budget", lambda b: Budget(**b)),
            budget_params=_field(raw, "budget_params", _whole),
            leftover=_field(raw, "leftover", _whole),
            paper_templates=_field(raw, "paper_templates", lambda t: tuple(map(_whole, t))),
            sublayer_templates=_field(raw, "sublayer_templates", _whole, SUBLAYER_TEMPLATES),
            reserve_unsharing=_field(raw, "reserve_unsharing", bool, False),
        )
        try:
            check_plan(plan)
        except TypeError as error:  # a field of the wrong type, met while checking
            raise PlanError(f"the plan holds a value of the wrong type: {error}") from None
        return plan


class PlanError(ValueError):
    """A plan that does not hold together: a damaged, hand-edited or foreign plan."""


PLAN_FIELDS = (
    "layers",
    "unshared",
    "clusters",
    "coefficients",
    "banks",
    "budget",
    "budget_params",
    "leftover",
    "paper_templates",
)
"""The fields every plan's JSON holds (the others have defaults)."""


def _whole(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    return value


def _field(raw: dict, name: str, read, default=None):
    """`read(raw[name])`, or `default` if absent; a malformed value is named."""
    if name not in raw:
        return default
    try:
        return read(raw[name])
    except (TypeError, KeyError, ValueError, IndexError) as error:
        raise PlanError(f"the plan's field {name!r} is malformed: {error}") from None


def _records(raw: dict, name: str, read) -> tuple:
    """`read` of every record of the list `raw[name]`; a malformed one is named by index."""
    records = raw[name]
    if not isinstance(records, list):
        raise PlanError(f"the plan's field {name!r} is a list, got {type(records).__name__}")
    read_all = []
    for index, record in enumerate(records):
        try:
            read_all.append(read(record))
        except (TypeError, KeyError, ValueError, IndexError) as error:
            raise PlanError(f"the plan's {name}[{index}] is malformed: {error!r}") from None
    return tuple(read_all)


def check_plan(plan: Plan) -> None:
    """Raises `PlanError` unless `plan` is one `make_plan` (or the search) could have made.

    Checks that every layer is in exactly one cluster whose chain holds its
    shape, that its coefficient groups reach its level, that the banks are
    those of the clusters' levels with the groups that use them, and that the
    plan spends no more than its budget.
    """
    ids = [layer.id for layer in plan.layers]
    if len(set(ids)) != len(ids):
        raise PlanError(f"the plan lists layer {_first_repeat(ids)!r} twice")
    clustered = [layer_id for c in plan.clusters for layer_id in c.layers]
    if len(set(clustered)) != len(clustered):
        raise PlanError(f"layer {_first_repeat(clustered)!r} is in two of the plan's clusters")
    if set(clustered) != set(ids):
        odd = sorted(set(clustered) ^ set(ids))[0]
        where = "in a cluster but not among the layers" if odd in clustered else "in no cluster"
        raise PlanError(f"layer {odd!r} is {where}")
    groups = plan.groups_of
    if len(plan.coefficients) != len(groups) or set(groups) != set(ids):
        raise PlanError("the plan's coefficients must name every layer exactly once")
    expected_banks: dict[tuple[str, int], tuple[int, set, int]] = {}
    for cluster in plan.clusters:
        levels = cluster.levels
        for layer_id in cluster.layers:
            layer = plan.layer[layer_id]
            if layer.spatial != cluster.spatial or layer.matrix not in cluster.chain:
                raise PlanError(
                    f"layer {layer_id!r} of shape {list(layer.shape)} does not fit its cluster "
                    f"{cluster.name!r} (spatial {list(cluster.spatial)}, chain "
                    f"{[list(s) for s in cluster.chain]})"
                )
            level = cluster.level_of(layer)
            if len(groups[layer_id]) != level + 1:
                raise PlanError(
                    f"layer {layer_id!r} reaches level {level} of {cluster.name!r} and needs "
                    f"{level + 1} coefficient groups, the plan gives {len(groups[layer_id])}"
                )
            for depth in range(level + 1):
                piece, names, users = expected_banks.get(
                    (cluster.name, depth), (levels[depth].piece_size, set(), 0)
                )
                names.add(groups[layer_id][depth])
                expected_banks[cluster.name, depth] = (piece, names, users + 1)
    for bank in plan.banks:
        key = (bank.cluster, bank.level)
        if key not in expected_banks:
            raise PlanError(f"bank {bank.key!r} belongs to no level of the plan's clusters")
        piece, names, users = expected_banks.pop(key)
        size_ok = 0 <= bank.template_size <= piece and 0 <= bank.partial < bank.size
        if (bank.piece_size, set(bank.groups), bank.users) != (piece, names, users) or not (
            bank.templates >= 0 and bank.num_templates >= 1 and size_ok
        ):
            raise PlanError(
                f"bank {bank.key!r} does not match its level: piece {bank.piece_size} "
                f"(expected {piece}), {bank.users} users (expected {users}), "
                f"{bank.templates} templates of {bank.size} entries, partial {bank.partial}"
            )
    if expected_banks:
        cluster, level = next(iter(expected_banks))
        raise PlanError(f"the plan has no bank for level {level} of cluster {cluster!r}")
    check_plan_budget(plan)


def check_plan_budget(plan: Plan) -> None:
    """The plan's budget is what its budget resolves to, and it spends no more."""
    reference = model_size(plan.layers, plan.unshared, plan.budget)
    try:
        resolved = plan.budget.resolve(reference)
    except BudgetError as error:
        raise PlanError(f"the plan's budget does not fit its model: {error}") from None
    if plan.budget_params != resolved:
        raise PlanError(
            f"the plan's budget_params {plan.budget_params:,} is not its budget "
            f"{plan.budget.describe()} of a model of {reference:,} parameters ({resolved:,})"
        )
    if plan.spent + plan.reserved > plan.budget_params:
        raise PlanError(
            f"the plan spends {plan.spent:,} parameters (+ {plan.reserved:,} reserved) against a "
            f"budget of {plan.budget_params:,} ({plan.budget.scope} scope); its templates were "
            "changed after planning: make the plan again with make_plan or superweights.budgeted"
        )


def _first_repeat(items: Sequence[str]) -> str:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    raise ValueError("no repeat")


BANK_COUNTS = ("level", "piece_size", "templates", "partial", "users", "fan_in", "template_size")
"""The fields of a bank that are counts: whole numbers, never negative."""


def _bank_spec(record: dict) -> BankSpec:
    """A `BankSpec` from its JSON record, its counts checked to be whole and not negative."""
    bank = BankSpec(**_tuples(record))
    for name in BANK_COUNTS:
        value = getattr(bank, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} is a count, a whole number of at least 0; got {value!r}")
    return bank


def check_counts(bins, sublayer_templates) -> None:
    """`bins` is a whole number of at least 1 and `sublayer_templates` of at least 0."""
    for name, value, least in (("bins", bins, 1), ("sublayer_templates", sublayer_templates, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")


def _tuples(record: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def _shapes(chain: list) -> tuple[Shape, ...]:
    return tuple((int(o), int(i)) for o, i in chain)


def bins_per_kind(counts: Mapping[tuple[int, ...], int], depth: int, bins: int) -> dict:
    """Depth bins per kernel kind: `max(1, round(bins * n_kind / depth))`.

    `counts` holds the leader's layers of each kind and `depth` all its shared
    layers, so `bins=4` on a WRN-28 (25 3x3 and 3 1x1 layers) gives four 3x3
    bins and one 1x1 bin, as the authors' code does (Python's rounding).
    """
    return {kind: max(1, round(bins * n / depth)) for kind, n in counts.items()}


def kind_order(spatial: tuple[int, ...]) -> tuple:
    """Sort key of kernel kinds, smallest kernel first (dense, 1x1, then 3x3, ...)."""
    return (math.prod(spatial), spatial)


def largest_member(layers: Sequence[LayerSpec]) -> str:
    """The member with the most shared parameters (first one on ties)."""
    sizes: dict[str, int] = {}
    for layer in layers:
        sizes[layer.member] = sizes.get(layer.member, 0) + layer.size
    return max(sizes, key=sizes.get)


def kind_bins(layers: Sequence[LayerSpec], bins: int) -> tuple[str, dict, dict]:
    """`(largest member, {kind: its layers of that kind}, {kind: bins})`, kinds sorted."""
    leader = largest_member(layers)
    kinds: dict[tuple[int, ...], int] = {}
    for layer in sorted(layers, key=lambda x: kind_order(x.spatial)):
        if layer.member == leader:
            kinds[layer.spatial] = kinds.get(layer.spatial, 0) + 1
    per_kind = bins_per_kind(kinds, sum(kinds.values()), bins)
    for layer in layers:  # kinds the largest member lacks: one bin each
        per_kind.setdefault(layer.spatial, 1)
    return leader, kinds, dict(sorted(per_kind.items(), key=lambda kv: kind_order(kv[0])))


def describe_bins(layers: Sequence[LayerSpec], bins: int) -> str:
    """One line on how `bins` became initial clusters, for reports and logs."""
    leader, kinds, per_kind = kind_bins(layers, bins)
    depth = sum(kinds.values())
    parts = [
        f"{'x'.join(map(str, kind)) or 'dense'}: {kinds.get(kind, 0)} layers -> {n} "
        + ("bin" if n == 1 else "bins")
        for kind, n in per_kind.items()
    ]
    return (
        f"bins={bins}: each kernel kind of the largest member ({leader}, {depth} shared "
        f"layers) gets max(1, round(bins * layers / {depth})) depth bins; " + "; ".join(parts)
    )


def initial_clusters(layers: Sequence[LayerSpec], bins: int = 4) -> tuple[Cluster, ...]:
    """Kernel-size separation, then contiguous depth bins (method.md section 5).

    The authors' rule: the largest member's layers of each kernel kind get
    `max(1, round(bins * n_kind / depth))` bins (`bins_per_kind`); every member
    splits its own layers of that kind into as many contiguous bins (earlier
    bins take one layer more when they do not divide evenly), so that layers at
    the same relative depth land in the same cluster. Clusters are numbered
    smallest kernel first, then by depth; the allocation's round-robin visits
    their banks in that order. Kinds the largest member lacks get one bin.
    """
    if not layers:
        raise ValueError(
            "no shared layers: the model has no convolution kernels; "
            "pass share_dense=True to share dense kernels too"
        )
    check_counts(bins, 0)
    per_kind = kind_bins(layers, bins)[2]
    members = list(dict.fromkeys(layer.member for layer in layers))

    clusters = []
    for kind, n_bins in per_kind.items():
        binned: list[list[LayerSpec]] = [[] for _ in range(n_bins)]
        for member in members:
            own = [x for x in layers if x.member == member and x.spatial == kind]
            for index, chunk in enumerate(np.array_split(np.arange(len(own)), n_bins)):
                binned[index].extend(own[i] for i in chunk)
        for chunk in binned:
            if chunk:
                clusters.append(make_cluster(f"c{len(clusters)}", chunk))
    return tuple(clusters)


def make_cluster(name: str, layers: Sequence[LayerSpec]) -> Cluster:
    """A cluster of `layers`, which must share their spatial kernel dims."""
    spatial = {layer.spatial for layer in layers}
    if len(spatial) != 1:
        raise ValueError(f"cluster {name} mixes kernel sizes {sorted(spatial)}")
    chain = size_chain(layer.matrix for layer in layers)
    return Cluster(name, spatial.pop(), tuple(x.id for x in layers), chain)


def own_coefficients(clusters: Sequence[Cluster], layers: Sequence[LayerSpec]):
    """Every layer owns its coefficients at every level."""
    by_id = {layer.id: layer for layer in layers}
    return tuple((i, (i,) * (c.level_of(by_id[i]) + 1)) for c in clusters for i in c.layers)


def cluster_coefficients(clusters: Sequence[Cluster], layers: Sequence[LayerSpec]):
    """One coefficient vector per (cluster, level), shared by all its layers."""
    by_id = {layer.id: layer for layer in layers}
    return tuple((i, (c.name,) * (c.level_of(by_id[i]) + 1)) for c in clusters for i in c.layers)


def bank_layout(
    clusters: Sequence[Cluster],
    layers: Sequence[LayerSpec],
    coefficients: Sequence[tuple[str, tuple[str, ...]]],
) -> list[BankSpec]:
    """One bank per (cluster, level) with one template each: the allocation's input."""
    by_id = {layer.id: layer for layer in layers}
    groups_of = dict(coefficients)
    missing = [i for c in clusters for i in c.layers if i not in groups_of]
    if missing:
        raise ValueError(f"no coefficient groups given for layers {missing[:5]}")
    banks = []
    for cluster in clusters:
        for w, level in enumerate(cluster.levels):
            users = [i for i in cluster.layers if cluster.level_of(by_id[i]) >= w]
            groups = tuple(dict.fromkeys(groups_of[i][w] for i in users))
            fan_in = math.prod(cluster.spatial) * level.target[1]
            banks.append(
                BankSpec(cluster.name, w, level.piece_size, 1, 0, groups, len(users), fan_in)
            )
    return banks


def model_size(layers: Sequence[LayerSpec], unshared: Sequence[ParamSpec], budget: Budget) -> int:
    """The members' own size in `budget`'s scope: what a fraction of the budget is of."""
    fixed, _ = budget.counted(sum(p.size for p in unshared))
    return sum(layer.size for layer in layers) + fixed


def fewest_clusters_minimum(
    layers: Sequence[LayerSpec],
    coefficients: Sequence[tuple[str, tuple[str, ...]]],
    fixed: int,
    count_coefficients: bool,
    reserve_unsharing: bool,
    sublayer_templates: int,
) -> int:
    """The minimum feasible budget with one cluster per kernel size (`bins=1`).

    Coefficients stay as given: shared per cluster when every layer's groups are
    its cluster's name, otherwise owned by each layer.
    """
    clusters = initial_clusters(layers, 1)
    ids = {layer.id for layer in layers}
    shared = not any(group in ids for _, groups in coefficients for group in groups)
    pick = cluster_coefficients if shared else own_coefficients
    banks = bank_layout(clusters, layers, pick(clusters, layers))
    demands = [b.demand(reserve_unsharing) for b in banks]
    return minimum_budget(demands, fixed, count_coefficients, sublayer_templates > 0)


def make_plan(
    layers: Sequence[LayerSpec],
    unshared: Sequence[ParamSpec],
    clusters: Sequence[Cluster],
    coefficients: Sequence[tuple[str, tuple[str, ...]]],
    budget: Budget,
    *,
    cap: int = 8,
    passes: int = 7,
    fill: bool = True,
    sublayer_templates: int = SUBLAYER_TEMPLATES,
    reserve_unsharing: bool = False,
) -> Plan:
    """Allocates templates for `clusters` under `budget` and returns the Plan.

    Budgets from one full-size template per bank up get the paper's geometry;
    below that, banks get `sublayer_templates` templates smaller than their
    pieces (see `superweights.budget.allocate_sublayer`); 0 refuses them. With
    `reserve_unsharing`, every coefficient vector a layer could get is counted
    as if it existed, so that the plan stays within budget however far
    `search.unshare_plan` later splits its coefficients (`Plan.reserved`).

    Raises:
      BudgetError: when the budget is below the minimum feasible one; the
        message states that minimum.
    """
    check_counts(1, sublayer_templates)
    clustered = [i for c in clusters for i in c.layers]
    if sorted(clustered) != sorted(layer.id for layer in layers):
        raise ValueError("clusters must hold every shared layer exactly once")
    banks = bank_layout(clusters, layers, coefficients)
    fixed, count_coefficients = budget.counted(sum(p.size for p in unshared))
    reference = model_size(layers, unshared, budget)
    budget_params = budget.resolve(reference)
    demands = [b.demand(reserve_unsharing) for b in banks]
    try:
        allocation: Allocation = allocate(
            demands,
            budget_params,
            fixed=fixed,
            count_coefficients=count_coefficients,
            cap=cap,
            passes=passes,
            fill=fill,
            sublayer_templates=sublayer_templates,
        )
    except BudgetError as error:
        minimum = minimum_budget(demands, fixed, count_coefficients, sublayer_templates > 0)
        whole = "shared kernels'" if budget.scope == "banks" else "model's"
        one_bin = fewest_clusters_minimum(
            layers, coefficients, fixed, count_coefficients, reserve_unsharing, sublayer_templates
        )
        with_one_bin = (
            f"; with bins=1 (one cluster per kernel size) it would be {one_bin:,}, "
            f"{one_bin / reference:.2%}"
            if len(clusters) > 1 and one_bin < minimum
            else ""
        )
        raise BudgetError(
            f"{error} (the minimum is {minimum / reference:.2%} of the {whole} {reference:,} "
            f"parameters in {budget.scope} scope{with_one_bin})"
        ) from None
    banks = [
        dataclasses.replace(b, templates=k, partial=m, template_size=t if t < b.piece_size else 0)
        for b, k, m, t in zip(
            banks,
            allocation.templates,
            allocation.partial,
            allocation.template_sizes,
            strict=True,
        )
    ]
    plan = Plan(
        layers=tuple(layers),
        unshared=tuple(unshared),
        clusters=tuple(clusters),
        coefficients=tuple(coefficients),
        banks=tuple(banks),
        budget=budget,
        budget_params=budget_params,
        leftover=allocation.leftover,
        paper_templates=allocation.paper_templates,
        sublayer_templates=sublayer_templates,
        reserve_unsharing=reserve_unsharing,
    )
    if plan.spent + plan.reserved > budget_params:
        raise BudgetError(
            f"internal error: plan spends {plan.spent:,} + reserves {plan.reserved:,} "
            f"> {budget_params:,}"
        )
    return plan
