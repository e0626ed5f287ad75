"""Forward quantizers: uniform fake quantization Q(x) = s * round(clamp(x / s, qmin, qmax)).

Each quantizer owns its parameters (a learnable step size for LSQ, a learnable clip for PACT, an
observed range for min-max) and takes the rounding function as an argument, so any gradient
estimator plugs into any quantizer. Pure torch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .estimators import round_ste

# symmetric: min-max with the symmetric scale of PyTorch's MinMaxObserver and torchao's QAT (for weights only)
WEIGHT_QUANTIZERS = ("lsq", "minmax", "symmetric")
# dynamic_token / dynamic_tensor: activation step sizes from the current tensor (per token: the last
# dimension's rows), recomputed every call, symmetric codes: the LLM recipe (torchao's int8 dynamic activations)
QUANTIZERS = ("lsq", "minmax", "pact", "dynamic_token", "dynamic_tensor")
SCALE_INITS = ("lsq", "mse")
INITIALISED_QUANTIZERS = ("lsq", "pact")  # the quantizers whose step size scale_init initialises from data
MIN_BITS, MAX_BITS = 2, 8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range: [-2^(b-1), 2^(b-1) - 1] signed, [0, 2^b - 1] unsigned."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def scale_grad(x: torch.Tensor, factor) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's gradient scale)."""
    return (x - x.detach()) * factor + x.detach()


def broadcast_to(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View a per-channel (C,) scale so it broadcasts along ``axis`` of x; per-tensor scales pass through."""
    if axis is None:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.view(shape)


def fake_quantize(x, scale, qmin, qmax, round_fn=round_ste, rounded_window: bool = False):
    """s * round(clamp(x / s, qmin, qmax)); ``scale`` already broadcast to x. The same values as
    s * clamp(round(x / s), qmin, qmax), which ``rounded_window`` computes instead, for the gradient's sake: the
    clamp then passes it wherever the rounded code is in range (PyTorch's fake_quantize and torchao's QAT) rather
    than only where x / s is."""
    if rounded_window:
        return torch.clamp(round_fn(x / scale), qmin, qmax) * scale
    return round_fn(torch.clamp(x / scale, qmin, qmax)) * scale


def quantize_codes(x, scale, qmin, qmax) -> torch.Tensor:
    """The integer codes of fake_quantize (same ops, so codes * scale reproduces it bit for bit)."""
    return torch.round(torch.clamp(x / scale, qmin, qmax))


def _reduce_dims(x: torch.Tensor, axis: int | None) -> list[int]:
    return [d for d in range(x.dim()) if d != axis]


def init_scale_lsq(x: torch.Tensor, qmax: float, axis: int | None) -> torch.Tensor:
    """LSQ's initial step size 2 * mean|x| / sqrt(qmax) (Esser et al., 2020)."""
    return 2 * x.abs().mean(dim=_reduce_dims(x, axis)) / math.sqrt(qmax)


def quantization_mse(x: torch.Tensor, scale: torch.Tensor, qmin: float, qmax: float, axis: int | None) -> torch.Tensor:
    """mean((Q(x) - x)^2) per channel (per tensor when ``axis`` is None) for a (C,) or scalar step size:
    fake_quantize's ops on one temporary updated in place (the MSE search calls it dozens of times)."""
    sb = broadcast_to(scale, x, axis)
    err = torch.div(x, sb).clamp_(qmin, qmax).round_().mul_(sb).sub_(x)
    return err.square_().mean(dim=_reduce_dims(x, axis))


def _best_fraction(x, xmax, qmin, qmax, axis, fractions) -> torch.Tensor:
    """Per channel, the clip fraction f among ``fractions`` (scalars or per-channel tensors) whose step
    size f * xmax / qmax gives the smallest quantization MSE (the first one on ties)."""
    best_f = best_err = None
    for f in fractions:
        err = quantization_mse(x, xmax * f / qmax, qmin, qmax, axis)
        if best_err is None:
            best_f, best_err = torch.ones_like(xmax) * f, err
        else:
            better = err < best_err
            best_f, best_err = torch.where(better, f, best_f), torch.where(better, err, best_err)
    return best_f


MSE_SAMPLES_PER_CHANNEL = 1024
MSE_SAMPLES_PER_TENSOR = 65536


def mse_sample(x: torch.Tensor, axis: int | None, per_channel: int = MSE_SAMPLES_PER_CHANNEL,
               per_tensor: int = MSE_SAMPLES_PER_TENSOR) -> tuple[torch.Tensor, int | None]:
    """(x', axis') on which the MSE search runs: x itself when small; otherwise, per channel (or for the
    whole tensor) an evenly strided subset of the elements, so that the search on a big layer costs what
    it costs on a small one (a 4096x4096 weight: 4x fewer elements; a large activation batch: far fewer)."""
    if axis is None:
        flat = x.reshape(-1)
        if flat.numel() <= per_tensor:
            return x, None
        return flat[torch.linspace(0, flat.numel() - 1, per_tensor, device=x.device).long()], None
    rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if rows.shape[1] <= per_channel:
        return x, axis
    return rows[:, torch.linspace(0, rows.shape[1] - 1, per_channel, device=x.device).long()], 0


def init_scale_mse(x: torch.Tensor, qmin: float, qmax: float, axis: int | None,
                   coarse: int = 20, fine: int = 20) -> torch.Tensor:
    """The step size minimising ||x - Q(x)||^2 over clip fractions f of max|x| (s = f * max|x| / qmax):
    ``coarse`` fractions evenly on [0.05, 1], then ``fine`` around each channel's best one, spanning
    one coarse step either side (so the result resolves f to about 0.1 / fine); ``fine=0`` is the
    plain grid. max|x| comes from every element; the error is measured on ``mse_sample(x)``."""
    x = x.detach()
    xmax = x.abs().amax(dim=_reduce_dims(x, axis)).clamp_min(1e-8)
    x, axis = mse_sample(x, axis)
    step = 0.95 / (coarse - 1)
    best = _best_fraction(x, xmax, qmin, qmax, axis, torch.linspace(0.05, 1.0, coarse).tolist())
    if fine:
        around = [(best + d).clamp(0.5 * step, 1.0) for d in torch.linspace(-step, step, fine + 1).tolist()]
        best = _best_fraction(x, xmax, qmin, qmax, axis, [best, *around])
    return xmax * best / qmax


class UniformQuantizer(nn.Module):
    """Base class: bit width, signedness, per-channel axis and data-driven initialisation.

    ``signed=None`` decides from the first tensor seen: unsigned when it is non-negative (after a
    ReLU), signed otherwise. The code range lives in buffers so it is saved with the model.
    """

    def __init__(self, bits: int, *, signed: bool | None = None, channels: int | None = None,
                 axis: int | None = None, scale_init: str = "lsq", group_size: int | None = None):
        super().__init__()
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
        if scale_init not in SCALE_INITS:
            raise ValueError(f"scale_init must be one of {', '.join(SCALE_INITS)}, got {scale_init!r}")
        self.bits, self.axis, self.scale_init, self.auto_sign = int(bits), axis, scale_init, signed is None
        qmin, qmax = qrange(self.bits, bool(signed))
        # [qmin, qmax, initialized] in one buffer: saved with the model, one tensor per quantizer
        self.register_buffer("qstate", torch.tensor([float(qmin), float(qmax), 0.0], dtype=torch.float32))
        self._ready = False  # python mirror of qstate[2], so the hot path never syncs a device
        self.n_scales = channels if axis is not None else 1
        # group-wise: a step size per group of `group_size` consecutive input elements of each output row
        # (2-D weights, axis 0); `channels` is then the number of groups, out_features * in_features / G
        self.group_size = group_size

    # Where the gradient passes the clamp: False, where qmin <= x / s <= qmax (LSQ's rule, for learned step sizes);
    # True, where qmin <= round(x / s) <= qmax (PyTorch's fake_quantize and torchao's QAT, for observed ones)
    rounded_window = False

    def _apply(self, fn, recurse=True):
        """Moves follow the model (.to(device)); casts to half precision do not: step sizes and the code
        range stay float32 in a bf16/fp16 model (a 2-bit step size in bf16 would misplace codes)."""
        super()._apply(fn, recurse)
        for tensors in (self._parameters, self._buffers):
            for t in tensors.values():
                if t is not None and t.dtype in (torch.float16, torch.bfloat16):
                    t.data = t.data.float()
        return self

    # -- state ---------------------------------------------------------------------------------
    @property
    def qmin(self) -> torch.Tensor:
        return self.qstate[0:1]

    @property
    def qmax(self) -> torch.Tensor:
        return self.qstate[1:2]

    def _set_state(self, qmin: float, qmax: float, initialized: bool) -> None:
        self.qstate.copy_(torch.tensor([float(qmin), float(qmax), float(initialized)]))

    def is_initialized(self) -> bool:
        if not self._ready and bool(self.qstate[2]):
            self._mark_ready()
        return self._ready

    def _mark_ready(self) -> None:
        self._ready, self._qn, self._qp = True, float(self.qmin), float(self.qmax)

    def code_range(self) -> tuple[float, float]:
        """(qmin, qmax) as Python numbers, mirrored once the quantizer is ready (no device sync per call;
        the kernels clamp against numbers faster than against 1-element tensors)."""
        if self._ready or self.is_initialized():
            return self._qn, self._qp
        return float(self.qmin), float(self.qmax)

    def _load_from_state_dict(self, *args, **kwargs):
        """A loaded qstate may hold another code range: the Python mirror is refreshed on the next use."""
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    @torch.no_grad()
    def reset(self, signed: bool = False) -> None:
        """Forget everything learned from data (used after a meta-device build left memory uninitialised)."""
        self._set_state(*qrange(self.bits, signed), initialized=False)
        self._ready = False
        self._set_scale(torch.ones(self.n_scales, device=self.qmin.device))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the code range (if automatic) and the scale from data; averaged across ranks under DDP."""
        x = x.detach().float()
        if self.auto_sign:
            self._set_state(*qrange(self.bits, signed=bool(x.min() < 0)), initialized=False)
        scale = self._initial_scale(x)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(scale)
            scale /= torch.distributed.get_world_size()
            qmin = self.qmin.clone()
            torch.distributed.all_reduce(qmin, op=torch.distributed.ReduceOp.MIN)
            self._set_state(*qrange(self.bits, signed=bool(qmin < 0)), initialized=False)
        self._set_scale(scale.clamp_min(1e-8))
        self.qstate[2] = 1.0
        self._mark_ready()

    def _initial_scale(self, x):
        qmin, qmax = self.qmin.item(), self.qmax.item()
        x, axis = self.rows(x)
        if self.scale_init == "mse":
            return init_scale_mse(x, qmin, qmax, axis)
        return init_scale_lsq(x, qmax, axis)

    def rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """(x', axis') with one step size per slice along axis' of x': x itself, or its groups as rows."""
        if self.group_size is None:
            return x, self.axis
        return x.reshape(-1, self.group_size), 0

    def broadcast_scale(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The (n_scales,) step sizes laid out to broadcast against x (expanded per group when group-wise;
        a (groups, 1) view when x is already laid out as ``rows(x)``, one group per row)."""
        if self.group_size is None:
            return broadcast_to(scale, x, self.axis)
        if x.dim() == 2 and x.shape[1] == self.group_size:
            return scale.view(-1, 1)
        return scale.view(-1, 1).expand(-1, self.group_size).reshape(x.shape)

    # -- subclass interface ----------------------------------------------------------------------
    def _set_scale(self, scale: torch.Tensor) -> None:
        raise NotImplementedError

    def step_size(self, x: torch.Tensor) -> torch.Tensor:
        """The step size broadcast to x, carrying the quantizer's own parameter gradient."""
        raise NotImplementedError

    # -- quantization ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, round_fn=round_ste) -> torch.Tensor:
        if not self.is_initialized():
            self.initialize(x)
        return fake_quantize(x, self.step_size(x), self.qmin, self.qmax, round_fn, self.rounded_window)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (as int16, shifted by nothing: values in [qmin, qmax])."""
        return quantize_codes(x, self.step_size(x).detach(), self.qmin, self.qmax).to(torch.int16)

    @torch.no_grad()
    def scale_tensor(self) -> torch.Tensor:
        """The step size as stored for export, shape (n_scales,)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        kind = "per-channel" if self.axis is not None else "per-tensor"
        return f"bits={self.bits}, {kind}, scale_init={self.scale_init}"


class LSQQuantizer(UniformQuantizer):
    """Learned step size quantization (Esser et al., ICLR 2020): s is a parameter whose gradient is
    scaled by 1 / sqrt(N * qmax), N the number of elements sharing one step size."""

    def __init__(self, bits, **kw):
        super().__init__(bits, **kw)
        self.scale = nn.Parameter(torch.ones(self.n_scales, dtype=torch.float32))

    def _set_scale(self, scale):
        self.scale.data.copy_(scale.reshape(self.scale.shape))

    def step_size(self, x):
        n = x.numel() // self.n_scales
        s = scale_grad(self.scale, 1.0 / math.sqrt(n * self._qp))
        return self.broadcast_scale(s, x)

    def scale_tensor(self):
        return self.scale.detach()


class PACTQuantizer(UniformQuantizer):
    """Learnable clipping (PACT, Choi et al. 2018): the parameter is the clip value alpha and
    s = alpha / qmax, so values above alpha send their gradient to alpha."""

    def __init__(self, bits, **kw):
        super().__init__(bits, **kw)
        self.clip = nn.Parameter(torch.ones(self.n_scales, dtype=torch.float32))

    def _set_scale(self, scale):
        self.clip.data.copy_((scale * self.qmax).reshape(self.clip.shape))

    def step_size(self, x):
        return self.broadcast_scale(self.clip / self.qmax, x)

    def scale_tensor(self):
        return (self.clip / self.qmax).detach()


class MinMaxQuantizer(UniformQuantizer):
    """A fixed (not learned) uniform quantizer: s = max|x| / qmax, so the largest magnitude is a code.
    ``full_span``: s = max|x| / ((qmax - qmin) / 2), the symmetric scale of PyTorch's MinMaxObserver and
    torchao's QAT (MappingType.SYMMETRIC): the codes span 2 max|x|, which for 2-bit signed codes [-2, 1]
    puts them at -4/3, -2/3, 0 and 2/3 of max|x|. Weights re-observe their range on every training
    forward; activations keep an exponential moving average of the batch maximum. Gradients pass wherever the
    rounded code is in range, as in PyTorch's FakeQuantize and torchao's QAT (``rounded_window``): with the
    symmetric scale, x / s reaches 1.5 at W2, and LSQ's rule would stop the gradient of every weight above s."""

    rounded_window = True

    def __init__(self, bits, *, momentum: float = 0.1, dynamic: bool = False, full_span: bool = False, **kw):
        super().__init__(bits, **kw)
        self.momentum, self.dynamic, self.full_span = momentum, dynamic, full_span
        self.register_buffer("scale", torch.ones(self.n_scales, dtype=torch.float32))
        # a dynamic quantizer that observed its weights in training follows them in evaluation too (an optimizer
        # step has changed them since); one whose step size was loaded keeps it (its weights are dequantized
        # codes, whose range is not the range they were quantized with)
        self._follows_weights = False

    def _initial_scale(self, x):
        return self._observe(x)

    def _observe(self, x):
        x, axis = self.rows(x)
        span = (self.qmax - self.qmin) / 2 if self.full_span else self.qmax
        return x.abs().amax(dim=_reduce_dims(x, axis)).clamp_min(1e-8) / span

    def _set_scale(self, scale):
        self.scale.copy_(scale.reshape(self.scale.shape))

    def step_size(self, x):
        if self.is_initialized() and (self.training or self._follows_weights):
            with torch.no_grad():
                seen = self._observe(x.detach().float())
                self.scale.copy_(seen if self.dynamic else torch.lerp(self.scale, seen, self.momentum))
            self._follows_weights = self.dynamic
        return self.broadcast_scale(self.scale.clone(), x)  # a copy: later updates must not touch saved tensors

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Re-observe ``weight`` if this quantizer follows its weights (dynamic, observed in training): the step
        size of the weights as they are now, for code that reads ``scale`` without a forward (saving, export)."""
        if self._follows_weights and self.is_initialized():
            self.scale.copy_(self._observe(weight.detach().float()))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._follows_weights = False

    def scale_tensor(self):
        return self.scale.detach()


class DynamicQuantizer(UniformQuantizer):
    """Step sizes from the tensor itself on every call, nothing learned or stored: s = max|x| / qmax per
    token (each row of the last dimension) or per tensor, symmetric signed codes. Gradients pass the
    rounding by the estimator's rule; s carries none (as torchao's dynamic activation fake quantizer)."""

    def __init__(self, bits, *, per_token: bool, **kw):
        super().__init__(bits, signed=True, **kw)
        self.per_token = per_token
        self.initialize(None)

    @torch.no_grad()
    def initialize(self, x) -> None:
        self._set_state(*qrange(self.bits, True), initialized=True)
        if not self.qstate.is_meta:  # built on the meta device (from_pretrained): ready when reset on real memory
            self._mark_ready()

    def reset(self, signed: bool = True) -> None:
        self.initialize(None)

    def _set_scale(self, scale):
        pass

    def step_size(self, x):
        with torch.no_grad():
            return kernels.impl["dynamic_step"](x, self.code_range()[1], self.per_token)

    def scale_tensor(self):
        raise ValueError("a dynamic activation quantizer has no stored step size (it is computed from each input)")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, dynamic per-{'token' if self.per_token else 'tensor'}"


def make_quantizer(name: str, bits: int, *, weight: bool, channels: int | None = None,
                   axis: int = 0, scale_init: str = "lsq", group_size: int | None = None) -> UniformQuantizer:
    """The factory from a quantizer name to a module: weights per output channel (or per group of
    ``group_size`` inputs) and signed, activations per tensor with automatic signedness (or dynamic)."""
    known = tuple(dict.fromkeys(QUANTIZERS + WEIGHT_QUANTIZERS))
    if name not in known:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(known)}")
    if name == "symmetric" and not weight:
        raise ValueError(f"quantizer 'symmetric' is for weights; activations take one of {', '.join(QUANTIZERS)}")
    if name.startswith("dynamic"):
        if weight:
            raise ValueError(f"quantizer {name!r} is for activations; weights take one of {', '.join(WEIGHT_QUANTIZERS)}")
        return DynamicQuantizer(bits, per_token=name == "dynamic_token")
    kw = dict(signed=True, channels=channels, axis=axis, group_size=group_size) if weight else dict(signed=None)
    if name == "lsq":
        return LSQQuantizer(bits, scale_init=scale_init, **kw)
    if name == "pact":
        return PACTQuantizer(bits, scale_init=scale_init, **kw)
    return MinMaxQuantizer(bits, dynamic=weight, full_span=name == "symmetric", **kw)
