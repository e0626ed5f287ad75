"""PEGE quantization-aware training with parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard_model(model)`` shards every block (the model's ``_no_split_modules`` classes or the members
of its ``nn.ModuleList``s: decoder layers, ResNet blocks) and then the root, so latent weights, step sizes
and their optimizer state live as 1/N shards on each of N processes and a block's parameters are whole
only while it runs.

Inside a block's forward and backward FSDP2 hands the layers whole, ordinary tensors, so the fake
quantizers see the global weight shape (progressive masks equal the single-process ones) and the rebuild
recipes saved for backward hold ordinary tensors. What cannot work sharded is a quantizer that first
meets data inside a forward: its lazy initialisation would write the step size into the gathered copy,
which FSDP2 discards. Calibrate before sharding (one forward on the same batch on every rank); a
quantizer that is still uninitialised is refused here, and one met in a forward raises.

Only torch and pege_hf.quant are imported here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from .quant.modules import FakeQuantizer, QuantLayer

__all__ = ["broadcast_buffers", "consolidated_state_dict", "fully_shard_model", "local_bytes", "shard_blocks",
           "uninitialized_quantizers"]


def _initialized(fq: FakeQuantizer) -> bool:
    check = getattr(fq.quantizer, "is_initialized", None)
    return check is None or check()


def uninitialized_quantizers(model: nn.Module) -> list[str]:
    """Names of the fake quantizers that have not seen data yet (their step size is still a placeholder)."""
    return [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer) and not _initialized(m)]


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The default FSDP units: the modules whose class the model names in ``_no_split_modules`` (transformers'
    list, which Accelerate's TRANSFORMER_BASED_WRAP also shards by: decoder layers, ResNet blocks); without
    one, every member of the outermost nn.ModuleLists that holds parameters."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks, seen_lists = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(name.startswith(p + ".") for p in seen_lists):
            seen_lists.append(name)
            blocks.extend(b for b in m if any(True for _ in b.parameters()))
    return blocks


def _refuse_lazy_initialization(layer: QuantLayer, args) -> None:
    for fq in (layer.weight_quantizer, layer.input_quantizer):
        if fq is not None and not _initialized(fq):
            raise RuntimeError(f"{type(layer).__name__}: a fake quantizer met data uninitialised under FSDP; "
                               "calibrate the model before pege_hf.fully_shard_model")


def fully_shard_model(model: nn.Module, *, blocks: list[nn.Module] | None = None, mesh=None,
                      reshard_after_forward: bool = True) -> nn.Module:
    """Shard a calibrated PEGE model with FSDP2: ``fully_shard`` on each of ``blocks`` (default:
    :func:`shard_blocks`) and then on the root. Call it on every rank, after the process group is up and
    every quantizer is initialised, and build the optimizer afterwards (on the sharded parameters).
    Returns the model (now an FSDPModule)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("fully_shard_model needs an initialised process group (torchrun / accelerate launch)")
    if isinstance(model, FSDPModule):
        raise ValueError("the model is already sharded")
    missing = uninitialized_quantizers(model)
    if missing:
        raise ValueError(f"{len(missing)} fake quantizers are uninitialised (e.g. {missing[0]}): run one forward "
                         "on a calibration batch (the same on every rank) before sharding")
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.register_forward_pre_hook(_refuse_lazy_initialization)
    for block in shard_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm statistics, which each process gathers from its own
    batches). Call it before torch.distributed.checkpoint saves a resume checkpoint: DCP stores one copy of
    an unsharded tensor, so without it the ranks resume from whichever copy DCP kept."""
    for b in model.buffers():
        torch.distributed.broadcast(b, src=src)


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on rank 0 only (an empty dict elsewhere); every rank
    must call it. Load it into a single-process copy of the model to save_pretrained the packed form."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _in_quantizer(name: str, quantizer_prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in quantizer_prefixes)


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds for the model's state (its local shards under FSDP): ``weights`` (latent
    weights, biases, embeddings, norms), ``quantizer`` (step sizes and quantizer buffers), ``buffers``
    (other buffers) and ``optimizer`` (the optimizer's per-parameter state); activations are not counted."""
    prefixes = [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer)]
    out = dict(weights=0, quantizer=0, buffers=0, optimizer=0)
    for name, p in model.named_parameters():
        out["quantizer" if _in_quantizer(name, prefixes) else "weights"] += _tensor_bytes(p)
    for name, b in model.named_buffers():
        out["quantizer" if _in_quantizer(name, prefixes) else "buffers"] += _tensor_bytes(b)
    if optimizer is not None:
        out["optimizer"] = sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                               if isinstance(v, torch.Tensor))
    return out
