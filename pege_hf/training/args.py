"""`pege train` arguments: the quantization options generated from PEGEConfig's field metadata, the
training options, and their validation (before any model or data is loaded).

Each PEGEConfig field ``name`` is the option ``--name-with-dashes`` (choices, help and default from the
field's metadata); left out, the config's own default applies, so the CLI and the Python API never
disagree. ``--lambda`` and ``--mask`` stay as short spellings of ``--discretization-lambda`` and
``--w-mask``; ``--quantize-stem`` / ``--quantize-head`` of ``--no-skip-stem`` / ``--no-skip-head``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..config import ACTIVATION_FIELDS, ESTIMATOR_FIELDS, QUANT_METHOD, PEGEConfig, config_fields, unused_fields
from ..sources import check_model_source
from .model import ARCHS
from .optim import OPTIMIZERS, SCHEDULERS

FULL_PRECISION = "none"  # --estimator none: train in full precision
ALIASES = {"discretization_lambda": ("--lambda",), "w_mask": ("--mask",)}
# fields the training options set: PEGEConfig.seed follows --seed
FROM_TRAINING_OPTIONS = ("seed",)
DEFAULT_EPOCHS = 20
DEFAULT_MOMENTUM = 0.9  # SGD's
DEFAULT_LR = {("sgd", False): 0.1, ("sgd", True): 0.01, ("adam", False): 1e-3, ("adam", True): 1e-4}
DESCRIPTION = """\
Train an image classifier in full precision or with quantization-aware training (PEGE, STE, EWGS).

With no --model, --dataset or --estimator this is the quickstart: the accuracy of the shipped
full-precision ResNet-20 and its PEGE W4A4/W3A3/W2A2 checkpoints on the shipped CIFAR-10 sample, then a
short W4A4 QAT from the FP model with PEGE and STE side by side (a few minutes on 2 CPU cores).

`pege train ARGS` runs one process; `accelerate launch [launch options] -m pege_hf.train ARGS` runs the
same code on several GPUs, machines or CPU processes (docs/distributed.md). --batch-size is per process.
Outputs: the final model (save_pretrained; packed low-bit for QAT), best/, metrics.json, metrics.jsonl,
logs/ (TensorBoard), checkpoints/step_N/ and README.md (model card); diverged.json instead of the model
when the loss turns NaN."""
EPILOG = """\
examples:
  pege train
  pege train --estimator none --arch resnet20 --dataset ../data/cifar10 --epochs 200 --output-dir runs/fp
  pege train --model runs/fp --dataset ../data/cifar10 --w-bits 2 --a-bits 2 --epochs 30
  pege train --model runs/fp --dataset ../data/cifar10 --checkpointing-steps 500 --resume
  accelerate launch --multi_gpu --num_processes 8 -m pege_hf.train --model runs/fp --dataset ...
"""


# --------------------------------------------------------------------------------------------- parsing


def _optional_int(text: str):
    """An integer, or 'none' (kept as the string until the config is built: None means "not given")."""
    if text.lower() == FULL_PRECISION:
        return FULL_PRECISION
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _checkpointing_steps(text: str):
    if text == "epoch":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of optimizer steps or 'epoch', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _field_option(name: str, kind: type, default, meta: dict) -> tuple[list[str], dict]:
    """(option strings, add_argument keywords) of one PEGEConfig field."""
    flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, ())]
    shown = "none" if default is None else default
    kwargs: dict = {"dest": name, "default": None, "help": f"{meta['help']} (default: {shown})"}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind is list:
        kwargs.update(nargs="+", metavar="NAME")
    elif meta.get("optional") and kind is int:
        kwargs.update(type=_optional_int, metavar="N|none")
    elif kind in (int, float):
        kwargs.update(type=kind, metavar=name.split("_")[-1].upper())
    if meta.get("choices") is not None:
        choices = tuple(meta["choices"]) + ((FULL_PRECISION,) if name == "estimator" else ())
        kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
    if name == "estimator":
        kwargs["help"] = (f"{meta['help']}; 'none' trains in full precision (default: {default} with --model, "
                          "none without)")
    return flags, kwargs


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per PEGEConfig field (see the module docstring)."""
    group = parser.add_argument_group("quantization (PEGEConfig fields; left out: the config's default)")
    for name, kind, default, meta in config_fields():
        if name not in FROM_TRAINING_OPTIONS:
            flags, kwargs = _field_option(name, kind, default, meta)
            group.add_argument(*flags, **kwargs)
    group.add_argument("--quantize-stem", dest="skip_stem", action="store_const", const=False, help=argparse.SUPPRESS)
    group.add_argument("--quantize-head", dest="skip_head", action="store_const", const=False, help=argparse.SUPPRESS)


def add_column_and_split_args(group) -> None:
    """The dataset's column and split options, shared by `pege train` and `pege eval`."""
    group.add_argument("--image-column", default=None, metavar="NAME", help="image column (default: found from the features/names)")
    group.add_argument("--label-column", default=None, metavar="NAME", help="label column (default: found from the features/names)")
    group.add_argument("--train-split", default=None, metavar="NAME", help="training split (default: train)")
    group.add_argument("--test-split", default=None, metavar="NAME",
                       help="evaluation split (default: test, else validation, else 10%% carved off train)")


def _add_model_and_data(parser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="float checkpoint to start from (a save_pretrained folder or a Hub id); without it a "
                        "fresh --arch model is trained from scratch")
    g.add_argument("--arch", default=None, choices=ARCHS, help="architecture for training from scratch (default resnet20)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, metavar="SOURCE",
                   help="a Hub dataset id (uoft-cs/cifar10), a parquet file or folder, a save_to_disk folder or an "
                        "imagefolder (default: the shipped CIFAR-10 sample)")
    add_column_and_split_args(g)
    g.add_argument("--max-train", type=int, default=None, metavar="N", help="train on a random subset of N images")
    g.add_argument("--max-test", type=int, default=None, metavar="N", help="evaluate on a random subset of N images")


def add_optimisation_options(g, *, batch_size: int, optimizer: str, weight_decay: float, lr_help: str,
                             epochs_help: str) -> None:
    """The optimisation options `pege train` and `pege train-lm` share (their defaults differ)."""
    g.add_argument("--epochs", type=int, default=None, help=epochs_help)
    g.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                   help=f"batch size per process (default {batch_size})")
    g.add_argument("--eval-batch-size", type=int, default=2 * batch_size, metavar="N",
                   help="evaluation batch size per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--optimizer", default=optimizer, choices=OPTIMIZERS,
                   help=f"sgd (momentum, Nesterov) or adam (AdamW) (default {optimizer})")
    g.add_argument("--lr", type=float, default=None, help=lr_help)
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default {DEFAULT_MOMENTUM}; not "
                   "with --optimizer adam)")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"on conv/linear weights only, never on norms, biases or quantizer scales (default {weight_decay:g})")
    g.add_argument("--quantizer-lr-scale", type=float, default=1.0,
                   help="lr of quantizer parameters (step sizes) relative to --lr (default 1, benchmarks/tuning.md)")
    g.add_argument("--scheduler", default="cosine", choices=SCHEDULERS, help="lr schedule after the warmup")
    g.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps with linear lr warmup (default 0.05)")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: as configured for accelerate (no)")


def _add_optimisation(parser) -> None:
    g = parser.add_argument_group("optimisation")
    add_optimisation_options(
        g, batch_size=128, optimizer="sgd", weight_decay=5e-4,
        lr_help="learning rate (default: sgd 0.1 from scratch / 0.01 from --model; adam 1e-3 / 1e-4)",
        epochs_help=f"epochs (default {DEFAULT_EPOCHS}; quickstart: 3 QAT)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    g.add_argument("--reestimate-bn", type=int, default=0, metavar="N",
                   help="after the last epoch, replace the BatchNorm moving averages by a plain average over N "
                        "augmented training batches, before saving and the final evaluation (default 0: off)")
    g.add_argument("--eval-reestimate-bn", type=int, default=0, metavar="N",
                   help="at every epoch's evaluation, also report the test accuracy with the BatchNorm statistics "
                        "re-estimated on N augmented training batches (then put back: training is unchanged); PEGE "
                        "needs it to read its fully quantized model mid-ramp (default 0: off)")


def add_run_options(g, *, default_output: str) -> None:
    """The run options `pege train` and `pege train-lm` share."""
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help=f"where the model, metrics.json, logs and checkpoints go (default {default_output})")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation and masks")
    g.add_argument("--checkpointing-steps", type=_checkpointing_steps, default=None, metavar="N|epoch",
                   help="save a resumable checkpoint every N optimizer steps (or every epoch)")
    g.add_argument("--checkpoints-total-limit", type=int, default=2, metavar="K", help="checkpoints to keep (default 2)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output-dir (fresh start if none)")
    g.add_argument("--resume-from", default=None, metavar="PATH", help="continue from this checkpoint folder")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that holds an earlier run (its checkpoints are deleted)")
    g.add_argument("--log-every", type=int, default=10, metavar="N", help="log train loss/lr every N optimizer steps")
    g.add_argument("--no-tensorboard", action="store_true", help="do not log to TensorBoard")
    g.add_argument("--compile-kernels", action="store_true",
                   help="run the quantizers' elementwise kernels through torch.compile (faster QAT steps; the "
                        "first step compiles)")


def _add_run(parser) -> None:
    g = parser.add_argument_group("run")
    add_run_options(g, default_output="runs/<model>-<quant>; quickstart runs/quickstart")
    g.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers (data is in memory)")
    g.add_argument("--channels-last", action="store_true",
                   help="channels-last weights, so convolutions run channels-last (faster on CPUs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    _add_model_and_data(parser)
    add_config_arguments(parser)
    _add_optimisation(parser)
    _add_run(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`python -m pege_hf.train ARGV`: the namespace `pege train ARGV` gives."""
    parser = argparse.ArgumentParser(prog="python -m pege_hf.train")
    add_arguments(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------- validation


def estimator(args) -> str:
    """The run's estimator: as given, else pege with --model and none (full precision) without."""
    return args.estimator if args.estimator is not None else ("pege" if args.model else FULL_PRECISION)


def given_config_options(args) -> dict:
    """The PEGEConfig fields given on the command line ('none' becomes None)."""
    names = [name for name, *_ in config_fields() if name not in FROM_TRAINING_OPTIONS]
    given = {name: getattr(args, name, None) for name in names}
    return {k: (None if v == FULL_PRECISION else v) for k, v in given.items() if v is not None}


def saved_quant_config(source) -> PEGEConfig | None:
    """The PEGEConfig a local PEGE checkpoint was saved with (None for a float or remote checkpoint)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text()).get("quantization_config") or {}
    return PEGEConfig.from_dict(saved) if saved.get("quant_method") == QUANT_METHOD else None


def unused_because(unused: set[str], kind: str, a_bits) -> str:
    """Why the fields ``unused`` are read by nothing: the estimator, float activations, or PEGE's other settings."""
    other_estimators = {f for est, names in ESTIMATOR_FIELDS.items() if est != kind for f in names}
    activation = set(ACTIVATION_FIELDS) if a_bits is None else set()
    reasons = [*([f"--estimator {kind}"] if unused & other_estimators else []),
               *(["--a-bits none"] if unused & activation else []),
               *(["the run's quantizers (their step sizes are observed, not initialised)"] if "scale_init" in unused else []),
               *(["the run's other PEGE settings (curriculum, lambda, lambda schedule)"]
                 if unused - other_estimators - activation - {"scale_init"} else [])]
    return " or ".join(reasons)


def build_quant_config(args) -> PEGEConfig | None:
    """The run's PEGEConfig (validated by PEGEConfig itself), or None for full precision. Quantization
    options given for a full-precision run are an error, not ignored."""
    options = given_config_options(args)
    kind = estimator(args)
    if kind == FULL_PRECISION and args.model and saved_quant_config(args.model) is not None:
        raise ValueError(f"--estimator none: --model {args.model} is a PEGE checkpoint, which loads quantized; "
                         "full-precision training starts from a float checkpoint")
    if kind == FULL_PRECISION:
        extra = sorted(set(options) - {"estimator"})
        if extra:
            flags = ", ".join("--" + name.replace("_", "-") for name in extra)
            raise ValueError(f"{flags}: quantization option(s) given with --estimator none (full-precision training); "
                             "drop them or choose --estimator pege, ste or ewgs")
        return None
    if not args.model:
        raise ValueError(f"--estimator {kind} is quantization-aware training, which starts from a trained float "
                         "checkpoint: pass --model PATH_OR_ID (or --estimator none to train in full precision)")
    saved = saved_quant_config(args.model)
    if saved is not None:  # a PEGE checkpoint loads with its own config: continue its QAT, with nothing else asked
        given = [*(["estimator"] if args.estimator is not None else []), *options]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in dict.fromkeys(given))
            raise ValueError(f"{flags}: --model {args.model} is already a PEGE {saved.name} checkpoint, which keeps its "
                             "own quantization config; drop them to continue its QAT, or start from a float checkpoint")
        return saved
    config = PEGEConfig(**{**options, "estimator": kind, "seed": args.seed})
    unused = unused_fields(options, config)
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ValueError(f"{flags}: not used by {unused_because(set(unused), kind, config.a_bits)}; drop them")
    return config


# (option, test, what it must be): every training option a value can break
_RULES = (
    ("epochs", lambda v: v is None or v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v is None or (math.isfinite(v) and v > 0), "a number > 0"),
    ("momentum", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("quantizer_lr_scale", lambda v: v > 0, "> 0"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_grad_norm", lambda v: v is None or v > 0, "> 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("reestimate_bn", lambda v: v >= 0, ">= 0"),
    ("eval_reestimate_bn", lambda v: v >= 0, ">= 0"),
    ("max_train", lambda v: v is None or v >= 1, ">= 1"),
    ("max_test", lambda v: v is None or v >= 1, ">= 1"),
    ("checkpoints_total_limit", lambda v: v >= 1, ">= 1"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
)


def check_training_options(args) -> None:
    """ValueError naming the first option whose value the run cannot honour; fills SGD's default momentum."""
    for name, ok, what in _RULES:
        value = getattr(args, name, None)
        if hasattr(args, name) and not ok(value):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}; got {value}")
    if args.model and getattr(args, "arch", None):
        raise ValueError(f"--arch {args.arch} builds a fresh model, but --model {args.model} loads one: pass one of them")
    if args.resume and args.resume_from:
        raise ValueError("--resume and --resume-from both say where to continue from: pass one of them")
    if args.optimizer != "sgd" and args.momentum is not None:
        raise ValueError(f"--momentum {args.momentum:g} is SGD's; --optimizer {args.optimizer} (AdamW) does not use "
                         "it: drop it")
    if args.optimizer == "sgd" and args.momentum is None:
        args.momentum = DEFAULT_MOMENTUM
    if (args.resume or args.resume_from) and args.overwrite:
        flag = "--resume" if args.resume else "--resume-from"
        raise ValueError(f"{flag} continues a run and --overwrite deletes the one in --output-dir: pass one of them")
    if getattr(args, "test_split", None) is not None and (args.train_split or "train") == args.test_split:
        raise ValueError(f"--test-split {args.test_split!r} is also the training split: the accuracy would be measured "
                         "on training images; name another split")


def resolve(args) -> PEGEConfig | None:
    """Check every argument and fill the defaults that depend on others (lr, epochs, data set, arch);
    returns the run's PEGEConfig (None: full precision). Nothing is loaded."""
    from ..data import DEFAULT_DATASET

    check_training_options(args)
    quant_config = build_quant_config(args)
    if args.model is not None:
        check_model_source(args.model)
    args.dataset = args.dataset or DEFAULT_DATASET
    args.arch = None if args.model else (args.arch or "resnet20")
    args.epochs = args.epochs or DEFAULT_EPOCHS
    if args.lr is None:
        args.lr = DEFAULT_LR[(args.optimizer, args.model is not None)]
    return quant_config
