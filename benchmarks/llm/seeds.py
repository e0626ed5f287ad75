"""Every QAT seed of the LLM benchmark side by side: each run's validation perplexity against its own seed's
control (the FP model trained on with the same budget and data order), per seed and the mean, from the llm.json
files that `python -m benchmarks.llm.run [--qat-seed S --out benchmarks/llm/budget400/seedS]` wrote.

    python -m benchmarks.llm.seeds    # -> benchmarks/llm/budget400/seeds.json and seeds.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from .report import LABELS

HERE = Path(__file__).resolve().parent


def load_runs(root: Path) -> list[dict]:
    """The finished runs of root/llm.json and root/seed*/llm.json (one entry per run name)."""
    files = [root / "llm.json", *sorted(root.glob("seed*/llm.json"))]
    runs = {}
    for f in files:
        for r in json.loads(f.read_text())["runs"]:
            if "perplexity" in r:
                runs[r["run"]] = r
    return list(runs.values())


def differences(runs: list[dict]) -> dict:
    """{scheme: {method: {seed: perplexity / control - 1}}} for the seeds whose control finished."""
    controls = {r["seed"]: r["perplexity"] for r in runs if r["run"].startswith("FPcont-fp")}
    out: dict = {}
    for r in runs:
        if r["run"] == "fp" or r["run"].startswith("FPcont") or r["seed"] not in controls:
            continue
        out.setdefault(r["scheme"], {}).setdefault(r["method"], {})[r["seed"]] = r["perplexity"] / controls[r["seed"]] - 1
    return out


def summary(runs: list[dict]) -> dict:
    """Per scheme and method: the differences per seed, and their mean and sample standard deviation over the
    seeds the method ran."""
    result = {}
    for scheme, methods in differences(runs).items():
        rows = []
        for method, by_seed in methods.items():
            values = [by_seed[s] for s in sorted(by_seed)]
            rows.append({"method": method, "per_seed": {str(s): by_seed[s] for s in sorted(by_seed)},
                         "seeds": len(values), "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else None})
        rows.sort(key=lambda row: (-row["seeds"], row["mean"]))
        result[scheme] = {"seeds": sorted({int(s) for row in rows for s in row["per_seed"]}), "methods": rows}
    return result


def markdown(result: dict) -> str:
    lines = ["# LLM benchmark over QAT seeds (`python -m benchmarks.llm.seeds`)", "",
             "Validation perplexity of each run relative to its own seed's control (the FP model trained on for the "
             "same steps with the same data order): +1.00% is 1% worse than the control. The seed sets the order of "
             "the training blocks; every run starts from the same FP model. Mean and sample standard deviation over "
             "the seeds a method ran; methods with the most seeds first, then by mean.", ""]
    for scheme, block in result.items():
        seeds = block["seeds"]
        lines += [f"## {scheme}", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |",
                  "|---|" + "---:|" * (len(seeds) + 2)]
        for row in block["methods"]:
            cells = [f"{row['per_seed'][str(s)] * 100:+.2f}%" if str(s) in row["per_seed"] else "" for s in seeds]
            std = "" if row["std"] is None else f"{row['std'] * 100:.2f}"
            lines.append(f"| {LABELS.get(row['method'], row['method'])} | " + " | ".join(cells)
                         + f" | {row['mean'] * 100:+.2f}% | {std} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.llm.seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=HERE / "budget400", help="folder with llm.json and seed*/llm.json")
    args = p.parse_args(argv)
    result = summary(load_runs(args.root))
    (args.root / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.root / "seeds.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
