"""`pege bench deploy` and pege_hf.deploy: the result's structure, and its agreement/accuracy numbers and
bytes against an independent run (our own export_onnx, ONNX Runtime session and preprocessing)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pege_hf
from pege_hf import cli, deploy
from pege_hf.export.onnx import optimized_ops
from pege_hf.data import CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATASET
from pege_hf.sources import SHIPPED_MODELS_DIR

ort = pytest.importorskip("onnxruntime")
N_IMAGES = 48


def _sample(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n test images of the shipped sample, decoded and normalised here with numpy (not pege_hf.data)."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{DEFAULT_DATASET}/test.parquet").slice(0, n).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(r["img"]["bytes"])).convert("RGB"), dtype=np.float64)
                       for r in table])
    x = (pixels / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    return x.transpose(0, 3, 1, 2).astype(np.float32), np.array([r["label"] for r in table])


def _torch_top1(folder, x):
    model = pege_hf.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(x)).logits.argmax(1).numpy()


def test_bench_deploy_cli_numbers_match_an_independent_run(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["bench", "deploy", "--images", str(N_IMAGES), "--bits", "2", "--batches", "1", "4", "--repeats", "2",
            "--threads", "1", "--out", str(out), "--cache-dir", str(cache)]
    assert cli.main(argv) == 0
    result = json.loads((out / "deploy.json").read_text())
    names = ["pytorch-fp", "ort-fp32", "ort-qdq-int8", "ort-int-w2a2", "pytorch-fakequant-w2a2"]
    assert (result["benchmark"], result["images"], result["batches"], result["bits"]) == ("deploy", N_IMAGES, [1, 4], [2])
    assert list(result["bytes"]) == names and set(result["latency_ms"]) == {"1", "4"}
    assert all(list(result["latency_ms"][b]) == names and min(result["latency_ms"][b].values()) > 0 for b in ("1", "4"))
    assert set(result["quality"]) == {"w2a2", "int8_reference", "fp"} and set(result["load_average_1min"]) == {"start", "end"}
    table = (out / "deploy.md").read_text()
    assert "| ort-int-w2a2 |" in table and "| W2A2 |" in table and table in capsys.readouterr().out
    assert (out / "deploy.png").read_bytes()[:4] == b"\x89PNG"

    # independent: our own preprocessing, export and session; the fresh PyTorch models
    x, labels = _sample(N_IMAGES)
    w2, fp = SHIPPED_MODELS_DIR / "resnet20-pege-w2a2", SHIPPED_MODELS_DIR / "resnet20-fp"
    report = pege_hf.export_onnx(pege_hf.from_pretrained(str(w2)).eval(), tmp_path / "w2a2.onnx")
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    ort_top1 = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    fake_top1, fp_top1 = _torch_top1(w2, x), _torch_top1(fp, x)
    q = result["quality"]["w2a2"]
    assert q["agreement"] == pytest.approx(np.mean(ort_top1 == fake_top1), abs=1e-12)
    assert q["accuracy_ort"] == pytest.approx(np.mean(ort_top1 == labels), abs=1e-12)
    assert q["accuracy_fakequant"] == pytest.approx(np.mean(fake_top1 == labels), abs=1e-12)
    assert q["agreement_with_fp"] == pytest.approx(np.mean(ort_top1 == fp_top1), abs=1e-12)
    assert result["quality"]["fp"]["accuracy_pytorch"] == pytest.approx(np.mean(fp_top1 == labels), abs=1e-12)
    # the int8 reference: ONNX Runtime's own QDQ model, which it runs on QLinearConv, close to FP but not equal
    # sessions take turns without busy-waiting (the spinning threads of one would slow the next)
    options = deploy.onnx_session(report.path).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    [qdq] = cache.glob("*-qdq-int8-*.onnx")
    assert {op for _, op in optimized_ops(qdq)} >= {"QLinearConv", "QLinearAdd"}
    session = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
    qdq_logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    qdq_top1 = qdq_logits.argmax(1)
    ref = result["quality"]["int8_reference"]
    assert ref["agreement_with_fp"] == pytest.approx(np.mean(qdq_top1 == fp_top1), abs=1e-12)
    assert ref["accuracy"] == pytest.approx(np.mean(qdq_top1 == labels), abs=1e-12)
    assert ref["agreement_with_fp"] > 0.8
    with torch.no_grad():  # 8-bit activations: near the FP logits, not equal to them
        fp_logits = pege_hf.from_pretrained(str(fp)).eval()(torch.from_numpy(x)).logits.numpy()
    gap = np.abs(qdq_logits - fp_logits).max()
    assert gap > 1e-3
    # bytes: the files themselves; ONNX Runtime holds the W2A2 codes as int8, the float model as fp32
    sizes = result["bytes"]
    assert sizes["ort-int-w2a2"]["disk"] == report.bytes
    assert sizes["pytorch-fp"]["disk"] == (fp / "model.safetensors").stat().st_size
    assert sizes["pytorch-fakequant-w2a2"]["disk"] == (w2 / "model.safetensors").stat().st_size
    fp_model = pege_hf.from_pretrained(str(fp))
    weights = sum(p.numel() for n, p in fp_model.named_parameters() if n.endswith("weight") and p.dim() > 1)
    assert sizes["pytorch-fp"]["memory"] == sum(t.numel() * 4 for t in fp_model.state_dict().values()
                                                if t.dtype == torch.float32) + 8 * sum(
        t.numel() for t in fp_model.state_dict().values() if t.dtype == torch.int64)
    assert 4 * weights <= sizes["ort-fp32"]["memory"] < 4 * weights * 1.05
    assert weights <= sizes["ort-int-w2a2"]["memory"] < sizes["ort-fp32"]["memory"] / 3


def test_exports_are_cached_by_the_checkpoint_files(tmp_path, monkeypatch):
    folder = SHIPPED_MODELS_DIR / "resnet20-fp"
    first = deploy.cached_onnx_export(folder, tmp_path)
    assert first.name.startswith("resnet20-fp-fp32-") and first.is_file()

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(deploy, "torch_to_onnx", no_export)
    monkeypatch.setattr(deploy, "from_pretrained", no_export)
    assert deploy.cached_onnx_export(folder, tmp_path) == first  # nothing loaded, nothing exported
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "model.safetensors"):
        (copy / f).write_bytes((folder / f).read_bytes())
    assert deploy.checkpoint_key(copy, "fp32") == deploy.checkpoint_key(folder, "fp32")
    (copy / "config.json").write_text((folder / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    assert deploy.checkpoint_key(copy, "fp32") != deploy.checkpoint_key(folder, "fp32")
    # a changed exporter (here: its source file) is a new key, so a stale export is never reused
    exporter = tmp_path / "onnx.py"
    exporter.write_text(Path(deploy.onnx_exporter.__file__).read_text() + "\n# changed\n")
    before = deploy.checkpoint_key(folder, "fp32")
    monkeypatch.setattr(deploy.onnx_exporter, "__file__", str(exporter))
    assert deploy.checkpoint_key(folder, "fp32") != before


def test_top1_agreement_and_interleaved_latency():
    assert deploy.top1_agreement(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 4])) == 0.75
    with pytest.raises(ValueError, match="equal, non-empty"):
        deploy.top1_agreement(np.array([1]), np.array([1, 2]))
    calls = []
    fns = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    lat = deploy.interleaved_latency(fns, batch=2, repeats=3, progress=False)
    assert calls == ["a", "b"] * 4 and set(lat) == {"a", "b"}  # one warm-up each, then a, b, a, b, ...
    assert deploy.initializer_bytes(_tensor(22, [16, 3])) == 24  # INT4: two a byte
    assert deploy.initializer_bytes(_tensor(1, [16, 3])) == 192  # FLOAT


def _tensor(data_type, dims):
    from onnx import TensorProto

    t = TensorProto()
    t.data_type, t.dims[:] = data_type, dims
    return t


def test_bench_deploy_bad_input_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    base = ["bench", "deploy", "--out", str(tmp_path)]
    for extra, message in ((["--images", "0"], "--images must be >= 1"), (["--batches", "0"], "--batches"),
                           (["--models", str(tmp_path)], "--models"), (["--data", str(tmp_path / "x")], "--data"),
                           (["--calibration", "-1"], "--calibration must be >= 0")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if onnxruntime were not installed
    assert cli.main(base) == 2
    assert "needs ONNX Runtime: onnxruntime is not installed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
