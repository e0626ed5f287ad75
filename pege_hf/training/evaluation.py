"""Evaluation: exact top-1 / top-5 / loss under data parallelism, quantizer calibration and BatchNorm
re-estimation, and ``evaluate_checkpoint`` (what ``pege eval`` runs)."""

from __future__ import annotations

import math
import os
from argparse import Namespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATASET, normalize, random_crop_flip
from ..quant.modules import FakeQuantizer
from ..sources import check_model_source
from .loaders import eval_loader, load_data, split_tensors
from .model import is_quantized, load_model, model_input_spec, normalization

BN_BATCH_SIZE = 128  # the training batch size of the benchmark runs


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums, except on devices without it (Apple MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """N x 3: cross-entropy, top-1 hit, top-5 hit."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return torch.stack([F.cross_entropy(logits, labels, reduction="none"), (top[:, 0] == labels).float(),
                        (top == labels[:, None]).any(dim=-1).float()], dim=1)


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader, *, mean=CIFAR10_MEAN, std=CIFAR10_STD,
             desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy, top-5 accuracy and mean cross-entropy over ``loader`` (uint8 image batches),
    exact under data parallelism: per-sample results are gathered with gather_for_metrics, which drops
    the duplicates padding the last batch. Accuracies are fractions in [0, 1]."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=acc_dtype(accelerator.device), device=accelerator.device)
    count = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        logits = model(pixel_values=normalize(images, mean, std)).logits.float()
        per_sample = accelerator.gather_for_metrics(_per_sample(logits, labels))
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


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor | None = None, **inputs) -> None:
    """Initialise every fake quantizer that has not seen data yet (activation step sizes) with one
    eval-mode forward on ``images`` (as pixel_values) or on ``inputs`` (input_ids=... for a language
    model). Under DDP every rank must call it (the initialisation all-reduces)."""
    if not any(isinstance(m, FakeQuantizer) and not m.quantizer.is_initialized() for m in model.modules()):
        return
    was_training = model.training
    model.eval()
    model(**({"pixel_values": images} if images is not None else inputs))
    model.train(was_training)


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics of every BatchNorm that tracks them (mean, variance, batch count), in module order."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches) -> int:
    """Replace every BatchNorm's running mean and variance by their plain average over ``batches``
    (inputs the model takes as ``pixel_values``), run with the evaluation forward everywhere else (fake
    quantizers fully quantized, no masks). The moving average training leaves behind tracks the last
    few dozen steps; in a quantized network whose codes still flip it can be off by enough to matter
    ("BN re-estimation", Nagel et al. 2022, arXiv 2203.11086). Returns the number of batches."""
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


def _reestimate_on_train(accelerator, net, data, batches: int, seed: int) -> dict:
    """BN re-estimation of a loaded checkpoint on ``batches`` augmented training batches (seeded)."""
    rows = data.train.shuffle(seed=seed).select(range(min(len(data.train), batches * BN_BATCH_SIZE)))
    images, _ = split_tensors(accelerator, rows, data, net, "train")
    mean, std = normalization(model_input_spec(net)[0])
    seen = reestimate_batchnorm(net.to(accelerator.device), augmented_batches(
        images, batches, BN_BATCH_SIZE, seed=seed, mean=mean, std=std, device=accelerator.device))
    return {"batches": seen, "batch_size": BN_BATCH_SIZE, "images": len(images), "seed": seed}


def evaluate_checkpoint(model: str | os.PathLike, dataset: str = DEFAULT_DATASET, *, split: str = "test",
                        image_column: str | None = None, label_column: str | None = None,
                        train_split: str | None = None, test_split: str | None = None,
                        max_test: int | None = None, seed: int = 0, batch_size: int = 256,
                        mixed_precision: str | None = None, reestimate_bn: int = 0) -> dict[str, Any]:
    """Accuracy, top-5 and loss of the checkpoint ``model`` on ``split`` ("test" or "train") of
    ``dataset``. ``max_test`` / ``seed`` pick the same evaluation subset a training run with
    ``--max-test`` / ``--seed`` used. Accuracies are fractions in [0, 1]. ``reestimate_bn`` > 0 first
    re-estimates the BatchNorm statistics on that many augmented training batches (the checkpoint on
    disk is left as it is)."""
    from accelerate import Accelerator

    check_evaluation_options(split, batch_size, reestimate_bn, max_test)
    check_model_source(model, "MODEL")
    accelerator = Accelerator(mixed_precision=mixed_precision)
    options = Namespace(dataset=dataset, image_column=image_column, label_column=label_column, seed=seed,
                        train_split=train_split, test_split=test_split, max_test=max_test, max_train=None)
    data = load_data(accelerator, options, max_train=max_test if split == "train" else None)
    net = load_model(model)
    if reestimate_bn and not batchnorm_buffers(net):
        raise ValueError(f"--reestimate-bn {reestimate_bn}: the model has no BatchNorm layers with running statistics "
                         "to re-estimate")
    images, labels = split_tensors(accelerator, getattr(data, split), data, net, split)
    bn = _reestimate_on_train(accelerator, net, data, reestimate_bn, seed) if reestimate_bn else None
    loader = accelerator.prepare_data_loader(eval_loader(images, labels, batch_size, accelerator.device))
    net = accelerator.prepare_model(net, evaluation_mode=True)
    raw = accelerator.unwrap_model(net)
    mean, std = normalization(model_input_spec(raw)[0])
    metrics = evaluate(accelerator, net, loader, mean=mean, std=std)
    qc = getattr(raw.config, "quantization_config", None)
    qc = qc.to_dict() if qc is not None and not isinstance(qc, dict) else qc
    return {"model": str(model), "dataset": str(dataset), "split": split, **metrics, "quantized": is_quantized(raw),
            "quantization_config": qc, "world_size": accelerator.num_processes, "bn_reestimation": bn}


def check_evaluation_options(split: str, batch_size: int, reestimate_bn: int, max_test: int | None) -> None:
    """ValueError naming the option, before any model or data is loaded."""
    if split not in ("test", "train"):
        raise ValueError(f"--split must be 'test' or 'train'; got {split!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    if reestimate_bn < 0:
        raise ValueError(f"--reestimate-bn (BatchNorm re-estimation batches) must be >= 0; got {reestimate_bn}")
    if max_test is not None and max_test < 1:
        raise ValueError(f"--max-test must be >= 1; got {max_test}")
