"""Benchmarks: training-step speed and memory (FP vs STE vs PEGE), checkpoint size, accuracy matrix.

Every benchmark writes JSON + a markdown table under its output folder; numbers are quoted from
those files, never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PEGEConfig
from .quant.modules import quantize, set_progress
from .training import recipes
from .training.args import ALIASES
from .training.state import DIVERGED_FILE, complete_checkpoints, output_dir_is_locked

# the tuned recipes (pege_hf.training.recipes) as `pege train` options, as run plans pass them
QAT_RECIPE: tuple[str, ...] = recipes.recipe_argv(recipes.QAT)
PEGE_TUNED: tuple[str, ...] = recipes.recipe_argv(recipes.PEGE)

DEFAULT_OUT = Path("benchmarks")


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------
def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(_logits(model(batch[0])), batch[1])
    return sum(seen.values())


def _speed_variants(bits: int, progress: float):
    """name -> (config or None, progress)."""
    return {
        "fp": (None, None),
        "ste": (PEGEConfig(w_bits=bits, a_bits=bits, estimator="ste"), None),
        "pege": (PEGEConfig(w_bits=bits, a_bits=bits, estimator="pege"), progress),
        "pege_r1": (PEGEConfig(w_bits=bits, a_bits=bits, estimator="pege"), 1.0),
    }


def bench_speed(model_fn, *, batch_size=128, bits=2, steps=20, warmup=3, progress=0.3, device=None,
                compile=False, channels_last=False, seed=0) -> dict:
    """Median time of one training step (forward + backward + SGD step) per variant, interleaved:
    every round runs one step of each variant, so machine noise hits them alike. `channels_last`: the
    models' 4-D weights in channels-last memory format (`pege train --channels-last`)."""
    from tqdm.auto import tqdm

    from .quant.kernels import use_compiled_kernels

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_compiled_kernels(compile)
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    runs = {}
    for name, (cfg, p) in _speed_variants(bits, progress).items():
        torch.manual_seed(seed)
        model = model_fn().to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg is not None:
            quantize(model, cfg)
            model(x[:8])  # initialise activation scales from data
            if p is not None:
                set_progress(model, p)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = dict(model=model, opt=opt, times=[], memory=saved_activation_bytes(model, (x, y)))

    def step(run):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = F.cross_entropy(_logits(run["model"](x)), y)
        run["opt"].zero_grad(set_to_none=True)
        loss.backward()
        run["opt"].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in tqdm(range(warmup + steps), desc="speed (interleaved steps)"):
        for run in runs.values():
            t = step(run)
            if i >= warmup:
                run["times"].append(t)
    fp = statistics.median(runs["fp"]["times"])
    ste = statistics.median(runs["ste"]["times"])
    result = {
        "benchmark": "speed",
        "model": "cifar_resnet20",
        "batch_size": batch_size,
        "bits": bits,
        "pege_progress": progress,
        "steps": steps,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "compile": compile,
        "channels_last": channels_last,
        "variants": {},
    }
    for name, run in runs.items():
        med = statistics.median(run["times"])
        result["variants"][name] = {
            "median_step_s": med,
            "step_times_s": run["times"],
            "ratio_vs_fp": med / fp,
            "ratio_vs_ste": med / ste,
            "saved_activation_mb": run["memory"] / 2**20,
            "memory_ratio_vs_fp": run["memory"] / runs["fp"]["memory"],
        }
    return result


def speed_table(result: dict) -> str:
    lines = [f"Training step, CIFAR ResNet-20, batch {result['batch_size']}, W{result['bits']}A{result['bits']}, "
             f"{result['device']} ({result['threads']} threads), median of {result['steps']} interleaved steps, "
             f"quantizer kernels {'torch.compile' if result['compile'] else 'eager'}"
             f"{', channels-last weights' if result.get('channels_last') else ''}; "
             f"`pege` runs mid-ramp (progress {result['pege_progress']}), `pege_r1` at r = 1.",
             "",
             "| variant | median step (s) | vs FP | vs STE | saved activations (MB) | memory vs FP |",
             "|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['median_step_s']:.4f} | {v['ratio_vs_fp']:.2f}x | {v['ratio_vs_ste']:.2f}x | "
                     f"{v['saved_activation_mb']:.1f} | {v['memory_ratio_vs_fp']:.2f}x |")
    return "\n".join(lines) + "\n"


def write_result(result: dict, table: str, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    print(table)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")


# ---------------------------------------------------------------------------------------------
# step-size initialisation
# ---------------------------------------------------------------------------------------------
def bench_init(shape=(4096, 4096), bits=2, repeats=3, seed=0) -> dict:
    """Time of one weight's per-channel step-size initialisation per rule (interleaved rounds, median),
    with the quantization MSE each rule reaches: LSQ's closed form, the MSE search `scale_init="mse"`
    uses, and the 80-point grid that search replaced."""
    from tqdm.auto import tqdm

    from .quant.quantizers import MAX_BITS, MIN_BITS, init_scale_lsq, init_scale_mse, qrange, quantization_mse

    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"--bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    if min(shape) < 1:
        raise ValueError(f"--shape must be two positive sizes, got {' '.join(map(str, shape))}")
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    qmin, qmax = qrange(bits, True)
    rules = {"lsq": lambda: init_scale_lsq(w, qmax, 0),
             "mse": lambda: init_scale_mse(w, qmin, qmax, 0),
             "mse-grid80": lambda: init_scale_mse(w, qmin, qmax, 0, coarse=80, fine=0)}
    times, scales = {name: [] for name in rules}, {}
    for _ in tqdm(range(repeats), desc="init (interleaved rounds)"):
        for name, rule in rules.items():
            start = time.perf_counter()
            scales[name] = rule()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"benchmark": "init", "shape": list(shape), "bits": bits, "repeats": repeats, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "rules": {name: {"median_s": med[name], "times_s": times[name], "ratio_vs_lsq": med[name] / med["lsq"],
                             "ratio_vs_mse": med[name] / med["mse"],
                             "quantization_mse": quantization_mse(w, scales[name], qmin, qmax, 0).mean().item()}
                      for name in rules}}


def init_table(result: dict) -> str:
    shape = "x".join(map(str, result["shape"]))
    lines = [f"Per-channel step-size init of one {shape} N(0, 1) weight at W{result['bits']}, cpu "
             f"({result['threads']} threads), median of {result['repeats']} interleaved rounds:", "",
             "| rule | median s | x LSQ | x mse | quantization MSE |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {r['median_s']:.3f} | {r['ratio_vs_lsq']:.1f} | {r['ratio_vs_mse']:.2f} | "
              f"{r['quantization_mse']:.6f} |" for name, r in result["rules"].items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------------
def bench_size(model_fn, bits_list=(2, 3, 4, 8), work_dir: Path | None = None) -> dict:
    """Bytes of model.safetensors: the float checkpoint vs the packed PEGE checkpoint per bit width
    (weights and activations at the same width; stem, head and norms stay float)."""
    import tempfile

    from .hf.quantizer import quantize as quantize_pretrained

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model_fn().save_pretrained(tmp / "fp")
        float_bytes = (tmp / "fp" / "model.safetensors").stat().st_size
        rows = {}
        for bits in bits_list:
            model = quantize_pretrained(model_fn(), PEGEConfig(w_bits=bits, a_bits=bits))
            model(torch.randn(4, 3, 32, 32))  # activation step sizes from a first batch
            model.save_pretrained(tmp / f"w{bits}")
            nbytes = (tmp / f"w{bits}" / "model.safetensors").stat().st_size
            rows[f"W{bits}A{bits}"] = {"bits": bits, "bytes": nbytes, "ratio_vs_float": nbytes / float_bytes}
    return {"benchmark": "size", "model": "cifar_resnet20", "float_bytes": float_bytes, "packed": rows}


def size_table(result: dict) -> str:
    lines = [f"Checkpoint size (model.safetensors), CIFAR ResNet-20; float: {result['float_bytes']:,} bytes.", "",
             "| bits | bytes | vs float |", "|---|---|---|"]
    for name, row in result["packed"].items():
        lines.append(f"| {name} | {row['bytes']:,} | {row['ratio_vs_float']:.3f} (1/{1 / row['ratio_vs_float']:.1f}) |")
    return "\n".join(lines) + "\n"


def _pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def size_plot(result: dict, path: Path) -> None:
    plt = _pyplot()

    names = ["float"] + list(result["packed"])
    kb = [result["float_bytes"] / 1024] + [r["bytes"] / 1024 for r in result["packed"].values()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(names, kb, color=["#888"] + ["#2a7"] * len(result["packed"]))
    ax.set_ylabel("checkpoint size (KiB)")
    ax.set_title("CIFAR ResNet-20 checkpoint size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def speed_plot(result: dict, path: Path) -> None:
    """Step time and saved-activation memory of each variant relative to FP, beside the 1.3x target."""
    plt = _pyplot()

    names = list(result["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in zip(axes, ("ratio_vs_fp", "memory_ratio_vs_fp"), ("step time vs FP", "saved activations vs FP")):
        values = [result["variants"][n][key] for n in names]
        ax.bar(names, values, color=["#888"] + ["#2a7"] * (len(names) - 1))
        ax.axhline(1.3, color="#c33", linestyle="--", linewidth=1, label="1.3x target")
        ax.set_ylim(0, 1.3 * max(values + [1.3]))  # room for the legend above the bars
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
    kernels = "torch.compile" if result["compile"] else "eager"
    layout = ", channels-last weights" if result.get("channels_last") else ""
    fig.suptitle(f"CIFAR ResNet-20 training step, W{result['bits']}A{result['bits']}, batch "
                 f"{result['batch_size']}, {result['device']}, {kernels} kernels{layout}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# accuracy: the resumable matrix FP / STE / EWGS / PEGE x W2A2 / W3A3 / W4A4
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One training run of the matrix: its folder name and its `pege_hf.train` arguments."""

    name: str
    args: tuple[str, ...]
    estimator: str
    bits: int | None
    seed: int
    variant: str = "main"  # "main" or an ablation tag
    depends: str | None = None  # a run whose output folder is this run's --model


def accuracy_plan(*, data: str, fp_epochs: int = 60, qat_epochs: int = 15, bits=(2, 3, 4),
                  estimators=("ste", "ewgs", "pege"), seeds_low_bits: int = 3, seeds: int = 2,
                  ablations: bool = True, runs_dir: Path = DEFAULT_OUT / "runs", extra=(),
                  qat_args=None, pege_args=None) -> list[Run]:
    """The protocol: one FP ResNet-20, then QAT from it for every estimator and bit width with the same
    optimiser, schedule, epochs, augmentation and seeds (more seeds at the lowest width), plus the
    W2A2 ablations PEGE without the discretization term and PEGE with the linear curriculum, and PEGE
    without the progressive replacement at every width (instant: r = 1 from the start, as many seeds as
    the main rows).
    `extra` reaches every run, `qat_args` (default QAT_RECIPE) every QAT run, `pege_args` (default
    PEGE_TUNED: PEGE's own settings from tuning) only the PEGE runs, never STE/EWGS.

    Ordered by what the report needs first: FP, then the lowest width for every estimator, PEGE at
    the other widths (the shipped models), the other seeds at the lowest width (STE and PEGE, the
    pair the target compares, before EWGS), the remaining baselines and seeds (again STE and PEGE
    first), the ablations."""
    qat_args = QAT_RECIPE if qat_args is None else tuple(qat_args)
    pege_args = PEGE_TUNED if pege_args is None else tuple(pege_args)
    fp = Run("resnet20-fp", ("--estimator", "none", "--arch", "resnet20", "--dataset", data,
                             "--epochs", str(fp_epochs), "--lr", "0.1", *extra), "fp", None, 0)
    model = str(runs_dir / fp.name)

    def qat(estimator, b, seed, variant="main", more=()):
        name = f"resnet20-w{b}a{b}-{estimator}" + ("" if variant == "main" else f"-{variant}") + f"-s{seed}"
        own = pege_args if estimator == "pege" else ()
        args = ("--model", model, "--dataset", data, "--estimator", estimator, "--w-bits", str(b), "--a-bits", str(b),
                "--epochs", str(qat_epochs), "--lr", "0.01", "--seed", str(seed), *extra, *qat_args, *own, *more)
        return Run(name, args, estimator, b, seed, variant, depends=fp.name)

    low = min(bits)
    runs = [qat(e, b, seed) for seed in range(max(seeds, seeds_low_bits)) for b in bits for e in estimators
            if seed < (seeds_low_bits if b == low else seeds)]
    if ablations and "pege" in estimators:
        runs += [qat("pege", low, 0, "lambda0", ("--lambda", "0")),
                 qat("pege", low, 0, "linear", ("--curriculum", "linear"))]
        # the tuning setting that was best over 15 epochs on validation (benchmarks/tune15): STE + the pull,
        # at every width with the main rows' seeds
        runs += [qat("pege", b, seed, "instant", TUNING_VARIANTS["instant"]) for b in bits
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
                recipes: dict | None = None, recipe: str = "", combine=(), extra=()) -> list[Run]:
    """Short W{bits}A{bits} QAT runs from the FP model on a validation split carved from the
    training set (`data` is the training file; 10% of it, seed 0, becomes the evaluation split).
    First the shared QAT recipe (step-size init, quantizer learning rate: applied to every
    estimator alike) for STE and PEGE with its defaults, then PEGE with one of its own settings
    changed at a time under the recipe named `recipe` (a key of `recipes`); last, each combination in
    `combine` (setting names joined by "+", e.g. "lambda0.1+alpha3") of settings that helped alone."""
    variants = TUNING_VARIANTS if variants is None else variants
    recipes = TUNING_RECIPES if recipes is None else recipes
    if recipe not in recipes:
        raise ValueError(f"unknown tuning recipe {recipe!r}: expected one of {sorted(recipes)}")
    for combo in combine:
        unknown = [part for part in combo.split("+") if part not in variants or part == "default"]
        if unknown or "+" not in combo:
            raise ValueError(f"--combine {combo!r}: expected two or more of {sorted(set(variants) - {'default'})} "
                             "joined by '+'")
    variants = {**variants, **{combo: _variant_flags(combo, variants) for combo in combine}}
    base = ("--model", model, "--dataset", data, "--w-bits", str(bits), "--a-bits", str(bits), "--epochs", str(epochs),
            "--lr", "0.01", "--seed", "0", *extra)
    plan = []
    for name, recipe_args in recipes.items():
        tail = f"-{name}" if name else ""
        plan += [Run(f"w{bits}a{bits}-ste{tail}", (*base, *recipe_args, "--estimator", "ste"), "ste", bits, 0,
                     f"ste{tail}"),
                 Run(f"w{bits}a{bits}-pege-default{tail}", (*base, *recipe_args, "--estimator", "pege"), "pege", bits, 0,
                     f"default{tail}")]
    tail = f"-{recipe}" if recipe else ""
    plan += [Run(f"w{bits}a{bits}-pege-{tag}{tail}", (*base, *recipes[recipe], "--estimator", "pege", *args), "pege",
                 bits, 0, f"{tag}{tail}")
             for tag, args in variants.items() if tag != "default"]
    return plan


# the shared QAT recipe: tried for STE and PEGE alike ("" = the train CLI's defaults)
TUNING_RECIPES = {
    "": (),
    "mse": ("--scale-init", "mse"),
    "qlr1": ("--quantizer-lr-scale", "1"),
    "mse-qlr1": ("--scale-init", "mse", "--quantizer-lr-scale", "1"),
}

# PEGE's own settings, one change at a time from PEGEConfig's defaults (under the recipe `pege bench tune --recipe`)
TUNING_VARIANTS = {
    "default": (),
    "sum": ("--discretization-reduction", "sum"),
    "lambda0.1": ("--lambda", "0.1"),
    "lambda1": ("--lambda", "1"),
    "lambda10": ("--lambda", "10"),
    "alpha3": ("--alpha", "3"),
    "alpha30": ("--alpha", "30"),
    "ramp0.5": ("--ramp-fraction", "0.5"),
    "ramp0.25": ("--ramp-fraction", "0.25"),
    "instant": ("--curriculum", "instant"),  # r = 1 from the start: STE plus the discretization pull
    "pull-ramp": ("--lambda-schedule", "ramp"),  # the pull only while r < 1
    "mask-error": ("--mask", "error"),
    "amask-progressive": ("--a-mask", "progressive"),
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


# flags the runner adds, or that change speed but not results: not part of a run's settings
RUNNER_FLAGS = (*(a for a in runner_args(Path(), 0) if a.startswith("--")), "--compile-kernels", "--channels-last")


# short spellings of `pege train` options -> their field names (--lambda -> --discretization-lambda)
OPTION_SPELLINGS = {alias: f"--{name.replace('_', '-')}" for name, aliases in ALIASES.items() for alias in aliases}


def run_settings(args) -> dict[str, tuple[str, ...]]:
    """{flag: its values} of a `pege_hf.train` argument list, without RUNNER_FLAGS."""
    settings: dict[str, tuple[str, ...]] = {}
    flag = None
    for token in args:
        if token.startswith("--"):
            flag = OPTION_SPELLINGS.get(token.split("=", 1)[0], token.split("=", 1)[0])
            settings[flag] = tuple(token.split("=", 1)[1:])
        elif flag is not None:
            settings[flag] += (token,)
    return {k: v for k, v in settings.items() if k not in RUNNER_FLAGS}


def recorded_args(run_dir: Path) -> list[str] | None:
    """The `pege_hf.train` arguments a run folder was trained with: its metrics.json's command when
    finished, else the first command its train.log shows; None for a folder with neither."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file() and "command" in (m := json.loads(metrics.read_text())):
        return list(m["command"][1:])
    log = run_dir / "train.log"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("$ ") and " -m pege_hf.train" in line:
                return line.split(" -m pege_hf.train", 1)[1].split()
    return None


def check_run_settings(plan: list[Run], runs_dir: Path) -> None:
    """A run folder trained with other settings (say --epochs 3 where the plan says 15) would be
    reused or continued as if it were the plan's run: refuse, naming the folder and the difference."""
    for run in plan:
        recorded = recorded_args(runs_dir / run.name)
        if recorded is None:
            continue
        had, wants = run_settings(recorded), run_settings(run.args)
        if had != wants:
            diff = ", ".join(f"{k}: {' '.join(had.get(k, ('(unset)',)))} -> {' '.join(wants.get(k, ('(unset)',)))}"
                             for k in sorted(set(had) | set(wants)) if had.get(k) != wants.get(k))
            raise ValueError(f"{runs_dir / run.name} was trained with other settings than this plan asks for ({diff}); "
                             "pass another --out, or move that folder away")


def start_run(run: Run, runs_dir: Path, threads: int | None = None, checkpointing_steps: int = 100):
    """Train one run in a child process (or continue it: --resume), logging to its train.log."""
    run_dir = runs_dir / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pege_hf.train", *run.args, *runner_args(run_dir, checkpointing_steps)]
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
    from .training.evaluation import evaluate_checkpoint

    done = []
    for run in plan:
        run_dir = runs_dir / run.name
        if not run_is_finished(run_dir) or (run_dir / BN_FILE).is_file():
            continue
        data = run.args[run.args.index("--dataset") + 1]
        print(f"BatchNorm re-estimation: {run.name}", flush=True)
        result = evaluate_checkpoint(str(run_dir), data, reestimate_bn=batches)
        result["accuracy_before"] = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
        result["command"] = f"pege eval {_shown_path(run_dir)} --dataset {data} --reestimate-bn {batches} --json"
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
    plt = _pyplot()
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
    """The flags a tuning run adds to the defaults, from its variant tag ("default-mse", "lambda1", ...)."""
    name, recipe = _tuning_parts(variant)
    flags = TUNING_RECIPES.get(recipe, ()) + (_variant_flags(name) if name != "ste" else ())
    return " ".join(flags) or "-"


def _variant_flags(name: str, variants: dict | None = None) -> tuple[str, ...]:
    """The flags of a PEGE setting, or of a combination of settings ("lambda0.1+alpha3")."""
    variants = TUNING_VARIANTS if variants is None else variants
    return tuple(flag for part in name.split("+") for flag in variants.get(part, ()))


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
    plt = _pyplot()
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


# the package's default models (quickstart, demo) <- the accuracy benchmark's runs
SHIPPED_FROM_RUNS = {"resnet20-fp": "resnet20-fp", "resnet20-pege-w2a2": "resnet20-w2a2-pege-s0",
                     "resnet20-pege-w3a3": "resnet20-w3a3-pege-s0", "resnet20-pege-w4a4": "resnet20-w4a4-pege-s0"}
SHIPPED_FILES = ("config.json", "model.safetensors", "metrics.json")


def ship_models(runs_dir: Path, dest: Path) -> list[str]:
    """Copy the benchmark's FP and PEGE W2A2/W3A3/W4A4 models (final weights, config, metrics) into
    `dest` with a fresh model card each; runs that have not finished are left as they are in `dest`.
    Returns the names shipped."""
    import shutil

    from .hub import render_model_card

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
        render_model_card(staging, repo_id=_shown_path(target))  # the card names the final folder, not staging
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        shipped.append(name)
        print(f"shipped {src} -> {target}", flush=True)
    return shipped


def _shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (as a user in the repo types it)."""
    path = Path(path).resolve()
    return path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else str(path)


# ---------------------------------------------------------------------------------------------
# latency: the demo's four models on one image
# ---------------------------------------------------------------------------------------------
def bench_latency(n: int = 50) -> dict:
    """Server-side time of one demo request (FP + W4A4 + W3A3 + W2A2 on one 32x32 CIFAR-10 image)."""
    from . import inference

    sources = inference.resolve_sources()
    result = inference.measure_latency(inference.ModelSet.load(sources), n=n)
    return {"benchmark": "latency", "models": {k: str(v) for k, v in sources.items()}, **result}


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

    from .hf.loading import from_pretrained
    from .quant.grid import codes_changed, summarize, weight_codes_and_positions

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
    plt = _pyplot()
    by_bits: dict[int, list[dict]] = {}
    for r in results:
        by_bits.setdefault((r["quantization_config"] or {}).get("w_bits"), []).append(r)
    fig, axes = plt.subplots(1, len(by_bits), figsize=(3.2 * len(by_bits), 3), squeeze=False)
    from .quant.grid import GRID_BINS

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


def _resnet20():
    from .hf.cifar import cifar_resnet

    return cifar_resnet(20)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{speed,size,init,accuracy,tune,ship,latency,grid}")
    sp = sub.add_parser("speed", help="time per training step of FP, STE and PEGE (interleaved, one process)",
                        description="Median training-step time and saved-activation memory of a CIFAR ResNet-20 "
                                    "in full precision, with STE and with PEGE, interleaved in one process.")
    sp.add_argument("--batch-size", type=int, default=128, metavar="N", help="images per step (default 128)")
    sp.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    sp.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    sp.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per variant first (default 3)")
    sp.add_argument("--progress", type=float, default=0.3, help="PEGE training progress for the mid-ramp variant")
    sp.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    sp.add_argument("--compile", action="store_true",
                    help="run the quantizers' elementwise kernels through torch.compile (the FP model has none)")
    sp.add_argument("--channels-last", action="store_true",
                    help="every model's 4-D weights channels-last (`pege train --channels-last`)")
    sp.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    sz = sub.add_parser("size", help="packed checkpoint bytes vs the float safetensors, per bit width",
                        description="Save a CIFAR ResNet-20 as float and as packed PEGE checkpoints; compare bytes.")
    sz.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], metavar="B",
                    help="bit widths to save (default 2 3 4 8)")
    sz.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    it = sub.add_parser("init", help="time and error of the step-size init rules on one big weight",
                        description="Median time and quantization MSE of LSQ init, the MSE search and the 80-point "
                                    "grid it replaced, on one per-channel weight (interleaved rounds).")
    it.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("ROWS", "COLS"),
                    help="the weight's shape, one step size per row (default 4096 4096)")
    it.add_argument("--bits", type=int, default=2, help="weight bits (default 2)")
    it.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    it.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    la = sub.add_parser("latency", help="server-side time of one demo request (the four shipped models)",
                        description="Median time of the demo's predict call: FP, W4A4, W3A3, W2A2 on one image.")
    la.add_argument("--calls", type=int, default=50, metavar="N", help="timed requests; median and p90 reported (default 50)")
    la.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    ac = sub.add_parser(
        "accuracy", help="the resumable accuracy matrix: FP vs STE vs EWGS vs PEGE at W2A2/W3A3/W4A4",
        description="Train an FP CIFAR ResNet-20, then QAT from it with every estimator and bit width (same recipe "
                    "and seeds), one child process per run. Resumable: finished runs are never redone and a "
                    "cut-off run continues from its last checkpoint. Writes accuracy.json/.md and PNG plots.")
    ac.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 folder, parquet or Hub id")
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
                         f"{' '.join(QAT_RECIPE) or '(none)'})")
    ac.add_argument("--pege-arg", action="append", default=None, metavar="ARG",
                    help="PEGE's own settings, passed to the PEGE runs only (repeat; replaces the tuned default "
                         f"{' '.join(PEGE_TUNED) or '(none)'})")
    ac.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, sharing the CPU cores (default 1; 2 trains faster overall on 2 cores)")
    ac.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    sh = sub.add_parser("ship", help="copy the accuracy benchmark's FP and PEGE W2/W3/W4 models into the package",
                        description="Copy the finished FP and PEGE W2A2/W3A3/W4A4 (seed 0) runs of `pege bench "
                                    "accuracy` into pege_hf/assets/models (the quickstart's and the demo's default "
                                    "models), each with its model card.")
    sh.add_argument("--runs", type=Path, default=DEFAULT_OUT / "runs", help="the benchmark's runs folder")
    sh.add_argument("--dest", type=Path, default=None, help="default: pege_hf/assets/models")
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
    tu.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")
    gr = sub.add_parser(
        "grid", help="where the latent weights of finished QAT runs sit on their quantization grid",
        description="For each finished QAT run that still has its training checkpoints: the mean distance of the "
                    "latent weights to their grid points, the share clipped, and the share of weight codes that "
                    "changed between the two newest checkpoints (does training still move codes at the end?). "
                    "Writes grid.json/.md/.png.")
    gr.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                    help="run folders (default: every finished QAT run under benchmarks/runs with checkpoints)")
    gr.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/)")


def main(args: argparse.Namespace) -> int:
    if args.bench == "speed":
        result = bench_speed(_resnet20, batch_size=args.batch_size, bits=args.bits, steps=args.steps,
                             warmup=args.warmup, progress=args.progress, device=args.device, compile=args.compile,
                             channels_last=args.channels_last)
        stem = ("speed_compiled" if args.compile else "speed") + ("_channels_last" if args.channels_last else "")
        write_result(result, speed_table(result), args.out, stem)
        speed_plot(result, args.out / f"{stem}.png")
    elif args.bench == "size":
        result = bench_size(_resnet20, tuple(args.bits))
        write_result(result, size_table(result), args.out, "size")
        size_plot(result, args.out / "size.png")
    elif args.bench == "init":
        result = bench_init(tuple(args.shape), args.bits, args.repeats)
        write_result(result, init_table(result), args.out, "init")
    elif args.bench == "latency":
        result = bench_latency(args.calls)
        write_result(result, latency_table(result), args.out, "latency")
    elif args.bench == "accuracy":
        runs_dir = args.out / "runs"
        plan = accuracy_plan(data=args.data, fp_epochs=args.fp_epochs, qat_epochs=args.qat_epochs, bits=tuple(args.bits),
                             estimators=tuple(args.estimators), seeds=args.seeds, seeds_low_bits=args.seeds_low_bits,
                             ablations=not args.no_ablations, runs_dir=runs_dir, extra=tuple(args.train_arg),
                             qat_args=args.qat_arg, pege_args=args.pege_arg)
        if args.bn_batches < 0:
            raise ValueError(f"--bn-batches must be >= 0; got {args.bn_batches}")
        if args.report_only:
            write_accuracy_report(plan, runs_dir, args.out)
        else:
            run_accuracy(plan, runs_dir, args.out, args.max_runs, jobs=args.jobs, bn_batches=args.bn_batches)
    elif args.bench == "ship":
        from .inference import SHIPPED_MODELS_DIR

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
                           recipe=args.recipe, combine=tuple(args.combine), extra=tuple(args.train_arg))
        selected = select_runs(plan, args.only)
        if not args.report_only:
            if not run_is_finished(Path(args.model)):
                raise FileNotFoundError(f"no finished FP model at {args.model!r}: run `pege bench accuracy` first "
                                        "(its first run) or pass --model")
            run_plan(selected, runs_dir, jobs=args.jobs, max_runs=args.max_runs,
                     on_finish=lambda: write_tuning_report(selected, runs_dir, args.out))
        write_tuning_report(selected, runs_dir, args.out)
    return 0
