"""The work directory of one run: its files, its checkpoints, where it resumes.

    <output dir>/
      config.json             the settings; a rerun with other settings is refused
      metrics.jsonl, .csv     one row per finished epoch
      checkpoints/            the final training's (Orbax), holding plan and unsharing
      search_checkpoints/     the search phase's
      search.json, plan.json, report.txt, summary.json, *.png

Every file is written whole or not at all (a temporary file, then a rename),
and only by the primary host. A run without an output directory writes nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import jax

from experiments.checkpoint import Checkpoints

WHERE_AND_WHEN_SAVED = ("output_dir", "checkpoint_every", "checkpoint_steps", "keep_checkpoints")
"""Settings a resumed run may change: they do not change its results."""

PHASES = {"training": "checkpoints", "search": "search_checkpoints"}


class RunDirError(ValueError):
    """A run directory that cannot be used as it is; the message says what to do."""


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
    _checkpoints: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, output_dir: str | None, keep: int = 3) -> RunDir:
        path = None if output_dir is None else Path(output_dir).expanduser()
        run_dir = cls(path, keep, writes=path is not None and jax.process_index() == 0)
        if run_dir.writes:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise RunDirError(f"cannot create the output directory {path}: {error}") from error
        return run_dir

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
            changed = sorted(
                k for k in current.keys() | saved.keys() if saved.get(k) != current.get(k)
            )
            raise RunDirError(
                f"{self.path} holds checkpoints of a run with other settings "
                f"({', '.join(changed)}); use the same options to resume it, or another "
                "--output-dir"
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
