"""Fixed cost of one fake quantizer call (forward + backward) on a tensor too small for the arithmetic to count
(2x4x32), eager vs compiled kernels (use_compiled_kernels): the Python and dispatch overhead a model pays once per
quantized tensor per step, whatever its size. DistilBERT's speed benchmark has 24 activation and 24 weight
quantizers. Median of 300 calls after 20 warm-up calls, one thread. From the repository root:
    python benchmarks/kernels_ab/call_overhead.py > benchmarks/kernels_ab/call_overhead.log
"""
import statistics
import time

import torch

from pege_hf.config import PEGEConfig
from pege_hf.quant import kernels
from pege_hf.quant.modules import make_fake_quantizer

CASES = {"ste": ("ste", 1.0), "pege mid-ramp (counter masks)": ("pege", 0.3), "pege r = 1": ("pege", 1.0)}


def median_us(fn, calls=300, warmup=20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def quantizer_call(estimator: str, progress: float):
    config = PEGEConfig(w_bits=4, a_bits=8, group_size=32, a_quantizer="dynamic_token", estimator=estimator,
                        a_mask="counter")
    fq = make_fake_quantizer(config, weight=False, seed=0).train()
    fq.set_progress(progress)
    x = torch.randn(2, 4, 32, requires_grad=True)
    return lambda: fq(x).sum().backward()


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(2, 4, 32, requires_grad=True)
    print(f"torch {torch.__version__}; x.sum().backward() alone: {median_us(lambda: x.sum().backward()):.0f} us")
    for compiled in (False, True):
        kernels.use_compiled_kernels(compiled)
        for name, case in CASES.items():
            print(f"{'compiled' if compiled else 'eager'} kernels, A8 per-token dynamic, {name}: forward + backward "
                  f"{median_us(quantizer_call(*case)):.0f} us", flush=True)
    kernels.use_compiled_kernels(False)


if __name__ == "__main__":
    main()
