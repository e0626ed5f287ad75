"""PEGEConfig: every option of a PEGE quantization, validated when it is built."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.curriculum import LAMBDA_SCHEDULES, MASK_POLICIES, SCHEDULES
from .quant.estimators import DISCRETIZATION_SCOPES, ESTIMATORS
from .quant.quantizers import MAX_BITS, MIN_BITS, QUANTIZERS, SCALE_INITS

QUANT_METHOD = "pege"
REDUCTIONS = ("mean", "sum")


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"PEGEConfig.{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _bits(field: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        extra = " (or None to keep activations in full precision)" if optional else ""
        raise ValueError(f"PEGEConfig.{field} must be an integer from {MIN_BITS} to {MAX_BITS}{extra}; got {value!r}")


def _number(field: str, value, *, low: float = 0.0, high: float | None = None, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"PEGEConfig.{field} must be a number {bound}; got {value!r}")


class PEGEConfig(QuantizationConfigMixin):
    """Configuration of PEGE quantization-aware training (Zhao, arXiv 2509.00097).

    Args:
        w_bits / a_bits: weight / input-activation bit width, 2..8 (a_bits=None: float activations).
        estimator: the backward rule: "pege" (default), "ste" or "ewgs".
        w_quantizer / a_quantizer: forward quantizers: "lsq" (default), "minmax", "pact" (activations).
        scale_init: how step sizes start from data: "lsq" (2 mean|x| / sqrt(qmax)) or "mse".
        curriculum: replacement schedule r(t): "log" (default), "linear", "cosine", "instant".
        alpha: curvature of the log curriculum (> 0). ramp_fraction: share of training spent ramping r to 1.
        w_mask / a_mask: which elements are replaced first: "progressive", "bernoulli", "error".
        discretization_lambda: weight of the discretization-error term D (>= 0).
        lambda_schedule: "constant", "follow" (lambda * r(t)) or "ramp" (lambda while r(t) < 1, then 0).
        discretization_scope: D over "all" elements or only the "replaced" ones.
        discretization_reduction: D as the "mean" (default) or "sum" over a tensor's elements.
        ewgs_delta: EWGS' fixed delta (>= 0).
        skip_stem / skip_head: keep the first / last layer in full precision (default True).
        modules_to_not_convert: more module names to keep in full precision.
        seed: seed of the progressive masks.
    """

    def __init__(
        self,
        w_bits: int = 4,
        a_bits: int | None = 4,
        estimator: str = "pege",
        w_quantizer: str = "lsq",
        a_quantizer: str = "lsq",
        scale_init: str = "lsq",
        curriculum: str = "log",
        alpha: float = 9.0,
        ramp_fraction: float = 0.75,
        w_mask: str = "progressive",
        a_mask: str = "bernoulli",
        discretization_lambda: float = 1e-4,
        lambda_schedule: str = "constant",
        discretization_scope: str = "all",
        discretization_reduction: str = "mean",
        ewgs_delta: float = 1e-3,
        skip_stem: bool = True,
        skip_head: bool = True,
        modules_to_not_convert: list[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.w_bits, self.a_bits = w_bits, a_bits
        self.estimator = estimator
        self.w_quantizer, self.a_quantizer, self.scale_init = w_quantizer, a_quantizer, scale_init
        self.curriculum, self.alpha, self.ramp_fraction = curriculum, alpha, ramp_fraction
        self.w_mask, self.a_mask = w_mask, a_mask
        self.discretization_lambda, self.lambda_schedule = discretization_lambda, lambda_schedule
        self.discretization_scope, self.discretization_reduction = discretization_scope, discretization_reduction
        self.ewgs_delta = ewgs_delta
        self.skip_stem, self.skip_head = skip_stem, skip_head
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.seed = seed
        kwargs.pop("quant_method", None)
        for key, value in kwargs.items():  # fields written by newer versions, kept for the round trip
            setattr(self, key, value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field and what it allows."""
        _bits("w_bits", self.w_bits)
        _bits("a_bits", self.a_bits, optional=True)
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("w_quantizer", self.w_quantizer, ("lsq", "minmax"))
        _choice("a_quantizer", self.a_quantizer, QUANTIZERS)
        _choice("scale_init", self.scale_init, SCALE_INITS)
        _choice("curriculum", self.curriculum, SCHEDULES)
        _number("alpha", self.alpha, open_low=True)
        _number("ramp_fraction", self.ramp_fraction, high=1.0)
        _choice("w_mask", self.w_mask, MASK_POLICIES)
        _choice("a_mask", self.a_mask, MASK_POLICIES)
        _number("discretization_lambda", self.discretization_lambda)
        _choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _choice("discretization_scope", self.discretization_scope, DISCRETIZATION_SCOPES)
        _choice("discretization_reduction", self.discretization_reduction, REDUCTIONS)
        _number("ewgs_delta", self.ewgs_delta)
        for field in ("skip_stem", "skip_head"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"PEGEConfig.{field} must be True or False; got {getattr(self, field)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"PEGEConfig.seed must be an integer; got {self.seed!r}")

    @property
    def name(self) -> str:
        """A short tag such as 'W2A2-pege'."""
        a = "A32" if self.a_bits is None else f"A{self.a_bits}"
        return f"W{self.w_bits}{a}-{self.estimator}"
