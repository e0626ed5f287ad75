"""`pege export MODEL --format onnx --output FILE`: a trained PEGE checkpoint as a deployable file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ("onnx",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="PEGE checkpoint folder (save_pretrained output)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: an ONNX graph that ONNX Runtime runs on integer kernels")
    parser.add_argument("--output", required=True, metavar="FILE", help="where to write the export")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--json", action="store_true", help="print the export report as JSON")


def load_checkpoint(source: str):
    """The PEGE model in a checkpoint folder; FileNotFoundError / ValueError for a missing or corrupt one."""
    from ..hf.loading import from_pretrained

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    try:
        return from_pretrained(source).eval()
    except (OSError, RuntimeError, KeyError) as e:
        raise ValueError(f"cannot load checkpoint {source}: {str(e).splitlines()[0]}") from e


def main(args: argparse.Namespace) -> int:
    from .onnx import export_onnx

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    report = export_onnx(load_checkpoint(args.model), output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"path": report.path, "bytes": report.bytes, "float_layers": report.float_layers,
                          "layers": [vars(r) for r in report.layers]}))
    else:
        print(report)
    return 0
