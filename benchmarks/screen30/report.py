"""Table of the error-term screening (benchmarks/screen30/run.sh): validation top-1 of every finished run
and its difference to STE with the same budget. Writes benchmarks/screen30/screen.{json,md}.

    python benchmarks/screen30/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def finished_runs(runs_dir: Path) -> dict[str, dict]:
    out = {}
    for metrics in sorted(runs_dir.glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        qc = m.get("quantization_config") or {}
        keys = ("estimator", "discretization_lambda", "lambda_schedule", "lambda_start", "discretization_form",
                "discretization_target", "discretization_reduction")
        out[metrics.parent.name] = {"accuracy": m["accuracy"], "epochs": m["epochs"], "num_test": m["num_test"],
                                    "test_split": m.get("test_split"), "config": {k: qc.get(k) for k in keys},
                                    "command": " ".join(m.get("command") or [])}
    return out


def markdown(runs: dict[str, dict]) -> str:
    ste = {r["epochs"]: r["accuracy"] for name, r in runs.items() if name.startswith("ste-")}
    lines = ["W2A2 ResNet-20 from the shipped 200-epoch FP model, seed 0, on a validation split (10% of the training "
             "file, seed 0; the shipped FP model was trained on these images too, so accuracies near FP read high); "
             "same recipe for every run (benchmarks/screen30/run.sh).", "",
             "| run | epochs | validation top-1 (%) | vs STE | error term |", "|---|---|---|---|---|"]
    for name, r in sorted(runs.items(), key=lambda kv: -kv[1]["accuracy"]):
        c = r["config"]
        term = "-" if c["estimator"] != "pege" else (
            f"{c['discretization_form']} {c['discretization_reduction']}, lambda {c['discretization_lambda']:g} "
            f"({c['lambda_schedule']}{' from %g' % c['lambda_start'] if c['lambda_schedule'] in ('log', 'exp') else ''}), "
            f"to {c['discretization_target']}")
        base = ste.get(r["epochs"])
        delta = "-" if base is None or name.startswith("ste-") else f"{100 * (r['accuracy'] - base):+.2f}"
        lines.append(f"| {name} | {r['epochs']} | {100 * r['accuracy']:.2f} | {delta} | {term} |")
    lines += ["", f"Validation images per run: {', '.join(sorted({str(r['num_test']) for r in runs.values()}))}.", ""]
    return "\n".join(lines)


def main() -> None:
    runs = finished_runs(HERE / "runs")
    (HERE / "screen.json").write_text(json.dumps(runs, indent=2) + "\n")
    (HERE / "screen.md").write_text(markdown(runs))
    print((HERE / "screen.md").read_text())


if __name__ == "__main__":
    main()
