"""The bank and the composer: `weights = compose(plan, bank)`.

A bank is a pytree of trainable arrays:

    {"templates":    {bank key: [templates, T]},
     "partial":      {bank key: [m]}             (banks with a partial template),
     "coefficients": {bank key: [groups, num_templates]
                                or [groups, blocks, templates] (sub-layer banks)}}

A layer's SuperWeight at a level is its coefficient row times the level's
templates; its weight is built level by level (method.md sections 2-3). At full
size T = L. In sub-layer geometry T < L and the piece is `blocks = ceil(L / T)`
template-sized blocks, each its own combination of the templates, laid end to
end and cropped to L: two matrix products per bank (the whole blocks batched,
then the cropped last one), whatever the number of blocks.

Composition runs in the bank's dtype (float32); each composed kernel is cast
once, at the end, to the model's param dtype or to a compute dtype (`dtype`:
bf16 for members that compute in it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from superweights.plan import BankSpec, Level, Plan

SHORTEST_DRAW = 1 << 16
"""The fewest normal values `bank_noise` draws at once."""

DRAW_STEP = 1 << 20
"""Above this many values, `bank_noise` draws a multiple of it, not a power of two."""


@functools.partial(jax.jit, static_argnums=1)
def _normal_draw(key: jax.Array, length: int) -> jax.Array:
    return jax.random.normal(key, (length,), jnp.float32)


def noise_size(plan: Plan) -> int:
    """How many normal values `init_bank` draws for `plan`."""
    return sum(math.prod(shape) for spec in plan.banks for shape in _noise_shapes(spec))


def draw_length(size: int) -> int:
    """The length `bank_noise` draws for `size` values: a power of two, at least
    `SHORTEST_DRAW`, up to `DRAW_STEP`; above it the next multiple of `DRAW_STEP` (a large
    bank's draw is then at most 4 MiB longer than it, not up to twice as long).
    `archs.layers.draw_length` is the same rule up to `DRAW_STEP`, for the built-in models'
    kernels: the two folders import neither the other."""
    if size > DRAW_STEP:
        return -(-size // DRAW_STEP) * DRAW_STEP
    return max(SHORTEST_DRAW, 1 << (size - 1).bit_length())


def bank_noise(plan: Plan, key: jax.Array) -> jax.Array:
    """`init_bank`'s normal draw for `plan`, with `key`, from a program many plans share:
    `[draw_length(noise_size(plan))]`.

    JAX draws value i from the key and i alone (its default, partitionable threefry), so
    the first values of a longer draw are the shorter draw, bit for bit. A random-number
    program takes XLA about half a second to compile on a CPU: drawn inside `init_bank`,
    every plan (every budget, every search result) paid it.
    """
    return _normal_draw(key, draw_length(noise_size(plan)))


def init_bank(
    plan: Plan, key: jax.Array, dtype=jnp.float32, scales=None, noise: jax.Array | None = None
) -> dict:
    """Initialises every entry of every bank.

    Each bank's coefficient rows are orthogonal to one another where there are
    no more rows than templates (orthogonal columns otherwise) and of unit norm,
    so a composed entry has the variance of one template entry. Templates are
    normal with a He scale for the level's fan-in, or, with `scales` (`{bank
    key: [groups]}`, the standard deviation each coefficient group's pieces
    should have; `bank_scales`), with the root mean square of the bank's
    scales, each group's row then scaled to its own: every composed kernel
    starts at its layer's own initialiser scale.

    Every bank's random values are slices of one normal draw, so that the
    program has one random-number generator however many banks the plan has
    (each generator costs XLA a fraction of a second to compile). `noise`, when
    given, is that draw made beforehand (`bank_noise(plan, key)`: the same values,
    and a program without a generator); `key` is then unused.
    """
    shapes = [shape for spec in plan.banks for shape in _noise_shapes(spec)]
    sizes = [math.prod(shape) for shape in shapes]
    if noise is None:
        noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    starts = np.cumsum([0, *sizes])[:-1]
    draws = iter(
        noise[start : start + size].reshape(shape)
        for start, size, shape in zip(starts, sizes, shapes, strict=True)
    )
    bank = {"templates": {}, "partial": {}, "coefficients": {}}
    for spec in plan.banks:
        templates, partial = next(draws), next(draws)
        rows = _coefficient_rows(spec, next(draws))
        if scales is None:
            std = math.sqrt(2.0 / spec.fan_in)
        else:
            wanted = jnp.asarray(scales[spec.key], jnp.float32)
            std = jnp.sqrt(jnp.mean(jnp.square(wanted)))
            ratio = wanted / std
            rows = rows * ratio.reshape(ratio.shape + (1,) * (rows.ndim - 1))
        bank["templates"][spec.key] = (std * templates).astype(dtype)
        if spec.partial:
            bank["partial"][spec.key] = (std * partial).astype(dtype)
        bank["coefficients"][spec.key] = rows.astype(dtype)
    return bank


def _noise_shapes(spec: BankSpec) -> tuple[tuple[int, ...], ...]:
    """The normal draws a bank is made from: templates, partial template, coefficient rows
    (`[blocks, groups, templates]` below full size, one orthogonal set per block)."""
    rows = (len(spec.groups), spec.num_templates)
    if spec.sublayer:
        rows = (spec.blocks, *rows)
    return (spec.templates, spec.size), (spec.partial,), rows


def kernel_scale(kernel) -> float | None:
    """The root mean square of an initial kernel, or None where it says nothing (abstract,
    all zeros, not finite)."""
    if kernel is None or isinstance(kernel, jax.ShapeDtypeStruct):
        return None
    rms = float(np.sqrt(np.mean(np.square(np.asarray(kernel, np.float64)))))
    return rms if math.isfinite(rms) and rms > 0 else None


def bank_scales(plan: Plan, layer_scales: Mapping[str, float | None]) -> dict[str, np.ndarray]:
    """`{bank key: [groups]}`: the standard deviation each coefficient group's pieces start
    at, the root mean square of its layers' initial kernels (`{layer id: RMS}`), or the
    bank's He scale where a layer's is unknown."""
    users: dict[tuple[str, str], list[float | None]] = {}
    for layer in plan.layers:
        for level, group in enumerate(plan.groups_of[layer.id]):
            bank = plan.bank[plan.cluster_of[layer.id].name, level]
            users.setdefault((bank.key, group), []).append(layer_scales.get(layer.id))
    scales = {}
    for spec in plan.banks:
        he = math.sqrt(2.0 / spec.fan_in)
        values = []
        for group in spec.groups:
            known = users.get((spec.key, group), [None])
            values.append(math.sqrt(np.mean(np.square(known))) if None not in known else he)
        scales[spec.key] = np.asarray(values, np.float32)
    return scales


def bank_shapes(plan: Plan) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shape of every bank entry `init_bank` makes for `plan`, by part and bank key."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"templates": {}, "partial": {}}
    shapes["coefficients"] = {}
    for spec in plan.banks:
        shapes["templates"][spec.key] = (spec.templates, spec.size)
        if spec.partial:
            shapes["partial"][spec.key] = (spec.partial,)
        shapes["coefficients"][spec.key] = spec.coefficient_shape
    return shapes


def check_bank(plan: Plan, bank) -> None:
    """Raises `ValueError` naming the first bank entry whose shape is not the plan's.

    Params made for another plan (another budget, another search result) fail
    here with the entry and both shapes, rather than deep inside composition.
    """
    advice = "these params belong to another plan: use the plan they were trained with"
    if not isinstance(bank, Mapping):
        raise ValueError(f"params['bank'] is a {type(bank).__name__}, not a bank; {advice}")
    for part, expected in bank_shapes(plan).items():
        given = bank.get(part, {})
        for key, shape in expected.items():
            if key not in given:
                raise ValueError(
                    f"the params have no bank entry {part}/{key} {list(shape)}; {advice}"
                )
            if tuple(np.shape(given[key])) != shape:
                raise ValueError(
                    f"bank entry {part}/{key} is {list(np.shape(given[key]))} in the params "
                    f"but {list(shape)} in the plan; {advice}"
                )
        extra = sorted(set(given) - set(expected))
        if extra:
            raise ValueError(f"bank entry {part}/{extra[0]} is not in the plan; {advice}")


def _coefficient_rows(spec: BankSpec, noise: jax.Array) -> jax.Array:
    """Unit-norm coefficient vectors, orthogonal across groups (per block below full size).

    `noise` is standard normal, `[groups, templates]` or `[blocks, groups, templates]`.
    Its QR decomposition gives the orthogonal set, signs fixed by R's diagonal so that
    it is uniformly distributed (computed in float32: QR has no half-precision kernel).
    """
    wide = noise.shape[-2] < noise.shape[-1]
    tall = jnp.swapaxes(noise, -1, -2) if wide else noise
    q, r = jnp.linalg.qr(tall)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    rows = jnp.swapaxes(q, -1, -2) if wide else q
    if spec.sublayer:
        rows = jnp.swapaxes(rows, 0, 1)  # [groups, blocks, templates]
    return rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)


def template_matrix(spec: BankSpec, bank: dict) -> jax.Array:
    """`[num_templates, L]`: whole templates, then the partial one padded with zeros."""
    templates = bank["templates"][spec.key]
    if not spec.partial:
        return templates
    padded = jnp.pad(bank["partial"][spec.key], (0, spec.piece_size - spec.partial))
    return jnp.concatenate([templates, padded[None]], axis=0)


def pieces(spec: BankSpec, bank: dict) -> jax.Array:
    """`[groups, L]`: the bank's piece for each coefficient group.

    Full size: `[groups, k] @ [k, L]`. Sub-layer: the whole blocks are
    `[groups, blocks - 1, k] @ [k, T]`, flattened, and the last one, cropped,
    `[groups, k] @ [k, rest]`: the padded block is never materialised.
    """
    coefficients = bank["coefficients"][spec.key]
    templates = template_matrix(spec, bank)
    if not spec.sublayer:
        return coefficients @ templates
    groups, whole = len(spec.groups), (spec.blocks - 1) * spec.size
    head = (coefficients[:, :-1] @ templates).reshape(groups, whole)
    tail = coefficients[:, -1] @ templates[:, : spec.piece_size - whole]
    return jnp.concatenate([head, tail], axis=1)


def superweights(plan: Plan, bank: dict) -> dict[str, jax.Array]:
    """`{bank key: [groups, L]}`: every coefficient row times its bank's templates."""
    return {spec.key: pieces(spec, bank) for spec in plan.banks}


def grow(weight: jax.Array | None, level: Level, piece: jax.Array, spatial) -> jax.Array:
    """Applies one level to the running weight `[*batch, *spatial, in, out]`.

    Crops to the kept block, appends `add_in` input columns for the kept output
    rows, then `add_out` output rows across the full new input width. `piece`
    is `[*batch, L]`: several layers grow at once along leading axes.
    """
    rows, cols = level.keep
    batch = piece.shape[:-1]
    if weight is None:
        weight = jnp.zeros((*batch, *spatial, 0, 0), piece.dtype)
    weight = weight[..., :cols, :rows]
    split = math.prod(spatial) * level.add_in[0] * level.add_in[1]
    if level.add_in[1]:
        block = piece[..., :split].reshape(*batch, *spatial, level.add_in[1], level.add_in[0])
        weight = jnp.concatenate([weight, block], axis=-2)
    if level.add_out[0]:
        block = piece[..., split:].reshape(*batch, *spatial, level.add_out[1], level.add_out[0])
        weight = jnp.concatenate([weight, block], axis=-1)
    return weight


def compose_layer(plan: Plan, by_bank: dict, layer, dtype=None) -> jax.Array:
    """One layer's kernel `[*spatial, in, out]` from the pieces `{bank key: [groups, L]}`.

    In `dtype`, or the layer's own (the model's param dtype) when None.
    """
    cluster = plan.cluster_of[layer.id]
    weight = None
    for w in range(cluster.level_of(layer) + 1):
        piece = by_bank[plan.bank[cluster.name, w].key][plan.coefficient_row(layer.id, w)]
        weight = grow(weight, cluster.levels[w], piece, cluster.spatial)
    return weight.astype(layer.dtype if dtype is None else dtype)


def compose(plan: Plan, bank: dict) -> dict[str, jax.Array]:
    """`{layer id: kernel}` for every shared layer, with the model's shapes and dtypes."""
    by_bank = superweights(plan, bank)
    return {layer.id: compose_layer(plan, by_bank, layer) for layer in plan.layers}


def compose_batch(plan: Plan, by_bank: dict, layers, dtype=None) -> jax.Array:
    """`[n, *spatial, in, out]`: layers of one cluster and one shape, built together.

    Each level gathers the layers' coefficient rows of its bank's pieces and
    grows all `n` weights at once. In `dtype`, or the layers' own when None.
    """
    cluster = plan.cluster_of[layers[0].id]
    weight = None
    for w in range(cluster.level_of(layers[0]) + 1):
        rows = np.array([plan.coefficient_row(layer.id, w) for layer in layers])
        stacked = by_bank[plan.bank[cluster.name, w].key]
        step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
        if step > 0 and np.array_equal(rows, rows[0] + step * np.arange(len(rows))):
            piece = stacked[rows[0] : rows[-1] + 1 : step]  # a slice: no gather, no scatter back
        else:
            piece = stacked[rows]
        weight = grow(weight, cluster.levels[w], piece, cluster.spatial)
    return weight.astype(layers[0].dtype if dtype is None else dtype)


def _runs(plan: Plan, slices) -> list[list]:
    """A stack's slices (by index) in runs of one cluster and one shape."""
    runs: list[list] = []
    for layer in slices:
        same = runs and plan.cluster_of[runs[-1][-1].id] is plan.cluster_of[layer.id]
        if same and runs[-1][-1].shape == layer.shape:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def compose_kernels(plan: Plan, bank: dict, dtype=None) -> dict[str, dict[str, jax.Array]]:
    """`{member: {param path: kernel}}` for every shared kernel, as the models hold them.

    Kernels come in `dtype` (e.g. `jnp.bfloat16` for members computing in it),
    or in each kernel's own dtype when None; composition itself is in the bank's.

    A stacked kernel `[n_layers, ...]` (layers with an `index`) is composed run
    by run, each run of slices in one cluster at once, and concatenated: its
    cost in operations does not grow with the number of layers, so a scanned
    model keeps its short compile.
    """
    by_bank = superweights(plan, bank)
    kernels: dict[str, dict[str, jax.Array]] = {}
    stacks: dict[tuple[str, str], list] = {}
    for layer in plan.layers:
        if layer.index is None:
            kernel = compose_layer(plan, by_bank, layer, dtype).reshape(layer.model_shape)
            kernels.setdefault(layer.member, {})[layer.path] = kernel
        else:
            stacks.setdefault((layer.member, layer.path), []).append(layer)
    for (member, path), slices in stacks.items():
        slices = sorted(slices, key=lambda layer: layer.index)
        if [layer.index for layer in slices] != list(range(len(slices))):
            indices = [layer.index for layer in slices]
            raise ValueError(f"the plan holds slices {indices} of {member}:{path}, not all")
        parts = [
            compose_batch(plan, by_bank, run, dtype).reshape(len(run), *run[0].model_shape)
            for run in _runs(plan, slices)
        ]
        kernels.setdefault(member, {})[path] = jnp.concatenate(parts)
    return kernels
