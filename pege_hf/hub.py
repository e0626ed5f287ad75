"""Model cards and uploads to the Hugging Face Hub: ``pege push``.

``render_model_card(dir)``  builds the README.md of a checkpoint folder from its config.json, its weight
                            files and (when a training run wrote one) its metrics.json; ``pege train``
                            calls it at the end of a run.
``push_to_hub(dir_or_model, repo_id)``  uploads a checkpoint folder (or a PreTrainedModel, saved to a
                            temporary folder first) with that card. The card is staged in a temporary
                            folder: nothing in the local checkpoint is written, moved or deleted.
``attach_model_card(model)`` makes transformers' own ``model.push_to_hub`` (and
                            ``save_pretrained(..., push_to_hub=True)``) upload the PEGE card instead of
                            transformers' generic one; the PEGE quantizer calls it on every model it sets up.

The card template is pege_hf/model_card_template.md (a huggingface_hub ModelCard jinja template).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .hf.quantizer import MODEL_HOOKS
from .quant.curriculum import AUTO_MASK
from .sources import SHIPPED_FP_MODEL, check_checkpoint_dir, is_hub_id
from .version import __version__

logger = logging.getLogger("pege_hf.hub")

__all__ = ["PushError", "attach_model_card", "render_model_card", "push_to_hub", "add_arguments", "main"]

_HERE = Path(__file__).resolve().parent
PACKAGED_TEMPLATE = _HERE / "model_card_template.md"  # the copy installed with the wheel
LM_TEMPLATE = _HERE / "model_card_template_lm.md"  # causal language models (task text-generation)
LICENSE = "apache-2.0"
LIBRARY_NAME = "pege-hf"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
# subfolders of a `pege train` output dir that are not part of the published model: resumable training
# state (optimizer, RNG) and the best epoch's model (the pushed model is the final one, which metrics.json
# describes)
PUSH_IGNORE = ["checkpoints/*", "best/*", ".tmp*", "**/.tmp*", ".train.lock"]
ESTIMATORS = {
    "pege": "PEGE (Progressive Element-wise Gradient Estimation)",
    "ste": "the straight-through estimator (STE)",
    "ewgs": "EWGS (element-wise gradient scaling)",
}
_CIFAR10_NAMES = re.compile(r"^cifar-?10([_-]sample)?$", re.IGNORECASE)


class PushError(RuntimeError):
    """An upload that could not be done (not logged in, offline, or the Hub refused or failed); the local
    checkpoint is unchanged."""


# ============================================================================ reading a checkpoint folder


def template_path(task: str | None = None) -> Path:
    """The card template shipped with the package (the causal-LM one for task text-generation)."""
    path = LM_TEMPLATE if task == "text-generation" else PACKAGED_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"model card template not found ({path}); reinstall pege-hf")
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON file ({what}): {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what})")
    return data


def weight_files(checkpoint_dir: Path) -> list[Path]:
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    return files or sorted(checkpoint_dir.glob("pytorch_model*.bin"))


def _same_weights(a: Path, b: Path) -> bool:
    """True when two checkpoint folders hold the same weights: the same weight files holding the same tensors
    (names, dtypes, shapes, bytes) and metadata. Tensors are compared, not file bytes: safetensors writes its
    header's metadata entries in no fixed order, so two saves of one model can differ byte-wise."""
    import torch
    from safetensors import safe_open

    fa, fb = weight_files(a), weight_files(b)
    if not fa or [f.name for f in fa] != [f.name for f in fb]:
        return False
    for x, y in zip(fa, fb):
        if x.suffix != ".safetensors":
            if not filecmp.cmp(x, y, shallow=False):
                return False
            continue
        with safe_open(x, framework="pt") as sx, safe_open(y, framework="pt") as sy:
            if sx.metadata() != sy.metadata() or set(sx.keys()) != set(sy.keys()):
                return False
            for key in sx.keys():
                tx, ty = sx.get_tensor(key), sy.get_tensor(key)
                if tx.dtype != ty.dtype or tx.shape != ty.shape or not torch.equal(tx, ty):
                    return False
    return True


def _local_dir(ref: str | None, *anchors: Path) -> Path | None:
    """``ref`` as an existing local folder (as given, or relative to one of ``anchors``), else None."""
    if not ref:
        return None
    candidates = [Path(ref).expanduser()] + [a / ref for a in anchors if not Path(ref).is_absolute()]
    return next((c for c in candidates if c.is_dir()), None)


def _hub_id(ref: str | None, *anchors: Path) -> str | None:
    """``ref`` when it can only be a Hub repo id (owner/name, not a local path), else None."""
    if not ref or _local_dir(ref, *anchors) is not None:
        return None
    return ref if is_hub_id(ref) else None


def _inspect_model(checkpoint_dir: Path, config: dict) -> dict[str, Any]:
    """The float architecture of the checkpoint, built from its config on the meta device (no weights are
    read): parameter and buffer counts of the dequantized model (``model.dequantize()`` turns each quantized
    layer back into a float layer of the same shape and keeps everything else), and which conv/linear layers
    the PEGE config quantizes (the quantizer's own rule, quant.modules.layers_to_skip)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification
    from transformers import AutoModelForSequenceClassification

    from .config import PEGEConfig
    from .hf.cifar import register_cifar_models
    from .quant.modules import QUANT_LAYERS, layers_to_skip

    register_cifar_models()
    arch = (config.get("architectures") or [""])[0]
    auto_class = (AutoModelForImageClassification if arch.endswith("ForImageClassification") else
                  AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else
                  AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel)
    hf_config = AutoConfig.from_pretrained(str(checkpoint_dir))
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    with torch.device("meta"):
        model = auto_class.from_config(hf_config)
    layers = [name for name, m in model.named_modules() if type(m) in QUANT_LAYERS]
    qc = config.get("quantization_config")
    skip = layers_to_skip(model, PEGEConfig.from_dict(qc)) if qc else set(layers)
    return {"params": sum(p.numel() for p in model.parameters()), "buffers": sum(b.numel() for b in model.buffers()),
            "quantized_layers": [n for n in layers if n not in skip], "float_layers": [n for n in layers if n in skip],
            "layers": layers}


# ============================================================================ formatting


def _pct(x) -> str:
    return f"{100 * float(x):.2f}%"


def _number(x) -> str:
    return f"{float(x):.4f}"


def _bytes(n: int) -> str:
    if n >= 1024**2:
        return f"{n:,} ({n / 1024**2:.2f} MiB)"
    return f"{n:,} ({n / 1024:.1f} KiB)"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _measured(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def command_text(command) -> str | None:
    """metrics.json's ``command`` (sys.argv of the run) as a shell line; only the program path is shortened
    (``/.../bin/pege`` -> ``pege``, ``/.../pege_hf/train.py`` -> ``python -m pege_hf.train``, the same for
    train_lm.py)."""
    if command is None:
        return None
    if isinstance(command, str):
        return command
    argv = [str(a) for a in command]
    if not argv:
        return None
    prog = argv[0].replace("\\", "/")
    if Path(prog).name in ("pege", "pege.exe") or prog.endswith("pege_hf/cli.py"):
        head = ["pege"]
    elif prog.endswith(("pege_hf/train.py", "pege_hf/train_lm.py")):
        head = ["python", "-m", "pege_hf." + Path(prog).stem]
    else:
        head = [argv[0]]
    return shlex.join(head + argv[1:])


def _arch_name(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type == "pege_cifar_resnet":
        return f"CIFAR ResNet-{config.get('depth', '?')}"
    if model_type == "pege_cifar_vgg":
        return "CIFAR VGG-small"
    return (config.get("architectures") or [model_type or "transformers model"])[0]


def _describe_dataset(ref: str | None, explicit: str | None, anchors) -> tuple[str | None, str, str]:
    """(Hub id for the metadata or None, text for the card, short name)."""
    from .data import DEFAULT_DATASET

    if explicit:
        return explicit, f"[{explicit}](https://huggingface.co/datasets/{explicit})", \
            "CIFAR-10" if explicit == CIFAR10_HUB_ID else explicit
    if not ref:
        return None, "unknown (no training record)", "unknown"
    hub = _hub_id(ref, *anchors)
    if hub:
        return hub, f"[{hub}](https://huggingface.co/datasets/{hub})", "CIFAR-10" if hub == CIFAR10_HUB_ID else hub
    path = Path(ref).expanduser()
    name = path.name or str(ref)
    if path.resolve() == Path(DEFAULT_DATASET).resolve():
        return CIFAR10_HUB_ID, (f"the CIFAR-10 sample shipped with pege-hf (`{name}`, a subset of CIFAR-10 in the "
                                f"schema of [{CIFAR10_HUB_ID}](https://huggingface.co/datasets/{CIFAR10_HUB_ID}))"), \
            "CIFAR-10 (pege-hf sample)"
    if _CIFAR10_NAMES.match(name):
        return CIFAR10_HUB_ID, (f"CIFAR-10, a local copy (`{name}`) in the schema of "
                                f"[{CIFAR10_HUB_ID}](https://huggingface.co/datasets/{CIFAR10_HUB_ID})"), "CIFAR-10"
    return None, f"a local data set (`{name}`)", name


def _describe_base(ref: str | None, explicit: str | None, metrics: dict | None, anchors) -> tuple[str | None, str]:
    """(Hub id for the metadata or None, text for the card)."""
    if explicit:
        return explicit, f"[{explicit}](https://huggingface.co/{explicit})"
    if not ref:
        if metrics is not None and metrics.get("arch"):
            return None, f"none: trained from scratch (`--arch {metrics['arch']}`)"
        return None, "unknown (no training record)"
    hub = _hub_id(ref, *anchors)
    if hub:
        return hub, f"[{hub}](https://huggingface.co/{hub})"
    local = _local_dir(ref, *anchors)
    name = Path(ref).name or ref
    if local is not None and local.resolve() == SHIPPED_FP_MODEL.resolve():
        return None, f"the full-precision CIFAR ResNet-20 shipped with pege-hf (`{name}`)"
    return None, f"a local float checkpoint (`{name}`)"


def _base_run_metrics(base_ref: str | None, anchors) -> dict | None:
    """The metrics.json of the float base's own training run (a local folder), else None."""
    base_dir = _local_dir(base_ref, *anchors)
    if base_dir is None or not (base_dir / "metrics.json").is_file():
        return None
    try:
        return _read_json(base_dir / "metrics.json", "the base model's training metrics")
    except ValueError:
        return None


def _base_accuracy(metrics: dict, base_ref: str | None, anchors) -> dict | None:
    """The float base's measured accuracy: metrics.json's base_accuracy, else the base folder's own
    metrics.json. None when neither has one."""
    if _measured(metrics.get("base_accuracy")):
        return {"accuracy": metrics["base_accuracy"], "top5": metrics.get("base_top5"),
                "loss": metrics.get("base_loss"), "source": "this checkpoint's metrics.json (`base_accuracy`)"}
    base = _base_run_metrics(base_ref, anchors)
    if base is None or not _measured(base.get("accuracy")):
        return None
    same = all(base.get(k) == metrics.get(k) for k in ("dataset", "num_test", "max_test", "seed", "test_split"))
    source = (f"the base model's own training run (its metrics.json, {base.get('num_test', '?')} test images"
              + ("; the same test set as above)" if same else "; a different test set than above, so the two rows "
                 "are not directly comparable)"))
    return {"accuracy": base["accuracy"], "top5": base.get("top5"), "loss": base.get("loss"), "source": source}


def _training_facts(m: dict) -> list[str]:
    facts = []
    if m.get("epochs") is not None:
        line = f"{m['epochs']:.3g} epoch{'s' if m['epochs'] != 1 else ''}"
        if m.get("steps") is not None:
            line += f", {m['steps']:,} optimizer steps"
        if m.get("batch_size") is not None:
            line += f", batch size {m['batch_size']} per process"
            if (m.get("world_size") or 1) > 1:
                line += f" x {m['world_size']} processes"
            if (m.get("gradient_accumulation_steps") or 1) > 1:
                line += f" x {m['gradient_accumulation_steps']} accumulation steps"
        facts.append(line)
    if m.get("optimizer"):
        line = f"optimizer {m['optimizer']}"
        for key, label in (("lr", "learning rate"), ("weight_decay", "weight decay")):
            if m.get(key) is not None:
                line += f", {label} {m[key]:g}"
        if m.get("scheduler"):
            line += f", {m['scheduler']} schedule"
            if m.get("warmup_steps"):
                line += f" with {m['warmup_steps']} warm-up step{'s' if m['warmup_steps'] != 1 else ''}"
        facts.append(line)
    if m.get("num_train") is not None:
        facts.append(f"{m['num_train']:,} training images, {m.get('num_test', '?'):,} test images"
                     if isinstance(m.get("num_test"), int) else f"{m['num_train']:,} training images")
    if m.get("train_tokens") is not None:
        facts.append(f"{m['train_blocks']:,} training blocks of {m['block_size']} tokens ({m['train_tokens']:,} tokens); "
                     f"validation: {m.get('validation_tokens', 0):,} tokens ({m.get('validation_split')})")
    if m.get("seed") is not None:
        facts.append(f"seed {m['seed']}")
    if m.get("wall_time_s") is not None:
        where = f" on {m['device']}" if m.get("device") else ""
        if (m.get("world_size") or 1) > 1:
            where += f" ({m['world_size']} processes)"
        facts.append(f"wall time {_duration(m['wall_time_s'])}{where}")
    versions = ", ".join(f"{name} {m[key]}" for key, name in (("pege_hf", "pege-hf"), ("torch", "torch"))
                         if m.get(key))
    if versions:
        facts.append(versions)
    if m.get("resumed_from"):
        facts.append("resumed once from a checkpoint of the same run")
    return facts


# ============================================================================ the card


def _quantization_of(ckpt: Path, config: dict) -> dict:
    """What the checkpoint is: its PEGE config (or None), bit label and estimator."""
    qc = config.get("quantization_config") or None
    quantized = bool(qc) and qc.get("quant_method") == "pege"
    if qc and not quantized:
        raise ValueError(f"{ckpt} holds a {qc.get('quant_method')!r}-quantized checkpoint; pege-hf writes cards for "
                         "float and PEGE checkpoints only")
    w_bits = qc.get("w_bits") if quantized else None
    a_bits = qc.get("a_bits") if quantized else None
    return {"qc": qc if quantized else {}, "quantized": quantized, "w_bits": w_bits, "a_bits": a_bits,
            "bits_label": f"W{w_bits}A{a_bits if a_bits is not None else 32}" if quantized else "FP32",
            "estimator": qc.get("estimator", "pege") if quantized else None}


def _task_of(config: dict) -> str | None:
    arch = (config.get("architectures") or [""])[0]
    return ("image-classification" if arch.endswith("ForImageClassification") else
            "text-classification" if arch.endswith("ForSequenceClassification") else
            "text-generation" if arch.endswith("ForCausalLM") else None)


def _inspect_safely(ckpt: Path, config: dict) -> dict:
    try:
        return _inspect_model(ckpt, config)
    except Exception as e:  # noqa: BLE001 - the card says what could not be computed, and why
        logger.warning("could not build the architecture of %s to count its parameters: %s", ckpt, e)
        return {"error": f"{type(e).__name__}: {e}"}


def _sizes(ckpt: Path, m: dict, inspected: dict, quantized: bool) -> dict:
    """Checkpoint bytes on disk, the float32 size (and how it was found), their ratio."""
    weights = weight_files(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in weights)
    if isinstance(m.get("float_size_bytes"), int):
        float_bytes = m["float_size_bytes"]
        float_how = "The float32 size is `float_size_bytes` from this checkpoint's metrics.json."
    elif "params" in inspected:
        float_bytes = 4 * (inspected["params"] + inspected["buffers"])
        float_how = (f"The float32 size is computed, not measured on a file: the dequantized model "
                     f"(`model.dequantize()`) has {inspected['params']:,} parameters and {inspected['buffers']:,} "
                     f"buffer elements, x 4 bytes = {float_bytes:,} bytes (a float safetensors file adds a small "
                     f"header). The checkpoint size is the size of its weight files on disk.")
    else:
        float_bytes = None
        float_how = f"The float32 size could not be computed ({inspected.get('error')})."
    return {"weight_files_text": ", ".join(f.name for f in weights) or "none found",
            "checkpoint_size": _bytes(ckpt_bytes), "float_size": _bytes(float_bytes) if float_bytes else "unknown",
            "ratio": f"{float_bytes / ckpt_bytes:.1f}" if float_bytes and ckpt_bytes and quantized else None,
            "float_size_how": float_how}


def _card_data(q: dict, task, accuracy, ds: tuple, base_id, num_test, title):
    """The card's YAML metadata: tags, data set, base model, the measured accuracy as an eval result."""
    from huggingface_hub import EvalResult, ModelCardData

    ds_id, _, ds_name = ds
    tags = ["pege", "pege-hf"]
    if q["quantized"]:
        tags += ["quantization", "qat", q["bits_label"].lower(), f"{q['w_bits']}-bit"]
        tags += [q["estimator"]] if q["estimator"] != "pege" else []
    else:
        tags.append("full-precision")
    tags += [task] if task else []
    eval_results = None
    if accuracy is not None and task:
        eval_results = [EvalResult(
            task_type=task, dataset_type=ds_id or ds_name, dataset_split="test",
            dataset_name=ds_name + (f", {num_test:,} test images" if isinstance(num_test, int) else ""),
            metric_type="accuracy", metric_name="Top-1 accuracy", metric_value=float(accuracy))]
    return ModelCardData(
        library_name=LIBRARY_NAME, license=LICENSE, tags=tags, pipeline_tag=task,
        datasets=[ds_id] if ds_id else None, base_model=base_id,
        base_model_relation="quantized" if (base_id and q["quantized"]) else None,
        metrics=["accuracy"] if eval_results else None, model_name=title if eval_results else None,
        eval_results=eval_results)


def _model_texts(config: dict, q: dict, inspected: dict) -> dict:
    """The card's sentences about the model: labels, parameters, what stays float, the curriculum."""
    qc = q["qc"]
    labels = [v for _, v in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    labels_text = (f"{len(labels)} classes: " + ", ".join(map(str, labels[:20])) + (", ..." if len(labels) > 20 else "")
                   if labels else "unknown")
    if "params" in inspected:
        num_params_text = f"{inspected['params']:,} parameters"
        if q["quantized"]:
            num_params_text += (f"; {len(inspected['quantized_layers'])} of {len(inspected['layers'])} conv/linear "
                                "layers quantized")
        kept = [f"`{n}`" for n in inspected["float_layers"]] or ["no conv/linear layer"]
    else:  # the config's rule, in words
        num_params_text = "parameter count unknown"
        kept = [label for flag, label in ((qc.get("skip_stem"), "the first layer"), (qc.get("skip_head"), "the head"))
                if flag] + [f"`{n}`" for n in (qc.get("modules_to_not_convert") or [])] if q["quantized"] else []
    if q["quantized"] and q["estimator"] == "pege":
        curriculum_text = (f"{qc.get('curriculum')} r(t) (alpha {qc.get('alpha')}, reaches 1 after "
                           f"{100 * float(qc.get('ramp_fraction', 0)):.0f}% of training); masks: "
                           f"{qc.get('w_mask')} (weights), {_mask_text(qc.get('a_mask'))} (activations); discretization "
                           f"lambda {qc.get('discretization_lambda')} ({qc.get('lambda_schedule')})")
    else:
        curriculum_text = "none (every element is quantized from the first step)"
    return {"labels_text": labels_text, "num_params_text": num_params_text, "curriculum_text": curriculum_text,
            "kept_float_text": ", ".join(kept or ["no conv/linear layer"]) + (
                "; the token embeddings, norms, biases and other non-Linear operations stay float as well"
                if _task_of(config) == "text-generation" else
                "; BatchNorm, biases and other non-conv/linear operations stay float32")}


def _accuracy_texts(m: dict, accuracy, base_acc) -> dict:
    measured_number = lambda d, k: _number(d[k]) if d and isinstance(d.get(k), (int, float)) else "not measured"  # noqa: E731
    return {
        "accuracy": _pct(accuracy) if accuracy is not None else None,
        "top5": _pct(m["top5"]) if _measured(m.get("top5")) else "not measured",
        "loss": measured_number(m, "loss"),
        "base_accuracy": _pct(base_acc["accuracy"]) if base_acc else None,
        "base_top5": _pct(base_acc["top5"]) if base_acc and _measured(base_acc.get("top5")) else "not measured",
        "base_loss": measured_number(base_acc, "loss"),
        "base_accuracy_source": base_acc["source"] if base_acc else None,
    }


def _mask_text(policy) -> str:
    if policy == AUTO_MASK:
        return "auto (hashed counter masks under compiled kernels, random-byte Bernoulli masks otherwise)"
    return str(policy)


def build_model_card(checkpoint_dir: str | os.PathLike, metrics: dict | None, *, base_model: str | None = None,
                     dataset: str | None = None, repo_id: str | None = None):
    """The ModelCard of a checkpoint folder, given its training metrics (None: not measured)."""
    from huggingface_hub import ModelCard

    ckpt = check_checkpoint_dir(checkpoint_dir)
    anchors = (ckpt, ckpt.parent, Path.cwd())
    config = _read_json(ckpt / "config.json", "the model config")
    q, m, task = _quantization_of(ckpt, config), metrics or {}, _task_of(config)
    title = (repo_id.split("/")[-1] if repo_id else None) or ckpt.resolve().name
    inspected = _inspect_safely(ckpt, config)
    ds = _describe_dataset(m.get("dataset"), dataset, anchors)
    base_id, base_text = _describe_base(m.get("base_model"), base_model, metrics, anchors)
    accuracy = m.get("accuracy") if _measured(m.get("accuracy")) else None
    base_acc = _base_accuracy(m, m.get("base_model"), anchors) if accuracy is not None else None
    num_test = m.get("num_test")
    if task == "text-generation":
        return _lm_card(ckpt, config, m, q, inspected, ds, (base_id, base_text), title, repo_id, metrics is not None)
    variables = dict(
        title=title, has_metrics=metrics is not None, quantized=q["quantized"], bits_label=q["bits_label"],
        w_bits=q["w_bits"], a_bits=q["a_bits"], estimator=q["estimator"],
        estimator_long=ESTIMATORS.get(q["estimator"], q["estimator"]),
        w_quantizer=q["qc"].get("w_quantizer"), a_quantizer=q["qc"].get("a_quantizer"),
        arch_name=_arch_name(config), base_model_text=base_text, dataset_text=ds[1],
        eval_text=f"test split of {ds[1]}" + (f" ({num_test:,} images)" if isinstance(num_test, int) else ""),
        model_ref=repo_id or str(checkpoint_dir), command=command_text(m.get("command")),
        training_facts=_training_facts(m), pege_hf_version=__version__,
        **_model_texts(config, q, inspected), **_accuracy_texts(m, accuracy, base_acc),
        **_sizes(ckpt, m, inspected, q["quantized"]))
    if not can_render_cards():
        raise ImportError("model cards need jinja2: pip install 'pege-hf[hub]'")
    card_data = _card_data(q, task, accuracy, ds, base_id, num_test, title)
    return ModelCard.from_template(card_data, template_path=str(template_path()), **variables)


def _lm_card_data(q: dict, perplexity, ds: tuple, base_id, title):
    """The YAML metadata of a causal LM's card: pipeline_tag text-generation, perplexity as an eval result."""
    from huggingface_hub import EvalResult, ModelCardData

    ds_id, _, ds_name = ds
    tags = ["pege", "pege-hf", "text-generation", "causal-lm"]
    tags += (["quantization", "qat", q["bits_label"].lower(), f"{q['w_bits']}-bit"] + (
        [q["estimator"]] if q["estimator"] != "pege" else [])) if q["quantized"] else ["full-precision"]
    results = [EvalResult(task_type="text-generation", dataset_type=ds_id or ds_name, dataset_name=ds_name,
                          dataset_split="validation", metric_type="perplexity", metric_name="Perplexity",
                          metric_value=float(perplexity))] if perplexity is not None else None
    return ModelCardData(
        library_name=LIBRARY_NAME, license=LICENSE, tags=tags, pipeline_tag="text-generation",
        datasets=[ds_id] if ds_id else None, base_model=base_id,
        base_model_relation="quantized" if (base_id and q["quantized"]) else None,
        metrics=["perplexity"] if results else None, model_name=title if results else None, eval_results=results)


def _base_perplexity(m: dict, anchors) -> dict | None:
    """The float base's perplexity from its own metrics.json (a local `pege train-lm` run), else None."""
    base = _base_run_metrics(m.get("base_model"), anchors)
    if base is None or not isinstance(base.get("perplexity"), (int, float)):
        return None
    same = all(base.get(k) == m.get(k) for k in ("dataset", "validation_split", "block_size", "validation_tokens"))
    source = ("the base model's own training run (its metrics.json"
              + ("; the same validation tokens)" if same else "; other validation tokens, so the rows are not "
                 "directly comparable)"))
    return {"loss": _number(base["loss"]), "perplexity": f"{base['perplexity']:.3f}", "source": source}


def _lm_card(ckpt: Path, config: dict, m: dict, q: dict, inspected: dict, ds: tuple, base: tuple, title: str,
             repo_id: str | None, has_metrics: bool):
    """The ModelCard of a causal language model (template model_card_template_lm.md)."""
    from huggingface_hub import ModelCard

    perplexity = m.get("perplexity") if isinstance(m.get("perplexity"), (int, float)) else None
    base_ppl = _base_perplexity(m, (ckpt, ckpt.parent, Path.cwd())) if perplexity is not None else None
    tokens = m.get("validation_tokens")
    variables = dict(
        title=title, has_metrics=has_metrics, quantized=q["quantized"], bits_label=q["bits_label"],
        w_bits=q["w_bits"], a_bits=q["a_bits"], estimator=q["estimator"], group_size=q["qc"].get("group_size"),
        estimator_long=ESTIMATORS.get(q["estimator"], q["estimator"]),
        w_quantizer=q["qc"].get("w_quantizer"), a_quantizer=q["qc"].get("a_quantizer"),
        arch_name=_arch_name(config), base_model_text=base[1], dataset_text=ds[1],
        eval_text=f"the validation split of {ds[1]}" + (f" ({tokens:,} predicted tokens)" if tokens else ""),
        perplexity=f"{perplexity:.3f}" if perplexity is not None else None,
        loss=_number(m["loss"]) if perplexity is not None else None,
        base_perplexity=base_ppl["perplexity"] if base_ppl else None, base_loss=base_ppl["loss"] if base_ppl else None,
        base_source=base_ppl["source"] if base_ppl else None,
        model_ref=repo_id or str(ckpt), command=command_text(m.get("command")), training_facts=_training_facts(m),
        pege_hf_version=__version__, **_model_texts(config, q, inspected), **_sizes(ckpt, m, inspected, q["quantized"]))
    if not can_render_cards():
        raise ImportError("model cards need jinja2: pip install 'pege-hf[hub]'")
    card_data = _lm_card_data(q, perplexity, ds, base[0], title)
    return ModelCard.from_template(card_data, template_path=str(template_path("text-generation")), **variables)


def can_render_cards() -> bool:
    """Whether jinja2 (the `hub` extra), which huggingface_hub renders card templates with, is installed."""
    import importlib.util

    return importlib.util.find_spec("jinja2") is not None


def render_model_card(checkpoint_dir: str | os.PathLike, *, base_model: str | None = None,
                      dataset: str | None = None, write: bool = True, repo_id: str | None = None):
    """The model card of a checkpoint folder, from its config.json, weight files and metrics.json (optional:
    without it the card says the accuracy was not measured). ``base_model`` / ``dataset``: Hub ids for the
    metadata (default: from metrics.json, when those are Hub ids). ``repo_id``: used in the card's loading
    snippet. With ``write``, saves it as README.md in the folder. Returns the huggingface_hub ModelCard."""
    ckpt = check_checkpoint_dir(checkpoint_dir)
    metrics_file = ckpt / "metrics.json"
    metrics = _read_json(metrics_file, "training metrics") if metrics_file.is_file() else None
    card = build_model_card(ckpt, metrics, base_model=base_model, dataset=dataset, repo_id=repo_id)
    if write:
        card.save(ckpt / "README.md")
    return card


def _source_of(model, saved_dir: Path) -> tuple[dict | None, str | None]:
    """For a model object saved into ``saved_dir``: the metrics.json there, else that of the folder the model
    was loaded from, but only when the weights just saved equal that folder's (then the metrics describe
    exactly these weights); and its float base (the source it was quantized from, when it was not loaded
    pre-quantized)."""
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    quantizer = getattr(model, "hf_quantizer", None)
    pre_quantized = bool(getattr(quantizer, "pre_quantized", False))
    metrics = None
    if (saved_dir / "metrics.json").is_file():
        metrics = _read_json(saved_dir / "metrics.json", "training metrics")
    elif source and Path(source).is_dir() and (Path(source) / "metrics.json").is_file() and _same_weights(
            Path(source), saved_dir):
        metrics = _read_json(Path(source) / "metrics.json", "training metrics")
    base = source if (source and quantizer is not None and not pre_quantized) else None
    return metrics, base


# ============================================================================ upload


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stage(src: Path, dst: Path, ignore: list[str]) -> list[str]:
    """Mirror ``src`` into ``dst`` with symlinks (copies where links are not possible), without README.md
    and the ``ignore`` patterns. Returns the relative paths staged."""
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    staged = [f for f in filter_repo_objects(files, ignore_patterns=ignore) if f != "README.md"]
    for rel in staged:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to((src / rel).resolve())
        except OSError:
            shutil.copy2(src / rel, target)
    return staged


def _check_push(model_or_dir, repo_id: str, token: str | None, base_model: str | None = None,
                dataset: str | None = None) -> tuple[Path | None, str]:
    """Everything a push needs, checked before any network call: the local input, the repo id, the card's
    base_model / dataset (Hub ids: the card links and tags them), the token and offline mode. Returns
    (checkpoint folder or None for a model, token)."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ckpt = None
    if isinstance(model_or_dir, (str, os.PathLike)):
        ckpt = check_checkpoint_dir(model_or_dir)
    elif not hasattr(model_or_dir, "save_pretrained"):
        raise TypeError(f"push_to_hub takes a checkpoint folder or a transformers PreTrainedModel, got "
                        f"{type(model_or_dir).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"invalid repo id {repo_id!r}: expected 'owner/name' ({_one_line(e)})") from None
    for flag, value in (("--base-model", base_model), ("--dataset", dataset)):
        if value is not None and not is_hub_id(value):
            raise ValueError(f"{flag} {value!r} is not a Hub id (owner/name): the card links it on the Hub; leave it "
                             "out to describe a local one from the training record")
    token = token or get_token()
    if not token:
        raise PushError("not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN, or pass "
                        "--token / token=) with a token that can write to " + repr(repo_id))
    if _offline():
        raise PushError("offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE to push to the Hub")
    return ckpt, token


def push_to_hub(model_or_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None, endpoint: str | None = None, base_model: str | None = None,
                dataset: str | None = None) -> str:
    """Upload a PEGE (or float) checkpoint folder, or a PreTrainedModel, to the Hub repo ``repo_id`` with its
    model card; returns the repo URL.

    Order: the local input is checked, then the token (``token``, else the one ``hf auth login`` stored or
    HF_TOKEN), then offline mode (HF_HUB_OFFLINE), all before any network call; then the card is rendered
    into a temporary staging folder (the checkpoint folder itself is never written), the repo is created
    (``exist_ok``) and the folder uploaded in one commit. Raises PushError for a missing token, offline mode
    or any Hub failure; pushing again after a failure is safe."""
    from huggingface_hub import HfApi

    is_dir = isinstance(model_or_dir, (str, os.PathLike))
    ckpt, token = _check_push(model_or_dir, repo_id, token, base_model, dataset)
    api = HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="pege-push-") as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        # ---- 4. the files and the card, staged
        if is_dir:
            staged = _stage(ckpt, stage, PUSH_IGNORE)
            metrics = _read_json(ckpt / "metrics.json", "training metrics") if (ckpt / "metrics.json").is_file() \
                else None
            card_dir, source_base = ckpt, None
        else:
            card_dir = Path(tmp) / "model"
            model_or_dir.save_pretrained(card_dir)
            metrics, source_base = _source_of(model_or_dir, card_dir)
            staged = _stage(card_dir, stage, PUSH_IGNORE)
        if base_model is None and source_base is not None and _hub_id(source_base):
            base_model = source_base
        card = build_model_card(card_dir, metrics, base_model=base_model, dataset=dataset, repo_id=repo_id)
        card.save(stage / "README.md")
        # ---- 5. network
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_url.repo_id, folder_path=stage,
                commit_message=commit_message or f"Upload {card_dir.name if is_dir else 'model'} with pege-hf")
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - every Hub/transport failure becomes one clear error
            status = getattr(getattr(e, "response", None), "status_code", None)
            hint = {401: " The Hub rejected the token: check it with `hf auth whoami`, or log in again with "
                         "`hf auth login`.",
                    403: f" The token cannot write to {repo_id.split('/')[0]!r}: use a token with write access "
                         "to that namespace."}.get(status, "")
            raise PushError(f"push to {api.endpoint}/{repo_id} failed: {_one_line(e)}.{hint} The local checkpoint "
                            "is unchanged; run the same push again to retry") from e
    logger.info("pushed %d files + README.md to %s (%s)", len(staged), repo_url, getattr(info, "commit_url", ""))
    return str(repo_url)


# ============================================================================ transformers' push_to_hub


class _PEGECardOnPush:
    """Set as ``model._upload_modified_files``: transformers' ``push_to_hub`` and
    ``save_pretrained(push_to_hub=True)`` save the model and transformers' generic README.md into a folder
    and then call ``self._upload_modified_files(folder, repo_id, ...)``; this writes the PEGE card over that
    README first, then hands over to transformers' own method. A plain object holding the model (not a
    bound method), so the model still pickles and deep-copies."""

    def __init__(self, model):
        self.model = model

    def __call__(self, working_dir, repo_id, *args, **kwargs):
        try:
            folder = Path(working_dir)
            metrics, base = _source_of(self.model, folder)
            card = build_model_card(folder, metrics, base_model=base if _hub_id(base) else None, repo_id=repo_id)
            card.save(folder / "README.md")
        except Exception as e:  # noqa: BLE001 - never block an upload over its card
            logger.warning("pege-hf could not render its model card (%s); transformers' default card is uploaded", e)
        return type(self.model)._upload_modified_files(self.model, working_dir, repo_id, *args, **kwargs)


def attach_model_card(model) -> None:
    """Make ``model.push_to_hub`` (transformers) upload the PEGE model card. Idempotent; a no-op for objects
    without transformers' push machinery."""
    if hasattr(type(model), "_upload_modified_files") and not isinstance(
            model.__dict__.get("_upload_modified_files"), _PEGECardOnPush):
        model._upload_modified_files = _PEGECardOnPush(model)


MODEL_HOOKS.append(attach_model_card)


# ============================================================================ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Upload a checkpoint folder (written by `pege train` or save_pretrained) to the Hugging Face Hub, with a\n"
        "model card built from its config.json and metrics.json (bits, estimator, measured accuracy, size, the\n"
        "training command). The local folder is not modified. Log in first with `hf auth login` (or set HF_TOKEN,\n"
        "or pass --token).")
    parser.epilog = ("examples:\n"
                     "  pege push runs/resnet20-w2a2-pege me/resnet20-cifar10-w2a2-pege\n"
                     "  pege push runs/resnet20-w2a2-pege me/resnet20-w2a2 --private \\\n"
                     "      --base-model me/resnet20-cifar10\n")
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR", help="the checkpoint folder (with config.json)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, owner/name (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` saved, or HF_TOKEN)")
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--base-model", default=None, metavar="ID",
                        help="Hub id of the float model it was quantized from, for the card's base_model (default: "
                             "from metrics.json when that is a Hub id)")
    parser.add_argument("--dataset", default=None, metavar="ID",
                        help="Hub id of the training data set, for the card (default: from metrics.json)")
    parser.add_argument("--commit-message", default=None, help="commit message")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        url = push_to_hub(args.checkpoint_dir, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.commit_message, endpoint=args.endpoint, base_model=args.base_model,
                          dataset=args.dataset)
    except (FileNotFoundError, ValueError, TypeError) as e:  # bad input: exit 2, as argparse does
        print(f"pege push: error: {_one_line(e, 1000)}", file=sys.stderr)
        return 2
    except PushError as e:  # the Hub or the login: exit 1
        print(f"pege push: error: {_one_line(e, 1000)}", file=sys.stderr)
        return 1
    print(f"pushed {args.checkpoint_dir} to {url}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pege_hf.hub")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
