"""`pege train` and ``accelerate launch -m pege_hf.train``: the entry module over pege_hf.training.

    pege train                                            # the quickstart
    pege train --model runs/fp --dataset ../data/cifar10 --w-bits 2 --a-bits 2 --epochs 30
    accelerate launch --multi_gpu --num_processes 8 -m pege_hf.train --model runs/fp --dataset ...

See ``pege train --help``, docs/cli.md and docs/distributed.md.
"""

from __future__ import annotations

import sys

from .training import add_arguments, main, parse_args

__all__ = ["add_arguments", "main"]

if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command("train", main, parse_args))
