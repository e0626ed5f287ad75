"""The PEGE core against independent float64 formulas (method: shared/docs/pege-method.md)."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import pege_hf
from pege_hf import PEGEConfig
from pege_hf.quant.curriculum import element_priority, replacement_mask, replacement_ratio
from pege_hf.quant.modules import QuantConv2d, QuantLinear, layers_to_skip, make_fake_quantizer
from pege_hf.quant.packing import pack_codes, packed_size, unpack_codes
from pege_hf.quant.quantizers import init_scale_lsq, init_scale_mse, make_quantizer, qrange, quantization_mse

torch.set_default_dtype(torch.float32)


def ref_lsq(x, s, qn, qp, g, gscale, delta=0.0):
    """Float64 LSQ fake quantization and its gradients (STE when delta = 0, EWGS otherwise), written
    from the formulas: out = s round(clamp(x/s)); d/dx = g 1[in] (times EWGS' factor);
    d/ds = g (round(v) - x/s) inside, g * qn / g * qp outside, times the LSQ scale."""
    v = x / s
    inside = ((v >= qn) & (v <= qp)).double()
    vc = v.clamp(qn, qp)
    r = torch.round(vc)
    out = r * s
    factor = 1 + delta * torch.sign(g) * (vc - r) / (qp - qn)
    grad_x = g * factor * inside
    grad_s_el = g * (r + s * factor * (-x / s**2) * inside)
    return out, grad_x, grad_s_el, gscale


def sum_per_channel(t, axis):
    if axis is None:
        return t.sum().reshape(1)
    return t.transpose(0, axis).reshape(t.shape[axis], -1).sum(1)


def make_fq(estimator="pege", bits=2, weight=True, channels=8, **kw):
    cfg = PEGEConfig(w_bits=bits, a_bits=bits, estimator=estimator, **kw)
    return make_fake_quantizer(cfg, weight=weight, channels=channels, seed=123).double()


SHAPES = [(8, 3, 3, 3), (16, 40), (5, 7)]


# ---------------------------------------------------------------------------------------------
# Curriculum and masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_log_curriculum_matches_formula(p):
    alpha, ramp = 9.0, 0.75
    expected = min(1.0, math.log(1 + alpha * min(p / ramp, 1.0)) / math.log(1 + alpha))
    assert replacement_ratio(p, "log", alpha, ramp) == pytest.approx(expected, abs=1e-12)
    assert replacement_ratio(p, "linear", alpha, ramp) == pytest.approx(min(1.0, p / ramp))
    assert replacement_ratio(p, "cosine", alpha, ramp) == pytest.approx((1 - math.cos(math.pi * min(1.0, p / ramp))) / 2)
    assert replacement_ratio(p, "instant") == 1.0


def test_log_curriculum_anchor_points_from_method_doc():
    assert replacement_ratio(0.1 * 0.75) == pytest.approx(0.28, abs=0.005)
    assert replacement_ratio(0.5 * 0.75) == pytest.approx(0.74, abs=0.005)


def test_progressive_mask_fraction_monotone_and_deterministic():
    x = torch.zeros(64, 64, 3, 3)
    previous = torch.zeros_like(x, dtype=torch.bool)
    for r in [0.0, 0.1, 0.28, 0.5, 0.74, 0.9, 1.0]:
        m = replacement_mask(x, r, "progressive", seed=7)
        assert abs(m.float().mean().item() - r) < 0.01
        assert bool((m | ~previous).all()), "an element left the quantized set as r grew"
        previous = m
    assert torch.equal(replacement_mask(x, 0.4, "progressive", seed=7), replacement_mask(x, 0.4, "progressive", seed=7))
    assert not torch.equal(replacement_mask(x, 0.4, "progressive", seed=7), replacement_mask(x, 0.4, "progressive", seed=8))


def test_priorities_are_uniform():
    p = element_priority((200_000,), seed=3)
    hist = torch.histc(p, bins=10, min=0, max=1) / p.numel()
    assert (hist - 0.1).abs().max() < 0.005
    assert p.min() >= 0 and p.max() < 1


def test_random_bytes_are_uniform():
    from pege_hf.quant.curriculum import random_bytes

    torch.manual_seed(0)  # a statistical check: a fixed draw, so it cannot fail by chance
    b = random_bytes(1_000_003)
    assert b.dtype == torch.uint8 and b.numel() == 1_000_003
    freq = torch.bincount(b.long(), minlength=256).double() / b.numel()
    assert (freq * 256 - 1).abs().max() < 0.06  # each of the 256 values within 6% of 1/256 (~4 sigma)
    assert b.double().mean().item() == pytest.approx(127.5, abs=0.3)
    for k in range(8):  # every byte of a drawn word, the top one included (mean's sigma here ~0.2)
        assert b[k::8].double().mean().item() == pytest.approx(127.5, abs=1.2)


def test_bytes_below_is_the_comparison_as_a_bool_tensor():
    from pege_hf.quant.curriculum import bytes_below

    every = torch.arange(256, dtype=torch.uint8)
    for threshold in (0, 1, 77, 255):
        m = bytes_below(every, threshold)
        assert m.dtype == torch.bool and m.tolist() == [v < threshold for v in range(256)]
        assert int(m.sum()) == threshold  # the viewed bytes are 0/1: bool arithmetic counts them right
    cl = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    m = bytes_below(cl, 100)
    assert m.is_contiguous(memory_format=torch.channels_last) and torch.equal(m, cl < 100)
    assert torch.equal(torch.where(m, 1.0, 0.0), (cl < 100).float())


def _lowbias32_byte(index: int, key: int) -> int:
    """The low byte of C. Wellons' lowbias32 hash of index ^ key, in Python's unbounded integers."""
    v = (index ^ key) & 0xFFFFFFFF
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    v ^= v >> 16
    return v & 255


def test_counter_bytes_are_lowbias32_of_the_memory_position():
    from pege_hf.quant.curriculum import counter_bytes

    like = torch.empty(3, 5, 7, 9)
    for key in (0, 12345, 2**31 - 1):
        got = counter_bytes(like, key).flatten().tolist()
        assert got == [_lowbias32_byte(i, key) for i in range(like.numel())]
    cl = like.contiguous(memory_format=torch.channels_last)
    got = counter_bytes(cl, 7)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert got.permute(0, 2, 3, 1).flatten().tolist() == [_lowbias32_byte(i, 7) for i in range(like.numel())]
    strided = torch.empty(4, 6)[:, ::2]  # not dense: positions in row-major order, as a tensor like it is laid out
    assert counter_bytes(strided, 5).flatten().tolist() == [_lowbias32_byte(i, 5) for i in range(12)]
    with pytest.raises(ValueError, match="counter masks number elements in int32: a tensor of 2,147,483,648 elements"):
        counter_bytes(torch.empty(2**31, device="meta"), 1)
    every = counter_bytes(torch.empty(1 << 20), 99)  # 2^20 indices: 4096 per byte value when uniform
    freq = torch.bincount(every.long(), minlength=256).double() / 4096
    assert (freq - 1).abs().max() < 0.07  # ~4.5 sigma of a uniform byte's count


def test_counter_masks_are_fresh_bernoulli_draws_from_torch_seed():
    from pege_hf.quant.curriculum import CounterMask

    x = torch.randn(100_000)
    torch.manual_seed(3)
    recipe = replacement_mask(x, 0.3, "counter", lazy=True)
    torch.manual_seed(3)
    m = replacement_mask(x, 0.3, "counter")
    assert isinstance(recipe, CounterMask) and recipe.threshold == round(0.3 * 256)
    assert m.dtype == torch.bool and torch.equal(m, recipe.materialize(x))
    assert abs(m.float().mean().item() - 77 / 256) < 0.005
    assert not torch.equal(m, replacement_mask(x, 0.3, "counter"))  # a new key per call
    assert bool(replacement_mask(x, 1.0, "counter", lazy=True).all())  # r = 1: every element, no recipe
    assert not replacement_mask(x, 0.0, "counter").any()


def test_auto_activation_mask_is_counter_under_compiled_kernels_and_bernoulli_eager(monkeypatch):
    """a_mask="auto" (the default) gives a layer exactly the output of a_mask="bernoulli" with eager kernels and of
    a_mask="counter" under compiled kernels (same torch seed: the same draws); weights take no "auto"."""
    from pege_hf.quant import kernels
    from pege_hf.quant.curriculum import resolve_mask_policy

    assert PEGEConfig().a_mask == "auto"

    def output(mask, compiled):
        monkeypatch.setattr(kernels, "compiled_kernels_enabled", lambda: compiled)  # eager kernels take recipes too
        layer, x = _quant_layer("conv", "pege", 0.3, "progressive")
        layer.input_quantizer.mask = mask
        torch.manual_seed(7)
        return layer(x)

    for compiled, same, other in ((False, "bernoulli", "counter"), (True, "counter", "bernoulli")):
        auto = output("auto", compiled)
        assert torch.equal(auto, output(same, compiled))
        assert not torch.equal(auto, output(other, compiled))
    with pytest.raises(ValueError, match="w_mask"):
        PEGEConfig(w_mask="auto")
    # counter masks number elements in int32: "auto" falls back to random bytes beyond, "counter" refuses
    assert resolve_mask_policy("auto", True, 2**31 - 1) == "counter"
    assert resolve_mask_policy("auto", True, 2**31) == "bernoulli"
    assert resolve_mask_policy("counter", True, 2**31) == "counter"


@pytest.mark.parametrize("policy", ["counter", "progressive"])
def test_kernels_take_a_mask_recipe_as_its_materialised_mask(policy):
    """mixed_forward, pege_backward and FakeQuantPEGE give the same bits for a mask's recipe (evaluated in the
    kernel) and for the bool mask replacement_mask materialises from it, in either memory layout."""
    from pege_hf.quant import kernels
    from pege_hf.quant.curriculum import CounterMask, ProgressiveMask
    from pege_hf.quant.estimators import FakeQuantPEGE

    torch.manual_seed(0)
    x, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    s, coef = torch.tensor(0.3), torch.tensor(0.01)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        torch.manual_seed(1)
        recipe = replacement_mask(x, 0.4, policy, seed=3, lazy=True)
        torch.manual_seed(1)
        mask = replacement_mask(x, 0.4, policy, seed=3)
        assert isinstance(recipe, {"counter": CounterMask, "progressive": ProgressiveMask}[policy])
        assert torch.equal(recipe.materialize(x), mask) and 0.3 < mask.float().mean() < 0.5
        assert torch.equal(kernels.mixed_forward(x, s, -2.0, 1.0, recipe), kernels.mixed_forward(x, s, -2.0, 1.0, mask))
    recipe = CounterMask(key=424242, threshold=100) if policy == "counter" else recipe
    mask = recipe.materialize(x)
    assert torch.equal(kernels.mixed_forward(x, s, -2.0, 1.0, recipe), kernels.mixed_forward(x, s, -2.0, 1.0, mask))
    for replaced_only in (False, True):
        got = kernels.pege_backward(g, x, s, -2.0, 1.0, recipe, coef, replaced_only, True, True)
        ref = kernels.pege_backward(g, x, s, -2.0, 1.0, mask, coef, replaced_only, True, True)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    grads = []
    for m in (recipe, mask):
        xx, ss = x.clone().requires_grad_(), s.clone().requires_grad_()
        out = FakeQuantPEGE.apply(xx, ss, -2.0, 1.0, m, coef, "all", "both")
        (out * g).sum().backward()
        grads.append((out.detach(), xx.grad, ss.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_masks_follow_the_memory_layout():
    x = torch.randn(64, 16, 8, 8)
    cl = x.contiguous(memory_format=torch.channels_last)
    for policy in ("progressive", "bernoulli"):
        m = replacement_mask(cl, 0.3, policy, seed=5)
        assert m.shape == x.shape and m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous()
        assert m.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(replacement_mask(cl, 0.3, "progressive", seed=5), replacement_mask(x, 0.3, "progressive", seed=5))
    # a Bernoulli mask takes the random bytes in memory order: the same draws, another logical mask
    torch.manual_seed(0)
    flat = replacement_mask(x, 0.3, "bernoulli")
    torch.manual_seed(0)
    permuted = replacement_mask(cl, 0.3, "bernoulli")
    assert torch.equal(permuted.permute(0, 2, 3, 1).flatten(), flat.flatten())
    assert replacement_mask(cl, 1.0, "bernoulli").is_contiguous(memory_format=torch.channels_last)
    strided = x[:, ::2]  # not dense: a plain contiguous mask of its shape
    m = replacement_mask(strided, 0.3, "bernoulli")
    assert m.shape == strided.shape and m.is_contiguous()


def test_bernoulli_and_error_masks():
    x = torch.randn(100_000)
    m1, m2 = replacement_mask(x, 0.3, "bernoulli"), replacement_mask(x, 0.3, "bernoulli")
    assert abs(m1.float().mean() - 0.3) < 0.01 and not torch.equal(m1, m2)
    err = torch.randn(1000)
    m = replacement_mask(err, 0.25, "error", error=err)
    assert int(m.sum()) == 250
    assert err.abs()[m].max() <= err.abs()[~m].min()


# ---------------------------------------------------------------------------------------------
# Step-size initialisation
# ---------------------------------------------------------------------------------------------
def _dense_search_mse(x, qmin, qmax, axis, points=2000):
    """Reference: the least quantization MSE per channel over a dense float64 grid of clip fractions."""
    x = x.double()
    dims = [d for d in range(x.dim()) if d != axis]
    xmax = x.abs().amax(dim=dims, keepdim=True)
    best = None
    for f in torch.linspace(0.01, 1.0, points, dtype=torch.float64):
        s = xmax * f / qmax
        err = ((torch.clamp(x / s, qmin, qmax).round() * s - x) ** 2).mean(dim=dims)
        best = err if best is None else torch.minimum(best, err)
    return best


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("case", ["gaussian-weight", "laplace-weight", "relu-activation"])
def test_mse_init_matches_a_dense_float64_search(bits, case):
    g = torch.Generator().manual_seed(bits)
    if case == "gaussian-weight":
        x, axis, signed = torch.randn(16, 8, 3, 3, generator=g), 0, True
    elif case == "laplace-weight":
        u = torch.rand(32, 64, generator=g) - 0.5
        x, axis, signed = -u.sign() * torch.log1p(-2 * u.abs()), 0, True
    else:
        x, axis, signed = torch.randn(8, 16, 6, 6, generator=g).relu(), None, False
    qmin, qmax = qrange(bits, signed)
    s = init_scale_mse(x, qmin, qmax, axis)
    assert s.shape == ((x.shape[0],) if axis == 0 else ())
    got = quantization_mse(x.double(), s.double(), qmin, qmax, axis)
    best = _dense_search_mse(x, qmin, qmax, axis)
    assert bool((got <= best * 1.005).all()), (got / best).max()  # within 0.5% of the dense optimum
    lsq = quantization_mse(x.double(), init_scale_lsq(x, qmax, axis).double(), qmin, qmax, axis)
    assert got.sum() < lsq.sum()  # and better than LSQ's rule, the point of it


@pytest.mark.parametrize("case", ["wide-weight", "big-activation"])
def test_mse_init_on_big_tensors_searches_a_sample_and_stays_near_the_optimum(case):
    """Past MSE_SAMPLES_PER_CHANNEL elements a channel (or MSE_SAMPLES_PER_TENSOR a tensor) the search
    runs on an evenly strided sample; the step size it finds is still within 1% of the dense optimum's MSE."""
    from pege_hf.quant.quantizers import MSE_SAMPLES_PER_CHANNEL, MSE_SAMPLES_PER_TENSOR, mse_sample

    g = torch.Generator().manual_seed(3)
    if case == "wide-weight":
        x, axis, (qmin, qmax) = torch.randn(8, 4 * MSE_SAMPLES_PER_CHANNEL, generator=g), 0, qrange(2, True)
        sample, _ = mse_sample(x, axis)
        assert sample.shape == (8, MSE_SAMPLES_PER_CHANNEL)
    else:
        x, axis, (qmin, qmax) = torch.randn(4 * MSE_SAMPLES_PER_TENSOR, generator=g).relu(), None, qrange(2, False)
        assert mse_sample(x, axis)[0].numel() == MSE_SAMPLES_PER_TENSOR
    s = init_scale_mse(x, qmin, qmax, axis)
    got = quantization_mse(x.double(), s.double(), qmin, qmax, axis)
    best = _dense_search_mse(x, qmin, qmax, axis, points=400)
    assert bool((got <= best * 1.01).all()), (got / best).max()
    small = torch.randn(4, 100, generator=g)
    assert mse_sample(small, 0)[0] is small  # small tensors are searched whole


def test_mse_init_without_fine_stage_is_the_plain_grid():
    w = torch.randn(6, 50, dtype=torch.float64)
    fracs = torch.linspace(0.05, 1.0, 80, dtype=torch.float64)
    xmax = w.abs().amax(dim=1, keepdim=True)
    errs = torch.stack([((torch.clamp(w / (xmax * f), -2, 1).round() * xmax * f - w) ** 2).mean(dim=1) for f in fracs])
    expected = xmax.squeeze(1) * fracs[errs.argmin(dim=0)]
    assert torch.allclose(init_scale_mse(w, -2, 1, 0, coarse=80, fine=0), expected, rtol=1e-6)  # float32 grid


def test_mse_init_reaches_the_quantizer_on_its_first_batch():
    w = torch.randn(8, 3, 3, 3)
    q = make_quantizer("lsq", 2, weight=True, channels=8, scale_init="mse")
    q(w)
    assert torch.equal(q.scale.detach(), init_scale_mse(w, -2, 1, 0).clamp_min(1e-8))
    with pytest.raises(ValueError, match="scale_init must be one of lsq, mse"):
        make_quantizer("lsq", 2, weight=True, channels=8, scale_init="max")


# ---------------------------------------------------------------------------------------------
# Forward: r = 0 is float, r = 1 is the forward quantizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [nn.Conv2d(16, 32, 3, padding=1), nn.Linear(64, 48)])
def test_pege_layer_endpoints(layer):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 16, 8, 8)) if isinstance(layer, nn.Conv2d) else torch.randn(4, 64)
    reference = layer(x)
    q = QuantConv2d.from_float(layer, PEGEConfig(w_bits=3, a_bits=3)) if isinstance(layer, nn.Conv2d) \
        else QuantLinear.from_float(layer, PEGEConfig(w_bits=3, a_bits=3))
    q.train()
    pege_hf.set_progress(q, 0.0)
    assert torch.equal(q(x), reference)
    # r = 1 (end of the ramp): exactly the forward quantizer's output
    pege_hf.set_progress(q, 1.0)
    wq = q.weight_quantizer.quantizer(q.weight)
    xq = q.input_quantizer.quantizer(x)
    expected = q._conv_forward(xq, wq, q.bias) if isinstance(q, nn.Conv2d) else nn.functional.linear(xq, wq, q.bias)
    assert torch.equal(q(x), expected)
    q.eval()  # evaluation always uses r = 1
    pege_hf.set_progress(q, 0.0)
    assert torch.equal(q(x), expected)


LAYER_CASES = [("ste", 1.0, "bernoulli"), ("ewgs", 1.0, "bernoulli"), ("pege", 0.3, "bernoulli"),
               ("pege", 0.3, "progressive"), ("pege", 1.0, "bernoulli"), ("pege", 0.0, "bernoulli")]


def _quant_layer(kind, estimator, progress, mask):
    torch.manual_seed(0)
    cfg = PEGEConfig(w_bits=2, a_bits=2, estimator=estimator, a_mask=mask, w_mask=mask, discretization_lambda=0.5)
    if kind == "conv":
        layer, x = QuantConv2d.from_float(nn.Conv2d(6, 8, 3, padding=1), cfg), torch.relu(torch.randn(8, 6, 9, 9))
    else:  # a 3-d input: F.linear saves a flattened view of it
        layer, x = QuantLinear.from_float(nn.Linear(12, 10), cfg), torch.relu(torch.randn(16, 20, 12))
    layer.train()
    layer(x)  # initialise the activation step size from data
    pege_hf.set_progress(layer, progress)
    return layer, x


def _plain_composition(layer, xq, wq):
    return layer._conv_forward(xq, wq, layer.bias) if isinstance(layer, nn.Conv2d) else nn.functional.linear(xq, wq, layer.bias)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("estimator,progress,mask", LAYER_CASES)
def test_layer_rebuilds_its_quantized_input_exactly(kind, estimator, progress, mask):
    """A quant layer saves a recipe for Q(x) instead of Q(x) (saved_as_rebuild); its output and every
    gradient equal the plain composition op(fake_quant(x), fake_quant(w)) bit for bit."""
    layer, x0 = _quant_layer(kind, estimator, progress, mask)
    results = []
    for rebuilt in (True, False):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same random masks for both
        if rebuilt:
            out = layer(x)
        else:
            xq = layer.input_quantizer(x)
            out = _plain_composition(layer, xq, layer.weight_quantizer(layer.weight))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    assert all(g is not None for g in results[0][1:])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("estimator,progress,mask", LAYER_CASES)
def test_layer_keeps_no_float_copy_of_its_quantized_input(kind, estimator, progress, mask):
    """Autograd keeps x (which the ReLU before a layer keeps anyway) and, mid-ramp, PEGE's 1-byte mask:
    no float copy of Q(x). The float layer keeps x alone."""
    from pege_hf.bench import saved_activation_bytes

    layer, x = _quant_layer(kind, estimator, progress, mask)
    x = x.requires_grad_()
    float_layer = nn.Conv2d(6, 8, 3, padding=1) if kind == "conv" else nn.Linear(12, 10)
    head = nn.Flatten()

    def saved(m):
        return saved_activation_bytes(nn.Sequential(m, head), (x, torch.zeros(x.shape[0], dtype=torch.long)))

    extra = saved(layer) - saved(float_layer)
    masks = x.numel() if estimator == "pege" and progress < 1 else 0  # PEGE's ramp: a bool per input element
    weights = 4 * layer.weight.numel() + 64  # the quantized weight and step sizes
    assert masks + weights < 4 * x.numel()  # so a float copy of Q(x) would not fit in the bound below
    assert masks <= extra <= masks + weights


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("estimator,progress,mask", LAYER_CASES[:3])
def test_layer_frees_its_quantized_input_after_forward(monkeypatch, kind, estimator, progress, mask, autocast):
    """Nothing (autograd's saved tensors, the hooks) holds Q(x) once the forward returns, while the
    graph that will need it is still alive; under autocast the same holds for its bf16 cast."""
    import weakref

    from pege_hf.quant import modules

    layer, x = _quant_layer(kind, estimator, progress, mask)
    inputs = []
    real = modules.saved_as_rebuild
    monkeypatch.setattr(modules, "saved_as_rebuild", lambda xq, rebuild: (inputs.append(weakref.ref(xq)), real(xq, rebuild))[1])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x.requires_grad_())
    assert inputs[0]() is None and out.grad_fn is not None
    out.float().sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_layer_under_autocast_matches_the_plain_composition(kind):
    layer, x0 = _quant_layer(kind, "pege", 0.3, "bernoulli")
    results = []
    for rebuilt in (True, False):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x) if rebuilt else _plain_composition(layer, layer.input_quantizer(x), layer.weight_quantizer(layer.weight))
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        results.append([out, x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_in_place_change_of_a_layer_input_is_an_error():
    layer, x0 = _quant_layer("conv", "ste", 1.0, "bernoulli")
    x = x0.clone().requires_grad_()
    h = x * 1.0
    out = layer(h)
    h.mul_(2)  # Q(h) could no longer be rebuilt from h
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


@pytest.mark.parametrize("estimator", ["ste", "pege"])
def test_quant_layer_under_inference_mode(estimator):
    """Inference tensors carry no version counter: nothing may ask for one when nothing is saved."""
    layer, x = _quant_layer("conv", estimator, 0.3, "bernoulli")
    for training in (True, False):
        layer.train(training)
        torch.manual_seed(1)
        with torch.no_grad():
            expected = layer(x)
        torch.manual_seed(1)
        with torch.inference_mode():
            assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_quant_layer_under_activation_checkpointing(use_reentrant):
    """torch.utils.checkpoint (what gradient_checkpointing_enable uses) around a quant layer: same gradients."""
    from torch.utils.checkpoint import checkpoint

    layer, x0 = _quant_layer("conv", "pege", 0.3, "progressive")
    grads = []
    for wrapped in (True, False):
        x = x0.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = checkpoint(layer, x, use_reentrant=use_reentrant) if wrapped else layer(x)
        out.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_replaced_fraction_tracks_ratio_and_only_grows():
    fq = make_fq(channels=64).float()
    w = torch.randn(64, 64, 3, 3)
    fq.train()
    previous = None
    for p in [0.02, 0.1, 0.3, 0.5, 0.7]:
        fq.set_progress(p)
        qw = fq.quantizer(w)
        out = fq(w)
        replaced = (out == qw) & (qw != w)
        assert abs(replaced.float().mean().item() - fq.ratio) < 0.01
        if previous is not None:
            assert bool((replaced | ~previous).all())
        previous = replaced


# ---------------------------------------------------------------------------------------------
# Gradients against float64 formulas
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("estimator,delta", [("ste", 0.0), ("ewgs", 0.05)])
def test_ste_and_ewgs_gradients(shape, bits, estimator, delta):
    torch.manual_seed(bits)
    fq = make_fq(estimator, bits, channels=shape[0], ewgs_delta=delta)
    x = (torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    out = fq(x)
    out.backward(g)
    q = fq.quantizer
    s = q.scale.detach().view(-1, *[1] * (len(shape) - 1))
    qn, qp = float(q.qmin), float(q.qmax)
    n = x[0].numel()
    ref_out, ref_gx, ref_gs_el, _ = ref_lsq(x.detach(), s, qn, qp, g, None, delta)
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-12)
    assert torch.allclose(x.grad, ref_gx, rtol=1e-10, atol=1e-12)
    ref_gs = sum_per_channel(ref_gs_el, 0) / math.sqrt(n * qp)
    assert torch.allclose(q.scale.grad, ref_gs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scope", ["all", "replaced"])
@pytest.mark.parametrize("progress", [0.1, 0.4, 1.0])
def test_pege_gradients(shape, bits, scope, progress):
    torch.manual_seed(10 * bits)
    lam = 0.7
    fq = make_fq("pege", bits, channels=shape[0], discretization_lambda=lam, discretization_scope=scope)
    fq.train()
    fq.set_progress(progress)
    x = (torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    out = fq(x)
    out.backward(g)
    q = fq.quantizer
    s = q.scale.detach().view(-1, *[1] * (len(shape) - 1))
    qn, qp = float(q.qmin), float(q.qmax)
    r = replacement_ratio(progress)
    m = (element_priority(shape, fq.seed) < r).double()
    xd = x.detach()
    qx, gx_q, gs_el, _ = ref_lsq(xd, s, qn, qp, g * m, None)
    ref_out = m * qx + (1 - m) * xd
    d_grad = 2 * lam / xd.numel() * (xd - qx) / s**2       # d/dx of lam * mean(((x - sg Q) / sg s)^2)
    if scope == "replaced":
        d_grad = d_grad * m
    ref_gx = g * (1 - m) + gx_q + d_grad
    ref_gs = sum_per_channel(gs_el, 0) / math.sqrt(xd[0].numel() * qp)
    assert torch.equal(out, ref_out)
    assert torch.allclose(x.grad, ref_gx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(q.scale.grad, ref_gs, rtol=1e-9, atol=1e-12)


def test_pege_sum_reduction_and_follow_schedule():
    fq = make_fq("pege", 2, channels=5, discretization_lambda=0.3, discretization_reduction="sum",
                 lambda_schedule="follow", curriculum="instant")
    fq.train()
    fq.set_progress(0.5)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    fq(x).backward(g)
    q = fq.quantizer
    s = q.scale.detach().view(-1, 1)
    qx, gx_q, _, _ = ref_lsq(x.detach(), s, float(q.qmin), float(q.qmax), g, None)
    assert torch.allclose(x.grad, gx_q + 2 * 0.3 * 1.0 * (x.detach() - qx) / s**2, atol=1e-12)


def _ste_quantize(x, s, qn, qp):
    """s * round(clamp(x / s)) with round's gradient taken as 1 (LSQ's dQ/ds by autograd)."""
    vc = (x / s).clamp(qn, qp)
    return (vc + (vc.round() - vc).detach()) * s


@pytest.mark.parametrize("form", ["scaled", "plain"])
@pytest.mark.parametrize("target", ["latent", "step_size", "both"])
@pytest.mark.parametrize("scope", ["all", "replaced"])
@pytest.mark.parametrize("progress", [0.4, 1.0])
def test_discretization_forms_and_targets_match_autograd_of_the_term(form, target, scope, progress):
    """Task gradient + the gradient of D, by float64 autograd of D's formula: scaled D = lam mean(((x - sg Q) / sg s)^2),
    plain D = lam / 2 sum((x - sg Q)^2) (the author's u (x - Q), clipped elements included); D reaches x
    (target latent/both) and/or the step size through Q(x; s) (step_size/both)."""
    torch.manual_seed(7)
    shape, bits = (6, 4, 3, 3), 2
    lam, reduction = (0.3, "mean") if form == "scaled" else (0.05, "sum")
    fq = make_fq("pege", bits, channels=shape[0], discretization_lambda=lam, discretization_scope=scope,
                 discretization_form=form, discretization_target=target, discretization_reduction=reduction)
    fq.train()
    fq.set_progress(progress)
    x0 = torch.randn(shape, dtype=torch.float64) * 0.8
    g = torch.randn(shape, dtype=torch.float64)
    x = x0.clone().requires_grad_()
    fq(x).backward(g)
    q = fq.quantizer
    qn, qp = float(q.qmin), float(q.qmax)
    m = (element_priority(shape, fq.seed) < replacement_ratio(progress)).double()
    xr = x0.clone().requires_grad_()
    sr = q.scale.detach().view(-1, 1, 1, 1).clone().requires_grad_()
    out = m * _ste_quantize(xr, sr, qn, qp) + (1 - m) * xr
    x_term = xr if target in ("latent", "both") else xr.detach()
    q_term = _ste_quantize(x0, sr if target in ("step_size", "both") else sr.detach(), qn, qp)
    err = (x_term - q_term) ** 2 * (m if scope == "replaced" else 1.0)
    d = lam * (err / sr.detach() ** 2).mean() if form == "scaled" else lam / 2 * err.sum()
    ((g * out).sum() + d).backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    lsq_scale = 1 / math.sqrt(x0[0].numel() * qp)
    assert torch.allclose(q.scale.grad, sr.grad.flatten() * lsq_scale, rtol=1e-9, atol=1e-12)
    if target == "step_size":  # D moves the step size only: x's gradient is the task's alone
        plain = make_fq("pege", bits, channels=shape[0], discretization_lambda=0.0)
        plain.load_state_dict(fq.state_dict())
        plain.train()
        plain.set_progress(progress)
        x2 = x0.clone().requires_grad_()
        plain(x2).backward(g)
        assert torch.equal(x.grad, x2.grad)


def test_discretization_target_needs_a_uniform_quantizer():
    class Custom(nn.Module):  # a plug-in quantizer: forward(x, round_fn) and step_size(x)
        def forward(self, x, round_fn):
            return round_fn(x)

        def step_size(self, x):
            return torch.ones(())

    from pege_hf.quant.modules import FakeQuantizer
    FakeQuantizer(Custom(), PEGEConfig(), mask="progressive")  # the default target works with any quantizer
    with pytest.raises(ValueError, match="discretization_target='step_size' needs a uniform quantizer"):
        FakeQuantizer(Custom(), PEGEConfig(discretization_target="step_size"), mask="progressive")


def test_log_and_exp_lambda_schedules():
    from pege_hf.quant.curriculum import discretization_weight

    # the author's exponential u(t): 1e-8 -> 5e-8 over training, geometric
    exp = [discretization_weight(5e-8, 0.3, "exp", progress=p, start=1e-8) for p in (0.0, 0.5, 1.0, 2.0)]
    assert exp == pytest.approx([1e-8, 1e-8 * 5 ** 0.5, 5e-8, 5e-8], rel=1e-12)
    log = [discretization_weight(0.4, 0.3, "log", progress=p, start=0.1, alpha=9.0) for p in (0.0, 0.5, 1.0)]
    assert log == pytest.approx([0.1, 0.1 + 0.3 * math.log(5.5) / math.log(10.0), 0.4], rel=1e-12)
    fq = make_fq("pege", 2, channels=5, discretization_lambda=5e-8, lambda_schedule="exp", lambda_start=1e-8)
    fq.set_progress(0.5)
    assert fq.lam == pytest.approx(1e-8 * 5 ** 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="lambda_start must be > 0 for lambda_schedule='exp'"):
        PEGEConfig(lambda_schedule="exp")


def test_lambda_schedules():
    from pege_hf.quant.curriculum import discretization_weight

    assert [discretization_weight(0.2, r, "constant") for r in (0.0, 0.5, 1.0)] == [0.2, 0.2, 0.2]
    assert [discretization_weight(0.2, r, "follow") for r in (0.0, 0.5, 1.0)] == [0.0, 0.1, 0.2]
    assert [discretization_weight(0.2, r, "ramp") for r in (0.0, 0.999, 1.0)] == [0.2, 0.2, 0.0]
    with pytest.raises(ValueError, match="unknown lambda schedule 'x'"):
        discretization_weight(0.2, 0.5, "x")


def test_ramp_schedule_drops_the_pull_once_fully_replaced():
    """With lambda_schedule="ramp" the pull acts during the ramp and PEGE's gradient is exactly STE's after it."""
    fq = make_fq("pege", 2, channels=5, discretization_lambda=0.3, lambda_schedule="ramp", ramp_fraction=0.5)
    fq.train()
    x0 = torch.randn(5, 7, dtype=torch.float64)
    g = torch.randn(5, 7, dtype=torch.float64)
    q = fq.quantizer
    grads = {}
    for progress in (0.25, 0.75):  # mid-ramp, then after the ramp (r = 1)
        fq.set_progress(progress)
        x = x0.clone().requires_grad_()
        fq(x).backward(g)
        grads[progress] = x.grad
    assert fq.lam == 0.0
    s = q.scale.detach().view(-1, 1)
    _, ste_grad, _, _ = ref_lsq(x0, s, float(q.qmin), float(q.qmax), g, None)
    assert torch.allclose(grads[0.75], ste_grad, rtol=0, atol=1e-12)
    fq.set_progress(0.25)
    assert fq.lam == 0.3


@pytest.mark.parametrize("bits", [2, 4])
def test_pege_instant_without_lambda_is_ste(bits):
    torch.manual_seed(1)
    layer = nn.Conv2d(8, 16, 3)
    x = torch.relu(torch.randn(2, 8, 10, 10))
    outs, grads = [], []
    for est in ("ste", "pege"):
        cfg = PEGEConfig(w_bits=bits, a_bits=bits, estimator=est, curriculum="instant", discretization_lambda=0.0)
        q = QuantConv2d.from_float(nn.Conv2d(8, 16, 3).requires_grad_(), cfg)
        q.load_state_dict({k: v for k, v in layer.state_dict().items()}, strict=False)
        q.init_weight_scale()
        q.train()
        pege_hf.set_progress(q, 0.2)
        xi = x.clone().requires_grad_()
        out = q(xi)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in q.parameters()])
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_pact_clip_gradient():
    q = make_quantizer("pact", 2, weight=False).double()
    x = torch.tensor([0.0, 0.3, 0.9, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    q.initialize(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    alpha = q.clip.detach().clone()
    out = q(x)
    out.sum().backward()
    s = alpha / 3
    v = x.detach() / s
    ref = torch.where(v > 3, torch.ones_like(v), (torch.round(v.clamp(0, 3)) - v) / 3)
    assert torch.allclose(out, torch.round((x.detach() / s).clamp(0, 3)) * s)
    assert torch.allclose(q.clip.grad, ref.sum().reshape(1))


def test_minmax_quantizer_is_absmax_and_not_learned():
    q = make_quantizer("minmax", 4, weight=True, channels=3)
    w = torch.randn(3, 10)
    out = q(w)
    s = w.abs().amax(1, keepdim=True) / 7
    assert torch.allclose(out, torch.round((w / s).clamp(-8, 7)) * s)
    assert not list(q.parameters())


# ---------------------------------------------------------------------------------------------
# Codes, activations, the swap
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_levels_and_codes(bits):
    layer = QuantConv2d.from_float(nn.Conv2d(16, 32, 3), PEGEConfig(w_bits=bits, a_bits=bits))
    layer.eval()
    wq = layer.quantized_weight()
    for channel in wq:
        assert channel.unique().numel() <= 2**bits
    q = layer.weight_quantizer.quantizer
    codes = q.codes(layer.weight)
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert torch.equal(codes.float() * q.scale_tensor().view(-1, 1, 1, 1), wq)


def test_activation_signedness_from_data():
    unsigned = make_quantizer("lsq", 2, weight=False)
    unsigned(torch.relu(torch.randn(100)))
    assert (float(unsigned.qmin), float(unsigned.qmax)) == (0.0, 3.0)
    signed = make_quantizer("lsq", 2, weight=False)
    signed(torch.randn(100))
    assert (float(signed.qmin), float(signed.qmax)) == (-2.0, 1.0)


def test_quantize_keeps_stem_and_head_float():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4, 10))
    cfg = PEGEConfig(w_bits=2, a_bits=2)
    assert layers_to_skip(model, cfg) == {"0", "5"}
    pege_hf.quantize(model, cfg)
    assert type(model[0]) is nn.Conv2d and type(model[5]) is nn.Linear and isinstance(model[2], QuantConv2d)
    text = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert layers_to_skip(text, cfg) == {"2"}  # an embedding reads the input: no stem layer to keep
    every = PEGEConfig(skip_stem=False, skip_head=False, modules_to_not_convert=["2"])
    model = pege_hf.quantize(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)), every)
    assert [type(m).__name__ for m in model] == ["QuantLinear", "QuantLinear", "Linear"]


def test_quantized_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    pege_hf.quantize(model, PEGEConfig(w_bits=2, a_bits=2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.randn(256, 4)
    y = (x[:, 0] * x[:, 1] > 0).long()
    losses = []
    for step in range(60):
        pege_hf.set_progress(model, step / 59)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("estimator", [None, "ste", "pege"])
def test_channels_last_model_computes_the_same_loss_and_gradients(estimator):
    """`pege train --channels-last` lays the 4-D weights out channels-last: the quantizers, masks and the
    discretization pull see the same logical elements, so loss and gradients equal the contiguous model's (PEGE
    mid-ramp with progressive masks, the same logical masks in every layout; Bernoulli masks are drawn in memory
    order, test_masks_follow_the_memory_layout). In float64, so that no element lands on the other side of a
    rounding boundary (in float32 a few do, and a 2-bit code flip moves the gradients)."""
    from pege_hf.hf.cifar import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(8)
    if estimator is not None:
        model = pege_hf.quantize(model, PEGEConfig(w_bits=2, a_bits=2, estimator=estimator, discretization_lambda=0.1,
                                                   a_mask="progressive"))
        pege_hf.set_progress(model, 0.3)
    model = model.double()
    x, y = torch.randn(16, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (16,))
    model(pixel_values=x)  # initialises the activation quantizers
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert twin.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)

    def loss_and_grads(m):
        torch.manual_seed(1)
        loss = m(pixel_values=x, labels=y).loss
        loss.backward()
        return loss, {n: p.grad for n, p in m.named_parameters()}

    (loss, grads), (twin_loss, twin_grads) = loss_and_grads(model), loss_and_grads(twin)
    assert twin_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert grads.keys() == twin_grads.keys()
    for name, grad in grads.items():
        assert (twin_grads[name] - grad).norm() <= 1e-10 * grad.norm() + 1e-300, name


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 1001])
def test_packing_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits) == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n).long(), codes)


def test_packing_layout_is_lsb_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([5, 7, 1]), 3).tolist() == [0b01111101, 0]  # 5=101, 7=111, 1=001 -> stream 1011111 00


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="3 bytes"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 3, 7)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,allowed", [
    ("w_bits", 1, "2 to 8"), ("w_bits", 9, "2 to 8"), ("a_bits", 0, "2 to 8"), ("w_bits", 2.5, "2 to 8"),
    ("estimator", "lsq", "'pege', 'ste', 'ewgs'"), ("w_quantizer", "pact", "'lsq', 'minmax', 'symmetric'"),
    ("a_quantizer", "foo", "'lsq', 'minmax', 'pact'"), ("curriculum", "exp", "'log', 'linear', 'cosine', 'instant'"),
    ("w_mask", "random", "'progressive', 'bernoulli', 'error'"), ("discretization_lambda", -1e-3, ">= 0"),
    ("alpha", 0, "> 0"), ("ramp_fraction", 1.5, "<= 1.0"), ("lambda_schedule", "x", "'constant', 'follow', 'ramp'"),
])
def test_config_rejects_bad_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"PEGEConfig\.{field}.*{allowed}"):
        PEGEConfig(**{field: value})


@pytest.mark.parametrize("p", [-0.1, 1.5, "half", None])
def test_set_progress_rejects_out_of_range(p):
    with pytest.raises(ValueError, match=r"progress must be a number in \[0, 1\]"):
        pege_hf.set_progress(nn.Linear(2, 2), p)


def test_config_round_trips_through_dict():
    cfg = PEGEConfig(w_bits=3, a_bits=None, estimator="ewgs", modules_to_not_convert=["head"])
    again = PEGEConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.quant_method == "pege"


FUSED_CASES = [(e, q, 0.3, "progressive") for e in ("ste", "ewgs") for q in ("lsq", "pact", "minmax")] + [
    ("pege", q, p, m) for q in ("lsq", "pact", "minmax") for p in (0.0, 0.3, 1.0)
    for m in ("progressive", "bernoulli", "error")]  # only PEGE depends on progress and mask


@pytest.mark.parametrize("estimator,quantizer,progress,mask", FUSED_CASES)
def test_fused_path_matches_composite_path(estimator, quantizer, progress, mask):
    """The fused autograd Functions give the composite (plug-in) path's values and gradients exactly."""
    cfg = PEGEConfig(w_bits=3, a_bits=3, estimator=estimator, a_quantizer=quantizer, a_mask=mask,
                     discretization_lambda=0.5, ewgs_delta=0.1)
    x0 = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    results = []
    for fused in (True, False):
        fq = make_fake_quantizer(cfg, weight=False, seed=5).double().train()
        fq.fused = fused
        fq.set_progress(progress)
        x = x0.clone().requires_grad_()
        torch.manual_seed(0)
        out = fq(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        params = [p.grad.clone() for p in fq.parameters() if p.grad is not None]
        results.append((out.detach(), x.grad.clone(), params))
    (o1, g1, p1), (o2, g2, p2) = results
    assert torch.equal(o1, o2)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14)
    assert len(p1) == len(p2) and all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(p1, p2))


def test_kernels_take_a_uint8_view_of_the_mask():
    """The compiled kernels get masks as uint8 views (faster loads on CPU); the formulas must read them
    exactly as the bool mask, including bytes other than 0/1."""
    from pege_hf.quant import kernels

    torch.manual_seed(0)
    x, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    s, qmin, qmax, coef = torch.tensor(0.3), torch.tensor(-2.0), torch.tensor(1.0), torch.tensor(0.01)
    as_bytes = torch.randint(0, 256, x.shape, dtype=torch.uint8)
    mask = as_bytes != 0
    assert torch.equal(kernels.mixed_forward(x, s, qmin, qmax, as_bytes), kernels.mixed_forward(x, s, qmin, qmax, mask))
    for replaced_only in (False, True):
        got = kernels.pege_backward(g, x, s, qmin, qmax, as_bytes, coef, replaced_only)
        ref = kernels.pege_backward(g, x, s, qmin, qmax, mask, coef, replaced_only)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
    ref_mixed = torch.where(mask, torch.round(torch.clamp(x / s, qmin, qmax)) * s, x)
    assert torch.equal(kernels.mixed_forward(x, s, qmin, qmax, mask.view(torch.uint8)), ref_mixed)


def test_ste_backward_skips_the_ewgs_factor_bit_identically():
    """uniform_backward at delta = 0 (STE) skips EWGS's factor; the general formula with the factor (1 + 0 * ...)
    gives the same bits, inside, below and above the clip range, per tensor and per token step sizes."""
    from pege_hf.quant import kernels

    torch.manual_seed(0)
    x, g = torch.randn(4, 6, 32) * 3, torch.randn(4, 6, 32)
    qmin, qmax = torch.tensor(-8.0), torch.tensor(7.0)
    for s in (torch.tensor(0.3), x.abs().amax(-1, keepdim=True) / 12):  # per token: every row clips
        v = x / s
        vc = torch.clamp(v, qmin, qmax)
        r = torch.round(vc)
        factor = 1 + 0.0 * torch.sign(g) * (vc - r) / (qmax - qmin)
        inside = (v >= qmin) & (v <= qmax)
        assert inside.any() and not inside.all()
        grad_x, grad_s = kernels.uniform_backward(g, x, s, qmin, qmax, 0.0)
        assert torch.equal(grad_x, torch.where(inside, g * factor, 0.0))
        assert torch.equal(grad_s, g * torch.where(inside, r - factor * v, r))
        ewgs_x, _ = kernels.uniform_backward(g, x, s, qmin, qmax, 0.2)  # EWGS still scales the gradient
        assert not torch.equal(ewgs_x, grad_x)


def _plain_kernels(g, x, s, qmin, qmax, mask, coef, replaced_only, pull_to_x, pull_to_s):
    """The kernels' formulas written plainly (torch.where on bool masks, new tensors at every step), float32."""
    v = x / s
    r = torch.round(torch.clamp(v, qmin, qmax))
    inside = (v >= qmin) & (v <= qmax)
    q = r * s
    out = q if mask is None else torch.where(mask, q, x)
    dq_ds = torch.where(inside, r - v, r)
    m = torch.ones_like(inside) if mask is None else mask
    grad_x = torch.where(m, torch.where(inside, g, 0.0), g)
    grad_s = torch.where(m, g, 0.0) * dq_ds
    if coef is not None:
        pull = coef * (x - q)
        pull = torch.where(m, pull, 0.0) if replaced_only else pull
        grad_x = grad_x + pull if pull_to_x else grad_x
        grad_s = grad_s - pull * dq_ds if pull_to_s else grad_s
    return out, grad_x, grad_s


def _float64_kernels(g, x, s, qmin, qmax, mask, coef, replaced_only, pull_to_x, pull_to_s):
    """The same quantities in float64, written from the definitions (0/1 masks as numbers)."""
    g, x, s = g.double(), x.double(), s.double()
    v = x / s
    inside = ((v >= qmin) & (v <= qmax)).double()
    r = torch.round(v.clamp(qmin, qmax))
    m = torch.ones_like(x) if mask is None else mask.double()
    out = m * r * s + (1 - m) * x
    dq_ds = r - v * inside
    grad_x = g * (1 - m) + g * m * inside
    grad_s = g * m * dq_ds
    if coef is not None:
        pull = coef.double() * (x - r * s) * (m if replaced_only else 1.0)
        grad_x = grad_x + pull * pull_to_x
        grad_s = grad_s - pull * dq_ds * pull_to_s
    return out, grad_x, grad_s


def test_kernels_equal_the_plain_formulas_and_float64():
    """The in-place, 0/1-mask kernels give the values of the plain formulas (torch.equal: the same numbers; a
    zero may carry the other sign) and agree with float64: per tensor, per token and per group step sizes,
    elements inside, below and above the range and on rounding ties, the code range as numbers or tensors,
    masks as bool or as bytes, with and without the pull and the step-size gradient."""
    from pege_hf.quant import kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 16, generator=gen) * 2
    x[0, 0, :6] = torch.tensor([0.0, -0.0, 0.125, -0.375, 0.625, 100.0])  # ties at s = 0.25, and a clipped value
    g = torch.randn(x.shape, generator=gen)
    token = 2.0 ** torch.randint(-4, 0, (6, 5, 1), generator=gen).float()  # powers of two: x / s exact in float32
    steps = {"tensor": torch.tensor(0.25), "token": token, "group": token.expand(6, 5, 4).reshape(6, 5, 4, 1)}
    mask = torch.rand(x.shape, generator=gen) < 0.4
    bytes_ = torch.where(mask, torch.randint(1, 256, x.shape, generator=gen, dtype=torch.uint8), 0)
    for (kind, s), (qmin, qmax) in itertools.product(steps.items(), [(-8.0, 7.0), (0.0, 3.0)]):
        xs, gs = (x.view(6, 5, 4, 4), g.view(6, 5, 4, 4)) if kind == "group" else (x, g)
        ms, bs = (mask.view(xs.shape), bytes_.view(xs.shape))
        coef = 0.02 / (s * s)
        for lo, hi in ((qmin, qmax), (torch.tensor([qmin]), torch.tensor([qmax]))):
            assert torch.equal(kernels.uniform_forward(xs, s, lo, hi), _plain_kernels(gs, xs, s, qmin, qmax, None, None,
                                                                                     False, False, False)[0])
            for m, c, replaced_only, to_x, to_s, need_s in itertools.product(
                    (None, ms, bs), (None, coef), (False, True), (False, True), (False, True), (False, True)):
                plain = _plain_kernels(gs, xs, s, qmin, qmax, None if m is None else ms, c, replaced_only, to_x, to_s)
                wide = _float64_kernels(gs, xs, s, qmin, qmax, None if m is None else ms, c, replaced_only, to_x, to_s)
                grad_x, grad_s = kernels.pege_backward(gs, xs, s, lo, hi, m, c, replaced_only, to_x, to_s, need_s)
                got = [grad_x] + ([grad_s] if need_s else [])
                if m is not None:
                    got.append(kernels.mixed_forward(xs, s, lo, hi, m))
                ref = [plain[1]] + ([plain[2]] if need_s else []) + ([plain[0]] if m is not None else [])
                ref64 = [wide[1]] + ([wide[2]] if need_s else []) + ([wide[0]] if m is not None else [])
                assert grad_s is None or need_s
                for a, b, b64 in zip(got, ref, ref64):
                    assert torch.equal(a, b), (kind, qmin, m is None, c is None, replaced_only, to_x, to_s)
                    assert torch.allclose(a.double(), b64, rtol=1e-6, atol=1e-6)
            for need_s in (False, True):
                grad_x, grad_s = kernels.uniform_backward(gs, xs, s, lo, hi, 0.0, need_s)
                plain = _plain_kernels(gs, xs, s, qmin, qmax, None, None, False, False, False)
                assert torch.equal(grad_x, plain[1]) and (torch.equal(grad_s, plain[2]) if need_s else grad_s is None)


def test_dynamic_step_is_absmax_over_qmax():
    """Per token: max|x| over the last dimension / qmax (float64 reference), at least 1e-8; per tensor: one value."""
    from pege_hf.quant import kernels

    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    x[1, 2] = 0.0
    ref = (x.double().abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    assert torch.allclose(kernels.dynamic_step(x, 127.0, True).double(), ref, rtol=1e-7, atol=0)
    assert kernels.dynamic_step(x, 127.0, True)[1, 2, 0] == pytest.approx(1e-8)
    assert kernels.dynamic_step(x, 7.0, False).item() == pytest.approx(x.abs().max().item() / 7, rel=1e-7)


def test_code_range_follows_a_loaded_state():
    """The fused kernels take (qmin, qmax) as numbers mirrored from the quantizer's buffer: after loading another
    code range (an unsigned activation quantizer's state into a signed one) the next forward must use it."""
    fq = make_fake_quantizer(PEGEConfig(a_bits=2, estimator="ste"), weight=False).train()
    unsigned = make_quantizer("lsq", 2, weight=False)
    fq.quantizer.initialize(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    unsigned.initialize(torch.rand(64, generator=torch.Generator().manual_seed(1)))
    assert fq.quantizer.code_range() == (-2.0, 1.0) and unsigned.code_range() == (0.0, 3.0)
    fq.quantizer.load_state_dict(unsigned.state_dict())
    assert fq.quantizer.code_range() == (0.0, 3.0)
    x = torch.linspace(-1, 1, 9)
    expected = torch.round(torch.clamp(x / unsigned.scale, 0.0, 3.0)) * unsigned.scale
    assert torch.equal(fq(x), expected) and expected.min() == 0


@pytest.mark.slow
def test_compiled_kernels_match_eager():
    """torch.compile'd kernels (the fast training path) agree with the eager formulas and keep the input's
    memory layout, for contiguous and channels-last inputs (`pege train --channels-last`), on activations (one
    step size) and on conv weights (one per output channel)."""
    from pege_hf.quant import kernels

    cfg = PEGEConfig(w_bits=2, a_bits=2, discretization_lambda=0.5, ewgs_delta=0.1, a_mask="progressive")
    inputs = {False: torch.relu(torch.randn(8, 4, 6, 6)), True: torch.randn(6, 4, 3, 3)}  # weight?: x
    results = {}
    try:
        for compiled in (False, True):
            kernels.use_compiled_kernels(compiled)
            for est, weight, layout in itertools.product(("ste", "ewgs", "pege", "pege_counter", "pege_bernoulli"),
                                                         (False, True), (torch.contiguous_format, torch.channels_last)):
                masks = {"pege_counter": {"a_mask": "counter"}, "pege_bernoulli": {"a_mask": "bernoulli",
                                                                                   "w_mask": "bernoulli"}}
                options = {"estimator": "pege", **masks[est]} if est in masks else {"estimator": est}
                fq = make_fake_quantizer(PEGEConfig(**{**cfg.to_dict(), **options}), weight=weight,
                                         channels=6 if weight else None, seed=1).train()
                fq.set_progress(0.3)
                x = inputs[weight].clone().contiguous(memory_format=layout).requires_grad_()
                torch.manual_seed(0)  # the same Bernoulli mask, or counter mask key (compiled: a recipe; eager: its mask)
                out = fq(x)
                assert out.is_contiguous(memory_format=layout), (est, weight, layout)
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
                results[compiled, est, weight, layout] = (out.detach(), x.grad, fq.quantizer.scale.grad)
    finally:
        kernels.use_compiled_kernels(False)
    for (compiled, *case), values in results.items():
        if compiled:
            for a, b in zip(results[(False, *case)], values):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), case


@pytest.mark.slow
def test_counter_masks_cost_no_memory_under_compiled_kernels():
    """With compiled kernels counter and progressive masks stay recipes: PEGE mid-ramp with counter activation
    masks (what the default "auto" draws there) and (default) progressive weight masks saves what PEGE at r = 1
    saves (no mask), where Bernoulli activation masks keep one byte per element; eager kernels keep every
    materialised mask."""
    from pege_hf import bench
    from pege_hf.hf.cifar import cifar_resnet
    from pege_hf.quant import kernels
    from pege_hf.quant.modules import set_progress

    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    variants = {"r1": ({}, 1.0), "pege": ({"a_mask": "bernoulli"}, 0.3), "counter": ({"a_mask": "counter"}, 0.3),
                "auto": ({}, 0.3)}
    saved = {}
    try:
        for compiled in (False, True):
            kernels.use_compiled_kernels(compiled)
            for name, (options, progress) in variants.items():
                model = cifar_resnet(8)
                pege_hf.quantize(model, PEGEConfig(w_bits=2, a_bits=2, **options))
                model(x)
                set_progress(model, progress)
                saved[compiled, name] = bench.saved_activation_bytes(model, (x, y))
    finally:
        kernels.use_compiled_kernels(False)
    assert saved[True, "counter"] == saved[True, "r1"] < saved[True, "pege"] < saved[False, "pege"]
    assert saved[False, "counter"] == saved[False, "pege"]
    assert saved[True, "auto"] == saved[True, "counter"] and saved[False, "auto"] == saved[False, "pege"]  # the default
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight_quantizer"))
    assert saved[False, "pege"] - saved[True, "pege"] == weights  # the weights' one-byte masks, eager only


@pytest.mark.slow
def test_compiled_kernels_compile_every_kind_of_call_past_dynamos_default_limit():
    """Ten kinds of mixed_forward call (step sizes of five ranks, byte masks and counter recipes) each get their
    own compiled graph: none falls back to eager after dynamo's default 8 compilations."""
    from torch._dynamo.utils import counters

    from pege_hf.quant import kernels
    from pege_hf.quant.curriculum import CounterMask

    try:
        kernels.use_compiled_kernels(True)
        before = counters["stats"]["unique_graphs"]
        for rank in range(1, 6):  # float64: kinds no other test compiles, so each is new here
            x = torch.randn(*[3] * rank, dtype=torch.float64)
            s = torch.full([3] + [1] * (rank - 1), 0.2, dtype=torch.float64)
            for mask in (x > 0, CounterMask(7, 100)):
                got = kernels.impl["mixed_forward"](x, s, -2.0, 1.0, mask)
                assert torch.equal(got, kernels.mixed_forward(x, s, -2.0, 1.0, mask))
        assert counters["stats"]["unique_graphs"] - before == 10
    finally:
        kernels.use_compiled_kernels(False)


def test_kernels_trace_without_graph_breaks_on_channels_last_tensors():
    """torch.compile must see each kernel whole (one graph) on channels-last activations, as
    `pege train --compile-kernels --channels-last` feeds them: a graph break splits the fused loop into
    several passes (out= ops on non-contiguous tensors did, and cost the compiled step 15-30%)."""
    import torch._dynamo as dynamo

    from pege_hf.quant import kernels

    x = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    g, s, coef = torch.randn_like(x), torch.tensor(0.1), torch.tensor(1e-3)
    mask = (torch.rand_like(x) < 0.3).view(torch.uint8)
    from pege_hf.quant.curriculum import CounterMask

    calls = {"uniform_forward": (x, s, 0.0, 3.0), "mixed_forward": (x, s, 0.0, 3.0, mask),
             "mixed_forward, counter mask": (x, s, 0.0, 3.0, CounterMask(12345, 77)),
             "mixed_forward, progressive mask": (x, s, 0.0, 3.0, replacement_mask(x, 0.3, "progressive", lazy=True)),
             "uniform_backward": (g, x, s, 0.0, 3.0, 0.0),
             "pege_backward": (g, x, s, 0.0, 3.0, mask, coef, True, True, True)}
    for name, args in calls.items():
        explained = dynamo.explain(getattr(kernels, name.split(",")[0]))(*args)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)


def test_settings_that_would_change_nothing_are_warned_about():
    """A modules_to_not_convert / layer_overrides pattern that matches no layer (a typo) and a group_size on a model
    without quantized Linear layers are named in a warning; patterns that match and a group_size that applies are
    not."""
    import warnings

    from pege_hf.hf.cifar import cifar_resnet

    def warned(model, **config):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pege_hf.quantize(model, PEGEConfig(**config))
        return [str(w.message) for w in caught]

    said = warned(cifar_resnet(20), modules_to_not_convert=["layer1.0.conv_typo", "layer1.0"], group_size=32,
                  layer_overrides={"nowhere": {"w_bits": 3}})
    assert len(said) == 3
    assert said[0].startswith("PEGEConfig.modules_to_not_convert: 'layer1.0.conv_typo' match(es) no Linear or Conv2d")
    assert said[1].startswith("PEGEConfig.layer_overrides: 'nowhere' match(es)")
    assert said[2].startswith("PEGEConfig.group_size=32: group-wise step sizes are for Linear layers")
    mlp = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 10))
    assert warned(mlp, group_size=32, modules_to_not_convert=["4"], layer_overrides={"2": {"w_bits": 3}}) == []
