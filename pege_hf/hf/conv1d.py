"""QuantConv1D: transformers' Conv1D (GPT-2 style: weight stored (in, out), y = x W + b) with PEGE."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..quant.modules import QuantLayer, register_quant_layer


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = torch.addmm(bias, x.reshape(-1, x.size(-1)), weight)
    return out.view(*x.shape[:-1], weight.size(1))


class QuantConv1D(QuantLayer, Conv1D):
    float_class = Conv1D
    weight_axis = 1  # output features are the weight's second dimension

    @classmethod
    def _empty_like(cls, layer: Conv1D):
        return cls(layer.nf, layer.nx)

    def forward(self, x):
        return self._forward_quantized(_conv1d, x)


register_quant_layer(QuantConv1D)
