"""`pege eval MODEL`: top-1 / top-5 accuracy of a float or PEGE checkpoint on an image data set.

The evaluation is pege_hf.training.evaluation (the loop training runs use), so a run's metrics.json and
`pege eval` of its saved model agree. Runs distributed too: ``accelerate launch -m pege_hf.evaluate MODEL``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DEFAULT_DATASET
from .training.args import add_column_and_split_args
from .training.evaluation import BN_BATCH_SIZE, check_evaluation_options, evaluate_checkpoint

__all__ = ["add_arguments", "evaluate_checkpoint", "main"]


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


def describe(result: dict, model: str, dataset: str) -> str:
    qc = result["quantization_config"]
    kind = "full precision" if not result["quantized"] else (
        f"PEGE W{qc.get('w_bits')}A{qc.get('a_bits') or 32} ({qc.get('estimator')})" if qc else "quantized")
    text = (f"{Path(str(model)).name} [{kind}] on {result['samples']} {result['split']} images of {dataset}:\n"
            f"  accuracy {100 * result['accuracy']:.2f}%   top-5 {100 * result['top5']:.2f}%   "
            f"loss {result['loss']:.4f}")
    if result["bn_reestimation"]:
        bn = result["bn_reestimation"]
        text += (f"\n  (BatchNorm statistics re-estimated on {bn['images']} augmented training images, "
                 f"{bn['batches']} batches of {bn['batch_size']})")
    return text


def main(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    check_evaluation_options(args.split, args.batch_size, args.reestimate_bn, args.max_test)
    if args.split == "train" and args.test_split is not None:
        raise ValueError(f"--test-split {args.test_split!r}: not used with --split train (it evaluates the training "
                         "split); drop it or use --split test")
    result = evaluate_checkpoint(
        args.model, args.dataset, split=args.split, image_column=args.image_column, label_column=args.label_column,
        train_split=args.train_split, test_split=args.test_split, max_test=args.max_test, seed=args.seed,
        batch_size=args.batch_size, mixed_precision=args.mixed_precision, reestimate_bn=args.reestimate_bn)
    if PartialState().is_main_process:
        print(json.dumps(result) if args.json else describe(result, args.model, args.dataset))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pege_hf.evaluate",
                                     description="accuracy (top-1, top-5) of a float or PEGE checkpoint")
    add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command("eval", main, parse_args))
