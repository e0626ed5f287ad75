"""Gradient estimators: one autograd Function per backward rule.

A forward quantizer calls a *rounding function* on its normalised value v = clamp(x / s); the
estimator decides what d round(v) / dv is (STE: 1; EWGS: a per-element correction). PEGE acts one
level up: it mixes the latent tensor with the quantizer's output element by element and folds the
gradient of its discretization-error term into the backward pass.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("pege", "ste", "ewgs")
DISCRETIZATION_SCOPES = ("all", "replaced")


class RoundSTE(torch.autograd.Function):
    """round(v) forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, v):
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad):
        return grad


class RoundEWGS(torch.autograd.Function):
    """round(v) forward; backward g * (1 + delta * sign(g) * (v - round(v)) / span) (Lee et al., CVPR 2021).

    ``span`` = qmax - qmin maps the code-unit error onto EWGS' [0, 1]-normalised scale.
    """

    @staticmethod
    def forward(ctx, v, delta: float, span):
        rounded = torch.round(v)
        ctx.save_for_backward(v - rounded, span)
        ctx.delta = delta
        return rounded

    @staticmethod
    def backward(ctx, grad):
        err, span = ctx.saved_tensors
        return grad * (1 + ctx.delta * torch.sign(grad) * err / span), None, None


class PEGEMix(torch.autograd.Function):
    """x_mix = where(M, Q(x), x), with lambda * dD/dx folded into the backward pass.

    Forward: replaced elements (M = 1) take the quantized value xq, the others keep x; ``mask=None``
    means every element is replaced.
    Backward: grad_x = g * (1 - M) + coef * (x - xq) [* M when scope == "replaced"], grad_xq = g * M.
    ``coef`` (broadcastable to x) = 2 * lambda / (s^2 * N) for D = mean(((x - sg Q(x)) / sg s)^2);
    xq enters D only through stop-gradient, so D sends nothing to xq or to the quantizer's parameters.
    """

    @staticmethod
    def forward(ctx, x, xq, mask, coef, scope: str):
        out = xq if mask is None else torch.where(mask, xq, x)
        pull = coef is not None
        ctx.pull, ctx.scope = pull, scope
        ctx.save_for_backward(mask, (x - xq) * coef if pull else None)
        return out.clone() if mask is None else out

    @staticmethod
    def backward(ctx, grad):
        mask, pull = ctx.saved_tensors
        if mask is None:
            grad_x, grad_xq = None, grad
        else:
            grad_xq = grad * mask
            grad_x = grad - grad_xq
        if ctx.pull:
            if ctx.scope == "replaced" and mask is not None:
                pull = pull * mask
            grad_x = pull if grad_x is None else grad_x + pull
        return grad_x, grad_xq, None, None, None


def round_ste(v: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(v)


def round_ewgs(v: torch.Tensor, delta: float, span: torch.Tensor) -> torch.Tensor:
    return RoundEWGS.apply(v, delta, span)


def pege_mix(x, xq, mask, coef=None, scope: str = "all"):
    """Element-wise replacement (see PEGEMix); ``coef=None`` drops the discretization term."""
    return PEGEMix.apply(x, xq, mask, coef, scope)
