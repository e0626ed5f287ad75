"""The elementwise kernels behind the fused estimators, as pure functions of tensors.

Eager by default. `use_compiled_kernels()` swaps in torch.compile'd versions (dynamic shapes, so
one compilation serves every layer): each kernel then runs as one fused loop instead of several
passes over memory. Same formulas, so results agree to rounding.

The eager formulas are written for few, cheap passes over memory: one fresh output per kernel that
the following steps update in place (a new large tensor per step costs its page faults as well), the
code range as Python numbers (clamp against 1-element tensors is a slower kernel), and masks as
0.0 / 1.0 float tensors that multiply (torch's CPU kernels read bool tensors element by element, 3-10x
slower than floats or bytes). A product with a 0/1 mask equals torch.where on the mask exactly, except
that a zeroed element may be -0.0 (a negative value times 0) and a non-finite value stays non-finite.

Masks reach the compiled kernels as uint8 views of the bool mask (no copy): inductor's CPU code
loads a bool tensor through a per-element path that a random mask makes ~3x slower than loading
bytes and comparing them in the loop (`pege bench speed --compile`, PEGE mid-ramp). Loading the bytes
is still a partial vector load (8 bytes per 8-float AVX2 vector): a mask kernel took 3.0x the time of
the same kernel without one. The selects compare the bytes widened to int32 (`replaced`): a uint8 comparison
runs per element. A mask's recipe avoids the load: for a counter mask (two ints) the kernel
hashes the element indices itself, at 2.2x the time of no mask (benchmarks/mask_recipes_ab/ab.log); for a
progressive mask it compares the cached float priorities with the ratio (full vector loads).
"""

from __future__ import annotations

import torch

from .curriculum import CounterMask, ProgressiveMask, counter_bytes


def uniform_forward(x, s, qmin, qmax):
    """Q(x) = s * round(clamp(x / s, qmin, qmax))."""
    return torch.div(x, s).clamp_(qmin, qmax).round_().mul_(s)


def dynamic_step(x, qmax, per_token: bool):
    """max|x| / qmax per token (each row of the last dimension) or per tensor, at least 1e-8."""
    xmax = x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    return (xmax / qmax).clamp_min(1e-8)


def replaced(mask, like):
    """The mask as a bool condition on ``like``'s elements: a byte mask's nonzero bytes (compiled kernels get bool
    masks as uint8 views), a counter mask's (key, threshold) from the element indices, a progressive mask's
    (priority, ratio) by comparing. For compiled kernels, which fuse it into the loop that selects with it; the bytes
    are widened before the comparison, as inductor's CPU code compares uint8 with a scalar per element (~4x slower)."""
    if isinstance(mask, CounterMask):
        return counter_bytes(like, mask.key) < mask.threshold
    if isinstance(mask, ProgressiveMask):
        return mask.priority < mask.ratio
    return mask.to(torch.int32) != 0


def as_weight(mask, like):
    """The mask as 0.0 / 1.0 in ``like``'s dtype, for eager kernels: a bool mask through its uint8 view (no bool
    load), a uint8 one (any nonzero byte is 1, as for a bool), a mask's recipe evaluated here (`replaced`)."""
    if not isinstance(mask, torch.Tensor):
        return replaced(mask, like).to(like.dtype)
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask.clamp(max=1)).to(like.dtype)


def mixed_forward(x, s, qmin, qmax, mask):
    """where(M, Q(x), x). Compiled, as torch.where on the mask's condition: one select per element; inductor's
    lerp takes ~25% longer (PEGE mid-ramp's fake quantizers: benchmarks/kernels_ab/ab_compiled.log). Eager, as
    lerp(x, Q(x), M) with M as 0.0 / 1.0 (no bool load): exactly x where M = 0 and Q(x) where M = 1."""
    if torch.compiler.is_compiling():
        return torch.where(replaced(mask, x), uniform_forward(x, s, qmin, qmax), x)
    return torch.lerp(x, uniform_forward(x, s, qmin, qmax), as_weight(mask, x))


def _normalized(x, s, qmin, qmax, rounded: bool = False):
    """(v, clamp(v), inside) for v = x / s: inside is 1.0 where the gradient passes, else 0.0: where
    qmin <= v <= qmax (clamp(v) == v, false for NaN as the comparisons are), or with ``rounded`` where
    qmin <= round(v) <= qmax (the window of PyTorch's fake_quantize and torchao's QAT)."""
    v = torch.div(x, s)
    vc = torch.clamp(v, qmin, qmax)
    if rounded:
        r = torch.round(v)
        return v, vc, (torch.clamp(r, qmin, qmax) == r).to(v.dtype)
    if torch.compiler.is_compiling():  # torch.compile cannot trace out= on channels-last tensors: a graph break
        return v, vc, (vc == v).to(v.dtype)
    return v, vc, torch.eq(vc, v, out=torch.empty_like(v))


def _ewgs_backward(g, x, s, qmin, qmax, delta: float, rounded: bool):
    v = x / s
    vc = torch.clamp(v, qmin, qmax)
    r = torch.round(vc)
    w = torch.round(v) if rounded else v  # the window: round(v) or v within [qmin, qmax]
    inside = (w >= qmin) & (w <= qmax)
    factor = 1 + delta * torch.sign(g) * (vc - r) / (qmax - qmin)
    return torch.where(inside, g * factor, 0.0), g * torch.where(inside, r - factor * v, r)


def uniform_backward(g, x, s, qmin, qmax, delta: float, need_s: bool = True, rounded: bool = False):
    """Gradients of Q with d round(v) / dv = 1 + delta * sign(g) * (v - round(v)) / (qmax - qmin) inside
    the clip range (STE when delta = 0, EWGS otherwise): to x, and to s elementwise (LSQ's rule; None
    when not ``need_s``, as for a dynamic step size, which carries no gradient). ``rounded``: the gradient window
    (_normalized). STE skips the factor, exactly 1 there: grad_x = g * inside, grad_s = g * (r - v * inside)."""
    if delta != 0:
        grad_x, grad_s = _ewgs_backward(g, x, s, qmin, qmax, delta, rounded)
        return grad_x, (grad_s if need_s else None)
    v, vc, inside = _normalized(x, s, qmin, qmax, rounded)
    if not need_s:
        return inside.mul_(g), None
    return torch.mul(inside, g), vc.round_().sub_(v.mul_(inside)).mul_(g)


def pege_backward(g, x, s, qmin, qmax, mask, coef, replaced_only: bool, pull_to_x: bool = True, pull_to_s: bool = False,
                  need_s: bool = True, rounded: bool = False):
    """Gradients of where(M, Q(x), x) plus those of the discretization term D, whose gradient with
    respect to x is the pull coef * (x - Q(x)): to x (``pull_to_x``) and, through dQ/ds, to the step
    size (``pull_to_s``: dD/ds = -coef * (x - Q(x)) * dQ/ds, with LSQ's dQ/ds).

    mask=None: every element replaced; coef=None: no pull. Returns (grad_x, grad_s elementwise; None when
    not ``need_s``); ``rounded``: the gradient window (_normalized)."""
    v, r, inside = _normalized(x, s, qmin, qmax, rounded)
    r = r.round_()
    m = None if mask is None else as_weight(mask, x)
    pull = None
    if coef is not None:
        pull = torch.mul(r, s)
        pull = (x - pull if torch.compiler.is_compiling() else torch.sub(x, pull, out=pull)).mul_(coef)  # coef (x - Q)
        if replaced_only and m is not None:
            pull.mul_(m)
    if need_s:  # where(inside, r - v, r), then the replaced elements' share of g
        dq_ds = r.sub_(v.mul_(inside))
        grad_s = torch.mul(g, m).mul_(dq_ds) if m is not None else torch.mul(g, dq_ds)
        if pull is not None and pull_to_s:
            grad_s.sub_(dq_ds.mul_(pull))
    # grad_x = g where an element is kept or replaced inside the range, else 0: keep = 1 - M (1 - inside),
    # which is inside >= M for 0/1 values
    keep = inside if m is None else inside.ge_(m)
    if pull is not None and pull_to_x:
        grad_x = torch.addcmul(pull, keep, g)  # keep * g is exact (0 or g), so no fused rounding differs
    else:
        grad_x = keep.mul_(g)
    return grad_x, (grad_s if need_s else None)


_EAGER = {f.__name__: f for f in (uniform_forward, mixed_forward, uniform_backward, pege_backward, dynamic_step)}
impl = dict(_EAGER)


def _compiled(fn):
    """fn through torch.compile. Tensors go in detached (the kernels need no autograd) and bool masks as uint8
    views: dynamo guards on requires_grad and gives parameters static shapes, so a weight's kernel would
    otherwise compile once per weight shape and again per requires_grad, and a model with a few layer widths
    runs past dynamo's recompile limit (8), after which the kernel silently runs eager."""
    compiled = torch.compile(fn, dynamic=True)

    def arg(a):
        if not isinstance(a, torch.Tensor):
            return a
        return a.detach().view(torch.uint8) if a.dtype == torch.bool else a.detach()

    def run(*args):
        return compiled(*map(arg, args))

    run.__name__ = fn.__name__
    return run


RECOMPILE_LIMIT = 64


def use_compiled_kernels(enabled: bool = True) -> None:
    """Run the estimator kernels through torch.compile (first call compiles: ~30 s on 2 CPU cores).

    Each kernel compiles once per kind of call (the step size's rank: per tensor, per channel, per group or
    per token; the mask's kind: a tensor, a recipe or none; with or without a step-size gradient), and a
    model with convolutions and Linear layers in PEGE's ramp and after it can pass dynamo's default limit
    of 8 compilations per function, after which the kernel runs eager without a word. Enabling raises
    torch._dynamo.config.recompile_limit to at least RECOMPILE_LIMIT."""
    if enabled:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for name, fn in _EAGER.items():
        impl[name] = _compiled(fn) if enabled else fn


def compiled_kernels_enabled() -> bool:
    return impl["uniform_forward"] is not _EAGER["uniform_forward"]
