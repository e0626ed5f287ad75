"""The training loop, top to bottom: arguments -> accelerator -> data -> model -> resume state -> epochs
(steps, evaluation) -> finalise. Full-precision training and PEGE/STE/EWGS QAT run the same code.

``train(args)`` takes the namespace of ``pege train`` (training.args) and returns the metrics written to
output_dir/metrics.json.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, is_tensorboard_available, set_seed
from torch import nn
from tqdm.auto import tqdm

from ..config import PEGEConfig
from ..hub import can_render_cards, render_model_card
from ..data import TensorImageDataset, image_processor, normalize, random_crop_flip
from ..quant.grid import codes_changed, summarize, weight_codes_and_positions
from ..quant.modules import FakeQuantizer, set_progress
from .args import resolve
from .evaluation import (acc_dtype, augmented_batches, batchnorm_buffers, calibrate, evaluate, reestimate_batchnorm,
                         sync_buffers)
from .loaders import EpochShuffleSampler, batch_seed, eval_loader, load_data, split_tensors
from .model import build_model, load_model, model_input_spec, normalization, use_kernels
from .optim import make_optimizer, make_scheduler
from .state import DIVERGED_FILE, TrainerState, clear_previous_run, lock_output_dir, remove_stale_checkpoint_parts
from .state import resume_checkpoint, run_settings, save_checkpoint
from .tracking import JSONLTracker, flat_hparams, rewind_jsonl
from ..version import __version__

logger = logging.getLogger("pege_hf.train")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; ``output_dir/diverged.json`` records where."""


class RunAccess:
    """What the shared steps read from a run (an image or a causal-LM run): the unwrapped model, whether
    this is the main process, the training time so far (a resumed run's included)."""

    @property
    def raw_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def elapsed(self) -> float:
        return self.state.elapsed_s + time.time() - self.started


@dataclass
class Run(RunAccess):
    """Everything one training run holds while it trains."""

    args: Any
    quant_config: PEGEConfig | None
    output_dir: Path
    accelerator: Accelerator
    model: nn.Module = None  # as prepared by accelerate (DDP-wrapped under data parallelism)
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None
    train_loader: Any = None
    test_loader: Any = None
    sampler: EpochShuffleSampler = None
    x_train: torch.Tensor = None
    mean: tuple = ()
    std: tuple = ()
    state: TrainerState = None
    info: dict = field(default_factory=dict)  # what metrics.json says about the run's setup
    sums: torch.Tensor = None  # this epoch on this rank: loss sum, correct, samples
    log_loss: torch.Tensor = None
    log_batches: int = 0
    previous_codes: Any = None  # weight codes at the last epoch end
    started: float = field(default_factory=time.time)
    progress: Any = None


# --------------------------------------------------------------------------------------------- setup


def make_accelerator(args, quant_config: PEGEConfig | None, output_dir: Path) -> Accelerator:
    log_with: list = [JSONLTracker(output_dir / "metrics.jsonl")]
    if is_tensorboard_available() and not args.no_tensorboard:
        log_with.append("tensorboard")
    handlers = []
    if quant_config is not None and quant_config.estimator == "pege":
        # at r = 0 a step size may take no part in the graph; DDP must not wait for its gradient
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=log_with, kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(non_blocking=True))


def claim_output_dir(accelerator, output_dir: Path, args, resume_path: Path | None):
    """Lock the folder (main process) and clear what --overwrite or a killed save left; returns the lock."""
    if not accelerator.is_main_process:
        return None
    lock = lock_output_dir(output_dir)
    if args.overwrite and resume_path is None:
        clear_previous_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_checkpoint_parts(output_dir)
    return lock


def make_model(args, quant_config, class_names: list[str]) -> nn.Module:
    if args.model is not None:
        model = load_model(args.model, quant_config)
        names = [str(v) for _, v in sorted((getattr(model.config, "id2label", None) or {}).items())]
        if names and names != class_names[:len(names)]:
            logger.warning("the model's labels %s differ from the data set's class names %s", names[:10],
                           class_names[:10])
        return model
    return build_model(args.arch, class_names)


def setup(run: Run, data, model: nn.Module) -> None:
    """Tensors, loaders, optimiser and schedule, prepared by accelerate; a fresh TrainerState."""
    args, accelerator = run.args, run.accelerator
    for flag, value in (("--reestimate-bn", args.reestimate_bn), ("--eval-reestimate-bn", args.eval_reestimate_bn)):
        if value and not batchnorm_buffers(model):
            raise ValueError(f"{flag} {value}: the model has no BatchNorm layers with running statistics to re-estimate")
    run.x_train, y_train = split_tensors(accelerator, data.train, data, model, "train")
    x_test, y_test = split_tensors(accelerator, data.test, data, model, "test")
    run.mean, run.std = normalization(model_input_spec(model)[0])
    model.to(accelerator.device)
    if args.channels_last:  # a conv follows its weight's format: the inputs need not change
        model.to(memory_format=torch.channels_last)
    if run.quant_config is not None:
        calibrate(model, normalize(run.x_train[: args.batch_size].to(accelerator.device), run.mean, run.std))
    run.sampler = EpochShuffleSampler(len(run.x_train), args.seed)
    train_loader = torch.utils.data.DataLoader(
        TensorImageDataset(run.x_train, y_train), batch_size=args.batch_size, sampler=run.sampler,
        num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda")
    test_loader = eval_loader(x_test, y_test, args.eval_batch_size, accelerator.device, args.num_workers)
    run.train_loader, run.test_loader = accelerator.prepare(train_loader, test_loader)
    batches_per_epoch = len(run.train_loader)  # per process, after accelerate's sharding
    total_steps = args.epochs * math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    warmup = prepare_optimization(accelerator, run, model, args, total_steps, batches_per_epoch)
    run.info = run_info(args, run.quant_config, data, accelerator.num_processes, warmup, total_steps)
    run.info.update(num_train=len(run.x_train), num_test=len(x_test), class_names=data.class_names)


def prepare_optimization(accelerator, run, model, args, total_steps: int, batches_per_epoch: int) -> int:
    """Optimiser and lr schedule (linear warmup over ``args.warmup_ratio`` of ``total_steps``) prepared with the
    model by accelerate into ``run``, and a fresh TrainerState; returns the warmup steps. Shared by the image
    and causal-LM loops."""
    warmup = int(round(args.warmup_ratio * total_steps))
    optimizer = make_optimizer(model, args, run.quant_config is not None)
    scheduler = make_scheduler(optimizer, args.scheduler, warmup, total_steps)
    run.model, run.optimizer, run.scheduler = accelerator.prepare(model, optimizer, scheduler)
    run.state = TrainerState(total_steps=total_steps, batches_per_epoch=batches_per_epoch,
                             world_size=accelerator.num_processes, batch_size=args.batch_size,
                             gradient_accumulation_steps=args.gradient_accumulation_steps)
    return warmup


def run_info(args, quant_config, data, world_size: int, warmup: int, total_steps: int) -> dict:
    """The run's setup as metrics.json and the trackers record it."""
    return {
        "base_model": args.model, "arch": args.arch, "dataset": str(args.dataset),
        "quantization_config": quant_config.to_dict() if quant_config is not None else None,
        "epochs": args.epochs, "batch_size": args.batch_size, "world_size": world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer": args.optimizer,
        "lr": args.lr, "quantizer_lr_scale": args.quantizer_lr_scale if quant_config is not None else None,
        "weight_decay": args.weight_decay, "scheduler": args.scheduler, "warmup_steps": warmup, "seed": args.seed,
        "momentum": args.momentum, "warmup_ratio": args.warmup_ratio, "max_grad_norm": args.max_grad_norm,
        "label_smoothing": args.label_smoothing, "reestimate_bn": args.reestimate_bn,
        "eval_reestimate_bn": args.eval_reestimate_bn,
        "total_steps": total_steps, "max_train": args.max_train, "max_test": args.max_test,
        "train_split": args.train_split, "test_split": args.test_split,
        "image_column": data.image_column, "label_column": data.label_column,
    }


def resume(run: Run, checkpoint: Path | None) -> None:
    """Load the checkpoint's model/optimizer/RNG and trainer state (after checking that it was saved by a run of
    the same shape and settings), and rewind the log to it."""
    log = run.output_dir / "metrics.jsonl"
    run.state.settings = run_settings(run.info)  # saved with every checkpoint, checked against a resumed one
    if checkpoint is None:
        if run.args.resume and run.main:  # cut off before its first checkpoint: the run and its log start over
            rewind_jsonl(log, step=None)
        return
    run.state.load(checkpoint)
    run.accelerator.load_state(str(checkpoint))
    if run.main:
        rewind_jsonl(log, run.state.global_step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, run.state.global_step,
                    run.state.epoch, run.state.batch_in_epoch)


def start_logging(run: Run) -> None:
    """Trackers, this rank's running sums, the progress bar; the wall clock starts here."""
    accelerator, device = run.accelerator, run.accelerator.device
    run.started = time.time()
    accelerator.init_trackers("pege", config=flat_hparams(run.info))
    dtype = acc_dtype(device)
    run.sums = torch.zeros(3, dtype=dtype, device=device)
    if accelerator.process_index == 0:
        run.sums += torch.tensor(run.state.epoch_sums, dtype=dtype, device=device)
    run.log_loss = torch.zeros((), dtype=dtype, device=device)
    run.progress = tqdm(total=run.state.total_steps, initial=run.state.global_step, desc="train", unit="step",
                        disable=not run.main)
    if run.state.fresh and run.main:
        what = f"QAT {run.quant_config.name}" if run.quant_config is not None else "full precision"
        steps = run.state.total_steps // run.args.epochs
        run.progress.write(f"training {what}: {run.info['num_train']} train / {run.info['num_test']} test images, "
                           f"{run.args.epochs} epochs x {steps} steps, {accelerator.num_processes} process(es) on "
                           f"{device.type} -> {run.output_dir}")
        qc = run.quant_config
        if (qc is not None and qc.estimator == "pege" and qc.curriculum != "instant" and qc.ramp_fraction > 0
                and not run.args.eval_reestimate_bn and batchnorm_buffers(run.raw_model)):
            run.progress.write(f"PEGE mixes full-precision values in until {100 * qc.ramp_fraction:g}% of training: "
                               "until then each epoch evaluates the fully quantized model with the mixed model's "
                               "BatchNorm statistics, which can read near chance; --eval-reestimate-bn 50 also "
                               "reports it with re-estimated statistics")


# --------------------------------------------------------------------------------------------- one epoch


def epoch_batches(run, epoch: int):
    """(loader, batches skipped) of one epoch: the whole epoch, or the rest of the one a resumed run stopped
    in; the model in training mode. Shared with the causal-LM loop."""
    run.model.train()
    skip = run.state.batch_in_epoch if epoch == run.state.epoch else 0
    run.train_loader.set_epoch(epoch)
    run.sampler.set_epoch(epoch)
    return (run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader), skip


def optimizer_step(run, loss: torch.Tensor) -> None:
    """Backward, and at the end of an accumulation clipping (--max-grad-norm), the optimizer and lr steps;
    inside ``accelerator.accumulate``. Shared with the causal-LM loop."""
    accelerator = run.accelerator
    accelerator.backward(loss)
    if accelerator.sync_gradients and run.args.max_grad_norm:
        accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    if accelerator.sync_gradients:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def train_epoch(run: Run, epoch: int) -> None:
    """One pass over the training data (the rest of it, for the epoch a resumed run stopped in)."""
    loader, skip = epoch_batches(run, epoch)
    if not skip:
        run.sums.zero_()
    generator = torch.Generator(device=run.accelerator.device)
    for batch_index, (images, labels) in enumerate(loader, start=skip + 1):
        seed = batch_seed(run.args.seed, epoch, batch_index, run.accelerator.process_index)
        generator.manual_seed(seed)
        # PEGE's random masks (and any other draw from torch's generator) follow the batch too, so a run
        # resumed mid-ramp draws what the uninterrupted run drew
        torch.manual_seed(seed ^ 0x5DEECE66D)
        train_step(run, images, labels, generator)
        if run.accelerator.sync_gradients:
            after_optimizer_step(run, epoch, batch_index)


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> None:
    """Forward, backward and (at the end of an accumulation) the optimizer step on one batch."""
    args, accelerator = run.args, run.accelerator
    with accelerator.accumulate(run.model):
        if run.quant_config is not None:
            set_progress(run.raw_model, min(1.0, run.state.global_step / run.state.total_steps))
        pixels = normalize(random_crop_flip(images, generator=generator), run.mean, run.std)
        logits = run.model(pixel_values=pixels).logits.float()
        loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
        optimizer_step(run, loss)
    with torch.no_grad():
        loss = loss.detach().to(run.sums.dtype)
        correct = (logits.argmax(-1) == labels).sum().to(run.sums.dtype)
        run.sums += torch.stack([loss * len(labels), correct, torch.ones_like(loss) * len(labels)])
        run.log_loss += loss
        run.log_batches += 1


def count_step(run, epoch: int) -> int:
    """Count the optimizer step and log every --log-every steps (stopping on a non-finite loss); the step."""
    run.state.global_step += 1
    run.progress.update(1)
    step = run.state.global_step
    if step % run.args.log_every == 0 or step == run.state.total_steps:
        log_training(run, epoch)
    return step


def after_optimizer_step(run: Run, epoch: int, batch_index: int) -> None:
    """Count the step (logging it); checkpoint every --checkpointing-steps."""
    step, args = count_step(run, epoch), run.args
    if isinstance(args.checkpointing_steps, int) and step % args.checkpointing_steps == 0:
        sums = run.accelerator.reduce(run.sums.clone(), reduction="sum").tolist()
        checkpoint(run, epoch, batch_index, sums)


def replacement_ratio(model: nn.Module) -> float | None:
    """The PEGE replacement ratio r(t) (1 for STE/EWGS; None for a float model)."""
    fq = next((m for m in model.modules() if isinstance(m, FakeQuantizer)), None)
    if fq is None:
        return None
    return float(getattr(fq, "ratio", 1.0)) if getattr(fq, "estimator", None) == "pege" else 1.0


def log_training(run: Run, epoch: int) -> None:
    step = run.state.global_step
    mean_loss = run.accelerator.reduce(run.log_loss / max(run.log_batches, 1), reduction="mean").item()
    record = {"train/loss": mean_loss, "lr": run.scheduler.get_last_lr()[0], "epoch": epoch,
              "progress": min(1.0, step / run.state.total_steps)}
    ratio = replacement_ratio(run.raw_model)
    if ratio is not None:
        record["quant/replacement_ratio"] = ratio
    run.accelerator.log(record, step=step)
    run.progress.set_postfix(loss=f"{mean_loss:.3f}")
    run.log_loss.zero_()
    run.log_batches = 0
    if not math.isfinite(mean_loss):  # the same reduced value on every rank: all stop together
        stop_diverged(run, epoch, mean_loss)


def stop_diverged(run: Run, epoch: int, mean_loss: float) -> None:
    step, path = run.state.global_step, run.output_dir / DIVERGED_FILE
    run.progress.close()
    if run.main:
        record = {"step": step, "epoch": epoch, "loss": str(mean_loss), "command": list(sys.argv)}
        path.write_text(json.dumps(record, indent=2) + "\n")
    run.accelerator.end_training()
    raise TrainingDiverged(f"training diverged: the mean loss up to step {step} is {mean_loss} (recorded in {path}); "
                           "try a lower --lr or --discretization-lambda, or --max-grad-norm")


def checkpoint(run: Run, epoch: int, batch_in_epoch: int, epoch_sums: list[float]) -> None:
    state = {**run.state.to_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch, "epoch_sums": epoch_sums,
             "elapsed_s": run.elapsed()}
    save_checkpoint(run.accelerator, run.output_dir, state, run.args.checkpoints_total_limit)


# --------------------------------------------------------------------------------------------- evaluation


def grid_statistics(run: Run) -> dict:
    """Where the latent weights sit on their grid, and how many codes changed since the last epoch."""
    if run.quant_config is None:
        return {}
    codes, positions = weight_codes_and_positions(run.raw_model)
    grid = {"quant/weight_grid_distance": summarize(positions)["mean_distance"]}
    if run.previous_codes is not None:
        grid["quant/weight_codes_changed"] = codes_changed(run.previous_codes, codes)
    run.previous_codes = codes
    return grid


def end_epoch(run: Run, epoch: int) -> None:
    """Train statistics, test evaluation, logs, the best model and the end-of-epoch checkpoint."""
    loss_sum, correct, seen = run.accelerator.reduce(run.sums.clone(), reduction="sum").tolist()
    sync_buffers(run.accelerator, run.model)
    metrics = evaluate(run.accelerator, run.model, run.test_loader, mean=run.mean, std=run.std,
                       desc=f"eval epoch {epoch + 1}")
    entry = {"epoch": epoch + 1, "step": run.state.global_step, "train_loss": loss_sum / max(seen, 1),
             "train_accuracy": correct / max(seen, 1), "accuracy": metrics["accuracy"], "top5": metrics["top5"],
             "loss": metrics["loss"], "lr": run.scheduler.get_last_lr()[0], "time_s": run.elapsed()}
    if run.args.eval_reestimate_bn:
        entry["accuracy_bn_reestimated"] = accuracy_with_reestimated_bn(run, epoch)
    run.state.history.append(entry)
    run.accelerator.log({f"eval/{k}": entry[k] for k in ("accuracy", "top5", "loss", "accuracy_bn_reestimated")
                         if k in entry}
                        | {"train/epoch_loss": entry["train_loss"], "train/epoch_accuracy": entry["train_accuracy"],
                           "epoch": epoch + 1} | grid_statistics(run), step=run.state.global_step)
    if run.main:
        bn = (f", BN re-estimated {100 * entry['accuracy_bn_reestimated']:.2f}%"
              if "accuracy_bn_reestimated" in entry else "")
        run.progress.write(f"epoch {epoch + 1}/{run.args.epochs}: train loss {entry['train_loss']:.4f}, test accuracy "
                           f"{100 * entry['accuracy']:.2f}% (top-5 {100 * entry['top5']:.2f}%{bn}), "
                           f"test loss {entry['loss']:.4f}")
    if run.state.best_accuracy is None or entry["accuracy"] > run.state.best_accuracy:
        run.state.best_accuracy, run.state.best_epoch = entry["accuracy"], epoch + 1
        save_model(run, run.output_dir / "best")
    run.state.epoch, run.state.batch_in_epoch = epoch + 1, 0
    if run.args.checkpointing_steps == "epoch":
        checkpoint(run, epoch + 1, 0, [0.0, 0.0, 0.0])


def accuracy_with_reestimated_bn(run: Run, epoch: int) -> float:
    """--eval-reestimate-bn N: test top-1 with the BatchNorm statistics re-estimated on N augmented training batches
    (drawn with their own generator, seeded by --seed and the epoch: the same on every rank, and the training's
    random streams untouched), after which the statistics training left are put back, so the run goes on as it
    would have. In the last epoch the batches are those of --reestimate-bn N."""
    args = run.args
    saved = [b.clone() for b in batchnorm_buffers(run.raw_model)]
    batches = augmented_batches(run.x_train, args.eval_reestimate_bn, args.batch_size,
                                seed=args.seed + args.epochs - 1 - epoch, mean=run.mean, std=run.std,
                                device=run.accelerator.device)
    try:
        reestimate_batchnorm(run.raw_model, batches)
        return evaluate(run.accelerator, run.model, run.test_loader, mean=run.mean, std=run.std,
                        desc=f"eval epoch {epoch + 1}, BN re-estimated")["accuracy"]
    finally:
        with torch.no_grad():
            for buffer, value in zip(batchnorm_buffers(run.raw_model), saved):
                buffer.copy_(value)


def save_model(run: Run, path: Path) -> None:
    """The model (packed for QAT) and the image processor that feeds it, so pipeline() loads the folder."""
    run.raw_model.save_pretrained(path, is_main_process=run.main, save_function=run.accelerator.save)
    if run.main:
        image_processor(run.mean, run.std, model_input_spec(run.raw_model)[1]).save_pretrained(path)


# --------------------------------------------------------------------------------------------- finalise


def final_batchnorm(run: Run) -> dict | None:
    """--reestimate-bn: every rank draws the same batches, so every rank ends with the same statistics."""
    args = run.args
    if not args.reestimate_bn:
        return None
    batches = augmented_batches(run.x_train, args.reestimate_bn, args.batch_size, seed=args.seed, mean=run.mean,
                                std=run.std, device=run.accelerator.device)
    last = run.state.history[-1] if run.state.history else None
    return {"batches": reestimate_batchnorm(run.raw_model, batches), "batch_size": args.batch_size,
            "seed": args.seed, "accuracy_before": last["accuracy"] if last else None}


def finalise(run: Run, resumed_from: Path | None) -> dict:
    """The final model, metrics.json and the model card; returns the metrics."""
    run.progress.close()
    run.accelerator.wait_for_everyone()
    bn = final_batchnorm(run)
    final = run.state.history[-1] if run.state.history and bn is None else None
    save_model(run, run.output_dir)
    if final is None:  # re-estimated, or resumed a finished run without its history
        sync_buffers(run.accelerator, run.model)
        final = evaluate(run.accelerator, run.model, run.test_loader, mean=run.mean, std=run.std)
    result = {
        **{k: final[k] for k in ("accuracy", "top5", "loss")},
        "best_accuracy": run.state.best_accuracy, "best_epoch": run.state.best_epoch, "history": run.state.history,
        "wall_time_s": run.elapsed(), "steps": run.state.global_step, **run.info, "command": list(sys.argv),
        "resumed_from": str(resumed_from) if resumed_from else None, "bn_reestimation": bn,
        "device": run.accelerator.device.type, "mixed_precision": run.accelerator.mixed_precision,
        "torch": torch.__version__, "pege_hf": __version__,
    }
    if run.main:
        (run.output_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        if can_render_cards():
            render_model_card(run.output_dir)
        else:
            print("model card: skipped (pip install 'pege-hf[hub]' to write README.md)", flush=True)
        print(f"done: test accuracy {100 * result['accuracy']:.2f}% (top-5 {100 * result['top5']:.2f}%), "
              f"{result['steps']} steps in {result['wall_time_s']:.0f} s -> {run.output_dir}", flush=True)
    run.accelerator.end_training()
    return result


# --------------------------------------------------------------------------------------------- the run


def default_output_dir(args, quant_config) -> Path:
    base = Path(args.model).name if args.model else args.arch
    return Path("runs") / f"{base}-{quant_config.name.lower() if quant_config is not None else 'fp'}"


def train(args) -> dict[str, Any]:
    """Run one training (full precision or QAT) as ``args`` (the `pege train` namespace) describe;
    returns the metrics dict that is also written to output_dir/metrics.json."""
    quant_config = resolve(args)  # every argument checked before anything is loaded
    use_kernels(quant_config, args.compile_kernels, logger.info)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args, quant_config)
    checkpoint_path = resume_checkpoint(output_dir, resume=args.resume, resume_from=args.resume_from,
                                        overwrite=args.overwrite)
    accelerator = make_accelerator(args, quant_config, output_dir)
    lock = claim_output_dir(accelerator, output_dir, args, checkpoint_path)  # noqa: F841 (held while training)
    set_seed(args.seed)
    run = Run(args, quant_config, output_dir, accelerator)
    data = load_data(accelerator, args)
    setup(run, data, make_model(args, quant_config, data.class_names))
    resume(run, checkpoint_path)
    start_logging(run)
    for epoch in range(run.state.epoch, args.epochs):
        train_epoch(run, epoch)
        end_epoch(run, epoch)
    return finalise(run, checkpoint_path)
