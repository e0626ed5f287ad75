"""`pege train-lm` and ``accelerate launch -m pege_hf.train_lm``: causal-LM training (full precision or
QAT) on text, over pege_hf.training.lm_loop.

    pege train-lm --model runs/llama-fp --dataset corpus/ --w-bits 4 --group-size 32 --a-bits none
    accelerate launch --num_processes 2 -m pege_hf.train_lm --model ... --dataset ...

See ``pege train-lm --help``, docs/cli.md and docs/transformers.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .training.lm_args import add_arguments, parse_args
from .training.lm_loop import train_lm

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pege_hf.train").setLevel(logging.INFO)
    hf_logging.disable_progress_bar()
    train_lm(args)
    return 0


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command("train-lm", main, parse_args))
