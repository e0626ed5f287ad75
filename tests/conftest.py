"""Shared fixtures and helpers: running `pege train` in this process or in a child, a small FP run."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "train_with_hooks.py"
if str(ROOT) not in sys.path:  # benchmarks/ (research code, not in the wheel) imports as a package from the checkout
    sys.path.insert(0, str(ROOT))


def subprocess_env(**extra) -> dict:
    """os.environ with this checkout first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_in_process(argv: list[str]) -> dict:
    """`pege train ARGV` in this process (exceptions propagate; the CLI's one-line errors are tested
    separately); returns metrics.json."""
    from pege_hf import cli
    from pege_hf.training import main

    assert main(cli.build_parser("train").parse_args(["train", *argv])) == 0
    out = Path(argv[argv.index("--output-dir") + 1])
    return json.loads((out / "metrics.json").read_text())


def lm_qat_steps(model, ids, steps: int = 2):
    """A few SGD steps of a quantized language model across PEGE's ramp; its eval logits afterwards."""
    import torch

    import pege_hf

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for step in range(steps):
        pege_hf.set_progress(model, step / steps)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def kill_when(proc, ready, timeout: float = 300) -> None:
    """SIGKILL the child ``proc`` as soon as ``ready()`` holds (failing if it dies or takes too long first)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never got there"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def hooked_train_command(*argv: str) -> list[str]:
    """A child `pege_hf.train` with the test hooks of tests/train_with_hooks.py (step sleep, parameter hash)."""
    return [sys.executable, str(HOOKS), *argv]


@pytest.fixture(scope="session")
def fp_run(tmp_path_factory):
    """A 1-epoch full-precision ResNet-20 on 300 images of the shipped sample: (output dir, metrics)."""
    from pege_hf.data import DEFAULT_DATASET

    out = tmp_path_factory.mktemp("fp") / "run"
    metrics = train_in_process(["--estimator", "none", "--dataset", DEFAULT_DATASET, "--max-train", "300",
                                "--max-test", "200", "--epochs", "1", "--batch-size", "64", "--no-tensorboard",
                                "--log-every", "1", "--output-dir", str(out)])
    return out, metrics
