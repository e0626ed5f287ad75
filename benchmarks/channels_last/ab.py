"""A/B of the memory format (`pege train --channels-last`): W2A2 CIFAR ResNet-20 training step per variant
(FP, STE, PEGE mid-ramp, PEGE r = 1), contiguous vs channels-last weights, rounds A, B, A, B, eager then
compiled kernels. Each round is its own process (`bench_speed` interleaves the variants inside it): in one
process the compiled kernels of earlier rounds would fill torch.compile's recompile limit and fall back to eager.
Run: python benchmarks/channels_last/ab.py > benchmarks/channels_last/ab.log"""
import json
import subprocess
import sys

ROUND = """
import json, sys
from pege_hf import bench
r = bench.bench_speed(bench._resnet20, batch_size=128, bits=2, steps=15, warmup=3, progress=0.3, device="cpu",
                      compile=sys.argv[1] == "1", channels_last=sys.argv[2] == "1")
print(json.dumps(r))
"""

if __name__ == "__main__":
    for compile in (False, True):
        for channels_last in (False, True, False, True):
            out = subprocess.run([sys.executable, "-c", ROUND, str(int(compile)), str(int(channels_last))],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print("compiled" if compile else "eager", "channels_last" if channels_last else "contiguous",
                  {k: round(x["median_step_s"], 4) for k, x in r["variants"].items()}, "threads", r["threads"],
                  flush=True)
