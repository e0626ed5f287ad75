"""The optimiser (parameter groups: weights, BN/biases, quantizer step sizes) and the lr schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("cosine", "linear", "constant")


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


def make_optimizer(model: nn.Module, args, quantized: bool) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over ``param_groups``; quantizer lr = lr x --quantizer-lr-scale."""
    lr = args.lr
    groups = param_groups(model, lr, args.weight_decay, lr * args.quantizer_lr_scale if quantized else lr)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer, kind: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total))
