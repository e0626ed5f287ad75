"""Deployment exports of trained PEGE models: ONNX (integer kernels in ONNX Runtime) and
compressed-tensors (packed integer weights that plain transformers loads)."""

from .onnx import export_onnx

__all__ = ["export_onnx"]
