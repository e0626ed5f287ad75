"""`python -m pege_hf.train` with two test hooks, kept out of the library (run directly or under
``accelerate launch``):

PEGE_TEST_STEP_SLEEP=S       sleep S seconds after every optimizer step (so a test can kill a run mid-epoch)
PEGE_TEST_PARAM_HASH_DIR=D   every rank writes D/rank<R>.txt: sha256 over its final parameters and buffers
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pege_hf.cli import run_command  # noqa: E402
from pege_hf.training import loop, main, parse_args  # noqa: E402


def param_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def install_hooks() -> None:
    sleep = float(os.environ.get("PEGE_TEST_STEP_SLEEP", "0") or 0)
    hash_dir = os.environ.get("PEGE_TEST_PARAM_HASH_DIR")
    after_step, finalise = loop.after_optimizer_step, loop.finalise

    def slow_step(run, *args):
        after_step(run, *args)
        time.sleep(sleep)

    def hashing_finalise(run, *args):
        result = finalise(run, *args)
        Path(hash_dir).mkdir(parents=True, exist_ok=True)
        (Path(hash_dir) / f"rank{run.accelerator.process_index}.txt").write_text(param_hash(run.raw_model))
        return result

    if sleep:
        loop.after_optimizer_step = slow_step
    if hash_dir:
        loop.finalise = hashing_finalise


if __name__ == "__main__":
    install_hooks()
    sys.exit(run_command("train", main, parse_args))
