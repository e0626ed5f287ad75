"""`pege train --resume` is exact for QAT at every step, PEGE's ramp included: a run killed with SIGKILL
mid-ramp and resumed ends with the uninterrupted run's parameters, bit for bit."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, hooked_train_command, kill_when, subprocess_env, train_in_process
from pege_hf.data import DEFAULT_DATASET


@pytest.mark.slow
@pytest.mark.parametrize("estimator,masks", [("ste", []), ("pege", ["--a-mask", "bernoulli", "--w-mask", "bernoulli"]),
                                             ("pege", ["--a-mask", "progressive", "--w-mask", "progressive"])])
def test_qat_killed_mid_ramp_and_resumed_ends_with_the_uninterrupted_parameters(fp_run, tmp_path, estimator, masks):
    # 8 steps; r(t) ramps over the first 6, so the checkpoint at step 2 is mid-ramp
    args = ["--model", str(fp_run[0]), "--estimator", estimator, *masks, "--w-bits", "2", "--a-bits", "2",
            "--dataset", DEFAULT_DATASET, "--max-train", "256", "--max-test", "64", "--epochs", "1", "--batch-size",
            "32", "--checkpointing-steps", "2", "--no-tensorboard", "--scale-init", "lsq"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(hooked_train_command(*args, "--output-dir", str(killed)), cwd=ROOT,
                            env=subprocess_env(PEGE_TEST_STEP_SLEEP=1.0), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    kill_when(proc, (killed / "checkpoints" / "step_2" / "trainer_state.json").is_file)
    assert not (killed / "metrics.json").exists()
    resumed = train_in_process([*args, "--output-dir", str(killed), "--resume"])
    straight = train_in_process([*args, "--output-dir", str(tmp_path / "straight")])
    assert resumed["resumed_from"].endswith("step_2") and resumed["steps"] == straight["steps"] == 8
    saved = [load_file(str(d / "model.safetensors")) for d in (killed, tmp_path / "straight")]
    assert saved[0].keys() == saved[1].keys()
    assert [k for k in saved[0] if not torch.equal(saved[0][k], saved[1][k])] == []
