"""Bytes per parameter of PEGE QAT state, one process vs each of 2 FSDP2 processes (gloo, CPU), and the
step time of FSDP2 against DDP.

    python benchmarks/fsdp/measure_memory.py      # writes benchmarks/fsdp/memory.json and memory.md (~2 min)

Runs tests/fsdp_worker.py (the tiny W4A8 Llama of tests/test_fsdp.py, SGD with momentum) under torchrun
and the same training in this process; counts the bytes each process holds for latent weights, quantizer
state (step sizes, code ranges) and optimizer state (pege_hf.distributed.local_bytes; no activations).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1] / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(HERE.parents[1]))


def run_worker(world: int, mode: str, result: str, **env):
    """Run tests/fsdp_worker.py in ``mode`` on ``world`` processes and read its JSON ``result`` file."""
    from conftest import free_port, subprocess_env

    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                        f"--master_port={free_port()}", str(TESTS / "fsdp_worker.py"), out, mode],
                       check=True, capture_output=True, env=subprocess_env(OMP_NUM_THREADS=1, **env))
        return json.loads((Path(out) / result).read_text())


def sharded_bytes(world: int) -> list[dict]:
    return run_worker(world, "train", "memory.json")


def step_seconds(world: int) -> dict:
    """Median training-step wall time under FSDP2 and under DDP (same model, data and processes)."""
    return {how: run_worker(world, "time", "step_time.json", FSDP_WRAP=how)["median_step_s"] for how in ("fsdp", "ddp")}


def single_bytes() -> tuple[dict, int]:
    from test_fsdp import single_process_run
    from pege_hf.distributed import local_bytes

    model, optimizer = single_process_run()
    return local_bytes(model, optimizer), sum(p.numel() for p in model.parameters())


def per_param(counts: dict, n: int) -> dict:
    return {k: round(v / n, 3) for k, v in {**counts, "total": sum(counts.values())}.items()}


def markdown(result: dict) -> str:
    keys = list(result["single"]["bytes_per_param"])
    processes = [("1 process", result["single"]), *((f"FSDP2 rank {i}", r) for i, r in enumerate(result["fsdp"]))]
    rows = [f"| {name} | " + " | ".join(str(r["bytes_per_param"][k]) for k in keys) + " |" for name, r in processes]
    return "\n".join([f"# PEGE QAT state per process ({result['params']} parameters, {result['model']})", "",
                      "Bytes per model parameter (`python benchmarks/fsdp/measure_memory.py`).", "",
                      "| process | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|", *rows, "",
                      f"Largest FSDP2 process / one process: {result['ratio']:.3f}", "",
                      f"Median step time on {result['world']} CPU gloo processes (shared 2-core machine, noisy): FSDP2 "
                      f"{result['step_s']['fsdp'] * 1e3:.1f} ms, DDP {result['step_s']['ddp'] * 1e3:.1f} ms "
                      f"(FSDP2 / DDP {result['step_s']['fsdp'] / result['step_s']['ddp']:.2f})", ""])


def main(world: int = 2) -> None:
    single, n = single_bytes()
    fsdp = sharded_bytes(world)
    result = {"model": "LlamaForCausalLM hidden 32, 2 layers, PEGE W4A8, SGD momentum", "params": n, "world": world,
              "single": {"bytes": single, "bytes_per_param": per_param(single, n)},
              "fsdp": [{"bytes": b, "bytes_per_param": per_param(b, n)} for b in fsdp],
              "ratio": max(sum(b.values()) for b in fsdp) / sum(single.values()), "step_s": step_seconds(world)}
    (HERE / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "memory.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
