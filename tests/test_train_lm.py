"""`pege train-lm`: a tiny Llama (LlamaConfig) with a byte-level BPE trained here trains on text files,
its loss falls, the packed checkpoint reloads with identical logits, the card says text-generation, the
validation perplexity agrees with transformers' own loss, and bad input fails with one line before the
model loads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pege_hf
from pege_hf import cli
from pege_hf.training import lm_loop
from pege_hf.training.lm_args import parse_args
from pege_hf.training.text import pack, read_text_dataset

from conftest import ROOT, free_port, subprocess_env

PACKAGE = ROOT / "pege_hf"


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    """(init model dir, corpus dir): the package's own source as text, split by file; a 320-token BPE
    trained on the training files; a 2-layer Llama of width 64."""
    from benchmarks.llm.corpus import tiny_llama, train_tokenizer

    root = tmp_path_factory.mktemp("lm")
    files = sorted(p for p in PACKAGE.rglob("*.py") if p.stat().st_size > 2000)
    for i, path in enumerate(files):
        split = "validation" if i in (3, 13) else "train"  # two files: a few dozen blocks
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        (root / "data" / split / f"{i:03d}_{path.name}").write_text(path.read_text())
    tokenizer = train_tokenizer(sorted((root / "data" / "train").iterdir()), 320, root / "tok")
    tiny_llama(tokenizer, root / "init", hidden=64, layers=2, heads=2, intermediate=128, positions=64)
    return root / "init", root / "data"


def lm_argv(model, data, out, *extra) -> list[str]:
    return ["--model", str(model), "--dataset", str(data), "--block-size", "64", "--batch-size", "8",
            "--max-eval-samples", "1000", "--no-tensorboard", "--log-every", "1", "--output-dir", str(out), *extra]


def train(argv, prepare_model=None) -> dict:
    return lm_loop.train_lm(parse_args(argv), prepare_model=prepare_model)


@pytest.fixture(scope="module")
def fp_lm(lm_setup, tmp_path_factory):
    init, data = lm_setup
    out = tmp_path_factory.mktemp("fp") / "run"
    metrics = train(lm_argv(init, data, out, "--estimator", "none", "--lr", "3e-3", "--max-steps", "30",
                            "--eval-steps", "10"))
    return out, metrics


def test_full_precision_loss_falls(fp_lm, lm_setup):
    out, metrics = fp_lm
    vocab = json.loads((lm_setup[0] / "config.json").read_text())["vocab_size"]
    # an untrained model predicts about uniformly (loss ln V); 30 steps learn at least the token frequencies
    assert metrics["history"][0]["loss"] > metrics["loss"]
    assert metrics["loss"] < math.log(vocab) - 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert metrics["task"] == "text-generation" and metrics["quantization_config"] is None
    assert (out / "tokenizer.json").is_file()


def validation_loss_by_transformers(model_dir: Path, data: Path, blocks: int) -> float:
    """transformers' own causal-LM loss over all ``blocks`` validation blocks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = pack(read_text_dataset(str(data))["validation"], tokenizer, "text", 64, "validation")
    model = pege_hf.from_pretrained(model_dir).eval()
    assert len(ids) == blocks
    with torch.no_grad():  # blocks of equal length: the loss over all of them is the mean over every token
        return float(model(input_ids=ids, labels=ids).loss)


def test_qat_checkpoint_reloads_exactly_with_a_text_generation_card(fp_lm, lm_setup, tmp_path):
    fp_dir, _ = fp_lm
    _, data = lm_setup
    trained = {}
    out = tmp_path / "w4"
    metrics = train(lm_argv(fp_dir, data, out, "--estimator", "pege", "--w-bits", "4", "--group-size", "32",
                            "--a-bits", "8", "--a-quantizer", "dynamic_token", "--max-steps", "4"),
                    prepare_model=lambda m: trained.setdefault("model", m))
    assert metrics["steps"] == 4 and metrics["quantization_config"]["group_size"] == 32

    reloaded = pege_hf.from_pretrained(out)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert any(type(m).__name__ == "QuantLinear" for m in reloaded.modules())
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained["model"].eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)
    # the reported perplexity is transformers' loss over the same validation tokens
    blocks = metrics["validation_blocks"]
    assert blocks < 1000  # all of them (--max-eval-samples 1000)
    assert metrics["loss"] == pytest.approx(validation_loss_by_transformers(out, data, blocks), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-9)

    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "type: perplexity" in card
    assert "causal language model (text generation)" in card and "image classifier" not in card
    assert "`lm_head`" in card and "token embeddings" in card and "group size 32" in card
    assert f"{metrics['perplexity']:.3f}" in card


def test_card_shows_the_float_base_perplexity(fp_lm, lm_setup, tmp_path):
    """A PEGE W2 card shows the float base's perplexity from the base run's metrics.json."""
    fp_dir, fp_metrics = fp_lm
    _, data = lm_setup
    out = tmp_path / "w2"
    metrics = train(lm_argv(fp_dir, data, out, "--w-bits", "2", "--group-size", "32", "--a-bits", "none",
                            "--max-steps", "2"))
    card = (out / "README.md").read_text()
    assert metrics["quantization_config"]["estimator"] == "pege"
    assert f"{fp_metrics['perplexity']:.3f}" in card and "the same validation tokens" in card


# --------------------------------------------------------------------------------------------- bad input


def cli_error(argv, capsys) -> str:
    code = cli.main(["train-lm", *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    # one line, no traceback (datasets' progress bars may come before it, for errors found in the data)
    assert code == 2 and lines[-1].startswith("pege train-lm: error: ") and "Traceback" not in "".join(lines), lines
    return lines[-1]


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be found before the model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(lm_loop, "load_model", refuse)


def test_bad_arguments_fail_in_one_line_before_loading(lm_setup, tmp_path, capsys, no_model_load):
    init, data = lm_setup
    out = tmp_path / "bad"
    err = cli_error(lm_argv(init, data, out, "--w-bits", "1"), capsys)
    assert "w_bits" in err
    err = cli_error(lm_argv(init, data, out, "--block-size", "4096"), capsys)
    assert "--block-size 4096" in err and "max_position_embeddings (64)" in err
    err = cli_error(lm_argv(init, tmp_path / "missing", out), capsys)
    assert "--dataset" in err and "missing" in err
    err = cli_error(lm_argv(init, data, out, "--estimator", "none", "--w-bits", "4"), capsys)
    assert "--w-bits" in err and "full-precision" in err
    err = cli_error(lm_argv(init, data, out, "--max-steps", "0"), capsys)
    assert "--max-steps must be >= 1" in err
    err = cli_error(lm_argv(init, data, out, "--group-size", "48"), capsys)  # the layers have 64 and 128 inputs
    assert "group_size 48 does not divide the 64 input features" in err
    err = cli_error(lm_argv(init, data, out, "--no-skip-stem"), capsys)
    assert "a causal LM's first Linear reads the token embedding" in err
    err = cli_error(lm_argv(init, data, out, "--checkpointing-steps", "epoch"), capsys)
    assert "--checkpointing-steps epoch: pege train-lm checkpoints by optimizer steps" in err
    err = cli_error(lm_argv(init, data, out, "--validation-split", "train"), capsys)
    assert "--validation-split 'train' is also the training split" in err
    err = cli_error(lm_argv(init, data, out, "--validation-split", "validation", "--validation-percentage", "10"),
                    capsys)
    assert "--validation-percentage 10 carves" in err and "pass one of them" in err
    # the data has a validation split: a percentage would carve nothing, and is refused rather than ignored
    err = cli_error(lm_argv(init, data, out, "--validation-percentage", "10"), capsys)
    assert "--validation-percentage 10: the data set has a 'validation' split" in err
    assert not (out / "metrics.json").exists()


def test_validation_split_is_the_named_one_the_found_one_or_a_carved_percentage():
    from datasets import Dataset, DatasetDict

    from pege_hf.training.text import train_and_validation

    rows = lambda n: Dataset.from_dict({"text": [f"row {i}" for i in range(n)]})  # noqa: E731
    with_val = DatasetDict(train=rows(40), dev=rows(3), extra=rows(2))
    assert train_and_validation(with_val, "train", None, None, 0)[2] == "dev"
    assert train_and_validation(with_val, "train", "extra", None, 0)[2] == "extra"
    train, val, name = train_and_validation(DatasetDict(train=rows(40)), "train", None, None, 0)
    assert (len(train), len(val), name) == (38, 2, "5% of train (seed 0)")  # the default percentage: 2 of 40
    train, val, name = train_and_validation(DatasetDict(train=rows(40)), "train", None, 25.0, 0)
    assert (len(train), len(val), name) == (30, 10, "25% of train (seed 0)")
    with pytest.raises(ValueError, match="--validation-percentage 25: the data set has a 'dev' split"):
        train_and_validation(with_val, "train", None, 25.0, 0)


def test_bad_data_fails_in_one_line_before_the_model_loads(lm_setup, tmp_path, capsys, no_model_load):
    init, _ = lm_setup
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"line {i} " * 40, "n": i}) for i in range(20)) + "\n")
    err = cli_error(lm_argv(init, rows, tmp_path / "a", "--text-column", "text"), capsys)
    assert "--text-column 'text'" in err and "content" in err
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "rows.jsonl").write_text(
        "\n".join(json.dumps({"a": "x y", "b": "z"}) for _ in range(5)) + "\n")
    err = cli_error(lm_argv(init, tmp_path / "two", tmp_path / "b"), capsys)
    assert "--text-column" in err and "['a', 'b']" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(lm_argv(init, tmp_path / "empty", tmp_path / "c"), capsys)
    assert "holds no files" in err
    short = tmp_path / "short"
    (short / "train").mkdir(parents=True)
    (short / "validation").mkdir()
    (short / "train" / "a.txt").write_text("def f(): pass\n" * 50)
    (short / "validation" / "b.txt").write_text("x = 1\n")
    err = cli_error(lm_argv(init, short, tmp_path / "d"), capsys)
    assert "validation split has" in err and "fewer than one block" in err


# --------------------------------------------------------------------------------------------- accelerate


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(fp_lm, lm_setup, tmp_path):
    fp_dir, _ = fp_lm
    _, data = lm_setup
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "pege_hf.train_lm",
           *lm_argv(fp_dir, data, out, "--w-bits", "4", "--group-size", "32", "--a-bits", "none", "--max-steps", "3")]
    env = subprocess_env(ACCELERATE_USE_CPU=1, OMP_NUM_THREADS=1)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    # the gathered validation loss is the single-process loss of the saved model over the same blocks
    assert metrics["loss"] == pytest.approx(validation_loss_by_transformers(out, data, metrics["validation_blocks"]),
                                            rel=1e-5)
