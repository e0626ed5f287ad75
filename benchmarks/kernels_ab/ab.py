"""A/B of pege_hf's fake quantizers alone, base revision vs this checkout, on the DistilBERT speed benchmark's
shapes (`pege bench speed --model distilbert`: per layer five 16x128x256 and one 16x128x1024 A8 per-token
dynamic activations and the six W4 group-32 weights, 4 layers): forward, the layer's rebuild of Q(x) and backward
of every quantizer, per variant (STE, PEGE mid-ramp at progress 0.3, PEGE at r = 1), interleaved rounds
(alternating the order), medians; it also checks that both give equal outputs and gradients (torch.equal, masks
drawn from the same seed). `pege_counter`: mid-ramp with counter activation masks. COMPILE=1 runs both sides'
kernels through torch.compile (use_compiled_kernels). Run from the repository root:
    THREADS=1 PYTHONPATH=. python benchmarks/kernels_ab/ab.py BASE_REVISION > benchmarks/kernels_ab/ab.log
    COMPILE=1 THREADS=1 PYTHONPATH=. python benchmarks/kernels_ab/ab.py BASE > benchmarks/kernels_ab/ab_compiled.log
"""
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ACTIVATIONS = ([(16, 128, 256)] * 5 + [(16, 128, 1024)]) * 4
WEIGHTS = ([(256, 256)] * 4 + [(1024, 256), (256, 1024)]) * 4
VARIANTS = {"ste": ("ste", 0.3, {}), "pege": ("pege", 0.3, {}), "pege_counter": ("pege", 0.3, {"a_mask": "counter"}),
            "pege_r1": ("pege", 1.0, {})}
COMPILE = os.environ.get("COMPILE") == "1"


def base_package(revision: str, folder: str) -> str:
    """``revision``'s pege_hf extracted under ``folder`` as the package pege_hf_base; returns its name."""
    archive = subprocess.run(["git", "archive", revision, "pege_hf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    os.rename(os.path.join(folder, "pege_hf"), os.path.join(folder, "pege_hf_base"))
    sys.path.insert(0, folder)
    return "pege_hf_base"


def build(package: str, estimator: str, progress: float, options: dict):
    """(fake quantizer, tensor) pairs for every activation and weight of the benchmark model."""
    config = importlib.import_module(package + ".config").PEGEConfig(
        w_bits=4, a_bits=8, group_size=32, a_quantizer="dynamic_token", estimator=estimator, **options)
    modules = importlib.import_module(package + ".quant.modules")
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, shape in enumerate(ACTIVATIONS):
        fq = modules.make_fake_quantizer(config, weight=False, seed=i).train()
        items.append((fq, torch.randn(shape, generator=gen).requires_grad_()))
    for i, (rows, cols) in enumerate(WEIGHTS):
        w = torch.nn.Parameter(torch.randn(rows, cols, generator=gen) * 0.05)
        fq = modules.make_fake_quantizer(config, weight=True, channels=rows * cols // 32, seed=i, group_size=32).train()
        fq.quantizer.initialize(w)
        items.append((fq, w))
    for fq, _ in items:
        fq.set_progress(progress)
    return items


def run(items):
    """Seconds for forward + rebuild + backward of every quantizer, and the outputs and input gradients."""
    torch.manual_seed(5)  # the same random masks for base and new
    start, results = time.perf_counter(), []
    for fq, x in items:
        out, rebuild = fq.quantize(x)
        if rebuild is not None:
            rebuild()
        out.backward(torch.ones_like(out))
        results.append((out.detach(), x.grad))
        x.grad = None
    return time.perf_counter() - start, results


def main(revision: str, rounds: int = 15) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, base {revision}, compiled kernels "
          f"{COMPILE}, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        packages = {"base": base_package(revision, folder), "new": "pege_hf"}
        for package in packages.values():
            importlib.import_module(package + ".quant.kernels").use_compiled_kernels(COMPILE)
        items = {(v, k): build(p, *VARIANTS[v]) for v in VARIANTS for k, p in packages.items()}
        times, last = {key: [] for key in items}, {}
        for _ in range(3 if COMPILE else 0):  # compilations (static shapes first, then dynamic ones), untimed
            for key in items:
                run(items[key])
        for i in range(rounds):
            for key in (list(items) if i % 2 else list(items)[::-1]):
                seconds, last[key] = run(items[key])
                times[key].append(seconds)
    for v in VARIANTS:
        base, new = statistics.median(times[v, "base"]), statistics.median(times[v, "new"])
        equal = all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(last[v, "base"], last[v, "new"]))
        print(f"{v}: base {base:.3f} s, new {new:.3f} s, new/base {new / base:.3f}, equal outputs and gradients: "
              f"{equal}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1])
