"""Tests for pege_hf.train / pege_hf.evaluate: the Accelerate training loop, its CLI and `pege eval`.

Runs are tiny (a few hundred images of the shipped CIFAR-10 sample, one or two epochs); the
data-parallel and kill/resume tests start real subprocesses.
"""

from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, free_port, hooked_train_command, kill_when, subprocess_env, train_in_process
from pege_hf import cli
from pege_hf.config import PEGEConfig
from pege_hf.data import DEFAULT_DATASET, normalize
from pege_hf.evaluate import evaluate_checkpoint
from pege_hf.training import args as train_args
from pege_hf.training import evaluation, loop, optim
from pege_hf.training import state as train_state
from pege_hf.training.model import is_quantized

SMALL = ["--dataset", DEFAULT_DATASET, "--max-train", "300", "--max-test", "200", "--epochs", "1",
         "--batch-size", "64", "--no-tensorboard", "--log-every", "1"]
METRICS_KEYS = {"accuracy", "top5", "loss", "history", "wall_time_s", "steps", "quantization_config", "base_model",
                "command", "dataset", "seed", "world_size", "best_accuracy", "best_epoch"}


_train = train_in_process


def _load(path):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------- runs


def test_fp_run_writes_metrics_model_and_logs(fp_run, capsys):
    out, metrics = fp_run
    assert METRICS_KEYS <= set(metrics)
    assert metrics["quantization_config"] is None and metrics["base_model"] is None
    assert metrics["steps"] == math.ceil(300 / 64) == metrics["total_steps"]
    assert metrics["world_size"] == 1 and metrics["seed"] == 0 and metrics["dataset"] == DEFAULT_DATASET
    assert isinstance(metrics["command"], list) and metrics["command"] == sys.argv
    assert len(metrics["history"]) == 1 and metrics["history"][0]["accuracy"] == metrics["accuracy"]
    assert 0.0 <= metrics["accuracy"] <= metrics["top5"] <= 1.0
    assert metrics["num_test"] == 200 and metrics["num_train"] == 300

    model = _load(out)
    assert not is_quantized(model) and model.config.num_labels == 10
    assert (out / "best" / "config.json").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "config"
    steps = [rec["step"] for rec in lines if "train/loss" in rec]
    assert steps == list(range(1, metrics["steps"] + 1))  # --log-every 1
    assert any("eval/accuracy" in rec for rec in lines)

    capsys.readouterr()
    assert cli.main(["eval", str(out), "--dataset", DEFAULT_DATASET, "--max-test", "200"]) == 0
    text = capsys.readouterr().out
    assert "full precision" in text and f"{100 * metrics['accuracy']:.2f}%" in text


def test_qat_pege_w2a2_from_fp_checkpoint_and_eval_agrees(fp_run, tmp_path, capsys, monkeypatch):
    fp_dir, _ = fp_run
    out = tmp_path / "qat"
    metrics = _train(["--model", str(fp_dir), "--estimator", "pege", "--w-bits", "2", "--a-bits", "2",
                      *SMALL, "--epochs", "2", "--output-dir", str(out)])
    qc = metrics["quantization_config"]
    assert qc["w_bits"] == 2 and qc["a_bits"] == 2 and qc["estimator"] == "pege" and qc["quant_method"] == "pege"
    assert metrics["base_model"] == str(fp_dir)

    # progress drives the curriculum: r(t) rises step by step from (near) 0
    ratios = [rec["quant/replacement_ratio"] for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "quant/replacement_ratio" in rec]
    assert len(ratios) == metrics["steps"] and ratios == sorted(ratios) and ratios[0] < ratios[-1]

    # per epoch: where the latent weights sit on their grid, and (from the second epoch) how many codes moved
    epochs = [rec for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in rec]
    assert len(epochs) == len(metrics["history"]) >= 2
    assert all(0 <= rec["quant/weight_grid_distance"] <= 0.5 for rec in epochs)
    assert "quant/weight_codes_changed" not in epochs[0]
    assert all(0 < rec["quant/weight_codes_changed"] < 1 for rec in epochs[1:])

    model = _load(out)
    assert is_quantized(model)

    capsys.readouterr()
    assert cli.main(["eval", str(out), "--dataset", DEFAULT_DATASET, "--max-test", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["quantized"] and result["samples"] == 200
    assert result["accuracy"] == metrics["accuracy"] and result["top5"] == metrics["top5"]
    assert result["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    assert result["bn_reestimation"] is None

    # BatchNorm re-estimation before evaluating: reported, the same twice (seeded), the checkpoint untouched
    weights = (out / "model.safetensors").read_bytes()
    runs = [evaluate_checkpoint(str(out), DEFAULT_DATASET, max_test=200, reestimate_bn=2) for _ in range(2)]
    assert runs[0]["bn_reestimation"] == {"batches": 2, "batch_size": 128, "images": 256, "seed": 0}
    assert runs[0]["accuracy"] == runs[1]["accuracy"] and runs[0]["loss"] == runs[1]["loss"]
    assert runs[0]["loss"] != pytest.approx(metrics["loss"], rel=1e-6)  # other statistics, another model
    assert (out / "model.safetensors").read_bytes() == weights
    assert cli.main(["eval", str(out), "--dataset", DEFAULT_DATASET, "--max-test", "200", "--reestimate-bn", "2"]) == 0
    assert "re-estimated on 256 augmented training images, 2 batches of 128" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--reestimate-bn \(BatchNorm re-estimation batches\) must be >= 0; got -1"):
        evaluate_checkpoint(str(out), DEFAULT_DATASET, reestimate_bn=-1)
    assert cli.main(["eval", str(out), "--split", "train", "--test-split", "test"]) == 2  # --test-split unused
    assert "--test-split 'test': not used with --split train" in capsys.readouterr().err
    # a model without BatchNorm has nothing to re-estimate: an error, not a silent no-op
    monkeypatch.setattr(evaluation, "load_model", lambda source: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="--reestimate-bn 2: the model has no BatchNorm layers"):
        evaluate_checkpoint(str(out), DEFAULT_DATASET, reestimate_bn=2)


def test_reestimate_bn_after_training_is_what_is_saved_and_reported(fp_run, tmp_path):
    """--reestimate-bn N: the final metrics are the re-estimated model's (the last epoch's stay in the history as
    accuracy_before), and the saved checkpoint is that model: `pege eval` of it gives the same numbers."""
    fp_dir, _ = fp_run
    out = tmp_path / "qat-bn"
    metrics = _train(["--model", str(fp_dir), "--estimator", "ste", "--w-bits", "2", "--a-bits", "2", *SMALL,
                      "--reestimate-bn", "3", "--output-dir", str(out)])
    assert metrics["bn_reestimation"] == {"batches": 3, "batch_size": 64, "seed": 0,
                                          "accuracy_before": metrics["history"][-1]["accuracy"]}
    assert metrics["loss"] != pytest.approx(metrics["history"][-1]["loss"], rel=1e-6)
    again = evaluate_checkpoint(str(out), DEFAULT_DATASET, max_test=200)
    assert again["accuracy"] == metrics["accuracy"] and again["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="--reestimate-bn must be >= 0; got -2"):
        _train(["--estimator", "none", *SMALL, "--reestimate-bn", "-2", "--output-dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_channels_last_flag_trains_channels_last_and_saves_ordinary_checkpoints(fp_run, tmp_path):
    """--channels-last reaches the optimizer (its saved momenta are channels-last) and changes nothing but
    the layout: the first step's loss is the contiguous run's (same seed), and the saved model loads as usual.
    That loss and gradients agree to rounding is tested on the model (test_quant_core)."""
    fp_dir, fp_metrics = fp_run
    out = tmp_path / "run"
    metrics = _train(["--estimator", "none", *SMALL, "--checkpointing-steps", "epoch", "--channels-last",
                      "--output-dir", str(out)])
    first_loss = lambda d: next(r["train/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text()  # noqa: E731
                                                                .splitlines()) if "train/loss" in r)
    assert first_loss(out) == pytest.approx(first_loss(fp_dir), rel=1e-5)
    assert metrics["steps"] == fp_metrics["steps"]
    (checkpoint,) = train_state.complete_checkpoints(out)
    state = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    momenta = [v["momentum_buffer"] for v in state.values() if v["momentum_buffer"].dim() == 4]
    assert len(momenta) == 19  # every conv of ResNet-20
    assert all(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous() for m in momenta)
    model = _load(out)
    assert not is_quantized(model) and all(p.is_contiguous() for p in model.parameters())


def test_param_groups_no_decay_on_bn_bias_and_quantizers(fp_run):
    import pege_hf

    model = _load(fp_run[0])
    pege_hf.quantize(model, pege_hf.PEGEConfig(w_bits=2, a_bits=2))
    groups = {g["name"]: g for g in optim.param_groups(model, lr=0.1, weight_decay=5e-4, quantizer_lr=0.01)}
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups["weights"]["weight_decay"] == 5e-4
    assert all(p.ndim > 1 and "quantizer" not in names[id(p)] for p in groups["weights"]["params"])
    assert groups["bn_bias"]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups["bn_bias"]["params"])
    assert groups["quantizer"]["weight_decay"] == 0.0 and groups["quantizer"]["lr"] == 0.01
    assert all("quantizer" in names[id(p)] for p in groups["quantizer"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_lr_schedule_warmup_then_cosine():
    fn = optim.lr_lambda("cosine", warmup=4, total=20)
    assert [fn(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == 1.0 and fn(12) == pytest.approx(0.5) and fn(20) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------- resume


def test_resume_after_sigkill_reaches_the_same_end(tmp_path):
    # 2 epochs x 6 batches; a checkpoint every 2 optimizer steps
    args = ["--estimator", "none", "--dataset", DEFAULT_DATASET, "--max-train", "192", "--max-test", "100",
            "--epochs", "2", "--batch-size", "32", "--checkpointing-steps", "2", "--log-every", "1",
            "--no-tensorboard"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(hooked_train_command(*args, "--output-dir", str(killed)), cwd=ROOT,
                            env=subprocess_env(PEGE_TEST_STEP_SLEEP=0.5), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    first = killed / "checkpoints" / "step_2" / train_state.STATE_FILE
    jsonl = killed / "metrics.jsonl"
    logged_step_3 = lambda: jsonl.is_file() and '"step": 3,' in jsonl.read_text()  # noqa: E731
    kill_when(proc, lambda: first.is_file() and logged_step_3(), timeout=120)  # after logging a step its checkpoint lacks
    state = json.loads(first.read_text())
    assert state["global_step"] == 2 and state["epoch"] == 0 and state["batch_in_epoch"] == 2  # mid-epoch
    assert not (killed / "metrics.json").exists()
    logged_before = (killed / "metrics.jsonl").read_text().splitlines()
    assert logged_before

    resumed = _train([*args, "--output-dir", str(killed), "--resume"])
    straight = _train([*args, "--output-dir", str(tmp_path / "straight")])

    assert resumed["steps"] == straight["steps"] == 2 * 6
    assert resumed["resumed_from"].endswith("step_2")
    assert resumed["accuracy"] == straight["accuracy"] and len(resumed["history"]) == 2
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in straight["history"]])
    from safetensors.torch import load_file

    saved = [load_file(str(d / "model.safetensors")) for d in (killed, tmp_path / "straight")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])

    # the log keeps what the killed run logged up to its checkpoint and reads as one run: the same
    # steps as the uninterrupted run, none twice
    logged_after = (killed / "metrics.jsonl").read_text().splitlines()
    up_to_checkpoint = [line for line in logged_before if (json.loads(line).get("step") or 0) <= 2]
    assert logged_after[: len(up_to_checkpoint)] == up_to_checkpoint
    loss_steps = lambda path: [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]  # noqa: E731
    assert loss_steps(killed / "metrics.jsonl") == loss_steps(tmp_path / "straight" / "metrics.jsonl")
    # the newest checkpoints are complete and load
    kept = train_state.complete_checkpoints(killed)
    assert [p.name for p in kept] == ["step_10", "step_12"]  # every 2 steps, the last 2 kept
    assert not list((killed / "checkpoints").glob(".tmp_*"))
    from safetensors.torch import load_file

    from pege_hf.hf.cifar import cifar_resnet

    cifar_resnet(20).load_state_dict(load_file(str(kept[-1] / "model.safetensors")), strict=True)
    assert json.loads((kept[-1] / train_state.STATE_FILE).read_text())["global_step"] == 12

    # a fresh run into a directory holding checkpoints must be asked for explicitly
    with pytest.raises(FileExistsError, match="--resume"):
        _train([*args, "--output-dir", str(killed)])


def test_resume_without_a_checkpoint_starts_its_log_over(tmp_path):
    # a run killed before its first checkpoint left a log; --resume finds nothing to load, so it
    # trains from step 0 and its log must not keep the dead run's records
    out = tmp_path / "run"
    out.mkdir()
    stale = [{"event": "config", "time": 0.0, "config": {"lr": 99.0}}, {"step": 1, "time": 0.0, "train/loss": 99.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    metrics = _train(["--estimator", "none", *SMALL, "--output-dir", str(out), "--resume"])
    assert metrics["resumed_from"] is None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("train/loss") == 99.0 or r.get("config", {}).get("lr") == 99.0 for r in records)
    loss_steps = [r["step"] for r in records if "train/loss" in r]
    assert loss_steps == list(range(1, metrics["steps"] + 1))


def test_resume_refuses_a_checkpoint_saved_with_other_settings(fp_run, tmp_path, caplog):
    """A resumed run must repeat the checkpoint's settings: another learning rate or mask policy is refused, naming
    each, before any weight is loaded, and the checkpoint stays; the data read from another path resumes; an older
    checkpoint without recorded settings resumes with a warning."""
    out = tmp_path / "run"
    args = ["--model", str(fp_run[0]), "--estimator", "pege", "--w-bits", "2", "--a-bits", "2", *SMALL,
            "--scale-init", "lsq", "--checkpointing-steps", "2", "--output-dir", str(out)]
    _train(args)
    newest = train_state.complete_checkpoints(out)[-1]
    saved = json.loads((newest / train_state.STATE_FILE).read_text())
    assert saved["settings"]["lr"] == 0.01 and saved["settings"]["quantization_config"]["a_mask"] == "auto"
    assert "dataset" not in saved["settings"]  # a path: a copy of the data elsewhere resumes the same run

    before = {p.name: p.read_bytes() for p in newest.iterdir()}
    with pytest.raises(ValueError, match=r"lr=0\.01 \(this run: 0\.02\).*quantization_config\.a_mask='auto' "
                                         r"\(this run: 'bernoulli'\)"):
        _train([*args, "--resume", "--lr", "0.02", "--a-mask", "bernoulli"])
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == before

    copy = tmp_path / "data"
    copy.mkdir()
    for f in Path(DEFAULT_DATASET).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    moved = [a if a != DEFAULT_DATASET else str(copy) for a in args]
    assert _train([*moved, "--resume"])["resumed_from"] == str(newest)

    del saved["settings"]  # as a checkpoint of an earlier version wrote it
    (newest / train_state.STATE_FILE).write_text(json.dumps(saved))
    with caplog.at_level("WARNING"):
        assert _train([*args, "--resume", "--lr", "0.02"])["resumed_from"] == str(newest)
    assert "records no run settings" in caplog.text


def test_resume_settings_ignore_what_the_estimator_never_reads(tmp_path):
    """A checkpoint's recorded quantization settings are compared on the fields the run reads: an STE run's
    activation-mask policy changes nothing and does not block a resume; its bit width does."""
    shape = dict(total_steps=10, batches_per_epoch=5, world_size=1, batch_size=8, gradient_accumulation_steps=1)
    ste = PEGEConfig(estimator="ste", w_bits=2).to_dict()
    current = train_state.run_settings({"quantization_config": {**ste, "a_mask": "auto"}, "lr": 0.01})
    assert "a_mask" not in current["quantization_config"] and current["quantization_config"]["w_bits"] == 2
    checkpoint = tmp_path / "step_4"
    checkpoint.mkdir()
    for recorded, refused in (({**ste, "a_mask": "bernoulli"}, None), ({**ste, "w_bits": 3}, "quantization_config.w_bits=3")):
        saved = {**shape, "global_step": 4, "settings": {"quantization_config": recorded, "lr": 0.01}}
        (checkpoint / train_state.STATE_FILE).write_text(json.dumps(saved))
        state = train_state.TrainerState(**shape, settings=current)
        if refused is None:
            state.load(checkpoint)
            assert state.global_step == 4 and state.settings == current
        else:
            with pytest.raises(ValueError, match=re.escape(refused)):
                state.load(checkpoint)


def test_eval_reestimate_bn_reports_the_reestimated_accuracy_and_leaves_training_alone(fp_run, tmp_path, capsys):
    """--eval-reestimate-bn N logs every epoch's test accuracy with BatchNorm statistics re-estimated on N batches
    and puts the statistics back: the run ends with the parameters and statistics of the same run without it; its
    last epoch's value is the final accuracy of --reestimate-bn N (the same batches). A model without BatchNorm
    is refused before training."""
    from safetensors.torch import load_file

    args = ["--model", str(fp_run[0]), "--estimator", "pege", "--w-bits", "2", "--a-bits", "2", *SMALL,
            "--scale-init", "lsq"]
    hint = "--eval-reestimate-bn 50 also reports it"  # what a PEGE run without the flag is told at its start
    probed = _train([*args, "--eval-reestimate-bn", "3", "--output-dir", str(tmp_path / "probed")])
    assert hint not in capsys.readouterr().out
    plain = _train([*args, "--output-dir", str(tmp_path / "plain")])
    assert hint in capsys.readouterr().out
    final = _train([*args, "--reestimate-bn", "3", "--output-dir", str(tmp_path / "final")])
    saved = [load_file(str(tmp_path / d / "model.safetensors")) for d in ("probed", "plain")]
    assert [k for k in saved[0] if not torch.equal(saved[0][k], saved[1][k])] == []
    assert probed["history"][0]["accuracy"] == plain["history"][0]["accuracy"]
    assert probed["history"][0]["accuracy_bn_reestimated"] == final["accuracy"]
    assert final["accuracy"] != final["bn_reestimation"]["accuracy_before"]  # the statistics did change
    logged = [json.loads(line) for line in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval/accuracy_bn_reestimated"] for r in logged if "eval/accuracy" in r] == [final["accuracy"]]

    from types import SimpleNamespace

    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    run = loop.Run(SimpleNamespace(reestimate_bn=0, eval_reestimate_bn=3), None, tmp_path, None)
    with pytest.raises(ValueError, match="--eval-reestimate-bn 3: the model has no BatchNorm"):
        loop.setup(run, None, no_bn)  # before any data is turned into tensors


# --------------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("layout", [[], ["--channels-last"]], ids=["contiguous", "channels-last"])
def test_two_process_data_parallel_cpu(fp_run, tmp_path, layout):
    fp_dir, _ = fp_run
    out, hashes = tmp_path / "ddp", tmp_path / "hashes"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "train_with_hooks.py"),
           "--model", str(fp_dir), "--estimator", "pege", "--w-bits", "2", "--a-bits", "2",
           "--dataset", DEFAULT_DATASET, "--max-train", "256", "--max-test", "150", "--epochs", "1",
           "--batch-size", "32", "--eval-batch-size", "64", "--no-tensorboard", "--output-dir", str(out), *layout]
    env = subprocess_env(ACCELERATE_USE_CPU=1, OMP_NUM_THREADS=1, PEGE_TEST_PARAM_HASH_DIR=hashes)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Grad strides do not match bucket view strides" not in done.stderr  # DDP's buckets follow the layout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == math.ceil(256 / 32 / 2)  # each rank sees half of every global batch
    rank_hashes = [(hashes / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert rank_hashes[0] == rank_hashes[1], "parameters or buffers differ between the ranks"

    single = evaluate_checkpoint(str(out), DEFAULT_DATASET, max_test=150, batch_size=64)
    assert single["samples"] == 150 and single["world_size"] == 1
    assert single["accuracy"] == metrics["accuracy"] and single["top5"] == metrics["top5"]
    assert single["loss"] == pytest.approx(metrics["loss"], rel=1e-6)


# --------------------------------------------------------------------------------------------- data


def _gray_digit_dataset(path: Path, n_train=96, n_test=40, labels=10) -> Path:
    rng = np.random.default_rng(0)

    def split(n):
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L") for _ in range(n)],
             "digit": [i % labels for i in range(n)]},
            features=datasets.Features({"image": datasets.Image(), "digit": datasets.Value("int64")}))

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(path))
    return path


def test_grayscale_image_digit_columns_train(tmp_path):
    data = _gray_digit_dataset(tmp_path / "digits")
    out = tmp_path / "run"
    metrics = _train(["--estimator", "none", "--dataset", str(data), "--image-column", "image",
                      "--label-column", "digit", "--epochs", "1", "--batch-size", "32", "--no-tensorboard",
                      "--gradient-accumulation-steps", "2", "--output-dir", str(out)])
    assert metrics["class_names"] == [str(i) for i in range(10)]
    assert metrics["image_column"] == "image" and metrics["label_column"] == "digit"
    # 3 batches, 2 per optimizer step: the last step takes the remaining batch
    assert metrics["num_train"] == 96 and metrics["num_test"] == 40 and metrics["steps"] == 2
    model = _load(out)
    assert model.config.num_labels == 10 and model.config.id2label[3] == "3"


# --------------------------------------------------------------------------------------------- bad input


def _assert_nothing_trained(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not (out / "metrics.json").exists()
    assert not (out / "checkpoints").exists()


def test_a_folder_being_trained_into_refuses_a_second_training(tmp_path):
    out = tmp_path / "out"
    args = ["--estimator", "none", "--dataset", DEFAULT_DATASET, "--max-train", "64", "--max-test", "32",
            "--epochs", "1", "--batch-size", "32", "--no-tensorboard", "--output-dir", str(out)]
    held = train_state.lock_output_dir(out)  # as a running training holds it
    assert train_state.output_dir_is_locked(out)
    with pytest.raises(RuntimeError, match=rf"being trained into by another process \(pid {os.getpid()}\)"):
        _train(args)
    _assert_nothing_trained(out)
    held.close()  # the first training ends
    assert not train_state.output_dir_is_locked(out)
    assert _train(args)["steps"] == 2
    assert not train_state.output_dir_is_locked(out)  # released when training returns


def test_a_diverging_training_stops_and_says_where(tmp_path):
    out = tmp_path / "out"
    args = ["--estimator", "none", "--dataset", DEFAULT_DATASET, "--max-train", "256", "--max-test", "32",
            "--epochs", "2", "--batch-size", "32", "--lr", "1e12", "--log-every", "1", "--no-tensorboard",
            "--output-dir", str(out)]
    with pytest.raises(loop.TrainingDiverged, match=r"training diverged: the mean loss up to step (\d+) is (nan|inf)"):
        _train(args)
    record = json.loads((out / train_state.DIVERGED_FILE).read_text())
    losses = [r["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    # it stopped at the first non-finite logged loss (one log per step here), long before the 16 steps planned
    assert record["step"] == len(losses) < 16 and not math.isfinite(losses[-1])
    assert all(math.isfinite(v) for v in losses[:-1])
    assert not (out / "metrics.json").exists()
    # starting over clears the record
    _train([*args[:args.index("--lr")], "--lr", "0.01", *args[args.index("--lr") + 2:], "--overwrite"])
    assert not (out / train_state.DIVERGED_FILE).exists() and (out / "metrics.json").is_file()


def test_bad_inputs_fail_before_training(fp_run, tmp_path):
    fp_dir, _ = fp_run
    out = tmp_path / "out"
    base = ["--epochs", "1", "--no-tensorboard", "--output-dir", str(out)]

    with pytest.raises(FileNotFoundError, match="no_such_data"):
        _train(["--estimator", "none", "--dataset", str(tmp_path / "no_such_data"), *base])

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        _train(["--model", str(not_a_model), "--dataset", DEFAULT_DATASET, *base])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _train(["--model", str(tmp_path / "missing_model"), "--dataset", DEFAULT_DATASET, *base])

    with pytest.raises(ValueError, match="w_bits"):
        _train(["--model", str(fp_dir), "--w-bits", "1", "--dataset", DEFAULT_DATASET, *base])
    with pytest.raises(ValueError, match="a_bits"):
        _train(["--model", str(fp_dir), "--a-bits", "9", "--dataset", DEFAULT_DATASET, *base])
    with pytest.raises(SystemExit) as exit_info:  # choices come from the code's own tuples: argparse refuses it
        _train(["--model", str(fp_dir), "--estimator", "magic", "--dataset", DEFAULT_DATASET, *base])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="--model"):
        _train(["--estimator", "pege", "--dataset", DEFAULT_DATASET, *base])

    # label column: absent by name, or none recognisable
    digits = _gray_digit_dataset(tmp_path / "digits", n_train=20, n_test=10)
    with pytest.raises(ValueError, match="nope"):
        _train(["--estimator", "none", "--dataset", str(digits), "--label-column", "nope", *base])
    unnamed = tmp_path / "unnamed"
    datasets.load_from_disk(str(digits)).rename_column("digit", "value").save_to_disk(str(unnamed))
    with pytest.raises(ValueError, match="label column"):
        _train(["--estimator", "none", "--dataset", str(unnamed), *base])

    # labels 0..11 do not fit the 10-way head of the FP checkpoint
    twelve = _gray_digit_dataset(tmp_path / "twelve", n_train=24, n_test=12, labels=12)
    with pytest.raises(ValueError, match=r"labels in \[0, 11\].*10 outputs"):
        _train(["--model", str(fp_dir), "--dataset", str(twelve), *base])
    with pytest.raises(ValueError, match="10 outputs"):
        evaluate_checkpoint(str(fp_dir), str(twelve))

    _assert_nothing_trained(out)


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--dataset", "--estimator", "--w-bits", "--a-bits", "--curriculum", "--lambda",
                   "--mask", "--checkpointing-steps", "--resume", "--output-dir", "--optimizer", "quickstart"):
        assert option in text
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "--json" in capsys.readouterr().out


def test_cli_quantization_options_map_onto_pege_config():
    parser = cli.build_parser("train")
    parse = lambda *argv: train_args.build_quant_config(parser.parse_args(["train", "--model", "m", *argv]))  # noqa: E731
    # left out: PEGEConfig's own defaults, so the CLI and the Python API never disagree
    assert parse().to_dict() == PEGEConfig().to_dict()
    given = parse("--estimator", "pege", "--w-bits", "3", "--a-bits", "none", "--alpha", "3", "--mask", "error",
                  "--lambda", "0.5", "--discretization-reduction", "sum", "--ramp-fraction", "0.5")
    expected = PEGEConfig(estimator="pege", w_bits=3, a_bits=None, alpha=3.0, w_mask="error", discretization_lambda=0.5,
                          discretization_reduction="sum", ramp_fraction=0.5)
    assert given.to_dict() == expected.to_dict()
    # an option the run's estimator or activation width never reads is an error, not silently dropped
    with pytest.raises(ValueError, match=r"^--alpha, --discretization-lambda: not used by --estimator ste; drop them$"):
        parse("--estimator", "ste", "--lambda", "0.5", "--alpha", "3")
    with pytest.raises(ValueError, match=r"^--ramp-fraction: not used by --estimator ewgs"):
        parse("--estimator", "ewgs", "--ramp-fraction", "0.5", "--ewgs-delta", "0.01")
    with pytest.raises(ValueError, match=r"^--ewgs-delta: not used by --estimator pege; drop them$"):
        parse("--ewgs-delta", "0.01")
    with pytest.raises(ValueError, match=r"^--a-mask: not used by --a-bits none; drop them$"):
        parse("--a-bits", "none", "--a-mask", "counter")
    # within PEGE, what its other settings switch off: the ramp with the instant curriculum, the error term's form
    # with lambda 0 throughout, lambda_start without a log/exp schedule, alpha without a log schedule
    for argv, unused in ((["--curriculum", "instant", "--ramp-fraction", "0.5", "--a-mask", "counter"],
                          "--ramp-fraction, --a-mask"),
                         (["--lambda", "0", "--discretization-target", "step_size"], "--discretization-target"),
                         (["--lambda-start", "0.1"], "--lambda-start"), (["--curriculum", "linear", "--alpha", "3"], "--alpha")):
        with pytest.raises(ValueError, match=rf"^{re.escape(unused)}: not used by the run's other PEGE settings"):
            parse(*argv)
    with pytest.raises(ValueError, match=r"^--scale-init: not used by the run's quantizers \(their step sizes are observed"):
        parse("--w-quantizer", "minmax", "--a-quantizer", "dynamic_token", "--scale-init", "lsq")
    parse("--w-quantizer", "minmax", "--scale-init", "lsq")  # the LSQ activation quantizer reads it
    for argv in (["--lambda-schedule", "exp", "--lambda-start", "1e-8", "--lambda", "0", "--discretization-form", "plain"],
                 ["--lambda-schedule", "log", "--curriculum", "linear", "--alpha", "3"], ["--lambda", "0"]):
        parse(*argv)  # each read: a nonzero start, a log lambda schedule
    assert parse("--estimator", "ewgs", "--ewgs-delta", "0.01").ewgs_delta == 0.01
    # the long names are the fields' own; booleans both ways; the old --quantize-stem still works
    assert parse("--discretization-lambda", "0.5", "--w-mask", "error").to_dict() == PEGEConfig(
        discretization_lambda=0.5, w_mask="error").to_dict()
    assert parse("--no-skip-stem").skip_stem is False and parse("--quantize-stem").skip_stem is False
    assert parse("--lambda-schedule", "exp", "--lambda-start", "0.01").lambda_start == 0.01
    with pytest.raises(SystemExit):  # choices are the code's own tuples
        parse("--discretization-reduction", "max")
    with pytest.raises(ValueError, match="ramp_fraction"):  # ranges are PEGEConfig's
        parse("--ramp-fraction", "2")


def test_every_config_field_has_its_option():
    from pege_hf.config import config_fields

    text = cli.build_parser("train")._subparsers._group_actions[0].choices["train"].format_help()
    for name, *_ in config_fields():
        if name != "seed":  # PEGEConfig.seed follows --seed
            assert f"--{name.replace('_', '-')}" in text, name


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1; got 0"),
    (["--lr", "-1"], "--lr must be a number > 0; got -1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1)"),
    (["--estimator", "none", "--w-bits", "2"], "--w-bits: quantization option(s) given with --estimator none"),
    (["--resume", "--overwrite"], "pass one of them"),
])
def test_a_value_the_run_cannot_honour_is_an_error(tmp_path, argv, message):
    """No option is rewritten silently: every argument is checked before any model or data is loaded."""
    import time

    started = time.monotonic()
    parser = cli.build_parser("train")
    args = parser.parse_args(["train", "--dataset", str(tmp_path / "never-read"), *argv,
                              "--output-dir", str(tmp_path / "run")])
    with pytest.raises(ValueError) as err:
        train_args.resolve(args)
    assert message in str(err.value)
    assert time.monotonic() - started < 5 and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- quickstart


@pytest.mark.slow
def test_quickstart_default(tmp_path, capsys):
    """`pege train` with no --model/--dataset/--estimator (data subset to keep it short): the shipped models'
    accuracy, then W4A4 QAT from the shipped FP model with PEGE and STE side by side, with the defaults
    (which are the tuned recipe)."""
    out = tmp_path / "qs"
    assert cli.main(["train", "--max-train", "512", "--max-test", "200", "--epochs", "1", "--no-tensorboard",
                     "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["shipped"]) == ["full precision", "PEGE W4A4", "PEGE W3A3", "PEGE W2A2"]
    assert list(summary["qat"]) == ["W4A4-pege", "W4A4-ste"]
    assert "full precision" in text and "W4A4-pege" in text and "W4A4-ste" in text
    assert "(4 steps: 512 training images x 1 epochs)" in text  # 512 / 128 per batch, as recorded by the runs
    for run in summary["qat"].values():
        assert is_quantized(_load(run["model"])) and (run["steps"], run["epochs"], run["num_train"]) == (4, 1, 512)
        metrics = json.loads((Path(run["model"]) / "metrics.json").read_text())
        qc = metrics["quantization_config"]
        assert (qc["scale_init"], qc["discretization_lambda"], metrics["quantizer_lr_scale"]) == ("mse", 0.1, 1.0)


def test_quickstart_refuses_options_it_would_not_use(tmp_path, capsys, monkeypatch):
    """The quickstart runs its own recipe: an option it does not take is an error naming it (exit code 2) before
    any model is evaluated, not silently dropped; the options it takes pass the check."""
    from pege_hf.training import quickstart

    monkeypatch.setattr(quickstart, "shipped_accuracies", lambda args: pytest.fail("evaluated before the check"))
    out = tmp_path / "qs"
    assert cli.main(["train", "--eval-reestimate-bn", "3", "--a-mask", "counter", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not take --a-mask, --eval-reestimate-bn;" in err and not out.exists()
    quickstart.check_options(train_args.parse_args(["--w-bits", "2", "--epochs", "1", "--max-test", "50", "--lr",
                                                     "0.02", "--no-tensorboard", "--output-dir", str(out)]))


@pytest.mark.parametrize("argv,message", [
    (["--estimator", "none", "--resume-from", "x", "--overwrite"],
     "--resume-from continues a run and --overwrite deletes the one in --output-dir: pass one of them"),
    (["--estimator", "none", "--test-split", "train"], "--test-split 'train' is also the training split"),
    (["--estimator", "none", "--optimizer", "adam", "--momentum", "0.5"], "--momentum 0.5 is SGD's; --optimizer adam"),
    (["--estimator", "none", "--train-split", "a", "--test-split", "a"], "--test-split 'a' is also the training split"),
])
def test_options_that_cannot_be_honoured_are_refused_before_loading(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_args.resolve(train_args.parse_args(argv))


def test_a_pege_checkpoint_as_model_keeps_its_own_config_and_refuses_others():
    """--model a PEGE checkpoint loads with its saved config: the run continues its QAT with that config (and records
    it), and quantization options or --estimator none, which the loaded model would not follow, are refused."""
    from pege_hf.sources import SHIPPED_MODELS_DIR

    pege = str(SHIPPED_MODELS_DIR / "resnet20-pege-w2a2")
    saved = json.loads((Path(pege) / "config.json").read_text())["quantization_config"]
    config = train_args.resolve(train_args.parse_args(["--model", pege]))
    assert config.to_dict() == PEGEConfig.from_dict(saved).to_dict() and config.name == "W2A2-pege"
    with pytest.raises(ValueError, match=r"^--estimator, --w-bits: --model .* is already a PEGE W2A2-pege checkpoint"):
        train_args.resolve(train_args.parse_args(["--model", pege, "--estimator", "ste", "--w-bits", "4"]))
    with pytest.raises(ValueError, match=r"^--estimator none: --model .* is a PEGE checkpoint"):
        train_args.resolve(train_args.parse_args(["--model", pege, "--estimator", "none"]))


def test_data_refuses_a_test_split_that_is_the_training_split():
    from pege_hf.data import load_image_dataset

    with pytest.raises(ValueError, match="test_split='train' is also the training split"):
        load_image_dataset(DEFAULT_DATASET, test_split="train")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    """`pege train` with a bad bit width: exit code 2 and one clear line, not a traceback."""
    import subprocess
    import sys

    cmd = ["train", "--estimator", "pege", "--w-bits", "9", "--model", str(tmp_path / "fp"),
           "--output-dir", str(tmp_path / "run")]
    out = subprocess.run([sys.executable, "-m", "pege_hf.cli", *cmd], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "pege train: error: PEGEConfig.w_bits must be an integer from 2 to 8; got 9" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


class _BatchStatNorm(torch.nn.Module):
    """The reference for BN re-estimation: normalises with the batch's own float64 statistics and
    records them (per-channel mean, unbiased variance), as a BatchNorm in training mode would."""

    def __init__(self, bn):
        super().__init__()
        self.bn, self.means, self.vars = bn, [], []

    def forward(self, x):
        x64 = x.double()
        mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() / x.shape[1]
        self.means.append(mean)
        self.vars.append(var * n / (n - 1))
        y = (x64 - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.bn.eps)
        return (y * self.bn.weight.double()[None, :, None, None] + self.bn.bias.double()[None, :, None, None]).to(x.dtype)


def test_reestimate_batchnorm_averages_batch_statistics_of_the_quantized_forward():
    """Running mean / variance = the plain average over the batches of each BatchNorm's batch statistics
    (float64 reference normalising with those statistics), taken through the fully quantized evaluation
    forward even while training sits at r = 0; momentum and train/eval mode come back as they were."""
    import copy

    import pege_hf
    from pege_hf.hf.cifar import cifar_resnet

    torch.manual_seed(0)
    model = pege_hf.quantize(cifar_resnet(8), PEGEConfig(w_bits=2, a_bits=2, discretization_lambda=0.0))
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    evaluation.calibrate(model, normalize(images[:32]))
    pege_hf.set_progress(model, 0.0)  # a training forward would now leave activations in full precision
    batches = list(evaluation.augmented_batches(images, 3, 32, seed=1))
    assert len(batches) == 3 and batches[0].dtype == torch.float32

    def reference(eval_forward: bool):
        ref = copy.deepcopy(model)
        ref.train(not eval_forward)
        norms = {}
        for name, m in list(ref.named_modules()):
            if isinstance(m, torch.nn.BatchNorm2d):
                parent, _, child = name.rpartition(".")
                norms[name] = _BatchStatNorm(m)
                setattr(ref.get_submodule(parent), child, norms[name])
        with torch.no_grad():
            for b in batches:
                ref(pixel_values=b)
        return {k: (torch.stack(v.means).mean(0), torch.stack(v.vars).mean(0)) for k, v in norms.items()}

    expected, training_forward = reference(True), reference(False)
    model.train()
    assert evaluation.reestimate_batchnorm(model, iter(batches)) == 3
    assert model.training
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(bns) == set(expected) and len(bns) >= 7
    for name, bn in bns.items():
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
        torch.testing.assert_close(bn.running_mean.double(), expected[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), expected[name][1], rtol=1e-4, atol=1e-5)
    # the test tells the two forwards apart: a later BN's statistics differ under the training forward
    last = list(bns)[-1]
    assert (training_forward[last][0] - expected[last][0]).abs().max() > 1e-2

    with pytest.raises(ValueError, match="no batches"):
        evaluation.reestimate_batchnorm(model, [])
    assert model.training


def test_compile_kernels_turns_the_kernels_on_and_names_counter_masks_for_pege():
    from pege_hf.quant import kernels
    from pege_hf.training.model import use_kernels

    said = []
    try:
        use_kernels(None, True, said.append)  # a full-precision run: nothing to compile
        assert not kernels.compiled_kernels_enabled() and not said
        use_kernels(PEGEConfig(estimator="ste"), True, said.append)
        assert kernels.compiled_kernels_enabled() and not said
        use_kernels(PEGEConfig(a_mask="counter"), True, said.append)
        use_kernels(PEGEConfig(), True, said.append)  # "auto": counter masks under compiled kernels
        assert not said
        use_kernels(PEGEConfig(a_mask="bernoulli"), True, said.append)
        assert len(said) == 1 and "--a-mask auto" in said[0]
    finally:
        kernels.use_compiled_kernels(False)
