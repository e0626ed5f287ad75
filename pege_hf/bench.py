"""`pege bench`: micro-benchmarks of the library itself: training-step speed and memory (FP vs STE vs
PEGE), packed checkpoint size, step-size initialisation, and deployment on ONNX Runtime (`deploy`, the
code in pege_hf/deploy.py).

Each writes JSON + a markdown table (and a PNG plot when matplotlib, the `bench` extra, is installed)
under --out. The research benchmarks (the accuracy matrix, tuning, grid diagnostics, shipping models,
demo latency) live in the repository's benchmarks/ folder: ``python -m benchmarks.pege_bench --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import PEGEConfig
from .data import DEFAULT_DATASET
from .deploy import SHIPPED, bench_deploy, deploy_plot, deploy_table, onnxruntime_missing
from .hf.cifar import cifar_resnet
from .quant.modules import layers_to_skip, quantize, set_progress
from .sources import SHIPPED_MODELS_DIR, check_checkpoint_dir, is_hub_id

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


SPEED_MODELS = ("resnet20", "distilbert")
GROUP_SIZE = 32  # the LLM recipe's weight group (torchao's int4 QAT default)


def _speed_variants(bits: int, progress: float, **options):
    """name -> (config or None, progress); ``options``: further PEGEConfig fields of every quantized variant
    (the LLM recipe: group_size, a_bits, a_quantizer)."""
    options = {"w_bits": bits, "a_bits": bits, **options}
    return {
        "fp": (None, None),
        "ste": (PEGEConfig(**options, estimator="ste"), None),
        "pege": (PEGEConfig(**options, estimator="pege", a_mask="bernoulli"), progress),
        "pege_counter": (PEGEConfig(**options, estimator="pege", a_mask="counter"), progress),
        "pege_r1": (PEGEConfig(**options, estimator="pege"), 1.0),
    }


def image_task(batch_size: int, bits: int, progress: float, model_fn=None, device="cpu") -> dict:
    """The CNN speed benchmark: a CIFAR ResNet-20 at W{bits}A{bits} on a random image batch."""
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return dict(model="cifar_resnet20", label="CIFAR ResNet-20", scheme=f"W{bits}A{bits}", model_fn=model_fn or resnet20,
                batch=(x, y), variants=_speed_variants(bits, progress), peers={})


def distilbert(dim=256, layers=4, heads=4, hidden=1024, vocab=30522, seq_len=128, num_labels=2):
    """A randomly initialised DistilBERT sequence classifier built from its config (nothing downloaded)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, hidden_dim=hidden,
                              max_position_embeddings=max(512, seq_len), num_labels=num_labels)
    return DistilBertForSequenceClassification(config)


def token_task(batch_size: int, bits: int, progress: float, seq_len=128, device="cpu", dim=256, layers=4, heads=4,
               hidden=1024, vocab=30522) -> dict:
    """The transformer speed benchmark: a DistilBERT classifier on random token ids and labels, quantized with
    the LLM recipe (W{bits} group-32 weights, 8-bit per-token dynamic activations); torchao's QAT of the same
    scheme as the peer when torchao is importable."""
    x = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    variants = _speed_variants(bits, progress, group_size=GROUP_SIZE, a_bits=8, a_quantizer="dynamic_token")
    peer = torchao_prepare(bits, variants["ste"][0])
    return dict(model="distilbert", label=f"DistilBERT (dim {dim}, {layers} layers, {heads} heads, hidden {hidden}, "
                                          f"vocab {vocab})", scheme=f"W{bits} g{GROUP_SIZE}, A8 per-token dynamic",
                seq_len=seq_len, batch=(x, y), step_target=1.2,
                model_fn=lambda: distilbert(dim, layers, heads, hidden, vocab, seq_len),
                variants={**variants, **({"torchao": (peer, None)} if peer else {})},
                peers={"torchao": torchao_version()})


def torchao_version() -> str | None:
    """torchao's version when it is importable (an optional peer, never a dependency), else None."""
    try:
        import torchao
    except ImportError:
        return None
    return torchao.__version__


def torchao_prepare(bits: int, config: PEGEConfig):
    """torchao's QAT fake quantizers (int8 per-token dynamic activations, int{bits} group-32 symmetric weights) on
    the same Linears pege_hf quantizes with ``config``; None when torchao is not importable."""
    if torchao_version() is None:
        return None
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=GROUP_SIZE, is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)

    def prepare(model):
        skip = layers_to_skip(model, config)
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn not in skip)
        return model

    return prepare


def bench_speed(model_fn=None, *, threads=None, **options) -> dict:
    """Median time of one training step (forward + backward + SGD step) per variant, interleaved:
    every round runs one step of each variant, so machine noise hits them alike. ``task`` (from
    :func:`image_task` / :func:`token_task`) holds the model, batch and variants; default: the CIFAR
    ResNet-20 (``model_fn``) at W{bits}A{bits}. `channels_last`: the models' 4-D weights in channels-last
    memory format (`pege train --channels-last`). `threads`: torch's intra-op threads during the run
    (default: torch's own choice; restored afterwards)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _timed_steps(model_fn, **options)
    finally:
        torch.set_num_threads(before)


def _timed_steps(model_fn=None, *, task=None, batch_size=128, bits=2, steps=20, warmup=3, progress=0.3, device=None,
                 compile=False, channels_last=False, seed=0) -> dict:
    from tqdm.auto import tqdm

    from .quant.kernels import use_compiled_kernels

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_compiled_kernels(compile)
    torch.manual_seed(seed)
    task = task or image_task(batch_size, bits, progress, model_fn, device)
    x, y = task["batch"]
    runs = {name: _speed_run(task["model_fn"], cfg, p, x, y, device, channels_last, seed)
            for name, (cfg, p) in task["variants"].items()}

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
    settings = {"benchmark": "speed", "model": task["model"], "model_label": task["label"], "scheme": task["scheme"],
                "batch_size": len(x), **({"seq_len": task["seq_len"]} if "seq_len" in task else {}), "bits": bits,
                "pege_progress": progress, "steps": steps, "device": str(device), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.machine(), "compile": compile,
                "channels_last": channels_last, "peers": task["peers"], "step_target": task.get("step_target", 1.3)}
    return {**settings, "variants": _speed_summary(runs)}


def _speed_run(model_fn, cfg, progress, x, y, device, channels_last: bool, seed: int) -> dict:
    """One variant's model (quantized with ``cfg``, a PEGEConfig, or prepared by ``cfg``, a peer's hook, at
    ``progress``), optimiser and saved-activation bytes."""
    torch.manual_seed(seed)
    model = model_fn().to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if callable(cfg):
        model = cfg(model)
    elif cfg is not None:
        quantize(model, cfg)
        model(x[:8])  # initialise activation scales from data
        if progress is not None:
            set_progress(model, progress)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return dict(model=model, opt=opt, times=[], memory=saved_activation_bytes(model, (x, y)))


def _speed_summary(runs: dict) -> dict:
    """Median step time and memory of each variant, and their ratios to FP and STE."""
    fp, ste = statistics.median(runs["fp"]["times"]), statistics.median(runs["ste"]["times"])
    out = {}
    for name, run in runs.items():
        med = statistics.median(run["times"])
        out[name] = {"median_step_s": med, "step_times_s": run["times"], "ratio_vs_fp": med / fp,
                     "ratio_vs_ste": med / ste, "saved_activation_mb": run["memory"] / 2**20,
                     "memory_ratio_vs_fp": run["memory"] / runs["fp"]["memory"]}
    return out


def _speed_heading(result: dict) -> str:
    """What was timed (results written before the transformer model existed lack model_label and scheme)."""
    model = result.get("model_label", "CIFAR ResNet-20")
    scheme = result.get("scheme", f"W{result['bits']}A{result['bits']}")
    shape = f"batch {result['batch_size']}" + (f" x seq {result['seq_len']}" if "seq_len" in result else "")
    return f"{model}, {shape}, {scheme}"


def speed_table(result: dict) -> str:
    lines = [f"Training step, {_speed_heading(result)}, "
             f"{result['device']} ({result['threads']} threads), median of {result['steps']} interleaved steps, "
             f"quantizer kernels {'torch.compile' if result['compile'] else 'eager'}"
             f"{', channels-last weights' if result.get('channels_last') else ''}; "
             f"`pege` runs mid-ramp (progress {result['pege_progress']}) with Bernoulli activation masks "
             "(`--a-mask bernoulli`, what the default `auto` draws with eager kernels), "
             + ("`pege_counter` too, with counter activation masks (`--a-mask counter`, the default's choice under "
                "compiled kernels), " if "pege_counter" in
                result["variants"] else "") + "`pege_r1` at r = 1."]
    for peer, version in result.get("peers", {}).items():
        lines.append(f"Peer `{peer}` ({version}): its QAT fake quantizers on the same layers." if version else
                     f"Peer `{peer}` not importable in this run: its row is missing.")
    lines += ["",
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


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def size_plot(result: dict, path: Path) -> None:
    plt = pyplot()

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
    plt = pyplot()

    names = list(result["variants"])
    colors = ["#888" if n == "fp" else "#37c" if n in result.get("peers", {}) else "#2a7" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    targets = (result.get("step_target", 1.3), 1.3)
    for ax, key, label, target in zip(axes, ("ratio_vs_fp", "memory_ratio_vs_fp"),
                                      ("step time vs FP", "saved activations vs FP"), targets):
        values = [result["variants"][n][key] for n in names]
        ax.bar(names, values, color=colors)
        ax.axhline(target, color="#c33", linestyle="--", linewidth=1, label=f"{target}x target")
        ax.set_ylim(0, 1.3 * max(values + [target]))  # room for the legend above the bars
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.legend(loc="upper left", fontsize=8)
    kernels = "torch.compile" if result["compile"] else "eager"
    layout = ", channels-last weights" if result.get("channels_last") else ""
    title = f"training step, {_speed_heading(result)}, {result['device']}, {kernels} kernels{layout}"
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resnet20():

    return cifar_resnet(20)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "research benchmarks (accuracy matrix, tuning, grid, ship, latency): python -m benchmarks.pege_bench --help"
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{speed,size,init,deploy}")
    sp = sub.add_parser("speed", help="time per training step of FP, STE and PEGE (interleaved, one process)",
                        description="Median training-step time and saved-activation memory of a model in full "
                                    "precision, with STE and with PEGE, interleaved in one process: a CIFAR ResNet-20 "
                                    "at W{bits}A{bits}, or a DistilBERT classifier (built from its config, random "
                                    "tokens) with the LLM recipe, W{bits} group-32 weights and 8-bit per-token dynamic "
                                    "activations, beside torchao's QAT of the same scheme when torchao is importable.")
    sp.add_argument("--model", default="resnet20", choices=SPEED_MODELS,
                    help="resnet20 (default; writes speed.*) or distilbert (writes speed_distilbert.*)")
    sp.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="examples per step (default 128 images, 16 sequences)")
    sp.add_argument("--seq-len", type=int, default=None, metavar="N", help="distilbert: tokens per sequence (default 128)")
    sp.add_argument("--bits", type=int, default=None,
                    help="weight bits (resnet20: and activation bits; default 2); distilbert: 4 or 2, default 4")
    sp.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    sp.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per variant first (default 3)")
    sp.add_argument("--progress", type=float, default=0.3, help="PEGE training progress for the mid-ramp variant")
    sp.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    sp.add_argument("--compile", action="store_true",
                    help="run the quantizers' elementwise kernels through torch.compile (the FP model has none)")
    sp.add_argument("--channels-last", action="store_true",
                    help="every model's 4-D weights channels-last (`pege train --channels-last`)")
    sp.add_argument("--threads", type=int, default=None, metavar="N",
                    help="torch's intra-op threads (default: torch's choice, OMP_NUM_THREADS or the cores)")
    sp.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")
    sz = sub.add_parser("size", help="packed checkpoint bytes vs the float safetensors, per bit width",
                        description="Save a CIFAR ResNet-20 as float and as packed PEGE checkpoints; compare bytes.")
    sz.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], metavar="B",
                    help="bit widths to save (default 2 3 4 8)")
    sz.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")
    it = sub.add_parser("init", help="time and error of the step-size init rules on one big weight",
                        description="Median time and quantization MSE of LSQ init, the MSE search and the 80-point "
                                    "grid it replaced, on one per-channel weight (interleaved rounds).")
    it.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("ROWS", "COLS"),
                    help="the weight's shape, one step size per row (default 4096 4096)")
    it.add_argument("--bits", type=int, default=2, help="weight bits (default 2)")
    it.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    it.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")
    add_deploy_arguments(sub)


def add_deploy_arguments(sub) -> None:
    dp = sub.add_parser("deploy", help="latency, bytes and top-1 agreement of the shipped models on ONNX Runtime "
                                       "(integer kernels) vs PyTorch",
                        description="The shipped CIFAR-10 ResNet-20 checkpoints as deployed: PyTorch FP, ONNX Runtime "
                                    "fp32, ONNX Runtime integer W2A2/W3A3/W4A4 (pege export) and pege_hf's "
                                    "fake-quantized models, with ONNX Runtime's own static int8 quantization of the FP "
                                    "model as the reference for its integer kernels. Latency at each batch size "
                                    "(median of interleaved runs), "
                                    "weight bytes on disk and in memory, top-1 agreement and accuracy on the test "
                                    "images. Writes deploy.json, deploy.md and deploy.png. Needs the deploy extra.")
    dp.add_argument("--data", default=DEFAULT_DATASET, metavar="PATH",
                    help="image data set whose test split is used (default: the shipped 1,000-image CIFAR-10 sample; "
                         "a CIFAR-10 parquet folder for the 10k test images)")
    dp.add_argument("--images", type=int, default=None, metavar="N", help="only the first N test images (default: all)")
    dp.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4], metavar="B",
                    help="the shipped W{B}A{B} models to include (default 2 3 4)")
    dp.add_argument("--batches", type=int, nargs="+", default=[1, 64], metavar="N",
                    help="batch sizes to time (default 1 64)")
    dp.add_argument("--repeats", type=int, default=30, help="interleaved timed runs per batch size (default 30)")
    dp.add_argument("--threads", type=int, default=2, help="intra-op threads, ONNX Runtime and torch (default 2)")
    dp.add_argument("--calibration", type=int, default=512, metavar="N",
                    help="training images that calibrate ONNX Runtime's own static int8 quantization of the FP model, "
                         "timed beside the others as the reference for its integer kernels (default 512; 0 leaves it out)")
    dp.add_argument("--models", type=Path, default=SHIPPED_MODELS_DIR, metavar="DIR",
                    help="folder holding resnet20-fp and resnet20-pege-w{2,3,4}a{2,3,4} (default: the shipped models)")
    dp.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                    help="where the ONNX exports are kept for reuse (default: $PEGE_HF_CACHE, else the temp folder)")
    dp.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: ./benchmarks)")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the option, before anything runs."""
    if args.bench == "deploy":
        return check_deploy_arguments(args)
    if args.bench == "speed":
        return check_speed_arguments(args)
    positive = {"init": ("repeats",), "size": ()}[args.bench]
    for name in positive:
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for bits in (args.bits if isinstance(args.bits, list) else [args.bits]):
        PEGEConfig(w_bits=bits, a_bits=bits)  # the bit widths PEGEConfig allows, with its message


def check_device(name: str) -> None:
    """ValueError unless torch knows the device ``name`` and this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a torch device ({str(e).splitlines()[0]})") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # no such device here (torch asserts for a CPU-only build)
        raise ValueError(f"--device {name}: not available on this machine ({str(e).splitlines()[0]})") from None


def check_speed_arguments(args: argparse.Namespace) -> None:
    """Fill the per-model defaults of `pege bench speed` and check its options (ValueError naming the option)."""
    if args.model not in SPEED_MODELS:  # argparse checks the CLI; this guards programmatic Namespaces
        raise ValueError(f"--model must be one of {', '.join(SPEED_MODELS)}; got {args.model!r}")
    transformer = args.model == "distilbert"
    if transformer and args.channels_last:
        raise ValueError("--channels-last lays out 4-D (convolution) weights; --model distilbert has none")
    if not transformer and args.seq_len is not None:
        raise ValueError(f"--seq-len is the token count of --model distilbert; --model {args.model} takes images")
    if transformer and args.seq_len is None:
        args.seq_len = 128
    args.batch_size = args.batch_size or (16 if transformer else 128)
    args.bits = args.bits or (4 if transformer else 2)
    for name in ("batch_size", "steps", "seq_len", "threads"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0; got {args.warmup}")
    if args.device is not None:
        check_device(args.device)
    if transformer and args.bits not in (2, 4):  # torchao's and the packed group-wise widths of the LLM recipe
        raise ValueError(f"--bits must be 4 or 2 with --model distilbert (W{{bits}} group-32 weights); got {args.bits}")
    PEGEConfig(w_bits=args.bits, a_bits=args.bits)  # the bit widths PEGEConfig allows, with its message
    if not 0 <= args.progress <= 1:
        raise ValueError(f"--progress must be in [0, 1]; got {args.progress}")


def check_deploy_arguments(args: argparse.Namespace) -> None:
    for name in ("repeats", "threads", "images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")
    if args.calibration < 0:
        raise ValueError(f"--calibration must be >= 0; got {args.calibration}")
    if min(args.batches) < 1:
        raise ValueError(f"--batches must all be >= 1; got {' '.join(map(str, args.batches))}")
    if not Path(args.data).exists() and not is_hub_id(str(args.data)):
        raise FileNotFoundError(f"--data {args.data} does not exist")
    for bits in [None, *args.bits]:
        check_checkpoint_dir(args.models / SHIPPED[bits], "--models")
    missing = onnxruntime_missing()
    if missing:
        raise ValueError(f"`pege bench deploy` needs ONNX Runtime: {missing}")


def speed_task(args: argparse.Namespace) -> dict:
    """The model, batch and variants `pege bench speed --model` times."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if args.model == "distilbert":
        return token_task(args.batch_size, args.bits, args.progress, args.seq_len, device)
    return image_task(args.batch_size, args.bits, args.progress, device=device)


def plot(draw, result: dict, path: Path) -> None:
    """``draw(result, path)`` when matplotlib (the `bench` extra) is installed; else say so."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"plot skipped ({path.name}): pip install 'pege-hf[bench]'", flush=True)
        return
    draw(result, path)


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.bench == "speed":
        result = bench_speed(task=speed_task(args), bits=args.bits, steps=args.steps, warmup=args.warmup,
                             progress=args.progress, device=args.device, compile=args.compile,
                             channels_last=args.channels_last, threads=args.threads)
        stem = ("speed" + ("_distilbert" if args.model == "distilbert" else "") + ("_compiled" if args.compile else "")
                + ("_channels_last" if args.channels_last else ""))
        write_result(result, speed_table(result), args.out, stem)
        plot(speed_plot, result, args.out / f"{stem}.png")
    elif args.bench == "size":
        result = bench_size(resnet20, tuple(args.bits))
        write_result(result, size_table(result), args.out, "size")
        plot(size_plot, result, args.out / "size.png")
    elif args.bench == "init":
        result = bench_init(tuple(args.shape), args.bits, args.repeats)
        write_result(result, init_table(result), args.out, "init")
    elif args.bench == "deploy":
        result = bench_deploy(data=args.data, images=args.images, models_dir=args.models, bits=args.bits,
                              batches=args.batches, repeats=args.repeats, threads=args.threads,
                              cache_dir=args.cache_dir, calibration=args.calibration)
        write_result(result, deploy_table(result), args.out, "deploy")
        plot(deploy_plot, result, args.out / "deploy.png")
    return 0
