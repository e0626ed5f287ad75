"""benchmarks/gpu_check.py: skips cleanly without CUDA, and its checks hold on the CPU here."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, subprocess_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script runs for real")
def test_without_cuda_it_skips_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0 and "no CUDA device here: skipped" in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize("estimator", ["ste", "pege"])
def test_its_training_and_reload_checks_hold_on_cpu(estimator):
    from benchmarks import gpu_check

    model = gpu_check.model_for(estimator, "cpu")
    losses = gpu_check.train_steps(model, "cpu", steps=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert gpu_check.reload_is_exact(model, "cpu")
