"""Flat views of nested params dicts, keyed by dotted path strings."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def path_string(key_path: tuple) -> str:
    """`(DictKey('stage_0'), DictKey(0), DictKey('kernel'))` -> `'stage_0.0.kernel'`."""
    return ".".join(_key_name(k) for k in key_path)


def flatten(tree: Any) -> dict[str, Any]:
    """Nested params -> `{dotted path: leaf}` in the tree's own (deterministic) order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_string(path): leaf for path, leaf in leaves}


def unflatten_like(structure: Any, flat: Mapping[str, Any]) -> Any:
    """Rebuilds `structure`'s nesting (int keys included) from `{dotted path: leaf}`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(structure)
    paths = [path_string(path) for path, _ in leaves]
    missing = [p for p in paths if p not in flat]
    if missing:
        raise KeyError(f"no value for params {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])


def map_flat(fn: Callable[[str, Any], Any], tree: Any) -> dict[str, Any]:
    """`{path: fn(path, leaf)}` over a nested tree."""
    return {path: fn(path, leaf) for path, leaf in flatten(tree).items()}
