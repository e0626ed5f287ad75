"""Logging: a JSON-lines accelerate tracker (metrics.jsonl) that a resumed run rewinds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JSONLTracker(GeneralTracker):
    """An accelerate tracker writing one JSON line per log call into ``path`` (appending, so a resumed
    run keeps what the interrupted one logged)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict):
        self._write({"event": "config", "time": time.time(), "config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, "time": time.time(), **values})


def rewind_jsonl(path: Path, step: int | None) -> None:
    """Drop the records a cut-off run logged after ``step`` (the checkpoint it resumes from), so the
    resumed run's log reads as one run; records without a step (the config event) stay. ``step=None``
    (no checkpoint to resume from: the run starts over) drops them all."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [] if step is None else [
        line for line in lines if not line.strip() or (json.loads(line).get("step") or 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def flat_hparams(values: dict) -> dict:
    """Tracker-friendly hyperparameters: scalars and strings only."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in flat_hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = str(value)
    return out
