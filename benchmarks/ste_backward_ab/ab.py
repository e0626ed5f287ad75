"""A/B of the STE backward kernel (old: EWGS's factor 1 + 0 * sign(g) * ... computed and multiplied in; new:
pege_hf.quant.kernels.uniform_backward, which skips it at delta = 0), on DistilBERT-shaped tensors (16 x 128
tokens x 256 / 1024 features, float32; per-token step sizes, 8-bit codes as the A8 activations; and a 1024 x 256
weight, 4-bit), interleaved rounds (alternating which goes first), medians. Run from the repository root: THREADS=1 PYTHONPATH=. python benchmarks/ste_backward_ab/ab.py > benchmarks/ste_backward_ab/ab.log (one
thread: the shared 2-core machine was oversubscribed, and two threads timed every size alike)"""
import statistics
import time

import torch

from pege_hf.quant import kernels


def old(g, x, s, qmin, qmax, delta: float):
    v = x / s
    vc = torch.clamp(v, qmin, qmax)
    r = torch.round(vc)
    factor = 1 + delta * torch.sign(g) * (vc - r) / (qmax - qmin)
    inside = (v >= qmin) & (v <= qmax)
    return torch.where(inside, g * factor, 0.0), g * torch.where(inside, r - factor * v, r)


def timed(fn, args, repeats=5):
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    return (time.perf_counter() - start) / repeats


torch.set_num_threads(int(__import__("os").environ.get("THREADS", torch.get_num_threads())))
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {kernels.__file__}", flush=True)
gen = torch.Generator().manual_seed(0)
cases = {}
for features in (256, 1024):
    x = torch.randn(16, 128, features, generator=gen)
    cases[f"activation 16x128x{features}, A8 per token"] = (x, x.abs().amax(-1, keepdim=True) / 127, -128.0, 127.0)
w = torch.randn(1024, 256, generator=gen) * 0.05
cases["weight 1024x256, W4 g32"] = (w.view(1024, 8, 32), w.view(1024, 8, 32).abs().amax(-1, keepdim=True) / 7, -8.0, 7.0)
for name, (x, s, lo, hi) in cases.items():
    g = torch.randn(x.shape, generator=gen)
    args = (g, x, s, torch.tensor(lo), torch.tensor(hi), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(old(*args), kernels.uniform_backward(*args)))
    times = {"old": [], "new": []}
    versions = {"old": old, "new": kernels.uniform_backward}
    for i in range(30):  # alternate which runs first in a round
        for version in (("old", "new") if i % 2 else ("new", "old")):
            times[version].append(timed(versions[version], args))
    o, n = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"{name}: old {o * 1e3:.2f} ms, new {n * 1e3:.2f} ms, new/old {n / o:.3f}", flush=True)
