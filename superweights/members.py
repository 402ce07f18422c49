"""Members: any Flax model as the library sees it, initial values and a pure apply.

`as_member` takes, with no wrapper:

- an NNX module, called `module(*inputs, train=...)` or whatever train-mode
  keyword its `__call__` names (`training`, `deterministic`,
  `use_running_average`), or with none, when its submodules' own
  `deterministic` / `use_running_average` attributes are set per mode;
- a Linen module, the same keywords or none (batch statistics then follow
  `mutable`, the usual convention of Linen model zoos);
- an object holding a Linen `.module` and its `.params` (pretrained weights
  kept as the initial values), as transformer libraries' Flax models do; one
  whose `main_input_name` is `"pixel_values"` (transformers' Flax vision
  models) takes pixel values NCHW, as the object itself does, and its module
  gets them NHWC;
- a `Member`, written by hand when nothing else fits.

Several inputs go in one `Inputs(ids, attention_mask=mask)`; any other pytree
is one positional input. A Linen module's required inputs that a text model's
own call fills in (`attention_mask`, `token_type_ids`, `position_ids`,
`head_mask`) get the same defaults when not given (`ZOO_DEFAULTS`). Models
that draw random numbers in training (dropout) get their streams from the
`rng` key passed to `apply_fn`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from superweights import tree

ApplyFn = Callable[..., tuple[jax.Array, Any]]

#: Train-mode keywords found in public model zoos, and their value in training.
TRAIN_KWARGS = {
    "train": True,
    "training": True,
    "is_training": True,
    "deterministic": False,
    "use_running_average": False,
}

TrainKwarg = str | tuple[str, bool] | None


@dataclasses.dataclass(frozen=True, eq=False)
class Member:
    """A network as the library sees it: initial values and a pure apply.

    Attributes:
      name: unique name, e.g. `"wrn-16-4"`.
      params: nested dict of the trainable params (initial values).
      state: nested dict of everything else (e.g. batch statistics).
      apply_fn: `(params, state, inputs, train) -> (logits, new_state)`; one
        that names a keyword `rng` gets a PRNG key (or None) there.
      signature: hashable; members with equal, non-None signatures compute the
        same function of their params and run together under `jax.vmap`.
      needs_rng: training draws random numbers (dropout), so `rng` is required
        when `train` is True.
      sample: the sample input it was made for, as `jax.ShapeDtypeStruct`s
        (None: unknown); `check_inputs` compares what `apply` is given with it.
    """

    name: str
    params: Any
    state: Any
    apply_fn: ApplyFn
    signature: Any = None
    needs_rng: bool = False
    sample: Any = None

    def __call__(self, params, state, inputs, train: bool, rng=None):
        """`apply_fn`, with `rng` passed only where it is taken."""
        if self.needs_rng and train and rng is None:
            raise ValueError(
                f"member {self.name!r} draws random numbers in training (dropout); pass "
                "rng=jax.random.key(...) to apply, a fresh one every step"
            )
        if _takes_rng(self.apply_fn):
            return self.apply_fn(params, state, inputs, train, rng=rng)
        return self.apply_fn(params, state, inputs, train)


def _takes_rng(fn: Callable) -> bool:
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@jax.tree_util.register_pytree_node_class
class Inputs:
    """Several inputs of one call: `Inputs(ids, attention_mask=mask)` calls `model(ids, ...)`.

    A pytree, so it passes through `jit`, `vmap` and `eval_shape`.
    """

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def tree_flatten(self):
        names = tuple(sorted(self.kwargs))
        return (self.args, tuple(self.kwargs[n] for n in names)), names

    @classmethod
    def tree_unflatten(cls, names, children):
        args, values = children
        return cls(*args, **dict(zip(names, values, strict=True)))

    def __repr__(self) -> str:
        shapes = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), (self.args, self.kwargs))
        return f"Inputs(args={shapes[0]}, kwargs={shapes[1]})"


def check_arrays(inputs, what: str = "sample_input") -> None:
    """Raises `TypeError` unless `inputs` is an array, a `jax.ShapeDtypeStruct`, or an
    `Inputs` (or other pytree) of them."""
    if isinstance(inputs, list | tuple):
        raise TypeError(
            f"{what} is a {type(inputs).__name__}; give an array (jnp.asarray(...)), or "
            "several inputs as superweights.Inputs(ids, attention_mask=mask)"
        )
    for leaf in jax.tree_util.tree_leaves(inputs):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(
                f"{what} holds a {type(leaf).__name__} ({leaf!r:.40}); give arrays "
                "(jnp.asarray(...)) or jax.ShapeDtypeStruct"
            )


def describe_shapes(inputs, batch: bool = False) -> str:
    """`[batch, 8, 8, 3]` or `Inputs([2, 7], attention_mask=[2, 7])`: the shapes of `inputs`."""

    def one(x) -> str:
        dims = [str(d) for d in np.shape(x)]
        if batch and dims:
            dims[0] = "batch"
        return "[" + ", ".join(dims) + "]"

    if isinstance(inputs, Inputs):
        parts = [one(x) for x in inputs.args]
        parts += [f"{k}={one(v)}" for k, v in sorted(inputs.kwargs.items())]
        return "Inputs(" + ", ".join(parts) + ")"
    leaves = jax.tree_util.tree_leaves(inputs)
    return one(leaves[0]) if len(leaves) == 1 else str([one(x) for x in leaves])


def check_inputs(member: Member, inputs) -> None:
    """Raises `ValueError` naming the member, the inputs it takes and those given, when
    `inputs` cannot be what `member` was made for (another rank, structure or shape it
    cannot run on), before anything inside the model fails."""
    check_arrays(inputs, "the inputs")
    if member.sample is None:
        return
    expected, given = member.sample, abstract(inputs)
    message = (
        f"member {member.name!r} takes inputs shaped like its sample_input, "
        f"{describe_shapes(expected, batch=True)}; apply was given {describe_shapes(given)}"
    )
    as_called = (call_args(expected), call_args(given))  # Inputs(x) and x are one call
    structures = {jax.tree_util.tree_structure(c) for c in as_called}
    if len(structures) > 1:
        raise ValueError(message)
    pairs = list(zip(*(jax.tree_util.tree_leaves(c) for c in as_called), strict=True))
    if any(len(e.shape) != len(g.shape) for e, g in pairs):
        raise ValueError(message)
    if all(e.shape[1:] == g.shape[1:] for e, g in pairs):
        return
    try:
        jax.eval_shape(
            lambda p, s, x: member(p, s, x, False)[0], member.params, member.state, given
        )
    except Exception as error:  # noqa: BLE001 - whatever the model raises, the shapes are named
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{message} ({reason})") from error


def call_args(inputs) -> tuple[tuple, dict]:
    """`(args, kwargs)` of the model call for `inputs` (an `Inputs` or one input)."""
    if isinstance(inputs, Inputs):
        return inputs.args, inputs.kwargs
    return (inputs,), {}


def abstract(inputs) -> Any:
    """`inputs` as `jax.ShapeDtypeStruct`s."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), inputs
    )


def concrete(inputs) -> Any:
    """`inputs` as arrays (zeros where given as `jax.ShapeDtypeStruct`s)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x,
        inputs,
    )


def logits_of(output) -> jax.Array:
    """The logits in a model's output: an array, `.logits`, `["logits"]` or the first of a tuple."""
    if isinstance(output, jax.Array | np.ndarray) or hasattr(output, "aval"):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output:
        return logits_of(output[0])
    raise TypeError(
        f"cannot find the logits in a model output of type {type(output).__name__}; return an "
        "array, an object with .logits, or write a superweights.Member whose apply_fn does"
    )


def train_mode(call: Callable, train_kwarg: TrainKwarg | str = "auto") -> tuple[str, bool] | None:
    """`(keyword, its value in training)` by which `call` is told the mode, or None.

    `"auto"` reads the signature for one of `TRAIN_KWARGS`; a name overrides it
    (its training value True, unless it is a known negative one such as
    `deterministic`); `(name, value)` states both; None means no keyword.
    """
    if train_kwarg is None:
        return None
    if isinstance(train_kwarg, tuple):
        name, value = train_kwarg
        return str(name), bool(value)
    if train_kwarg != "auto":
        return train_kwarg, TRAIN_KWARGS.get(train_kwarg, True)
    try:
        names = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return None
    return next(((n, v) for n, v in TRAIN_KWARGS.items() if n in names), None)


ZOO_DEFAULTS = {
    "attention_mask": lambda ids: jnp.ones_like(ids),
    "token_type_ids": lambda ids: jnp.zeros_like(ids),
    "position_ids": lambda ids: jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape),
    "head_mask": lambda ids: None,
}
"""Inputs a text model's own call fills in when not given (transformers' Flax models
do, their modules do not), each from the token ids `[batch, length]`."""


def with_zoo_defaults(call: Callable, args: tuple, kwargs: dict) -> dict:
    """`kwargs` plus a `ZOO_DEFAULTS` value for each required parameter of `call` that
    neither `args` nor `kwargs` gives."""
    try:
        parameters = list(inspect.signature(call).parameters.values())
    except (TypeError, ValueError):
        return kwargs
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    named = [p for p in parameters if p.kind in positional][len(args) :]
    missing = [
        p.name
        for p in named
        if p.default is inspect.Parameter.empty and p.name not in kwargs and p.name in ZOO_DEFAULTS
    ]
    ids = args[0] if args else kwargs.get("input_ids")
    if not missing or ids is None or not hasattr(ids, "shape"):
        return kwargs
    return {**kwargs, **{name: ZOO_DEFAULTS[name](ids) for name in missing}}


def channels_first_to_last(inputs):
    """NCHW pixel values (the first input, or `pixel_values=`) as the NHWC a module takes."""
    args, kwargs = call_args(inputs)
    if args:
        pixels, rest = args[0], args[1:]
    else:
        pixels, rest = kwargs.get("pixel_values"), ()
    if pixels is None or np.ndim(pixels) != 4:
        raise ValueError(
            "this model takes pixel values NCHW, [batch, channels, height, width], as its own "
            f"call does; got {describe_shapes(inputs)}"
        )
    pixels = jnp.transpose(pixels, (0, 2, 3, 1))
    if args:
        return Inputs(pixels, *rest, **kwargs) if (rest or kwargs) else pixels
    return Inputs(**{**kwargs, "pixel_values": pixels})


def _identity(inputs):
    return inputs


def mode_kwargs(mode: tuple[str, bool] | None, train: bool) -> dict:
    if mode is None:
        return {}
    name, value = mode
    return {name: value if train else not value}


def _shapes(tree_) -> tuple:
    return tuple((p, tuple(x.shape), str(x.dtype)) for p, x in tree.flatten(tree_).items())


def _fresh_keys(template: list[tuple[tuple[int, ...], Any]], rng) -> list:
    """New values for a module's RNG state: keys split from `rng`, counters at zero."""
    rng = jax.random.key(0) if rng is None else rng
    leaves = []
    for index, (shape, dtype) in enumerate(template):
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            keys = jax.random.split(jax.random.fold_in(rng, index), max(1, math.prod(shape)))
            leaves.append(keys.reshape(shape))
        else:
            leaves.append(jnp.zeros(shape, dtype))
    return leaves


def nnx_member(name: str, module, train_kwarg: TrainKwarg | str = "auto") -> Member:
    """Wraps a Flax NNX module called `module(*inputs, **train-mode keyword)`.

    Without a train-mode keyword, the mode is set as `nnx.view` sets it
    (`deterministic`, `use_running_average` of the submodules). The module's
    RNG streams (dropout) are drawn afresh from `rng` at every call.
    """
    from flax import nnx

    mode = train_mode(type(module).__call__, train_kwarg)
    if mode is None:
        views = {
            train: nnx.view(
                module,
                deterministic=not train,
                use_running_average=not train,
                raise_if_not_found=False,
            )
            for train in (False, True)
        }
    else:
        views = {False: module, True: module}
    graphdefs = {t: nnx.split(v, nnx.Param, nnx.RngState, ...)[0] for t, v in views.items()}
    _, params, rngs, rest = nnx.split(module, nnx.Param, nnx.RngState, ...)
    params_def, rngs_def, rest_def = (jax.tree_util.tree_structure(s) for s in (params, rngs, rest))
    rng_template = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(nnx.to_pure_dict(rngs))]

    def apply_fn(p, s, inputs, train, rng=None):
        as_state = jax.tree_util.tree_unflatten
        model = nnx.merge(
            graphdefs[bool(train)],
            as_state(params_def, jax.tree_util.tree_leaves(p)),
            as_state(rngs_def, _fresh_keys(rng_template, rng)),
            as_state(rest_def, jax.tree_util.tree_leaves(s)),
        )
        args, kwargs = call_args(inputs)
        out = model(*args, **kwargs, **mode_kwargs(mode, train))
        return logits_of(out), nnx.to_pure_dict(nnx.split(model, nnx.Param, nnx.RngState, ...)[3])

    pure_params, pure_rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    signature = ("nnx", graphdefs[False], graphdefs[True], _shapes(pure_params), _shapes(pure_rest))
    needs_rng = bool(rng_template)
    return Member(name, pure_params, pure_rest, apply_fn, signature, needs_rng)


_RNG_STREAM = re.compile(r'needs PRNG for "([^"]+)"')


def _rng_streams(apply_train: Callable, sample_input, limit: int = 8) -> tuple[str, ...]:
    """The RNG streams `apply_train(rngs, inputs)` (a Linen training call) asks for.

    Found by tracing it on `sample_input` (arrays or `jax.ShapeDtypeStruct`s).
    """
    from flax import errors

    streams: list[str] = []
    for _ in range(limit):
        try:
            keys = {s: jax.random.key(0) for s in streams} or None
            jax.make_jaxpr(lambda x, keys=keys: apply_train(keys, x))(sample_input)
            return tuple(streams)
        except errors.InvalidRngError as error:
            found = _RNG_STREAM.search(str(error))
            if not found or found.group(1) in streams:
                raise
            streams.append(found.group(1))
    raise ValueError(f"the model asks for more than {limit} RNG streams: {streams}")


def _check_variables(name: str, given: Mapping, expected: Mapping) -> None:
    given_shapes = {p: tuple(np.shape(x)) for p, x in tree.flatten(dict(given)).items()}
    for path, x in tree.flatten(dict(expected)).items():
        if path in given_shapes and given_shapes[path] != tuple(x.shape):
            raise ValueError(
                f"member {name!r}: the given {path} has shape {given_shapes[path]}, the module "
                f"builds {tuple(x.shape)} for this sample_input"
            )


def linen_member(
    name: str,
    module,
    sample_input,
    key: jax.Array,
    *,
    variables: Mapping | None = None,
    train_kwarg: TrainKwarg | str = "auto",
    adapt: Callable = _identity,
) -> Member:
    """Wraps a Flax Linen module called `module.apply(vars, *inputs, **train-mode keyword)`.

    In training every collection but `params` is mutable (batch statistics).
    `variables` (e.g. pretrained weights) are the initial values; collections
    they lack are initialised from `key`. `adapt` turns the inputs as given into
    the inputs the module takes (NCHW pixel values into NHWC, say); required
    inputs a text model's own call fills in get `ZOO_DEFAULTS`.
    """
    mode = train_mode(module.__call__, train_kwarg)

    def module_args(inputs) -> tuple[tuple, dict]:
        args, kwargs = call_args(adapt(inputs))
        return args, with_zoo_defaults(module.__call__, args, kwargs)

    args, kwargs = module_args(concrete(sample_input))
    init_rngs = dict(zip(("params", "dropout"), jax.random.split(key), strict=True))

    def init(rngs):
        return module.init(rngs, *args, **kwargs, **mode_kwargs(mode, False))

    shapes = jax.eval_shape(init, init_rngs)
    if variables is None:
        variables = init(init_rngs)
    else:
        _check_variables(name, variables, shapes)
        missing = [c for c in shapes if c not in variables]
        if missing:
            variables = {**{c: v for c, v in init(init_rngs).items() if c in missing}, **variables}
    variables = dict(variables)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def run(p, s, inputs, train, rngs):
        args, kwargs = module_args(inputs)
        call = dict(**kwargs, **mode_kwargs(mode, train), rngs=rngs)
        if train and s:
            out, new_state = module.apply({"params": p, **s}, *args, mutable=list(s), **call)
            return logits_of(out), dict(new_state)
        return logits_of(module.apply({"params": p, **s}, *args, **call)), s

    streams = _rng_streams(
        lambda rngs, x: run(params, state, x, True, rngs), abstract(sample_input)
    )

    def apply_fn(p, s, inputs, train, rng=None):
        rngs = None
        if train and streams:
            rng = jax.random.key(0) if rng is None else rng
            rngs = {stream: jax.random.fold_in(rng, i) for i, stream in enumerate(streams)}
        return run(p, s, inputs, train, rngs)

    signature = ("linen", module, _shapes(variables))
    return Member(name, params, state, apply_fn, signature, bool(streams))


def _wraps_linen(model) -> bool:
    from flax import linen

    return isinstance(getattr(model, "module", None), linen.Module) and hasattr(model, "params")


def takes_channels_first(model) -> bool:
    """An object with a Linen `.module` whose own call takes NCHW pixel values and hands its
    module NHWC ones, as transformers' Flax vision models (ViT, ResNet, ...) do."""
    return _wraps_linen(model) and getattr(model, "main_input_name", None) == "pixel_values"


def as_member(
    name: str, model, sample_input, key: jax.Array, train_kwarg: TrainKwarg | str = "auto"
) -> Member:
    """A Member from an NNX or Linen module, an object with `.module` and `.params`, or a
    Member (passed through as it is: its own `sample`, if any, checks `apply`'s inputs).
    The others keep `sample_input`'s shapes to check what `apply` is given."""
    member = _as_member(name, model, sample_input, key, train_kwarg)
    if sample_input is None or isinstance(model, Member):
        return member
    return dataclasses.replace(member, sample=abstract(sample_input))


def _as_member(name, model, sample_input, key, train_kwarg) -> Member:
    if isinstance(model, Member):
        return model
    from flax import linen, nnx

    if isinstance(model, nnx.Module):
        return nnx_member(name, model, train_kwarg)
    if sample_input is None and (isinstance(model, linen.Module) or _wraps_linen(model)):
        raise ValueError(f"member {name!r} is a Linen model: give sample_input to initialise it")
    if isinstance(model, linen.Module):
        return linen_member(name, model, sample_input, key, train_kwarg=train_kwarg)
    if _wraps_linen(model):
        given = model.params
        variables = given if "params" in given else {"params": given}
        return linen_member(
            name,
            model.module,
            sample_input,
            key,
            variables=variables,
            train_kwarg=train_kwarg,
            adapt=channels_first_to_last if takes_channels_first(model) else _identity,
        )
    raise TypeError(
        f"member {name!r} is a {type(model).__name__}; expected a flax.nnx.Module, a "
        "flax.linen.Module, an object with a Linen .module and its .params, or a "
        "superweights.Member (see the README, 'Bring your own model')"
    )


def make_members(
    models, sample_input, key: jax.Array, train_kwarg: TrainKwarg | str = "auto"
) -> list[Member]:
    """Members for one model or `{name: model}`."""
    if not isinstance(models, Mapping):
        models = {"model": models}
    if not models:
        raise ValueError("give at least one model")
    if sample_input is not None:
        check_arrays(sample_input)
    keys = jax.random.split(key, len(models))
    return [
        as_member(name, model, sample_input, k, train_kwarg)
        for (name, model), k in zip(models.items(), keys, strict=True)
    ]


def output_shape(member: Member, sample_input) -> tuple[int, ...]:
    """The shape of `member`'s logits for `sample_input`; a message naming it if it cannot run."""
    try:
        out = jax.eval_shape(
            lambda p, s, x: member(p, s, x, False)[0],
            member.params,
            member.state,
            abstract(sample_input),
        )
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"member {member.name!r} cannot run on sample_input {abstract(sample_input)}: {error}"
        ) from error
    return tuple(out.shape)


def check_outputs(members, sample_input) -> None:
    """Raises unless every member maps `sample_input` to logits with one class count."""
    classes = {m.name: output_shape(m, sample_input)[-1] for m in members}
    if len(set(classes.values())) > 1:
        raise ValueError(
            f"members predict different numbers of classes {classes}; one bank's members "
            "must share the task"
        )
