"""Loading helpers that always register quant_method "pege" first.

transformers only recognises a PEGE checkpoint in a process that imported pege_hf before
`from_pretrained`; elsewhere it logs "Unknown quantization type" and loads a plain float model.
These helpers live inside pege_hf, so using them is the import, and they refuse to hand back a
float model for a PEGE checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from ..config import QUANT_METHOD
from ..sources import check_checkpoint_dir
from . import cifar
from .quantizer import quant_layers


def checkpoint_quant_method(source) -> str | None:
    """The quant_method named by a local checkpoint's config.json (None when unquantized or remote)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")


def model_class_for(source, **kwargs):
    """The model class a checkpoint was saved from (its config's ``architectures``: a transformers class or
    one of this package's CIFAR models), or the auto class for its task; AutoModel when nothing is named."""
    config = AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch:
        cls = getattr(transformers, arch, None) or getattr(cifar, arch, None)
        if cls is not None:
            return cls
    return AutoModelForImageClassification if arch and arch.endswith("ForImageClassification") else AutoModel


def from_pretrained(source, quantization_config=None, auto_class=None, **kwargs):
    """`from_pretrained` for float and PEGE checkpoints alike, with the model class the checkpoint names
    (causal LM, sequence or image classification, ...); ``auto_class`` picks one explicitly."""
    if Path(source).exists():
        check_checkpoint_dir(source, "model")
    if quantization_config is not None:  # an explicit None would erase the checkpoint's own config
        kwargs["quantization_config"] = quantization_config
    model_class = auto_class or model_class_for(source, **kwargs)
    model = model_class.from_pretrained(source, **kwargs)
    wanted = quantization_config is not None or checkpoint_quant_method(source) == QUANT_METHOD
    if wanted and not quant_layers(model):
        raise RuntimeError(f"{source} was loaded without its PEGE layers; is quant_method {QUANT_METHOD!r} registered?")
    return model
