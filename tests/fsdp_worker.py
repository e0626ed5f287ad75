"""PEGE QAT of a tiny Llama (or, with FSDP_MODEL=resnet, a CIFAR ResNet-20) under FSDP2 on gloo CPU
processes (run with torchrun), and the pieces the single-process reference in test_fsdp.py shares with
it: the model, the data, the training step.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT train      # 3 steps, then the consolidated results
    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT kill       # 2 steps, a sharded checkpoint, SIGKILL
    torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT resume     # resume that checkpoint, 1 more step
    FSDP_WRAP=ddp torchrun ... OUT time                              # median step time (FSDP2, or DDP)

OUT receives params.pt (the consolidated state dict), logits.pt (the sharded model's eval logits on
eval_inputs()), memory.json (local bytes per rank and of the optimizer) and packed/ (save_pretrained).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

STEPS, LR, MOMENTUM = 3, 0.01, 0.9
GLOBAL_BATCH, SEQ, VOCAB = 8, 12, 64


MODEL = os.environ.get("FSDP_MODEL", "llama")  # "llama" or "resnet" (a CIFAR ResNet-20)
CONFIG = dict(w_bits=4, a_bits=8, a_mask="progressive")


def _float_model():
    if MODEL == "resnet":
        from pege_hf.hf.cifar import cifar_resnet

        return cifar_resnet(20)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=32))


def build_model(seed: int = 0, calibrated: bool = True):
    """A PEGE W4A8 model (MODEL: a LlamaForCausalLM with hidden 32 and 2 layers, or a CIFAR ResNet-20), identical
    on every process; calibrated (which all-reduces under a process group: every rank must build it) or to be
    loaded from a state dict."""
    import pege_hf

    torch.manual_seed(seed)
    model = pege_hf.quantize(_float_model(), pege_hf.PEGEConfig(**CONFIG))
    if calibrated:
        calibrate(model)
    return model


def calibrate(model) -> None:
    """Initialise every quantizer from one eval forward on the whole global batch (the same on every rank)."""
    model.eval()
    with torch.no_grad():
        model(**model_inputs(batch(0)))
    model.train()


def batch(step: int, size: int = GLOBAL_BATCH, seed: int = 100) -> dict[str, torch.Tensor]:
    """The global batch of a step (fixed data): token ids, or CIFAR-shaped images and labels."""
    g = torch.Generator().manual_seed(seed + step)
    if MODEL == "resnet":
        images = torch.randn(size, 3, 32, 32, generator=g)
        return {"pixel_values": images, "labels": torch.randint(0, 10, (size,), generator=g)}
    ids = torch.randint(0, VOCAB, (size, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}


def model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "labels"}


def eval_inputs() -> dict:
    return model_inputs(batch(0, size=4, seed=7))


def auto_class():
    """The transformers Auto class that reloads the saved model."""
    import transformers

    return transformers.AutoModelForImageClassification if MODEL == "resnet" else transformers.AutoModelForCausalLM


# per-process buffers (BatchNorm statistics of each process's own batches, as under DDP without SyncBatchNorm)
RANK_LOCAL_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def train_step(model, optimizer, step: int, micro_batches: list[dict]) -> None:
    """One optimizer step at progress step / STEPS (set on every quantizer) on the mean of the micro-batches'
    gradients: what data parallelism computes with one micro-batch per process. (Not the gradient of the mean
    loss: PEGE's discretization pull enters the backward unscaled by the loss, and activation step sizes and
    masks are defined per forward, so the per-batch gradients are averaged as the processes average them.)"""
    import pege_hf

    pege_hf.set_progress(model, step / STEPS)
    for inputs in micro_batches:
        model(**inputs).loss.backward()
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= len(micro_batches)
    optimizer.step()
    optimizer.zero_grad()


def local_slice(inputs: dict, rank: int, world: int) -> dict:
    per = GLOBAL_BATCH // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in inputs.items()}


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**eval_inputs()).logits
    model.train()
    return out


# -- the distributed side ------------------------------------------------------------------------

def _train(model, optimizer, steps, rank, world) -> None:
    for step in steps:
        train_step(model, optimizer, step, [local_slice(batch(step), rank, world)])


def _checkpoint_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _save_sharded(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from pege_hf.distributed import broadcast_buffers

    broadcast_buffers(model)
    dcp.save(_checkpoint_state(model, optimizer), checkpoint_id=str(path))


def _load_sharded(model, optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _write_results(model, optimizer, out: Path, rank: int, world: int) -> None:
    from pege_hf.distributed import consolidated_state_dict, local_bytes

    mem = local_bytes(model, optimizer)
    per_rank = [None] * world
    torch.distributed.all_gather_object(per_rank, mem)
    state = consolidated_state_dict(model)
    logits = eval_logits(model)
    single = build_model(calibrated=False)  # on every rank: quantize() initialises weight step sizes collectively
    if rank == 0:
        torch.save(state, out / "params.pt")
        torch.save(logits, out / "logits.pt")
        (out / "memory.json").write_text(json.dumps(per_rank))
        single.load_state_dict(state)
        single.save_pretrained(out / "packed")


def _wrap(model, how: str):
    """FSDP2 (pege_hf.fully_shard_model) or, for the step-time comparison, DDP."""
    from pege_hf.distributed import fully_shard_model

    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return fully_shard_model(model)


def _median_step_seconds(model, optimizer, rank, world, steps: int = 12) -> float:
    """The median wall time of a training step (the first, warm-up, step left out)."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, i % STEPS, [local_slice(batch(i % STEPS), rank, world)])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(out: Path, mode: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = _wrap(build_model(), os.environ.get("FSDP_WRAP", "fsdp"))
    optimizer = make_optimizer(model)
    if mode == "time":
        seconds = _median_step_seconds(model, optimizer, rank, world)
        if rank == 0:
            (out / "step_time.json").write_text(json.dumps({"median_step_s": seconds}))
        return
    if mode == "kill":
        _train(model, optimizer, range(STEPS - 1), rank, world)
        _save_sharded(model, optimizer, out / "ckpt")
        torch.distributed.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "resume":
        _load_sharded(model, optimizer, out / "ckpt")
        _train(model, optimizer, range(STEPS - 1, STEPS), rank, world)
    else:
        _train(model, optimizer, range(STEPS), rank, world)
    _write_results(model, optimizer, out, rank, world)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
