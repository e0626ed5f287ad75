"""Deployment exports of trained PEGE models: ONNX (integer kernels in ONNX Runtime) and
compressed-tensors (packed integer weights that plain transformers loads)."""

from .ct import export_compressed_tensors
from .onnx import export_onnx

__all__ = ["export_compressed_tensors", "export_onnx"]
