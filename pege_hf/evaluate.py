"""`pege eval MODEL`: top-1 / top-5 accuracy of a float or PEGE checkpoint on an image data set.

The evaluation loop is pege_hf.train.evaluate, the one the training runs use, so a run's
metrics.json and `pege eval` of its saved model agree. Runs distributed too:
``accelerate launch -m pege_hf.evaluate MODEL --dataset ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .data import CIFAR10_MEAN, CIFAR10_STD, DEFAULT_DATASET, TensorImageDataset, load_image_dataset, to_tensors
from .train import _main_first, _model_input_spec, augmented_batches, check_checkpoint, check_labels, evaluate
from .train import add_column_and_split_args, is_quantized, load_model, reestimate_batchnorm

BN_BATCH_SIZE = 128  # the training batch size of the benchmark runs


def evaluate_checkpoint(model: str, dataset: str = DEFAULT_DATASET, *, split: str = "test",
                        image_column: str | None = None, label_column: str | None = None,
                        train_split: str | None = None, test_split: str | None = None,
                        max_test: int | None = None, seed: int = 0, batch_size: int = 256,
                        mixed_precision: str | None = None, reestimate_bn: int = 0) -> dict[str, Any]:
    """Accuracy, top-5 and loss of the checkpoint ``model`` on ``split`` ("test" or "train") of
    ``dataset``. ``max_test`` / ``seed`` pick the same evaluation subset a training run with
    ``--max-test`` / ``--seed`` used. Accuracies are fractions in [0, 1].

    ``reestimate_bn`` > 0 first re-estimates the BatchNorm statistics on that many augmented training
    batches of BN_BATCH_SIZE images (seeded with ``seed``; see train.reestimate_batchnorm); the
    checkpoint on disk is left as it is."""
    from accelerate import Accelerator

    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train'; got {split!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    if reestimate_bn < 0:
        raise ValueError(f"reestimate_bn (--reestimate-bn, BatchNorm re-estimation batches) must be >= 0; "
                         f"got {reestimate_bn}")
    check_checkpoint(model)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    data = _main_first(accelerator, lambda: load_image_dataset(
        dataset, image_column=image_column, label_column=label_column, train_split=train_split,
        test_split=test_split, seed=seed, max_test=max_test, max_train=max_test if split == "train" else None))
    net = load_model(model)
    channels, image_size = _model_input_spec(net)
    images, labels = to_tensors(getattr(data, split), data.image_column, data.label_column, image_size, channels,
                                progress=None if accelerator.is_main_process else False)
    num_labels = int(net.config.num_labels)
    check_labels(labels, num_labels, split)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if channels == 3 else ((0.5,), (0.25,))
    bn = None
    if reestimate_bn:  # every rank draws the same batches, so every rank ends with the same statistics
        rows = data.train.shuffle(seed=seed).select(range(min(len(data.train), reestimate_bn * BN_BATCH_SIZE)))
        train_images, _ = to_tensors(rows, data.image_column, data.label_column, image_size, channels,
                                     progress=None if accelerator.is_main_process else False)
        seen = reestimate_batchnorm(net.to(accelerator.device), augmented_batches(
            train_images, reestimate_bn, BN_BATCH_SIZE, seed=seed, mean=mean, std=std, device=accelerator.device))
        bn = {"batches": seen, "batch_size": BN_BATCH_SIZE, "images": len(train_images), "seed": seed}
    loader = torch.utils.data.DataLoader(TensorImageDataset(images, labels), batch_size=batch_size, shuffle=False,
                                         pin_memory=accelerator.device.type == "cuda")
    net = accelerator.prepare_model(net, evaluation_mode=True)
    loader = accelerator.prepare_data_loader(loader)
    metrics = evaluate(accelerator, net, loader, mean=mean, std=std)
    qc = getattr(accelerator.unwrap_model(net).config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    return {
        "model": str(model), "dataset": str(dataset), "split": split, **metrics,
        "quantized": is_quantized(accelerator.unwrap_model(net)), "quantization_config": qc,
        "world_size": accelerator.num_processes, "bn_reestimation": bn,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="checkpoint folder (save_pretrained output: float or PEGE) or Hub model id")
    parser.add_argument("--dataset", default=DEFAULT_DATASET, metavar="SOURCE",
                        help="Hub dataset id, parquet file/folder, save_to_disk folder or imagefolder "
                             "(default: the shipped CIFAR-10 sample)")
    parser.add_argument("--split", default="test", choices=("test", "train"), help="which split (default test)")
    add_column_and_split_args(parser)
    parser.add_argument("--max-test", type=int, default=None, metavar="N",
                        help="evaluate a random subset of N images (the one `pege train --max-test N` uses)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset / carved test split (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size (default 256)")
    parser.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                        help="default: as configured for accelerate (no)")
    parser.add_argument("--reestimate-bn", type=int, default=0, metavar="N",
                        help=f"first re-estimate the BatchNorm running statistics on N augmented training batches of "
                             f"{BN_BATCH_SIZE} images (the checkpoint on disk is not changed; default 0: off)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def main(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(
        args.model, args.dataset, split=args.split, image_column=args.image_column, label_column=args.label_column,
        train_split=args.train_split, test_split=args.test_split, max_test=args.max_test, seed=args.seed,
        batch_size=args.batch_size, mixed_precision=args.mixed_precision, reestimate_bn=args.reestimate_bn)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if args.json:
        print(json.dumps(result))
        return 0
    qc = result["quantization_config"]
    kind = "full precision" if not result["quantized"] else (
        f"PEGE W{qc.get('w_bits')}A{qc.get('a_bits') or 32} ({qc.get('estimator')})" if qc else "quantized")
    print(f"{Path(str(args.model)).name} [{kind}] on {result['samples']} {result['split']} images of {args.dataset}:\n"
          f"  accuracy {100 * result['accuracy']:.2f}%   top-5 {100 * result['top5']:.2f}%   "
          f"loss {result['loss']:.4f}")
    if result["bn_reestimation"]:
        bn = result["bn_reestimation"]
        print(f"  (BatchNorm statistics re-estimated on {bn['images']} augmented training images, "
              f"{bn['batches']} batches of {bn['batch_size']})")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m pege_hf.evaluate",
                                      description="accuracy (top-1, top-5) of a float or PEGE checkpoint")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
