"""A probe of the long-budget runs while they train: the newest checkpoint of each run (its own, else the committed
resume copy under benchmarks/in-progress/long_budget/) evaluated on the CIFAR-10 test set after re-estimating
its BatchNorm statistics on augmented training batches (`pege eval --reestimate-bn N`).

Why: the runs' own evaluations take BatchNorm statistics as training left them. PEGE trains a mix of quantized
and full-precision values until r(t) reaches 1 (75% of the budget), so its statistics belong to the mixed model
and the fully quantized model it evaluates reads near chance until late in the ramp. With statistics
re-estimated for the fully quantized model, the probe reads what that model can do at this step, for STE as
for PEGE. A diagnostic only: the runs' results are their own evaluations (report.py). Appends one record per
run and checkpoint to benchmarks/long_budget/probe.json (a checkpoint already probed is skipped).

    python benchmarks/long_budget/probe.py [--reestimate-bn 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.long_budget.report import epoch_curve  # noqa: E402

KEPT = ROOT / "benchmarks" / "in-progress" / "long_budget"
OUT = HERE / "probe.json"


def newest_checkpoint(run: Path) -> Path | None:
    """The run's own newest complete checkpoint, else its committed resume copy, else None."""
    from pege_hf.training.state import complete_checkpoints

    own = complete_checkpoints(run)
    kept = sorted(KEPT.glob(f"{run.name}/step_*"), key=lambda p: int(p.name.split("_")[1]))
    return own[-1] if own else (kept[-1] if kept else None)


def quantization_config(config: dict):
    """The run's PEGEConfig from its recorded (flattened) config event."""
    from pege_hf import PEGEConfig

    prefix = "quantization_config/"
    fields = {k[len(prefix):]: (None if v == "None" else v) for k, v in config.items() if k.startswith(prefix)}
    return PEGEConfig(**fields)


def probe(run: Path, checkpoint: Path, reestimate_bn: int) -> dict:
    """Test top-1 of ``checkpoint``'s fully quantized model after BatchNorm re-estimation."""
    from safetensors.torch import load_file

    import pege_hf
    from pege_hf.training.evaluation import evaluate_checkpoint

    _, config = epoch_curve(run / "metrics.jsonl")
    model = pege_hf.from_pretrained(str(ROOT / config["base_model"]), quantization_config=quantization_config(config))
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        result = evaluate_checkpoint(tmp, str(ROOT / config["dataset"]) if not Path(config["dataset"]).is_absolute()
                                     else config["dataset"], reestimate_bn=reestimate_bn)
    return {"run": run.name, "step": state["global_step"], "epoch": state["global_step"] / state["batches_per_epoch"],
            "accuracy_bn_reestimated": result["accuracy"], "bn_reestimation": result["bn_reestimation"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reestimate-bn", type=int, default=50, metavar="N",
                        help="augmented training batches of 128 for the BatchNorm statistics (default 50)")
    args = parser.parse_args(argv)
    records = json.loads(OUT.read_text()) if OUT.is_file() else []
    done = {(r["run"], r["step"]) for r in records}
    for run in sorted(p.parent for p in (HERE / "runs").glob("*/metrics.jsonl")):
        checkpoint = newest_checkpoint(run)
        if checkpoint is None:
            continue
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        if (run.name, step) in done:
            print(f"{run.name}: step {step} already probed")
            continue
        record = probe(run, checkpoint, args.reestimate_bn)
        records.append(record)
        OUT.write_text(json.dumps(records, indent=2) + "\n")
        print(f"{run.name}: step {record['step']} (epoch {record['epoch']:.1f}), BN re-estimated: "
              f"{100 * record['accuracy_bn_reestimated']:.2f}%")


if __name__ == "__main__":
    main()
