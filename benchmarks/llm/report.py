"""The LLM benchmark's report: llm.json, llm.md and llm.png from the finished runs' metrics.json."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # commands are shown relative to the repository root
LABELS = {"ste": "STE (pege_hf)", "pege": "PEGE (pege_hf)", "pege_step": "PEGE, D on the step size (pege_hf)",
          "pege_step_short": "PEGE, D on the step size, ramp over 25% (pege_hf)",
          "ste_sym": "STE, torchao's weight quantizer (pege_hf)",
          "pege_sym": "PEGE, torchao's weight quantizer (pege_hf)",
          "pege_step_sym": "PEGE, D on the step size, torchao's weight quantizer (pege_hf)",
          "pege_step_sym_short": "PEGE, D on the step size, torchao's weight quantizer, ramp over 25% (pege_hf)",
          "torchao": "torchao QAT"}
SCHEMES = {"FPcont": "FP + the QAT budget"}  # the control: FP trained on for as many steps as each QAT run


def split_name(name: str) -> tuple[str, str, int]:
    """A run's name -> (scheme, method, QAT seed): "W2g32-ste" -> ("W2g32", "ste", 0), "W2g32-ste-s1" ->
    ("W2g32", "ste", 1), "fp" -> ("fp", "", 0)."""
    scheme, _, method = name.partition("-")
    seeded = re.fullmatch(r"(.+)-s(\d+)", method)
    return (scheme, seeded[1], int(seeded[2])) if seeded else (scheme, method, 0)


def collect(work: Path, planned) -> list[dict]:
    rows = []
    for name, argv in planned:
        metrics_file = work / "runs" / name / "metrics.json"
        scheme, method, seed = split_name(name)
        row = {"run": name, "scheme": "FP" if name == "fp" else SCHEMES.get(scheme, scheme), "method": method or "fp",
               "seed": seed,
               "command": "python -m benchmarks.llm.run --one " + shlex.join(
                   [name, "--", *(a.replace(f"{ROOT}/", "") for a in argv)])}
        if metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            row.update(loss=m["loss"], perplexity=m["perplexity"], steps=m["steps"], wall_time_s=m["wall_time_s"],
                       validation_tokens=m.get("validation_tokens"), train_blocks=m.get("train_blocks"),
                       history=m.get("history"))
        rows.append(row)
    fp = next((r for r in rows if r["run"] == "fp" and "perplexity" in r), None)
    for r in rows:
        if fp and "perplexity" in r:
            r["ratio_to_fp"] = r["perplexity"] / fp["perplexity"]
    return rows


def markdown(rows: list[dict], corpus: dict, torchao: str | None) -> str:
    lines = ["# Causal-LM QAT benchmark (`python -m benchmarks.llm.run`)", "",
             f"Model: Llama ({corpus.get('model')}, {corpus.get('parameters', '?'):,} parameters, byte-level BPE "
             f"vocabulary {corpus.get('vocab_size')}), trained here from random init on the Python "
             f"{corpus.get('python')} standard library's source: {corpus.get('train')} training files, "
             f"{corpus.get('validation')} validation files (split by a hash of the file path). Weights: group "
             "size 32, symmetric; embeddings and lm_head float. Every QAT run starts from the FP model with the "
             "same steps, batch, lr and data.", "",
             f"torchao: {torchao or 'not installed (column skipped)'}.", "",
             "| run | scheme | method | validation loss | validation perplexity | ratio to FP | steps | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "perplexity" not in r:
            lines.append(f"| {r['run']} | {r['scheme']} | {LABELS.get(r['method'], r['method'])} | not run | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['scheme']} | {LABELS.get(r['method'], r['method'])} | {r['loss']:.4f} | "
                     f"{r['perplexity']:.3f} | {r.get('ratio_to_fp', float('nan')):.4f} | {r['steps']} | "
                     f"{r['wall_time_s']:.0f} s |")
    lines += ["", "Validation perplexity is exp of the mean next-token cross-entropy over "
              f"{next((r['validation_tokens'] for r in rows if r.get('validation_tokens')), '?')} validation tokens "
              "(the same blocks for every run).", "", "Commands (each run's child process; `run.py` adds "
              "`--output-dir WORK/runs/RUN --resume`):", ""]
    lines += [f"- `{r['run']}`: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Validation perplexity / FP perplexity of every run, grouped by scheme (the axis zoomed to the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = [s for s in dict.fromkeys(r["scheme"] for r in rows) if s != "FP" and s not in SCHEMES.values()]
    methods = [m for m in LABELS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(methods), 1)
    shown = [1.0]
    for i, method in enumerate(methods):
        values = [next((r.get("ratio_to_fp") for r in rows if r["scheme"] == s and r["method"] == method), None)
                  for s in schemes]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(schemes))]
        ax.bar([x for x, v in zip(xs, values) if v], [v - 1 for v in values if v], width, bottom=1.0,
               label=LABELS[method])
        shown += [v for v in values if v]
    fp = next((r.get("perplexity") for r in rows if r["run"] == "fp"), None)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"FP (perplexity {fp:.2f})" if fp else "FP")
    control = next((r.get("ratio_to_fp") for r in rows if r["run"].startswith("FPcont-fp")), None)
    if control:
        ax.axhline(control, color="grey", linestyle=":", linewidth=1.5, label="FP trained on with the QAT budget")
        shown.append(control)
    margin = max(0.002, 0.1 * (max(shown) - min(shown)))
    ax.set_ylim(min(shown) - margin, max(shown) + margin)
    ax.set_xticks(range(len(schemes)), schemes)
    ax.set_ylabel("validation perplexity / FP (lower is better)")
    ax.set_title("Small Llama on the Python stdlib: QAT at the same budget")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(work: Path, out: Path, planned, torchao: str | None) -> list[dict]:
    corpus = json.loads((work / "corpus.json").read_text()) if (work / "corpus.json").is_file() else {}
    rows = collect(work, planned)
    summary = [{k: v for k, v in r.items() if k != "history"} | {"history": r.get("history")} for r in rows]
    (out / "llm.json").write_text(json.dumps({"corpus": corpus, "torchao": torchao, "runs": summary}, indent=2) + "\n")
    (out / "llm.md").write_text(markdown(rows, corpus, torchao))
    if any("perplexity" in r for r in rows):
        plot(rows, out / "llm.png")
    return rows
