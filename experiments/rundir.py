"""The work directory of one run: its files, its checkpoints, where it resumes.

    <output dir>/
      .npas-run               the marker: this directory holds an npas run
      .npas-lock              locked by the running process (its pid inside)
      config.json             the settings; a rerun with other settings is refused
      metrics.jsonl, .csv     one row per finished epoch
      checkpoints/            the final training's (Orbax), holding plan and unsharing
      search_checkpoints/     the search phase's
      search.json, plan.json, report.txt, summary.json, *.png

Every file is written whole or not at all (a temporary file, then a rename),
and only by the primary host. A run without an output directory writes nothing.

A run writes only into a new or empty directory, or one its marker says holds
an npas run (`ownership_problem`), and holds an exclusive lock on it for its
whole life (`RunLock`: `flock`, released on any exit, by the kernel when the
process dies), so that two runs never write one directory.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Any

import jax

from experiments.checkpoint import Checkpoints

WHERE_AND_WHEN_SAVED = ("output_dir", "checkpoint_every", "checkpoint_steps", "keep_checkpoints")
"""Settings a resumed run may change: they do not change its results."""

PHASES = {"training": "checkpoints", "search": "search_checkpoints"}

MARKER = ".npas-run"
"""The file that says a directory holds an npas run; its content is `MARKER_TEXT`."""

MARKER_TEXT = json.dumps({"format": "npas-run", "version": 1}) + "\n"

LOCK = ".npas-lock"
"""The file a running process holds locked (`flock`), its pid inside."""

OWN_FILES = (LOCK, MARKER + ".partial")
"""What a run may have left in a directory before its marker: still an empty one."""

OPTION_NAMES = {
    "fill": "--no-fill",
    "augmentation": "--augment",
    "loop.epochs": "--epochs",
    "loop.batch_size": "--batch-size",
    "loop.eval_every": "--eval-every",
    "loop.seed": "--seed",
    "loop.augmentation": "--augment",
    "optim.learning_rate": "--lr",
    "optim.weight_decay": "--weight-decay",
    "search.search": "--no-search",
    "search.search_epochs": "--search-epochs",
    "search.gradient_batches": "--gradient-batches",
    "search.similarity": "--similarity",
    "search.tau": "--tau",
    "search.warm_start": "--warm-start",
    "search.unshare_epoch": "--unshare-epoch",
}
"""Command-line options of the settings whose option is not `--` and their name."""


class RunDirError(ValueError):
    """A run directory that cannot be used as it is; the message says what to do."""


def is_marked(path: Path) -> bool:
    """`path` holds the marker of an npas run (by its content, not only its name)."""
    try:
        return (path / MARKER).read_text() == MARKER_TEXT
    except (OSError, UnicodeDecodeError):
        return False


def ownership_problem(path: Path) -> str | None:
    """Why a run may not write into `path`, or None: it is new, empty, or holds an npas run."""
    if not path.is_dir() or is_marked(path):
        return None
    found = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES)
    if not found:
        return None
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return (
        f"{path} is not empty and holds no npas run ({shown}); npas writes only into a new or "
        "empty directory or one of its own runs: give another --output-dir"
    )


def lock_holder(path: Path) -> int | None:
    """The pid of the process that holds `path`'s run lock, or None if none holds it."""
    try:
        with (path / LOCK).open("rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _pid_in(path / LOCK) or -1
            fcntl.flock(file, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


def _pid_in(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def in_use_message(path: Path, pid: int) -> str:
    holder = f"process {pid}" if pid > 0 else "another process"
    return (
        f"{path} is in use by another npas run ({holder}); wait for it to end or stop it, "
        "or give another --output-dir"
    )


@dataclasses.dataclass
class RunLock:
    """An exclusive `flock` on `<run dir>/.npas-lock`, its holder's pid inside.

    The kernel releases it when the process ends however it ends, so a lock file
    left by a dead process is stale and simply taken (`stale` then holds its pid).
    """

    path: Path
    file: Any = None
    stale: int | None = None

    @classmethod
    def acquire(cls, directory: Path) -> RunLock:
        """Locks `directory` for this process; `RunDirError` names the holder if another has it."""
        path = directory / LOCK
        file = path.open("a+b")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            file.close()
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunDirError(f"cannot lock {path}: {error.strerror}") from error
            raise RunDirError(in_use_message(directory, _pid_in(path) or -1)) from None
        stale = _pid_in(path)
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n".encode())
        file.flush()
        return cls(path, file, stale if stale != os.getpid() else None)

    def release(self) -> None:
        """Empties the pid and unlocks (the file stays: removing it would race a new holder)."""
        if self.file is None:
            return
        with contextlib.suppress(OSError):
            self.file.truncate(0)
            self.file.flush()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


def option_name(dotted: str) -> str:
    """The command-line option of a setting (`optim.learning_rate` -> `--lr`); a setting
    with no option keeps its dotted name."""
    if dotted in OPTION_NAMES:
        return OPTION_NAMES[dotted]
    return dotted if "." in dotted else "--" + dotted.replace("_", "-")


def flat_settings(data: dict, prefix: str = "") -> dict:
    """Nested settings as `{dotted name: value}`; the augmentation stays one value."""
    flat = {}
    for key, value in data.items():
        name = prefix + key
        if isinstance(value, dict) and key != "augmentation":
            flat.update(flat_settings(value, name + "."))
        else:
            flat[name] = value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """`--lr was 0.1, now 0.05` for every setting that differs, by command-line option."""
    old, new = flat_settings(saved), flat_settings(current)
    changes = {}
    for name in sorted(old.keys() | new.keys()):
        if old.get(name) != new.get(name):
            changes.setdefault(
                option_name(name), f"was {_short(old.get(name))}, now {_short(new.get(name))}"
            )
    return [f"{option} {change}" for option, change in changes.items()]


def _short(value, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` so that a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def comparable(config) -> dict:
    """A config as JSON data, without the settings a resume may change."""
    data = json.loads(json.dumps(dataclasses.asdict(config)))
    for where in WHERE_AND_WHEN_SAVED:
        data.pop(where, None)
    return data


def with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` settings with those it predates filled in from `defaults`, nested too: a run
    saved before a setting existed ran with that setting's default."""
    merged = dict(defaults)
    for key, value in saved.items():
        default = defaults.get(key)
        both = isinstance(value, dict) and isinstance(default, dict)
        merged[key] = with_defaults(value, default) if both else value
    return merged


def metrics_csv(rows: list[dict]) -> str:
    """Per-epoch metrics as CSV, one column per metric seen in any epoch."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


@dataclasses.dataclass
class RunDir:
    """The files of one run in `path` (None: a run that keeps nothing).

    `writes`: this process writes the files (the primary host); every host
    opens the checkpoints, which Orbax writes together.
    """

    path: Path | None
    keep: int = 3
    writes: bool = True
    lock: RunLock | None = None
    _checkpoints: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, output_dir: str | None, keep: int = 3, log=print) -> RunDir:
        """The run directory, created, locked and marked as a run's (by the primary host).

        Raises `RunDirError` if it holds something else, or another run holds it.
        Use it as a context manager (or call `close`) to release the lock.
        """
        path = None if output_dir is None else Path(output_dir).expanduser()
        run_dir = cls(path, keep, writes=path is not None and jax.process_index() == 0)
        if run_dir.writes:
            try:
                path.mkdir(parents=True, exist_ok=True)
                run_dir.lock = RunLock.acquire(path)
            except OSError as error:
                raise RunDirError(f"cannot create the output directory {path}: {error}") from error
            try:
                run_dir._mark()
            except BaseException:
                run_dir.close()
                raise
            if run_dir.lock.stale:
                log(f"took over {path}'s lock from process {run_dir.lock.stale}, which has ended")
        return run_dir

    def _mark(self) -> None:
        """Writes the marker into a directory that has none, if it is still empty."""
        if is_marked(self.path):
            return
        problem = ownership_problem(self.path)
        if problem:
            raise RunDirError(problem)
        write_atomically(self.path / MARKER, MARKER_TEXT)

    def close(self) -> None:
        """Releases the directory's lock (the kernel does it too if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def file(self, name: str) -> Path | None:
        """Where this process writes `name`; None if it writes nothing."""
        return self.path / name if self.writes else None

    def checkpoints(self, phase: str = "training") -> Checkpoints | None:
        """The checkpoints of `phase` ("training" or "search"); None without a directory."""
        if self.path is None:
            return None
        if phase not in self._checkpoints:
            self._checkpoints[phase] = Checkpoints(self.path / PHASES[phase], keep=self.keep)
        return self._checkpoints[phase]

    def has_checkpoints(self) -> bool:
        return self.path is not None and any(
            (self.path / folder).is_dir() and any((self.path / folder).iterdir())
            for folder in PHASES.values()
        )

    def read_text(self, name: str) -> str | None:
        """The text of `name`, or None if there is none."""
        if self.path is None or not (self.path / name).exists():
            return None
        return (self.path / name).read_text()

    def read_json(self, name: str) -> Any:
        """`name` read as JSON (None if absent); a damaged file is named in the error."""
        text = self.read_text(name)
        if text is None:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise RunDirError(
                f"{self.path / name} is damaged ({error}); restore it, delete it to start "
                "over, or give another --output-dir"
            ) from error

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; a damaged line is named with its number."""
        rows = []
        for number, line in enumerate((self.read_text("metrics.jsonl") or "").splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RunDirError(
                    f"{self.path / 'metrics.jsonl'} is damaged at line {number} ({error}); "
                    "delete that line or the file (the checkpoints hold the run), or give "
                    "another --output-dir"
                ) from error
        return rows

    def check_same_config(self, config) -> None:
        """Refuses to resume, here, checkpoints of a run with other settings."""
        if not self.has_checkpoints():
            return
        saved = self.read_json("config.json")
        if saved is None:
            raise RunDirError(
                f"{self.path} holds checkpoints but no config.json to check them against; "
                "give another --output-dir, or delete its checkpoints to start over"
            )
        saved = {k: v for k, v in saved.items() if k not in WHERE_AND_WHEN_SAVED}
        saved = with_defaults(saved, comparable(type(config)()))
        current = comparable(config)
        if saved != current:
            raise RunDirError(
                f"{self.path} holds checkpoints of a run with other settings "
                f"({'; '.join(changed_settings(saved, current))}); use the same options to "
                "resume it, or another --output-dir"
            )

    def start(self, config, first_epoch: int) -> None:
        """Writes the settings and keeps the metrics of the epochs before `first_epoch`."""
        if not self.writes:
            return
        kept = [row for row in self.metrics() if row["epoch"] < first_epoch]
        write_atomically(
            self.path / "config.json", json.dumps(dataclasses.asdict(config), indent=1)
        )
        write_atomically(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def append_metrics(self, metrics: dict) -> None:
        if self.writes:
            with (self.path / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.writes:
            write_atomically(self.path / name, text)

    def finish(self, summary: dict) -> None:
        """The summary and the metrics as CSV, once the run is done."""
        if self.writes:
            self.write_text("summary.json", json.dumps(summary, indent=1))
            self.write_text("metrics.csv", metrics_csv(self.metrics()))
