"""Checkpoints with Orbax: train state, data position and plan, resumable exactly.

A checkpoint holds the `TrainState` (params, model state such as batch
statistics, optimizer state, step, RNG key) and, as JSON, where training
stands: the epoch, how many of its batches are done, the input pipeline's
iterator state after the last batch trained on, and the plan (which changes
when coefficients are unshared). Restoring it and setting the iterator to that
state continues the run exactly where it stopped, on the very next batch.

Faults are recoverable without hand work: an unreadable checkpoint is moved
aside as `<step>.corrupt` and the one before it used, and a failed write
removes what it left half-written and raises one `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training stands: in `epoch` (1-based), `batches_done` of its batches are done.

    `input_state` is the grain iterator's state after the last batch trained on
    (None: before the first); `losses` are the train losses of the batches done,
    for the epoch's mean; `metrics` those of the last finished epoch.
    """

    epoch: int
    batches_done: int
    input_state: dict | None
    losses: tuple[float, ...] = ()
    metrics: dict = dataclasses.field(default_factory=dict)


class Interrupted(Exception):
    """Training was stopped by a signal after saving a checkpoint."""


class CheckpointError(OSError):
    """A checkpoint could not be written; the earlier ones are left as they were."""


TEMPORARY_MARK = ".orbax-checkpoint-tmp"
"""What Orbax appends to a step directory's name while it writes it."""

CORRUPT_MARK = ".corrupt"
"""What an unreadable step directory's name gets when it is moved aside."""

LIBRARY_LOGGER = "absl"
"""The logger Orbax reports through (a failed write there comes with tracebacks)."""

WRITER_WAIT_S = 30.0
"""How long a failed save waits for Orbax's writer threads before cleaning up."""


def is_primary() -> bool:
    """This process is the one that moves and removes files (the others only read)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits for all processes, so that files moved by the primary are seen by all."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def short_reason(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    message = first_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def os_error_in(error: BaseException) -> OSError | None:
    """The first `OSError` in `error`'s chain of causes (Orbax may wrap it), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
"""How the array writer (TensorStore) quotes the operating system's error number."""


def write_failure_reason(error: BaseException) -> str:
    """Why a write failed, in the operating system's words where it has them."""
    os_error = os_error_in(error)
    if os_error is not None and os_error.strerror:
        return os_error.strerror
    quoted = OS_ERROR_CODE.search(str(error))
    if quoted:
        return os.strerror(int(quoted.group(1)))
    return short_reason(error)


@contextmanager
def process_stderr_captured() -> Iterator[list[str]]:
    """While active, the process's standard error (file descriptor 2, which C++
    libraries write too) goes to a temporary file; yields a list that holds its
    text once the block is left."""
    sys.stderr.flush()
    saved, text = os.dup(2), []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def intact_phrase(steps: Iterable[int]) -> str:
    steps = sorted(steps)
    if not steps:
        return "no earlier checkpoint is kept"
    if len(steps) == 1:
        return f"the checkpoint of step {steps[0]} is intact"
    return f"the checkpoints of steps {', '.join(map(str, steps))} are intact"


def aside_path(directory: Path, step: int) -> Path:
    """The first free name of `<step>.corrupt`, `<step>.corrupt-1`, ... in `directory`."""
    path = directory / f"{step}{CORRUPT_MARK}"
    count = 0
    while path.exists():
        count += 1
        path = directory / f"{step}{CORRUPT_MARK}-{count}"
    return path


def temporary_paths(directory: Path, step: int) -> list[Path]:
    """What Orbax left of an unfinished write of `step` in `directory`."""
    return sorted(directory.glob(f"{step}{TEMPORARY_MARK}*"))


@contextmanager
def library_logging_silenced() -> Iterator[None]:
    """Orbax's own log records are dropped while active (a failure is reported once, by us)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was_disabled


class FailedWriteTasks(logging.Filter):
    """Drops asyncio's later reports of the writer's tasks that failed in `directory`.

    After a failed write, the writer's unfinished tasks are reported again as
    "Task exception was never retrieved" when they are collected, often at exit,
    after the one-line error was given.
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = str(directory)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or self.directory not in str(error)


def join_library_threads(before: Iterable[threading.Thread], timeout_s: float) -> None:
    """Waits (up to `timeout_s` in all) for the Orbax threads started since `before`.

    After a failed write some of them are still writing into the temporary
    directory; removing it before they end would leave parts of it behind.
    """
    deadline = time.monotonic() + timeout_s
    earlier = set(before)
    for thread in threading.enumerate():
        started_by_orbax = type(thread).__module__.startswith("orbax.")
        if thread in earlier or not started_by_orbax or thread is threading.current_thread():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))


def _storable(state) -> Any:
    """Typed PRNG keys become their raw key data, which Orbax can write."""
    if isinstance(state.key, jax.ShapeDtypeStruct):
        return state._replace(key=jax.eval_shape(jax.random.key_data, state.key))
    return state._replace(key=jax.random.key_data(state.key))


class Checkpoints:
    """The checkpoints of one run, in `directory`, keeping the last `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def save(self, state, position: Position, extra: dict | None = None) -> int:
        """Writes `state` at its step with the position and `extra` JSON; returns the step.

        A checkpoint already at the step is replaced: a stop on an epoch's last
        batch saves there, and the resumed run saves the epoch's end there again.
        Raises `CheckpointError` if the write fails (disk full, say): what it
        left half-written is removed and the earlier checkpoints are untouched.
        """
        step = int(state.step)
        if step in self.manager.all_steps():
            self.manager.delete(step)
        meta = {**dataclasses.asdict(position), **(extra or {})}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)), meta=ocp.args.JsonSave(meta)
        )
        threads_before = threading.enumerate()
        with process_stderr_captured() as library_output:
            try:
                with library_logging_silenced():
                    self.manager.save(step, args=args, force=True)
                    self.manager.wait_until_finished()  # a failure in the background surfaces
                self._check_written(step)
            except (OSError, ValueError, RuntimeError) as error:
                # what the writer's threads printed while failing is dropped: one line says it
                raise self._failed_write(step, error, threads_before) from error
        sys.stderr.write("".join(library_output))  # a write that went well keeps its warnings
        return step

    def _check_written(self, step: int) -> None:
        """Raises if the step's directory did not land, whatever Orbax reported."""
        if is_primary() and not (self.directory / str(step)).is_dir():
            raise OSError(f"Orbax finished without writing {self.directory / str(step)}")

    def _failed_write(
        self, step: int, error: BaseException, threads_before: Iterable[threading.Thread]
    ) -> CheckpointError:
        """Cleans up after a failed write of `step` and says what happened."""
        asyncio_logger = logging.getLogger("asyncio")
        if not any(isinstance(f, FailedWriteTasks) for f in asyncio_logger.filters):
            asyncio_logger.addFilter(FailedWriteTasks(self.directory))
        with library_logging_silenced():
            join_library_threads(threads_before, WRITER_WAIT_S)
            if is_primary():
                for path in temporary_paths(self.directory, step):
                    shutil.rmtree(path, ignore_errors=True)
            sync_processes(f"checkpoint write of step {step} failed")
            with contextlib.suppress(Exception):  # it may re-raise the failure while closing
                self.manager.close()
        self.manager = self._open_manager()  # the old one keeps the failure and a stale step list
        return CheckpointError(
            f"could not write the checkpoint of step {step} in {self.directory}: "
            f"{write_failure_reason(error)}; {intact_phrase(self.steps())}"
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(
        self, abstract_state: Callable[[dict], Any], log: Callable[[str], None] = print
    ) -> tuple[Any, Position, dict] | None:
        """The newest readable checkpoint as `(state, position, meta)`, or None if none.

        `abstract_state(meta)` gives the state's structure (it may depend on the
        plan saved in `meta`). A checkpoint that cannot be read is reported in
        one line, moved aside as `<step>.corrupt` (kept for inspection, so that
        the step can be saved again) and the one before it tried.
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
                moved = self._move_aside(step)
                where = f"moved to {moved}" if moved else "left in place"
                log(
                    f"checkpoint at step {step} in {self.directory} is unreadable "
                    f"({short_reason(error)}); {where}; trying the one before"
                )
                continue
            state = restored._replace(key=jax.random.wrap_key_data(restored.key))
            position = Position(
                meta["epoch"],
                meta["batches_done"],
                meta["input_state"],
                tuple(meta["losses"]),
                meta.get("metrics", {}),
            )
            return state, position, meta
        return None

    def _move_aside(self, step: int) -> Path | None:
        """Renames `step`'s directory to a free `<step>.corrupt` name, which Orbax ignores.

        Only the primary process moves it (and returns the new path); every
        process then forgets the step, so that it can be saved again.
        """
        moved = None
        if is_primary():
            moved = aside_path(self.directory, step)
            (self.directory / str(step)).rename(moved)
        sync_processes(f"checkpoint of step {step} moved aside")
        self.manager.reload()
        return moved


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
