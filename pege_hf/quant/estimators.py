"""Gradient estimators: one autograd Function per backward rule.

A forward quantizer calls a *rounding function* on its normalised value v = clamp(x / s); the
estimator decides what d round(v) / dv is (STE: 1; EWGS: a per-element correction). PEGE acts one
level up: it mixes the latent tensor with the quantizer's output element by element and folds the
gradient of its discretization-error term into the backward pass.
"""

from __future__ import annotations

import torch

from . import kernels

ESTIMATORS = ("pege", "ste", "ewgs")
DISCRETIZATION_SCOPES = ("all", "replaced")
DISCRETIZATION_FORMS = ("scaled", "plain")
DISCRETIZATION_TARGETS = ("latent", "step_size", "both")


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


# ---------------------------------------------------------------------------------------------
# Fused fast path for uniform quantizers Q(x) = s * round(clamp(x / s, qmin, qmax)).
# One autograd node per estimator that saves x (often already saved by the ReLU before it) and
# recomputes everything else in backward (kernels.py): the same values and gradients as the
# composite path (quantizer(x, round_fn) + PEGEMix), far fewer passes over memory. Gradients to s
# are the quantizer's own (LSQ's); how the quantizer parameterises s (LSQ's gradient scale, PACT's
# clip) stays outside, in autograd.
# ---------------------------------------------------------------------------------------------
class FakeQuantSTE(torch.autograd.Function):
    """``rounded``: the gradient window of the quantizer (UniformQuantizer.rounded_window), in each Function."""

    @staticmethod
    def forward(ctx, x, s, qmin: float, qmax: float, rounded: bool = False):
        ctx.save_for_backward(x, s)
        ctx.qrange, ctx.rounded = (qmin, qmax), rounded
        return kernels.impl["uniform_forward"](x, s, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        grad_x, grad_s = kernels.impl["uniform_backward"](g, x, s, *ctx.qrange, 0.0, ctx.needs_input_grad[1],
                                                          ctx.rounded)
        return grad_x, _summed(grad_s, s), None, None, None


class FakeQuantEWGS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, qmin: float, qmax: float, delta: float, rounded: bool = False):
        ctx.save_for_backward(x, s)
        ctx.qrange, ctx.delta, ctx.rounded = (qmin, qmax), delta, rounded
        return kernels.impl["uniform_forward"](x, s, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        grad_x, grad_s = kernels.impl["uniform_backward"](g, x, s, *ctx.qrange, ctx.delta, ctx.needs_input_grad[1],
                                                          ctx.rounded)
        return grad_x, _summed(grad_s, s), None, None, None, None


class FakeQuantPEGE(torch.autograd.Function):
    """where(M, Q(x), x) for a uniform Q, with the discretization term's gradient in backward: the pull
    coef * (x - Q(x)) to x and/or its share to the step size s (``target``: latent / step_size / both).
    ``mask``: a bool tensor, None (every element replaced) or a mask's recipe (curriculum.CounterMask,
    ProgressiveMask; kept as is, on ctx: a recipe's tensors are cached constants)."""

    @staticmethod
    def forward(ctx, x, s, qmin: float, qmax: float, mask, coef, scope: str, target: str = "latent",
                rounded: bool = False):
        recipe = not isinstance(mask, torch.Tensor) and mask is not None
        ctx.save_for_backward(x, s, None if recipe else mask, coef)
        ctx.recipe = mask if recipe else None
        ctx.qrange, ctx.rounded = (qmin, qmax), rounded
        ctx.replaced_only = scope == "replaced"
        ctx.pull_to_x, ctx.pull_to_s = target in ("latent", "both"), target in ("step_size", "both")
        if mask is None:
            return kernels.impl["uniform_forward"](x, s, qmin, qmax)
        return kernels.impl["mixed_forward"](x, s, qmin, qmax, mask)

    @staticmethod
    def backward(ctx, g):
        x, s, mask, coef = ctx.saved_tensors
        mask = ctx.recipe if ctx.recipe is not None else mask
        grad_x, grad_s = kernels.impl["pege_backward"](g, x, s, *ctx.qrange, mask, coef, ctx.replaced_only,
                                                       ctx.pull_to_x, ctx.pull_to_s, ctx.needs_input_grad[1], ctx.rounded)
        return grad_x, _summed(grad_s, s), None, None, None, None, None, None, None


def _summed(grad_s, s):
    """The elementwise step-size gradient summed onto s's shape (None when s needs none)."""
    return None if grad_s is None else grad_s.sum_to_size(s.shape)


def round_ste(v: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(v)


def round_ewgs(v: torch.Tensor, delta: float, span: torch.Tensor) -> torch.Tensor:
    return RoundEWGS.apply(v, delta, span)


def pege_mix(x, xq, mask, coef=None, scope: str = "all"):
    """Element-wise replacement (see PEGEMix); ``coef=None`` drops the discretization term."""
    return PEGEMix.apply(x, xq, mask, coef, scope)
