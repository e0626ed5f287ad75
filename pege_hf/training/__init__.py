"""Training: ``pege train`` / ``accelerate launch -m pege_hf.train``, and ``pege train-lm`` for causal LMs.

args        the command line (PEGEConfig options generated from the config's field metadata) and its checks
loop        the training loop in named steps (``train``)
state       trainer state, resumable checkpoints, the output-dir lock
evaluation  evaluation, calibration, BatchNorm re-estimation, ``evaluate_checkpoint``
optim       parameter groups, optimiser, lr schedule
tracking    the metrics.jsonl tracker
loaders     sampler, per-batch seeds, label checks
model       loading or building the model
recipes     tuned recipes as dicts
quickstart  `pege train` with no arguments
lm_args     `pege train-lm` arguments (the same generated PEGEConfig options) and their checks
lm_loop     the causal-LM loop (``train_lm``), built from loop's and state's shared steps
text        text data for causal LMs: datasets' loaders, tokenize, pack into blocks
"""

from __future__ import annotations

import argparse
import logging

from .args import add_arguments, build_quant_config, parse_args
from .loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "add_arguments", "build_quant_config", "main", "parse_args", "train"]


def main(args: argparse.Namespace) -> int:
    """`pege train`: the quickstart when no --model, --dataset or --estimator is given, else one run."""
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pege_hf.train").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars between the epoch lines
    if args.model is None and args.dataset is None and args.estimator is None:
        from .quickstart import quickstart

        return quickstart(args)
    train(args)
    return 0
