"""pege_hf: PEGE quantization-aware training for Hugging Face models.

Importing the package registers quant_method "pege" with transformers (idempotently) and the
project's CIFAR models with the Auto classes.
"""

from .config import PEGEConfig
from .version import __version__
from .hf.cifar import register_cifar_models
from .hf.callback import PEGECallback
from .hf.loading import from_pretrained
from .hf.quantizer import PEGEHfQuantizer, dequantize, quantize, register
from .export import export_compressed_tensors, export_onnx
from .quant.modules import QuantConv2d, QuantLinear, set_progress
from . import hub  # noqa: E402,F401 - makes model.push_to_hub upload the PEGE model card

register()
register_cifar_models()

__all__ = ["PEGECallback", "PEGEConfig", "PEGEHfQuantizer", "QuantConv2d", "QuantLinear", "dequantize",
           "export_compressed_tensors", "export_onnx", "from_pretrained", "fully_shard_model", "quantize", "set_progress"]


def __getattr__(name: str):
    """pege_hf.fully_shard_model, imported on first use (torch.distributed's FSDP and checkpoint modules are slow to import)."""
    if name == "fully_shard_model":
        from .distributed import fully_shard_model
        return fully_shard_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
