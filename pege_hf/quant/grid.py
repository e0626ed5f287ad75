"""Where latent weights sit relative to their quantization grid, and how many weight codes change.

QAT keeps a float latent weight w behind every quantized weight Q(w) = s * round(clamp(w / s, qmin, qmax)).
How far w sits from its grid point, and whether training still moves codes, tells apart an estimator that
parks weights on grid points (PEGE's discretization pull) from one that leaves them spread or piled up at the
rounding boundaries (STE's oscillation). Used by `pege bench grid` and logged per epoch by `pege train`.
"""

from __future__ import annotations

import torch

from .modules import QuantLayer
from .quantizers import quantize_codes

GRID_BINS = 50


def grid_position(w: torch.Tensor, s: torch.Tensor, qmin: float, qmax: float) -> dict:
    """In float64: the summed distance |v - round(v)| of the in-range normalised values v = w / s (mean 0.25 when
    they spread evenly between grid points, 0 when every weight sits on one), a histogram of v - round(v) over
    [-0.5, 0.5], the element count and how many lie inside [qmin, qmax]."""
    v = w.detach().double() / s.detach().double()
    inside = (v >= qmin) & (v <= qmax)
    offset = (v - torch.round(v))[inside]
    return {"n": v.numel(), "in_range": int(inside.sum()), "distance_sum": float(offset.abs().sum()),
            "histogram": torch.histc(offset, bins=GRID_BINS, min=-0.5, max=0.5).long().tolist()}


@torch.no_grad()
def weight_codes_and_positions(model: torch.nn.Module) -> tuple[dict, dict]:
    """Per quantized layer (by module name): the weight's integer codes, and its grid_position."""
    codes, positions = {}, {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLayer) and "weight" in layer._parameters:
            q, w = layer.weight_quantizer.quantizer, layer.weight.detach()
            s = q.broadcast_scale(q.scale_tensor(), w)
            codes[name] = quantize_codes(w, s, q.qmin, q.qmax)
            positions[name] = grid_position(w, s, float(q.qmin), float(q.qmax))
    return codes, positions


def summarize(positions: dict) -> dict:
    """Whole-model numbers from per-layer grid_position results."""
    n = sum(p["n"] for p in positions.values())
    in_range = sum(p["in_range"] for p in positions.values())
    return {"weights": n, "mean_distance": sum(p["distance_sum"] for p in positions.values()) / max(in_range, 1),
            "clipped_fraction": 1 - in_range / max(n, 1),
            "histogram": [sum(col) for col in zip(*(p["histogram"] for p in positions.values()))]}


def codes_changed(before: dict, after: dict) -> float:
    """Share of weight codes that differ between two weight_codes_and_positions results of the same model."""
    n = sum(c.numel() for c in after.values())
    return sum(int((before[k] != c).sum()) for k, c in after.items()) / max(n, 1)
