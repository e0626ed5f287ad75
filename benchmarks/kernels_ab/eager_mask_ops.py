"""The eager ways to apply a 0/1 activation mask, timed side by side on one ResNet-20 activation (128x16x32x32,
2M elements, one thread): what pege_hf's eager kernels do (the byte mask converted to float, then lerp / multiply /
compare) against the alternatives that skip the conversion (torch.where on the bool mask, arithmetic with the
uint8 mask directly). Median of 20 calls after 3 warm-up calls, three interleaved rounds. From the repository root:
    python benchmarks/kernels_ab/eager_mask_ops.py > benchmarks/kernels_ab/eager_mask_ops.log
"""
import statistics
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(128, 16, 32, 32).relu_()
g = torch.randn_like(x)
q = torch.div(x, 0.3).clamp_(0, 3).round_().mul_(0.3)
as_bool = torch.rand(x.shape) < 0.4
as_bytes = as_bool.view(torch.uint8)

CASES = {  # (what pege_hf does, the alternative)
    "mix where(M, Q, x)": (lambda: torch.lerp(x, q, as_bytes.to(x.dtype)), lambda: torch.where(as_bool, q, x)),
    "g * M": (lambda: torch.mul(g, as_bytes.to(x.dtype)), lambda: torch.mul(g, as_bytes)),
    "inside >= M": (lambda: torch.ones_like(x).ge_(as_bytes.to(x.dtype)), lambda: torch.ones_like(x).ge_(as_bytes)),
}


def median_ms(fn, calls=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, one thread, {x.numel():,} elements; ms per call (current / alternative)")
    for name, (current, alternative) in CASES.items():
        assert torch.equal(current(), alternative().to(current().dtype)), name
        rounds = [(median_ms(current), median_ms(alternative)) for _ in range(3)]
        text = ", ".join(f"{c:.2f} / {a:.2f}" for c, a in rounds)
        ratio = statistics.median(a / c for c, a in rounds)
        print(f"{name}: {text}; alternative / current {ratio:.2f}")


if __name__ == "__main__":
    main()
