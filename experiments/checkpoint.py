"""Checkpoints with Orbax: train state, data position and plan, resumable exactly.

A checkpoint holds the `TrainState` (params, model state such as batch
statistics, optimizer state, step, RNG key) and, as JSON, where training
stands: the epoch, how many of its batches are done, the data order's RNG
state at the epoch's start, and the plan (which changes when coefficients are
unshared). Restoring it and replaying the epoch's order from that RNG state
continues the run exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: in `epoch` (1-based), `batches_done` of its batches are done.

    `order_state` is the data-order generator's state at the start of `epoch`;
    `losses` are the train losses of the batches done, for the epoch's mean;
    `metrics` those of the last finished epoch.
    """

    epoch: int
    batches_done: int
    order_state: dict
    losses: tuple[float, ...] = ()
    metrics: dict = dataclasses.field(default_factory=dict)


class Interrupted(Exception):
    """Training was stopped by a signal after saving a checkpoint."""


def _storable(state) -> Any:
    """Typed PRNG keys become their raw key data, which Orbax can write."""
    if isinstance(state.key, jax.ShapeDtypeStruct):
        return state._replace(key=jax.eval_shape(jax.random.key_data, state.key))
    return state._replace(key=jax.random.key_data(state.key))


class Checkpoints:
    """The checkpoints of one run, in `directory`, keeping the last `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state, position: Position, extra: dict | None = None) -> int:
        """Writes `state` at its step with the position and `extra` JSON; returns the step."""
        step = int(state.step)
        meta = {**dataclasses.asdict(position), **(extra or {})}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_storable(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        return step

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(
        self, abstract_state: Callable[[dict], Any], log: Callable[[str], None] = print
    ) -> tuple[Any, Position, dict] | None:
        """The newest readable checkpoint as `(state, position, meta)`, or None if none.

        `abstract_state(meta)` gives the state's structure (it may depend on the
        plan saved in `meta`). A checkpoint that cannot be read is reported and
        the one before it tried.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                target = _storable(abstract_state(meta))
                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )["state"]
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back
                log(
                    f"checkpoint at step {step} in {self.directory} is unreadable ({error}); "
                    "trying the one before"
                )
                continue
            state = restored._replace(key=jax.random.wrap_key_data(restored.key))
            position = Position(
                meta["epoch"],
                meta["batches_done"],
                meta["order_state"],
                tuple(meta["losses"]),
                meta.get("metrics", {}),
            )
            return state, position, meta
        return None


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While active, SIGTERM and SIGINT ask training to stop instead of killing it.

    Yields `requested()`, true once a signal came; the previous handlers come back after.
    """
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        del frame
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(received)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def order_generator(seed: int, position: Position | None) -> np.random.Generator:
    """The data-order generator, at `position`'s epoch start when resuming."""
    generator = np.random.default_rng(seed)
    if position is not None:
        generator.bit_generator.state = position.order_state
    return generator
