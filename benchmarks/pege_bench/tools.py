"""Research tools over the matrix's runs: shipping its models into the package, the demo's latency,
where the latent weights sit on their quantization grid. Run from the repository."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from pege_hf.bench import pyplot
from pege_hf.hub import render_model_card
from pege_hf.training.state import complete_checkpoints

from .matrix import ESTIMATOR_COLORS, run_is_finished, shown_path

# the package's default models (quickstart, demo) <- the accuracy benchmark's runs
SHIPPED_FROM_RUNS = {"resnet20-fp": "resnet20-fp", "resnet20-pege-w2a2": "resnet20-w2a2-pege-s0",
                     "resnet20-pege-w3a3": "resnet20-w3a3-pege-s0", "resnet20-pege-w4a4": "resnet20-w4a4-pege-s0"}
SHIPPED_FILES = ("config.json", "model.safetensors", "metrics.json")


def ship_models(runs_dir: Path, dest: Path) -> list[str]:
    """Copy the benchmark's FP and PEGE W2A2/W3A3/W4A4 models (final weights, config, metrics) into
    `dest` with a fresh model card each; runs that have not finished are left as they are in `dest`.
    Returns the names shipped."""
    shipped = []
    for name, run in SHIPPED_FROM_RUNS.items():
        src = runs_dir / run
        if not run_is_finished(src):
            print(f"not shipped: {run} has not finished", flush=True)
            continue
        target = dest / name
        staging = dest / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for file in SHIPPED_FILES:
            shutil.copy2(src / file, staging / file)
        render_model_card(staging, repo_id=shown_path(target))  # the card names the final folder, not staging
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        shipped.append(name)
        print(f"shipped {src} -> {target}", flush=True)
    return shipped


# ---------------------------------------------------------------------------------------------
# latency: the demo's four models on one image
# ---------------------------------------------------------------------------------------------
def bench_latency(n: int = 50) -> dict:
    """Server-side time of one demo request (FP + W4A4 + W3A3 + W2A2 on one 32x32 CIFAR-10 image)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "app"))
    import demo_backend as inference

    sources = inference.resolve_sources()
    models = inference.ModelSet.load(sources, sample=None)  # as the demo runs them (quantized: ONNX Runtime)
    result = inference.measure_latency(models, n=n)
    return {"benchmark": "latency", "models": {k: str(v) for k, v in sources.items()},
            "runtimes": {k: e.runtime for k, e in models.models.items()}, **result}


def latency_table(result: dict) -> str:
    per_model = ", ".join(f"{k} {v:.1f} ms" for k, v in result["per_model_median_ms"].items())
    return (f"Demo request, four models on one 32x32 image, {result['n']} calls, {result['torch_threads']} threads: "
            f"median {result['median_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms ({per_model}).\n")


# ---------------------------------------------------------------------------------------------
# where the latent weights sit on the quantization grid
# ---------------------------------------------------------------------------------------------
def bench_grid(run_dir: Path) -> dict:
    """Latent-weight grid statistics of a finished QAT run at its newest training checkpoint, and the share of
    weight codes that changed since the checkpoint before it (the last steps of training)."""
    from safetensors.torch import load_file

    from pege_hf.hf.loading import from_pretrained
    from pege_hf.quant.grid import codes_changed, summarize, weight_codes_and_positions

    checkpoints = complete_checkpoints(run_dir)[-2:]
    if not run_is_finished(run_dir) or not checkpoints:
        raise FileNotFoundError(f"{run_dir}: needs a finished run (metrics.json) that still has its training "
                                "checkpoints (checkpoints/step_N)")
    model = from_pretrained(str(run_dir))
    states = []
    for ckpt in checkpoints:
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        states.append(weight_codes_and_positions(model))
    codes, positions = states[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"run": run_dir.name, "quantization_config": metrics.get("quantization_config"),
            "steps": [int(c.name.split("_")[-1]) for c in checkpoints], **summarize(positions),
            "codes_changed_fraction": codes_changed(states[0][0], codes) if len(states) == 2 else None,
            "layers": {k: {"n": p["n"], "mean_distance": p["distance_sum"] / max(p["in_range"], 1)}
                       for k, p in positions.items()}}


def finished_qat_runs_with_checkpoints(runs_dir: Path) -> list[Path]:

    return [d for d in sorted(runs_dir.glob("*")) if run_is_finished(d) and complete_checkpoints(d)
            and "quantization_config" in json.loads((d / "config.json").read_text())]


def grid_table(results: list[dict]) -> str:
    lines = ["Latent weights of the quantized layers relative to their quantization grid, at each run's newest "
             "training checkpoint: mean |w/s - round(w/s)| over in-range weights (0.25 = spread evenly between grid "
             "points, 0 = every weight on a grid point), the share clipped outside the code range, and the share of "
             "weight codes that changed between the two newest checkpoints.", "",
             "| run | steps | mean distance to grid | clipped | codes changed |", "|---|---|---|---|---|"]
    for r in results:
        changed = "-" if r["codes_changed_fraction"] is None else f"{100 * r['codes_changed_fraction']:.3f}%"
        lines.append(f"| {r['run']} | {' -> '.join(map(str, r['steps']))} | {r['mean_distance']:.3f} | "
                     f"{100 * r['clipped_fraction']:.2f}% | {changed} |")
    return "\n".join(lines) + "\n"


def grid_plot(results: list[dict], path: Path) -> None:
    """Histogram of w/s - round(w/s) per run, one panel per bit width."""
    plt = pyplot()
    by_bits: dict[int, list[dict]] = {}
    for r in results:
        by_bits.setdefault((r["quantization_config"] or {}).get("w_bits"), []).append(r)
    fig, axes = plt.subplots(1, len(by_bits), figsize=(3.2 * len(by_bits), 3), squeeze=False)
    from pege_hf.quant.grid import GRID_BINS

    centers = [-0.5 + (i + 0.5) / GRID_BINS for i in range(GRID_BINS)]
    for ax, (bits, rows) in zip(axes[0], sorted(by_bits.items(), key=lambda kv: str(kv[0]))):
        shared = os.path.commonprefix([r["run"] for r in rows]) if len(rows) > 1 else ""
        shared = shared[: shared.rfind("-") + 1]  # label runs by what differs: "resnet20-w2a2-" + "pege-s0"
        for r in rows:
            total = sum(r["histogram"]) or 1
            est = (r["quantization_config"] or {}).get("estimator")
            ax.plot(centers, [GRID_BINS * h / total for h in r["histogram"]], label=r["run"][len(shared):], lw=1.2,
                    color=ESTIMATOR_COLORS.get(est))
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_title(f"W{bits} weights")
        ax.set_xlabel("w/s - round(w/s)")
        ax.legend(fontsize=6, loc="lower center")
    axes[0][0].set_ylabel("density (1 = spread evenly)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


