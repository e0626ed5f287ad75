"""The demo's backend: a full-precision model and its PEGE 4/3/2-bit checkpoints side by side.

Everything the Gradio page (app.py, next to this file) shows comes from here; the page holds no model
logic. It lives beside the app, not in the pege_hf wheel (needs the `demo` extra: matplotlib)::

    models = ModelSet.load(resolve_sources())          # the shipped models, loaded (and exported) once
    models.runtime_notes                               # what runs where, e.g. "onnxruntime is not installed ..."
    pred = models.predict("cat.png")                   # PIL image, path, bytes or 1x3xHxW tensor
    pred.top_k("w2")                                   # {"cat": 0.61, "dog": 0.2, ...} (5 best)
    pred.agreement                                     # {"w4": True, "w3": True, "w2": False}
    summary_rows(models, pred)                         # runtime, agreement, accuracy, latency, bytes per model
    measure_latency(models)                            # server-side median of predict(), in ms

The quantized models run as exported integer ONNX graphs on ONNX Runtime's CPU execution provider
(`pege_hf.export_onnx`, exported once and cached by pege_hf.deploy, keyed by the checkpoint's files);
without onnxruntime they run as pege_hf's PyTorch models (fake-quantized float weights), and
`runtime_notes` says so. The float model runs on PyTorch.

Model keys are ``"fp"``, ``"w4"``, ``"w3"``, ``"w2"`` (display order: float first, then the
bit widths downwards). Nothing here imports gradio.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from torch import nn

from pege_hf import deploy
from pege_hf.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATASET, preprocess_pil
from pege_hf.hf.loading import from_pretrained
from pege_hf.quant.modules import QuantLayer
from pege_hf.sources import SHIPPED_MODELS_DIR, is_hub_id

__all__ = [
    "MODEL_KEYS",
    "DEFAULT_TITLES",
    "SHIPPED_MODELS_DIR",
    "SHIPPED_DIRNAMES",
    "RUNTIMES",
    "MAX_IMAGE_PIXELS",
    "LoadedModel",
    "ModelSet",
    "Prediction",
    "resolve_sources",
    "model_size_bytes",
    "read_metrics_accuracy",
    "load_image",
    "top_k",
    "agreement",
    "freeze_for_inference",
    "summary_rows",
    "runtime_markdown",
    "table_note",
    "accuracy_plot_label",
    "SUMMARY_HEADERS",
    "agreement_markdown",
    "accuracy_by_bits",
    "parse_benchmark_accuracy",
    "accuracy_figure",
    "probability_figure",
    "example_images",
    "measure_latency",
]

#: display order: float first, then 4, 3, 2 bits
MODEL_KEYS = ("fp", "w4", "w3", "w2")
DEFAULT_TITLES = {"fp": "Full precision", "w4": "PEGE W4A4", "w3": "PEGE W3A3", "w2": "PEGE W2A2"}
_KEY_BITS = {"w4": 4, "w3": 3, "w2": 2}

#: where the shipped checkpoints live, one folder per variant
SHIPPED_DIRNAMES = {"fp": "resnet20-fp", "w4": "resnet20-pege-w4a4", "w3": "resnet20-pege-w3a3",
                    "w2": "resnet20-pege-w2a2"}
#: where the quantized models run: "auto" (ONNX Runtime when installed, else PyTorch), or one of them
RUNTIMES = ("auto", "onnxruntime", "pytorch")
ORT_RUNTIME = "ONNX Runtime (integer kernels)"
TORCH_RUNTIME = "PyTorch"
#: the test images the quantized models' top-1 agreement with the float one is measured on, at start-up
SAMPLE_IMAGES = 1000

#: larger uploads are refused with a clear message instead of being decoded (RGB: 3 bytes a pixel)
MAX_IMAGE_PIXELS = 100_000_000

# --------------------------------------------------------------------------------------------- sources


def _quant_bits(config_dict: Mapping | None) -> tuple[int | None, int | None]:
    qc = (config_dict or {}).get("quantization_config") or {}
    if not isinstance(qc, Mapping):
        qc = qc.to_dict()
    if qc.get("quant_method") not in (None, "pege"):
        return None, None
    return qc.get("w_bits"), qc.get("a_bits")


def _scan_parent(parent: Path) -> dict[str, Path]:
    """The four variants inside `parent`: the conventional folder names first, otherwise the one
    subfolder whose config.json says it is float (no quantization_config) / W{b} for b = 4, 3, 2."""
    found: dict[str, Path] = {}
    for key, name in SHIPPED_DIRNAMES.items():
        if (parent / name / "config.json").is_file():
            found[key] = parent / name
    candidates: dict[str, list[Path]] = {key: [] for key in MODEL_KEYS}
    subfolders = sorted(p for p in parent.iterdir() if (p / "config.json").is_file()) if parent.is_dir() else []
    for sub in subfolders:
        try:
            config = json.loads((sub / "config.json").read_text())
        except (OSError, ValueError):
            continue
        w_bits, _ = _quant_bits(config)
        if config.get("quantization_config") is None:
            candidates["fp"].append(sub)
        elif w_bits in (4, 3, 2):
            candidates[f"w{w_bits}"].append(sub)
    for key, paths in candidates.items():
        if key not in found and len(paths) == 1:
            found[key] = paths[0]
        elif key not in found and len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise ValueError(f"{parent} holds several {DEFAULT_TITLES[key]} checkpoints ({names}); "
                             f"name the one to use with --{key} DIR")
    return found


def resolve_sources(model_dir: str | os.PathLike | None = None, *, fp: str | None = None, w4: str | None = None,
                    w3: str | None = None, w2: str | None = None) -> dict[str, str]:
    """Where to load each variant from: {"fp": ..., "w4": ..., "w3": ..., "w2": ...}.

    An explicit `fp`/`w4`/`w3`/`w2` (a folder or a Hub id) wins; the rest are looked up in
    `model_dir` (a parent folder; default: the shipped pege_hf/assets/models). Raises
    FileNotFoundError naming what is missing and how to provide it.
    """
    explicit = {"fp": fp, "w4": w4, "w3": w3, "w2": w2}
    parent = Path(model_dir).expanduser() if model_dir is not None else SHIPPED_MODELS_DIR
    if model_dir is not None and not parent.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such folder (it should hold the float checkpoint and "
                                f"its W4A4/W3A3/W2A2 PEGE checkpoints, one subfolder each)")
    found = _scan_parent(parent) if parent.is_dir() else {}
    sources: dict[str, str] = {}
    missing = []
    for key in MODEL_KEYS:
        given = explicit[key]
        if given is not None:
            text = os.fspath(given)
            if not Path(text).expanduser().exists() and not is_hub_id(text):
                raise FileNotFoundError(f"--{key} {text}: no such folder (and not a Hub id like user/name)")
            if Path(text).expanduser().exists() and not (Path(text).expanduser() / "config.json").is_file():
                raise FileNotFoundError(f"--{key} {text} is not a model checkpoint: it has no config.json")
            sources[key] = str(Path(text).expanduser()) if Path(text).expanduser().exists() else text
        elif key in found:
            sources[key] = str(found[key])
        else:
            missing.append(key)
    if missing:
        what = ", ".join(f"{DEFAULT_TITLES[k]} (--{k} DIR, or {parent / SHIPPED_DIRNAMES[k]})" for k in missing)
        raise FileNotFoundError(
            f"no checkpoint found for: {what}. The demo needs a float model and its PEGE W4A4/W3A3/W2A2 "
            f"checkpoints: pass --model PARENT_DIR (holding the four) or --fp/--w4/--w3/--w2 (folders or Hub "
            f"ids); `pege train` makes them.")
    return sources


def _local_file(source: str, filename: str) -> Path | None:
    """`filename` of a local checkpoint folder, or of a Hub checkpoint already in the local cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path / filename if (path / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, filename)
    except Exception:  # noqa: BLE001 - a best-effort lookup
        return None
    return Path(cached) if isinstance(cached, (str, os.PathLike)) else None


def model_size_bytes(source: str | os.PathLike) -> int | None:
    """Bytes on disk of the checkpoint's weights: model.safetensors (or the sum of its shards)."""
    single = _local_file(os.fspath(source), "model.safetensors")
    if single is not None:
        return os.path.getsize(single)
    path = Path(source).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("model-*.safetensors"))
        if shards:
            return sum(os.path.getsize(s) for s in shards)
    return None


def _as_fraction(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("mean", value.get("value"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value / 100.0 if value > 1.0 else float(value)


def read_metrics_accuracy(source: str | os.PathLike) -> float | None:
    """Test accuracy (a fraction in [0, 1]) from the checkpoint's metrics.json (written by
    `pege train`: top-level "accuracy", a fraction); percentages are converted. None when absent."""
    path = _local_file(os.fspath(source), "metrics.json")
    if path is None and is_hub_id(os.fspath(source)) and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", ""):
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(os.fspath(source), "metrics.json"))
        except Exception:  # noqa: BLE001 - no metrics.json on the Hub, or no network
            path = None
    if path is None:
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for name in ("accuracy", "test_accuracy", "eval_accuracy", "top1"):
        if name in metrics:
            return _as_fraction(metrics[name])
    return None


# --------------------------------------------------------------------------------------------- models


def freeze_for_inference(model: nn.Module) -> nn.Module:
    """eval(), no gradients, and every PEGE layer's fake-quantized weight computed once instead of on
    every forward. Bit-exact: a weight loaded from packed codes is already on the quantization grid,
    and quantizing it again in eval mode always gives the same tensor. Returns the model."""

    model.eval()
    model.requires_grad_(False)
    with torch.inference_mode():
        for layer in model.modules():
            if isinstance(layer, QuantLayer):
                weight = layer.quantized_weight().clone()
                layer.quantized_weight = _Constant(weight)  # shadows the method on this instance only
    return model


class _Constant:
    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self) -> torch.Tensor:
        return self.value


def torch_memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers plus the weights `freeze_for_inference` computed once."""
    frozen = [layer.quantized_weight.value for layer in model.modules()
              if isinstance(layer, QuantLayer) and isinstance(layer.quantized_weight, _Constant)]
    return deploy.module_bytes(model) + sum(t.numel() * t.element_size() for t in frozen)


def use_torch(entry: "LoadedModel") -> None:
    """Run `entry` on PyTorch: its runner, the bytes of its model.safetensors and of its tensors."""
    entry.run, entry.runtime = deploy.torch_runner(entry.model), TORCH_RUNTIME
    entry.disk_bytes, entry.disk_file = entry.size_bytes, "safetensors"
    entry.memory_bytes = torch_memory_bytes(entry.model)


def _local_folder(source: str) -> Path:
    """The checkpoint folder of a local source or of a Hub id in the local cache (no network)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    config = _local_file(source, "config.json")
    if config is None:
        raise FileNotFoundError(f"{source} is not a local folder nor in the local Hub cache")
    return config.parent


@dataclass
class LoadedModel:
    key: str
    title: str
    source: str
    model: nn.Module
    w_bits: int | None
    a_bits: int | None
    size_bytes: int | None  # model.safetensors (the packed checkpoint)
    accuracy: float | None  # fraction in [0, 1], from metrics.json
    runtime: str = TORCH_RUNTIME
    run: deploy.Runner | None = None  # float32 N x C x H x W batch -> logits, on `runtime`
    disk_bytes: int | None = None  # the file the runtime loads: the ONNX file, or model.safetensors
    disk_file: str = "safetensors"
    memory_bytes: int | None = None  # the weights the runtime holds
    sample_agreement: float | None = None  # top-1 agreement with the float model on the test sample

    @property
    def bits_label(self) -> str:
        return "32/32 (float)" if self.w_bits is None else f"{self.w_bits}/{self.a_bits if self.a_bits else 32}"


@dataclass
class Prediction:
    """One image through every model: probabilities (softmax of the logits), latency per model."""

    class_names: list[str]
    probs: dict[str, list[float]]
    logits: dict[str, list[float]]
    latency_ms: dict[str, float]
    preprocess_ms: float
    titles: dict[str, str] = field(default_factory=dict)
    runtimes: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return list(self.probs)

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + sum(self.latency_ms.values())

    def top_k(self, key: str, k: int = 5) -> dict[str, float]:
        return top_k(self.probs[key], self.class_names, k)

    @property
    def top1(self) -> dict[str, str]:
        return {key: self.class_names[max(range(len(p)), key=p.__getitem__)] for key, p in self.probs.items()}

    @property
    def agreement(self) -> dict[str, bool]:
        return agreement(self.top1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: class names, per-class probabilities of every model, top-1, agreement, latency."""
        return {"class_names": list(self.class_names), "titles": dict(self.titles),
                "probabilities": {k: list(v) for k, v in self.probs.items()}, "top1": self.top1,
                "agrees_with_full_precision": self.agreement, "latency_ms": dict(self.latency_ms),
                "preprocess_ms": self.preprocess_ms, "logits": {k: list(v) for k, v in self.logits.items()},
                "runtimes": dict(self.runtimes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prediction":
        """The inverse of `to_dict` (ValueError for anything else)."""
        try:
            names = [str(c) for c in data["class_names"]]
            probs = {str(k): [float(x) for x in v] for k, v in data["probabilities"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a prediction (expected the output of predict): {err}") from err
        if not probs or any(len(v) != len(names) for v in probs.values()):
            raise ValueError("not a prediction: every model needs one probability per class")
        return cls(class_names=names, probs=probs,
                   logits={str(k): list(v) for k, v in (data.get("logits") or {}).items()},
                   latency_ms={str(k): float(v) for k, v in (data.get("latency_ms") or {}).items()},
                   preprocess_ms=float(data.get("preprocess_ms") or 0.0), titles=dict(data.get("titles") or {}),
                   runtimes=dict(data.get("runtimes") or {}))


class ModelSet:
    """The float model and its quantized variants, loaded once, ready for concurrent inference.

    `predict` is thread-safe: forwards of these eval-mode models and ONNX Runtime sessions change no state,
    so requests run in parallel (each on its intra-op threads; the app sets those to 1 per request)."""

    def __init__(self, models: Mapping[str, LoadedModel], class_names: Sequence[str], image_size: int = 32,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        self.models = dict(models)
        self.class_names = list(class_names)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.runtime_notes: list[str] = []
        self.sample_size = 0
        for entry in self.models.values():  # PyTorch until `use_runtime` says otherwise
            if entry.run is None:
                use_torch(entry)

    @classmethod
    def load(cls, sources: Mapping[str, str], *, freeze: bool = True, runtime: str = "auto", threads: int = 1,
             cache_dir: str | os.PathLike | None = None, sample: str | os.PathLike | None = DEFAULT_DATASET,
             sample_images: int = SAMPLE_IMAGES) -> "ModelSet":
        """Load every source with pege_hf.from_pretrained (float or packed PEGE checkpoints); run the
        quantized ones on `runtime` (`use_runtime`); measure each model's top-1 agreement with the float
        one on the first `sample_images` test images of `sample` (None: not measured)."""
        models = cls.load_pytorch(sources, freeze=freeze)
        models.use_runtime(runtime, threads=threads, cache_dir=cache_dir)
        if sample is not None and sample_images > 0:
            try:
                models.measure_sample_agreement(sample, sample_images)
            except (OSError, ValueError, RuntimeError) as err:
                models.runtime_notes.append(f"Agreement on the test sample not measured: {str(err).splitlines()[0]}")
        return models

    @classmethod
    def load_pytorch(cls, sources: Mapping[str, str], *, freeze: bool = True) -> "ModelSet":
        """Every source as a PyTorch model (pege_hf.from_pretrained), checked to be the variant its key says."""

        models: dict[str, LoadedModel] = {}
        class_names: list[str] | None = None
        image_size = 32
        for key in [k for k in MODEL_KEYS if k in sources] + [k for k in sources if k not in MODEL_KEYS]:
            source = os.fspath(sources[key])
            try:
                model = from_pretrained(source)
            except (OSError, ValueError, RuntimeError) as err:
                raise RuntimeError(f"could not load the {DEFAULT_TITLES.get(key, key)} model from {source}: {err}") from err
            model = freeze_for_inference(model) if freeze else model.eval()
            config = model.config
            w_bits, a_bits = _quant_bits(config.to_dict() if hasattr(config, "to_dict") else {})
            names = [str(config.id2label[i]) for i in range(len(config.id2label))]
            if class_names is None:
                class_names = names
                image_size = int(getattr(config, "image_size", 32) or 32)
            elif names != class_names:
                raise ValueError(f"{source} predicts other classes ({names}) than {sources[next(iter(sources))]} "
                                 f"({class_names}); the demo compares variants of one model")
            if key == "fp" and w_bits is not None:
                raise ValueError(f"the full-precision model {source} is a PEGE W{w_bits} checkpoint; pass a float one")
            if key in _KEY_BITS and w_bits is None:
                raise ValueError(f"the {DEFAULT_TITLES[key]} model {source} is not a PEGE checkpoint (its config.json "
                                 f"has no 'pege' quantization_config)")
            if w_bits is None:
                title = DEFAULT_TITLES.get(key, key)
            else:
                title = f"PEGE W{w_bits}A{a_bits}" if a_bits else f"PEGE W{w_bits}"
            models[key] = LoadedModel(key=key, title=title, source=source, model=model, w_bits=w_bits,
                                      a_bits=a_bits, size_bytes=model_size_bytes(source),
                                      accuracy=read_metrics_accuracy(source))
        if not models:
            raise ValueError("no models to load")
        return cls(models, class_names or list(CIFAR10_CLASSES), image_size=image_size)

    def use_runtime(self, runtime: str = "auto", threads: int = 1, cache_dir: str | os.PathLike | None = None) -> None:
        """Run the quantized models on ONNX Runtime's integer kernels ("onnxruntime"; "auto": when installed,
        else PyTorch, and `runtime_notes` says so) or on PyTorch ("pytorch"). Under "auto" a quantized model that
        cannot be exported (a Hub checkpoint, a failed export) stays on PyTorch, with a note naming why; under
        "onnxruntime" that is an error."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
        quantized = [e for e in self.models.values() if e.w_bits is not None]
        missing = deploy.onnxruntime_missing() if runtime != "pytorch" and quantized else None
        if runtime == "onnxruntime" and missing:
            raise RuntimeError(missing)
        self.runtime_notes = []
        for entry in self.models.values():
            use_torch(entry)
        if runtime == "pytorch":
            self.runtime_notes.append("Every model runs on PyTorch (runtime: pytorch); the quantized ones with "
                                      "fake-quantized float weights.")
        if runtime == "pytorch" or not quantized:
            return
        if missing:
            self.runtime_notes.append(f"Fallback: {missing}. The quantized models run on PyTorch instead "
                                      "(pege_hf's fake-quantized float weights, not integer kernels).")
            return
        for entry in quantized:
            try:
                path = deploy.cached_onnx_export(_local_folder(entry.source), cache_dir)
            except (OSError, ValueError, RuntimeError) as err:
                if runtime == "onnxruntime":  # asked for by name: no quiet fallback
                    raise RuntimeError(f"runtime onnxruntime: {entry.title} ({entry.source}) cannot be exported to "
                                       f"ONNX ({str(err).splitlines()[0]}); use runtime auto or pytorch") from None
                self.runtime_notes.append(f"{entry.title} runs on PyTorch: its ONNX export failed "
                                          f"({str(err).splitlines()[0]}).")
                continue
            entry.run, entry.runtime = deploy.onnx_runner(path, threads), ORT_RUNTIME
            entry.disk_bytes, entry.disk_file = path.stat().st_size, "ONNX"
            entry.memory_bytes = deploy.onnx_memory_bytes(path)

    def measure_sample_agreement(self, sample: str | os.PathLike = DEFAULT_DATASET,
                                 limit: int = SAMPLE_IMAGES) -> None:
        """Each model's top-1 agreement with the float model (as each runs) on the first `limit` test
        images of `sample`, stored as `sample_agreement` (a fraction)."""
        images, _ = deploy.load_test_images(sample, limit, image_size=self.image_size)
        top1 = {key: deploy.predict_top1(entry.run, images) for key, entry in self.models.items()}
        self.sample_size = len(images)
        for key, entry in self.models.items():
            entry.sample_agreement = deploy.top1_agreement(top1["fp"], top1[key]) if "fp" in top1 else None

    @property
    def keys(self) -> list[str]:
        return list(self.models)

    @property
    def titles(self) -> dict[str, str]:
        return {key: m.title for key, m in self.models.items()}

    def preprocess(self, image) -> torch.Tensor:
        return load_image(image, image_size=self.image_size, mean=self.mean, std=self.std)

    def predict(self, image) -> Prediction:
        """Softmax probabilities of every model for one image (see `load_image` for what `image` may
        be; raises ValueError with a message for the user when it is not a usable image)."""
        start = time.perf_counter()
        x = self.preprocess(image)
        preprocess_ms = (time.perf_counter() - start) * 1e3
        batch = x.numpy()
        probs, logits, latency = {}, {}, {}
        for key, entry in self.models.items():
            t0 = time.perf_counter()
            z = torch.from_numpy(entry.run(batch))[0].float()
            latency[key] = (time.perf_counter() - t0) * 1e3
            logits[key], probs[key] = z.tolist(), torch.softmax(z, dim=-1).tolist()
        return Prediction(class_names=self.class_names, probs=probs, logits=logits, latency_ms=latency,
                          preprocess_ms=preprocess_ms, titles=self.titles,
                          runtimes={key: entry.runtime for key, entry in self.models.items()})


# --------------------------------------------------------------------------------------------- images


def load_image(image, image_size: int = 32, mean: Sequence[float] = CIFAR10_MEAN,
               std: Sequence[float] = CIFAR10_STD, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """An upload -> normalised 1 x 3 x size x size float tensor.

    `image`: a file path, bytes, a PIL image, a H x W (x C) uint8 numpy array, or an already
    preprocessed 1 x 3 x H x W tensor (returned as is). Any PIL mode is converted (grayscale
    replicated, transparency onto white); EXIF rotation is applied; large JPEGs are decoded at a
    reduced scale. Raises ValueError with a message meant for the user for: no image, an empty
    file, a file that is not an image, an image over `max_pixels` pixels.
    """
    if isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[1] == 3:
            return image.float()
        raise ValueError(f"expected a 1 x 3 x H x W tensor, got shape {tuple(image.shape)}")
    if image is None:
        raise ValueError("No image: upload an image (PNG, JPEG, ...) or pick one of the examples.")
    name = "the upload"
    if isinstance(image, (str, os.PathLike)):
        name = f"'{Path(image).name}'"
        if not os.path.isfile(image):
            raise ValueError(f"No image: {name} does not exist.")
        if os.path.getsize(image) == 0:
            raise ValueError(f"The uploaded file {name} is empty (0 bytes): upload an image (PNG, JPEG, ...).")
    elif isinstance(image, (bytes, bytearray)):
        if len(image) == 0:
            raise ValueError("The uploaded file is empty (0 bytes): upload an image (PNG, JPEG, ...).")
        image = io.BytesIO(image)
    elif not isinstance(image, PILImage.Image):
        try:
            import numpy as np

            if isinstance(image, np.ndarray):
                image = PILImage.fromarray(image)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Could not read the array as an image: {err}") from err
    if not isinstance(image, PILImage.Image):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                image = PILImage.open(image)  # reads the header only
        except PILImage.DecompressionBombError as err:
            raise ValueError(f"The image {name} is too large to decode: {err}") from err
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{name[0].upper() + name[1:]} is not an image: could not read it as PNG, JPEG, "
                             f"GIF, BMP, WebP or any other image format PIL knows.") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"The image is too large: {width} x {height} = {width * height / 1e6:.0f} megapixels "
                         f"(at most {max_pixels / 1e6:.0f} megapixels); downscale it first.")
    if width == 0 or height == 0:
        raise ValueError(f"The image has no pixels (size {width} x {height}).")
    try:
        if image.format == "JPEG" and min(width, height) > 8 * image_size:
            image.draft("RGB", (4 * image_size, 4 * image_size))  # DCT-domain downscale: fast decode
        image = ImageOps.exif_transpose(image)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            return preprocess_pil(image, image_size=image_size, mean=mean, std=std)
    except ValueError:
        raise
    except (OSError, SyntaxError, TypeError, KeyError, PILImage.DecompressionBombError) as err:
        raise ValueError(f"{name[0].upper() + name[1:]} could not be decoded as an image "
                         f"(truncated or corrupt? {err})") from err


# --------------------------------------------------------------------------------------------- results


def top_k(probs: Sequence[float] | torch.Tensor, class_names: Sequence[str], k: int = 5) -> dict[str, float]:
    """The k most probable classes, most probable first: {class name: probability}."""
    values = torch.as_tensor(probs, dtype=torch.float64)
    k = min(k, values.numel())
    top = torch.topk(values, k)
    return {str(class_names[i]): float(v) for v, i in zip(top.values.tolist(), top.indices.tolist())}


def agreement(top1: Mapping[str, str], reference: str = "fp") -> dict[str, bool]:
    """For every model but the reference: does its top-1 class equal the reference's? ({} without one)."""
    if reference not in top1:
        return {}
    return {key: label == top1[reference] for key, label in top1.items() if key != reference}


def _human_bytes(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


SUMMARY_HEADERS = ["Model", "Runs on", "Top-1 (probability)", "Agrees with full precision",
                   "Agreement with full precision (test sample)", "Test accuracy (metrics.json)", "Latency (ms)",
                   "Weights on disk (bytes)", "Weights in memory (bytes)"]


def _bytes_cell(n: int | None, reference: int | None, what: str = "") -> str:
    """"250,689 (ONNX, 4.4x smaller)": bytes, the file kind, and the ratio to the float model's when smaller."""
    if n is None:
        return "unknown"
    parts = [what] if what else []
    if reference and 0 < n < reference:
        parts.append(f"{reference / n:.1f}x smaller")
    return f"{n:,}" + (f" ({', '.join(parts)})" if parts else "")


def summary_rows(models: ModelSet, prediction: Prediction | None = None) -> list[list[str]]:
    """One row per model (SUMMARY_HEADERS): where it runs; its top-1 class for this image and whether it
    agrees with the float model; its top-1 agreement with the float model on the test sample (measured at
    start-up); metrics.json test accuracy ("not measured" when absent); latency for this image; the bytes
    of the file its runtime loads (ONNX file or model.safetensors) and of the weights it holds in memory.
    Without a prediction, the per-image columns are empty."""
    fp = models.models.get("fp")
    top1 = prediction.top1 if prediction else {}
    agrees = prediction.agreement if prediction else {}
    rows = []
    for key, entry in models.models.items():
        accuracy = "not measured" if entry.accuracy is None else f"{100 * entry.accuracy:.2f}%"
        if key == "fp":
            sample = "reference"
        elif entry.sample_agreement is None:
            sample = "not measured"
        else:
            sample = f"{100 * entry.sample_agreement:.1f}% of {models.sample_size:,} images"
        if prediction is None:
            label = agree = latency = ""
        else:
            label = f"{top1[key]} ({max(prediction.probs[key]):.2f})"
            agree = "reference" if key == "fp" else ("n/a" if key not in agrees else
                                                     ("✓ yes" if agrees[key] else "✗ NO"))
            latency = f"{prediction.latency_ms[key]:.2f}"
        disk = _bytes_cell(entry.disk_bytes, fp.disk_bytes if fp and key != "fp" else None, entry.disk_file)
        memory = _bytes_cell(entry.memory_bytes, fp.memory_bytes if fp and key != "fp" else None)
        rows.append([entry.title, entry.runtime, label, agree, sample, accuracy, latency, disk, memory])
    return rows


def table_note(models: ModelSet) -> str:
    """What each column of the summary table measures, under the table."""
    sample = (f"top-1 agreement with the full-precision model on the first {models.sample_size:,} images of the "
              "shipped CIFAR-10 test sample, measured at start-up" if models.sample_size else "not measured")
    return ("Latency: this image, each model as it runs. Agreement on the test sample: " + sample + ". Test "
            "accuracy: the checkpoint's metrics.json (its PyTorch model on the full test set). Weights on disk: "
            "the file the runtime loads (ONNX file or model.safetensors); in memory: the weights the runtime "
            "holds (ONNX Runtime's optimised graph, or the PyTorch tensors).")


def runtime_markdown(models: ModelSet) -> str:
    """What runs where, for the top of the page: ONNX Runtime's integer kernels for the quantized models, or
    the fallback to PyTorch and why."""
    on_ort = [e.title for e in models.models.values() if e.runtime == ORT_RUNTIME]
    head = (f"**Runtime:** {', '.join(on_ort)} run as exported integer ONNX graphs on ONNX Runtime (CPU); "
            f"the other models on PyTorch." if on_ort else "**Runtime:** every model runs on PyTorch.")
    notes = "".join(f"\n\n⚠ {note}" for note in models.runtime_notes)
    return head + notes


def agreement_markdown(prediction: Prediction) -> str:
    """A one-paragraph verdict: where each quantized model agrees or disagrees with the float one."""
    top1, agrees, titles = prediction.top1, prediction.agreement, prediction.titles
    if "fp" not in top1:
        return "No full-precision model loaded: nothing to compare with."
    parts = []
    for key, same in agrees.items():
        title = titles.get(key, key)
        parts.append(f"✓ **{title}** agrees (*{top1[key]}*)" if same else
                     f"✗ **{title}** disagrees: *{top1[key]}*")
    n_same = sum(agrees.values())
    head = (f"Full precision says **{top1['fp']}**. {n_same} of {len(agrees)} quantized models agree. "
            f"All {len(top1)} models took {sum(prediction.latency_ms.values()):.1f} ms "
            f"(+ {prediction.preprocess_ms:.1f} ms decoding).")
    return head + "\n\n" + " · ".join(parts)


# --------------------------------------------------------------------------------------------- accuracy


def parse_benchmark_accuracy(data: Any) -> dict[str, dict[int | None, float]]:
    """{estimator: {bits: mean accuracy}} from `python -m benchmarks.pege_bench accuracy`'s accuracy.json (its "main" summary
    rows; ablations left out), with the full-precision model under "fp" / None."""
    if not isinstance(data, Mapping):
        return {}
    series: dict[str, dict[int | None, float]] = {}
    if data.get("fp_accuracy") is not None:
        series["fp"] = {None: float(data["fp_accuracy"])}
    for row in data.get("summary") or []:
        if row.get("variant") == "main":
            series.setdefault(row["estimator"], {})[int(row["bits"])] = float(row["mean"])
    return series


def accuracy_by_bits(models: ModelSet | None = None, benchmark_file: str | os.PathLike | None = None
                     ) -> tuple[dict[str, dict[int | None, float]], str]:
    """({method: {bits: accuracy fraction}}, where it came from): by default the loaded models' own
    metrics.json ("pege" by bits, fp under "fp"/None), the same numbers as the page's table; a benchmark
    file (`benchmarks/accuracy.json` of `python -m benchmarks.pege_bench accuracy`) only when one is given
    and holds numbers. The source is named by file name only (no path of the machine)."""
    if benchmark_file is not None and Path(benchmark_file).is_file():
        try:
            parsed = parse_benchmark_accuracy(json.loads(Path(benchmark_file).read_text()))
        except (OSError, ValueError):
            parsed = {}
        if parsed:
            return parsed, Path(benchmark_file).name
    series: dict[str, dict[int | None, float]] = {}
    for entry in (models.models.values() if models is not None else []):
        if entry.accuracy is None:
            continue
        if entry.w_bits is None:
            series.setdefault("fp", {})[None] = entry.accuracy
        else:
            series.setdefault("pege", {})[entry.w_bits] = entry.accuracy
    return series, "the models' metrics.json"


def accuracy_plot_label(source: str) -> str:
    """The accuracy plot's caption: test accuracy against bit width, and where it came from."""
    if source == "the models' metrics.json":
        return "Test accuracy vs bit width (the models in the table, from their metrics.json)"
    return f"Test accuracy vs bit width (from {source}, not the models in the table)"


def _figure(width: float, height: float, **margins):
    from matplotlib.figure import Figure  # the OO API: no pyplot state, safe across threads

    fig = Figure(figsize=(width, height), dpi=80)  # fixed margins: constrained layout triples the cost
    fig.subplots_adjust(**{"left": 0.1, "right": 0.98, "top": 0.88, "bottom": 0.2, **margins})
    return fig


def accuracy_figure(series: Mapping[str, Mapping[int | None, float]], bits: Sequence[int] = (2, 3, 4)):
    """Test accuracy (%) against weight/activation bit width, one line per method; full precision as a
    dashed line. A figure saying so when nothing was measured."""
    fig = _figure(6, 3.2, left=0.12, bottom=0.17, top=0.9)
    ax = fig.add_subplot()
    bits = sorted(set(bits) | {b for s in series.values() for b in s if b is not None})
    if not any(series.values()):
        ax.text(0.5, 0.5, "No accuracy measured yet\n(no benchmarks/accuracy.json, no metrics.json)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    for method, points in series.items():
        if method == "fp":
            continue
        xs = [b for b in bits if b in points]
        ax.plot(xs, [100 * points[b] for b in xs], marker="o", label=method.upper())
    if None in series.get("fp", {}):
        ax.axhline(100 * series["fp"][None], linestyle="--", color="gray",
                   label=f"full precision ({100 * series['fp'][None]:.1f}%)")
    ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
    ax.set_xlim(min(bits) - 0.3, max(bits) + 0.3)
    ax.set_xlabel("bit width (weights/activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def probability_figure(prediction: Prediction | Mapping[str, Any]):
    """Grouped bar chart: for each class, the probability every model gives it (a Prediction or its
    `to_dict()`)."""
    if not isinstance(prediction, Prediction):
        prediction = Prediction.from_dict(prediction)
    fig = _figure(8, 3, left=0.08, right=0.8, top=0.92, bottom=0.22)
    ax = fig.add_subplot()
    keys = prediction.keys
    n = len(prediction.class_names)
    width = 0.8 / max(len(keys), 1)
    colors = {"fp": "#4c4c4c", "w4": "#1f77b4", "w3": "#2ca02c", "w2": "#d62728"}
    for i, key in enumerate(keys):
        offset = (i - (len(keys) - 1) / 2) * width
        ax.bar([c + offset for c in range(n)], prediction.probs[key], width,
               label=prediction.titles.get(key, key), color=colors.get(key))
    ax.set_xticks(range(n), prediction.class_names, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


# --------------------------------------------------------------------------------------------- examples


def example_images(n: int = 12, dataset: str | os.PathLike = DEFAULT_DATASET,
                   out_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """`n` test images of the CIFAR-10 sample written as PNG files (one per class first, then more
    in order): [(path, class name)]. Files already there are reused."""
    import pyarrow.parquet as pq

    path = Path(dataset)
    parquet = path / "test.parquet" if path.is_dir() else path
    if not parquet.is_file():
        raise FileNotFoundError(f"no test.parquet in {dataset}")
    table = pq.read_table(parquet)
    class_names = list(CIFAR10_CLASSES)
    meta = (table.schema.metadata or {}).get(b"huggingface")
    image_col, label_col = "img", "label"
    if meta:
        features = json.loads(meta).get("info", {}).get("features", {})
        for name, spec in features.items():
            if isinstance(spec, Mapping) and spec.get("_type") == "Image":
                image_col = name
            if isinstance(spec, Mapping) and spec.get("_type") == "ClassLabel" and spec.get("names"):
                label_col, class_names = name, list(spec["names"])
    rows = min(len(table), 10 * max(n, 1) + 200)
    labels = table.column(label_col).slice(0, rows).to_pylist()
    chosen: list[int] = []
    for c in range(len(class_names)):  # one per class first
        if len(chosen) < n and c in labels:
            chosen.append(labels.index(c))
    for i in range(rows):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.gettempdir()) / "pege_demo_examples"
    out.mkdir(parents=True, exist_ok=True)
    images = table.column(image_col).slice(0, rows).to_pylist()
    result = []
    for rank, i in enumerate(chosen):
        name = class_names[labels[i]]
        file = out / f"{rank:02d}_{i:04d}_{name}.png"
        if not file.is_file():
            cell = images[i]
            data = cell.get("bytes") if isinstance(cell, Mapping) else cell
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            PILImage.open(io.BytesIO(data)).convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, file)
        result.append((str(file), name))
    return result


# --------------------------------------------------------------------------------------------- latency


def measure_latency(models: ModelSet, image=None, n: int = 50, warmup: int = 5,
                    fn: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Server-side time of `models.predict(image)` (or of `fn(image)`, e.g. the app's whole request
    handler) over `n` calls after `warmup`: median/p90/mean/min in ms, plus per-model medians.
    Default image: the first CIFAR-10 example (a 32x32 PNG), decoded on every call."""
    if image is None:
        image = example_images(1)[0][0]
    call = fn if fn is not None else models.predict
    for _ in range(warmup):
        call(image)
    times, per_model = [], {key: [] for key in models.keys}
    for _ in range(n):
        start = time.perf_counter()
        out = call(image)
        times.append((time.perf_counter() - start) * 1e3)
        if isinstance(out, Prediction):
            for key, ms in out.latency_ms.items():
                per_model[key].append(ms)
    times.sort()
    return {
        "n": n, "median_ms": statistics.median(times), "p90_ms": times[min(n - 1, int(0.9 * n))],
        "mean_ms": statistics.fmean(times), "min_ms": times[0],
        "per_model_median_ms": {k: statistics.median(v) for k, v in per_model.items() if v},
        "torch_threads": torch.get_num_threads(),
    }
