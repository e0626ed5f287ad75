"""The causal-LM QAT benchmark, from the repository root:

    python -m benchmarks.llm.run            # prepare, train FP, every QAT run, then the report
    python -m benchmarks.llm.run --report-only
    python -m benchmarks.llm.run --fp-steps 100 --qat-steps 30 --work benchmarks/llm/work --out benchmarks/llm

1. Text: the Python standard library's source on this machine (without its tests), split by file into
   train/validation from a hash of each file's path (benchmarks/llm/corpus.py).
2. A byte-level BPE tokenizer trained on the training files, and a small Llama (LlamaConfig, random init).
3. Full-precision training with `pege train-lm --estimator none`.
4. QAT from the FP model, every run with the same steps, batch, lr and data: weight-only W4/W3/W2 with
   group size 32, and W4 g32 + 8-bit per-token dynamic activations (W4A8); estimators STE and PEGE
   (pege_hf), and torchao's QAT fake quantizers (IntxFakeQuantizeConfig, symmetric int weights per
   group of 32, int8 asymmetric per-token activations) trained by the same loop through train_lm's
   ``prepare_model`` hook; and pege_hf's STE and PEGE on torchao's forward quantizer for weights
   (``--w-quantizer symmetric``), so that the estimators are compared on the same quantizer.

Each run is a child process writing into WORK/runs/NAME (not committed) with resumable
checkpoints; a run with a metrics.json is finished and never redone, a cut-off one continues. The
report (llm.json, llm.md, llm.png in --out) reads the runs' metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work400"
DEPS = HERE.parents[1] / ".deps"  # torchao installed with `pip install --target .deps torchao` (see README)
GROUP = 32
MODEL = {"hidden": 128, "layers": 4, "heads": 4, "intermediate": 384, "positions": 256}
BLOCK = 128  # tokens per sequence: what a step on this shared 2-core CPU affords
VOCAB = 2048
COMMON = ["--block-size", str(BLOCK), "--batch-size", "4", "--eval-batch-size", "16", "--max-eval-samples", "64",
          "--optimizer", "adam", "--weight-decay", "0", "--max-grad-norm", "1", "--log-every", "10",
          "--checkpointing-steps", "15", "--no-tensorboard", "--seed", "0"]
# bits label -> PEGEConfig options, and the torchao configuration of the same scheme
SCHEMES = {
    "W4g32": (["--w-bits", "4", "--group-size", str(GROUP), "--a-bits", "none"], (4, False)),
    "W2g32": (["--w-bits", "2", "--group-size", str(GROUP), "--a-bits", "none"], (2, False)),
    "W4g32A8": (["--w-bits", "4", "--group-size", str(GROUP), "--a-bits", "8", "--a-quantizer", "dynamic_token"],
                (4, True)),
    "W3g32": (["--w-bits", "3", "--group-size", str(GROUP), "--a-bits", "none"], (3, False)),
}
# method -> pege_hf estimator options; torchao runs through the prepare hook instead
ESTIMATORS = {"ste": ["--estimator", "ste"], "pege": ["--estimator", "pege"],
              # the best PEGE setting of the CIFAR screening (benchmarks/screen30): D's gradient on the step size only
              "pege_step": ["--estimator", "pege", "--discretization-lambda", "0.1",
                            "--discretization-target", "step_size"],
              # torchao's forward quantizer (min-max weights, s = max|w| / ((qmax - qmin) / 2) per group, from the
              # current weights at every step) with pege_hf's estimators: STE, and PEGE at its defaults
              "ste_sym": ["--estimator", "ste", "--w-quantizer", "symmetric"],
              "pege_sym": ["--estimator", "pege", "--w-quantizer", "symmetric"]}
# pege_step on that quantizer: its step size is not learned, so D's gradient reaches nothing and PEGE is the
# progressive replacement alone
ESTIMATORS["pege_step_sym"] = [*ESTIMATORS["pege_step"], "--w-quantizer", "symmetric"]
# the same with the replacement ramp over the first quarter of the budget (default: three quarters), so that the
# fully quantized model trains for 75 of the 100 steps rather than 25
ESTIMATORS["pege_step_short"] = [*ESTIMATORS["pege_step"], "--ramp-fraction", "0.25"]
ESTIMATORS["pege_step_sym_short"] = [*ESTIMATORS["pege_step_sym"], "--ramp-fraction", "0.25"]
METHODS = ("ste", "pege", "pege_step", "pege_step_short", "ste_sym", "pege_sym", "pege_step_sym", "pege_step_sym_short",
           "torchao")


def fp_args(work: Path, steps: int, lr: float) -> list[str]:
    return ["--model", str(work / "init"), "--dataset", str(work / "data"), "--estimator", "none",
            "--max-steps", str(steps), "--lr", str(lr), "--eval-steps", str(max(steps // 2, 1)), *COMMON]


def qat_args(work: Path, scheme: str, method: str, steps: int, lr: float, seed: int = 0) -> list[str]:
    base = ["--model", str(work / "runs" / "fp"), "--dataset", str(work / "data"), "--max-steps", str(steps),
            "--lr", str(lr), *COMMON[:-1], str(seed)]
    if method in ("torchao", "fp"):
        return base + ["--estimator", "none"]
    return base + [*ESTIMATORS[method], *SCHEMES[scheme][0]]


def plan(args) -> list[tuple[str, list[str]]]:
    """(run name, train-lm arguments), in the order they run: FP, the FP control, then W4 (all methods),
    W2, W4A8, W3."""
    runs = [("fp", fp_args(args.work, args.fp_steps, args.fp_lr))]
    seed = args.qat_seed
    suffix = f"-s{seed}" if seed else ""  # seed 0 keeps the names of the first complete run
    # the control: the FP model trained on in full precision with the QAT runs' budget
    runs.append((f"FPcont-fp{suffix}", qat_args(args.work, "FPcont", "fp", args.qat_steps, args.qat_lr, seed)))
    for scheme in args.schemes:
        runs += [(f"{scheme}-{m}{suffix}", qat_args(args.work, scheme, m, args.qat_steps, args.qat_lr, seed))
                 for m in args.methods]
    return runs


# --------------------------------------------------------------------------------------------- torchao


def torchao_prepare(bits: int, activations: bool):
    """A prepare_model hook: torchao QAT fake quantizers on every Linear but the lm_head (pege_hf keeps
    the head float too)."""
    sys.path.insert(0, str(DEPS))
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=GROUP, is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if activations else None

    def prepare(model):
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
        return model

    return prepare


def torchao_version() -> str | None:
    sys.path.insert(0, str(DEPS))
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


# --------------------------------------------------------------------------------------------- running


def run_one(name: str, argv: list[str]) -> None:
    """In the child: one train_lm run (torchao runs with the prepare hook)."""
    from pege_hf.train_lm import main
    from pege_hf.training.lm_args import parse_args

    from .report import split_name

    hook = None
    scheme, method, _ = split_name(name)
    if method == "torchao":
        hook = torchao_prepare(*SCHEMES[scheme][1])
    args = parse_args(argv)
    if hook is None:
        main(args)
        return
    import logging

    from pege_hf.training.lm_loop import train_lm

    logging.basicConfig(level=logging.WARNING)
    train_lm(args, prepare_model=hook)


def prepare(work: Path) -> dict:
    """The corpus, tokenizer and initial model (kept when already there)."""
    from .corpus import tiny_llama, train_tokenizer, write_corpus

    info_file = work / "corpus.json"
    if info_file.is_file() and (work / "init" / "config.json").is_file():
        return json.loads(info_file.read_text())
    work.mkdir(parents=True, exist_ok=True)
    counts = write_corpus(work / "data")
    tokenizer = train_tokenizer(sorted((work / "data" / "train").iterdir()), VOCAB, work / "tokenizer")
    model = tiny_llama(tokenizer, work / "init", **MODEL)
    info = {**counts, "vocab_size": len(tokenizer), "model": MODEL,
            "parameters": sum(p.numel() for p in model.parameters()), "python": sys.version.split()[0]}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def check_settings(out: Path, argv: list[str]) -> None:
    """A run folder remembers the arguments it started with (argv.json); ValueError naming the differences
    when the plan now asks for others (a finished or half-trained run is never mixed with new settings)."""
    saved = out / "argv.json"
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    if before != argv:
        gone = [a for a in before if a not in argv]
        new = [a for a in argv if a not in before]
        raise ValueError(f"{out} was started with other settings ({' '.join(gone)} -> {' '.join(new)}); "
                         "delete the folder to rerun it or choose another --work")


def launch(work: Path, name: str, argv: list[str], threads: int) -> bool:
    from .report import split_name

    out = work / "runs" / name
    check_settings(out, argv)
    if (out / "metrics.json").is_file():
        return True
    if split_name(name)[1] == "torchao" and torchao_version() is None:
        print(f"skip {name}: torchao is not importable (pip install --target .deps torchao)", flush=True)
        return False
    out.mkdir(parents=True, exist_ok=True)
    (out / "argv.json").write_text(json.dumps(argv) + "\n")
    command = [sys.executable, "-m", "benchmarks.llm.run", "--one", name, "--",
               *argv, "--output-dir", str(out), "--resume"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1",
           "PYTHONPATH": str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.time()
    print(f"run {name} ...", flush=True)
    with open(out / "train.log", "a") as log:
        code = subprocess.call(command, cwd=HERE.parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    print(f"run {name}: exit {code} after {time.time() - started:.0f} s", flush=True)
    return code == 0


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.llm.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp-steps", type=int, default=400, help="full-precision steps (default 400)")
    p.add_argument("--fp-lr", type=float, default=3e-3, help="full-precision peak lr (default 3e-3)")
    p.add_argument("--qat-steps", type=int, default=100, help="steps of every QAT run (default 100)")
    p.add_argument("--qat-lr", type=float, default=3e-4, help="peak lr of every QAT run (default 3e-4)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--qat-seed", type=int, default=0, metavar="S",
                   help="seed of the QAT runs and the control (data order; default 0); S > 0 names the runs NAME-sS, "
                        "beside the seed-0 runs, from the same FP model")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="QAT runs at a time (default 2; the FP run goes first, alone)")
    p.add_argument("--work", type=Path, default=WORK, help="runs, corpus and models (default benchmarks/llm/work400)")
    p.add_argument("--out", type=Path, default=HERE / "budget400",
                   help="where llm.json/.md/.png go (default benchmarks/llm/budget400)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.one:
        run_one(args.one, [a for a in args.rest if a != "--"])
        return 0
    from .report import write_report

    args.out.mkdir(parents=True, exist_ok=True)
    report = lambda: write_report(args.work, args.out, plan(args), torchao_version())  # noqa: E731
    if not args.report_only:
        print(f"corpus: {prepare(args.work)}", flush=True)
        (fp_name, fp_argv), *qat = plan(args)
        try:  # every run's settings, before any trains
            for name, argv in plan(args):
                check_settings(args.work / "runs" / name, argv)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if not launch(args.work, fp_name, fp_argv, args.threads):
            print(f"the full-precision run failed; see {args.work}/runs/fp/train.log", flush=True)
            return 1
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is a child process
            for _ in pool.map(lambda run: launch(args.work, *run, args.threads), qat):
                report()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
