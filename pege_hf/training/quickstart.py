"""`pege train` with no --model, --dataset or --estimator: what the library is for, in a few minutes.

1. The shipped full-precision CIFAR-10 ResNet-20 and its shipped PEGE W4A4 / W3A3 / W2A2 checkpoints,
   evaluated on the shipped CIFAR-10 sample.
2. A short W4A4 QAT from the shipped FP model with the tuned recipe, PEGE and STE side by side (a few
   minutes on 2 CPU cores; recipes.QUICKSTART says why W4A4).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..data import DEFAULT_DATASET
from ..sources import SHIPPED_FP_MODEL, SHIPPED_MODELS_DIR
from .args import parse_args, resolve
from .evaluation import evaluate_checkpoint
from .loop import train
from .recipes import QUICKSTART, recipe_argv

QUICKSTART_DIR = Path("runs") / "quickstart"
SHIPPED = {"full precision": "resnet20-fp", "PEGE W4A4": "resnet20-pege-w4a4", "PEGE W3A3": "resnet20-pege-w3a3",
           "PEGE W2A2": "resnet20-pege-w2a2"}
ESTIMATORS = ("pege", "ste")
QAT_RECORD = ("accuracy", "epochs", "steps", "num_train", "wall_time_s")  # of each QAT run, in summary.json
# the `pege train` options the quickstart takes (qat_argv, shipped_accuracies); any other is refused
TAKES = ("w_bits", "a_bits", "epochs", "lr", "seed", "batch_size", "eval_batch_size", "max_train", "max_test",
         "no_tensorboard", "output_dir")


def check_options(args) -> None:
    """ValueError naming every option given that the quickstart would not use (it runs its own recipe)."""
    defaults = vars(parse_args([]))
    ignored = [name for name, default in defaults.items() if name not in TAKES and getattr(args, name, default) != default]
    if ignored:
        raise ValueError(f"the quickstart (pege train without --model, --dataset or --estimator) does not take "
                         f"{', '.join('--' + name.replace('_', '-') for name in ignored)}; it takes "
                         f"{', '.join('--' + name.replace('_', '-') for name in TAKES)} (give --model and --dataset "
                         "for a run of your own)")


def shipped_accuracies(args) -> dict[str, float]:
    """Top-1 of each shipped model on the sample's test split (the same --max-test subset QAT evaluates on)."""
    found = {}
    for title, name in SHIPPED.items():
        path = SHIPPED_MODELS_DIR / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the shipped model {path} is missing: reinstall pege-hf")
        found[title] = evaluate_checkpoint(str(path), DEFAULT_DATASET, max_test=args.max_test, seed=args.seed,
                                           batch_size=args.eval_batch_size)["accuracy"]
        print(f"quickstart: shipped {title:15s} {100 * found[title]:6.2f}%", flush=True)
    return found


def qat_argv(args, estimator: str, output_dir: Path) -> list[str]:
    """`pege train` options of one quickstart QAT run: the recipe, overridden by what the user gave."""
    config = {**QUICKSTART["config"], **{k: v for k, v in (("w_bits", args.w_bits), ("a_bits", args.a_bits))
                                           if v is not None}}
    training = {**QUICKSTART["training"], **{k: v for k, v in (("epochs", args.epochs), ("lr", args.lr))
                                             if v is not None}}
    argv = [*recipe_argv({"config": config, "training": training}), "--model", str(SHIPPED_FP_MODEL),
            "--estimator", estimator, "--dataset", DEFAULT_DATASET, "--seed", str(args.seed),
            "--batch-size", str(args.batch_size), "--output-dir", str(output_dir), "--overwrite"]
    for flag, value in (("--max-train", args.max_train), ("--max-test", args.max_test)):
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--no-tensorboard"] if args.no_tensorboard else [])


def quickstart(args) -> int:
    check_options(args)
    root = Path(args.output_dir) if args.output_dir else QUICKSTART_DIR
    runs = {}
    for estimator in ESTIMATORS:  # every option checked before any model or data is loaded
        qat_args = parse_args(qat_argv(args, estimator, root / f"qat-{estimator}"))
        qat_config = resolve(qat_args)
        runs[qat_config.name] = qat_args
    started = time.time()
    shipped = shipped_accuracies(args)
    trained = {}
    for tag, qat_args in runs.items():
        print(f"quickstart: {tag} QAT from the shipped FP model ({qat_args.epochs} epochs) -> {qat_args.output_dir}",
              flush=True)
        result = train(qat_args)
        trained[tag] = {"model": qat_args.output_dir, **{k: result[k] for k in QAT_RECORD}}
    summary = {"shipped": shipped, "qat": trained, "wall_time_s": time.time() - started}
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_text(summary, root), flush=True)
    return 0


def summary_text(summary: dict, root: Path) -> str:
    lines = ["", "quickstart (CIFAR-10 ResNet-20, shipped sample):", "  shipped models"]
    lines += [f"    {title:22s} {100 * acc:6.2f}%" for title, acc in summary["shipped"].items()]
    first = next(iter(summary["qat"].values()))
    lines.append(f"  short QAT from the shipped FP model ({first['steps']} steps: {first['num_train']} training images "
                 f"x {first['epochs']} epochs)")
    lines += [f"    {tag:22s} {100 * run['accuracy']:6.2f}%" for tag, run in summary["qat"].items()]
    lines.append(f"  total {summary['wall_time_s']:.0f} s; models in {root}")
    return "\n".join(lines)
