"""ONNX export: exact integer codes, BatchNorm folding, requantization, ONNX Runtime agreement, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pege_hf
from pege_hf.cli import main as cli_main
from pege_hf.data import DEFAULT_DATASET, load_image_dataset, normalize, to_tensors
from pege_hf.export import export_onnx
from pege_hf.export.onnx import (INTEGER_OPS, IntegerLayer, example_input, fits_int16_pairs, fold_batchnorm, requant_params,
                                 torch_to_onnx, uses_im2col)
from pege_hf.quant.packing import unpack_codes

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
MODELS = Path(pege_hf.__file__).parent / "assets" / "models"
TAGS = ("w2a2", "w3a3", "w4a4")


@pytest.fixture(scope="module")
def sample():
    data = load_image_dataset(DEFAULT_DATASET)
    images, labels = to_tensors(data.test, data.image_column, data.label_column)
    return normalize(images), labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    for tag in TAGS:
        model = pege_hf.from_pretrained(MODELS / f"resnet20-pege-{tag}").eval()
        path = tmp_path_factory.mktemp(tag) / "model.onnx"
        out[tag] = (model, export_onnx(model, path), path)
    return out


def _initializers(path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_weight_codes_are_the_packed_checkpoint_codes(exported):
    model, report, path = exported["w2a2"]
    inits = _initializers(path)
    for r in report.layers:
        layer = model.get_submodule(r.name)
        q = layer.weight_quantizer.quantizer
        packed = unpack_codes(layer.packed_weight(), q.bits, layer.weight.numel()).view(layer.weight.shape)
        stored = inits[f"model.{r.name}.codes_int4"]  # 2-bit codes are stored as INT4
        assert r.weight_storage == "int4"
        np.testing.assert_array_equal(stored.astype(np.int64), (packed.to(torch.int64) + int(q.qmin)).numpy())


def test_activation_quantizers_keep_their_exact_range(exported):
    _, report, path = exported["w2a2"]
    inits = _initializers(path)
    his = {k: int(v) for k, v in inits.items() if k.endswith(".hi") or k.endswith("y_hi")}
    assert his and set(his.values()) == {3}  # a 2-bit unsigned activation clips to 0..3, not 0..255


def test_fold_batchnorm_matches_float64_reference():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.1, 2.0)
    acc, mult, bias = torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.rand(6) + 0.1, torch.randn(6)
    m2, b2 = fold_batchnorm(mult, bias, bn)
    ref = (acc * mult.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1) - bn.running_mean.double().view(1, -1, 1, 1))
    ref = ref / torch.sqrt(bn.running_var.double() + bn.eps).view(1, -1, 1, 1) * bn.weight.double().view(1, -1, 1, 1)
    ref = ref + bn.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(acc * m2.view(1, -1, 1, 1) + b2.view(1, -1, 1, 1), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_requant_params_give_the_exact_codes_for_every_reachable_accumulator(seed):
    rng = np.random.default_rng(seed)
    gain, reach, ties = int(rng.integers(1, 64)), int(rng.integers(5, 200)), [k + 0.5 for k in range(0, 3)]
    mult = float(rng.uniform(1e-3, 0.05)) * (1 if seed % 2 else -1)
    ideal = (0.5 - 1e-5) / mult if seed % 3 == 0 else float(rng.uniform(-500, 500))  # seed 0, 3, ...: a near tie
    bias, m = requant_params(ideal, mult, ties, gain, reach)
    acc = gain * np.arange(-reach, reach + 1, dtype=np.float64)
    exact = np.clip(np.round((acc + ideal) * mult), 0, 3)
    got = np.clip(np.round((acc + bias) * np.float32(m)), 0, 3)
    assert isinstance(bias, int) and (exact == got).all()


def test_onnx_runtime_runs_integer_kernels_for_every_quantized_layer(exported):
    for tag in TAGS:
        _, report, _ = exported[tag]
        assert len(report.layers) == 18
        for r in report.layers:
            assert r.kernel == "integer" and set(r.runs_as) & set(INTEGER_OPS), (tag, r.line())
            assert "Conv" not in r.runs_as and "DequantizeLinear" not in r.runs_as  # no float conv fed by DQ
        assert report.float_layers == ["conv1", "classifier"]


def test_residual_convs_with_32_or_more_channels_run_as_im2col_matmul_integer_to_float(exported):
    for tag in TAGS:
        _, report, _ = exported[tag]
        for r in report.layers:
            if r.name.endswith("conv2") and not r.name.startswith("layer1."):  # 3x3 x 32/64 input channels
                assert r.op == "MatMulIntegerToFloat" and "MatMulIntegerToFloat" in r.runs_as, (tag, r.line())
                assert "ConvInteger" not in r.runs_as and "Conv" not in r.runs_as, (tag, r.line())
            elif r.name.endswith("conv2"):
                assert r.op == "ConvInteger" and "ConvInteger" in r.runs_as, (tag, r.line())


class _OneConv(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("bits,cin,k,pad,dil,stride", [(2, 32, 3, 1, 1, 1), (4, 40, 3, 2, 2, 1), (8, 16, 5, 2, 1, 2),
                                                       (3, 64, 1, 0, 1, 1)])
def test_im2col_path_gives_the_exact_accumulator(tmp_path, bits, cin, k, pad, dil, stride):
    """ONNX Runtime's im2col + MatMulIntegerToFloat output against the float64 conv of the same integer codes,
    rescaled (odd sizes, padding, dilation, stride, a 1x1 conv that stays on ConvInteger, 8-bit codes that take
    the uint8-weight path)."""
    from pege_hf.quant.modules import QuantConv2d

    torch.manual_seed(bits)
    layer = QuantConv2d.from_float(nn.Conv2d(cin, 24, k, stride, padding=pad, dilation=dil), pege_hf.PEGEConfig(w_bits=bits, a_bits=bits), 0)
    x = torch.randn(3, cin, 11, 9).abs()
    layer(x)  # initialises the input step size
    exported = IntegerLayer(layer.eval()).eval()
    assert exported.im2col == uses_im2col(layer) == (cin * k * k >= 288)
    if not exported.im2col:
        return
    assert fits_int16_pairs(exported.codes, int(exported.hi)) == (bits < 8)
    torch_to_onnx(_OneConv(exported), x, tmp_path / "one.onnx")
    got = ort.InferenceSession(str(tmp_path / "one.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]
    xc = torch.clamp(torch.round(x.double() / exported.scale.double()), int(exported.lo) - int(exported.zp),
                     int(exported.hi) - int(exported.zp))
    acc = torch.nn.functional.conv2d(xc, exported.codes.double(), None, stride, pad, dil)
    ref = acc * exported.mult.double().view(1, -1, 1, 1) + exported.bias.double().view(1, -1, 1, 1)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("tag", TAGS)
def test_onnx_runtime_agrees_with_the_pege_model_on_the_sample(exported, sample, tag):
    model, _, path = exported[tag]
    images, labels = sample
    with torch.no_grad():
        ref = model(images).logits.argmax(1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0]).argmax(1)
    assert (got == ref).float().mean() >= 0.995
    assert abs((got == labels).float().mean() - (ref == labels).float().mean()) <= 0.002


def test_w2a2_file_is_at_most_a_quarter_of_the_fp32_file(exported, tmp_path):
    fp = pege_hf.from_pretrained(MODELS / "resnet20-fp").eval()
    torch_to_onnx(fp, example_input(fp), tmp_path / "fp.onnx")
    assert exported["w2a2"][1].bytes <= (tmp_path / "fp.onnx").stat().st_size / 4


def test_float_model_is_refused(tmp_path):
    fp = pege_hf.from_pretrained(MODELS / "resnet20-fp").eval()
    with pytest.raises(ValueError, match="no PEGE quantized layers"):
        export_onnx(fp, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_existing_output_is_kept_without_overwrite(exported, tmp_path):
    model = exported["w2a2"][0]
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="exists"):
        export_onnx(model, target)
    assert target.read_bytes() == b"precious"
    assert cli_main(["export", str(MODELS / "resnet20-pege-w2a2"), "--format", "onnx", "--output", str(target)]) == 2
    assert target.read_bytes() == b"precious" and list(tmp_path.iterdir()) == [target]


def test_onnx_overwrite_never_replaces_a_file_of_the_checkpoint(tmp_path):
    """An ONNX file may replace an earlier export, even inside the checkpoint folder, but not the checkpoint's own
    files (its weights, its config) nor a folder."""
    source = tmp_path / "w2a2"
    shutil.copytree(MODELS / "resnet20-pege-w2a2", source)
    model = pege_hf.from_pretrained(source).eval()
    weights = (source / "model.safetensors").read_bytes()
    for own in ("model.safetensors", "config.json"):
        with pytest.raises(ValueError, match="replacing it would delete the checkpoint"):
            export_onnx(model, source / own, overwrite=True)
    with pytest.raises(ValueError, match="is a folder; this export writes one file"):
        export_onnx(model, tmp_path, overwrite=True)
    assert (source / "model.safetensors").read_bytes() == weights
    (source / "model.onnx").write_bytes(b"an earlier export")
    export_onnx(model, source / "model.onnx", overwrite=True)
    assert (source / "model.onnx").read_bytes()[:4] != b"an e"


def test_cli_exits_2_with_one_line_for_bad_input(tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(MODELS / "resnet20-pege-w2a2", corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cases = {"missing": tmp_path / "nope", "float": MODELS / "resnet20-fp", "corrupt": corrupt}
    for what, source in cases.items():
        rc = cli_main(["export", str(source), "--format", "onnx", "--output", str(tmp_path / f"{what}.onnx")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("pege export: error: "), (what, err)
        assert not (tmp_path / f"{what}.onnx").exists()


def test_cli_writes_the_export(tmp_path, capsys):
    out = tmp_path / "w3a3.onnx"
    assert cli_main(["export", str(MODELS / "resnet20-pege-w3a3"), "--format", "onnx", "--output", str(out)]) == 0
    assert out.is_file() and "QLinearConv" in capsys.readouterr().out
