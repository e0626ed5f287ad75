"""A/B of the Bernoulli mask's random bytes (old: 3 of every 4 bytes of 31-bit draws through a copy;
new: pege_hf.quant.curriculum.random_bytes), PEGE W2A2 ResNet-20 training step, interleaved `bench_speed`,
two rounds each, eager then compiled. Run: python benchmarks/mask_ab/ab.py > benchmarks/mask_ab/ab.log"""
import torch
from pege_hf import bench
from pege_hf.quant import curriculum as C
new = C.random_bytes
def old(n, device=None):
    words = torch.empty((n + 2) // 3, dtype=torch.int32, device=device).random_()
    return words.view(torch.uint8).view(-1, 4)[:, :3].reshape(-1)[:n]
for compile in (False, True):
  for label, fn in [("old", old), ("new", new), ("old", old), ("new", new)]:
    C.random_bytes = fn
    r = bench.bench_speed(bench._resnet20, batch_size=128, bits=2, steps=15, warmup=3, progress=0.3, device="cpu", compile=compile)
    v = r["variants"]
    print("compiled" if compile else "eager", label, {k: round(x["median_step_s"], 4) for k, x in v.items()}, "pege/ste", round(v["pege"]["median_step_s"] / v["ste"]["median_step_s"], 3), "pege/fp", round(v["pege"]["median_step_s"] / v["fp"]["median_step_s"], 3), flush=True)
