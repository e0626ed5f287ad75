"""The Accelerate training loop: full-precision training and PEGE/STE/EWGS quantization-aware training.

``pege train ARGS`` and ``accelerate launch -m pege_hf.train ARGS`` run the same code; the first is
always one process, the second runs on whatever ``accelerate config`` (or its flags) describe.

Examples::

    pege train                                   # the quickstart: FP ResNet-20 (if none is shipped),
                                                 # then W2A2 PEGE QAT on the shipped CIFAR-10 sample
    pege train --estimator none --arch resnet20 --dataset ../shared/data/cifar10 \\
        --epochs 200 --lr 0.1 --output-dir runs/resnet20-fp
    pege train --model runs/resnet20-fp --dataset ../shared/data/cifar10 \\
        --estimator pege --w-bits 2 --a-bits 2 --epochs 30 --output-dir runs/resnet20-w2a2-pege
    pege train --model runs/resnet20-fp --dataset uoft-cs/cifar10 --estimator ste --w-bits 4 --a-bits 4
    pege train ... --checkpointing-steps 500       # then, after a crash or preemption:
    pege train ... --checkpointing-steps 500 --resume

Several GPUs on one machine (``--batch-size`` is per process; the global batch is
batch-size x processes x gradient-accumulation-steps)::

    accelerate config                            # once: answer the questions, or
    accelerate launch --multi_gpu --num_processes 8 -m pege_hf.train --model ... --dataset ...

Several machines (run on every machine, with its own --machine_rank; checkpoints and
--output-dir must live on a filesystem all machines share)::

    accelerate launch --multi_gpu --num_processes 16 --num_machines 2 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m pege_hf.train --model ... --dataset ...
    accelerate launch --multi_gpu --num_processes 16 --num_machines 2 --machine_rank 1 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 -m pege_hf.train --model ... --dataset ...

(``torchrun --nnodes 2 --nproc_per_node 8 --node_rank R --master_addr ... -m pege_hf.train`` works
too.) Two data-parallel CPU processes (gloo), e.g. to test the distributed path without GPUs::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m pege_hf.train ...

What a run writes into ``--output-dir``: the final model (``save_pretrained``: config.json +
safetensors; a packed low-bit checkpoint for QAT runs), ``best/`` (the best epoch's model),
``metrics.json`` (final accuracy / top-5 / loss, per-epoch history, the PEGEConfig, the command
line ...), ``metrics.jsonl`` (one JSON line per logged step or epoch), ``logs/`` (TensorBoard),
``checkpoints/step_N/`` (``accelerator.save_state`` + ``trainer_state.json``, the last
``--checkpoints-total-limit`` kept) and a model card ``README.md`` when pege_hf.hub can render one.
While it trains, ``.train.lock`` keeps a second training out of the folder; a run whose loss turns
NaN/inf stops and writes ``diverged.json`` (the step) instead of the model.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker
from torch import nn

from .config import PEGEConfig
from .data import CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATASET, TensorImageDataset, load_image_dataset, normalize
from .data import random_crop_flip, to_tensors
from .hf.cifar import cifar_resnet, cifar_vgg_small, register_cifar_models
from .quant.grid import codes_changed, summarize, weight_codes_and_positions
from .quant.modules import FakeQuantizer, QuantLayer, set_progress

logger = logging.getLogger("pege_hf.train")

ARCHS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg_small")
PEGE_DEFAULTS = {p.name: p.default for p in inspect.signature(PEGEConfig.__init__).parameters.values()}
# PEGEConfig fields with a command-line option of the same name; left out, PEGEConfig's default applies
CLI_CONFIG_FIELDS = ("w_quantizer", "a_quantizer", "scale_init", "curriculum", "alpha", "ramp_fraction", "w_mask",
                     "a_mask", "discretization_lambda", "lambda_schedule", "discretization_scope",
                     "discretization_reduction", "ewgs_delta", "lambda_start", "discretization_form",
                     "discretization_target")
ESTIMATOR_CHOICES = ("pege", "ste", "ewgs", "none")  # "none": full precision; the rest go to PEGEConfig
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^step_(\d+)$")
LOCK_FILE = ".train.lock"
DIVERGED_FILE = "diverged.json"

SHIPPED_FP_MODEL = Path(__file__).resolve().parent / "assets" / "models" / "resnet20-fp"
QUICKSTART_DIR = Path("runs") / "quickstart"
QUICKSTART_FP_EPOCHS = 8
QUICKSTART_QAT_EPOCHS = 3
QUICKSTART_FP_LR = 0.1
QUICKSTART_QAT_LR = 0.01

# What `pege bench tune` chose on the validation split (benchmarks/tuning.md), as `pege train` flags. The
# shared QAT recipe is the one under which STE trains soundly; it reaches every estimator alike (the
# benchmark's STE/EWGS/PEGE runs and the quickstart). PEGE's own settings reach PEGE runs only.
QAT_RECIPE: tuple[str, ...] = ("--scale-init", "mse", "--quantizer-lr-scale", "1")
PEGE_TUNED: tuple[str, ...] = ("--lambda", "0.1")

# Hidden test hooks (not part of the CLI): a directory where every rank writes a hash of its final
# parameters, and a sleep per optimizer step so a test can kill a run mid-epoch.
_HASH_DIR_ENV = "PEGE_TRAIN_PARAM_HASH_DIR"
_STEP_SLEEP_ENV = "PEGE_TRAIN_STEP_SLEEP"


# --------------------------------------------------------------------------------------------- model


def is_quantized(model: nn.Module) -> bool:
    """True when the model holds PEGE quant layers."""
    return any(isinstance(m, (QuantLayer, FakeQuantizer)) for m in model.modules())


def check_checkpoint(source: str | os.PathLike) -> str:
    """Fail early (FileNotFoundError) when ``source`` is a local path that is not a saved model;
    a string that can only be a Hub id ("owner/name") passes through."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"--model {text!r} is a folder but not a model checkpoint: it has no config.json "
                "(expected a folder written by save_pretrained, or a Hub model id)")
        return str(path)
    if path.exists():
        raise FileNotFoundError(f"--model {text!r} is a file; expected a checkpoint folder (with config.json) "
                                "or a Hub model id")
    looks_like_path = (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
                       or "\\" in text or text.endswith((".json", ".safetensors", ".bin")))
    if looks_like_path:
        raise FileNotFoundError(f"--model {text!r} does not exist (expected a checkpoint folder with "
                                "config.json, or a Hub model id such as owner/name)")
    return text


def load_model(source: str | os.PathLike, quant_config: PEGEConfig | None = None,
               num_labels: int | None = None, **kwargs) -> nn.Module:
    """Load a saved image classifier (local folder or Hub id), float or PEGE; with ``quant_config``, a
    float checkpoint comes back ready for QAT.

    This is the ONE place where train/eval build a model from a checkpoint; the loading itself is
    ``pege_hf.from_pretrained`` (registers quant_method "pege" first and refuses a float result for a
    PEGE checkpoint). ``num_labels`` different from the checkpoint's re-initialises the head.
    """
    from .hf.loading import from_pretrained

    source = check_checkpoint(source)
    if num_labels is not None:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    return from_pretrained(source, quantization_config=quant_config, **kwargs)


def build_model(arch: str, class_names: list[str], num_channels: int = 3) -> nn.Module:
    """A freshly initialised CIFAR model whose head matches ``class_names``."""
    register_cifar_models()
    if arch.startswith("resnet"):
        return cifar_resnet(int(arch[len("resnet"):]), labels=class_names, num_channels=num_channels)
    if arch == "vgg_small":
        return cifar_vgg_small(labels=class_names, num_channels=num_channels)
    raise ValueError(f"--arch must be one of {', '.join(ARCHS)}; got {arch!r}")


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> None:
    """Initialise every fake quantizer that has not seen data yet (activation step sizes) with one
    eval-mode forward. Under DDP every rank must call it (the initialisation all-reduces)."""
    if not any(isinstance(m, FakeQuantizer) and not m.quantizer.is_initialized() for m in model.modules()):
        return
    was_training = model.training
    model.eval()
    model(pixel_values=images)
    model.train(was_training)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches) -> int:
    """Replace every BatchNorm's running mean and variance by their plain average over ``batches``
    (inputs the model takes as ``pixel_values``), run with the evaluation forward everywhere else (fake
    quantizers fully quantized, no masks). The moving average training leaves behind tracks the last
    few dozen steps; in a quantized network whose codes still flip it can be off by enough to matter
    ("BN re-estimation", Nagel et al. 2022, arXiv 2203.11086; on this project's CIFAR-10 models it moved
    top-1 both ways, benchmarks/accuracy.md). Returns the number of batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    seen = 0
    try:
        for pixels in batches:
            model(pixel_values=pixels)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if norms and not seen:
        raise ValueError("BatchNorm re-estimation got no batches (the running statistics were reset)")
    return seen


def augmented_batches(images: torch.Tensor, n_batches: int, batch_size: int, *, seed: int = 0,
                      mean=CIFAR10_MEAN, std=CIFAR10_STD, device=None):
    """``n_batches`` normalised batches of ``images`` (uint8) in a seeded random order, with the
    training augmentation (random crop and flip): the data the BatchNorm statistics are re-estimated on."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    for i in range(min(n_batches, math.ceil(len(images) / batch_size))):
        batch = images[order[i * batch_size:(i + 1) * batch_size]]
        batch = random_crop_flip(batch, generator=generator)
        yield normalize(batch.to(device) if device is not None else batch, mean, std)


# --------------------------------------------------------------------------------------------- data


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A deterministic shuffle: the order of epoch e is randperm(n) seeded with (seed, e), the same on
    every rank and in a resumed run."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


def _batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return (((seed * 10_007 + epoch) * 1_000_003 + batch) * 4099 + rank) % (2**62)


def check_labels(labels: torch.Tensor, num_labels: int, split: str) -> None:
    """ValueError when a label does not fit the model's head."""
    if len(labels) == 0:
        raise ValueError(f"the {split} split is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_labels:
        raise ValueError(
            f"the {split} split has labels in [{low}, {high}] but the model's head has {num_labels} "
            f"outputs (model.config.num_labels = {num_labels}): labels must lie in [0, {num_labels - 1}]. "
            "Use a model trained on this label set, or check --label-column.")


def _model_input_spec(model: nn.Module) -> tuple[int, int]:
    config = model.config
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = getattr(config, "image_size", 32) or 32
    return channels, int(size if isinstance(size, int) else size[0])


def _main_first(accelerator, fn):
    """fn() on the local main process first (datasets' cache), then on the others; an error on the main
    process is raised everywhere instead of leaving the others waiting at the barrier."""
    result, error = None, None
    if accelerator.is_local_main_process:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the barrier
            error = err
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        result = fn()
    if error is not None:
        raise error
    return result


# --------------------------------------------------------------------------------------------- eval


def _acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, mean=CIFAR10_MEAN, std=CIFAR10_STD,
             desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy, top-5 accuracy and mean cross-entropy over ``loader`` (uint8 image batches),
    exact under data parallelism: per-sample results are gathered with gather_for_metrics, which drops
    the duplicates padding the last batch. Accuracies are fractions in [0, 1]."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=_acc_dtype(accelerator.device), device=accelerator.device)
    count = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        logits = model(pixel_values=normalize(images, mean, std)).logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        per_sample = torch.stack([
            F.cross_entropy(logits, labels, reduction="none"),
            (top[:, 0] == labels).float(),
            (top == labels[:, None]).any(dim=-1).float(),
        ], dim=1)
        per_sample = accelerator.gather_for_metrics(per_sample)
        totals += per_sample.sum(dim=0).to(totals.dtype)
        count += per_sample.shape[0]
    model.train(was_training)
    loss, correct1, correct5 = totals.tolist()
    n = max(count, 1)
    return {"accuracy": correct1 / n, "top5": correct5 / n, "loss": loss / n, "samples": count}


def sync_buffers(accelerator, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, quantizer ranges) to every rank, so the
    distributed evaluation runs exactly the model rank 0 saves."""
    if accelerator.num_processes <= 1 or not torch.distributed.is_initialized():
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        if buffer.dtype == torch.bool:
            as_int = buffer.to(torch.uint8)
            torch.distributed.broadcast(as_int, src=0)
            buffer.copy_(as_int.bool())
        else:
            torch.distributed.broadcast(buffer, src=0)


# --------------------------------------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, lr: float, weight_decay: float, quantizer_lr: float) -> list[dict]:
    """Weights (conv/linear, ndim > 1): weight decay. BN parameters and biases: none. Quantizer
    parameters (names containing "quantizer": step sizes, clip values): their own lr, no decay."""
    decay, no_decay, quant = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "quantizer" in name:
            quant.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "bn_bias"},
        {"params": quant, "lr": quantizer_lr, "weight_decay": 0.0, "name": "quantizer"},
    ]
    return [g for g in groups if g["params"]]


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base lr at optimizer step t: linear warmup, then cosine / linear / constant."""

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def make_optimizer(model: nn.Module, args, quantized: bool):
    lr = args.lr
    groups = param_groups(model, lr, args.weight_decay, lr * args.quantizer_lr_scale if quantized else lr)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.momentum > 0)
    if args.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"--optimizer must be 'sgd' or 'adam'; got {args.optimizer!r}")


# --------------------------------------------------------------------------------------------- tracking


class JSONLTracker(GeneralTracker):
    """An accelerate tracker writing one JSON line per log call into ``path`` (appending, so a resumed
    run keeps what the interrupted one logged)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict):
        self._write({"event": "config", "time": time.time(), "config": values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, "time": time.time(), **values})


def rewind_jsonl(path: Path, step: int | None) -> None:
    """Drop the records a cut-off run logged after ``step`` (the checkpoint it resumes from), so the
    resumed run's log reads as one run; records without a step (the config event) stay. ``step=None``
    (no checkpoint to resume from: the run starts over) drops them all."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [] if step is None else [
        line for line in lines if not line.strip() or (json.loads(line).get("step") or 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _flat_hparams(values: dict) -> dict:
    """Tracker-friendly hyperparameters: scalars and strings only."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in _flat_hparams(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        else:
            out[key] = str(value)
    return out


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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


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
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # an end-of-epoch checkpoint at the step of a step checkpoint: newer wins
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            _remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


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


def _param_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- arguments


def _a_bits(text: str):
    if text.lower() in ("none", "fp", "32", "float"):
        return "none"  # float activations (None in PEGEConfig); None itself means "not given"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit width or 'none', got {text!r}") from None


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


def add_column_and_split_args(group) -> None:
    """The dataset's column and split options, shared by `pege train` and `pege eval`."""
    group.add_argument("--image-column", default=None, metavar="NAME", help="image column (default: found from the features/names)")
    group.add_argument("--label-column", default=None, metavar="NAME", help="label column (default: found from the features/names)")
    group.add_argument("--train-split", default=None, metavar="NAME", help="training split (default: train)")
    group.add_argument("--test-split", default=None, metavar="NAME",
                       help="evaluation split (default: test, else validation, else 10%% carved off train)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Train an image classifier in full precision or with quantization-aware training (PEGE, STE, EWGS).\n\n"
        "With no --model, --dataset or --estimator this is the quickstart: train a full-precision CIFAR ResNet-20 on\n"
        "the shipped CIFAR-10 sample (unless a shipped FP model exists), then a short W2A2 PEGE QAT from it,\n"
        "and print both accuracies (a few minutes on 2 CPU cores).\n\n"
        "`pege train ARGS` runs one process; `accelerate launch [launch options] -m pege_hf.train ARGS` runs the\n"
        "same code on several GPUs, machines or CPU processes (see the examples below). --batch-size is per\n"
        "process. Outputs: the final model (save_pretrained; packed low-bit for QAT), best/, metrics.json,\n"
        "metrics.jsonl, logs/ (TensorBoard), checkpoints/step_N/ and README.md (model card); diverged.json instead\n"
        "of the model when the loss turns NaN.")
    parser.epilog = (
        "examples:\n"
        "  pege train\n"
        "  pege train --estimator none --arch resnet20 --dataset ../shared/data/cifar10 --epochs 200 "
        "--output-dir runs/fp\n"
        "  pege train --model runs/fp --dataset ../shared/data/cifar10 --w-bits 2 --a-bits 2 --epochs 30\n"
        "  pege train --model runs/fp --dataset ../shared/data/cifar10 --checkpointing-steps 500 --resume\n\n"
        "distributed (run `accelerate config` once, or pass the launch options):\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m pege_hf.train --model runs/fp --dataset ...\n"
        "  # 2 machines x 8 GPUs; on each machine, with its own --machine_rank (0, 1); shared filesystem:\n"
        "  accelerate launch --multi_gpu --num_processes 16 --num_machines 2 --machine_rank 0 \\\n"
        "      --main_process_ip 10.0.0.1 --main_process_port 29500 -m pege_hf.train --model ... --dataset ...\n"
        "  # 2 data-parallel CPU processes (gloo):\n"
        "  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\\n"
        "      --mixed_precision no --dynamo_backend no -m pege_hf.train ...\n")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="float checkpoint to start from (a save_pretrained folder or a Hub id); without it a "
                        "fresh --arch model is trained from scratch")
    g.add_argument("--arch", default="resnet20", choices=ARCHS,
                   help="architecture for training from scratch (default resnet20; ignored with --model)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, metavar="SOURCE",
                   help="a Hub dataset id (uoft-cs/cifar10), a parquet file or folder (../shared/data/cifar10), "
                        "a save_to_disk folder or an imagefolder (default: the shipped CIFAR-10 sample)")
    add_column_and_split_args(g)
    g.add_argument("--max-train", type=int, default=None, metavar="N", help="train on a random subset of N images")
    g.add_argument("--max-test", type=int, default=None, metavar="N", help="evaluate on a random subset of N images")

    g = parser.add_argument_group("quantization (PEGEConfig)")
    g.add_argument("--estimator", default=None, metavar="{pege,ste,ewgs,none}",
                   help="gradient estimator; 'none' trains in full precision (default: pege with --model, "
                        "none without)")
    g.add_argument("--w-bits", type=int, default=None, metavar="B", help="weight bits, 2..8 (default 4; quickstart 2)")
    g.add_argument("--a-bits", type=_a_bits, default=None, metavar="B",
                   help="activation bits, 2..8, or 'none' for float activations (default 4; quickstart 2)")
    d = PEGE_DEFAULTS
    g.add_argument("--w-quantizer", metavar="Q", help=f"weight forward quantizer: lsq | minmax (default {d['w_quantizer']})")
    g.add_argument("--a-quantizer", metavar="Q", help=f"activation forward quantizer: lsq | minmax | pact (default {d['a_quantizer']})")
    g.add_argument("--scale-init", metavar="INIT", help=f"step-size initialisation: lsq | mse (default {d['scale_init']})")
    g.add_argument("--curriculum", metavar="NAME", help=f"replacement schedule r(t): log | linear | cosine | instant (default {d['curriculum']})")
    g.add_argument("--alpha", metavar="A", type=float, help=f"curvature of the log curriculum (default {d['alpha']})")
    g.add_argument("--ramp-fraction", metavar="F", type=float,
                   help=f"share of training over which r(t) ramps to 1 (default {d['ramp_fraction']})")
    g.add_argument("--mask", dest="w_mask", metavar="POLICY", help=f"weight mask policy: progressive | bernoulli | error (default {d['w_mask']})")
    g.add_argument("--a-mask", metavar="POLICY", help=f"activation mask policy (default {d['a_mask']})")
    g.add_argument("--lambda", dest="discretization_lambda", type=float, metavar="L",
                   help=f"weight of the discretization-error term (default {d['discretization_lambda']})")
    g.add_argument("--lambda-schedule", metavar="NAME",
                   help=f"constant | follow (lambda * r(t)) | ramp (lambda while r(t) < 1, then 0) "
                        f"(default {d['lambda_schedule']})")
    g.add_argument("--discretization-scope", metavar="SCOPE",
                   help=f"D over 'all' elements or only 'replaced' ones (default {d['discretization_scope']})")
    g.add_argument("--discretization-reduction", metavar="R",
                   help=f"D as the 'mean' or the 'sum' over a tensor's elements (default {d['discretization_reduction']})")
    g.add_argument("--ewgs-delta", metavar="D", type=float, help=f"EWGS delta (default {d['ewgs_delta']})")
    g.add_argument("--lambda-start", metavar="L", type=float, help=f"lambda at the start of the log/exp schedules (default {d['lambda_start']})")
    g.add_argument("--discretization-form", metavar="F", help=f"scaled | plain (default {d['discretization_form']})")
    g.add_argument("--discretization-target", metavar="T", help=f"latent | step_size | both (default {d['discretization_target']})")
    g.add_argument("--quantize-stem", action="store_true", help="quantize the first layer too")
    g.add_argument("--quantize-head", action="store_true", help="quantize the classifier too")
    g.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="NAME",
                   help="more module names to keep in full precision")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None,
                   help=f"epochs (default 20; quickstart: {QUICKSTART_FP_EPOCHS} FP + {QUICKSTART_QAT_EPOCHS} QAT)")
    g.add_argument("--batch-size", type=int, default=128, metavar="N", help="batch size per process (default 128)")
    g.add_argument("--eval-batch-size", type=int, default=256, metavar="N", help="evaluation batch size per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"),
                   help="sgd (momentum, Nesterov) or adam (AdamW) (default sgd)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: sgd 0.1 from scratch / 0.01 from --model; adam 1e-3 / 1e-4)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="on conv/linear weights only, never on BN, biases or quantizer scales (default 5e-4)")
    g.add_argument("--quantizer-lr-scale", type=float, default=0.1,
                   help="lr of quantizer parameters (step sizes) relative to --lr (default 0.1)")
    g.add_argument("--scheduler", default="cosine", choices=("cosine", "linear", "constant"),
                   help="lr schedule after the warmup (default cosine)")
    g.add_argument("--warmup-ratio", type=float, default=0.05,
                   help="share of the optimizer steps with linear lr warmup (default 0.05)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: no clipping)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (default 0)")
    g.add_argument("--reestimate-bn", type=int, default=0, metavar="N",
                   help="after the last epoch, replace the BatchNorm moving averages by a plain average over N "
                        "augmented training batches, before saving and the final evaluation (default 0: off)")
    g.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: as configured for accelerate (no)")

    g = parser.add_argument_group("run")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where the model, metrics.json, logs and checkpoints go (default runs/<model>-<quant>; "
                        "quickstart runs/quickstart)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order, augmentation and masks")
    g.add_argument("--checkpointing-steps", type=_checkpointing_steps, default=None, metavar="N|epoch",
                   help="save a resumable checkpoint every N optimizer steps (or every epoch)")
    g.add_argument("--checkpoints-total-limit", type=int, default=2, metavar="K", help="checkpoints to keep (default 2)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --output-dir (fresh start if none)")
    g.add_argument("--resume-from", default=None, metavar="PATH", help="continue from this checkpoint folder")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --output-dir that holds checkpoints of an earlier run (they are deleted)")
    g.add_argument("--log-every", type=int, default=10, metavar="N", help="log train loss/lr every N optimizer steps")
    g.add_argument("--num-workers", type=int, default=0, metavar="N", help="DataLoader workers (data is in memory; 0 is fine)")
    g.add_argument("--no-tensorboard", action="store_true", help="do not log to TensorBoard")
    g.add_argument("--compile-kernels", action="store_true",
                   help="run the quantizers' elementwise kernels through torch.compile (faster QAT steps; "
                        "the first step compiles, ~30 s on 2 CPU cores)")
    g.add_argument("--channels-last", action="store_true",
                   help="keep the model's 4-D weights in channels-last memory format, so convolutions run "
                        "channels-last (faster on CPUs and on GPUs with --mixed-precision; results equal up to "
                        "float rounding)")


# --------------------------------------------------------------------------------------------- training


def build_quant_config(args) -> PEGEConfig | None:
    """The PEGEConfig of the run (validated here, before anything else), or None for full precision."""
    estimator = args.estimator if args.estimator is not None else ("pege" if args.model else "none")
    if estimator == "none":
        return None
    if not args.model:
        raise ValueError(f"--estimator {estimator} is quantization-aware training, which starts from a trained float "
                         "checkpoint: pass --model PATH_OR_ID (or --estimator none to train in full precision)")
    kwargs = dict(estimator=estimator, skip_stem=not args.quantize_stem, skip_head=not args.quantize_head,
                  modules_to_not_convert=args.modules_to_not_convert, seed=args.seed)
    kwargs.update({name: getattr(args, name) for name in CLI_CONFIG_FIELDS if getattr(args, name) is not None})
    if args.w_bits is not None:
        kwargs["w_bits"] = args.w_bits
    if args.a_bits is not None:
        kwargs["a_bits"] = None if args.a_bits == "none" else args.a_bits
    return PEGEConfig(**kwargs)


def _default_output_dir(args, quant_config) -> Path:
    base = Path(args.model).name if args.model else args.arch
    tag = quant_config.name.lower() if quant_config is not None else "fp"
    return Path("runs") / f"{base}-{tag}"


def _prepare_output_dir(output_dir: Path, args) -> Path | None:
    """Checks before training; returns the checkpoint to resume from (or None)."""
    if args.resume_from:
        path = Path(args.resume_from)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume-from {args.resume_from!r} is not a complete checkpoint "
                                    f"(no {STATE_FILE} in it)")
        return path
    existing = complete_checkpoints(output_dir)
    if args.resume:
        return existing[-1] if existing else None
    if existing or (output_dir / "metrics.json").exists():
        if not args.overwrite:
            raise FileExistsError(
                f"--output-dir {str(output_dir)!r} already holds a run (checkpoints or metrics.json); pass --resume "
                "to continue it, --overwrite to start over, or choose another --output-dir")
    return None


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; ``output_dir/diverged.json`` records where."""


def lock_output_dir(output_dir: Path):
    """Hold an exclusive lock on ``output_dir`` while this process trains into it, so a second training
    into the same folder (a second runner, a double launch) stops with a clear error instead of
    interleaving checkpoints. Returns the open lock file (the lock lives as long as it stays open), or
    None where the OS has no flock."""
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


def _clear_previous_run(output_dir: Path) -> None:
    for name in (CHECKPOINTS_DIR, "best", "logs"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in ("metrics.json", "metrics.jsonl", DIVERGED_FILE):
        (output_dir / name).unlink(missing_ok=True)


def train(args) -> dict[str, Any]:
    """Run one training (full precision or QAT) as described by ``args`` (the CLI namespace); returns
    the metrics dict that is also written to output_dir/metrics.json."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
    from tqdm.auto import tqdm

    # ---- every check that can fail on bad input, before anything trains
    quant_config = build_quant_config(args)
    if quant_config is not None and getattr(args, "compile_kernels", False):
        from .quant.kernels import use_compiled_kernels

        use_compiled_kernels(True)
    if args.model is not None:
        check_checkpoint(args.model)
    if args.dataset is None:
        args.dataset = DEFAULT_DATASET
    for flag in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1; got {value}")
    if args.reestimate_bn < 0:
        raise ValueError(f"--reestimate-bn must be >= 0; got {args.reestimate_bn}")
    if args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints-total-limit must be >= 1; got {args.checkpoints_total_limit}")
    epochs = args.epochs or 20
    if args.lr is None:
        args.lr = {("sgd", False): 0.1, ("sgd", True): 0.01, ("adam", False): 1e-3, ("adam", True): 1e-4}[
            (args.optimizer, args.model is not None)]
    output_dir = Path(args.output_dir) if args.output_dir else _default_output_dir(args, quant_config)
    resume_path = _prepare_output_dir(output_dir, args)

    log_with: list = [JSONLTracker(output_dir / "metrics.jsonl")]
    if is_tensorboard_available() and not args.no_tensorboard:
        log_with.append("tensorboard")
    kwargs_handlers = []
    if quant_config is not None and quant_config.estimator == "pege":
        # at r = 0 a step size may take no part in the graph; DDP must not wait for its gradient
        kwargs_handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs_handlers,
    )
    main_proc = accelerator.is_main_process
    lock = lock_output_dir(output_dir) if main_proc else None  # noqa: F841 (held until the process ends)
    if main_proc:
        if args.overwrite and resume_path is None:
            _clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for pattern in (".tmp_step_*", ".del_step_*"):  # a save or a delete cut off by a kill
            for stale in (output_dir / CHECKPOINTS_DIR).glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
    set_seed(args.seed)

    # ---- data
    data = _main_first(accelerator, lambda: load_image_dataset(
        args.dataset, image_column=args.image_column, label_column=args.label_column,
        train_split=args.train_split, test_split=args.test_split, seed=args.seed,
        max_train=args.max_train, max_test=args.max_test))

    # ---- model
    if args.model is not None:
        model = load_model(args.model, quant_config)
    else:
        model = build_model(args.arch, data.class_names)
    num_labels = int(model.config.num_labels)
    channels, image_size = _model_input_spec(model)

    x_train, y_train = to_tensors(data.train, data.image_column, data.label_column, image_size, channels,
                                  progress=None if main_proc else False)
    x_test, y_test = to_tensors(data.test, data.image_column, data.label_column, image_size, channels,
                                progress=None if main_proc else False)
    check_labels(y_train, num_labels, "train")
    check_labels(y_test, num_labels, "test")
    model_names = [str(v) for _, v in sorted((getattr(model.config, "id2label", None) or {}).items())]
    if args.model is not None and model_names and model_names != data.class_names[:len(model_names)]:
        logger.warning("the model's labels %s differ from the data set's class names %s", model_names[:10],
                       data.class_names[:10])

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if channels == 3 else ((0.5,), (0.25,))
    device = accelerator.device
    model.to(device)
    if getattr(args, "channels_last", False):  # a conv follows its weight's format: the inputs need not change
        model.to(memory_format=torch.channels_last)
    quantized = quant_config is not None
    if quantized:
        calibrate(model, normalize(x_train[: args.batch_size].to(device), mean, std))

    sampler = EpochShuffleSampler(len(x_train), args.seed)
    pin = device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        TensorImageDataset(x_train, y_train), batch_size=args.batch_size, sampler=sampler,
        num_workers=args.num_workers, pin_memory=pin)
    test_loader = torch.utils.data.DataLoader(
        TensorImageDataset(x_test, y_test), batch_size=args.eval_batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=pin)

    train_loader, test_loader = accelerator.prepare(train_loader, test_loader)
    batches_per_epoch = len(train_loader)  # per process, after accelerate's sharding
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = epochs * steps_per_epoch
    warmup = int(round(args.warmup_ratio * total_steps))
    optimizer = make_optimizer(model, args, quantized)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.scheduler, warmup, total_steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model = accelerator.unwrap_model(model)

    # ---- state (fresh or resumed)
    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "best_accuracy": None, "best_epoch": None,
             "history": [], "elapsed_s": 0.0, "epoch_sums": [0.0, 0.0, 0.0],
             "total_steps": total_steps, "batches_per_epoch": batches_per_epoch,
             "world_size": accelerator.num_processes, "batch_size": args.batch_size,
             "gradient_accumulation_steps": args.gradient_accumulation_steps}
    if resume_path is not None:
        saved = json.loads((Path(resume_path) / STATE_FILE).read_text())
        for key in ("total_steps", "batches_per_epoch", "world_size", "batch_size", "gradient_accumulation_steps"):
            if saved.get(key) != state[key]:
                raise ValueError(
                    f"cannot resume from {str(resume_path)!r}: it was saved with {key}={saved.get(key)} but this run "
                    f"has {key}={state[key]}; resume with the same data, --epochs, --batch-size, "
                    "--gradient-accumulation-steps and number of processes")
        accelerator.load_state(str(resume_path))
        state.update(saved)
        if main_proc:
            rewind_jsonl(output_dir / "metrics.jsonl", state["global_step"])
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, state["global_step"],
                        state["epoch"], state["batch_in_epoch"])
    elif args.resume and main_proc:  # cut off before its first checkpoint: the run starts over, so does its log
        rewind_jsonl(output_dir / "metrics.jsonl", step=None)

    run_info = {
        "base_model": args.model, "arch": None if args.model else args.arch, "dataset": str(args.dataset),
        "quantization_config": quant_config.to_dict() if quant_config is not None else None,
        "epochs": epochs, "batch_size": args.batch_size, "world_size": accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer": args.optimizer,
        "lr": args.lr, "quantizer_lr_scale": args.quantizer_lr_scale if quantized else None,
        "weight_decay": args.weight_decay, "scheduler": args.scheduler,
        "warmup_steps": warmup, "seed": args.seed, "total_steps": total_steps,
        "max_train": args.max_train, "max_test": args.max_test,
        "train_split": args.train_split, "test_split": args.test_split,
        "image_column": data.image_column, "label_column": data.label_column,
    }
    accelerator.init_trackers("pege", config=_flat_hparams(run_info))
    if state["global_step"] == 0 and state["batch_in_epoch"] == 0 and main_proc:
        print(f"training {'QAT ' + quant_config.name if quantized else 'full precision'}: "
              f"{len(x_train)} train / {len(x_test)} test images, {epochs} epochs x {steps_per_epoch} steps, "
              f"{accelerator.num_processes} process(es) on {device.type} -> {output_dir}", flush=True)

    step_sleep = float(os.environ.get(_STEP_SLEEP_ENV, "0") or 0)
    generator = torch.Generator(device=device)
    rank = accelerator.process_index
    acc_dtype = _acc_dtype(device)
    sums = torch.zeros(3, dtype=acc_dtype, device=device)  # loss sum, correct, samples (this rank)
    if rank == 0:
        sums += torch.tensor(state["epoch_sums"], dtype=acc_dtype, device=device)
    log_loss = torch.zeros((), dtype=acc_dtype, device=device)
    log_batches = 0
    data_time = step_time = 0.0
    run_start = time.time()

    def ratio() -> float | None:
        fq = next((m for m in raw_model.modules() if isinstance(m, FakeQuantizer)), None)
        if fq is None:
            return None
        return float(getattr(fq, "ratio", 1.0)) if getattr(fq, "estimator", None) == "pege" else 1.0

    def checkpoint_state(epoch, batch_in_epoch, epoch_sums) -> dict:
        return {**state, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "epoch_sums": epoch_sums,
                "elapsed_s": state["elapsed_s"] + time.time() - run_start}

    progress_bar = tqdm(total=total_steps, initial=state["global_step"], desc="train", unit="step",
                        disable=not main_proc)
    global_step = state["global_step"]
    previous_codes = None  # weight codes at the last epoch end, for quant/weight_codes_changed
    for epoch in range(state["epoch"], epochs):
        model.train()
        skip = state["batch_in_epoch"] if epoch == state["epoch"] else 0
        train_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        if not skip:
            sums.zero_()
        batch_index = skip
        tick = time.perf_counter()
        for images, labels in loader:
            data_time += time.perf_counter() - tick
            batch_index += 1
            with accelerator.accumulate(model):
                if quantized:
                    set_progress(raw_model, min(1.0, global_step / total_steps))
                generator.manual_seed(_batch_seed(args.seed, epoch, batch_index, rank))
                pixels = normalize(random_crop_flip(images, generator=generator), mean, std)
                logits = model(pixel_values=pixels).logits.float()
                loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                detached = loss.detach().to(acc_dtype)
                sums += torch.stack([detached * len(labels), (logits.argmax(-1) == labels).sum().to(acc_dtype),
                                     torch.tensor(float(len(labels)), dtype=acc_dtype, device=device)])
                log_loss += detached
                log_batches += 1
            if accelerator.sync_gradients:
                global_step += 1
                state["global_step"] = global_step
                progress_bar.update(1)
                if step_sleep:
                    time.sleep(step_sleep)
                if global_step % args.log_every == 0 or global_step == total_steps:
                    mean_loss = accelerator.reduce(log_loss / max(log_batches, 1), reduction="mean").item()
                    record = {"train/loss": mean_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch,
                              "progress": min(1.0, global_step / total_steps)}
                    r = ratio()
                    if r is not None:
                        record["quant/replacement_ratio"] = r
                    accelerator.log(record, step=global_step)
                    progress_bar.set_postfix(loss=f"{mean_loss:.3f}")
                    log_loss.zero_()
                    log_batches = 0
                    if not math.isfinite(mean_loss):  # the same reduced value on every rank: all stop together
                        progress_bar.close()
                        if main_proc:
                            (output_dir / DIVERGED_FILE).write_text(json.dumps(
                                {"step": global_step, "epoch": epoch, "loss": str(mean_loss),
                                 "command": list(sys.argv)}, indent=2) + "\n")
                        accelerator.end_training()
                        raise TrainingDiverged(
                            f"training diverged: the mean loss up to step {global_step} is {mean_loss} (recorded in "
                            f"{output_dir / DIVERGED_FILE}); try a lower --lr or --lambda, or --max-grad-norm")
                if isinstance(args.checkpointing_steps, int) and global_step % args.checkpointing_steps == 0:
                    reduced = accelerator.reduce(sums.clone(), reduction="sum").tolist()
                    save_checkpoint(accelerator, output_dir, checkpoint_state(epoch, batch_index, reduced),
                                    args.checkpoints_total_limit)
            now = time.perf_counter()
            step_time += now - tick
            tick = now

        # ---- end of epoch: train statistics, evaluation, best model
        loss_sum, correct, seen = accelerator.reduce(sums.clone(), reduction="sum").tolist()
        sync_buffers(accelerator, model)
        metrics = evaluate(accelerator, model, test_loader, mean=mean, std=std, desc=f"eval epoch {epoch + 1}")
        entry = {"epoch": epoch + 1, "step": global_step, "train_loss": loss_sum / max(seen, 1),
                 "train_accuracy": correct / max(seen, 1), "accuracy": metrics["accuracy"],
                 "top5": metrics["top5"], "loss": metrics["loss"], "lr": scheduler.get_last_lr()[0],
                 "time_s": state["elapsed_s"] + time.time() - run_start}
        grid = {}
        if quantized:  # where the latent weights sit on their grid, and how many codes this epoch changed
            codes, positions = weight_codes_and_positions(raw_model)
            grid["quant/weight_grid_distance"] = summarize(positions)["mean_distance"]
            if previous_codes is not None:
                grid["quant/weight_codes_changed"] = codes_changed(previous_codes, codes)
            previous_codes = codes
        state["history"].append(entry)
        accelerator.log({f"eval/{k}": entry[k] for k in ("accuracy", "top5", "loss")}
                        | {"train/epoch_loss": entry["train_loss"], "train/epoch_accuracy": entry["train_accuracy"],
                           "epoch": epoch + 1} | grid, step=global_step)
        if main_proc:
            progress_bar.write(f"epoch {epoch + 1}/{epochs}: train loss {entry['train_loss']:.4f}, "
                               f"test accuracy {100 * entry['accuracy']:.2f}% (top-5 {100 * entry['top5']:.2f}%), "
                               f"test loss {entry['loss']:.4f}")
        if state["best_accuracy"] is None or entry["accuracy"] > state["best_accuracy"]:
            state["best_accuracy"], state["best_epoch"] = entry["accuracy"], epoch + 1
            raw_model.save_pretrained(output_dir / "best", is_main_process=main_proc, save_function=accelerator.save)
        state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, checkpoint_state(epoch + 1, 0, [0.0, 0.0, 0.0]),
                            args.checkpoints_total_limit)
    progress_bar.close()

    # ---- the final model, metrics.json, the model card
    accelerator.wait_for_everyone()
    final = state["history"][-1] if state["history"] else None  # none: resumed a finished run without its history
    bn = None
    if args.reestimate_bn:  # every rank draws the same batches, so every rank ends with the same statistics
        seen = reestimate_batchnorm(raw_model, augmented_batches(x_train, args.reestimate_bn, args.batch_size,
                                                                 seed=args.seed, mean=mean, std=std, device=device))
        bn = {"batches": seen, "batch_size": args.batch_size, "seed": args.seed,
              "accuracy_before": final["accuracy"] if final else None}
        final = None
    raw_model.save_pretrained(output_dir, is_main_process=main_proc, save_function=accelerator.save)
    if final is None:
        sync_buffers(accelerator, model)
        final = evaluate(accelerator, model, test_loader, mean=mean, std=std)
    wall = state["elapsed_s"] + time.time() - run_start
    result = {
        "accuracy": final["accuracy"], "top5": final["top5"], "loss": final["loss"],
        "best_accuracy": state["best_accuracy"], "best_epoch": state["best_epoch"],
        "history": state["history"], "wall_time_s": wall, "steps": global_step, **run_info,
        "num_train": len(x_train), "num_test": len(x_test), "class_names": data.class_names,
        "command": list(sys.argv), "resumed_from": str(resume_path) if resume_path else None, "bn_reestimation": bn,
        "timing": {"data_s": data_time, "loop_s": step_time,
                   "data_share": data_time / step_time if step_time else None},
        "device": device.type, "mixed_precision": accelerator.mixed_precision,
        "torch": torch.__version__, "pege_hf": _version(),
    }
    if os.environ.get(_HASH_DIR_ENV):
        hash_dir = Path(os.environ[_HASH_DIR_ENV])
        hash_dir.mkdir(parents=True, exist_ok=True)
        (hash_dir / f"rank{rank}.txt").write_text(_param_hash(raw_model))
    if main_proc:
        (output_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        _render_model_card(output_dir)
        print(f"done: test accuracy {100 * result['accuracy']:.2f}% (top-5 {100 * result['top5']:.2f}%), "
              f"{global_step} steps in {wall:.0f} s -> {output_dir}", flush=True)
    accelerator.end_training()
    return result


def _version() -> str:
    from . import __version__

    return __version__


def _render_model_card(output_dir: Path) -> None:
    try:
        from . import hub
    except ImportError:
        hub = None
    render = getattr(hub, "render_model_card", None)
    if render is None:
        print("model card: skipped (pege_hf.hub.render_model_card is not available)", flush=True)
        return
    render(output_dir)


# --------------------------------------------------------------------------------------------- quickstart


def _namespace(argv: tuple[str, ...] = (), **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(list(argv))
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _reusable_quickstart_fp(path: Path, args) -> bool:
    """An FP model from an earlier quickstart with the same recipe (data subset, epochs, seed)."""
    if not (path / "metrics.json").is_file() or not (path / "config.json").is_file():
        return False
    try:
        saved = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (saved.get("dataset") == DEFAULT_DATASET and saved.get("epochs") == QUICKSTART_FP_EPOCHS
            and saved.get("seed") == args.seed and saved.get("max_train") == args.max_train
            and saved.get("max_test") == args.max_test and saved.get("batch_size") == args.batch_size)


def quickstart(args) -> int:
    """FP ResNet-20 (shipped, or trained here on the shipped sample), then W2A2 PEGE QAT from it with the
    benchmark's tuned recipe (QAT_RECIPE, PEGE_TUNED)."""
    from .evaluate import evaluate_checkpoint

    root = Path(args.output_dir) if args.output_dir else QUICKSTART_DIR
    common = dict(dataset=DEFAULT_DATASET, seed=args.seed, max_train=args.max_train, max_test=args.max_test,
                  batch_size=args.batch_size, mixed_precision=args.mixed_precision, no_tensorboard=args.no_tensorboard)
    started = time.time()
    if (SHIPPED_FP_MODEL / "config.json").is_file():
        fp_model = SHIPPED_FP_MODEL
        print(f"quickstart: using the shipped full-precision ResNet-20 {fp_model}", flush=True)
        fp_accuracy = evaluate_checkpoint(str(fp_model), DEFAULT_DATASET, max_test=args.max_test,
                                          seed=args.seed)["accuracy"]
    elif _reusable_quickstart_fp(root / "fp-resnet20", args):
        fp_model = root / "fp-resnet20"
        fp_accuracy = json.loads((fp_model / "metrics.json").read_text())["accuracy"]
        print(f"quickstart: reusing the full-precision ResNet-20 trained by an earlier quickstart in {fp_model} "
              "(delete it to train it again)", flush=True)
    else:
        fp_model = root / "fp-resnet20"
        print(f"quickstart: no shipped FP model at {SHIPPED_FP_MODEL}; training a full-precision ResNet-20 on the "
              f"shipped CIFAR-10 sample ({QUICKSTART_FP_EPOCHS} epochs) -> {fp_model}", flush=True)
        fp = train(_namespace(**common, estimator="none", arch="resnet20", epochs=QUICKSTART_FP_EPOCHS,
                              lr=QUICKSTART_FP_LR, output_dir=str(fp_model), overwrite=True))
        fp_accuracy = fp["accuracy"]
    estimator = args.estimator or "pege"
    tuned = QAT_RECIPE + (PEGE_TUNED if estimator == "pege" else ())
    qat_args = _namespace(tuned, **common, model=str(fp_model), estimator=estimator,
                          w_bits=args.w_bits or 2, a_bits=args.a_bits if args.a_bits is not None else 2,
                          epochs=args.epochs or QUICKSTART_QAT_EPOCHS, lr=args.lr or QUICKSTART_QAT_LR,
                          overwrite=True)
    tag = build_quant_config(qat_args).name
    qat_args.output_dir = str(root / tag.lower())
    print(f"quickstart: {tag} QAT from {fp_model} ({qat_args.epochs} epochs) -> {qat_args.output_dir}", flush=True)
    qat = train(qat_args)
    summary = {"fp_model": str(fp_model), "fp_accuracy": fp_accuracy, "quantized_model": qat_args.output_dir,
               "quantization": tag, "quantized_accuracy": qat["accuracy"], "wall_time_s": time.time() - started}
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nquickstart (shipped CIFAR-10 sample, {qat['num_test']} test images):\n"
          f"  full precision ResNet-20: {100 * fp_accuracy:.2f}%\n"
          f"  {tag:24s}: {100 * qat['accuracy']:.2f}%\n"
          f"  total {summary['wall_time_s']:.0f} s; models in {root}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- entry points


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars between the epoch lines
    if args.model is None and args.dataset is None and args.estimator is None:
        return quickstart(args)
    train(args)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pege_hf.train")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
