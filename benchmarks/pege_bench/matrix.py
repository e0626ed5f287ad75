"""The resumable training matrix behind benchmarks/accuracy.md and benchmarks/tuning.md: run plans (each
run's PEGEConfig fields and training options), a runner that trains them in child processes and continues
cut-off runs, and the reports (JSON, markdown, PNG) read back from the runs' metrics.json files.

A plan holds configuration, never command lines: `train_argv` writes a run's `pege train` options only when
the runner launches it, and the settings check compares the plan's values with those the run recorded in
its metrics.json (metrics.jsonl while it trains).

Research code, run from the repository (``python -m benchmarks.pege_bench accuracy|tune ...``); not part
of the pege_hf wheel.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pege_hf.bench import DEFAULT_OUT, pyplot, write_result
from pege_hf.config import PEGEConfig, config_fields, unused_fields
from pege_hf.training import recipes
from pege_hf.training.args import FULL_PRECISION, build_quant_config, check_training_options, given_config_options
from pege_hf.training.args import parse_args
from pege_hf.training.state import DIVERGED_FILE, output_dir_is_locked
from pege_hf.training.tracking import flat_hparams

# the tuned recipes (pege_hf.training.recipes: {"config": PEGEConfig fields, "training": training options})
QAT_RECIPE: dict = recipes.QAT
PEGE_TUNED: dict = recipes.PEGE


def merge(*parts: dict) -> dict:
    """Recipes merged into one, a later one's values winning."""
    return {kind: {k: v for part in parts for k, v in part.get(kind, {}).items()} for kind in ("config", "training")}


def recipe_from_argv(argv) -> dict:
    """`pege train` options (as a user passes them to the runner: --train-arg, --qat-arg, --pege-arg) as a recipe:
    the PEGEConfig fields given, and the training options that differ from their defaults."""
    given, defaults = parse_args(list(argv)), vars(parse_args([]))
    config = given_config_options(given)
    fields = {name for name, *_ in config_fields()}
    training = {k: v for k, v in vars(given).items() if k not in fields and v != defaults[k]}
    return {"config": config, "training": training}


# ---------------------------------------------------------------------------------------------
# accuracy: the resumable matrix FP / STE / EWGS / PEGE x W2A2 / W3A3 / W4A4
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training run of a plan: its folder name, its PEGEConfig fields (None: full precision) and its
    `pege train` training options (model, dataset, epochs, lr, seed, ...)."""

    name: str
    config: dict | None = field(hash=False)
    training: dict = field(hash=False)
    variant: str = "main"  # "main" or an ablation tag
    depends: str | None = None  # a run whose output folder is this run's model

    def __post_init__(self):
        """A shared recipe's fields that this run's estimator never reads (PEGE's lambda in an STE run) are left
        out of its config: `pege train` refuses them, and the run never depended on them."""
        if self.config is None:
            return
        try:
            unused = unused_fields(self.config, PEGEConfig(**self.config))
        except ValueError:  # an invalid config: check_plan refuses it with PEGEConfig's message, as for any run
            return
        object.__setattr__(self, "config", {k: v for k, v in self.config.items() if k not in unused})

    @property
    def estimator(self) -> str:
        return "fp" if self.config is None else self.config["estimator"]

    @property
    def bits(self) -> int | None:
        return None if self.config is None else self.config["w_bits"]

    @property
    def seed(self) -> int:
        return self.training.get("seed", 0)


def train_argv(run: Run) -> list[str]:
    """The run's `pege train` options, built from its config and training options (the runner's own are
    added at launch: runner_args)."""
    config = {"estimator": FULL_PRECISION} if run.config is None else run.config
    return list(recipes.recipe_argv({"config": config, "training": run.training}))


def accuracy_plan(*, data: str, fp_epochs: int = 60, qat_epochs: int = 15, bits=(2, 3, 4),
                  estimators=("ste", "ewgs", "pege"), seeds_low_bits: int = 3, seeds: int = 2,
                  ablations: bool = True, runs_dir: Path = DEFAULT_OUT / "runs", extra: dict | None = None,
                  qat: dict | None = None, pege: dict | None = None) -> list[Run]:
    """The protocol: one FP ResNet-20, then QAT from it for every estimator and bit width with the same
    optimiser, schedule, epochs, augmentation and seeds (more seeds at the lowest width), plus the
    W2A2 ablations PEGE without the discretization term and PEGE with the linear curriculum, and PEGE
    without the progressive replacement at every width (instant: r = 1 from the start, as many seeds as
    the main rows).
    The recipes: `extra` reaches every run (its config fields only the QAT runs), `qat` (default QAT_RECIPE)
    every QAT run, `pege` (default PEGE_TUNED: PEGE's own settings from tuning) only the PEGE runs, never
    STE/EWGS.

    Ordered by what the report needs first: FP, then the lowest width for every estimator, PEGE at
    the other widths (the shipped models), the other seeds at the lowest width (STE and PEGE, the
    pair the target compares, before EWGS), the remaining baselines and seeds (again STE and PEGE
    first), the ablations."""
    extra = merge(extra or {})
    qat_recipe = QAT_RECIPE if qat is None else qat
    pege_recipe = PEGE_TUNED if pege is None else pege
    fp = Run("resnet20-fp", None, {"arch": "resnet20", "dataset": data, "epochs": fp_epochs, "lr": 0.1,
                                   **extra["training"]})
    model = str(runs_dir / fp.name)

    def qat_run(estimator, b, seed, variant="main", more=None):
        name = f"resnet20-w{b}a{b}-{estimator}" + ("" if variant == "main" else f"-{variant}") + f"-s{seed}"
        base = {"config": {"estimator": estimator, "w_bits": b, "a_bits": b},
                "training": {"model": model, "dataset": data, "epochs": qat_epochs, "lr": 0.01, "seed": seed}}
        recipe = merge(base, extra, qat_recipe, pege_recipe if estimator == "pege" else {}, {"config": more or {}})
        return Run(name, recipe["config"], recipe["training"], variant, depends=fp.name)

    low = min(bits)
    runs = [qat_run(e, b, seed) for seed in range(max(seeds, seeds_low_bits)) for b in bits for e in estimators
            if seed < (seeds_low_bits if b == low else seeds)]
    if ablations and "pege" in estimators:
        runs += [qat_run("pege", low, 0, "lambda0", {"discretization_lambda": 0.0}),
                 qat_run("pege", low, 0, "linear", {"curriculum": "linear"})]
        # the tuning setting that was best over 15 epochs on validation (benchmarks/tune15): STE + the pull,
        # at every width with the main rows' seeds
        runs += [qat_run("pege", b, seed, "instant", TUNING_VARIANTS["instant"]) for b in bits
                 for seed in range(seeds_low_bits if b == low else seeds)]

    def priority(r: Run):
        if r.variant != "main":
            return (5,)
        if r.seed == 0 and r.bits == low:
            return (1, r.estimator != "pege")
        if r.seed == 0 and r.estimator == "pege":
            return (2, -r.bits)
        return (3 if r.bits == low else 4, r.estimator not in ("ste", "pege"), r.seed)

    return [fp] + sorted(runs, key=priority)  # sorted() is stable: plan order within a priority


def tuning_plan(*, model: str, data: str, epochs: int = 3, bits: int = 2, variants: dict | None = None,
                recipes: dict | None = None, recipe: str = "", combine=(), extra: dict | None = None) -> list[Run]:
    """Short W{bits}A{bits} QAT runs from the FP model on a validation split carved from the
    training set (`data` is the training file; 10% of it, seed 0, becomes the evaluation split).
    First the shared QAT recipe (step-size init, quantizer learning rate: applied to every
    estimator alike) for STE and PEGE with its defaults, then PEGE with one of its own settings
    changed at a time under the recipe named `recipe` (a key of `recipes`); last, each combination in
    `combine` (setting names joined by "+", e.g. "lambda0.1+alpha3") of settings that helped alone.
    A variant is a dict of PEGEConfig fields; a recipe {"config": ..., "training": ...}."""
    variants = TUNING_VARIANTS if variants is None else variants
    recipes = TUNING_RECIPES if recipes is None else recipes
    if recipe not in recipes:
        raise ValueError(f"unknown tuning recipe {recipe!r}: expected one of {sorted(recipes)}")
    for combo in combine:
        unknown = [part for part in combo.split("+") if part not in variants or part == "default"]
        if unknown or "+" not in combo:
            raise ValueError(f"--combine {combo!r}: expected two or more of {sorted(set(variants) - {'default'})} "
                             "joined by '+'")
    variants = {**variants, **{combo: _variant_config(combo, variants) for combo in combine}}
    base = {"config": {"w_bits": bits, "a_bits": bits},
            "training": {"model": model, "dataset": data, "epochs": epochs, "lr": 0.01, "seed": 0}}

    def run(name, recipe_name, estimator, variant, own=None):
        merged = merge(base, extra or {}, recipes[recipe_name], {"config": {"estimator": estimator, **(own or {})}})
        return Run(name, merged["config"], merged["training"], variant)

    plan = []
    for name in recipes:
        tail = f"-{name}" if name else ""
        plan += [run(f"w{bits}a{bits}-ste{tail}", name, "ste", f"ste{tail}"),
                 run(f"w{bits}a{bits}-pege-default{tail}", name, "pege", f"default{tail}")]
    tail = f"-{recipe}" if recipe else ""
    plan += [run(f"w{bits}a{bits}-pege-{tag}{tail}", recipe, "pege", f"{tag}{tail}", own)
             for tag, own in variants.items() if tag != "default"]
    return plan


# the shared QAT recipe: tried for STE and PEGE alike. "" is the `pege train` defaults of the time the tuning
# ran (before the tuned defaults: LSQ step-size init, lambda 1e-4, quantizer lr x0.1), spelled out so that the
# same name keeps meaning the same runs; the others change one or two of those settings.
_TUNING_BASE = {"config": {"scale_init": "lsq", "discretization_lambda": 1e-4},
                "training": {"quantizer_lr_scale": 0.1}}
TUNING_RECIPES = {
    "": _TUNING_BASE,
    "mse": merge(_TUNING_BASE, {"config": {"scale_init": "mse"}}),
    "qlr1": merge(_TUNING_BASE, {"training": {"quantizer_lr_scale": 1.0}}),
    "mse-qlr1": merge(_TUNING_BASE, {"config": {"scale_init": "mse"}, "training": {"quantizer_lr_scale": 1.0}}),
}

# PEGE's own settings (PEGEConfig fields), one change at a time from PEGEConfig's defaults (under the recipe
# `python -m benchmarks.pege_bench tune --recipe`)
TUNING_VARIANTS = {
    "default": {},
    "sum": {"discretization_reduction": "sum"},
    "lambda0.1": {"discretization_lambda": 0.1},
    "lambda1": {"discretization_lambda": 1.0},
    "lambda10": {"discretization_lambda": 10.0},
    "alpha3": {"alpha": 3.0},
    "alpha30": {"alpha": 30.0},
    "ramp0.5": {"ramp_fraction": 0.5},
    "ramp0.25": {"ramp_fraction": 0.25},
    "instant": {"curriculum": "instant"},  # r = 1 from the start: STE plus the discretization pull
    "pull-ramp": {"lambda_schedule": "ramp"},  # the pull only while r < 1
    "mask-error": {"w_mask": "error"},
    "amask-progressive": {"a_mask": "progressive"},
}


def select_runs(plan: list[Run], names) -> list[Run]:
    """The runs of ``plan`` named in ``names`` (all of it when empty); an unknown name is an error."""
    if not names:
        return plan
    unknown = sorted(set(names) - {r.name for r in plan})
    if unknown:
        raise ValueError(f"not runs of this plan: {', '.join(unknown)}; its runs are: {', '.join(r.name for r in plan)}")
    return [r for r in plan if r.name in names]


def run_is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "config.json").is_file()


def _diverged_steps(plan: list[Run], runs_dir: Path, finished: dict) -> dict[str, int]:
    """{run name: step where its loss became NaN} for the plan's runs that diverged instead of finishing."""
    return {r.name: d["step"] for r in plan if r.name not in finished and (d := run_divergence(runs_dir / r.name))}


def run_divergence(run_dir: Path) -> dict | None:
    """Where a run's loss became NaN/inf (its diverged.json), or None: a diverged run is a result, not redone."""
    path = run_dir / DIVERGED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def runner_args(run_dir: Path, checkpointing_steps: int) -> list[str]:
    """What the runner adds to every run's own arguments."""
    return ["--output-dir", str(run_dir), "--resume", "--checkpointing-steps", str(checkpointing_steps), "--no-tensorboard"]


# ---------------------------------------------------------------------------------------------
# settings: is the run in a folder the plan's run?
# ---------------------------------------------------------------------------------------------
RECORDED_AS = {"model": "base_model"}  # training options metrics.json records under another name
SPEED_OPTIONS = ("compile_kernels", "channels_last", "num_workers", "eval_batch_size", "log_every",
                 "checkpoints_total_limit")  # change speed or logging, not results: not settings


def planned_settings(run: Run) -> dict:
    """The settings a run states, keyed and flattened as its metrics.json / metrics.jsonl records them
    ("epochs", "quantization_config/discretization_lambda", ...). Each value goes through `pege train`'s own
    parsing and PEGEConfig, as the run records it (1 -> 1.0, 'none' -> None); a value either rejects is an
    error here, before anything is launched."""
    args = parse_args(train_argv(run))
    check_training_options(args)
    quant = build_quant_config(args)
    stated = {RECORDED_AS.get(k, k): getattr(args, k) for k in run.training if k not in SPEED_OPTIONS}
    if quant is None:
        stated["quantization_config"] = None
    else:
        stated["quantization_config"] = {k: v for k, v in quant.to_dict().items() if k in run.config}
    return flat_hparams(stated)


def recorded_settings(run_dir: Path) -> dict | None:
    """What a run folder's run recorded about its settings, flattened: its metrics.json when finished, else
    the config record its metrics.jsonl starts with (a run cut off before that has not trained); None: neither."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return flat_hparams(json.loads(metrics.read_text()))
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        with open(log, encoding="utf-8") as f:
            first = json.loads(f.readline() or "{}")
        if first.get("event") == "config":
            return first["config"]
    return None


def settings_differences(wants: dict, had: dict) -> list[str]:
    """'setting: recorded -> planned' for each setting the plan states that the run recorded otherwise. A setting
    the plan leaves out is the library's default of the day the run trained (a default changed later does not make
    finished runs strangers); one the record lacks (older runs recorded fewer) cannot be compared."""
    return [f"{k}: {had[k]} -> {wants[k]}" for k in sorted(wants) if k in had and had[k] != wants[k]]


def check_run_settings(plan: list[Run], runs_dir: Path) -> None:
    """A run folder trained with other settings (say 3 epochs where the plan says 15) would be reused or
    continued as if it were the plan's run: refuse, naming the folder and the differences. Every run's
    settings are checked by `pege train`'s parser and PEGEConfig here, before any run starts."""
    for run in plan:
        wants, had = planned_settings(run), recorded_settings(runs_dir / run.name)
        diff = settings_differences(wants, had) if had is not None else []
        if diff:
            raise ValueError(f"{runs_dir / run.name} was trained with other settings than this plan asks for "
                             f"({', '.join(diff)}); pass another --out, or move that folder away")


def start_run(run: Run, runs_dir: Path, threads: int | None = None, checkpointing_steps: int = 100):
    """Train one run in a child process (or continue it: --resume), logging to its train.log."""
    run_dir = runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pege_hf.train", *train_argv(run), *runner_args(run_dir, checkpointing_steps)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(run_dir / "train.log", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_plan(plan: list[Run], runs_dir: Path, *, jobs: int = 1, max_runs: int | None = None,
             on_finish=lambda: None) -> None:
    """Run what is not finished, in plan order, up to `jobs` at a time; a run waits for the run it
    depends on. The cores are shared among the runs that can go now (FP alone gets them all). A
    cut-off run continues from its last checkpoint; a finished one is never redone. `on_finish`
    runs after every finished run (the report); a failed run stops new starts, a diverged one (loss
    NaN, a result) does not; a run another process is training (its folder's lock is held) is left
    to that process."""
    check_run_settings(plan, runs_dir)
    cores = os.cpu_count() or 1
    finished = lambda name: run_is_finished(runs_dir / name)  # noqa: E731
    pending = [r for r in plan if not finished(r.name) and run_divergence(runs_dir / r.name) is None]
    running: dict[str, object] = {}
    started, failed = 0, False
    while True:
        waiting_on = set(running) | {r.name for r in pending}
        for run in [r for r in pending if r.depends and not finished(r.depends) and r.depends not in waiting_on]:
            print(f"skip {run.name}: {run.depends} has not finished", flush=True)
            pending.remove(run)
        for run in [r for r in pending if output_dir_is_locked(runs_dir / r.name)]:
            print(f"skip {run.name}: another process is training it", flush=True)
            pending.remove(run)
        ready = [r for r in pending if not r.depends or finished(r.depends)]
        if max_runs is not None:
            ready = ready[:max(0, max_runs - started)]
        if failed:
            ready = []
        busy = min(jobs, len(running) + len(ready))
        for run in ready[:jobs - len(running)]:
            pending.remove(run)
            started += 1
            print(f"run {run.name} (log: {runs_dir / run.name / 'train.log'})", flush=True)
            running[run.name] = start_run(run, runs_dir, threads=max(1, cores // busy) if jobs > 1 else None)
        if not running:
            return
        time.sleep(2)
        for name, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[name]
            diverged = run_divergence(runs_dir / name)
            if code != 0 and diverged is None:
                print(f"{name} exited with code {code}; see its train.log", flush=True)
                failed = True
            else:
                if diverged is not None:
                    print(f"{name} diverged at step {diverged['step']} (its {DIVERGED_FILE}); going on", flush=True)
                on_finish()


def collect_accuracy(plan: list[Run], runs_dir: Path) -> dict:
    """Every finished run's config, seed, per-epoch accuracy, final accuracy and wall time, plus
    summaries (mean and spread over seeds, delta to FP)."""
    runs = {}
    for run in plan:
        path = runs_dir / run.name / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        runs[run.name] = {
            "estimator": run.estimator, "bits": run.bits, "seed": run.seed, "variant": run.variant,
            "accuracy": m["accuracy"], "top5": m.get("top5"), "best_accuracy": m.get("best_accuracy"),
            "epoch_accuracy": [h["accuracy"] for h in m.get("history", [])], "wall_time_s": m.get("wall_time_s"),
            "epochs": m.get("epochs"), "steps": m.get("steps"), "quantization_config": m.get("quantization_config"),
            "command": m.get("command"),
            "accuracy_bn": _bn_accuracy(runs_dir / run.name),
        }
    fp = next((r["accuracy"] for r in runs.values() if r["estimator"] == "fp"), None)
    groups: dict[tuple, list[dict]] = {}
    for r in runs.values():
        if r["estimator"] != "fp":
            groups.setdefault((r["estimator"], r["bits"], r["variant"]), []).append(r)
    summary = []
    for (est, b, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2] != "main", kv[0][0])):
        row = {"estimator": est, "bits": b, "variant": variant, "seeds": len(rs)}
        for suffix, key in (("", "accuracy"), ("_bn", "accuracy_bn")):  # _bn: after BatchNorm re-estimation
            accs = [r[key] for r in rs]
            whole = None not in accs  # a mean over fewer seeds than the row's would not compare
            mean = statistics.fmean(accs) if whole else None
            row |= {f"mean{suffix}": mean, f"spread{suffix}": (max(accs) - min(accs)) / 2 if whole else None,
                    f"delta{suffix}_vs_fp": None if fp is None or mean is None else mean - fp}
        summary.append(row)
    diverged = _diverged_steps(plan, runs_dir, runs)
    return {"benchmark": "accuracy", "model": "cifar_resnet20", "fp_accuracy": fp, "runs": runs,
            "summary": summary, "planned": [r.name for r in plan], "diverged_at_step": diverged,
            "missing": [r.name for r in plan if r.name not in runs and r.name not in diverged]}


def accuracy_table(result: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731

    def cells(row, suffix=""):
        spread = f" +- {100 * row[f'spread{suffix}']:.2f}" if row["seeds"] > 1 and row[f"spread{suffix}"] is not None else ""
        delta = row[f"delta{suffix}_vs_fp"]
        return f"{pct(row[f'mean{suffix}'])}{spread} | {'-' if delta is None else f'{100 * delta:+.2f}'}"

    def epochs(fp: bool):  # the budget as the runs' metrics.json recorded it
        found = sorted({r["epochs"] for r in result["runs"].values() if (r["estimator"] == "fp") == fp and r.get("epochs")})
        return f" ({'/'.join(map(str, found))} epochs)" if found else ""

    lines = [f"CIFAR-10 ResNet-20 top-1 (%) on the 10k test images, QAT{epochs(False)} from one FP model with LSQ "
             "forward quantizers; mean +- half-range over seeds. \"BN re-estimated\": the same final weights with "
             f"their BatchNorm statistics re-estimated on {BN_REESTIMATION_BATCHES} augmented training batches "
             f"(`pege eval --reestimate-bn {BN_REESTIMATION_BATCHES}`; \"-\" where not done yet).", "",
             f"Full precision{epochs(True)}: {pct(result['fp_accuracy'])}", "",
             "| bits | estimator | variant | seeds | top-1 | delta vs FP | top-1, BN re-estimated | delta vs FP |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        lines.append(f"| W{row['bits']}A{row['bits']} | {row['estimator']} | {row['variant']} | {row['seeds']} | "
                     f"{cells(row)} | {cells(row, '_bn')} |")
    checks = target_checks(result)
    if checks:
        lines += ["", "The issue's targets, on the top-1 column (mean over seeds):", "", "| target | measured | met |",
                  "|---|---|---|"]
        lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    return "\n".join(lines + _unfinished_lines(result)) + "\n"


FP_TARGET = 0.89  # the targets: FP top-1, PEGE's mean minus FP per width, PEGE minus STE at the lowest
PEGE_VS_FP_TARGETS = {4: 0.0, 3: -0.005, 2: -0.015}
PEGE_VS_STE_TARGET = 0.01


def target_checks(result: dict) -> list[dict]:
    """Each target of the benchmark's issue that the finished runs can answer: {target, measured, met}.
    PEGE vs STE compares the means over seeds at the lowest width and also lists the per-seed differences
    (the seeds both have)."""
    fp, checks = result["fp_accuracy"], []
    if fp is None:
        return checks
    main = {(r["estimator"], r["bits"]): r for r in result["summary"] if r["variant"] == "main" and r["mean"] is not None}
    checks.append({"target": f"FP >= {100 * FP_TARGET:.2f}", "measured": f"{100 * fp:.2f}", "met": fp >= FP_TARGET})
    for b, margin in sorted(PEGE_VS_FP_TARGETS.items(), reverse=True):
        if ("pege", b) in main:
            delta = main["pege", b]["mean"] - fp
            checks.append({"target": f"PEGE W{b}A{b} >= FP" + (f" {100 * margin:+.2f}" if margin else ""),
                           "measured": f"{100 * main['pege', b]['mean']:.2f} (FP {100 * delta:+.2f})",
                           "met": delta >= margin - 1e-12})
    low = min((b for _, b in main), default=None)
    if ("pege", low) in main and ("ste", low) in main:
        pege, ste = main["pege", low]["mean"], main["ste", low]["mean"]
        def by_seed(estimator):
            return {r["seed"]: r["accuracy"] for r in result["runs"].values()
                    if (r["estimator"], r["bits"], r["variant"]) == (estimator, low, "main")}

        pege_runs, ste_runs = by_seed("pege"), by_seed("ste")
        paired = [f"s{seed} {100 * (pege_runs[seed] - ste_runs[seed]):+.2f}"
                  for seed in sorted(pege_runs.keys() & ste_runs.keys())]
        checks.append({"target": f"PEGE W{low}A{low} >= STE + {100 * PEGE_VS_STE_TARGET:.2f}",
                       "measured": f"PEGE {100 * pege:.2f}, STE {100 * ste:.2f}: {100 * (pege - ste):+.2f} "
                                   f"(per seed: {', '.join(paired)})",
                       "met": pege - ste >= PEGE_VS_STE_TARGET - 1e-12})
    return checks


BN_REESTIMATION_BATCHES = 200
BN_FILE = "bn_reestimated.json"  # in a run's folder: its test accuracy after BatchNorm re-estimation


def _bn_accuracy(run_dir: Path) -> float | None:
    path = run_dir / BN_FILE
    return json.loads(path.read_text())["accuracy"] if path.is_file() else None


def reestimate_finished_runs(plan: list[Run], runs_dir: Path, batches: int = BN_REESTIMATION_BATCHES) -> list[str]:
    """Evaluate every finished run of the plan once more with its BatchNorm statistics re-estimated
    (`pege eval RUN --reestimate-bn batches`, seed 0) and write the result beside it (BN_FILE); runs
    that already have one are skipped, the run's own files are never changed. Returns the names done."""
    from pege_hf.evaluate import evaluate_checkpoint

    done = []
    for run in plan:
        run_dir = runs_dir / run.name
        if not run_is_finished(run_dir) or (run_dir / BN_FILE).is_file():
            continue
        data = run.training["dataset"]
        print(f"BatchNorm re-estimation: {run.name}", flush=True)
        result = evaluate_checkpoint(str(run_dir), data, reestimate_bn=batches)
        result["accuracy_before"] = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
        result["command"] = f"pege eval {shown_path(run_dir)} --dataset {data} --reestimate-bn {batches} --json"
        tmp = run_dir / f".{BN_FILE}.tmp"
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(run_dir / BN_FILE)
        done.append(run.name)
    return done


def _unfinished_lines(result: dict) -> list[str]:
    """The report's footer: runs that diverged (loss NaN), runs not finished yet."""
    lines = []
    if result["diverged_at_step"]:
        lines += ["", f"Diverged ({len(result['diverged_at_step'])}): "
                      + ", ".join(f"{name} (loss NaN at step {step})" for name, step in result["diverged_at_step"].items())]
    if result["missing"]:
        lines += ["", f"Not finished yet ({len(result['missing'])}): {', '.join(result['missing'])}"]
    return lines


ESTIMATOR_COLORS = {"ste": "C0", "ewgs": "C1", "pege": "C2"}
VARIANT_STYLES = (":", "-.", (0, (5, 2)), (0, (1, 3)))  # ablations, in name order; main runs are solid


def accuracy_plots(result: dict, out_dir: Path) -> None:
    plt = pyplot()
    for name, fig in (("accuracy_vs_bits", accuracy_vs_bits_figure(plt, result)),
                      ("accuracy_over_training", accuracy_over_training_figure(plt, result))):
        if fig is not None:
            fig.savefig(out_dir / f"{name}.png", dpi=120)
            plt.close(fig)


def _variant_styles(result: dict) -> dict:
    """Line style per variant, the same in every figure: main runs solid, each ablation its own broken style."""
    ablations = sorted({r["variant"] for r in result["runs"].values()} - {"main"})
    return {"main": "-", **{v: VARIANT_STYLES[i % len(VARIANT_STYLES)] for i, v in enumerate(ablations)}}


def _curve_label(estimator: str, variant: str) -> str:
    return estimator.upper() + ("" if variant == "main" else f" ({variant})")


def accuracy_vs_bits_figure(plt, result: dict):
    """Mean top-1 (error bar: half-range over seeds) per bit width of each estimator, plus each ablation run
    at two or more widths in its estimator's colour (an ablation at one width is a table row, not a curve)."""
    series: dict[tuple, list[dict]] = {}
    for row in result["summary"]:
        series.setdefault((row["estimator"], row["variant"]), []).append(row)
    style = _variant_styles(result)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (est, variant), rows in sorted(series.items(), key=lambda kv: (kv[0][1] != "main", kv[0])):
        if variant != "main" and len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: r["bits"])
        ax.errorbar([r["bits"] for r in rows], [100 * r["mean"] for r in rows], yerr=[100 * r["spread"] for r in rows],
                    marker="o", capsize=3, label=_curve_label(est, variant), color=ESTIMATOR_COLORS.get(est),
                    ls=style.get(variant, "-"))
    if result["fp_accuracy"] is not None:
        ax.axhline(100 * result["fp_accuracy"], color="k", ls="--", lw=1, label="FP")
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("top-1 (%)")
    ax.set_xticks([2, 3, 4])
    ax.set_title("CIFAR-10 ResNet-20")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_over_training_figure(plt, result: dict):
    """One panel per bit width: test accuracy per epoch of each seed-0 QAT run (each ablation its own broken
    line style), FP's final accuracy dashed, one legend under the panels. The y range starts 10 points under FP,
    so the first epochs of a low-bit run may start below it."""
    qat = {name: r for name, r in result["runs"].items() if r["estimator"] != "fp" and r["seed"] == 0 and r["epoch_accuracy"]}
    bits = sorted({r["bits"] for r in qat.values()})
    if not bits:
        return None
    style = _variant_styles(result)
    fig, axes = plt.subplots(1, len(bits), figsize=(3.2 * len(bits), 3.6), sharey=True, squeeze=False)
    fp = result["fp_accuracy"]
    for ax, b in zip(axes[0], bits):
        for name, r in sorted(qat.items()):
            if r["bits"] != b:
                continue
            ax.plot(range(1, len(r["epoch_accuracy"]) + 1), [100 * a for a in r["epoch_accuracy"]],
                    color=ESTIMATOR_COLORS.get(r["estimator"]), ls=style[r["variant"]], lw=1.3,
                    label=_curve_label(r["estimator"], r["variant"]))
        if fp is not None:
            ax.axhline(100 * fp, color="k", ls="--", lw=1, label="FP (final)")
            ax.set_ylim(100 * fp - 10, 100 * fp + 1)
        ax.set_title(f"W{b}A{b}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("test top-1 (%)")
    labelled = {line.get_label(): line for ax in axes[0] for line in ax.get_lines()}  # one entry per label
    fig.legend(list(labelled.values()), list(labelled), loc="lower center", ncol=min(len(labelled), 4), fontsize=7)
    fig.suptitle("CIFAR-10 ResNet-20 QAT, seed 0: accuracy over training", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.045 * ((len(labelled) - 1) // 4), 1, 1))
    return fig


def write_accuracy_report(plan: list[Run], runs_dir: Path, out_dir: Path) -> dict:
    result = collect_accuracy(plan, runs_dir)
    write_result(result, accuracy_table(result), out_dir, "accuracy")
    if result["runs"]:
        accuracy_plots(result, out_dir)
    return result


def run_accuracy(plan: list[Run], runs_dir: Path, out_dir: Path, max_runs: int | None = None,
                 jobs: int = 1, bn_batches: int = BN_REESTIMATION_BATCHES) -> dict:
    """Run the unfinished part of the matrix (see run_plan); after every run, re-estimate the BatchNorm
    statistics of the runs finished so far (reestimate_finished_runs; 0 batches: not) and rewrite the report."""
    def report():
        if bn_batches:
            reestimate_finished_runs(plan, runs_dir, bn_batches)
        return write_accuracy_report(plan, runs_dir, out_dir)

    run_plan(plan, runs_dir, jobs=jobs, max_runs=max_runs, on_finish=report)
    return report()


def _tuning_setting(variant: str) -> str:
    """The options a tuning run adds to the defaults, from its variant tag ("default-mse", "lambda1", ...)."""
    name, recipe = _tuning_parts(variant)
    own = {"config": _variant_config(name)} if name != "ste" else {}
    return " ".join(recipes.recipe_argv(merge(TUNING_RECIPES.get(recipe, {}), own))) or "-"


def _variant_config(name: str, variants: dict | None = None) -> dict:
    """The PEGEConfig fields of a PEGE setting, or of a combination of settings ("lambda0.1+alpha3")."""
    variants = TUNING_VARIANTS if variants is None else variants
    return {k: v for part in name.split("+") for k, v in variants.get(part, {}).items()}


def _tuning_parts(variant: str) -> tuple[str, str]:
    """(setting name, recipe name) of a tuning run's variant tag ("<setting>" or "<setting>-<recipe>")."""
    recipe = max((r for r in TUNING_RECIPES if r and variant.endswith(f"-{r}")), key=len, default="")
    return variant.removesuffix(f"-{recipe}") if recipe else variant, recipe


def collect_tuning(plan: list[Run], runs_dir: Path) -> dict:
    """Every finished tuning run: the setting tried, validation accuracy per epoch and at the end."""
    runs = {}
    for run in plan:
        path = runs_dir / run.name / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            runs[run.name] = {"estimator": run.estimator, "variant": run.variant, "recipe": _tuning_parts(run.variant)[1],
                              "setting": _tuning_setting(run.variant),
                              "accuracy": m["accuracy"], "epoch_accuracy": [h["accuracy"] for h in m.get("history", [])],
                              "wall_time_s": m.get("wall_time_s"), "quantization_config": m.get("quantization_config"),
                              "command": m.get("command")}
    ste = {r["recipe"]: r["accuracy"] for r in runs.values() if r["estimator"] == "ste"}
    diverged = _diverged_steps(plan, runs_dir, runs)
    return {"benchmark": "tuning", "split": "validation: 10% of the training file (seed 0), never the test set",
            "ste_accuracy_by_recipe": ste, "runs": runs, "diverged_at_step": diverged,
            "settings": {r.name: _tuning_setting(r.variant) for r in plan},
            "missing": [r.name for r in plan if r.name not in runs and r.name not in diverged]}


def tuning_table(result: dict) -> str:
    lines = ["PEGE tuning on a validation split carved from the training set (10%, seed 0); one setting changed at "
             "a time from PEGEConfig's defaults; STE with the same budget and recipe as the reference.", "",
             "| run | setting | validation top-1 (%) | delta vs STE (same recipe) |", "|---|---|---|---|"]
    for name, r in sorted(result["runs"].items(), key=lambda kv: -kv[1]["accuracy"]):
        ste = result["ste_accuracy_by_recipe"].get(r["recipe"])
        delta = "-" if ste is None or r["estimator"] == "ste" else f"{100 * (r['accuracy'] - ste):+.2f}"
        lines.append(f"| {name} | {r['setting']} | {100 * r['accuracy']:.2f} | {delta} |")
    for name, step in result["diverged_at_step"].items():
        lines.append(f"| {name} | {result['settings'][name]} | diverged (loss NaN at step {step}) | - |")
    return "\n".join(lines + _unfinished_lines(result)) + "\n"


def tuning_plot(result: dict, path: Path) -> None:
    """Validation accuracy of every finished tuning run, best first, STE and PEGE told apart."""
    plt = pyplot()
    rows = sorted(result["runs"].items(), key=lambda kv: kv[1]["accuracy"])
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.25 * len(rows)))
    for i, (name, r) in enumerate(rows):
        ax.plot(100 * r["accuracy"], i, "o", color="C0" if r["estimator"] == "pege" else "C3")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=7)
    ax.plot([], [], "o", color="C0", label="PEGE")
    ax.plot([], [], "o", color="C3", label="STE")
    ax.set_xlabel("validation top-1 (%)")
    ax.set_title("W2A2 tuning (3 epochs, validation split)")
    ax.grid(axis="x", lw=0.5)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tuning_report(plan: list[Run], runs_dir: Path, out_dir: Path) -> dict:
    result = collect_tuning(plan, runs_dir)
    write_result(result, tuning_table(result), out_dir, "tuning")
    if result["runs"]:
        tuning_plot(result, out_dir / "tuning.png")
    return result


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (as a user in the repo types it)."""
    path = Path(path).resolve()
    return path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else str(path)
