"""`pege export MODEL --format onnx|compressed-tensors --output PATH`: a trained PEGE checkpoint as a
deployable file (ONNX) or checkpoint folder (compressed-tensors)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

FORMATS = ("onnx", "compressed-tensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="PEGE checkpoint folder (save_pretrained output)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: an ONNX graph that ONNX Runtime runs on integer kernels; compressed-tensors: "
                             "a checkpoint folder that plain transformers loads (nn.Linear layers only)")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="where to write the export (a file for onnx, a folder for compressed-tensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print the export report as JSON")


def load_checkpoint(source: str):
    """The PEGE model in a checkpoint folder; FileNotFoundError / ValueError for a missing or corrupt one."""
    from ..hf.loading import from_pretrained

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    try:
        return from_pretrained(source).eval()  # the class its config.json names
    except (OSError, RuntimeError, KeyError) as e:
        raise ValueError(f"cannot load checkpoint {source}: {str(e).splitlines()[0]}") from e


def exporter(fmt: str):
    """The export function of a format: fn(model, output, overwrite=...) -> report."""
    if fmt == "compressed-tensors":
        from .ct import export_compressed_tensors

        return export_compressed_tensors
    from .onnx import export_onnx

    return export_onnx


def main(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # before the model loads; the exporters check the rest
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    report = exporter(args.format)(load_checkpoint(args.model), output, overwrite=args.overwrite)
    print(json.dumps(dataclasses.asdict(report)) if args.json else report)
    return 0
