"""PEGE QAT under FSDP2 (pege_hf.distributed) on 2 gloo CPU processes, against a single-process reference.

The sharded runs are tests/fsdp_worker.py under torchrun; the reference runs here, in one process, on
the same global batch (the mean of the two per-process micro-batch gradients, as data parallelism takes it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, subprocess_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fsdp_worker as W  # noqa: E402

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
WORLD = 2


def run_worker(out: Path, mode: str, kind: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
           str(WORKER), str(out), mode]
    return subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS=1, FSDP_MODEL=kind), capture_output=True, text=True,
                          timeout=600)


def single_process_run(steps=range(W.STEPS)):
    model = W.build_model()
    optimizer = W.make_optimizer(model)
    for step in steps:
        W.train_step(model, optimizer, step, [W.local_slice(W.batch(step), r, WORLD) for r in range(WORLD)])
    return model, optimizer


def assert_same_state(actual: dict, expected: dict, atol=1e-6, skip=()) -> None:
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        if not k.endswith(skip):
            torch.testing.assert_close(actual[k], v, atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module", params=["llama", pytest.param("resnet", marks=pytest.mark.slow)])
def kind(request):
    """The model: a tiny LlamaForCausalLM or a CIFAR ResNet-20 (tests/fsdp_worker.py)."""
    W.MODEL = request.param
    yield request.param
    W.MODEL = "llama"


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, kind):
    out = tmp_path_factory.mktemp(f"fsdp-{kind}")
    proc = run_worker(out, "train", kind)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(kind):
    return single_process_run()


@pytest.mark.slow
def test_sharded_training_equals_single_process(sharded_run, reference):
    model, _ = reference
    assert_same_state(torch.load(sharded_run / "params.pt"), model.state_dict(), skip=W.RANK_LOCAL_BUFFERS)
    assert any((v != W.build_model().state_dict()[k]).any() for k, v in model.state_dict().items())  # it trained


@pytest.mark.slow
def test_consolidated_packed_checkpoint_reloads_identically(sharded_run):
    import pege_hf  # noqa: F401 - registers quant_method "pege"

    reloaded = W.auto_class().from_pretrained(sharded_run / "packed")
    assert torch.equal(W.eval_logits(reloaded), torch.load(sharded_run / "logits.pt"))


@pytest.mark.slow
def test_memory_per_process_at_most_0_6_of_single(sharded_run, reference):
    from pege_hf.distributed import local_bytes

    single = sum(local_bytes(*reference).values())
    per_rank = [sum(m.values()) for m in json.loads((sharded_run / "memory.json").read_text())]
    ratio = max(per_rank) / single
    print(f"state bytes per process {per_rank} vs single process {single}: ratio {ratio:.3f}")
    assert ratio <= 0.6


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path, kind, sharded_run):
    killed = run_worker(tmp_path, "kill", kind)
    assert killed.returncode != 0 and (tmp_path / "ckpt").is_dir()
    resumed = run_worker(tmp_path, "resume", kind)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(torch.load(tmp_path / "params.pt"), torch.load(sharded_run / "params.pt"), atol=0)


@pytest.fixture
def one_rank_group():
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_uninitialised_quantizers_are_refused_before_and_during_forward(one_rank_group):
    W.MODEL = "llama"
    import pege_hf
    from pege_hf.distributed import fully_shard_model, uninitialized_quantizers

    model = W.build_model(calibrated=False)
    assert uninitialized_quantizers(model)
    with pytest.raises(ValueError, match="uninitialised .* calibration batch"):
        fully_shard_model(model)
    W.calibrate(model)
    assert not uninitialized_quantizers(model)
    fully_shard_model(model)
    quantizer = model.model.layers[0].self_attn.q_proj.input_quantizer.quantizer
    quantizer.qstate[2], quantizer._ready = 0.0, False  # as if it had never seen data
    with pytest.raises(RuntimeError, match="met data uninitialised under FSDP"):
        model(**W.eval_inputs())
    with pytest.raises(ValueError, match="already sharded"):
        pege_hf.fully_shard_model(model)


def test_fully_shard_model_needs_a_process_group():
    from pege_hf.distributed import fully_shard_model

    with pytest.raises(RuntimeError, match="initialised process group"):
        fully_shard_model(torch.nn.Linear(2, 2))


def test_shard_blocks_follow_no_split_modules_else_module_lists():
    from pege_hf.distributed import shard_blocks
    from pege_hf.hf.cifar import cifar_resnet

    assert [type(b).__name__ for b in shard_blocks(W._float_model())] == ["LlamaDecoderLayer"] * 2
    assert len(shard_blocks(cifar_resnet(20))) == 9  # 3 stages x 3 basic blocks
    plain = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU()]), torch.nn.Linear(2, 2))
    assert shard_blocks(plain) == [plain[0][0]]  # members holding parameters
