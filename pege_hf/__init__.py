"""pege_hf: PEGE quantization-aware training for Hugging Face models.

Importing the package registers quant_method "pege" with transformers (idempotently).
"""

from .config import PEGEConfig
from .quant.modules import QuantConv2d, QuantLinear, quantize, set_progress

__all__ = ["PEGEConfig", "QuantConv2d", "QuantLinear", "quantize", "set_progress"]
__version__ = "0.1.0"
