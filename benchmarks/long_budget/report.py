"""Report of the long-budget W2A2 runs (benchmarks/long_budget/run.sh), finished or still training: per run the
last evaluated epoch and the best epoch (test top-1, each labelled; the paper most likely reports the best),
and the per-epoch curves. Writes benchmarks/long_budget/long.{json,md,png}.

    python benchmarks/long_budget/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
FP_REPORT = HERE.parent / "fp200" / "accuracy.json"  # the shipped FP model's test accuracy
PROBE = HERE / "probe.json"  # probe.py: checkpoints evaluated with BatchNorm statistics re-estimated


def epoch_curve(metrics_jsonl: Path, key: str = "eval/accuracy") -> tuple[dict[int, float], dict]:
    """({epoch: the logged ``key``}, the run's recorded config); a resumed run's repeated epoch keeps its last
    value. ``key``: eval/accuracy (test top-1), or eval/accuracy_bn_reestimated (--eval-reestimate-bn)."""
    curve, config = {}, {}
    for line in metrics_jsonl.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "config":
            config = event["config"]
        elif key in event:
            curve[int(event["epoch"])] = float(event[key])
    return dict(sorted(curve.items())), config


def collect(runs_dir: Path) -> dict:
    runs = {}
    for jsonl in sorted(runs_dir.glob("*/metrics.jsonl")):
        curve, config = epoch_curve(jsonl)
        if not curve:
            continue
        best = max(curve, key=curve.get)
        last = max(curve)
        runs[jsonl.parent.name] = {
            "estimator": config.get("quantization_config/estimator"),
            "discretization_target": config.get("quantization_config/discretization_target"),
            "discretization_lambda": config.get("quantization_config/discretization_lambda"),
            "epochs_planned": config.get("epochs"), "epochs_done": last,
            "finished": (jsonl.parent / "metrics.json").is_file(),
            "last": {"epoch": last, "accuracy": curve[last]}, "best": {"epoch": best, "accuracy": curve[best]},
            "curve": curve, "curve_bn_reestimated": epoch_curve(jsonl, "eval/accuracy_bn_reestimated")[0]}
        bn = runs[jsonl.parent.name]["curve_bn_reestimated"]
        if bn:
            best_bn = max(bn, key=bn.get)
            runs[jsonl.parent.name] |= {"last_bn_reestimated": {"epoch": max(bn), "accuracy": bn[max(bn)]},
                                        "best_bn_reestimated": {"epoch": best_bn, "accuracy": bn[best_bn]}}
    fp = json.loads(FP_REPORT.read_text()).get("fp_accuracy") if FP_REPORT.is_file() else None
    probes = json.loads(PROBE.read_text()) if PROBE.is_file() else []
    for name, r in runs.items():
        r["probe"] = [{"step": p["step"], "epoch": p["epoch"], "accuracy_bn_reestimated": p["accuracy_bn_reestimated"]}
                      for p in probes if p["run"] == name]
    return {"benchmark": "long_budget", "fp_accuracy": fp, "runs": runs}


def markdown(result: dict) -> str:
    fp = result["fp_accuracy"]
    lines = ["W2A2 ResNet-20 QAT from the shipped 200-epoch FP model"
             + (f" (test top-1 {100 * fp:.2f}%)" if fp else "") + ", seed 0, CIFAR-10 test set evaluated after "
             "every epoch (benchmarks/long_budget/run.sh). \"last\" is the newest evaluated epoch; \"best\" is the "
             "best epoch on the test set, the paper's likely protocol, which picks on the test set and so reads "
             "high. Every evaluation runs the fully quantized model; PEGE trains a mix of quantized and full-precision "
             "values until its curriculum reaches r = 1 at 75% of the budget, so its early epochs read near chance "
             "(its BatchNorm statistics are those of the mixed model; the 15-epoch runs in "
             "benchmarks/fp200/accuracy.json start the same way).", "",
             "The BN re-estimated columns are the same evaluations with the BatchNorm statistics re-estimated on 50 "
             "augmented training batches first (`--eval-reestimate-bn 50`, statistics put back after; logged from "
             "the epoch the runs took the flag on; \"-\" before).", "",
             "| run | estimator | epochs done / planned | last epoch: test top-1 (%) | best epoch: test top-1 (%) | "
             "last epoch, BN re-estimated (%) | best epoch, BN re-estimated (%) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        est = r["estimator"] if r["estimator"] != "pege" else (
            f"pege (lambda {r['discretization_lambda']:g}, on {r['discretization_target']})")
        state = "" if r["finished"] else " (training)"
        lines.append(f"| {name} | {est} | {r['epochs_done']} / {r['epochs_planned']}{state} | "
                     f"{100 * r['last']['accuracy']:.2f} (epoch {r['last']['epoch']}) | "
                     f"{100 * r['best']['accuracy']:.2f} (epoch {r['best']['epoch']}) | "
                     f"{_cell(r.get('last_bn_reestimated'))} | {_cell(r.get('best_bn_reestimated'))} |")
    probes = [(name, p) for name, r in result["runs"].items() for p in r.get("probe", [])]
    if probes:
        lines += ["", "Probe while training (`python benchmarks/long_budget/probe.py` -> probe.json; a diagnostic, not a "
                  "result): a checkpoint's fully quantized model on the test set after its BatchNorm statistics were "
                  "re-estimated on 50 augmented training batches, which PEGE's mid-ramp statistics need before the "
                  "fully quantized model means anything.", "",
                  "| run | step | epoch | test top-1, BN re-estimated (%) |", "|---|---|---|---|"]
        lines += [f"| {name} | {p['step']} | {p['epoch']:.1f} | {100 * p['accuracy_bn_reestimated']:.2f} |"
                  for name, p in probes]
    return "\n".join(lines) + "\n"


def _cell(point: dict | None) -> str:
    return "-" if point is None else f"{100 * point['accuracy']:.2f} (epoch {point['epoch']})"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in result["runs"].items():
        epochs = [int(e) for e in r["curve"]]
        line, = ax.plot(epochs, [100 * a for a in r["curve"].values()], lw=1.2,
                        marker="." if len(epochs) < 30 else None, label=name)
        if r.get("curve_bn_reestimated"):
            bn = r["curve_bn_reestimated"]
            ax.plot([int(e) for e in bn], [100 * a for a in bn.values()], ls="--", lw=1.2, color=line.get_color(),
                    label=f"{name}, BN re-estimated")
        if r.get("probe"):
            ax.plot([p["epoch"] for p in r["probe"]], [100 * p["accuracy_bn_reestimated"] for p in r["probe"]], "x",
                    color=line.get_color(), label=f"{name}, BN re-estimated (probe)")
    if result["fp_accuracy"]:
        ax.axhline(100 * result["fp_accuracy"], color="k", ls="--", lw=1, label="FP")
    ax.set_xlabel("QAT epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("W2A2 ResNet-20, long budget: accuracy after every epoch", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    result = collect(HERE / "runs")
    (HERE / "long.json").write_text(json.dumps(result, indent=2) + "\n")
    (HERE / "long.md").write_text(markdown(result))
    if result["runs"]:
        plot(result, HERE / "long.png")
    print((HERE / "long.md").read_text())


if __name__ == "__main__":
    main()
