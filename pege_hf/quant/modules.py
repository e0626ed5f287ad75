"""QuantLinear / QuantConv2d and the module swap.

A FakeQuantizer joins one forward quantizer with one gradient estimator (and, for PEGE, the
curriculum). Quant layers subclass nn.Linear / nn.Conv2d and keep the `weight` and `bias` names,
so float checkpoints load into them unchanged.
"""

from __future__ import annotations

import re
import warnings
import zlib
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .curriculum import discretization_weight, replacement_mask, replacement_ratio, resolve_mask_policy
from .packing import pack_codes, packed_size, unpack_codes
from .estimators import FakeQuantEWGS, FakeQuantPEGE, FakeQuantSTE, pege_mix, round_ewgs, round_ste
from .quantizers import UniformQuantizer, make_quantizer

class FakeQuantizer(nn.Module):
    """Applies ``quantizer`` to a tensor with the gradient rule of ``estimator``.

    For "pege", training forwards return where(M, Q(x), x) with mean(M) = r(progress), and the
    discretization-error gradient is added in the backward pass; evaluation always uses r = 1.

    Any quantizer module with ``forward(x, round_fn)`` and ``step_size(x)`` plugs in (the composite
    path); the uniform quantizers of this package take a fused path with identical results.
    """

    def __init__(self, quantizer: UniformQuantizer, config, *, mask: str, seed: int = 0):
        super().__init__()
        self.quantizer = quantizer
        self.estimator = config.estimator
        self.mask, self.seed = mask, seed
        self.curriculum, self.alpha, self.ramp_fraction = config.curriculum, config.alpha, config.ramp_fraction
        self.base_lambda, self.lambda_schedule = config.discretization_lambda, config.lambda_schedule
        self.lambda_start = config.lambda_start
        self.scope, self.reduction = config.discretization_scope, config.discretization_reduction
        self.form, self.target = config.discretization_form, config.discretization_target
        self.ewgs_delta = config.ewgs_delta
        self.fused = isinstance(quantizer, UniformQuantizer)
        if not self.fused and self.target != "latent" and self.estimator == "pege":
            raise ValueError(f"discretization_target={self.target!r} needs a uniform quantizer (LSQ, min-max, PACT); "
                             f"{type(quantizer).__name__} supports only 'latent'")
        self.set_progress(0.0)

    def set_progress(self, progress: float) -> None:
        self.ratio = replacement_ratio(progress, self.curriculum, self.alpha, self.ramp_fraction)
        self.lam = discretization_weight(self.base_lambda, self.ratio, self.lambda_schedule, progress=progress,
                                         start=self.lambda_start, alpha=self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(x)[0]

    def quantize(self, x: torch.Tensor):
        """(output, rebuild): ``rebuild()`` recomputes the output from tensors the estimator's backward
        keeps anyway (x, s, the mask), so a layer need not save the output too; None when there is no
        such recipe (the composite path, or an output that is x itself). Half-precision tensors are
        quantized in float32 (codes exact, step sizes float32) and the output cast back to x's dtype."""
        if x.dtype in (torch.float16, torch.bfloat16):
            out, rebuild = self._quantize_rows(x.float())
            return out.to(x.dtype), rebuild
        return self._quantize_rows(x)

    def _quantize_rows(self, x: torch.Tensor):
        """A group-wise uniform quantizer works on rows(x), one group per row, so that the kernels broadcast
        a (groups, 1) step size rather than one expanded to x's shape (group-wise tensors are weights: no
        rebuild recipe is needed)."""
        group = self.quantizer.group_size if self.fused else None
        if group is None:
            return self._quantize(x)
        out, _ = self._quantize(x.reshape(-1, group))
        return out.view(x.shape), None

    def _quantize(self, x: torch.Tensor):
        q = self.quantizer
        if self.fused and not q.is_initialized():
            q.initialize(x)
        if self.estimator == "ste":
            if self.fused:
                s = q.step_size(x)
                return FakeQuantSTE.apply(x, s, *q.code_range(), q.rounded_window), _uniform_rebuild(x, s, q)
            return q(x, round_ste), None
        if self.estimator == "ewgs":
            if self.fused:
                s = q.step_size(x)
                return (FakeQuantEWGS.apply(x, s, *q.code_range(), self.ewgs_delta, q.rounded_window),
                        _uniform_rebuild(x, s, q))
            return q(x, partial(round_ewgs, delta=self.ewgs_delta, span=q.qmax - q.qmin)), None
        return self._pege(x)

    def _pege(self, x):
        q = self.quantizer
        ratio, lam = (self.ratio, self.lam) if self.training else (1.0, 0.0)
        pull = lam > 0 and (self.scope == "all" or ratio > 0)
        if ratio <= 0 and not pull:
            if not self.fused:
                q(x)  # lets a lazily initialised quantizer see data
            return x, None
        if self.fused:
            s = q.step_size(x)
            mask = None
            if ratio < 1:
                error = (x - FakeQuantSTE.apply(x.detach(), s.detach(), *q.code_range())) if self.mask == "error" else None
                # a counter mask stays a recipe for compiled kernels, which compute it in their loop
                compiled = kernels.compiled_kernels_enabled()
                mask = replacement_mask(x, ratio, resolve_mask_policy(self.mask, compiled, x.numel()), seed=self.seed,
                                        error=error, lazy=compiled)
            if mask is None and not pull:
                return FakeQuantSTE.apply(x, s, *q.code_range(), q.rounded_window), _uniform_rebuild(x, s, q)
            coef = self._pull_coefficient(s.detach(), x.numel(), lam) if pull else None
            return (FakeQuantPEGE.apply(x, s, *q.code_range(), mask, coef, self.scope, self.target,
                                       q.rounded_window),
                    _uniform_rebuild(x, s, q, mask))
        xq = q(x, round_ste)
        if ratio >= 1 and not pull:
            return xq, None
        mask = None
        if ratio < 1:
            error = (x - xq) if self.mask == "error" else None
            mask = replacement_mask(x, ratio, resolve_mask_policy(self.mask, False), seed=self.seed, error=error)
        coef = self._pull_coefficient(q.step_size(x).detach(), x.numel(), lam) if pull else None
        return pege_mix(x, xq.to(x.dtype), mask, coef, self.scope), None

    def _pull_coefficient(self, s, numel, lam):
        """coef with dD/dx = coef * (x - Q(x)). scaled: D = lambda * mean(((x - sg Q(x)) / sg s)^2), coef =
        2 lambda / (s^2 N); plain: D = lambda / 2 * mean((x - sg Q(x))^2), coef = lambda / N (the author's
        u * (x - Q(x)) with the sum reduction). N = 1 for the sum reduction."""
        n = numel if self.reduction == "mean" else 1
        if self.form == "plain":
            return torch.full_like(s, lam / n)
        return (2.0 * lam / n) / (s * s)

    def extra_repr(self) -> str:
        extra = f", mask={self.mask}, curriculum={self.curriculum}" if self.estimator == "pege" else ""
        return f"estimator={self.estimator}{extra}"


class Rebuild:
    """fn(*args), remembered instead of computed: what a layer saves for backward in place of its
    fake-quantized input. The tensors' versions are taken now, so an in-place change before
    backward is an error (as autograd's own saved tensors behave), never a silently wrong gradient."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args
        self.versions = self._versions()

    def _versions(self) -> list[int]:
        return [a._version for a in self.args if isinstance(a, torch.Tensor)]

    def __call__(self) -> torch.Tensor:
        if self._versions() != self.versions:
            raise RuntimeError("a quantized layer's input was modified in place after the layer read it; "
                               "its fake-quantized value cannot be rebuilt for the backward pass (avoid the "
                               "in-place operation, e.g. use inplace=False)")
        return self.fn(*self.args)


def _uniform_rebuild(x, s, q, mask=None) -> Rebuild | None:
    """Q(x), or where(mask, Q(x), x), with the same kernel (so the same bits) as the fused forward;
    None without grad (nothing is saved; inference tensors have no versions)."""
    if not torch.is_grad_enabled():
        return None
    if mask is None:
        return Rebuild(kernels.impl["uniform_forward"], x.detach(), s.detach(), *q.code_range())
    return Rebuild(kernels.impl["mixed_forward"], x.detach(), s.detach(), *q.code_range(), mask)


@contextmanager
def saved_as_rebuild(xq: torch.Tensor, rebuild: Rebuild | None):
    """While active, autograd saves ``rebuild`` instead of ``xq`` (or a contiguous view of all of it,
    as F.linear saves a 3-d input) and calls it in backward: a quantized layer's input costs no
    memory beyond what its fake quantizer keeps. ``xq`` may be a dtype cast of the recipe's output
    (autocast's copy): the rebuilt value is cast the same way. A no-op without a recipe, without
    grad, or while torch.compile traces."""
    if rebuild is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        yield
        return
    # the hooks live as long as the saved tensors: they must hold xq's coordinates, never xq itself
    where = (xq.untyped_storage().data_ptr(), xq.storage_offset(), xq.numel(), xq.dtype)

    def pack(t):
        if t.is_contiguous() and (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) == where:
            return rebuild, t.shape
        return t

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        fn, shape = packed
        return fn().to(where[3]).view(shape)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def make_fake_quantizer(config, *, weight: bool, channels: int | None = None, seed: int = 0, axis: int = 0,
                        group_size: int | None = None) -> FakeQuantizer:
    """The factory from a config to the fake quantizer of a layer's weight (per channel along ``axis``, or
    per group of ``group_size`` inputs with ``channels`` groups) or input activation."""
    bits = config.w_bits if weight else config.a_bits
    name = config.w_quantizer if weight else config.a_quantizer
    quantizer = make_quantizer(name, bits, weight=weight, channels=channels, axis=axis, scale_init=config.scale_init,
                               group_size=group_size)
    return FakeQuantizer(quantizer, config, mask=config.w_mask if weight else config.a_mask, seed=seed)


class QuantLayer:
    """What QuantLinear and QuantConv2d share: the quantizers and the swap from a float layer."""

    weight_quantizer: FakeQuantizer
    input_quantizer: FakeQuantizer | None
    float_class: type[nn.Module]  # the float layer this one replaces
    weight_axis = 0  # the output-channel dimension of `weight` (per-channel step sizes run along it)
    supports_groups = False  # group-wise step sizes (PEGEConfig.group_size): Linear layers

    def _groups(self, group_size: int) -> int:
        rows, cols = self.weight.shape
        if cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide the {cols} input features of a "
                             f"{type(self).__name__} of shape {tuple(self.weight.shape)}")
        return rows * cols // group_size

    def _attach_quantizers(self, config, seed: int) -> None:
        self.register_load_state_dict_post_hook(QuantLayer._finish_packed_load)
        device = self.weight.device
        group = getattr(config, "group_size", None) if self.supports_groups else None
        channels = self.weight.shape[self.weight_axis] if group is None else self._groups(group)
        self.weight_quantizer = make_fake_quantizer(config, weight=True, channels=channels, seed=seed,
                                                    axis=self.weight_axis, group_size=group).to(device)
        self.input_quantizer = None
        if config.a_bits is not None:
            self.input_quantizer = make_fake_quantizer(config, weight=False, seed=seed ^ 0x5BD1E995).to(device)
        if device.type != "meta":
            self.init_weight_scale()

    def init_weight_scale(self) -> None:
        """(Re)initialise the weight step sizes from the current weights."""
        self.weight_quantizer.quantizer.initialize(self.weight)

    def reset_quantizers(self) -> None:
        """Give every quantizer buffer a defined value again, then take the weight scales from the weights."""
        self.weight_quantizer.quantizer.reset(signed=True)
        if self.input_quantizer is not None:
            self.input_quantizer.quantizer.reset()
        self.init_weight_scale()

    # -- packed low-bit storage ----------------------------------------------------------------
    @torch.no_grad()
    def packed_weight(self) -> torch.Tensor:
        """The weight's integer codes (shifted to start at 0) packed at the weight bit width."""
        q = self.weight_quantizer.quantizer
        if not q.is_initialized():
            q.initialize(self.weight)
        return pack_codes(q.codes(self.weight).to(torch.int64) - int(q.qmin), q.bits)

    def expected_packed_bytes(self) -> int:
        return packed_size(self.weight.numel() if "weight" in self._parameters else self._weight_shape.numel(),
                           self.weight_quantizer.quantizer.bits)

    def to_packed_form(self) -> None:
        """Replace the float `weight` parameter by a `weight_packed` uint8 buffer (for loading a packed checkpoint)."""
        self._weight_shape, self._weight_dtype = self.weight.shape, self.weight.dtype
        device = self.weight.device
        nbytes = self.expected_packed_bytes()
        del self.weight
        self.register_buffer("weight_packed", torch.empty(nbytes, dtype=torch.uint8, device=device))
        # a plain attribute, not a parameter: model-level weight init (GPT-2 rescales c_proj.weight) finds
        # it marked initialised and leaves it alone; from_packed_form replaces it with the real parameter
        self.weight = torch.empty(self._weight_shape, dtype=self._weight_dtype, device="meta")
        self.weight._is_hf_initialized = True
        self._is_hf_initialized = True  # the weight comes from the codes: transformers must not re-initialise it

    @torch.no_grad()
    def from_packed_form(self) -> None:
        """Rebuild the float latent `weight` = codes * scale from `weight_packed` (exactly the quantized weight)."""
        weight = self._unpacked_weight(self.weight_packed, self._weight_shape)
        del self.weight_packed
        self.weight = nn.Parameter(weight.to(self._weight_dtype))  # the model's dtype (codes * s in bf16 keeps 2-8-bit codes)

    def _unpacked_weight(self, packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        q = self.weight_quantizer.quantizer
        codes = unpack_codes(packed.to(q.scale_tensor().device), q.bits, shape.numel()).view(shape)
        return (codes.to(q.scale_tensor().dtype) + q.qmin) * q.broadcast_scale(q.scale_tensor(), codes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """A packed state dict (what save_pretrained writes; what Trainer reloads with load_state_dict) also
        loads into a layer that holds a float weight: the codes are unpacked once the step sizes have loaded
        (see _finish_packed_load), so the layer computes the saved quantized function."""
        packed_key = prefix + "weight_packed"
        if packed_key in state_dict and prefix + "weight" not in state_dict and "weight" in self._parameters:
            self._pending_packed = state_dict[packed_key]
            state_dict = {k: v for k, v in state_dict.items() if k != packed_key}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            missing_keys.remove(prefix + "weight")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @staticmethod
    @torch.no_grad()
    def _finish_packed_load(layer, incompatible_keys) -> None:
        packed = layer.__dict__.pop("_pending_packed", None)
        if packed is not None:
            layer.weight.copy_(layer._unpacked_weight(packed, layer.weight.shape))

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _forward_quantized(self, op, x: torch.Tensor) -> torch.Tensor:
        """op(Q(x), Q(weight), bias), keeping for backward a recipe for Q(x) rather than Q(x) itself."""
        xq, rebuild = (x, None) if self.input_quantizer is None else self.input_quantizer.quantize(x)
        weight = self.quantized_weight()  # after the input: the order the random masks are drawn in
        if rebuild is not None and torch.is_autocast_enabled(xq.device.type):
            xq = xq.to(torch.get_autocast_dtype(xq.device.type))  # autocast's cast inside op, made here to rebuild it too
        with saved_as_rebuild(xq, rebuild):
            return op(xq, weight, self.bias)

    @classmethod
    def from_float(cls, layer: nn.Module, config, seed: int = 0):
        with torch.device("meta"):
            new = cls._empty_like(layer)
        new.weight, new.bias = layer.weight, layer.bias
        new.train(layer.training)
        new._attach_quantizers(config, seed)
        return new


class QuantLinear(QuantLayer, nn.Linear):
    float_class = nn.Linear
    supports_groups = True

    @classmethod
    def _empty_like(cls, layer: nn.Linear):
        return cls(layer.in_features, layer.out_features, bias=layer.bias is not None)

    def forward(self, x):
        return self._forward_quantized(F.linear, x)


class QuantConv2d(QuantLayer, nn.Conv2d):
    float_class = nn.Conv2d

    @classmethod
    def _empty_like(cls, layer: nn.Conv2d):
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                   bias=layer.bias is not None, padding_mode=layer.padding_mode)

    def forward(self, x):
        return self._forward_quantized(self._conv_forward, x)


QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}
# modules that are never quantized on purpose (lookup tables, normalisation): not reported as skipped
NEVER_QUANTIZED = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def register_quant_layer(quant_cls: type[QuantLayer]) -> None:
    """Quantize every ``quant_cls.float_class`` layer with ``quant_cls`` (e.g. transformers' Conv1D)."""
    QUANT_LAYERS[quant_cls.float_class] = quant_cls


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def matches_any(name: str, patterns) -> bool:
    """transformers' rule for modules_to_not_convert: a pattern matches from the start up to a module
    boundary ("layer.1" matches "layer.1.attn", not "layer.11.attn"), as a regex with the same boundary
    ("layer.*" matches "layer.11.attn"), or as a suffix ("fc1" matches "model.layers.3.fc1")."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", name) or name.endswith(p) for p in patterns)


def unquantized_weights(model: nn.Module, skip=()) -> list[str]:
    """Modules holding a weight matrix (a parameter of 2 or more dimensions) that no quant layer
    covers and that were not kept float on purpose (``skip``, embeddings, norms): e.g. MoE experts
    stored as 3-D tensors, Conv1d/Conv3d, custom layers."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLayer, *NEVER_QUANTIZED)) or type(m) in QUANT_LAYERS or name in skip:
            continue
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            out.append(name or type(m).__name__)
    return out


def layers_to_skip(model: nn.Module, config, keep_float=()) -> set[str]:
    """Names of the float layers that stay full precision: the stem (the first layer, when it reads
    the model input rather than an embedding table), the head (the last layer) and the layers matching
    ``config.modules_to_not_convert`` or ``keep_float`` (patterns, see ``matches_any``)."""
    order = [(name, m) for name, m in model.named_modules()]
    layers = [name for name, m in order if type(m) in QUANT_LAYERS]
    patterns = [*(config.modules_to_not_convert or ()), *keep_float]
    skip = {name for name in layers if matches_any(name, patterns)}
    if layers and config.skip_head:
        skip.add(layers[-1])
    if layers and config.skip_stem:
        first = next(i for i, (name, _) in enumerate(order) if name == layers[0])
        if not any(isinstance(m, nn.Embedding) for _, m in order[:first]):
            skip.add(layers[0])
    return skip


def quantize(model: nn.Module, config, skip: set[str] | None = None) -> nn.Module:
    """Swap every nn.Linear / nn.Conv2d of ``model`` (in place) for its PEGE counterpart, except the
    layers in ``skip`` (default: :func:`layers_to_skip`). Returns the model."""
    skip = layers_to_skip(model, config) if skip is None else skip
    targets = [(name, m) for name, m in model.named_modules() if type(m) in QUANT_LAYERS and name not in skip]
    for message in unused_settings(model, config, [name for name, _ in targets]):
        warnings.warn(message, stacklevel=2)
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        seed = zlib.crc32(name.encode()) ^ int(config.seed)
        layer_config = config.for_layer(name) if hasattr(config, "for_layer") else config
        try:
            setattr(parent, child, QUANT_LAYERS[type(layer)].from_float(layer, layer_config, seed))
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    return model


def unused_settings(model: nn.Module, config, targets: list[str]) -> list[str]:
    """What in ``config`` would change nothing in ``model`` (quantizing the layers ``targets``), one message each:
    modules_to_not_convert and layer_overrides patterns that match no Linear / Conv2d layer (a typo keeps nothing
    float), and a group_size when no quantized layer is a Linear (group-wise step sizes are Linear layers' only)."""
    layers = [name for name, m in model.named_modules() if type(m) in QUANT_LAYERS or isinstance(m, QuantLayer)]
    kind = type(model).__name__
    out = []
    for field in ("modules_to_not_convert", "layer_overrides"):
        unmatched = [p for p in (getattr(config, field, None) or ()) if not any(matches_any(n, [p]) for n in layers)]
        if unmatched:
            out.append(f"PEGEConfig.{field}: {', '.join(map(repr, unmatched))} match(es) no Linear or Conv2d layer of "
                       f"{kind}, so they change nothing")
    group = getattr(config, "group_size", None)
    if group and targets and not any(QUANT_LAYERS[type(model.get_submodule(n))].supports_groups for n in targets):
        out.append(f"PEGEConfig.group_size={group}: group-wise step sizes are for Linear layers, and {kind} quantizes "
                   "none (every weight keeps per-channel step sizes)")
    return out


@torch.no_grad()
def refresh_weight_scales(model: nn.Module) -> None:
    """Weight quantizers whose step size follows their weights (w_quantizer "minmax" or "symmetric", once they
    have observed them in training) re-observe them now: saving and export call it before they read step sizes,
    which a forward would otherwise have left one optimizer step behind."""
    for layer in model.modules():
        if isinstance(layer, QuantLayer) and layer.weight_quantizer is not None and "weight" in layer._parameters:
            refresh = getattr(layer.weight_quantizer.quantizer, "refresh", None)
            if refresh is not None:
                refresh(layer.weight)


def fake_quantizers(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, FakeQuantizer))


def set_progress(model: nn.Module, progress: float) -> None:
    """Set training progress p = t / T in [0, 1] on every PEGE fake quantizer (drives r(t))."""
    if not isinstance(progress, (int, float)) or not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    for fq in fake_quantizers(model):
        fq.set_progress(float(progress))
