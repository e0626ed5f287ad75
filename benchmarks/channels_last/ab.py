"""A/B of the memory format (`pege train --channels-last`): W2A2 CIFAR ResNet-20 training step per variant
(FP, STE, PEGE mid-ramp, PEGE r = 1), contiguous vs channels-last weights, `bench_speed` rounds interleaved
A, B, A, B, eager then compiled kernels. Run: python benchmarks/channels_last/ab.py > benchmarks/channels_last/ab.log"""
from pege_hf import bench

for compile in (False, True):
    for channels_last in (False, True, False, True):
        r = bench.bench_speed(bench._resnet20, batch_size=128, bits=2, steps=15, warmup=3, progress=0.3, device="cpu",
                              compile=compile, channels_last=channels_last)
        v = r["variants"]
        print("compiled" if compile else "eager", "channels_last" if channels_last else "contiguous",
              {k: round(x["median_step_s"], 4) for k, x in v.items()}, "threads", r["threads"], flush=True)
