"""Replacement-ratio schedules r(t) and the element masks that realise them.

Pure torch; nothing here knows about layers or configs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch


SCHEDULES = ("log", "linear", "cosine", "instant")
MASK_POLICIES = ("progressive", "bernoulli", "error", "counter")
AUTO_MASK = "auto"  # an activation-mask setting, not a policy: "counter" under compiled kernels, else "bernoulli"


def resolve_mask_policy(policy: str, compiled: bool, numel: int = 0) -> str:
    """The policy a mask setting draws with: "auto" is "counter" where compiled kernels hash it inside their loop
    (nothing drawn, stored or loaded per element) and "bernoulli" for eager kernels (where the hash costs a dozen
    passes, random bytes one) and for tensors of ``numel`` >= 2**31 elements, which counter masks cannot number;
    any other setting is itself."""
    if policy == AUTO_MASK:
        return "counter" if compiled and numel < 2**31 else "bernoulli"
    return policy
LAMBDA_SCHEDULES = ("constant", "follow", "ramp", "log", "exp")

_MASK32 = 0xFFFFFFFF


def replacement_ratio(progress: float, schedule: str = "log", alpha: float = 9.0, ramp_fraction: float = 0.75) -> float:
    """Fraction r in [0, 1] of elements replaced by their quantized values at training progress p = t / T.

    log:     r = min(1, ln(1 + alpha * p / ramp) / ln(1 + alpha))
    linear:  r = min(1, p / ramp)
    cosine:  r = (1 - cos(pi * min(1, p / ramp))) / 2
    instant: r = 1 (PEGE without the progressive part)
    """
    if schedule == "instant":
        return 1.0
    u = 1.0 if ramp_fraction <= 0 else min(1.0, max(0.0, progress) / ramp_fraction)
    if schedule == "log":
        return min(1.0, math.log1p(alpha * u) / math.log1p(alpha))
    if schedule == "linear":
        return u
    if schedule == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    raise ValueError(f"unknown curriculum {schedule!r}; allowed: {', '.join(SCHEDULES)}")


def discretization_weight(base: float, ratio: float, schedule: str = "constant", *, progress: float = 0.0,
                          start: float = 0.0, alpha: float = 9.0) -> float:
    """lambda(t) from the base lambda, the replacement ratio r(t) and the training progress p = t / T.

    constant: lambda
    follow:   lambda * r(t) (the pull grows as elements are replaced)
    ramp:     lambda while r(t) < 1, then 0: no pull once every element is quantized, where it parks
              latent weights on grid points and stops their codes from changing (`pege bench grid`)
    log:      start + (lambda - start) * ln(1 + alpha p) / ln(1 + alpha)
    exp:      start * (lambda / start)^p, geometric from start (> 0) to lambda (the author's u(t) schedules:
              u grew from 1e-8 to 5e-8 over training in the SQAKD code, shared/docs/pege-method.md section 7)
    """
    if schedule == "constant":
        return base
    if schedule == "follow":
        return base * ratio
    if schedule == "ramp":
        return base if ratio < 1.0 else 0.0
    p = min(1.0, max(0.0, progress))
    if schedule == "log":
        return start + (base - start) * math.log1p(alpha * p) / math.log1p(alpha)
    if schedule == "exp":
        return start * (base / start) ** p
    raise ValueError(f"unknown lambda schedule {schedule!r}; allowed: {', '.join(LAMBDA_SCHEDULES)}")


def _hash32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors holding values in [0, 2**32).

    Multipliers stay below 2**31 so every product fits in int64 before masking.
    """
    v = v ^ (v >> 16)
    v = (v * 0x045D9F3B) & _MASK32
    v = v ^ (v >> 16)
    v = (v * 0x045D9F3B) & _MASK32
    return v ^ (v >> 16)


def element_priority(shape: torch.Size | tuple[int, ...], seed: int, device=None) -> torch.Tensor:
    """A fixed pseudo-random priority in [0, 1) for every element, derived from (seed, flat index).

    Counter-based: the same (seed, shape) gives the same priorities on any device, with nothing
    saved in checkpoints. Recent results are memoised (the hash costs a few passes over the tensor);
    treat the returned tensor as read-only.
    """
    return _element_priority(tuple(shape), int(seed), torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=128)
def _element_priority(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    n = math.prod(shape)
    offset = _hash32(torch.tensor(seed & _MASK32, dtype=torch.int64)).item()
    idx = (torch.arange(n, device=device, dtype=torch.int64) + offset) & _MASK32
    h = _hash32(_hash32(idx) ^ (seed & _MASK32))
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(shape)


def random_bytes(n: int, device=None) -> torch.Tensor:
    """n uniform random bytes: all 8 bytes of each full-range 64-bit word random_() draws (a view, no copy;
    a plain random_() leaves the top bit clear, so its top byte would not be uniform)."""
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.uint8)[:n]


def in_layout_of(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The n = x.numel() values of ``flat`` laid out in x's memory order: a view with x's shape and the
    strides torch gives a tensor like x (x's own when x is dense, as channels-last is; contiguous otherwise),
    so elementwise work on the result and x streams through memory once."""
    return flat.as_strided(x.shape, torch.empty_like(x, device="meta").stride())


def bytes_below(b: torch.Tensor, threshold: int) -> torch.Tensor:
    """b < threshold for a uint8 tensor, as a bool tensor in b's layout: written as uint8 0/1 and viewed as
    bool, since torch's CPU kernel for uint8 < int with a bool output is ~10x slower than with a uint8 one
    (benchmarks/mask_recipes_ab/ab.log). Plain ``<`` under torch.compile, which fuses it anyway
    and cannot trace out= on channels-last tensors."""
    if torch.compiler.is_compiling():
        return b < threshold
    return torch.lt(b, threshold, out=torch.empty_like(b)).view(torch.bool)


def counter_bytes(like: torch.Tensor, key: int) -> torch.Tensor:
    """A pseudo-random byte (0..255, int32) per element of ``like``, in its memory order: the low byte of
    lowbias32(index ^ key) (C. Wellons' 32-bit integer hash), in int32 arithmetic that wraps as uint32's does
    (shifts masked to be logical). Pure elementwise integer work from the index alone, so torch.compile fuses
    it into the kernel that uses it: a mask that is never stored or drawn element by element."""
    if like.numel() >= 2**31:
        raise ValueError(f"counter masks number elements in int32: a tensor of {like.numel():,} elements is too "
                         "large; use the 'bernoulli' mask for it")
    v = _memory_positions(like) ^ key
    v = v ^ ((v >> 16) & 0xFFFF)
    v = v * 0x7FEB352D
    v = v ^ ((v >> 15) & 0x1FFFF)
    v = v * -0x7B935975  # 0x846CA68B as a signed 32-bit integer
    v = v ^ ((v >> 16) & 0xFFFF)
    return v & 255


def _memory_positions(like: torch.Tensor) -> torch.Tensor:
    """Each element's position in ``like``'s memory order (int32), as a view or permutation of one arange
    where the layout allows (contiguous, channels-last), which torch.compile folds into index arithmetic;
    in_layout_of's as_strided otherwise, which makes it write the positions out first."""
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int32)
    if like.is_contiguous():
        return index.view(like.shape)
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = like.shape
        return index.view(n, h, w, c).permute(0, 3, 1, 2)
    return in_layout_of(index, like)


class CounterMask(NamedTuple):
    """The recipe of a "counter" mask, M = counter_bytes(x, key) < threshold: Bernoulli(threshold / 256) per
    element, fresh with every key. Kernels compute M where they read it (kernels.replaced); ``materialize``
    writes it out as a bool tensor (for code that needs one, and for eager kernels, where the hash costs
    more passes than it saves)."""

    key: int
    threshold: int

    def materialize(self, like: torch.Tensor) -> torch.Tensor:
        return counter_bytes(like, self.key) < self.threshold


@functools.lru_cache(maxsize=32)
def _priority_in_layout(shape: tuple, seed: int, device: torch.device, stride: tuple) -> torch.Tensor:
    """element_priority laid out with ``stride`` (a channels-last weight's, say); memoised, read-only."""
    return torch.empty_strided(shape, stride, device=device).copy_(element_priority(shape, seed, device))


class ProgressiveMask(NamedTuple):
    """The recipe of a progressive mask, M = priority < ratio: compiled kernels compare the cached priorities
    where they read M instead of loading a byte mask written out every step. ``ratio`` stays a Python float:
    dynamo does not specialise on floats, so a new ratio needs no recompilation, and no device tensor is made
    per call."""

    priority: torch.Tensor
    ratio: float

    def materialize(self, like: torch.Tensor) -> torch.Tensor:
        return self.priority < self.ratio


def replacement_mask(
    x: torch.Tensor,
    ratio: float,
    policy: str,
    *,
    seed: int = 0,
    error: torch.Tensor | None = None,
    lazy: bool = False,
) -> torch.Tensor | CounterMask | ProgressiveMask:
    """Boolean mask M (True = use the quantized value) with mean(M) ~= ratio.

    progressive: M = priority(seed, index) < ratio; monotone in ratio and fixed across steps.
    bernoulli:   M ~ Bernoulli(ratio'), fresh on every call, ratio' = ratio rounded to 1/256 (one
                 random byte per element: the cheapest fresh randomness, 2-4x faster than torch.rand),
                 drawn in x's memory order.
    error:       the round(ratio * numel) elements with the smallest |x - Q(x)| (``error``).
    counter:     M ~ Bernoulli(ratio') as bernoulli, from a hash of each element's index and one random
                 31-bit key per call (torch's generator).
    With ``lazy``, progressive and counter masks come as their recipes (ProgressiveMask, CounterMask), which
    compiled kernels evaluate inside their one loop (no mask in memory; for counter masks no random draw per
    element either); else as the materialised bool tensor.
    Progressive and Bernoulli masks have x's memory layout (channels-last for a channels-last x); a
    progressive mask is the same logical mask in every layout.
    """
    if policy == "progressive":
        priority = element_priority(x.shape, seed, x.device)
        if lazy:  # the priorities in x's layout, so that a kernel's output keeps it
            priority = priority if x.is_contiguous() else _priority_in_layout(x.shape, seed, x.device, x.stride())
            return ProgressiveMask(priority, float(ratio))
        mask = priority < ratio
        return mask if x.is_contiguous() else torch.empty_like(x, dtype=torch.bool).copy_(mask)
    if policy in ("bernoulli", "counter"):  # Bernoulli(ratio') from one byte per element
        threshold = int(round(ratio * 256))
        if threshold >= 256:
            return torch.ones_like(x, dtype=torch.bool)
        if policy == "bernoulli":
            return bytes_below(in_layout_of(random_bytes(x.numel(), x.device), x), threshold)
        recipe = CounterMask(int(torch.randint(2**31, ()).item()), threshold)
        return recipe if lazy else recipe.materialize(x)
    if policy == "error":
        if error is None:
            raise ValueError("mask policy 'error' needs the quantization error |x - Q(x)|")
        k = int(round(ratio * x.numel()))
        mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
        if k > 0:
            mask[error.detach().abs().flatten().topk(k, largest=False, sorted=False).indices] = True
        return mask.view(x.shape)
    raise ValueError(f"unknown mask policy {policy!r}; allowed: {', '.join(MASK_POLICIES)}")
