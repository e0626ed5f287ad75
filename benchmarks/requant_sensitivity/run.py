"""Why the ONNX export keeps the residual convolutions' exact int32 accumulator (docs/export.md).

ONNX Runtime's fast integer conv (QLinearConv) writes an 8-bit output. In a CIFAR ResNet the output of each
block's second conv meets a float residual add before the next activation quantizer, so running it on
QLinearConv means rounding that output to a grid. This simulates exactly that on the shipped models, in
PyTorch: each block's bn2 output is rounded per channel to 2^(k-1) - 1 levels either side of zero (the step
from its largest magnitude on 500 training images), and the top-1 agreement with the unrounded model is
measured on the test images. Run from the repository root:

    python benchmarks/requant_sensitivity/run.py --data ../shared/data/cifar10

and it writes benchmarks/requant_sensitivity/sensitivity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pege_hf.deploy import SHIPPED, load_test_images
from pege_hf.hf.loading import from_pretrained
from pege_hf.sources import SHIPPED_MODELS_DIR

HERE = Path(__file__).resolve().parent


def round_per_channel(out: torch.Tensor, peak: torch.Tensor, bits: int) -> torch.Tensor:
    """``out`` rounded per channel to the signed ``bits``-bit grid whose largest level is ``peak``."""
    levels = 2 ** (bits - 1) - 1
    step = (peak.clamp_min(1e-12) / levels).view(1, -1, 1, 1)
    return torch.clamp(torch.round(out / step), -levels - 1, levels) * step


@torch.no_grad()
def top1(model, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]).logits.argmax(1) for i in range(0, len(images), batch)])


@torch.no_grad()
def sensitivity(folder: Path, images: torch.Tensor, calibration: torch.Tensor, widths: list[int]) -> dict:
    model = from_pretrained(str(folder)).eval()
    bns = [m for n, m in model.named_modules() if n.endswith("bn2")]
    peaks: list[torch.Tensor | None] = [None] * len(bns)

    def record(k):
        def hook(mod, args, out):
            peak = out.abs().amax((0, 2, 3))
            peaks[k] = peak if peaks[k] is None else torch.maximum(peaks[k], peak)
        return hook

    hooks = [bn.register_forward_hook(record(k)) for k, bn in enumerate(bns)]
    model(calibration)
    for h in hooks:
        h.remove()
    exact = top1(model, images)
    out = {}
    for bits in widths:
        hooks = [bn.register_forward_hook(lambda mod, args, o, k=k: round_per_channel(o, peaks[k], bits))
                 for k, bn in enumerate(bns)]
        out[str(bits)] = float((top1(model, images) == exact).float().mean())
        for h in hooks:
            h.remove()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 parquet folder (test split measured)")
    p.add_argument("--images", type=int, default=None, help="only the first N test images (default: all)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 12, 16], help="grid widths to try (default 8 12 16)")
    args = p.parse_args()
    torch.set_num_threads(2)
    images = torch.from_numpy(load_test_images(args.data, args.images)[0])
    calibration = torch.from_numpy(load_test_images(args.data, 500, split="train")[0])
    result = {"data": Path(args.data).name, "images": len(images), "calibration_images": len(calibration),
              "agreement": {f"w{b}a{b}": sensitivity(SHIPPED_MODELS_DIR / SHIPPED[b], images, calibration, args.bits)
                            for b in (2, 3, 4)}}
    (HERE / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Top-1 agreement with the unrounded model when each residual block's second conv output (after its "
             f"BatchNorm) is rounded per channel to a signed k-bit grid; {result['images']:,} test images of "
             f"{result['data']}, ranges from {result['calibration_images']} training images "
             "(`python benchmarks/requant_sensitivity/run.py`).", "",
             "| model | " + " | ".join(f"{b}-bit" for b in args.bits) + " |", "|---|" + "---:|" * len(args.bits)]
    for name, row in result["agreement"].items():
        lines.append(f"| {name.upper()} | " + " | ".join(f"{100 * row[str(b)]:.2f}%" for b in args.bits) + " |")
    (HERE / "sensitivity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
