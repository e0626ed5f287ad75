"""``python -m benchmarks.pege_bench accuracy|tune|ship|grid|latency``: the research benchmarks, run from
the repository root (results under benchmarks/; see benchmarks/README.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pege_hf.bench import DEFAULT_OUT, write_result
from pege_hf.cli import run_command
from pege_hf.sources import SHIPPED_MODELS_DIR

from pege_hf.training.recipes import recipe_argv

from .matrix import BN_REESTIMATION_BATCHES, PEGE_TUNED, QAT_RECIPE, TUNING_RECIPES, accuracy_plan, recipe_from_argv
from .matrix import run_accuracy, run_is_finished, run_plan, select_runs, tuning_plan, write_accuracy_report
from .matrix import write_tuning_report
from .tools import bench_grid, bench_latency, finished_qat_runs_with_checkpoints, grid_plot, grid_table
from .tools import latency_table, ship_models


def _add_latency(sub) -> None:
    la = sub.add_parser("latency", help="server-side time of one demo request (the four shipped models)",
                        description="Median time of the demo's predict call: FP, W4A4, W3A3, W2A2 on one image.")
    la.add_argument("--calls", type=int, default=50, metavar="N", help="timed requests; median and p90 reported (default 50)")
    la.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")


def _add_accuracy(sub) -> None:
    ac = sub.add_parser(
        "accuracy", help="the resumable accuracy matrix: FP vs STE vs EWGS vs PEGE at W2A2/W3A3/W4A4",
        description="Train an FP CIFAR ResNet-20, then QAT from it with every estimator and bit width (same recipe "
                    "and seeds), one child process per run. Resumable: finished runs are never redone and a "
                    "cut-off run continues from its last checkpoint. Writes accuracy.json/.md and PNG plots.")
    ac.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 folder, parquet or Hub id "
                    "(default: the development machines' local copy)")
    ac.add_argument("--fp-epochs", type=int, default=60, metavar="N", help="epochs of the FP model (default 60)")
    ac.add_argument("--qat-epochs", type=int, default=15, metavar="N", help="epochs of each QAT run (default 15)")
    ac.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], metavar="B",
                    help="bit widths, weights and activations alike (default 2 3 4)")
    ac.add_argument("--estimators", nargs="+", default=["ste", "ewgs", "pege"], metavar="NAME",
                    help="gradient estimators to compare (default ste ewgs pege)")
    ac.add_argument("--seeds", type=int, default=2, help="seeds per estimator at the other widths (default 2)")
    ac.add_argument("--seeds-low-bits", type=int, default=3, help="seeds at the lowest width (default 3)")
    ac.add_argument("--no-ablations", action="store_true", help="skip the W2A2 PEGE ablations")
    ac.add_argument("--max-runs", type=int, default=None, help="start at most N runs, then stop")
    ac.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    ac.add_argument("--bn-batches", type=int, default=BN_REESTIMATION_BATCHES, metavar="N",
                    help="after each run, also evaluate every finished run with its BatchNorm statistics re-estimated "
                         f"on N augmented training batches (default {BN_REESTIMATION_BATCHES}; 0: not)")
    ac.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                    help="extra argument passed to every training run (repeat), e.g. --train-arg=--compile-kernels "
                         "--train-arg=--channels-last")
    ac.add_argument("--qat-arg", action="append", default=None, metavar="ARG",
                    help="the shared QAT recipe, passed to every QAT run (repeat; replaces the tuned default "
                         f"{' '.join(recipe_argv(QAT_RECIPE)) or '(none)'})")
    ac.add_argument("--pege-arg", action="append", default=None, metavar="ARG",
                    help="PEGE's own settings, passed to the PEGE runs only (repeat; replaces the tuned default "
                         f"{' '.join(recipe_argv(PEGE_TUNED)) or '(none)'})")
    ac.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, sharing the CPU cores (default 1; 2 trains faster overall on 2 cores)")
    ac.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")


def _add_ship(sub) -> None:
    sh = sub.add_parser("ship", help="copy the accuracy benchmark's FP and PEGE W2/W3/W4 models into the package",
                        description="Copy the finished FP and PEGE W2A2/W3A3/W4A4 (seed 0) runs of `pege bench "
                                    "accuracy` into pege_hf/assets/models (the quickstart's and the demo's default "
                                    "models), each with its model card.")
    sh.add_argument("--runs", type=Path, default=DEFAULT_OUT / "runs", help="the benchmark's runs folder")
    sh.add_argument("--dest", type=Path, default=None, help="default: pege_hf/assets/models")


def _add_tune(sub) -> None:
    tu = sub.add_parser(
        "tune", help="PEGE settings compared on a validation split carved from the training set",
        description="Short QAT runs from the FP model (default: the accuracy benchmark's) on 90%% of the training "
                    "file, evaluated on the other 10%% (never the test set): STE, PEGE with its defaults and PEGE "
                    "with one setting changed at a time (lambda, curriculum alpha, ramp, mask policies). Resumable "
                    "like `accuracy`. Writes tuning.json/.md.")
    tu.add_argument("--model", default=str(DEFAULT_OUT / "runs" / "resnet20-fp"), help="FP checkpoint to start from")
    tu.add_argument("--data", default="../shared/data/cifar10/train.parquet",
                    help="the training file; 10%% of it (seed 0) is the validation split")
    tu.add_argument("--epochs", type=int, default=3, metavar="N", help="epochs of each tuning run (default 3)")
    tu.add_argument("--bits", type=int, default=2, metavar="B", help="weight and activation bits (default 2)")
    tu.add_argument("--combine", nargs="+", default=[], metavar="A+B",
                    help="also try these combinations of settings (names from the report joined by '+', "
                         "e.g. lambda0.1+amask-progressive), each as one more run")
    tu.add_argument("--recipe", default="", choices=list(TUNING_RECIPES),
                    help="shared QAT recipe the PEGE settings are tried under (pick the one that makes STE sound; "
                         "default: the train CLI's defaults)")
    tu.add_argument("--max-runs", type=int, default=None, help="start at most N runs, then stop")
    tu.add_argument("--only", nargs="+", default=[], metavar="RUN",
                    help="train and report only these runs of the plan (names as in the report, e.g. w2a2-ste-mse-qlr1); "
                         "use with its own --out so the whole plan's report is not replaced")
    tu.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    tu.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                    help="extra argument passed to every run (repeat)")
    tu.add_argument("--jobs", type=int, default=1, help="runs at a time, sharing the CPU cores (default 1)")
    tu.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")


def _add_grid(sub) -> None:
    gr = sub.add_parser(
        "grid", help="where the latent weights of finished QAT runs sit on their quantization grid",
        description="For each finished QAT run that still has its training checkpoints: the mean distance of the "
                    "latent weights to their grid points, the share clipped, and the share of weight codes that "
                    "changed between the two newest checkpoints (does training still move codes at the end?). "
                    "Writes grid.json/.md/.png.")
    gr.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                    help="run folders (default: every finished QAT run under benchmarks/runs with checkpoints)")
    gr.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{accuracy,tune,ship,grid,latency}")
    for add in (_add_accuracy, _add_tune, _add_ship, _add_grid, _add_latency):
        add(sub)


def _recipe_or_default(argv: list[str] | None) -> dict | None:
    """--qat-arg / --pege-arg as a recipe; None (not given): the plan's tuned default."""
    return None if argv is None else recipe_from_argv(argv)


def run(args: argparse.Namespace) -> int:
    if args.bench == "latency":
        result = bench_latency(args.calls)
        write_result(result, latency_table(result), args.out, "latency")
    elif args.bench == "accuracy":
        runs_dir = args.out / "runs"
        plan = accuracy_plan(data=args.data, fp_epochs=args.fp_epochs, qat_epochs=args.qat_epochs, bits=tuple(args.bits),
                             estimators=tuple(args.estimators), seeds=args.seeds, seeds_low_bits=args.seeds_low_bits,
                             ablations=not args.no_ablations, runs_dir=runs_dir, extra=recipe_from_argv(args.train_arg),
                             qat=_recipe_or_default(args.qat_arg), pege=_recipe_or_default(args.pege_arg))
        if args.bn_batches < 0:
            raise ValueError(f"--bn-batches must be >= 0; got {args.bn_batches}")
        if args.report_only:
            write_accuracy_report(plan, runs_dir, args.out)
        else:
            run_accuracy(plan, runs_dir, args.out, args.max_runs, jobs=args.jobs, bn_batches=args.bn_batches)
    elif args.bench == "ship":
        ship_models(args.runs, args.dest or SHIPPED_MODELS_DIR)
    elif args.bench == "grid":
        runs = args.runs or finished_qat_runs_with_checkpoints(DEFAULT_OUT / "runs")
        if not runs:
            raise FileNotFoundError("no finished QAT run with training checkpoints found; pass RUN_DIR")
        results = [bench_grid(Path(r)) for r in runs]
        write_result({"benchmark": "grid", "runs": results}, grid_table(results), args.out, "grid")
        grid_plot(results, args.out / "grid.png")
    elif args.bench == "tune":
        runs_dir = args.out / "tuning"
        plan = tuning_plan(model=args.model, data=args.data, epochs=args.epochs, bits=args.bits,
                           recipe=args.recipe, combine=tuple(args.combine), extra=recipe_from_argv(args.train_arg))
        selected = select_runs(plan, args.only)
        if not args.report_only:
            if not run_is_finished(Path(args.model)):
                raise FileNotFoundError(f"no finished FP model at {args.model!r}: run `python -m benchmarks.pege_bench accuracy` first "
                                        "(its first run) or pass --model")
            run_plan(selected, runs_dir, jobs=args.jobs, max_runs=args.max_runs,
                     on_finish=lambda: write_tuning_report(selected, runs_dir, args.out))
        write_tuning_report(selected, runs_dir, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pege_bench",
                                     description="the research benchmarks of pege-hf (run from the repository root)")
    add_arguments(parser)
    return run_command("bench", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
