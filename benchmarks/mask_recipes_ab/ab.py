"""A/Bs behind the mask changes of pege_hf/quant (bytes_below, counter and progressive mask recipes), each
interleaved in one process so that machine noise hits both sides alike. From the repository root:

    python benchmarks/mask_recipes_ab/ab.py > benchmarks/mask_recipes_ab/ab.log

1. The Bernoulli mask's comparison, 2M bytes, one thread: `bytes < threshold` (a bool output) against
   curriculum.bytes_below (uint8 output viewed as bool). Median of 200 interleaved calls.
2. Compiled mixed_forward on a 128x16x32x32 activation, one thread: no mask (uniform_forward), a byte mask, a
   counter mask's recipe. Median of 100 interleaved calls.
3. Training steps with compiled kernels, PEGE mid-ramp with counter activation masks, progressive weight masks
   as recipes (new) or written out every step (old), against PEGE at r = 1: DistilBERT (one thread) and
   ResNet-20 W2A2 (two threads). Median of 15 interleaved steps after 3 warm-up steps.
4. The eager Bernoulli path, ResNet-20 W2A2 PEGE mid-ramp, one thread: the comparison as `<` (old) or
   bytes_below (new), against STE. Median of 20 interleaved steps after 3 warm-up steps.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from pege_hf import bench
from pege_hf.quant import curriculum, kernels, modules


def median_ms(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


def step_medians(task, variants: dict, before_step: dict, steps: int = 15, warmup: int = 3) -> dict:
    """variants: name -> (config, progress); before_step: name -> callable run before each of its steps."""
    x, y = task["batch"]
    runs = {n: bench._speed_run(task["model_fn"], c, p, x, y, torch.device("cpu"), False, 0)
            for n, (c, p) in variants.items()}
    for i in range(warmup + steps):
        for name, run in runs.items():
            before_step.get(name, lambda: None)()
            start = time.perf_counter()
            loss = F.cross_entropy(bench._logits(run["model"](x)), y)
            run["opt"].zero_grad(set_to_none=True)
            loss.backward()
            run["opt"].step()
            if i >= warmup:
                run["times"].append(time.perf_counter() - start)
    return {n: statistics.median(r["times"]) for n, r in runs.items()}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    b = curriculum.random_bytes(128 * 16 * 32 * 32).view(128, 16, 32, 32)
    ms = median_ms({"bool output (<)": lambda: b < 77, "bytes_below": lambda: curriculum.bytes_below(b, 77)}, 200)
    print("1. Bernoulli comparison, 2M bytes, 1 thread, ms:", ms, flush=True)

    kernels.use_compiled_kernels(True)
    x = torch.randn(128, 16, 32, 32).relu()
    s = torch.tensor(0.3)
    byte_mask = curriculum.replacement_mask(x, 0.3, "bernoulli")
    recipe = curriculum.CounterMask(12345, 77)
    mixed, uniform = kernels.impl["mixed_forward"], kernels.impl["uniform_forward"]
    ms = median_ms({"no mask": lambda: uniform(x, s, 0.0, 3.0), "byte mask": lambda: mixed(x, s, 0.0, 3.0, byte_mask),
                    "counter recipe": lambda: mixed(x, s, 0.0, 3.0, recipe)}, 100)
    print("2. compiled mixed_forward, 2M elements, 1 thread, ms:", ms,
          {k: round(v / ms["no mask"], 2) for k, v in ms.items()}, flush=True)

    lazy = modules.replacement_mask

    def written_out(x, ratio, policy, **kw):  # the progressive mask as before: a bool tensor every step
        return lazy(x, ratio, policy, **{**kw, "lazy": kw.get("lazy", False) and policy != "progressive"})

    for label, threads, task in (("DistilBERT W4A8", 1, bench.token_task(16, 4, 0.3)),
                                 ("ResNet-20 W2A2", 2, bench.image_task(128, 2, 0.3))):
        torch.set_num_threads(threads)
        cfg = task["variants"]["pege_counter"][0]
        use = {"r1": lambda: setattr(modules, "replacement_mask", lazy),
               "new (recipes)": lambda: setattr(modules, "replacement_mask", lazy),
               "old (written out)": lambda: setattr(modules, "replacement_mask", written_out)}
        med = step_medians(task, {"r1": (cfg, 1.0), "new (recipes)": (cfg, 0.3), "old (written out)": (cfg, 0.3)}, use)
        modules.replacement_mask = lazy
        print(f"3. {label}, compiled, {threads} thread(s), step / PEGE r=1 step:",
              {k: round(v / med["r1"], 3) for k, v in med.items()}, flush=True)
    kernels.use_compiled_kernels(False)

    torch.set_num_threads(1)
    task = bench.image_task(128, 2, 0.3)
    fast = curriculum.bytes_below
    use = {"ste": lambda: None, "new (bytes_below)": lambda: setattr(curriculum, "bytes_below", fast),
           "old (<)": lambda: setattr(curriculum, "bytes_below", lambda b, t: b < t)}
    med = step_medians(task, {"ste": (task["variants"]["ste"][0], None), "new (bytes_below)": task["variants"]["pege"],
                              "old (<)": task["variants"]["pege"]}, use, steps=20)
    curriculum.bytes_below = fast
    print("4. ResNet-20 W2A2, eager, 1 thread, step / STE step:", {k: round(v / med["ste"], 3) for k, v in med.items()},
          flush=True)


if __name__ == "__main__":
    main()
