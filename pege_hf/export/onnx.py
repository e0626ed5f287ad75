"""ONNX export of a trained PEGE model that ONNX Runtime runs on integer kernels.

Each quantized layer becomes

    QuantizeLinear(x, s_a, zp) -> Clip(code range) -> ConvInteger / MatMulInteger(codes, zp)
        -> Cast(float) -> Mul(s_a * s_w * bn_scale) -> Add(folded bias)

(a conv with enough inputs per output runs as an in-graph im2col, one Gather, and ONNX Runtime's
MatMulIntegerToFloat, which does the same integer product and rescale faster than its ConvInteger kernel),

with the weight's integer codes (the ones the packed checkpoint holds) stored as INT4 when they fit,
else INT8, and a Cast to INT8 in front of the integer op (ONNX Runtime's ConvInteger and MatMulInteger
take 8-bit weights only; the Cast of a constant is folded when the session loads). The activation keeps
its exact code range (2-bit unsigned: 0..3) through a Clip on the uint8 codes. A BatchNorm that reads a
quantized conv's output folds into the per-channel output multiplier and bias, which is exact: the
integer accumulator is untouched. Layers without an activation quantizer cannot run on integer kernels;
they keep a float op fed by DequantizeLinear of their codes and the report says so.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import QuantConv2d, QuantLayer, refresh_weight_scales
from ..quant.quantizers import quantize_codes
from .output import check_output

TORCH_OPSET = 20  # the newest opset the TorchScript exporter writes
OPSET = 21  # the file's opset: the first with INT4 tensors (the ops used are unchanged from 20)
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "NhwcQLinearConv")


# ---------------------------------------------------------------------------------- pure math


def fold_batchnorm(mult: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(mult', bias') with bn(mult * acc + bias) = mult' * acc + bias' per channel (computed in float64)."""
    inv = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    base = torch.zeros_like(mult, dtype=torch.float64) if bias is None else bias.double()
    return mult.double() * inv, (base - bn.running_mean.double()) * inv + bn.bias.double()


def weight_codes(layer: QuantLayer) -> torch.Tensor:
    """The weight's integer codes in [qmin, qmax] (int8), from the quantizer's own `codes`: the same
    codes `packed_weight` packs."""
    q = layer.weight_quantizer.quantizer
    return q.codes(layer.weight.detach()).to(torch.int8)


def activation_range(layer: QuantLayer) -> tuple[float, int, int, int]:
    """(step size, zero point, lowest, highest uint8 code) of the layer's input quantizer: codes in
    [qmin, qmax] are held as uint8 codes + zp, zp = -qmin (0 for an unsigned activation)."""
    q = layer.input_quantizer.quantizer
    qmin, qmax = int(q.qmin), int(q.qmax)
    return float(q.scale_tensor().reshape(())), -qmin, 0, qmax - qmin


def gain_for(codes: torch.Tensor) -> int:
    """The integer g that widens the codes to fill int8 (g * codes, scale / g: the same weights). QLinearConv
    holds the folded bias as an int32 in accumulator units; g makes that unit g times finer, so rounding the
    bias moves the requantized output by at most 0.5 / g units of s_a * s_w (a 2-bit layer: 1/126)."""
    peak = int(codes.abs().max()) if codes.numel() else 0
    return max(1, 127 // peak) if peak else 1


def requant_params(ideal: float, mult: float, ties: list[float], gain: int, reach: int) -> tuple[int, float]:
    """(B, M'): an int32 bias and a requantization multiplier with which round((acc + B) * M') picks the
    same code as the exact round((acc + ideal) * mult) for every reachable accumulator (a multiple of
    ``gain`` within +-gain*reach) — ``ideal`` = b / unit is the folded bias in accumulator units, ``ties``
    the rounding ties k + 0.5 of the output codes. Plain rounding of the bias alone flips codes whose
    float value sits within half an accumulator unit of a tie (a zero input gives the bias alone). Keeps
    M' = mult when it already works; else the middle of the interval that works. Falls back to
    (round(ideal), mult) when no B near ``ideal`` admits one."""
    acc = gain * np.arange(-reach, reach + 1, dtype=np.float64)
    t = np.asarray(ties, dtype=np.float64)[:, None]
    above = (acc + ideal) * mult > t  # the side of each tie the exact value is on
    for bias in sorted({math.floor(ideal), math.ceil(ideal)}, key=lambda v: abs(v - ideal)):
        lo, hi = _multiplier_interval(acc + bias, t, above)
        if lo < hi:
            margin = 1e-6 * abs(mult)
            return int(bias), float(mult if lo + margin < mult < hi - margin else (lo + hi) / 2)
    return int(round(ideal)), float(mult)


def _multiplier_interval(base: np.ndarray, t: np.ndarray, above: np.ndarray) -> tuple[float, float]:
    """The open interval of M with (base * M > t) == above for all entries ((-inf, inf) when unconstrained;
    empty, lo >= hi, when impossible)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = t / base
    pos, neg, zero = base > 0, base < 0, base == 0
    if np.any(zero & (above != (0 > t))):
        return 1.0, 0.0
    lower = np.concatenate([bound[pos & above], bound[neg & ~above]])
    upper = np.concatenate([bound[pos & ~above], bound[neg & above]])
    return (lower.max() if lower.size else -np.inf), (upper.min() if upper.size else np.inf)


def storage_type(codes: torch.Tensor) -> str:
    """The narrowest integer type ONNX stores and ONNX Runtime casts for the codes: "int4" or "int8"."""
    return "int4" if codes.numel() and int(codes.min()) >= -8 and int(codes.max()) <= 7 else "int8"


# ---------------------------------------------------------------------------------- export modules


class _IntegerLayerFn(torch.autograd.Function):
    """Forward: the float value of the integer graph (codes, exact range, rescale); symbolic: that graph."""

    @staticmethod
    def forward(ctx, x, codes, mult, bias, scale, zp, lo, hi, conv, codes_in, gemm):
        if codes_in:  # the previous layer already wrote this layer's input codes (uint8, offset by zp)
            xc = x.float() - zp.float()
        else:
            xc = quantize_codes(x, scale, lo.float() - zp.float(), hi.float() - zp.float())
        acc = _integer_op(xc, codes.float(), conv)
        return acc * _channel_view(mult, acc, conv) + _channel_view(bias, acc, conv)

    @staticmethod
    def symbolic(g, x, codes, mult, bias, scale, zp, lo, hi, conv, codes_in, gemm):
        xq = x if codes_in else g.op("Clip", g.op("QuantizeLinear", x, scale, zp), lo, hi)
        if gemm is not None:
            return _im2col_matmul(g, xq, codes, mult, bias, zp, conv, *gemm)
        w, w_zp = _unsigned_weights(g, codes)
        if conv is None:
            acc = g.op("MatMulInteger", xq, w, zp, w_zp)
        else:
            stride, pad, dil, groups = conv
            acc = g.op("ConvInteger", xq, w, zp, w_zp, strides_i=stride, pads_i=pad + pad, dilations_i=dil,
                       group_i=groups)
        shape = [1, -1, 1, 1] if conv is not None else [-1]
        mult = g.op("Reshape", mult, g.op("Constant", value_t=torch.tensor(shape)))
        bias = g.op("Reshape", bias, g.op("Constant", value_t=torch.tensor(shape)))
        return g.op("Add", g.op("Mul", g.op("Cast", acc, to_i=1), mult), bias)


def _const(g, value, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _im2col_matmul(g, xq, codes, mult, bias, zp, conv, hw, signed):
    """A conv as im2col + MatMulIntegerToFloat (the exact int32 accumulator, then * mult + bias): the input
    codes go NHWC, padded with the zero point (code 0) and flattened to (N, Hp*Wp, Cin); one Gather with the
    (H_out*W_out, kh*kw) indices (y*sh + dy*dh)*Wp + x*sw + dx*dw builds the (H_out*W_out) x (kh*kw*Cin)
    matrix whose rows MatMulIntegerToFloat multiplies with the (kh*kw*Cin) x Cout codes."""
    stride, pad, dil, _ = conv
    cout, cin, kh, kw = codes.type().sizes()
    (h, w), (ph, pw) = hw, pad
    hp, wp = h + 2 * ph, w + 2 * pw
    h_out, w_out = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1, (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
    offs = [dy * dil[0] * wp + dx * dil[1] for dy in range(kh) for dx in range(kw)]
    # the indices come from nodes the session folds when it loads, not stored (they would outweigh 2-bit codes)
    starts = g.op("Add", g.op("Unsqueeze", g.op("Range", _const(g, 0), _const(g, h_out * stride[0] * wp),
                                                _const(g, stride[0] * wp)), _const(g, [1])),
                  g.op("Range", _const(g, 0), _const(g, w_out * stride[1]), _const(g, stride[1])))
    idx = g.op("Add", g.op("Reshape", starts, _const(g, [-1, 1])), _const(g, [offs]))
    nhwc = g.op("Transpose", xq, perm_i=[0, 2, 3, 1])
    padded = g.op("Pad", nhwc, _const(g, [0, ph, pw, 0, 0, ph, pw, 0]), zp)
    flat = g.op("Reshape", padded, _const(g, [-1, hp * wp, cin]))
    cols = g.op("Reshape", g.op("Gather", flat, idx, axis_i=1), _const(g, [-1, h_out * w_out, kh * kw * cin]))
    matrix = g.op("Reshape", g.op("Transpose", codes, perm_i=[2, 3, 1, 0]), _const(g, [kh * kw * cin, cout]))
    if signed:
        w, w_zp = g.op("Cast", matrix, to_i=3), _const(g, 0, torch.int8)
    else:
        w, w_zp = _unsigned_weights(g, matrix)
    y = g.op("com.microsoft::MatMulIntegerToFloat", cols, w, _const(g, 1.0, torch.float32), mult, zp, w_zp, bias)
    return g.op("Transpose", g.op("Reshape", y, _const(g, [-1, h_out, w_out, cout])), perm_i=[0, 3, 1, 2])


# im2col + MatMulIntegerToFloat beats ConvInteger from this many inputs per output (k*k*Cin) up: measured on
# the ResNet-20 models (2 threads, batch 64, interleaved): Cin=32/64 3x3 convs 1.1-5x faster, Cin=16 1.3x slower
# (its Gather moves 16-byte rows)
IM2COL_MIN_INPUTS = 288


def uses_im2col(layer: QuantLayer) -> bool:
    """Whether the export runs this quantized conv as im2col + MatMulIntegerToFloat (else ConvInteger)."""
    if not isinstance(layer, QuantConv2d) or layer.groups != 1:
        return False
    return layer.weight[0].numel() >= IM2COL_MIN_INPUTS


def fits_int16_pairs(codes: torch.Tensor, x_max: int) -> bool:
    """Whether uint8 inputs up to ``x_max`` times int8 ``codes`` are safe on x86 AVX2's u8 x s8 kernel, which
    adds products in pairs into int16 with saturation (else the weights go uint8 + 128, the u8 x u8 kernel)."""
    peak = int(codes.abs().max()) if codes.numel() else 0
    return 2 * x_max * peak <= 32767


def _unsigned_weights(g, codes):
    """codes + 128 as UINT8 with zero point 128 (the same integers): ONNX Runtime's ConvInteger and
    MatMulInteger take a much faster MLAS path for uint8 than for int8 weights (measured: 3.5x on a 3x3
    conv). Computed from the stored codes by Cast/Add nodes that the session folds when it loads."""
    wide = g.op("Cast", codes, to_i=6)  # INT32
    shifted = g.op("Add", wide, g.op("Constant", value_t=torch.tensor(128, dtype=torch.int32)))
    return g.op("Cast", shifted, to_i=2), g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))


def _integer_op(x, w, conv):
    if conv is None:
        return torch.matmul(x, w)  # a linear layer's codes are held transposed (in x out), as MatMulInteger reads them
    stride, pad, dil, groups = conv
    return F.conv2d(x, w, None, stride, pad, dil, groups)


def _channel_view(v, acc, conv):
    return v.view(1, -1, 1, 1) if conv is not None else v


class IntegerLayer(nn.Module):
    """A quantized layer on ConvInteger / MatMulInteger, or im2col + MatMulIntegerToFloat for a conv with at
    least IM2COL_MIN_INPUTS inputs per output: input codes in their exact range, the exact int32
    accumulator, then the float per-channel rescale s_a * s_w (times a folded BatchNorm's gamma / sigma)
    and bias. Used where a float consumer reads the output (a residual add), which needs it exactly."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        scale, zp, lo, hi = activation_range(layer)
        codes = weight_codes(layer)
        self.register_buffer("codes", codes if isinstance(layer, QuantConv2d) else codes.t().contiguous())
        w_scale = layer.weight_quantizer.quantizer.scale_tensor().double()
        self.register_buffer("mult", (w_scale * scale).float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        for name, value in (("zp", zp), ("lo", lo), ("hi", hi)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.uint8))
        self.conv = None
        if isinstance(layer, QuantConv2d):
            self.conv = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        self.w_bits, self.a_bits = layer.weight_quantizer.quantizer.bits, layer.input_quantizer.quantizer.bits
        self.codes_in = False
        self.im2col = uses_im2col(layer)

    @torch.no_grad()
    def fold(self, bn: nn.BatchNorm2d) -> None:
        mult, bias = fold_batchnorm(self.mult, self.bias, bn)
        self.mult, self.bias = mult.float(), bias.float()

    def forward(self, x):
        bias = self.bias if self.bias is not None else torch.zeros_like(self.mult)
        gemm = None
        if self.im2col:  # the input's height and width size the Gather indices (static in the graph)
            gemm = (tuple(int(v) for v in x.shape[-2:]), fits_int16_pairs(self.codes, int(self.hi)))
        return _IntegerLayerFn.apply(x, self.codes, self.mult, bias, self.scale, self.zp, self.lo, self.hi, self.conv,
                                     self.codes_in, gemm)


class _QLinearConvFn(torch.autograd.Function):
    """Forward: ONNX Runtime's QLinearConv arithmetic in torch (the output requantized into the next
    layer's input codes); symbolic: [QuantizeLinear -> Clip ->] QLinearConv -> Clip."""

    @staticmethod
    def forward(ctx, x, codes, w_scale, bias_int, scale, zp, lo, hi, y_scale, y_zp, y_lo, y_hi, conv, codes_in, gain):
        xq = x.float() if codes_in else torch.clamp(torch.round(x / scale) + zp.float(), lo.float(), hi.float())
        acc = _integer_op(xq - zp.float(), codes.float() * gain, conv) + bias_int.view(1, -1, 1, 1).float()
        y = torch.round(acc * (scale * w_scale / y_scale).view(1, -1, 1, 1)) + y_zp.float()
        return torch.clamp(y, y_lo.float(), y_hi.float()).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, codes, w_scale, bias_int, scale, zp, lo, hi, y_scale, y_zp, y_lo, y_hi, conv, codes_in, gain):
        xq = x if codes_in else g.op("Clip", g.op("QuantizeLinear", x, scale, zp), lo, hi)
        w_zp = g.op("Constant", value_t=torch.zeros(codes.type().sizes()[0], dtype=torch.int8))
        wide = g.op("Mul", g.op("Cast", codes, to_i=6), g.op("Constant", value_t=torch.tensor(gain, dtype=torch.int32)))
        w = g.op("Cast", wide, to_i=3)  # INT8 codes * gain, folded when the session loads
        stride, pad, dil, groups = conv
        y = g.op("QLinearConv", xq, scale, zp, w, w_scale, w_zp, y_scale, y_zp, bias_int,
                 strides_i=stride, pads_i=pad + pad, dilations_i=dil, group_i=groups)
        return g.op("Clip", y, y_lo, y_hi)


def _u8(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.uint8)


class QLinearConvLayer(nn.Module):
    """A quantized conv whose output, after an optional BatchNorm and ReLU, is only the next quantized
    layer's input: ONNX Runtime's QLinearConv requantizes the accumulator straight into those codes (their
    exact range; the ReLU is the saturation at the zero point). Its weight codes carry per-channel scales
    s_w times the folded BatchNorm's gamma / sigma; the folded bias is an int32 in accumulator units."""

    def __init__(self, layer: QuantConv2d):
        super().__init__()
        scale, zp, lo, hi = activation_range(layer)
        self.register_buffer("codes", weight_codes(layer))
        self.w_scale = layer.weight_quantizer.quantizer.scale_tensor().double()
        self.bias_f = torch.zeros_like(self.w_scale) if layer.bias is None else layer.bias.detach().double()
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        for name, value in (("zp", zp), ("lo", lo), ("hi", hi)):
            self.register_buffer(name, _u8(value))
        self.conv = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        self.w_bits, self.a_bits = layer.weight_quantizer.quantizer.bits, layer.input_quantizer.quantizer.bits
        self.codes_in = False

    @torch.no_grad()
    def fold(self, bn: nn.BatchNorm2d) -> None:
        self.w_scale, self.bias_f = fold_batchnorm(self.w_scale, self.bias_f, bn)

    @torch.no_grad()
    def requantize_into(self, target: "QLinearConvLayer | IntegerLayer", relu: bool) -> None:
        """Write ``target``'s input codes: its step size and zero point, clipped to its code range (from the
        zero point up when a ReLU sits between)."""
        target.codes_in = True
        self.gain = gain_for(self.codes)
        w_scale = self.w_scale / self.gain
        self.register_buffer("y_scale", target.scale.clone())
        self.register_buffer("y_zp", target.zp.clone())
        self.register_buffer("y_lo", target.zp.clone() if relu else target.lo.clone())
        self.register_buffer("y_hi", target.hi.clone())
        bias, w_scale = self._requant(self.scale.double() * w_scale)
        self.register_buffer("bias_int", bias)
        self.register_buffer("w_scale_t", w_scale)

    def _requant(self, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel (requant_params): the int32 bias and the weight scale giving QLinearConv's multiplier."""
        zp, s_next, s_in = int(self.y_zp), float(self.y_scale), float(self.scale)
        ties = [k + 0.5 for k in range(int(self.y_lo) - zp, int(self.y_hi) - zp)]
        x_reach = max(abs(int(self.lo) - int(self.zp)), abs(int(self.hi) - int(self.zp)))
        reach = (self.codes.abs().flatten(1).sum(1) * x_reach).tolist()
        bias, scale = [], []
        for b, u, r in zip(self.bias_f.tolist(), unit.tolist(), reach):
            bias_c, mult = requant_params(b / u, u / s_next, ties, self.gain, int(r))
            bias.append(bias_c)
            scale.append(mult * s_next / s_in)  # QLinearConv's multiplier is x_scale * w_scale / y_scale
        return torch.tensor(bias, dtype=torch.int32), torch.tensor(scale, dtype=torch.float32)

    def forward(self, x):
        return _QLinearConvFn.apply(x, self.codes, self.w_scale_t, self.bias_int, self.scale, self.zp, self.lo,
                                    self.hi, self.y_scale, self.y_zp, self.y_lo, self.y_hi, self.conv, self.codes_in,
                                    self.gain)


class DequantizedLayer(nn.Module):
    """A quantized layer whose input is not quantized: a float op on DequantizeLinear(codes, s_w)."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        q = layer.weight_quantizer.quantizer
        self.register_buffer("codes", weight_codes(layer))
        self.register_buffer("w_scale", q.scale_tensor().float())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.conv = None
        if isinstance(layer, QuantConv2d):
            self.conv = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        self.w_bits, self.a_bits = q.bits, None

    def forward(self, x):
        bias = self.bias if self.bias is not None else torch.zeros(self.codes.shape[0])
        return _DequantizedLayerFn.apply(x, self.codes, self.w_scale, bias, self.conv)


class _DequantizedLayerFn(torch.autograd.Function):
    """Forward: op(x, codes * s_w) + bias; symbolic: the float op on DequantizeLinear(codes, s_w, axis 0)."""

    @staticmethod
    def forward(ctx, x, codes, w_scale, bias, conv):
        w = codes.float() * w_scale.view((-1,) + (1,) * (codes.dim() - 1))
        return F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)

    @staticmethod
    def symbolic(g, x, codes, w_scale, bias, conv):
        w = g.op("DequantizeLinear", codes, w_scale, axis_i=0)
        if conv is None:
            return g.op("Gemm", x, w, bias, transB_i=1)
        stride, pad, dil, groups = conv
        return g.op("Conv", x, w, bias, strides_i=stride, pads_i=pad + pad, dilations_i=dil, group_i=groups)


# ---------------------------------------------------------------------------------- graph surgery


@dataclass
class LayerReport:
    name: str
    kernel: str  # "integer" or "float"
    op: str  # the ONNX op the export emits for it
    w_bits: int
    a_bits: int | None
    weight_storage: str
    bn_folded: str | None = None
    reason: str = ""
    runs_as: list[str] = field(default_factory=list)  # ops of ONNX Runtime's optimized graph

    def line(self) -> str:
        ran = f"; ONNX Runtime runs {'+'.join(self.runs_as) or '?'}" if self.runs_as else ""
        bn = f", {self.bn_folded} folded" if self.bn_folded else ""
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.name}: {self.kernel} {self.op}, W{self.w_bits}A{self.a_bits or 32}, "
                f"{self.weight_storage} codes{bn}{why}{ran}")


@dataclass
class ExportReport:
    path: str
    bytes: int
    layers: list[LayerReport]
    float_layers: list[str]

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.bytes:,} bytes)"] + ["  " + r.line() for r in self.layers]
        if self.float_layers:
            lines.append("  float (not quantized in the model): " + ", ".join(self.float_layers))
        return "\n".join(lines)


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLayer)]


def require_quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """The model's quant layers; ValueError for a model without any (a float model has no codes to export)."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no PEGE quantized layers (a float model?): there are no integer codes to export")
    return layers


@torch.no_grad()
def trace_readers(model: nn.Module, example: torch.Tensor, forward) -> dict[str, list[str]]:
    """{module name: names of the modules that read its output} over one forward of ``example``, for the
    quantized layers, BatchNorms and ReLUs (hooks on both sides: the model's own wiring decides; outputs
    are kept alive so no tensor id is reused). Functional consumers (a residual add) are not seen."""
    kinds = (QuantLayer, nn.BatchNorm2d, nn.ReLU)
    made, readers, hooks = {}, {}, []

    def read(name, tensor):
        source = made.get(id(tensor))
        if source is not None:
            readers.setdefault(source[0], []).append(name)

    for name, m in model.named_modules():
        if isinstance(m, kinds):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: read(n, args[0])))
            hooks.append(m.register_forward_hook(lambda mod, args, out, n=name: made.__setitem__(id(out), (n, out))))
    try:
        forward(model, example)
    finally:
        for h in hooks:
            h.remove()
    return readers


def follow(model: nn.Module, readers: dict[str, list[str]], name: str) -> tuple[str | None, str | None, str | None]:
    """(BatchNorm, ReLU, next quantized layer) along conv -> [BN] -> [ReLU] -> quantized conv, each link the
    only module reading the previous output; None where the chain stops."""
    found = {"bn": None, "relu": None}
    current = name
    for kind, cls in (("bn", nn.BatchNorm2d), ("relu", nn.ReLU)):
        nxt = readers.get(current, [])
        if len(nxt) == 1 and isinstance(model.get_submodule(nxt[0]), cls):
            found[kind] = current = nxt[0]
    nxt = readers.get(current, [])
    target = None
    if len(nxt) == 1 and isinstance(model.get_submodule(nxt[0]), QuantConv2d) and \
            model.get_submodule(nxt[0]).input_quantizer is not None and current != name:
        target = nxt[0]
    return found["bn"], found["relu"], target


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def float_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _float_report(name: str, layer: QuantLayer) -> LayerReport:
    return LayerReport(name, "float", "Conv" if isinstance(layer, QuantConv2d) else "Gemm",
                       layer.weight_quantizer.quantizer.bits, None, "",
                       reason="its input activation is not quantized (a_bits=None), so ONNX Runtime has no integer "
                              "kernel for it; its weight is DequantizeLinear of the codes")


def _plan(model: nn.Module, readers) -> dict[str, tuple]:
    """{quantized conv: (BatchNorm, ReLU, next quantized layer)} for the convs with a quantized input."""
    return {name: follow(model, readers, name) for name, m in quant_layers(model)
            if isinstance(m, QuantConv2d) and m.input_quantizer is not None}


def integer_model(model: nn.Module, example: torch.Tensor, forward) -> tuple[nn.Module, list[LayerReport]]:
    """A copy of ``model`` with every quant layer swapped for its export module: each BatchNorm reading a
    quantized conv is folded into it, conv -> [BN] -> [ReLU] -> quantized conv chains requantize on
    QLinearConv, and a conv read by float ops keeps its exact accumulator on ConvInteger."""
    plan = _plan(model, trace_readers(model, example, forward))
    model = copy.deepcopy(model).eval()
    new, reports = {}, {}
    for name, layer in quant_layers(model):
        bits = (layer.weight_quantizer.quantizer.bits, None if layer.input_quantizer is None else
                layer.input_quantizer.quantizer.bits)
        if layer.input_quantizer is None:
            new[name], reports[name] = DequantizedLayer(layer), _float_report(name, layer)
            continue
        if isinstance(layer.padding, str):
            raise ValueError(f"layer {name}: padding={layer.padding!r} is not supported by the ONNX export")
        requant = name in plan and plan[name][2] is not None
        new[name] = QLinearConvLayer(layer) if requant else IntegerLayer(layer)
        op = "QLinearConv" if requant else "MatMulIntegerToFloat" if uses_im2col(layer) else \
            "ConvInteger" if isinstance(layer, QuantConv2d) else "MatMulInteger"
        reports[name] = LayerReport(name, "integer", op, *bits, "")
    for name, (bn, relu, target) in plan.items():
        if bn is not None:
            new[name].fold(model.get_submodule(bn))
            _set(model, bn, nn.Identity())
            reports[name].bn_folded = bn
        if target is not None:
            new[name].requantize_into(new[target], relu is not None)
            if relu is not None:
                _set(model, relu, nn.Identity())
            reports[name].reason = f"output requantized into {target}'s input codes"
        else:
            reports[name].reason = "exact int32 accumulator, rescaled in float for the float consumer"
    for name, module in new.items():
        _set(model, name, module)
    return model, list(reports.values())


# ---------------------------------------------------------------------------------- writing


class _Logits(nn.Module):
    """model(pixel_values) -> logits tensor (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        out = self.model(pixel_values)
        return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def example_input(model: nn.Module) -> torch.Tensor:
    """A one-image input for an image classifier whose config names num_channels and image_size."""
    config = getattr(model, "config", None)
    channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
    if not isinstance(channels, int) or not isinstance(size, int):
        raise ValueError("the ONNX export needs an image model whose config has num_channels and image_size "
                         "(or pass example_input)")
    return torch.zeros(1, channels, size, size)


def torch_to_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, fold_constants: bool = True) -> None:
    """torch.onnx.export (TorchScript exporter, opset 20) with a dynamic batch dimension."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and constant-folding chatter
        torch.onnx.export(_Logits(module).eval(), (example,), str(path), dynamo=False, opset_version=TORCH_OPSET,
                          input_names=["pixel_values"], output_names=["logits"], do_constant_folding=fold_constants,
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})


def _codes_initializers(graph, layers: dict[str, IntegerLayer | DequantizedLayer]):
    """{initializer name: export module} for each layer's codes (matched by the exact int8 contents)."""
    from onnx import numpy_helper

    by_bytes = {m.codes.numpy().tobytes(): m for m in layers.values()}
    found = {}
    for init in graph.initializer:
        if init.data_type == 3:  # INT8
            m = by_bytes.get(numpy_helper.to_array(init).tobytes())
            if m is not None:
                found[init.name] = m
    return found


def narrow_weights(model_proto, layers: dict) -> dict[str, str]:
    """Store every layer's codes that fit in 4 bits as an INT4 initializer read through Cast(-> INT8)
    (ConvInteger / MatMulInteger take 8-bit weights; ONNX Runtime folds the Cast of a constant when the
    session loads). Returns {initializer name: storage type} for the layers' codes."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    codes = _codes_initializers(graph, layers)
    kinds = {}
    for i, init in enumerate(list(graph.initializer)):
        if init.name not in codes:
            continue
        kinds[init.name] = storage_type(codes[init.name].codes)
        if kinds[init.name] == "int4":
            name, array = init.name, numpy_helper.to_array(init)
            graph.initializer[i].CopyFrom(helper.make_tensor(name + "_int4", TensorProto.INT4, array.shape,
                                                             array.flatten().tolist()))
            graph.node.insert(0, helper.make_node("Cast", [name + "_int4"], [name], to=TensorProto.INT8,
                                                  name=name + "_widen"))
    return kinds


def compact_constants(graph) -> None:
    """Short names for the Constant nodes and their outputs (the exporter's scoped names, about 100 bytes each,
    outweigh the small shape and index constants themselves); every reference is renamed with them."""
    names = {}
    for node in graph.node:
        if node.op_type == "Constant":
            short = f"k{len(names)}"
            node.name, names[node.output[0]] = "", short
            node.output[0] = short
    for node in graph.node:
        node.input[:] = [names.get(x, x) for x in node.input]
    for info in graph.value_info:
        info.name = names.get(info.name, info.name)


def write_atomic(path: Path, data: bytes, overwrite: bool) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it into place."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------- checking


def optimized_ops(path: str | os.PathLike, threads: int = 1) -> list[tuple[str, str]]:
    """(node name, op type) of the graph ONNX Runtime's CPU provider actually runs, after its full
    optimisation (read back from SessionOptions.optimized_model_filepath)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # the "optimized model is hardware specific" warning is expected here
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    return [(n.name, n.op_type) for n in graph.node]


def layer_scopes(graph, reports: list[LayerReport]) -> dict[str, str]:
    """{layer name: node-name prefix of its ops}: the exporter names a module's nodes /model/.../conv1/Op,
    so the prefix is read off the node that consumes the layer's codes."""
    scopes = {}
    for r in reports:
        codes = f"model.{r.name}.codes"
        node = next(n for n in graph.node if codes in n.input and not n.name.endswith("_widen"))
        scopes[r.name] = node.name.rsplit("/", 1)[0] + "/"
    return scopes


def check_runs_integer(path, reports: list[LayerReport], scopes: dict[str, str]) -> None:
    """Fill each layer's ``runs_as`` from ONNX Runtime's optimized graph; raise if a layer exported for an
    integer kernel runs without one."""
    ops = optimized_ops(path)
    for r in reports:
        r.runs_as = sorted({op for name, op in ops if name.startswith(scopes[r.name])})
        if r.kernel == "integer" and not set(r.runs_as) & set(INTEGER_OPS):
            raise RuntimeError(f"layer {r.name}: ONNX Runtime runs {r.runs_as or 'nothing'} instead of an integer kernel")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
                example: torch.Tensor | None = None) -> ExportReport:
    """Write ``model`` (a PEGE-quantized model, in eval mode) as an ONNX file that ONNX Runtime runs on
    integer kernels for every layer with quantized weights and input; returns the report (what each
    layer became, and what ONNX Runtime's optimized graph runs for it)."""
    import onnx

    path = Path(path)
    check_output(path, model, folder=False, overwrite=overwrite)
    require_quant_layers(model)
    example = example_input(model) if example is None else example
    refresh_weight_scales(model)
    model = model.eval()
    exported, reports = integer_model(model, example, lambda m, x: m(x))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch_to_onnx(exported, example, raw, fold_constants=False)  # keeps the codes as stored initializers
        proto = onnx.load(str(raw))
        layers = dict((n, m) for n, m in exported.named_modules() if hasattr(m, "codes"))
        kinds = narrow_weights(proto, layers)
        compact_constants(proto.graph)
        for r in reports:
            r.weight_storage = kinds.get(f"model.{r.name}.codes", "?")
        proto.opset_import[0].version = OPSET
        onnx.checker.check_model(proto)
        final = Path(tmp) / "model.onnx"
        onnx.save(proto, str(final))
        check_runs_integer(final, reports, layer_scopes(proto.graph, reports))
        write_atomic(path, final.read_bytes(), overwrite)
    floats = [n for n in float_layer_names(model)]
    return ExportReport(str(path), path.stat().st_size, reports, floats)
