"""The causal-LM training loop of `pege train-lm`: arguments -> accelerator -> tokenizer and packed text ->
model -> resume state -> steps (evaluation every --eval-steps) -> finalise. The pieces it shares with
`pege train` (accelerator, output-dir lock, optimiser and schedule, metrics.jsonl, checkpoints and
resume, logging and the divergence stop) are training.loop's and training.state's own.

``train_lm(args)`` takes the namespace of ``pege train-lm`` (training.lm_args) and returns the metrics
written to output_dir/metrics.json. ``prepare_model`` (a function of the loaded model) lets a caller
change the model before training, with the same data, loop and budget (the benchmark's torchao column).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm

from ..config import PEGEConfig
from ..hub import can_render_cards, render_model_card
from ..quant.modules import set_progress
from ..version import __version__
from .evaluation import acc_dtype, calibrate, sync_buffers
from .lm_args import resolve_lm
from .loaders import EpochShuffleSampler, batch_seed, main_process_first
from .loop import checkpoint, claim_output_dir, count_step, default_output_dir, epoch_batches, make_accelerator
from .loop import RunAccess, optimizer_step, prepare_optimization, resume
from .model import load_model, use_kernels
from .state import TrainerState, resume_checkpoint
from .text import TextData, pack, read_text_dataset, subset, text_column_of, train_and_validation
from .tracking import flat_hparams

logger = logging.getLogger("pege_hf.train")
TASK = "text-generation"


@dataclass
class LMRun(RunAccess):
    """Everything one causal-LM run holds while it trains (the attribute names training.loop's shared
    steps read)."""

    args: Any
    quant_config: PEGEConfig | None
    output_dir: Path
    accelerator: Any
    tokenizer: Any = None
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None
    train_loader: Any = None
    eval_loader: Any = None
    sampler: EpochShuffleSampler = None
    state: TrainerState = None
    info: dict = field(default_factory=dict)
    log_loss: torch.Tensor = None
    log_batches: int = 0
    started: float = field(default_factory=time.time)
    progress: Any = None


# --------------------------------------------------------------------------------------------- setup


def load_tokenizer(args):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if tokenizer.eos_token_id is None:
        logger.warning("the tokenizer has no EOS token: documents are concatenated without a separator")
    return tokenizer


def load_text(args, tokenizer) -> TextData:
    """The packed blocks of both splits (the text column and the splits checked on the way)."""
    dd = read_text_dataset(args.dataset, args.dataset_config)
    train_rows, val_rows, val_name = train_and_validation(dd, args.train_split, args.validation_split,
                                                          args.validation_percentage, args.seed)
    column = text_column_of(train_rows, args.text_column)
    text_column_of(val_rows, column)
    train = subset(pack(train_rows, tokenizer, column, args.block_size, "train"), args.max_train_samples, args.seed)
    validation = subset(pack(val_rows, tokenizer, column, args.block_size, "validation"), args.max_eval_samples,
                        args.seed)
    return TextData(train, validation, column, val_name, len(train_rows), len(val_rows))


def check_vocabulary(model: nn.Module, data: TextData) -> None:
    """ValueError when the tokenizer makes ids the model's embedding has no row for."""
    size = model.get_input_embeddings().num_embeddings
    top = int(max(data.train.max(), data.validation.max()))
    if top >= size:
        raise ValueError(f"the tokenizer produced token id {top}, but the model's embedding has {size} rows: use the "
                         "model's own tokenizer (--tokenizer)")


def setup(run: LMRun, data: TextData, model: nn.Module) -> None:
    """Loaders, optimiser and schedule prepared by accelerate; quantizers calibrated; a fresh TrainerState."""
    args, accelerator = run.args, run.accelerator
    check_vocabulary(model, data)
    model.to(accelerator.device)
    if run.quant_config is not None:
        calibrate(model, input_ids=data.train[: args.batch_size].to(accelerator.device))
    run.sampler = EpochShuffleSampler(len(data.train), args.seed)
    pin = accelerator.device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train), batch_size=args.batch_size,
                                               sampler=run.sampler, pin_memory=pin)
    eval_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.validation),
                                              batch_size=args.eval_batch_size, shuffle=False, pin_memory=pin)
    run.train_loader, run.eval_loader = accelerator.prepare(train_loader, eval_loader)
    batches_per_epoch = len(run.train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = prepare_optimization(accelerator, run, model, args, total_steps, batches_per_epoch)
    run.info = run_info(args, run.quant_config, data, accelerator.num_processes, warmup, total_steps)
    run.info["epochs"] = total_steps / steps_per_epoch


def run_info(args, quant_config, data: TextData, world_size: int, warmup: int, total_steps: int) -> dict:
    """The run's setup as metrics.json, the trackers and the model card record it."""
    return {
        "task": TASK, "base_model": args.model, "dataset": str(args.dataset), "text_column": data.text_column,
        "validation_split": data.validation_split, "train_rows": data.train_rows,
        "validation_rows": data.validation_rows, "block_size": args.block_size, "train_blocks": len(data.train),
        "validation_blocks": len(data.validation), "train_tokens": data.train.numel(),
        "validation_tokens": data.validation.numel(),
        "quantization_config": quant_config.to_dict() if quant_config is not None else None,
        "batch_size": args.batch_size, "world_size": world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer": args.optimizer, "lr": args.lr,
        "quantizer_lr_scale": args.quantizer_lr_scale if quant_config is not None else None,
        "weight_decay": args.weight_decay, "scheduler": args.scheduler, "warmup_steps": warmup, "seed": args.seed,
        "total_steps": total_steps, "max_steps": args.max_steps, "max_grad_norm": args.max_grad_norm,
    }


def start_logging(run: LMRun) -> None:
    accelerator = run.accelerator
    run.started = time.time()
    accelerator.init_trackers("pege", config=flat_hparams(run.info))
    run.log_loss = torch.zeros((), dtype=acc_dtype(accelerator.device), device=accelerator.device)
    run.progress = tqdm(total=run.state.total_steps, initial=run.state.global_step, desc="train", unit="step",
                        disable=not run.main)
    if run.state.fresh and run.main:
        what = f"QAT {run.quant_config.name}" if run.quant_config is not None else "full precision"
        run.progress.write(
            f"training causal LM, {what}: {run.info['train_blocks']} train / {run.info['validation_blocks']} validation "
            f"blocks of {run.args.block_size} tokens, {run.state.total_steps} steps, {accelerator.num_processes} "
            f"process(es) on {accelerator.device.type} -> {run.output_dir}")


# --------------------------------------------------------------------------------------------- training


def train_epoch(run: LMRun, epoch: int) -> None:
    """One pass over the training blocks (the rest of it when resumed mid-epoch), or up to the last step."""
    loader, skip = epoch_batches(run, epoch)
    for batch_index, (ids,) in enumerate(loader, start=skip + 1):
        torch.manual_seed(batch_seed(run.args.seed, epoch, batch_index, run.accelerator.process_index) ^ 0x5DEECE66D)
        train_step(run, ids)
        if run.accelerator.sync_gradients:
            after_optimizer_step(run, epoch, batch_index)
            if run.state.global_step >= run.state.total_steps:
                return
    run.state.epoch, run.state.batch_in_epoch = epoch + 1, 0


def train_step(run: LMRun, ids: torch.Tensor) -> None:
    with run.accelerator.accumulate(run.model):
        if run.quant_config is not None:
            set_progress(run.raw_model, min(1.0, run.state.global_step / run.state.total_steps))
        loss = run.model(input_ids=ids, labels=ids).loss
        optimizer_step(run, loss)
    run.log_loss += loss.detach().to(run.log_loss.dtype)
    run.log_batches += 1


def after_optimizer_step(run: LMRun, epoch: int, batch_index: int) -> None:
    step, args = count_step(run, epoch), run.args
    if args.eval_steps and step % args.eval_steps == 0 and step < run.state.total_steps:
        record_evaluation(run)
    if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
        checkpoint(run, epoch, batch_index, [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_lm(accelerator, model: nn.Module, loader, desc: str = "eval") -> dict[str, float]:
    """Mean next-token cross-entropy over every predicted token of ``loader``'s blocks, and its exp
    (perplexity); exact under data parallelism (per-block sums gathered with gather_for_metrics)."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=acc_dtype(accelerator.device), device=accelerator.device)
    for (ids,) in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        per_block = torch.stack([nll.view(len(ids), -1).sum(1), torch.full((len(ids),), ids.shape[1] - 1.0,
                                                                            device=nll.device)], dim=1)
        totals += accelerator.gather_for_metrics(per_block).sum(dim=0).to(totals.dtype)
    model.train(was_training)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(totals[1].item())}


def record_evaluation(run: LMRun) -> dict:
    sync_buffers(run.accelerator, run.model)
    metrics = evaluate_lm(run.accelerator, run.model, run.eval_loader, desc=f"eval step {run.state.global_step}")
    entry = {"step": run.state.global_step, "loss": metrics["loss"], "perplexity": metrics["perplexity"],
             "time_s": run.elapsed()}
    run.state.history.append(entry)
    run.accelerator.log({"eval/loss": entry["loss"], "eval/perplexity": entry["perplexity"]}, step=entry["step"])
    if run.main:
        run.progress.write(f"step {entry['step']}/{run.state.total_steps}: validation loss {entry['loss']:.4f}, "
                           f"perplexity {entry['perplexity']:.3f}")
    return entry


# --------------------------------------------------------------------------------------------- finalise


def finalise(run: LMRun, resumed_from: Path | None) -> dict:
    """The final model with its tokenizer, metrics.json and the model card; returns the metrics."""
    run.progress.close()
    run.accelerator.wait_for_everyone()
    last = run.state.history[-1] if run.state.history else None
    final = last if last and last["step"] == run.state.global_step else record_evaluation(run)
    run.raw_model.save_pretrained(run.output_dir, is_main_process=run.main, save_function=run.accelerator.save)
    result = {
        "loss": final["loss"], "perplexity": final["perplexity"], "history": run.state.history,
        "wall_time_s": run.elapsed(), "steps": run.state.global_step, **run.info, "command": list(sys.argv),
        "resumed_from": str(resumed_from) if resumed_from else None, "device": run.accelerator.device.type,
        "mixed_precision": run.accelerator.mixed_precision, "torch": torch.__version__, "pege_hf": __version__,
    }
    if run.main:
        run.tokenizer.save_pretrained(run.output_dir)
        (run.output_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if can_render_cards():
            render_model_card(run.output_dir)
        print(f"done: validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}, {result['steps']} "
              f"steps in {result['wall_time_s']:.0f} s -> {run.output_dir}", flush=True)
    run.accelerator.end_training()
    return result


def train_lm(args, prepare_model: Callable[[nn.Module], nn.Module | None] | None = None) -> dict[str, Any]:
    """Run one causal-LM training (full precision or QAT) as ``args`` (the `pege train-lm` namespace) say;
    returns the metrics dict that is also written to output_dir/metrics.json."""
    quant_config = resolve_lm(args)  # every argument checked before anything heavy is loaded
    use_kernels(quant_config, args.compile_kernels, logger.info)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, quant_config)
    checkpoint_path = resume_checkpoint(output_dir, resume=args.resume, resume_from=args.resume_from,
                                        overwrite=args.overwrite)
    tokenizer = load_tokenizer(args)
    accelerator = make_accelerator(args, quant_config, output_dir)
    lock = claim_output_dir(accelerator, output_dir, args, checkpoint_path)  # noqa: F841 (held while training)
    set_seed(args.seed)
    run = LMRun(args, quant_config, output_dir, accelerator, tokenizer)
    data = main_process_first(accelerator, lambda: load_text(args, tokenizer))
    model = load_model(args.model, quant_config)
    if prepare_model is not None:
        model = prepare_model(model) or model
    setup(run, data, model)
    resume(run, checkpoint_path)
    start_logging(run)
    epoch = run.state.epoch
    while run.state.global_step < run.state.total_steps:
        train_epoch(run, epoch)
        epoch += 1
    return finalise(run, checkpoint_path)
