"""The GPU check: on a CUDA device, trains FP, STE and PEGE CIFAR ResNet-20 steps with eager and with
compiled kernels and under bf16 autocast, checks that a packed checkpoint reloads bit-identically, and runs
`accelerate launch` with one process. Without a CUDA device it says so and exits 0.

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pege_hf  # noqa: E402
from pege_hf.hf.cifar import cifar_resnet  # noqa: E402
from pege_hf.quant import kernels  # noqa: E402
from pege_hf.sources import SHIPPED_FP_MODEL  # noqa: E402

ESTIMATORS = ("fp", "ste", "pege")


def model_for(estimator: str, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = cifar_resnet(20)
    if estimator != "fp":
        pege_hf.quantize(model, pege_hf.PEGEConfig(w_bits=2, a_bits=2, estimator=estimator))
    return model.to(device)


def train_steps(model, device: str, *, steps: int = 5, autocast: bool = False) -> list[float]:
    """SGD steps on fixed random data through PEGE's ramp; the losses (all must be finite)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(64, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for step in range(steps):
        pege_hf.set_progress(model, step / steps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reload_is_exact(model, device: str) -> bool:
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    model.eval()
    with torch.no_grad():
        before = model(pixel_values=x).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        again = pege_hf.from_pretrained(tmp).to(device).eval()
        with torch.no_grad():
            return bool(torch.equal(again(pixel_values=x).logits, before))


def training_cases(device: str) -> list[dict]:
    cases = []
    for compiled in (False, True):
        kernels.use_compiled_kernels(compiled)
        for estimator in ESTIMATORS:
            for autocast in (False, True):
                model = model_for(estimator, device)
                start = time.perf_counter()
                losses = train_steps(model, device, autocast=autocast)
                torch.cuda.synchronize()
                cases.append({"estimator": estimator, "compiled": compiled, "bf16_autocast": autocast,
                              "losses": losses, "finite": all(math.isfinite(v) for v in losses),
                              "seconds": time.perf_counter() - start,
                              "reload_bit_identical": reload_is_exact(model, device) if estimator != "fp" else None})
    kernels.use_compiled_kernels(False)
    return cases


def accelerate_one_process(out: Path) -> dict:
    """`accelerate launch` with one process: a short W2A2 PEGE QAT from the shipped FP model."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "-m", "pege_hf.train",
           "--model", str(SHIPPED_FP_MODEL), "--max-train", "512", "--max-test", "256", "--epochs", "1",
           "--w-bits", "2", "--a-bits", "2", "--no-tensorboard", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "accuracy": metrics.get("accuracy"),
            "device": metrics.get("device"), "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.json"), help="where to write the results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: skipped (nothing written)")
        return 0
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "training": training_cases("cuda")}
    with tempfile.TemporaryDirectory() as tmp:
        result["accelerate_launch"] = accelerate_one_process(Path(tmp) / "run")
    ok = all(c["finite"] and c["reload_bit_identical"] in (None, True) for c in result["training"])
    ok = ok and result["accelerate_launch"]["returncode"] == 0
    result["ok"] = ok
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ok": ok, "out": args.out}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
