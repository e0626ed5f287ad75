"""The LLM recipe's pieces against float64 formulas: group-wise weight step sizes, per-layer settings
(mixed precision) and dynamic per-token / per-tensor activation quantizers, PEGE's mixing included."""

import math

import pytest
import torch

import pege_hf
from conftest import lm_qat_steps
from pege_hf import PEGEConfig
from pege_hf.hf.quantizer import quant_layers
from pege_hf.quant import kernels
from pege_hf.quant.curriculum import replacement_mask, replacement_ratio
from pege_hf.quant.modules import QuantLinear, make_fake_quantizer


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, vocab_size=96, max_position_embeddings=32))


@pytest.mark.parametrize("quantizer", ["lsq", "minmax", "symmetric"])
def test_group_wise_weights_match_float64_per_group(quantizer):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(64, 8), PEGEConfig(w_bits=3, a_bits=None, group_size=16,
                                                                        w_quantizer=quantizer, scale_init="lsq"))
    q = layer.weight_quantizer.quantizer
    w = layer.weight.detach().double()
    groups = w.reshape(8, 4, 16)
    qp = 3.0
    if quantizer == "lsq":  # LSQ's init 2 mean|w| / sqrt(qmax), per group
        ref_s = 2 * groups.abs().mean(-1) / math.sqrt(qp)
    elif quantizer == "minmax":
        ref_s = groups.abs().amax(-1) / qp
    else:  # PyTorch's / torchao's symmetric scale: max|w| / ((qmax - qmin) / 2), codes [-4, 3]
        ref_s = groups.abs().amax(-1) / 3.5
    assert q.scale.shape == (32,) and torch.allclose(q.scale.detach().double().view(8, 4), ref_s, rtol=1e-6)
    s = q.scale.detach().double().view(8, 4, 1)
    ref_wq = (torch.clamp(torch.round(groups / s), -4, 3) * s).reshape(8, 64)
    layer.eval()
    # a group's largest magnitude sits on a rounding tie under the symmetric scale (max|w| / s = 3.5): float32
    # may land either side of it, so there either neighbouring level is right
    tie = ((groups / s).abs() - 3.5).abs().reshape(8, 64) < 1e-5
    got = layer.quantized_weight().double()
    step = s.expand(8, 4, 16).reshape(8, 64)
    assert torch.allclose(got[~tie], ref_wq[~tie], atol=1e-6)
    assert ((got[tie] - ref_wq[tie]).abs() <= step[tie] + 1e-6).all()
    assert int(tie.sum()) == (32 if quantizer == "symmetric" else 0)  # one per group: its largest magnitude
    if quantizer == "lsq":  # the step-size gradient sums over each group, times LSQ's 1 / sqrt(G qmax)
        layer.train()
        layer.weight_quantizer.estimator = "ste"
        g = torch.randn(8, 64, dtype=torch.float64)
        (layer.quantized_weight().double() * g).sum().backward()
        v = groups / s
        inside = (v >= -4) & (v <= 3)
        el = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -4, 3)) * g.view(8, 4, 16)
        assert torch.allclose(q.scale.grad.double().view(8, 4), el.sum(-1) / math.sqrt(16 * qp), rtol=1e-5, atol=1e-8)


def test_group_size_that_does_not_divide_is_refused_naming_the_layer():
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj': group_size 48 does not divide the 64"):
        pege_hf.quantize(model, PEGEConfig(group_size=48))


def test_layer_overrides_set_bits_per_layer_and_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_llama().save_pretrained(tmp_path / "fp")
    cfg = PEGEConfig(w_bits=4, a_bits=None, group_size=32,
                     layer_overrides={"mlp.down_proj": {"w_bits": 2}, "model.layers.0.self_attn.q_proj": {"w_bits": 8, "group_size": None}})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    layers = dict(quant_layers(model))
    bits = {n: l.weight_quantizer.quantizer.bits for n, l in layers.items()}
    assert bits["model.layers.0.mlp.down_proj"] == bits["model.layers.1.mlp.down_proj"] == 2
    assert bits["model.layers.0.self_attn.q_proj"] == 8 and bits["model.layers.1.self_attn.q_proj"] == 4
    assert layers["model.layers.0.self_attn.q_proj"].weight_quantizer.quantizer.scale.shape == (64,)  # per channel
    assert layers["model.layers.1.self_attn.q_proj"].weight_quantizer.quantizer.scale.shape == (64 * 64 // 32,)
    ids = torch.randint(0, 96, (2, 10))
    before = lm_qat_steps(model, ids)
    model.save_pretrained(tmp_path / "q")
    from safetensors import safe_open
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_packed").get_shape() == [64 * 128 * 2 // 8]
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_packed").get_shape() == [64 * 64]
    again = pege_hf.from_pretrained(tmp_path / "q", auto_class=AutoModelForCausalLM).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    assert again.config.quantization_config.layer_overrides == cfg.layer_overrides


@pytest.mark.parametrize("name,per_token", [("dynamic_token", True), ("dynamic_tensor", False)])
@pytest.mark.parametrize("progress", [0.4, 1.0])
def test_dynamic_activation_quantizers_with_pege_mixing_match_float64(name, per_token, progress):
    torch.manual_seed(1)
    lam = 0.2
    cfg = PEGEConfig(w_bits=4, a_bits=8, a_quantizer=name, a_mask="progressive", discretization_lambda=lam)
    fq = make_fake_quantizer(cfg, weight=False, seed=5).double()
    fq.train()
    fq.set_progress(progress)
    x = (torch.randn(3, 5, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16, dtype=torch.float64)).requires_grad_()
    g = torch.randn(3, 5, 16, dtype=torch.float64)
    out = fq(x)
    out.backward(g)
    xd = x.detach()
    s = (xd.abs().amax(-1, keepdim=True) if per_token else xd.abs().amax()) / 127
    ref_q = torch.clamp(torch.round(xd / s), -128, 127) * s
    m = replacement_mask(xd, replacement_ratio(progress), "progressive", seed=fq.seed).double()
    assert torch.allclose(out, m * ref_q + (1 - m) * xd, atol=1e-12)
    pull = 2 * lam / xd.numel() * (xd - ref_q) / s**2  # lam * mean(((x - sg Q) / sg s)^2), s per token
    v = xd / s  # clipped STE: max|x| / s lands on qmax up to rounding, either side of it
    inside = ((v >= -128) & (v <= 127)).double()
    assert torch.allclose(x.grad, g * (m * inside + 1 - m) + pull, atol=1e-10)
    assert not list(fq.parameters())  # nothing learned


def test_dynamic_quantizers_are_for_activations_only():
    with pytest.raises(ValueError, match="PEGEConfig.w_quantizer must be one of 'lsq', 'minmax', 'symmetric'; got "
                                         "'dynamic_token'"):
        PEGEConfig(w_quantizer="dynamic_token")


def test_symmetric_quantizer_is_for_weights_only():
    from pege_hf.quant.quantizers import make_quantizer

    with pytest.raises(ValueError, match="PEGEConfig.a_quantizer must be one of .*; got 'symmetric'"):
        PEGEConfig(a_quantizer="symmetric")
    with pytest.raises(ValueError, match="quantizer 'symmetric' is for weights"):
        make_quantizer("symmetric", 4, weight=False)


def test_symmetric_weights_follow_the_latent_weights_like_torchaos_fake_quantizer():
    """w_quantizer="symmetric" at W2 group 32: the step size is recomputed from the current weights on every
    training forward (nothing learned), s = max|w| / 1.5 per group, as torchao's IntxFakeQuantizer computes
    it (MappingType.SYMMETRIC); compared with a float64 formula and, where torchao is importable, with it."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(64, 4), PEGEConfig(w_bits=2, a_bits=None, group_size=32,
                                                                      w_quantizer="symmetric", estimator="ste"))
    layer.train()
    assert not list(layer.weight_quantizer.parameters())
    for _ in range(2):  # after a change of the latent weights too
        w = layer.weight.detach().double().reshape(4, 2, 32)
        s = w.abs().amax(-1, keepdim=True) / 1.5
        ref = (torch.clamp(torch.round(w / s), -2, 1) * s).reshape(4, 64)
        got = layer.quantized_weight()
        assert torch.allclose(got.double(), ref, atol=1e-6)
        with torch.no_grad():
            layer.weight.mul_(torch.rand_like(layer.weight) + 0.5)
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    except ImportError:
        return  # torchao is an optional peer (benchmarks' .deps), not a dependency
    fq = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int2, group_size=32, is_symmetric=True))
    assert torch.allclose(layer.quantized_weight(), fq(layer.weight.detach()), atol=1e-6)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("estimator", ["ste", "pege"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_weights_pass_the_gradient_where_the_rounded_code_is_in_range(bits, estimator, compiled):
    """The window of PyTorch's fake_quantize and torchao's QAT: d Q / d w = 1 where qmin <= round(w / s) <= qmax,
    not only where qmin <= w / s <= qmax (LSQ's rule). Under the symmetric scale w / s reaches (qmax - qmin) / 2, so
    LSQ's rule would stop the gradient of every weight between qmax s and that (17% of them at W2 group 32).
    Compared with a float64 formula away from rounding ties (each group's largest magnitude sits on one), and,
    where torchao is importable, with its fake quantizer's gradient."""
    torch.manual_seed(bits)
    config = PEGEConfig(w_bits=bits, a_bits=None, group_size=32, w_quantizer="symmetric", estimator=estimator,
                        discretization_lambda=0.0)
    layer = QuantLinear.from_float(torch.nn.Linear(128, 16), config).train()
    layer.weight_quantizer.set_progress(1.0)
    g = torch.randn(16, 128)
    kernels.use_compiled_kernels(compiled)
    try:
        layer.quantized_weight().backward(g)
    finally:
        kernels.use_compiled_kernels(False)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = layer.weight.detach().double().reshape(16, 4, 32)
    v = (w / (w.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2))).reshape(16, 128)
    away = ((v - v.floor()) - 0.5).abs() > 1e-4
    inside = (torch.round(v) >= qmin) & (torch.round(v) <= qmax)
    assert torch.equal(layer.weight.grad[away], torch.where(inside, g, 0.0)[away])
    assert ((v > qmax) & inside & away).float().mean() > {2: 0.1, 3: 0.03, 4: 0.01}[bits]  # LSQ's rule differs there
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
    except ImportError:
        return
    w_ao = layer.weight.detach().clone().requires_grad_()
    IntxFakeQuantizer(IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), group_size=32, is_symmetric=True))(
        w_ao).backward(g)
    assert torch.allclose(layer.weight.grad[away], w_ao.grad[away], rtol=1e-6, atol=1e-7)


def test_symmetric_step_sizes_follow_the_weights_after_an_optimizer_step_but_not_after_loading():
    """A weight quantizer that observes its weights (w_quantizer="symmetric") evaluates, saves and exports with the
    step size of the weights as they are after the last optimizer step, not the one its last training forward
    saw (torchao recomputes it on every call); a layer whose step sizes were loaded keeps them: its weights are
    then dequantized codes, whose largest magnitude is not the one they were quantized with (at W2 a -2 code
    is 4/3 of the largest latent weight)."""
    from pege_hf.quant.modules import refresh_weight_scales

    torch.manual_seed(0)
    config = PEGEConfig(w_bits=2, a_bits=None, group_size=32, w_quantizer="symmetric", estimator="ste")
    layer = QuantLinear.from_float(torch.nn.Linear(64, 8), config).train()
    q = layer.weight_quantizer.quantizer

    def reference(w):  # float64: s = max|w| / 1.5 per group of 32 from the given weights
        groups = w.detach().double().reshape(8, 2, 32)
        s = groups.abs().amax(-1, keepdim=True) / 1.5
        return (torch.clamp(torch.round(groups / s), -2, 1) * s).reshape(8, 64), s.reshape(-1)

    layer.quantized_weight().square().sum().backward()
    seen = q.scale.clone()
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    assert not torch.allclose(reference(layer.weight)[1].float(), seen)  # the step moved the groups' ranges
    refresh_weight_scales(layer)  # what saving and export do first
    assert torch.allclose(q.scale.double(), reference(layer.weight)[1], rtol=1e-6)
    q.scale.copy_(seen)  # as a forward left it
    layer.eval()
    want, s = reference(layer.weight)
    groups = layer.weight.detach().double().reshape(8, 2, 32)
    away = (((groups / s.view(8, 2, 1)).abs() - 1.5).abs() > 1e-5).reshape(8, 64)  # not on a rounding tie
    assert torch.allclose(layer.quantized_weight().double()[away], want[away], atol=1e-6)

    loaded = QuantLinear.from_float(torch.nn.Linear(64, 8), config).eval()
    state = {**layer.state_dict(), "weight": layer.quantized_weight().detach()}  # dequantized codes, their scale
    loaded.load_state_dict(state)
    assert torch.equal(loaded.quantized_weight(), state["weight"])  # the loaded step sizes, kept
    assert not torch.allclose(reference(state["weight"])[0].float(), state["weight"])  # re-observing would differ
    refresh_weight_scales(loaded)
    assert torch.equal(loaded.weight_quantizer.quantizer.scale, layer.weight_quantizer.quantizer.scale)


def test_a_trained_symmetric_w2_model_saves_and_reloads_the_function_it_evaluates(tmp_path):
    """After QAT steps, evaluation, the packed checkpoint and its reload agree exactly on torchao's W2 weight
    quantizer: saving packs codes and step sizes of the weights as they are after the last optimizer step, and the
    reloaded model keeps the stored step sizes rather than re-observing its dequantized weights (which at W2 would
    move every group whose largest magnitude became a -2 code)."""
    from transformers import AutoModelForCausalLM

    _tiny_llama().save_pretrained(tmp_path / "fp")
    cfg = PEGEConfig(w_bits=2, a_bits=None, group_size=32, w_quantizer="symmetric", estimator="ste")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=cfg)
    ids = torch.randint(0, 96, (2, 10))
    before = lm_qat_steps(model, ids, steps=3)
    model.save_pretrained(tmp_path / "q")
    again = pege_hf.from_pretrained(tmp_path / "q", auto_class=AutoModelForCausalLM).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    layer = dict(quant_layers(again))["model.layers.0.mlp.down_proj"]
    w = layer.weight.detach().reshape(-1, 32)
    observed = w.abs().amax(-1) / 1.5
    assert not torch.allclose(observed, layer.weight_quantizer.quantizer.scale)  # re-observing would differ


def test_layer_overrides_are_validated_when_built():
    with pytest.raises(ValueError, match=r"layer_overrides\['mlp'\]: PEGEConfig.w_bits must be an integer from 2 to 8; got 1"):
        PEGEConfig(layer_overrides={"mlp": {"w_bits": 1}})
    with pytest.raises(ValueError, match=r"layer_overrides\['mlp'\] sets 'lr'; a layer can override w_bits"):
        PEGEConfig(layer_overrides={"mlp": {"lr": 1}})


def test_from_pretrained_picks_the_model_class_the_checkpoint_names(tmp_path):
    from transformers import LlamaForCausalLM

    from pege_hf.sources import SHIPPED_MODELS_DIR

    model = _tiny_llama()
    pege_hf.quantize(model, PEGEConfig(w_bits=4, a_bits=None, group_size=16))
    model.save_pretrained(tmp_path / "llm")
    again = pege_hf.from_pretrained(tmp_path / "llm")
    assert type(again) is LlamaForCausalLM and quant_layers(again)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    cnn = pege_hf.from_pretrained(SHIPPED_MODELS_DIR / "resnet20-pege-w2a2")
    assert type(cnn).__name__.endswith("ForImageClassification") and quant_layers(cnn)
