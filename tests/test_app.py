"""The demo: app/demo_backend.py (known answers), the `pege demo` CLI, app/app.py served on 127.0.0.1
through gradio_client (every endpoint, its output names, bad inputs, 20 concurrent requests) and in
chromium. The quantized models run on ONNX Runtime (their exported integer graphs); the fallback to
PyTorch without onnxruntime is tested by making its import fail.

Checkpoints are built here (a float CIFAR ResNet-20 and its PEGE W4A4/W3A3/W2A2 packed copies),
so nothing depends on shipped models or the network.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import pege_hf  # noqa: E402
from pege_hf import demo as demo_cli  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))  # the demo's backend lives beside the app
import demo_backend as inf  # noqa: E402
from pege_hf.data import CIFAR10_CLASSES, preprocess_pil  # noqa: E402
from pege_hf.hf.cifar import cifar_resnet  # noqa: E402

pytestmark = [  # pandas 3 deprecations raised inside gradio's queue, not in this project
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:Warning"),
]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
TITLES = ["Full precision", "PEGE W4A4", "PEGE W3A3", "PEGE W2A2"]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    """resnet20-fp (metrics.json: accuracy 0.91), resnet20-pege-w4a4 (metrics.json in percent: 88.5),
    -w3a3 and -w2a2 (no metrics.json)."""
    root = tmp_path_factory.mktemp("demo_models")
    torch.manual_seed(0)
    fp = cifar_resnet(20)
    fp.save_pretrained(root / "resnet20-fp")
    (root / "resnet20-fp" / "metrics.json").write_text(json.dumps({"accuracy": 0.91, "top5": 0.99}))
    for bits in (4, 3, 2):
        model = cifar_resnet(20)
        model.load_state_dict(fp.state_dict())
        q = pege_hf.quantize(model, pege_hf.PEGEConfig(w_bits=bits, a_bits=bits))
        q(torch.randn(8, 3, 32, 32))
        q.eval()
        q.save_pretrained(root / f"resnet20-pege-w{bits}a{bits}")
    (root / "resnet20-pege-w4a4" / "metrics.json").write_text(json.dumps({"accuracy": 88.5}))
    return root


@pytest.fixture(scope="module")
def one_thread():
    """The app runs one torch thread per request; restore the test process's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SAMPLE = 200  # test images the start-up agreement is measured on (the app: 1,000)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.fixture(scope="module")
def models(ckpt_root, one_thread, onnx_cache):
    pytest.importorskip("onnxruntime")
    return inf.ModelSet.load(inf.resolve_sources(ckpt_root), cache_dir=onnx_cache, sample_images=SAMPLE)


@pytest.fixture(scope="module")
def torch_models(ckpt_root, one_thread):
    return inf.ModelSet.load(inf.resolve_sources(ckpt_root), runtime="pytorch", sample=None)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return inf.example_images(12, out_dir=tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Upload files: good PNG, grayscale, RGBA, a text file, an empty file."""
    d = tmp_path_factory.mktemp("uploads")
    g = torch.Generator().manual_seed(1)
    rgb = Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy())
    rgb.save(d / "photo.png")
    rgb.convert("L").save(d / "gray.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    (d / "notes.txt").write_text("this is not an image\n")
    (d / "empty.png").write_bytes(b"")
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def app_module():
    return demo_cli.load_app_module()


@pytest.fixture(scope="module")
def server(app_module, models, examples):
    demo = app_module.build_demo(models, examples, benchmark_file=None)
    _, url, _ = app_module.launch(demo, "127.0.0.1", None, concurrency=2, prevent_thread_lock=True,
                                  allowed_paths=[str(Path(examples[0][0]).parent)], quiet=True)
    yield url
    demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


# --------------------------------------------------------------------------------------------- unit: inference


def test_top5_is_softmax_of_the_models_own_logits(torch_models, ckpt_root, examples):
    """On PyTorch, against models loaded afresh (no inference freezing): equal logits bit for bit, top-5 =
    the 5 largest of softmax(logits), most probable first, summing to at most 1."""
    path = examples[3][0]
    pred = torch_models.predict(path)
    x = preprocess_pil(Image.open(path))
    dirs = {"fp": "resnet20-fp", "w4": "resnet20-pege-w4a4", "w3": "resnet20-pege-w3a3", "w2": "resnet20-pege-w2a2"}
    for key, name in dirs.items():
        reference = pege_hf.from_pretrained(str(ckpt_root / name)).eval()
        with torch.no_grad():
            logits = reference(pixel_values=x).logits[0]
        assert torch.equal(torch.tensor(pred.logits[key]), logits), key
        probs = torch.softmax(logits.double(), -1)
        top = pred.top_k(key, 5)
        assert len(top) == 5
        assert sum(top.values()) <= 1 + 1e-6
        values, indices = probs.topk(5)
        assert list(top) == [CIFAR10_CLASSES[i] for i in indices.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-6)
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert pred.top1[key] == CIFAR10_CLASSES[int(logits.argmax())]
    assert set(pred.latency_ms) == set(dirs) and all(ms > 0 for ms in pred.latency_ms.values())
    assert set(pred.runtimes.values()) == {"PyTorch"}


def test_quantized_models_run_their_integer_onnx_graphs(models, torch_models, ckpt_root, onnx_cache, examples):
    """The quantized columns are ONNX Runtime sessions of the cached integer exports: their logits are
    those of a session we open on the cached file ourselves, close to pege_hf's fake-quantized logits;
    the float model stays PyTorch (bit-exact with the PyTorch ModelSet)."""
    import onnxruntime as ort

    files = sorted(onnx_cache.glob("*.onnx"))
    assert [f.name.split("-integer-")[0] for f in files] == [
        "resnet20-pege-w2a2", "resnet20-pege-w3a3", "resnet20-pege-w4a4"]
    x = preprocess_pil(Image.open(examples[3][0]))
    pred, reference = models.predict(examples[3][0]), torch_models.predict(examples[3][0])
    assert pred.runtimes == {"fp": "PyTorch", "w4": inf.ORT_RUNTIME, "w3": inf.ORT_RUNTIME, "w2": inf.ORT_RUNTIME}
    assert pred.logits["fp"] == reference.logits["fp"]
    for key in ("w4", "w3", "w2"):
        path = next(f for f in files if f.name.startswith(f"resnet20-pege-{key}a{key[1]}"))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"pixel_values": x.numpy()})[0][0]
        assert pred.logits[key] == pytest.approx(logits.tolist(), abs=1e-6), key
        assert pred.logits[key] == pytest.approx(reference.logits[key], abs=0.05 * max(map(abs, logits))), key
    ops = {op for f in files for _, op in pege_hf.export.onnx.optimized_ops(f)}
    assert ops & {"QLinearConv", "ConvInteger"}  # integer kernels are what runs


def test_exports_are_made_once_and_reused(ckpt_root, onnx_cache, models, monkeypatch):
    """A second start-up with the same cache exports nothing: the files are keyed by the checkpoints."""
    from pege_hf import deploy

    before = {f: f.stat().st_mtime_ns for f in onnx_cache.glob("*.onnx")}
    monkeypatch.setattr(deploy, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again = inf.ModelSet.load(inf.resolve_sources(ckpt_root), cache_dir=onnx_cache, sample=None)
    assert {e.runtime for k, e in again.models.items() if k != "fp"} == {inf.ORT_RUNTIME}
    assert {f: f.stat().st_mtime_ns for f in onnx_cache.glob("*.onnx")} == before


def test_without_onnxruntime_the_page_falls_back_to_pytorch_and_says_so(ckpt_root, monkeypatch, app_module):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    fallback = inf.ModelSet.load(inf.resolve_sources(ckpt_root), sample=None)
    assert {e.runtime for e in fallback.models.values()} == {"PyTorch"}
    note = inf.runtime_markdown(fallback)
    assert "Fallback: onnxruntime is not installed" in note and "pege-hf[deploy]" in note
    assert "every model runs on PyTorch" in note
    assert "Agreement on the test sample: not measured." in inf.table_note(fallback)  # loaded with sample=None
    rows = inf.summary_rows(fallback)
    w2, fp_size = fallback.models["w2"].size_bytes, fallback.models["fp"].size_bytes
    assert {r[1] for r in rows} == {"PyTorch"} and rows[3][7] == f"{w2:,} (safetensors, {fp_size / w2:.1f}x smaller)"
    page = app_module.build_demo(fallback, [])
    shown = [c.get("props", {}).get("value") for c in page.config["components"]]
    assert note in shown  # on the page
    with pytest.raises(RuntimeError, match="onnxruntime is not installed"):
        inf.ModelSet.load(inf.resolve_sources(ckpt_root), runtime="onnxruntime", sample=None)
    with pytest.raises(ValueError, match="runtime must be one of"):
        fallback.use_runtime("tensorrt")


def test_a_failed_export_falls_back_under_auto_and_is_an_error_under_onnxruntime(ckpt_root, monkeypatch, capsys):
    from pege_hf import cli, deploy

    def broken(folder, cache_dir=None, model=None):
        raise ValueError("the exporter broke")

    monkeypatch.setattr(deploy, "cached_onnx_export", broken)
    auto = inf.ModelSet.load(inf.resolve_sources(ckpt_root), sample=None)
    assert {e.runtime for e in auto.models.values()} == {"PyTorch"}
    assert any("its ONNX export failed (the exporter broke)" in note for note in auto.runtime_notes)
    with pytest.raises(RuntimeError, match=r"runtime onnxruntime: .* cannot be exported to ONNX \(the exporter broke\)"):
        inf.ModelSet.load(inf.resolve_sources(ckpt_root), runtime="onnxruntime", sample=None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # --runtime onnxruntime without it: refused up front
    assert cli.main(["demo", "--runtime", "onnxruntime", "--model", str(ckpt_root)]) == 2
    assert "--runtime onnxruntime: onnxruntime is not installed" in capsys.readouterr().err


def test_agreement_on_the_test_sample_against_an_independent_count(models, ckpt_root):
    """Each model's start-up agreement with the float model = our own count over the same first SAMPLE
    test images, the float model's top-1 from PyTorch and the quantized ones' from their ONNX sessions."""
    from pege_hf.data import load_image_dataset, normalize, to_tensors

    data = load_image_dataset(inf.DEFAULT_DATASET)
    images, _ = to_tensors(data.test.select(range(SAMPLE)), data.image_column, data.label_column)
    x = normalize(images)
    fp = pege_hf.from_pretrained(str(ckpt_root / "resnet20-fp")).eval()
    with torch.no_grad():
        fp_top1 = fp(x).logits.argmax(1).numpy()
    assert models.sample_size == SAMPLE and models.models["fp"].sample_agreement == 1.0
    for key in ("w4", "w3", "w2"):
        top1 = models.models[key].run(x.numpy()).argmax(1)
        assert models.models[key].sample_agreement == pytest.approx(float((top1 == fp_top1).mean()), abs=1e-12)
    rows = {r[0]: r for r in inf.summary_rows(models)}
    w2 = models.models["w2"].sample_agreement
    assert rows["PEGE W2A2"][4] == f"{100 * w2:.1f}% of {SAMPLE} images" and rows["Full precision"][4] == "reference"
    assert f"on the first {SAMPLE} images of the shipped CIFAR-10 test sample" in inf.table_note(models)


def test_quantized_models_really_are_low_bit(models):
    for key, bits in (("w4", 4), ("w3", 3), ("w2", 2)):
        entry = models.models[key]
        assert (entry.w_bits, entry.a_bits) == (bits, bits) and entry.title == f"PEGE W{bits}A{bits}"
        assert pege_hf.hf.quantizer.quant_layers(entry.model)
    assert models.models["fp"].w_bits is None and models.titles["fp"] == "Full precision"
    assert models.keys == ["fp", "w4", "w3", "w2"]


def test_agreement_flags():
    assert inf.agreement({"fp": "cat", "w4": "cat", "w3": "dog", "w2": "cat"}) == {"w4": True, "w3": False, "w2": True}
    assert inf.agreement({"w4": "cat", "w2": "dog"}) == {}
    pred = inf.Prediction(class_names=["a", "b", "c"], probs={"fp": [0.1, 0.7, 0.2], "w4": [0.2, 0.5, 0.3],
                                                             "w2": [0.6, 0.3, 0.1]},
                          logits={}, latency_ms={"fp": 1.0, "w4": 2.0, "w2": 3.0}, preprocess_ms=0.5,
                          titles={"fp": "Full precision", "w4": "PEGE W4A4", "w2": "PEGE W2A2"})
    assert pred.top1 == {"fp": "b", "w4": "b", "w2": "a"}
    assert pred.agreement == {"w4": True, "w2": False}
    md = inf.agreement_markdown(pred)
    assert "✓ **PEGE W4A4** agrees" in md and "✗ **PEGE W2A2** disagrees: *a*" in md and "1 of 2" in md
    assert inf.Prediction.from_dict(json.loads(json.dumps(pred.to_dict()))).probs == pred.probs
    with pytest.raises(ValueError, match="not a prediction"):
        inf.Prediction.from_dict({"class_names": ["a"], "probabilities": {"fp": [0.5, 0.5]}})


def test_sizes_are_the_bytes_of_what_runs(models, torch_models, ckpt_root, onnx_cache):
    """On disk: the file the runtime loads (the ONNX file; model.safetensors on PyTorch). In memory: the
    PyTorch tensors (parameters, buffers, the frozen quantized weights), or ONNX Runtime's initializers:
    int8 codes for the quantized layers, fp32 for the float stem and head."""
    fp_size = os.path.getsize(ckpt_root / "resnet20-fp" / "model.safetensors")
    for key, entry in models.models.items():
        assert entry.size_bytes == os.path.getsize(Path(entry.source) / "model.safetensors")
        assert inf.model_size_bytes(entry.source) == entry.size_bytes
    for key in ("w4", "w3", "w2"):
        assert models.models[key].size_bytes < fp_size / 4  # packed low-bit codes
        onnx_file = next(onnx_cache.glob(f"resnet20-pege-{key}a{key[1]}-*.onnx"))
        assert models.models[key].disk_bytes == onnx_file.stat().st_size
        assert torch_models.models[key].disk_bytes == models.models[key].size_bytes
    assert models.models["w2"].size_bytes < models.models["w3"].size_bytes < models.models["w4"].size_bytes
    fp_model = models.models["fp"].model
    fp_tensors = sum(t.numel() * t.element_size() for t in fp_model.state_dict().values())
    assert models.models["fp"].memory_bytes == fp_tensors and models.models["fp"].disk_bytes == fp_size
    quant = pege_hf.hf.quantizer.quant_layers(torch_models.models["w2"].model)
    codes = sum(layer.weight.numel() for _, layer in quant)
    float_weights = sum(p.numel() for n, p in fp_model.named_parameters() if p.dim() > 1) - codes
    channels = sum(layer.weight.shape[0] for _, layer in quant)
    assert codes + 4 * float_weights <= models.models["w2"].memory_bytes <= codes + 4 * float_weights + 64 * channels
    # PyTorch: the float latent weights, plus the quantized copy freeze_for_inference keeps
    w2_torch = torch_models.models["w2"].model
    assert torch_models.models["w2"].memory_bytes == sum(
        t.numel() * t.element_size() for t in [*w2_torch.parameters(), *w2_torch.buffers()]) + 4 * codes
    rows = inf.summary_rows(models)
    assert [r[0] for r in rows] == TITLES
    assert rows[0][7] == f"{fp_size:,} (safetensors)" and rows[0][8] == f"{fp_tensors:,}"
    w2 = models.models["w2"]
    assert rows[3][7] == f"{w2.disk_bytes:,} (ONNX, {fp_size / w2.disk_bytes:.1f}x smaller)"
    assert rows[3][8] == f"{w2.memory_bytes:,} ({fp_tensors / w2.memory_bytes:.1f}x smaller)"
    assert [r[1] for r in rows] == ["PyTorch"] + [inf.ORT_RUNTIME] * 3


def test_accuracy_from_metrics_json(models):
    assert models.models["fp"].accuracy == pytest.approx(0.91)
    assert models.models["w4"].accuracy == pytest.approx(0.885)  # percent in the file
    assert models.models["w3"].accuracy is None and models.models["w2"].accuracy is None
    rows = {r[0]: r for r in inf.summary_rows(models)}
    assert rows["Full precision"][5] == "91.00%" and rows["PEGE W4A4"][5] == "88.50%"
    assert rows["PEGE W3A3"][5] == "not measured" and rows["PEGE W2A2"][5] == "not measured"


def test_accuracy_plot_shows_the_models_in_the_table_and_no_path(models, tmp_path):
    """By default the plot's numbers are the table's (each model's metrics.json); a benchmark file only
    when given, named without the machine's path."""
    series, source = inf.accuracy_by_bits(models)
    assert series == {"fp": {None: pytest.approx(0.91)}, "pege": {4: pytest.approx(0.885)}}
    table = {r[0]: r[5] for r in inf.summary_rows(models)}
    assert table["Full precision"] == f"{100 * series['fp'][None]:.2f}%"
    assert table["PEGE W4A4"] == f"{100 * series['pege'][4]:.2f}%"
    label = inf.accuracy_plot_label(source)
    assert "the models in the table" in label and "/" not in label
    assert inf.accuracy_by_bits(models, tmp_path / "absent.json") == (series, source)
    bench = tmp_path / "accuracy.json"
    bench.write_text(json.dumps({  # the layout `pege bench accuracy` writes (benchmarks.pege_bench.matrix.collect_accuracy)
        "fp_accuracy": 0.92,
        "summary": [
            {"estimator": "pege", "bits": 2, "variant": "main", "seeds": 2, "mean": 0.81},
            {"estimator": "ste", "bits": 2, "variant": "main", "seeds": 2, "mean": 0.75},
            {"estimator": "pege", "bits": 2, "variant": "lambda0", "seeds": 1, "mean": 0.5}]}))
    series, source = inf.accuracy_by_bits(models, bench)
    assert source == "accuracy.json" and str(tmp_path) not in inf.accuracy_plot_label(source)
    assert series == {"fp": {None: pytest.approx(0.92)}, "pege": {2: pytest.approx(0.81)},
                      "ste": {2: pytest.approx(0.75)}}
    bench.write_text("{not json")
    assert "metrics.json" in inf.accuracy_by_bits(models, bench)[1]


def test_benchmark_reader_matches_the_benchmark_writer(tmp_path):
    from benchmarks.pege_bench import matrix as bench

    plan = bench.accuracy_plan(data="D", bits=(2,), estimators=("pege",), seeds_low_bits=1, ablations=False)
    for run, acc in zip(plan, (0.9, 0.8)):
        (tmp_path / run.name).mkdir()
        (tmp_path / run.name / "metrics.json").write_text(json.dumps({"accuracy": acc, "history": []}))
    result = bench.collect_accuracy(plan, tmp_path)
    assert inf.parse_benchmark_accuracy(result) == {"fp": {None: 0.9}, "pege": {2: 0.8}}


def test_load_image_converts_or_refuses_clearly(images, tmp_path):
    for name in ("photo", "gray", "rgba"):
        x = inf.load_image(images[name])
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(inf.load_image(images["photo"].read_bytes()), inf.load_image(images["photo"]))
    assert torch.equal(inf.load_image(Image.open(images["photo"])), inf.load_image(images["photo"]))
    # transparent pixels go onto white; 16-bit grayscale and palette images are converted too
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    assert torch.allclose(inf.load_image(clear), inf.load_image(white))
    assert inf.load_image(Image.new("I;16", (20, 20), 300)).shape == (1, 3, 32, 32)
    assert inf.load_image(Image.new("P", (20, 20), 3)).shape == (1, 3, 32, 32)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(big, quality=90)
    assert inf.load_image(big).shape == (1, 3, 32, 32)

    with pytest.raises(ValueError, match="is not an image"):
        inf.load_image(images["notes"])
    with pytest.raises(ValueError, match="is not an image"):
        inf.load_image(b"GIF89a-but-not-really")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        inf.load_image(images["empty"])
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        inf.load_image(b"")
    with pytest.raises(ValueError, match="No image"):
        inf.load_image(None)
    with pytest.raises(ValueError, match="too large: 3000 x 2000"):
        inf.load_image(big, max_pixels=1_000_000)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images["photo"].read_bytes()[:200])
    with pytest.raises(ValueError, match="image"):
        inf.load_image(truncated)


def test_example_gallery_images(examples):
    assert len(examples) == 12
    assert [name for _, name in examples[:10]] == list(CIFAR10_CLASSES)  # one per class first
    for path, name in examples:
        with Image.open(path) as im:
            assert im.size == (32, 32) and im.format == "PNG"
        assert name in CIFAR10_CLASSES and name in Path(path).name


def test_figures(models, examples):
    pred = models.predict(examples[0][0])
    fig = inf.probability_figure(pred.to_dict())
    ax = fig.axes[0]
    assert len(ax.containers) == 4  # one bar group per model
    for container, key in zip(ax.containers, pred.keys):
        assert [bar.get_height() for bar in container] == pytest.approx(pred.probs[key])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == TITLES
    acc = inf.accuracy_figure({"fp": {None: 0.91}, "pege": {2: 0.8, 3: 0.85, 4: 0.9}})
    line = acc.axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [2, 3, 4] and list(line.get_ydata()) == pytest.approx([80, 85, 90])
    assert inf.accuracy_figure({}).axes[0].texts  # "No accuracy measured yet"


def test_resolve_sources(ckpt_root, tmp_path):
    conventional = inf.resolve_sources(ckpt_root)
    assert conventional == {"fp": str(ckpt_root / "resnet20-fp"), "w4": str(ckpt_root / "resnet20-pege-w4a4"),
                            "w3": str(ckpt_root / "resnet20-pege-w3a3"), "w2": str(ckpt_root / "resnet20-pege-w2a2")}
    # any folder names: told apart by their config.json
    other = tmp_path / "runs"
    other.mkdir()
    for src, dst in (("resnet20-fp", "float"), ("resnet20-pege-w4a4", "q-a"), ("resnet20-pege-w3a3", "q-b"),
                     ("resnet20-pege-w2a2", "q-c")):
        shutil.copytree(ckpt_root / src, other / dst)
    assert inf.resolve_sources(other) == {"fp": str(other / "float"), "w4": str(other / "q-a"),
                                          "w3": str(other / "q-b"), "w2": str(other / "q-c")}
    # explicit flags win; a missing variant is named with the flag that provides it
    assert inf.resolve_sources(other, w2=str(ckpt_root / "resnet20-pege-w2a2"))["w2"] == str(
        ckpt_root / "resnet20-pege-w2a2")
    assert inf.resolve_sources(other, w2="someone/resnet20-pege-w2a2")["w2"] == "someone/resnet20-pege-w2a2"  # Hub id
    shutil.rmtree(other / "q-c")
    with pytest.raises(FileNotFoundError, match="PEGE W2A2 \\(--w2 DIR"):
        inf.resolve_sources(other)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        inf.resolve_sources(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="--fp ./does-not-exist: no such folder"):
        inf.resolve_sources(ckpt_root, fp="./does-not-exist")
    with pytest.raises(ValueError, match="not a PEGE checkpoint"):
        inf.ModelSet.load({"fp": str(ckpt_root / "resnet20-fp"), "w2": str(ckpt_root / "resnet20-fp")})


def test_server_side_latency_of_the_four_models(models, examples):
    """Not a timed assertion: prints the median server-side time of predict() (four models, one
    32x32 image, decoding included) and of predict + the probability chart."""
    stats = inf.measure_latency(models, examples[0][0], n=50, warmup=5)
    assert stats["n"] == 50 and 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert set(stats["per_model_median_ms"]) == {"fp", "w4", "w3", "w2"}

    def with_chart(image):
        fig = inf.probability_figure(models.predict(image))
        fig.savefig(io.BytesIO(), format="webp")

    chart = inf.measure_latency(models, examples[0][0], n=10, warmup=2, fn=with_chart)
    per_model = ", ".join(f"{k} {v:.1f}" for k, v in stats["per_model_median_ms"].items())
    print(f"\n[demo latency] four models, one 32x32 image: median {stats['median_ms']:.1f} ms, "
          f"p90 {stats['p90_ms']:.1f} ms over {stats['n']} calls ({stats['torch_threads']} torch thread; "
          f"per model: {per_model}); with the probability chart: median {chart['median_ms']:.1f} ms")


# --------------------------------------------------------------------------------------------- the CLI


def test_demo_cli_options_and_clear_errors(app_module, tmp_path, capsys, monkeypatch):
    from pege_hf import cli

    args = cli.build_parser("demo").parse_args(["demo", "--fp", "a", "--w2", "b", "--port", "9999"])
    assert (args.fp, args.w2, args.port, args.host, args.model) == ("a", "b", 9999, "127.0.0.1", None)
    assert demo_cli.APP_PATH == ROOT / "app" / "app.py" and demo_cli.APP_PATH.is_file()
    # a folder without models: a clear message, exit code 2, no server
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["demo", "--model", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint found for: Full precision" in err and "--model" in err
    # no app/app.py (e.g. a wheel install)
    monkeypatch.setattr(demo_cli, "APP_PATH", tmp_path / "app" / "app.py")
    assert cli.main(["demo"]) == 2
    assert "the Gradio app is not installed" in capsys.readouterr().err


def test_demo_host_follows_gradio_server_name(monkeypatch):
    """Spaces sets GRADIO_SERVER_NAME=0.0.0.0; elsewhere the demo listens on 127.0.0.1 unless asked."""
    from pege_hf import cli

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert cli.build_parser("demo").parse_args(["demo"]).host == "0.0.0.0"
    monkeypatch.delenv("GRADIO_SERVER_NAME")
    assert cli.build_parser("demo").parse_args(["demo"]).host == "127.0.0.1"
    assert (ROOT / "app" / "requirements.txt").is_file()
    assert (ROOT / "app" / "README.md").read_text().startswith("---\ntitle:")  # the Spaces YAML header


def test_app_script_runs_standalone():
    out = subprocess.run([sys.executable, str(ROOT / "app" / "app.py"), "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--fp", "--w2", "--w3", "--w4", "--host", "--port"):
        assert flag in out.stdout


# --------------------------------------------------------------------------------------------- API


def _check_prediction(result, n_rows=4):
    *labels, markdown, table, probabilities = result
    assert len(labels) == 4
    for label in labels:
        assert label["label"] in CIFAR10_CLASSES
        confidences = label["confidences"]
        assert len(confidences) == 5 and sum(c["confidence"] for c in confidences) <= 1 + 1e-6
    assert "Full precision says" in markdown
    assert table["headers"] == inf.SUMMARY_HEADERS and len(table["data"]) == n_rows
    assert [row[0] for row in table["data"]] == TITLES
    assert set(probabilities["probabilities"]) == {"fp", "w4", "w3", "w2"}
    for key, label in zip(("fp", "w4", "w3", "w2"), labels):
        assert probabilities["top1"][key] == label["label"]
    return labels, table, probabilities


def test_api_every_endpoint(server, examples, models):
    from gradio_client import handle_file

    client = _client(server)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/predict", "/probability_plot"}
    names = {api: [r["label"] for r in info["returns"]] for api, info in endpoints.items()}
    assert names["/predict"] == ["Full precision", "PEGE W4A4", "PEGE W3A3", "PEGE W2A2", "Agreement",
                                 "Model comparison", "Raw output"]
    assert names["/probability_plot"] == ["Probabilities per class"]
    assert [p["label"] for p in endpoints["/predict"]["parameters"]] == ["Image"]
    assert [p["label"] for p in endpoints["/probability_plot"]["parameters"]] == ["Raw output"]
    text = client.view_api(print_info=False, return_format="str")  # what a user reads: sanitized names, none made up
    assert "(full_precision, pege_w4a4, pege_w3a3, pege_w2a2, agreement, model_comparison, raw_output)" in text
    assert "value_" not in text and "parameter_" not in text
    assert 'predict(raw_output, api_name="/probability_plot") -> probabilities_per_class' in text
    labels, table, probabilities = _check_prediction(client.predict(handle_file(examples[5][0]), api_name="/predict"))
    expected = models.predict(examples[5][0])
    assert probabilities["probabilities"] == {k: pytest.approx(v, abs=1e-6) for k, v in expected.probs.items()}
    assert probabilities["agrees_with_full_precision"] == expected.agreement
    assert probabilities["runtimes"] == expected.runtimes
    fp_row = table["data"][0]
    assert fp_row[7] == f"{models.models['fp'].size_bytes:,} (safetensors)" and fp_row[5] == "91.00%"
    assert fp_row[3] == "reference" and fp_row[2].startswith(labels[0]["label"] + " (")
    for row, key in zip(table["data"][1:], ("w4", "w3", "w2")):
        assert row[3] == ("✓ yes" if expected.agreement[key] else "✗ NO")
        assert row[1] == inf.ORT_RUNTIME and row[4].endswith(f"% of {SAMPLE} images")
    assert all(row[5] == "not measured" for row in table["data"][2:])
    assert all(float(row[6]) > 0 for row in table["data"])
    plot = client.predict(probabilities, api_name="/probability_plot")
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")


def test_api_bad_inputs_get_a_clear_error_and_the_server_keeps_serving(server, images, examples, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = _client(server)
    with pytest.raises(AppError, match="'notes.txt' is not an image"):
        client.predict(handle_file(str(images["notes"])), api_name="/predict")
    _check_prediction(client.predict(handle_file(examples[0][0]), api_name="/predict"))
    with pytest.raises(AppError, match=r"empty \(0 bytes\)"):
        client.predict(handle_file(str(images["empty"])), api_name="/predict")
    with pytest.raises(AppError, match="No image"):
        client.predict(None, api_name="/predict")
    with pytest.raises(AppError, match="not a prediction"):
        client.predict({"class_names": ["a"], "probabilities": {"fp": [1, 2]}}, api_name="/probability_plot")
    for name in ("gray", "rgba"):  # converted, not refused
        _check_prediction(client.predict(handle_file(str(images[name])), api_name="/predict"))
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 8000), (180, 40, 40)).save(huge, compress_level=1)
    _check_prediction(client.predict(handle_file(str(huge)), api_name="/predict"))
    _check_prediction(client.predict(handle_file(str(images["photo"])), api_name="/predict"))


def test_load_20_concurrent_requests(server, examples):
    from gradio_client import handle_file

    client = _client(server)

    def one(i):
        start = time.perf_counter()
        result = client.predict(handle_file(examples[i % len(examples)][0]), api_name="/predict")
        return result, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, range(20)))
    wall = time.perf_counter() - start
    for i, (result, _) in enumerate(results):
        _check_prediction(result)
        assert result[-1]["top1"] == results[i % 12][0][-1]["top1"]  # same image, same answer
    worst = max(t for _, t in results)
    print(f"\n[demo load] 20 concurrent requests: all succeeded in {wall:.2f} s (slowest {worst:.2f} s)")
    _check_prediction(_client(server).predict(handle_file(examples[1][0]), api_name="/predict"))


# --------------------------------------------------------------------------------------------- browser


@pytest.mark.browser
def test_browser_upload_and_predict(server, images):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent (apt-get install -y chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(server, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#predict-button").wait_for(timeout=60_000)
            # the button reaches the server: with no image yet, its handler's message shows up
            page.locator("#predict-button").click()
            sync_api.expect(page.get_by_text("No image: upload an image").first).to_be_visible(timeout=30_000)
            page.locator("#input-image input[type=file]").set_input_files(str(images["photo"]))
            page.locator("#input-image img").first.wait_for(timeout=30_000)  # the preview: upload done
            page.locator("#predict-button").click()
            pattern = "|".join(CIFAR10_CLASSES)
            for key in ("fp", "w4", "w3", "w2"):
                sync_api.expect(page.locator(f"#pred-{key}")).to_contain_text(
                    re.compile(pattern), timeout=60_000)
            sync_api.expect(page.locator("#agreement")).to_contain_text("Full precision says", timeout=30_000)
            texts = {key: page.locator(f"#pred-{key}").inner_text() for key in ("fp", "w4", "w3", "w2")}
            for key, text in texts.items():
                assert any(name in text for name in CIFAR10_CLASSES), (key, text)
            sync_api.expect(page.locator("#probability-plot img")).to_have_count(1, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
            # the gallery: clicking a CIFAR-10 test image puts it into the input and predicts it
            page.locator("#examples img").first.click()
            sync_api.expect(page.locator("#input-image img").first).to_have_attribute(
                "src", re.compile("airplane"), timeout=30_000)
            sync_api.expect(page.locator("#pred-fp")).to_contain_text(re.compile(pattern),
                                                                       timeout=30_000)
        finally:
            browser.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
