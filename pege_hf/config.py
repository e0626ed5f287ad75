"""PEGEConfig: every option of a PEGE quantization, with its metadata, validated when it is built.

The fields are the one source of truth: their metadata (help, choices, range) drives validation here
and the command-line options of `pege train` (same names as the fields, see ``config_fields``).
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.curriculum import AUTO_MASK, LAMBDA_SCHEDULES, MASK_POLICIES, SCHEDULES
from .quant.modules import matches_any
from .quant.estimators import DISCRETIZATION_FORMS, DISCRETIZATION_SCOPES, DISCRETIZATION_TARGETS, ESTIMATORS
from .quant.quantizers import INITIALISED_QUANTIZERS, MAX_BITS, MIN_BITS, QUANTIZERS, SCALE_INITS, WEIGHT_QUANTIZERS

QUANT_METHOD = "pege"
REDUCTIONS = ("mean", "sum")
OVERRIDABLE = ("w_bits", "a_bits", "group_size", "estimator", "w_quantizer", "a_quantizer")
# the fields only one estimator reads, and those only activation quantization reads
ESTIMATOR_FIELDS = {
    "pege": ("curriculum", "alpha", "ramp_fraction", "w_mask", "a_mask", "discretization_lambda", "lambda_schedule",
             "lambda_start", "discretization_form", "discretization_target", "discretization_scope",
             "discretization_reduction"),
    "ewgs": ("ewgs_delta",),
}
ACTIVATION_FIELDS = ("a_quantizer", "a_mask")


def unused_fields(given, config: "PEGEConfig") -> list[str]:
    """Of the field names ``given``, those ``config`` never reads, in field order: another estimator's (PEGE's
    curriculum for STE, EWGS' delta for PEGE), the activation quantizer's with float activations, and within PEGE
    what its other settings switch off (the ramp and masks with the instant curriculum, alpha without a log
    schedule, lambda_start without a log/exp lambda schedule, the error term's form with lambda 0 throughout). With
    layer_overrides, a field is unused only if no layer's settings read it."""
    variants = [config, *(replace(config, layer_overrides=None, **o) for o in (config.layer_overrides or {}).values())]
    unused = set.intersection(*(_unused_by(c) for c in variants))
    return [f.name for f in fields(PEGEConfig) if f.name in unused and f.name in given]


def _unused_by(c: "PEGEConfig") -> set[str]:
    out = {f for other, names in ESTIMATOR_FIELDS.items() if other != c.estimator for f in names}
    if c.a_bits is None:
        out |= set(ACTIVATION_FIELDS)
    if c.w_quantizer not in INITIALISED_QUANTIZERS and (c.a_bits is None or c.a_quantizer not in INITIALISED_QUANTIZERS):
        out.add("scale_init")  # observed (min-max) and dynamic step sizes are not initialised
    if c.estimator != "pege":
        return out
    timed = c.lambda_schedule in ("log", "exp")
    if c.curriculum == "instant":
        out |= {"ramp_fraction", "w_mask", "a_mask"}
    if c.curriculum != "log" and c.lambda_schedule != "log":
        out.add("alpha")
    if not timed:
        out.add("lambda_start")
    if c.discretization_lambda == 0 and (not timed or c.lambda_start == 0):
        out |= {"lambda_schedule", "lambda_start", "discretization_form", "discretization_target",
                "discretization_scope", "discretization_reduction"}
    return out


def _option(default, help: str, *, choices: tuple | None = None, low: float | None = None, high: float | None = None,
            open_low: bool = False, optional: bool = False, cli: bool = True):
    """A config field with the metadata validation and the CLI read."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "optional": optional, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check(name: str, value, meta: dict, kind: type) -> None:
    """Raise ValueError naming the field and what it allows unless ``value`` fits the field."""
    if value is None and meta["optional"]:
        return
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise ValueError(f"PEGEConfig.{name} must be one of {', '.join(map(repr, meta['choices']))}; got {value!r}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"PEGEConfig.{name} must be True or False; got {value!r}")
        return
    if kind in (int, float):
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        low, high = meta["low"], meta["high"]
        ok = ok and (low is None or (value > low if meta["open_low"] else value >= low)) and (high is None or value <= high)
        if not ok:
            what = "an integer" if kind is int else "a number"
            bound = "" if low is None else f" {'>' if meta['open_low'] else '>='} {low}"
            bound += "" if high is None else f"{' and' if bound else ''} <= {high}"
            if kind is int and low is not None and high is not None:
                bound = f" from {low} to {high}"
            extra = f" (or None: {meta['optional']})" if isinstance(meta["optional"], str) else ""
            raise ValueError(f"PEGEConfig.{name} must be {what}{bound}{extra}; got {value!r}")
        return
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"PEGEConfig.{name} must be a list of module names or patterns; got {value!r}")


@dataclass(kw_only=True, eq=True, repr=False)
class PEGEConfig(QuantizationConfigMixin):
    """Configuration of PEGE quantization-aware training (Zhao, arXiv 2509.00097).

    Every field is validated when the config is built (ValueError naming the field); unknown keys are
    refused. ``pege train`` exposes each field as ``--field-name``. See docs/method.md for the method.
    """

    quant_method: str = _option(QUANT_METHOD, "always 'pege'", choices=(QUANT_METHOD,), cli=False)
    w_bits: int = _option(4, "weight bit width", low=MIN_BITS, high=MAX_BITS)
    a_bits: int | None = _option(4, "input-activation bit width (none: float activations)", low=MIN_BITS,
                                 high=MAX_BITS, optional="keep activations in full precision")
    estimator: str = _option("pege", "backward rule", choices=ESTIMATORS)
    w_quantizer: str = _option("lsq", "weight forward quantizer", choices=WEIGHT_QUANTIZERS)
    a_quantizer: str = _option("lsq", "activation forward quantizer", choices=QUANTIZERS)
    scale_init: str = _option("mse", "step-size initialisation from data (mse: the step size with the least "
                              "quantization error, coarse-to-fine; lsq: 2 mean|x| / sqrt(qmax))", choices=SCALE_INITS)
    curriculum: str = _option("log", "replacement schedule r(t)", choices=SCHEDULES)
    alpha: float = _option(9.0, "curvature of the log curriculum", low=0.0, open_low=True)
    ramp_fraction: float = _option(0.75, "share of training spent ramping r(t) to 1", low=0.0, high=1.0)
    w_mask: str = _option("progressive", "which weight elements are replaced first", choices=MASK_POLICIES)
    a_mask: str = _option(AUTO_MASK, "which activation elements are replaced (bernoulli: fresh random bytes per "
                          "step; counter: a Bernoulli mask hashed from the element index, which compiled kernels "
                          "compute in their loop; auto: counter under compiled kernels, else bernoulli)",
                          choices=(AUTO_MASK, *MASK_POLICIES))
    discretization_lambda: float = _option(0.1, "weight of the discretization-error term D (the final value "
                                           "for the log/exp schedules)", low=0.0)
    lambda_schedule: str = _option("constant", "lambda(t): constant, follow (lambda r(t)), ramp (0 once r = 1), "
                                   "log or exp (from lambda_start to lambda over training)", choices=LAMBDA_SCHEDULES)
    lambda_start: float = _option(0.0, "lambda at the start of the log/exp schedules (exp needs > 0)", low=0.0)
    discretization_form: str = _option("scaled", "D = lambda mean(((x - Q) / s)^2) (scaled) or lambda / 2 "
                                       "sum((x - Q)^2) (plain: the author's u (x - Q) gradient)",
                                       choices=DISCRETIZATION_FORMS)
    discretization_target: str = _option("latent", "what D's gradient reaches: the latent values, the "
                                         "quantizer's step size, or both", choices=DISCRETIZATION_TARGETS)
    discretization_scope: str = _option("all", "D over all elements or only the replaced ones",
                                        choices=DISCRETIZATION_SCOPES)
    discretization_reduction: str = _option("mean", "D as the mean or the sum over a tensor's elements",
                                            choices=REDUCTIONS)
    ewgs_delta: float = _option(1e-3, "EWGS' fixed delta", low=0.0)
    skip_stem: bool = _option(True, "keep the first layer in full precision")
    skip_head: bool = _option(True, "keep the last layer in full precision")
    modules_to_not_convert: list[str] | None = _option(None, "more module names (or patterns) to keep in full "
                                                      "precision", optional=True)
    group_size: int | None = _option(None, "Linear weights: one step size per group of this many input features "
                                     "(none: per output channel)", low=1, optional="one step size per output channel")
    layer_overrides: dict | None = _option(None, "module-name pattern -> {w_bits, a_bits, group_size, estimator, "
                                           "w_quantizer, a_quantizer} for the matching layers (mixed precision); "
                                           "the first matching pattern wins", optional=True, cli=False)
    seed: int = _option(0, "seed of the progressive masks")

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_not_convert, tuple):
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field and what it allows."""
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.metadata, _kind(f))
        self._check_overrides()
        if self.lambda_schedule == "exp" and self.lambda_start <= 0:
            raise ValueError("PEGEConfig.lambda_start must be > 0 for lambda_schedule='exp'; got "
                             f"{self.lambda_start!r}")

    def __repr__(self) -> str:
        return QuantizationConfigMixin.__repr__(self)

    def _check_overrides(self) -> None:
        for pattern, override in (self.layer_overrides or {}).items():
            if not isinstance(pattern, str) or not isinstance(override, dict):
                raise ValueError("PEGEConfig.layer_overrides must map module-name patterns to dicts of settings; got "
                                 f"{pattern!r}: {override!r}")
            unknown = sorted(set(override) - set(OVERRIDABLE))
            if unknown:
                raise ValueError(f"PEGEConfig.layer_overrides[{pattern!r}] sets {', '.join(map(repr, unknown))}; "
                                 f"a layer can override {', '.join(OVERRIDABLE)}")
            try:
                replace(self, layer_overrides=None, **override)
            except ValueError as e:
                raise ValueError(f"PEGEConfig.layer_overrides[{pattern!r}]: {e}") from None

    def for_layer(self, name: str) -> "PEGEConfig":
        """The config of the layer called ``name``: this one with the first matching layer_overrides entry
        applied (patterns follow modules_to_not_convert's rule)."""
        for pattern, override in (self.layer_overrides or {}).items():
            if matches_any(name, [pattern]):
                return replace(self, layer_overrides=None, **override)
        return self

    @property
    def name(self) -> str:
        """A short tag such as 'W2A2-pege'."""
        a = "A32" if self.a_bits is None else f"A{self.a_bits}"
        return f"W{self.w_bits}{a}-{self.estimator}"


def _kind(f) -> type:
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if text.startswith("list"):
        return list
    return kinds.get(text.split(" ")[0].split("|")[0].strip(), str)


def config_fields() -> list[tuple[str, type, Any, dict]]:
    """(name, type, default, metadata) of every field a user sets, in declaration order: what the CLI
    generates its options from."""
    out = []
    for f in fields(PEGEConfig):
        if f.metadata.get("cli", True):
            default = f.default if f.default is not MISSING else f.default_factory()
            out.append((f.name, _kind(f), default, dict(f.metadata)))
    return out


_FIELD_NAMES = frozenset(f.name for f in fields(PEGEConfig))


def _refuse_unknown_keys(init):
    @functools.wraps(init)
    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _FIELD_NAMES)
        if unknown:
            known = ", ".join(sorted(_FIELD_NAMES - {"quant_method"}))
            raise ValueError(f"PEGEConfig got unknown key(s) {', '.join(map(repr, unknown))}; known keys: {known}")
        init(self, **kwargs)
    return __init__


PEGEConfig.__init__ = _refuse_unknown_keys(PEGEConfig.__init__)
