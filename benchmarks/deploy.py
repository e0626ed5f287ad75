"""Deployment benchmark: PyTorch FP, ONNX Runtime fp32, ONNX Runtime integer W2A2/W3A3/W4A4 (pege export)
and pege_hf's fake-quantized models on CIFAR-10 ResNet-20.

Latency: batch 1 and 64, 2 intra-op threads, median of interleaved runs. Sizes: bytes on disk (ONNX file /
checkpoint folder) and in memory (sum of initializer / parameter+buffer bytes). Agreement and accuracy of
each ONNX Runtime integer model against its fake-quantized model on the test images.

    PYTHONPATH=. python benchmarks/deploy.py [--data /work/shared/data/cifar10] [--images N] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pege_hf
from pege_hf.data import load_image_dataset, normalize, to_tensors
from pege_hf.export import export_onnx
from pege_hf.export.onnx import example_input, torch_to_onnx

MODELS = Path(pege_hf.__file__).parent / "assets" / "models"
OUT = Path(__file__).resolve().parent
TAGS = ("w2a2", "w3a3", "w4a4")


def session(path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runners(tmp: Path, threads: int) -> tuple[dict, dict]:
    """{name: fn(np batch) -> logits} and {name: (disk bytes, memory bytes)}."""
    import onnx
    from onnx import numpy_helper

    fns, sizes = {}, {}
    fp = pege_hf.from_pretrained(MODELS / "resnet20-fp").eval()
    torch_to_onnx(fp, example_input(fp), tmp / "fp32.onnx")
    fns["pytorch-fp"] = lambda x, m=fp: _torch_logits(m, x)
    sizes["pytorch-fp"] = _folder_bytes(MODELS / "resnet20-fp"), _module_bytes(fp)
    paths = {"ort-fp32": tmp / "fp32.onnx"}
    for tag in TAGS:
        model = pege_hf.from_pretrained(MODELS / f"resnet20-pege-{tag}").eval()
        export_onnx(model, tmp / f"{tag}.onnx")
        paths[f"ort-int-{tag}"] = tmp / f"{tag}.onnx"
        fns[f"pytorch-fakequant-{tag}"] = lambda x, m=model: _torch_logits(m, x)
        sizes[f"pytorch-fakequant-{tag}"] = _folder_bytes(MODELS / f"resnet20-pege-{tag}"), _module_bytes(model)
    for name, path in paths.items():
        sess = session(path, threads)
        fns[name] = lambda x, s=sess: s.run(None, {"pixel_values": x})[0]
        mem = sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)
        sizes[name] = path.stat().st_size, mem
    return fns, sizes


def _torch_logits(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).logits.numpy()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _module_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def latency(fns: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call, the runners interleaved within each repeat."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn(x)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def agreement(fns: dict, images: np.ndarray, labels: np.ndarray) -> dict:
    preds = {k: np.concatenate([fn(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)]) for k, fn in fns.items()}
    out = {}
    for tag in TAGS:
        ref, got = preds[f"pytorch-fakequant-{tag}"], preds[f"ort-int-{tag}"]
        out[tag] = {"agreement": float((ref == got).mean()), "accuracy_ort": float((got == labels).mean()),
                    "accuracy_fakequant": float((ref == labels).mean())}
    out["fp"] = {"accuracy_pytorch": float((preds["pytorch-fp"] == labels).mean()),
                 "accuracy_ort_fp32": float((preds["ort-fp32"] == labels).mean())}
    return out


def markdown(result: dict) -> str:
    lat, sizes = result["latency_ms"], result["bytes"]
    lines = ["# Deployment: ResNet-20 CIFAR-10 on ONNX Runtime (CPU, 2 threads)", "",
             f"Command: `{result['command']}`; {result['images']} test images; median of {result['repeats']} interleaved runs.", "",
             "| runtime | batch 1 ms | batch 64 ms | b1 speed-up vs ORT fp32 | b64 speed-up vs ORT fp32 | disk bytes "
             "| memory bytes |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in lat["1"]:
        speed = {b: lat[b]["ort-fp32"] / lat[b][name] for b in ("1", "64")}
        lines.append(f"| {name} | {lat['1'][name]:.3f} | {lat['64'][name]:.2f} | {speed['1']:.2f}x | {speed['64']:.2f}x | "
                     f"{sizes[name][0]:,} | {sizes[name][1]:,} |")
    lines += ["", "| model | top-1 agreement ORT int vs fake-quant | accuracy ORT int | accuracy fake-quant |", "|---|---:|---:|---:|"]
    for tag in TAGS:
        a = result["agreement"][tag]
        lines.append(f"| {tag.upper()} | {100 * a['agreement']:.2f}% | {100 * a['accuracy_ort']:.2f}% | "
                     f"{100 * a['accuracy_fakequant']:.2f}% |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, batch in zip(axes, ("1", "64")):
        names = list(result["latency_ms"][batch])
        ax.barh(names, [result["latency_ms"][batch][n] for n in names])
        ax.set_xlabel("ms per call (median)"), ax.set_title(f"batch {batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/shared/data/cifar10", help="CIFAR-10 folder with train.parquet and test.parquet (its test split is used)")
    parser.add_argument("--images", type=int, default=0, help="test images for agreement and accuracy (0: the whole test split)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(OUT), help="folder for deploy.json / deploy.md / deploy.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_image_dataset(args.data, max_test=args.images or None)  # a random subset when --images is set
    images, labels = to_tensors(data.test, data.image_column, data.label_column)
    with tempfile.TemporaryDirectory() as tmp:
        fns, sizes = runners(Path(tmp), args.threads)
        shown = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}  # no machine paths by default
        result = {"command": " ".join(["python benchmarks/deploy.py", *(f"--{k} {v}" for k, v in shown.items())]),
                  "images": len(labels), "repeats": args.repeats, "threads": args.threads, "bytes": sizes,
                  "agreement": agreement(fns, normalize(images).numpy(), labels.numpy()),
                  "latency_ms": {str(b): latency(fns, b, args.repeats) for b in (1, 64)}}
    out = Path(args.out)
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "deploy.md").write_text(markdown(result))
    plot(result, out / "deploy.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
