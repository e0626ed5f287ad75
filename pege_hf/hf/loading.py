"""Loading helpers that always register quant_method "pege" first.

transformers only recognises a PEGE checkpoint in a process that imported pege_hf before
`from_pretrained`; elsewhere it logs "Unknown quantization type" and loads a plain float model.
These helpers live inside pege_hf, so using them is the import, and they refuse to hand back a
float model for a PEGE checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForImageClassification

from ..config import QUANT_METHOD
from .quantizer import quant_layers


def checkpoint_quant_method(source) -> str | None:
    """The quant_method named by a local checkpoint's config.json (None when unquantized or remote)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    return (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")


def from_pretrained(source, quantization_config=None, auto_class=AutoModelForImageClassification, **kwargs):
    """`auto_class.from_pretrained` for float and PEGE checkpoints alike (default: image classification)."""
    path = Path(source)
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model checkpoint: it has no config.json")
    if quantization_config is not None:  # an explicit None would erase the checkpoint's own config
        kwargs["quantization_config"] = quantization_config
    model = auto_class.from_pretrained(source, **kwargs)
    wanted = quantization_config is not None or checkpoint_quant_method(source) == QUANT_METHOD
    if wanted and not quant_layers(model):
        raise RuntimeError(f"{source} was loaded without its PEGE layers; is quant_method {QUANT_METHOD!r} registered?")
    return model
