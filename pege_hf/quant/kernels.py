"""The elementwise kernels behind the fused estimators, as pure functions of tensors.

Eager by default. `use_compiled_kernels()` swaps in torch.compile'd versions (dynamic shapes, so
one compilation serves every layer): each kernel then runs as one fused loop instead of several
passes over memory. Same formulas, so results agree to rounding.

Masks reach the compiled kernels as uint8 views of the bool mask (no copy): inductor's CPU code
loads a bool tensor through a per-element path that a random mask makes ~3x slower than loading
bytes and comparing them in the loop (`pege bench speed --compile`, PEGE mid-ramp).
"""

from __future__ import annotations

import torch


def uniform_forward(x, s, qmin, qmax):
    """Q(x) = s * round(clamp(x / s, qmin, qmax))."""
    return torch.round(torch.clamp(x / s, qmin, qmax)) * s


def _as_bool(mask):
    """A bool mask from a bool tensor or its uint8 view (see the module docstring)."""
    return mask if mask is None or mask.dtype == torch.bool else mask.to(torch.int32) != 0


def mixed_forward(x, s, qmin, qmax, mask):
    """where(M, Q(x), x)."""
    return torch.where(_as_bool(mask), torch.round(torch.clamp(x / s, qmin, qmax)) * s, x)


def uniform_backward(g, x, s, qmin, qmax, delta: float):
    """Gradients of Q with d round(v) / dv = 1 + delta * sign(g) * (v - round(v)) / (qmax - qmin) inside
    the clip range (STE when delta = 0, EWGS otherwise): to x, and to s elementwise (LSQ's rule).
    STE skips the factor's five passes over memory: it is exactly 1 there, so the result is bit-identical."""
    v = x / s
    vc = torch.clamp(v, qmin, qmax)
    r = torch.round(vc)
    inside = (v >= qmin) & (v <= qmax)
    if delta == 0:
        return torch.where(inside, g, 0.0), g * torch.where(inside, r - v, r)
    factor = 1 + delta * torch.sign(g) * (vc - r) / (qmax - qmin)
    return torch.where(inside, g * factor, 0.0), g * torch.where(inside, r - factor * v, r)


def pege_backward(g, x, s, qmin, qmax, mask, coef, replaced_only: bool, pull_to_x: bool = True, pull_to_s: bool = False):
    """Gradients of where(M, Q(x), x) plus those of the discretization term D, whose gradient with
    respect to x is the pull coef * (x - Q(x)): to x (``pull_to_x``) and, through dQ/ds, to the step
    size (``pull_to_s``: dD/ds = -coef * (x - Q(x)) * dQ/ds, with LSQ's dQ/ds).

    mask=None: every element replaced; coef=None: no pull. Returns (grad_x, grad_s elementwise)."""
    mask = _as_bool(mask)
    v = x / s
    r = torch.round(torch.clamp(v, qmin, qmax))
    inside = (v >= qmin) & (v <= qmax)
    replaced = inside if mask is None else mask & inside
    gm = g if mask is None else torch.where(mask, g, 0.0)
    grad_x = torch.where(replaced, g, 0.0) if mask is None else torch.where(mask, torch.where(inside, g, 0.0), g)
    dq_ds = torch.where(inside, r - v, r)
    grad_s = gm * dq_ds
    if coef is not None:
        pull = coef * (x - r * s)
        if replaced_only and mask is not None:
            pull = torch.where(mask, pull, 0.0)
        if pull_to_x:
            grad_x = grad_x + pull
        if pull_to_s:
            grad_s = grad_s - pull * dq_ds
    return grad_x, grad_s


_EAGER = {f.__name__: f for f in (uniform_forward, mixed_forward, uniform_backward, pege_backward)}
impl = dict(_EAGER)


def _compiled(fn):
    compiled = torch.compile(fn, dynamic=True)

    def run(*args):
        return compiled(*(a.view(torch.uint8) if isinstance(a, torch.Tensor) and a.dtype == torch.bool else a
                          for a in args))

    run.__name__ = fn.__name__
    return run


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the estimator kernels through torch.compile (first call compiles: ~30 s on 2 CPU cores)."""
    for name, fn in _EAGER.items():
        impl[name] = _compiled(fn) if enabled else fn


def compiled_kernels_enabled() -> bool:
    return impl["uniform_forward"] is not _EAGER["uniform_forward"]
