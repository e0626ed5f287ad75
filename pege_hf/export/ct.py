"""compressed-tensors export of a trained PEGE model: a checkpoint folder that plain transformers (with the
compressed-tensors package, without pege_hf) loads and runs.

Each quantized nn.Linear becomes a "pack-quantized" layer: the PEGE weight codes (never re-quantized from
the float weights) packed into int32 at the trained bit width with the per-output-channel step sizes as
``weight_scale`` (symmetric int, strategy "channel"; compressed-tensors' int range [-2^(b-1), 2^(b-1)-1] is
PEGE's signed weight range), or with group-wise step sizes (PEGEConfig.group_size=G) as strategy "group",
``group_size`` G and a (out, in / G) ``weight_scale``. A quantized input activation becomes a static
per-tensor input quantizer with the trained step size: symmetric for a signed PEGE activation, asymmetric
with zero point -2^(b-1) for an unsigned one (codes 0..2^b-1 are int codes -2^(b-1)..2^(b-1)-1 shifted by
the zero point). A dynamic one (a_quantizer="dynamic_token" / "dynamic_tensor") becomes compressed-tensors'
dynamic symmetric quantizer with strategy "token" / "tensor", which computes its step size differently:
max|x| / (qmax + 1/2) with codes in [-2^(b-1), 2^(b-1)-1] (the full range: the largest positive element
clips to qmax), where PEGE's is max|x| / qmax (the largest element lands on +-qmax; -2^(b-1) unused). Both
clamp, then round half to even. The export cannot change how compressed-tensors computes it, so the served
activations differ from the trained ones by that step-size ratio (8 bits: 127 / 127.5; 4 bits: 7 / 7.5);
the report says so. (compressed-tensors' "token" also reduces only the dimensions after the first two: a
2-D input gets one step size per tensor, PEGE's one per row.)
transformers' CompressedTensorsHfQuantizer (default dequantize=False) applies the scheme to the model, so
the static input quantization runs in its forward; loading with dequantize=True would drop it.

Layers the format cannot express (Conv2d, transformers' Conv1D) are refused; the ONNX export takes them.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..quant.modules import QuantLayer, QuantLinear, refresh_weight_scales
from ..quant.quantizers import DynamicQuantizer
from .onnx import quant_layers, require_quant_layers, weight_codes
from .output import check_output

FORMAT = "pack-quantized"
ONNX_HINT = "export it with --format onnx (pege_hf.export.export_onnx) instead"


@dataclass
class CTReport:
    path: str
    bytes: int
    layers: dict[str, str]  # layer name -> its scheme, e.g. "W4 channel, A8 static tensor asymmetric"

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.bytes:,} bytes, compressed-tensors {FORMAT}); load it with plain "
                 "from_pretrained (dequantize=True would drop the static input quantization)"]
        return "\n".join(lines + [f"  {name}: {scheme}" for name, scheme in self.layers.items()])


# ---------------------------------------------------------------------------------- checks


def check_expressible(model: nn.Module) -> None:
    """ValueError naming the first layer compressed-tensors cannot hold (it packs nn.Linear weights only)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"the compressed-tensors export needs a transformers PreTrainedModel, "
                         f"got {type(model).__name__}")
    for name, layer in require_quant_layers(model):
        if type(layer) is not QuantLinear:
            raise ValueError(f"layer {name} ({layer.float_class.__name__}) cannot be expressed in compressed-tensors, "
                             f"which packs nn.Linear weights only; {ONNX_HINT}")
        check_initialized(name, layer)
        check_step_sizes(name, layer)


def check_initialized(name: str, layer: QuantLayer) -> None:
    """Every quantizer holds trained (or at least initialised) step sizes; an untouched one has none to export."""
    for kind, fq in (("weight", layer.weight_quantizer), ("input", layer.input_quantizer)):
        if fq is not None and not fq.quantizer.is_initialized():
            raise ValueError(f"layer {name}: its {kind} quantizer was never initialised (no step size to export); "
                             "run the model on data (training or calibration) first")


def expected_weight_scales(layer: QuantLayer) -> int:
    """How many weight step sizes the layer's scheme holds: one per output channel, or one per group."""
    q = layer.weight_quantizer.quantizer
    rows = layer.weight.shape[layer.weight_axis]
    return rows if q.group_size is None else layer.weight.numel() // q.group_size


def check_step_sizes(name: str, layer: QuantLayer) -> None:
    """One stored weight step size per output channel (or per group of group_size inputs) and one stored input
    step size or a dynamic input quantizer: what compressed-tensors' channel / group and tensor / token schemes
    hold."""
    n, want = layer.weight_quantizer.quantizer.scale_tensor().numel(), expected_weight_scales(layer)
    if n != want:
        kind = "output channels" if layer.weight_quantizer.quantizer.group_size is None else "groups"
        raise ValueError(f"layer {name}: {n} weight step sizes for {want} {kind}; the compressed-tensors export writes "
                         "one per output channel or one per group")
    if layer.input_quantizer is None or is_dynamic(layer):
        return
    n = layer.input_quantizer.quantizer.scale_tensor().numel()
    if n != 1:
        raise ValueError(f"layer {name}: {n} input step sizes; the compressed-tensors export writes one per tensor "
                         "only")


# ---------------------------------------------------------------------------------- schemes


def activation_signed(layer: QuantLayer) -> bool:
    return int(layer.input_quantizer.quantizer.qmin) < 0


def is_dynamic(layer: QuantLayer) -> bool:
    return layer.input_quantizer is not None and isinstance(layer.input_quantizer.quantizer, DynamicQuantizer)


def weight_args(layer: QuantLayer) -> dict:
    q = layer.weight_quantizer.quantizer
    args = {"num_bits": q.bits, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    if q.group_size is not None:
        args.update(strategy="group", group_size=q.group_size)
    return args


def input_args(layer: QuantLayer) -> dict | None:
    """Int quantization of the layer's input: static per tensor with the trained step size, or dynamic symmetric
    per token / tensor (None: float input)."""
    if layer.input_quantizer is None:
        return None
    q = layer.input_quantizer.quantizer
    if is_dynamic(layer):
        return {"num_bits": q.bits, "type": "int", "symmetric": True, "strategy": "token" if q.per_token else "tensor",
                "dynamic": True}
    return {"num_bits": q.bits, "type": "int", "symmetric": activation_signed(layer), "strategy": "tensor",
            "dynamic": False}


def describe(layer: QuantLayer) -> str:
    a, w = input_args(layer), weight_args(layer)
    weights = f"W{w['num_bits']} {w['strategy']}" + (f" {w['group_size']}" if "group_size" in w else "")
    if a is None:
        act = "A32 (float input)"
    elif a["dynamic"]:
        qmax = (1 << (a["num_bits"] - 1)) - 1
        act = (f"A{a['num_bits']} dynamic {a['strategy']} symmetric (compressed-tensors' step size max|x|/{qmax + 0.5}, "
               f"PEGE's max|x|/{qmax})")
    else:
        act = f"A{a['num_bits']} static tensor {'symmetric' if a['symmetric'] else 'asymmetric'}"
    return f"{weights}, {act}"


def target(name: str, prefix: str) -> str:
    """A compressed-tensors target matching exactly this module, with or without the base-model prefix (so the
    export also loads as the bare base model, e.g. BertModel from a BertForSequenceClassification export)."""
    if prefix and name.startswith(f"{prefix}."):
        return f"re:^({re.escape(prefix)}\\.)?{re.escape(name[len(prefix) + 1:])}$"
    return f"re:^{re.escape(name)}$"


def quantization_config(model: nn.Module) -> dict:
    """The compressed-tensors quantization_config: one config group per distinct scheme, each targeting its
    layers by exact name (the float stem/head and other unquantized layers stay dense)."""
    groups: dict[str, dict] = {}
    for name, layer in quant_layers(model):
        scheme = {"weights": weight_args(layer), "input_activations": input_args(layer), "output_activations": None,
                  "format": FORMAT}
        key = repr(sorted((k, repr(v)) for k, v in scheme.items()))
        groups.setdefault(key, {**scheme, "targets": []})["targets"].append(target(name, model.base_model_prefix))
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())}, "ignore": []}


# ---------------------------------------------------------------------------------- tensors


@torch.no_grad()
def layer_tensors(layer: QuantLayer) -> dict[str, torch.Tensor]:
    """The layer's compressed-tensors tensors: packed PEGE codes, step sizes, shape, static input qparams."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = layer.weight_quantizer.quantizer
    rows = layer.weight.shape[0]
    out = {"weight_packed": pack_to_int32(weight_codes(layer), q.bits),
           "weight_scale": q.scale_tensor().float().reshape(rows, -1),  # (out, 1) or (out, in / group_size)
           "weight_shape": torch.tensor(layer.weight.shape)}
    if layer.input_quantizer is not None and not is_dynamic(layer):
        a = layer.input_quantizer.quantizer
        out["input_scale"] = a.scale_tensor().float().reshape(1)
        if not activation_signed(layer):  # codes 0..2^b-1 = int codes + 2^(b-1)
            out["input_zero_point"] = torch.tensor([-(1 << (a.bits - 1))], dtype=torch.int8)
    return out


def check_dtype_keeps_scales(model: nn.Module) -> None:
    """compressed-tensors holds step sizes in the layer's dtype; in a bf16/fp16 layer it would round PEGE's
    float32 step sizes (and dequantize in half precision), so only float32 layers are exported."""
    for name, layer in quant_layers(model):
        if layer.weight.dtype != torch.float32:
            raise ValueError(f"layer {name} is {layer.weight.dtype}; compressed-tensors would hold its float32 step "
                             "sizes in that dtype and change the weights: export the model in float32 (model.float())")


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (on the CPU): dense tensors for everything else, compressed-tensors tensors for the
    quantized layers, no PEGE quantizer state. Tensors sharing memory (tied weights) are stored as copies,
    which safetensors requires and transformers ties again when it loads."""
    layers = dict(quant_layers(model))
    replaced = {f"{name}.weight" for name in layers}
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        if key in replaced or "_quantizer.quantizer." in key:
            continue
        shared = value.numel() and value.data_ptr() in seen
        seen.add(value.data_ptr())
        state[key] = value.detach().cpu().clone() if shared else value.detach().cpu().contiguous()
    for name, layer in layers.items():
        state.update({f"{name}.{k}": v.cpu().contiguous() for k, v in layer_tensors(layer).items()})
    return state


# ---------------------------------------------------------------------------------- writing


def plain_config(model: nn.Module, quant: dict):
    """A copy of the model's config with the compressed-tensors quantization_config in place of PEGE's."""
    config = copy.deepcopy(model.config)
    config.quantization_config = quant
    config.architectures = [type(model).__name__]
    return config


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an old one only once the new one is complete."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(model: nn.Module, out: Path, state: dict, quant: dict) -> None:
    """config.json (+ generation_config.json) and model.safetensors in a temp folder beside ``out``, then renamed."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain_config(model, quant).save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_compressed_tensors(model: nn.Module, out_dir: str | os.PathLike, *, overwrite: bool = False) -> CTReport:
    """Write ``model`` (a PEGE-quantized transformers model) as a compressed-tensors checkpoint folder that
    transformers loads without pege_hf; returns the report (each quantized layer's scheme)."""
    out = Path(out_dir)
    check_output(out, model, folder=True, overwrite=overwrite)
    check_expressible(model)
    check_dtype_keeps_scales(model)
    refresh_weight_scales(model)
    model = model.eval()
    write_checkpoint(model, out, checkpoint_state(model), quantization_config(model))
    size = sum(f.stat().st_size for f in out.iterdir())
    return CTReport(str(out), size, {name: describe(layer) for name, layer in quant_layers(model)})
