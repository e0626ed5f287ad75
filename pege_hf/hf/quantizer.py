"""The transformers side: quant_method "pege" as an HfQuantizer.

Lifecycle inside `from_pretrained`:
  before weight loading  swap Linear/Conv2d for QuantLinear/QuantConv2d on the meta model; for a
                         packed checkpoint the float `weight` becomes a `weight_packed` uint8 buffer
  weight loading         transformers fills parameters and buffers by name
  after weight loading   float source: give every quantizer a defined state and take the weight
                         step sizes from the loaded weights; packed source: unpack the codes into
                         the latent weights (= the quantized weights) and set r = 1
`save_pretrained` stores each quantized layer's weight as packed codes plus its step sizes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from ..config import QUANT_METHOD, PEGEConfig
from transformers.utils import logging

from ..quant.modules import QuantLayer, layers_to_skip, refresh_weight_scales, set_progress, unquantized_weights
from ..quant.modules import quantize as quantize_module
from ..quant.quantizers import DynamicQuantizer, fake_quantize
from . import conv1d  # noqa: F401  (registers transformers' Conv1D with the layer swap)

logger = logging.get_logger(__name__)


QUANTIZER_KEYS = r"\.(weight|input)_quantizer\.quantizer\.(scale|clip|qstate)$"


def quant_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLayer)]


class PEGEHfQuantizer(HfQuantizer):
    """Quantization-aware training with PEGE (or STE / EWGS) and packed low-bit checkpoints."""

    requires_calibration = False
    quantization_config: PEGEConfig

    def __init__(self, quantization_config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = PEGEConfig.from_dict(quantization_config)
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, device_map=None, **kwargs):
        refuse_offload(device_map)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # weights stay float latents; quantization happens in the layers' forward

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs):
        cfg = self.quantization_config
        refuse_offload(kwargs.get("device_map"))  # "auto" is only resolved into a map by now
        swap_layers(model, cfg)
        # a float checkpoint has no quantizer state: the after-hook creates it, so it is not "missing"
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {QUANTIZER_KEYS}
        if self.pre_quantized:
            for _, layer in quant_layers(model):
                layer.to_packed_form()
            check_packed_checkpoint(model, kwargs.get("checkpoint_files") or [])
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs):
        for name, layer in quant_layers(model):
            if self.pre_quantized:
                check_loaded_layer(name, layer)
                layer.from_packed_form()
            else:
                layer.reset_quantizers()
        set_progress(model, 1.0 if self.pre_quantized else 0.0)
        attach_model_card(model)
        return model

    def get_state_dict_and_metadata(self, model):
        refresh_weight_scales(model)
        state_dict = model.state_dict()
        for name, layer in quant_layers(model):
            prefix = f"{name}." if name else ""
            state_dict.pop(prefix + "weight")
            state_dict[prefix + "weight_packed"] = layer.packed_weight()
        return state_dict, {"pege_format": "packed-v1"}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return dequantize(model)


def refuse_offload(device_map) -> None:
    """QAT needs every quantized weight resident on a compute device: a device_map that offloads part of
    the model to disk (or to the CPU beside accelerators) is refused before any weight is loaded."""
    if not isinstance(device_map, dict):
        return
    places = {str(v) for v in device_map.values()}
    offloaded = sorted(places & {"disk", "meta"})
    if "cpu" in places and len(places - {"disk", "meta", "cpu"}) > 0:
        offloaded.append("cpu (beside accelerators)")
    if offloaded:
        raise ValueError(f"PEGE quantization-aware training cannot run with parts of the model offloaded to "
                         f"{', '.join(offloaded)} (device_map); load it on devices that hold all of it, or shard "
                         "it with FSDP")


def swap_layers(model: nn.Module, config: PEGEConfig) -> None:
    """The layer swap with transformers' conventions: `_keep_in_fp32_modules` and modules_to_not_convert
    (patterns) stay float; weights no quant layer can hold are named in one warning; a model in which
    nothing would be quantized is an error (never a "pege" checkpoint)."""
    keep = [*(getattr(model, "_keep_in_fp32_modules", None) or ()), *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    skip = layers_to_skip(model, config, keep_float=keep)
    quantize_module(model, config, skip=skip)
    left = unquantized_weights(model, skip)
    if not quant_layers(model):
        raise ValueError(f"PEGE found no layer to quantize in {type(model).__name__}: it quantizes nn.Linear, "
                         "nn.Conv2d and transformers' Conv1D outside the float stem/head and modules_to_not_convert"
                         + (f"; weights it cannot hold: {_names(left)}" if left else ""))
    if left:
        logger.warning(f"PEGE leaves {len(left)} module(s) with weights in full precision (no quantized layer type "
                       f"for them): {_names(left)}")


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_header(path) -> dict:
    """{tensor name: (dtype, shape)} of a safetensors file; a clear error for a corrupt or truncated one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise ValueError(f"checkpoint file {path} is corrupt or truncated ({e}); re-download or re-save it") from e


def check_packed_checkpoint(model: nn.Module, checkpoint_files) -> None:
    """Before any weight is read: each quantized layer's packed tensor has the size its shape and bit
    width need."""
    header, where = {}, {}
    for path in checkpoint_files:
        if str(path).endswith(".safetensors"):
            for key, info in _read_header(path).items():
                header[key], where[key] = info, path
    if not header:
        return
    for name, layer in quant_layers(model):
        key = f"{name}.weight_packed" if name else "weight_packed"
        expected = layer.expected_packed_bytes()
        bits = layer.weight_quantizer.quantizer.bits
        if key not in header:
            continue  # stored under another name (some models rename keys on save): checked after loading
        dtype, shape = header[key]
        if dtype != "U8" or shape != (expected,):
            raise ValueError(f"tensor {key} in {where[key]} is {dtype} of shape {list(shape)}, but a {bits}-bit "
                             f"weight of shape {list(layer._weight_shape)} packs into U8 of shape [{expected}]: "
                             f"the checkpoint does not match its quantization_config (w_bits={bits})")


def check_loaded_layer(name: str, layer: QuantLayer) -> None:
    """A packed layer must hold the bytes its shape and bits need, and finite non-zero step sizes.

    A negative step size is valid: LSQ learns s without a sign constraint, and s * round(clamp(x / s)) is
    then the grid mirrored, which the codes were packed against (training has produced one: the STE W4A4
    benchmark run, layer3.1.conv2)."""
    expected = layer.expected_packed_bytes()
    packed = layer.weight_packed
    if not getattr(packed, "_is_hf_initialized", False):
        raise ValueError(f"tensor {name}.weight_packed is missing from the checkpoint: it is not a PEGE packed "
                         f"checkpoint for this model and quantization_config")
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"tensor {name}.weight_packed has {packed.numel()} {packed.dtype} values; a "
                         f"{layer.weight_quantizer.quantizer.bits}-bit weight of shape {tuple(layer._weight_shape)} "
                         f"needs {expected} uint8 bytes: the checkpoint does not match its quantization_config")
    for qname, fq in (("weight_quantizer", layer.weight_quantizer), ("input_quantizer", layer.input_quantizer)):
        if fq is None or isinstance(fq.quantizer, DynamicQuantizer):  # dynamic: nothing stored to check
            continue
        scale = fq.quantizer.scale_tensor()
        if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
            raise ValueError(f"tensor {name}.{qname}: step sizes must be finite and non-zero; the checkpoint is corrupt")


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quant layer by a plain nn.Linear / nn.Conv2d holding its quantized weight. Input
    activations that were quantized keep a fixed fake-quantization pre-hook, so the function is unchanged."""
    for name, layer in quant_layers(model):
        with torch.device("meta"):
            plain = layer._empty_like(layer)
            plain.__class__ = layer.float_class
        layer.eval()
        plain.weight = nn.Parameter(layer.quantized_weight().detach())
        plain.bias = layer.bias
        plain.train(layer.training)
        if layer.input_quantizer is not None:
            plain.register_forward_pre_hook(_frozen_input_quantizer(layer.input_quantizer.quantizer))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model


def _frozen_input_quantizer(q):
    scale, qmin, qmax = q.scale_tensor().clone(), q.qmin.clone(), q.qmax.clone()

    def hook(module, args):
        x = args[0]
        return (fake_quantize(x, scale.to(x.device), qmin.to(x.device), qmax.to(x.device), torch.round), *args[1:])

    return hook


def quantize(model: nn.Module, config: PEGEConfig) -> nn.Module:
    """`pege_hf.quantize`: the PEGE layer swap on any nn.Module. On a transformers PreTrainedModel it
    also attaches the PEGE quantizer, so `save_pretrained` writes a packed checkpoint."""
    if not isinstance(config, PEGEConfig):
        raise TypeError(f"config must be a PEGEConfig, got {type(config).__name__}")
    swap_layers(model, config)
    if isinstance(model, PreTrainedModel):
        model.hf_quantizer = PEGEHfQuantizer(config, pre_quantized=False)
        model.config.quantization_config = config
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD
        attach_model_card(model)
    return model


MODEL_HOOKS: list = []  # called on every model the quantizer sets up; pege_hf.hub adds its model card's


def attach_model_card(model) -> None:
    for hook in MODEL_HOOKS:
        hook(model)


def register() -> None:
    """Register quant_method "pege" with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PEGEConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(PEGEHfQuantizer)
