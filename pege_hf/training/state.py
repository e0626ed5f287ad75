"""What a run needs to stop and continue: the trainer state, resumable checkpoints, the output-dir lock.

A checkpoint is ``output_dir/checkpoints/step_N/``: ``accelerator.save_state`` (model, optimizer,
scheduler, RNG) plus ``trainer_state.json`` (``TrainerState``). It is written to ``.tmp_step_N`` and
renamed, so a folder named ``step_N`` with a trainer_state.json is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PEGEConfig, unused_fields

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".train.lock"
DIVERGED_FILE = "diverged.json"
_CKPT_RE = re.compile(r"^step_(\d+)$")
# what must match between a checkpoint and the run resuming it
SHAPE_KEYS = ("total_steps", "batches_per_epoch", "world_size", "batch_size", "gradient_accumulation_steps")
# run settings (run_info) a checkpoint does not pin: where the model and data were read from (a copy elsewhere
# resumes the same run; what they hold is checked through the shape keys and the model's state dict), and what
# only adds to the evaluations
UNPINNED_SETTINGS = ("base_model", "dataset", "eval_reestimate_bn")

logger = logging.getLogger(__name__)


def run_settings(info: dict) -> dict:
    """The settings a checkpoint records and a resuming run must repeat: ``info`` (the run's run_info) as JSON
    holds it, less UNPINNED_SETTINGS and the quantization-config fields the run never reads (PEGE's masks in an
    STE run: `pege train` refuses them, and they change nothing)."""
    settings = json.loads(json.dumps({k: v for k, v in info.items() if k not in UNPINNED_SETTINGS}, default=str))
    return _without_unused_fields(settings)


def _without_unused_fields(settings: dict) -> dict:
    qc = settings.get("quantization_config")
    if not isinstance(qc, dict) or "estimator" not in qc:
        return settings
    try:
        unused = unused_fields(qc, PEGEConfig.from_dict(qc))
    except (TypeError, ValueError):  # a config this version cannot build: compare all of it
        return settings
    return {**settings, "quantization_config": {k: v for k, v in qc.items() if k not in unused}}


def settings_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key=saved (this run: current)' for each setting that differs; nested dicts (the quantization config)
    key by key, as quantization_config.a_mask."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}={a!r} (this run: {b!r})")
    return out


@dataclass
class TrainerState:
    """Where a run is; saved as trainer_state.json in every checkpoint (the keys are the file's format)."""

    total_steps: int
    batches_per_epoch: int
    world_size: int
    batch_size: int
    gradient_accumulation_steps: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_accuracy: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    elapsed_s: float = 0.0
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, samples
    settings: dict | None = None  # run_settings of the run: a resuming run must repeat them

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load(self, checkpoint: Path) -> None:
        """Take over a checkpoint's state; ValueError when it was saved by a run of another shape or with other
        settings (``self.settings``, when both record them: a resumed run with another learning rate, bit width or
        mask would silently train a run no command describes)."""
        saved = json.loads((Path(checkpoint) / STATE_FILE).read_text())
        for key in SHAPE_KEYS:
            if saved.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume from {str(checkpoint)!r}: it was saved with {key}={saved.get(key)} but this run "
                    f"has {key}={getattr(self, key)}; resume with the same data, --epochs, --batch-size, "
                    "--gradient-accumulation-steps and number of processes")
        if self.settings is not None and saved.get("settings") is not None:
            differences = settings_differences(_without_unused_fields(saved["settings"]), self.settings)
            if differences:
                raise ValueError(f"cannot resume from {str(checkpoint)!r}: it was saved with "
                                 f"{', '.join(differences)}; resume with the checkpoint's settings, or start a new "
                                 "run in another --output-dir")
        elif self.settings is not None:
            logger.warning("%s records no run settings (an older checkpoint): this run's settings are not checked "
                           "against it", checkpoint)
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in saved.items():
            if key in known and key != "settings":
                setattr(self, key, value)

    @property
    def fresh(self) -> bool:
        return self.global_step == 0 and self.batch_in_epoch == 0


# --------------------------------------------------------------------------------------------- checkpoints


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints (those with a trainer_state.json), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int) -> Path:
    """accelerator.save_state into checkpoints/.tmp_step_N, the trainer state JSON, then an atomic
    rename to checkpoints/step_N; older complete checkpoints beyond ``keep`` are removed afterwards."""
    root = output_dir / CHECKPOINTS_DIR
    final = root / f"step_{state['global_step']}"
    tmp = root / f".tmp_step_{state['global_step']}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_synced(tmp / STATE_FILE, json.dumps(state, indent=2))
        if final.exists():  # an end-of-epoch checkpoint at the step of a step checkpoint: newer wins
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _remove_checkpoint(path: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete never leaves a half-deleted checkpoint that
    still looks complete."""
    trash = path.with_name(f".del_{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_checkpoint_parts(output_dir: Path) -> None:
    """Delete what a save or a delete cut off by a kill left behind."""
    for pattern in (".tmp_step_*", ".del_step_*"):
        for stale in (output_dir / CHECKPOINTS_DIR).glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------------------------- output dir


def resume_checkpoint(output_dir: Path, *, resume: bool, resume_from: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to continue from (or None); FileExistsError when ``output_dir`` holds a run that
    neither --resume nor --overwrite says what to do with."""
    if resume_from:
        path = Path(resume_from)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume-from {resume_from!r} is not a complete checkpoint "
                                    f"(no {STATE_FILE} in it)")
        return path
    existing = complete_checkpoints(output_dir)
    if resume:
        return existing[-1] if existing else None
    if (existing or (output_dir / "metrics.json").exists()) and not overwrite:
        raise FileExistsError(
            f"--output-dir {str(output_dir)!r} already holds a run (checkpoints or metrics.json); pass --resume "
            "to continue it, --overwrite to start over, or choose another --output-dir")
    return None


def clear_previous_run(output_dir: Path) -> None:
    """What --overwrite deletes: the earlier run's checkpoints, best model, logs and metrics."""
    for name in (CHECKPOINTS_DIR, "best", "logs"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in ("metrics.json", "metrics.jsonl", DIVERGED_FILE):
        (output_dir / name).unlink(missing_ok=True)


def lock_output_dir(output_dir: Path):
    """Hold an exclusive lock on ``output_dir`` while this process trains into it, so a second training
    into the same folder stops with a clear error instead of interleaving checkpoints. Returns the open
    lock file (the lock lives as long as it stays open), or None where the OS has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, no protection
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise RuntimeError(f"--output-dir {str(output_dir)!r} is being trained into by another process (pid {owner}); "
                           "wait for it to finish or choose another --output-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def output_dir_is_locked(output_dir: Path) -> bool:
    """Whether a live process holds ``output_dir``'s training lock (see lock_output_dir)."""
    try:
        import fcntl
    except ImportError:
        return False
    if not (output_dir / LOCK_FILE).is_file():
        return False
    with open(output_dir / LOCK_FILE, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
