"""Deployed models side by side: `pege bench deploy` and the demo's ONNX Runtime columns.

One place for what both need: export a checkpoint to ONNX once (cached, keyed by the checkpoint's files),
an ONNX Runtime session on the CPU execution provider, bytes on disk and in memory, top-1 agreement, and
latency as the median of interleaved runs::

    path = cached_onnx_export("pege_hf/assets/models/resnet20-pege-w2a2")   # exported once, then reused
    run = onnx_runner(path, threads=2)                                      # np float32 batch -> logits
    result = bench_deploy(bits=(2, 3, 4), batches=(1, 64), repeats=30)      # `pege bench deploy`

onnxruntime and onnx come with the `deploy` extra (``pip install 'pege-hf[deploy]'``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import DEFAULT_DATASET, load_image_dataset, normalize, to_tensors
from .export import export_onnx
from .export import onnx as onnx_exporter
from .export.onnx import example_input, torch_to_onnx
from .hf.loading import from_pretrained
from .sources import SHIPPED_MODELS_DIR
from .version import __version__

#: the shipped checkpoints `pege bench deploy` measures, by bit width (the float one under None)
SHIPPED = {None: "resnet20-fp", 4: "resnet20-pege-w4a4", 3: "resnet20-pege-w3a3", 2: "resnet20-pege-w2a2"}
QDQ = "ort-qdq-int8"  # ONNX Runtime's own static int8 quantization of the FP model: the reference
INSTALL_HINT = "pip install 'pege-hf[deploy]'"
Runner = Callable[[np.ndarray], np.ndarray]  # a float32 N x C x H x W batch -> N x classes logits


# --------------------------------------------------------------------------------------------- ONNX Runtime


def onnxruntime_missing() -> str | None:
    """None when onnxruntime and onnx import; else the reason, one line (for a page or an error)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        return f"onnxruntime is not installed ({err}); {INSTALL_HINT}"
    return None


def default_cache_dir() -> Path:
    """$PEGE_HF_CACHE, else <temp dir>/pege_hf_onnx: where exported ONNX files are kept for reuse."""
    return Path(os.environ.get("PEGE_HF_CACHE") or Path(tempfile.gettempdir()) / "pege_hf_onnx")


def checkpoint_key(folder: str | os.PathLike, kind: str = "integer") -> str:
    """A hash of the checkpoint's config.json and *.safetensors contents, the export kind, the pege_hf
    version and the exporter's source: the same files and exporter give the same key, any change a new one."""
    folder = Path(folder)
    digest = hashlib.sha256(f"{kind}:{__version__}".encode())
    digest.update(Path(onnx_exporter.__file__).read_bytes())
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist: not a checkpoint folder")
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:20]


def is_quantized_checkpoint(folder: str | os.PathLike) -> bool:
    """True when the checkpoint's config.json carries a quantization_config (a PEGE checkpoint)."""
    import json

    try:
        return json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") is not None
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{folder}: no readable config.json ({err}); not a checkpoint folder") from err


def cached_onnx_export(folder: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       model: nn.Module | None = None) -> Path:
    """The ONNX file of the checkpoint in ``folder``: integer kernels (`export_onnx`) for a PEGE checkpoint,
    a plain fp32 graph for a float one. Exported on the first call, then read from ``cache_dir`` (keyed by
    `checkpoint_key`; nothing is loaded then). ``model``: the checkpoint already loaded, to save loading it
    for an export."""
    kind = "integer" if is_quantized_checkpoint(folder) else "fp32"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{Path(folder).name}-{kind}-{checkpoint_key(folder, kind)}.onnx"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    model = (model if model is not None else from_pretrained(os.fspath(folder))).eval()
    if kind == "fp32":
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch_to_onnx(model, example_input(model), tmp)
        os.replace(tmp, path)
        return path
    try:
        export_onnx(model, path)
    except FileExistsError:  # another process wrote the same export meanwhile: the same bytes
        pass
    return path


def qdq_reference_export(fp32_path: str | os.PathLike, calibration: np.ndarray,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """ONNX Runtime's own static int8 quantization of the float graph at ``fp32_path`` (the reference point of
    what its integer kernels give: QDQ format, per-channel int8 weights, uint8 activations with MinMax ranges
    from the ``calibration`` images, every conv and add on int8 kernels). Approximate by design: its 8-bit
    activations and residual adds are not the PEGE model. Cached by the float file's name, the calibration
    images and the onnxruntime version."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("the int8 reference needs at least one calibration image")
    digest = hashlib.sha256(f"qdq:{onnxruntime.__version__}:{Path(fp32_path).name}".encode())
    digest.update(np.ascontiguousarray(calibration, dtype=np.float32).tobytes())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{Path(fp32_path).stem}-qdq-int8-{digest.hexdigest()[:20]}.onnx"
    if path.is_file():
        return path
    batches = [{"pixel_values": calibration[i:i + 64]} for i in range(0, len(calibration), 64)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared, out = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "qdq.onnx")
        quant_pre_process(str(fp32_path), prepared)
        quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(out, path)
    return path


def onnx_session(path: str | os.PathLike, threads: int = 1):
    """An ONNX Runtime session on the CPU execution provider with ``threads`` intra-op threads (0: its default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = max(0, threads), 1
    # no busy-waiting between runs: several sessions take turns here (the benchmark interleaves them, the demo
    # runs three per request), and one's spinning threads would steal the cores from the next
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_runner(path: str | os.PathLike, threads: int = 1) -> Runner:
    """fn(float32 batch) -> logits through an ONNX Runtime session of ``path`` (thread-safe)."""
    sess = onnx_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def torch_runner(model: nn.Module) -> Runner:
    """fn(float32 batch) -> logits of a PyTorch model in eval mode, on the CPU."""
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return (out.logits if hasattr(out, "logits") else out).float().numpy()

    return run


# --------------------------------------------------------------------------------------------- bytes

_FOUR_BIT_TYPES = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1: two values a byte


def initializer_bytes(tensor) -> int:
    """Bytes of one ONNX initializer at its element type's width (4-bit types packed two a byte)."""
    from onnx import helper

    n = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type in _FOUR_BIT_TYPES:
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def onnx_memory_bytes(path: str | os.PathLike) -> int:
    """Bytes of the weights ONNX Runtime holds for ``path``: the initializers of the graph its CPU provider
    runs after its optimisations (constant Casts folded, e.g. INT4 codes widened to the int8 its integer
    kernels read), read back from SessionOptions.optimized_model_filepath. int64 initializers are not weights
    (shapes, axes and the im2col convolutions' Gather indices: docs/export.md) and are left out."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # "the optimized model is hardware specific": expected
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    return sum(initializer_bytes(t) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64)


def module_bytes(model: nn.Module) -> int:
    """Bytes of a PyTorch model's parameters and buffers (each storage once)."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's weights: its *.safetensors files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- measuring


def predict_top1(run: Runner, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Top-1 class index of every image (float32 N x C x H x W, already normalised)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([run(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of images on which two models pick the same class."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"top-1 agreement needs two equal, non-empty prediction lists; got {len(a)} and {len(b)}")
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def interleaved_latency(runners: Mapping[str, Runner], batch: int, repeats: int, shape=(3, 32, 32),
                        progress: bool = True) -> dict[str, float]:
    """Median milliseconds per call of each runner on one random ``batch``; every repeat times each runner
    once, in turn, so machine noise hits them alike (one warm-up call each first)."""
    from tqdm.auto import tqdm

    x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(x)
    for _ in tqdm(range(repeats), desc=f"latency, batch {batch}", disable=not progress):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------------------------- pege bench deploy


def runtime_latency(models: Mapping[str, "Deployed"], batch: int, repeats: int) -> dict[str, float]:
    """`interleaved_latency` of the ONNX Runtime models among themselves, then of the PyTorch models among
    themselves (in ``models``' order): PyTorch's OpenMP threads busy-wait after a call and would slow the ONNX
    Runtime session timed right after it."""
    groups = [{n: m.run for n, m in models.items() if n.startswith("ort-")},
              {n: m.run for n, m in models.items() if not n.startswith("ort-")}]
    times = {}
    for group in groups:
        if group:
            times.update(interleaved_latency(group, batch, repeats))
    return {name: times[name] for name in models}


@dataclass
class Deployed:
    """One model as a runtime runs it: its runner and its weight bytes on disk and in memory."""

    name: str
    run: Runner
    disk_bytes: int
    memory_bytes: int


def deployed_models(models_dir: str | os.PathLike = SHIPPED_MODELS_DIR, bits: Sequence[int] = (2, 3, 4),
                    threads: int = 2, cache_dir: str | os.PathLike | None = None,
                    calibration: np.ndarray | None = None) -> dict[str, Deployed]:
    """PyTorch FP, ONNX Runtime fp32 of the same FP model, ONNX Runtime's own int8 quantization of it
    (`qdq_reference_export`, when ``calibration`` images are given), and per bit width ONNX Runtime integer
    and pege_hf's fake-quantized model, from the checkpoints SHIPPED names inside ``models_dir``."""
    from tqdm.auto import tqdm

    out: dict[str, Deployed] = {}
    for b in tqdm([None, *bits], desc="export / load"):
        folder = Path(models_dir) / SHIPPED[b]
        model = from_pretrained(os.fspath(folder)).eval()
        onnx_path = cached_onnx_export(folder, cache_dir, model)
        torch_name, onnx_name = ("pytorch-fp", "ort-fp32") if b is None else (f"pytorch-fakequant-w{b}a{b}",
                                                                            f"ort-int-w{b}a{b}")
        out[torch_name] = Deployed(torch_name, torch_runner(model), checkpoint_bytes(folder), module_bytes(model))
        out[onnx_name] = Deployed(onnx_name, onnx_runner(onnx_path, threads), onnx_path.stat().st_size,
                                  onnx_memory_bytes(onnx_path))
        if b is None and calibration is not None:
            qdq = qdq_reference_export(onnx_path, calibration, cache_dir)
            out[QDQ] = Deployed(QDQ, onnx_runner(qdq, threads), qdq.stat().st_size, onnx_memory_bytes(qdq))
    order = ["pytorch-fp", "ort-fp32", *([QDQ] if QDQ in out else []),
             *(f"{k}-w{b}a{b}" for b in bits for k in ("ort-int", "pytorch-fakequant"))]
    return {name: out[name] for name in order}


def load_test_images(data: str | os.PathLike = DEFAULT_DATASET, limit: int | None = None,
                     image_size: int = 32, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 images, labels) of the data set's test split (or ``split="train"``); the first
    ``limit`` when given."""
    ds = load_image_dataset(data)
    table = ds.test if split == "test" else ds.train
    table = table.select(range(min(limit, len(table)))) if limit else table
    images, labels = to_tensors(table, ds.image_column, ds.label_column, image_size=image_size)
    return normalize(images).numpy(), labels.numpy()


def accuracy_and_agreement(models: Mapping[str, Deployed], images: np.ndarray, labels: np.ndarray,
                           bits: Sequence[int]) -> dict:
    """Per bit width: top-1 agreement of ONNX Runtime's integer model with pege_hf's fake-quantized model
    and both accuracies; for the float model, PyTorch's and ONNX Runtime fp32's accuracies."""
    from tqdm.auto import tqdm

    preds = {name: predict_top1(m.run, images) for name, m in tqdm(models.items(), desc="top-1 on the test images")}
    out = {}
    for b in bits:
        ref, got = preds[f"pytorch-fakequant-w{b}a{b}"], preds[f"ort-int-w{b}a{b}"]
        out[f"w{b}a{b}"] = {"agreement": top1_agreement(ref, got), "accuracy_ort": float(np.mean(got == labels)),
                            "accuracy_fakequant": float(np.mean(ref == labels)),
                            "agreement_with_fp": top1_agreement(preds["pytorch-fp"], got)}
    if QDQ in preds:
        out["int8_reference"] = {"accuracy": float(np.mean(preds[QDQ] == labels)),
                                 "agreement_with_fp": top1_agreement(preds["pytorch-fp"], preds[QDQ])}
    out["fp"] = {"accuracy_pytorch": float(np.mean(preds["pytorch-fp"] == labels)),
                 "accuracy_ort_fp32": float(np.mean(preds["ort-fp32"] == labels)),
                 "agreement": top1_agreement(preds["pytorch-fp"], preds["ort-fp32"])}
    return out


def bench_deploy(*, data: str | os.PathLike = DEFAULT_DATASET, images: int | None = None,
                 models_dir: str | os.PathLike = SHIPPED_MODELS_DIR, bits: Sequence[int] = (2, 3, 4),
                 batches: Sequence[int] = (1, 64), repeats: int = 30, threads: int = 2,
                 cache_dir: str | os.PathLike | None = None, calibration: int = 512) -> dict:
    """The deployment benchmark (`pege bench deploy`): latency at each batch size (median of ``repeats``
    interleaved runs, ``threads`` intra-op threads for ONNX Runtime and torch alike), bytes on disk and in
    memory, and top-1 agreement/accuracy on the test images. ``calibration``: training images that calibrate
    ONNX Runtime's own int8 quantization of the FP model, timed beside the others as the reference for what
    its integer kernels give (0: left out)."""
    missing = onnxruntime_missing()
    if missing:
        raise ValueError(f"`pege bench deploy` needs ONNX Runtime: {missing}")
    before, load = torch.get_num_threads(), [_load_average()]
    torch.set_num_threads(threads)
    try:
        x, y = load_test_images(data, images)
        calib = load_test_images(data, calibration, split="train")[0] if calibration else None
        models = deployed_models(models_dir, bits, threads, cache_dir, calib)
        quality = accuracy_and_agreement(models, x, y, bits)
        latency = {str(b): runtime_latency(models, b, repeats) for b in batches}
    finally:
        torch.set_num_threads(before)
    load.append(_load_average())
    return {"benchmark": "deploy", "model": "cifar_resnet20", "data": Path(data).name, "images": int(len(y)),
            "repeats": repeats, "threads": threads, "calibration_images": 0 if calib is None else int(len(calib)),
            "batches": [int(b) for b in batches], "bits": [int(b) for b in bits],
            "machine": platform.machine(), "torch": torch.__version__, "onnxruntime": _ort_version(),
            "load_average_1min": {"start": load[0], "end": load[1]},
            "bytes": {n: {"disk": m.disk_bytes, "memory": m.memory_bytes} for n, m in models.items()},
            "quality": quality, "latency_ms": latency}


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): other work sharing the cores."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def deploy_table(result: dict) -> str:
    """The benchmark's markdown: latency and bytes per runtime, then agreement and accuracy per bit width."""
    lat, sizes, batches = result["latency_ms"], result["bytes"], [str(b) for b in result["batches"]]
    lines = [f"Deployment of the shipped CIFAR-10 ResNet-20 checkpoints, cpu ({result['threads']} threads, "
             f"{result['machine']}), onnxruntime {result['onnxruntime']}, torch {result['torch']}; latency: median of "
             f"{result['repeats']} interleaved runs; quality on {result['images']:,} test images of {result['data']}."
             + _load_note(result),
             "", "| runtime | " + " | ".join(f"batch {b} ms" for b in batches)
             + "".join(f" | batch {b} vs ORT fp32" for b in batches) + " | weights on disk (bytes) | weights in memory (bytes) |",
             "|---|" + "---:|" * (2 * len(batches) + 2)]
    for name, size in sizes.items():
        lines.append(f"| {name} | " + " | ".join(f"{lat[b][name]:.3f}" for b in batches)
                     + "".join(f" | {lat[b]['ort-fp32'] / lat[b][name]:.2f}x" for b in batches)
                     + f" | {size['disk']:,} | {size['memory']:,} |")
    lines += ["", "| model | top-1 agreement, ORT integer vs fake-quant | accuracy ORT integer | accuracy fake-quant "
                  "| agreement with FP |", "|---|---:|---:|---:|---:|"]
    for b in result["bits"]:
        q = result["quality"][f"w{b}a{b}"]
        lines.append(f"| W{b}A{b} | {100 * q['agreement']:.2f}% | {100 * q['accuracy_ort']:.2f}% | "
                     f"{100 * q['accuracy_fakequant']:.2f}% | {100 * q['agreement_with_fp']:.2f}% |")
    ref = result["quality"].get("int8_reference")
    if ref:
        lines.append(f"| {QDQ} (reference: ONNX Runtime's static int8 of the FP model) | | "
                     f"{100 * ref['accuracy']:.2f}% | "
                     f"| {100 * ref['agreement_with_fp']:.2f}% |")
    fp = result["quality"]["fp"]
    lines.append(f"| FP (ORT fp32 vs PyTorch) | {100 * fp['agreement']:.2f}% | {100 * fp['accuracy_ort_fp32']:.2f}% | "
                 f"{100 * fp['accuracy_pytorch']:.2f}% | |")
    return "\n".join(lines) + "\n"


def _load_note(result: dict) -> str:
    load = result.get("load_average_1min") or {}
    if load.get("start") is None:
        return ""
    return f" Machine load (1-min average) {load['start']:.1f} at the start, {load['end']:.1f} at the end."


def deploy_plot(result: dict, path: str | os.PathLike) -> None:
    """Latency per runtime on a log scale, one panel per batch size (lower is better), ONNX Runtime fp32 as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(b) for b in result["batches"]]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        names = list(result["latency_ms"][batch])
        colors = ["#2a7" if n.startswith("ort-int") else "#c93" if n == QDQ else
                  "#888" if "fp" in n.split("-")[-1] else "#57c" for n in names]
        values = [result["latency_ms"][batch][n] for n in names]
        bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.bar_label(bars, [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values[::-1]], padding=2, fontsize=7)
        ax.axvline(result["latency_ms"][batch]["ort-fp32"], color="#c33", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlim(right=max(values) * 4)  # room for the labels
        ax.set_xlabel("ms per call (median, log scale)")
        ax.set_title(f"batch {batch}")
    fig.suptitle(f"CIFAR-10 ResNet-20 inference, cpu, {result['threads']} threads\n(dashed: ONNX Runtime fp32; "
                 "green: integer ONNX, orange: ONNX Runtime's own int8, blue: pege_hf fake-quantized)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
