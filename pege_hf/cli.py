"""The `pege` command: train | train-lm | eval | push | demo | bench (one module per command, see COMMANDS)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and main(args) -> int
COMMANDS = {
    "train": ("pege_hf.train", "train a model (full precision or QAT); same as `accelerate launch -m pege_hf.train`"),
    "train-lm": ("pege_hf.train_lm", "train a causal language model on text (full precision or QAT); same as "
                 "`accelerate launch -m pege_hf.train_lm`"),
    "eval": ("pege_hf.evaluate", "accuracy (top-1, top-5) of a float or PEGE checkpoint on a data set"),
    "push": ("pege_hf.hub", "upload a checkpoint folder to the Hugging Face Hub with a model card"),
    "demo": ("pege_hf.demo", "open the Gradio demo: full precision vs 2/3/4-bit predictions"),
    "export": ("pege_hf.export.command", "export a trained PEGE model for deployment (ONNX Runtime integer kernels, or compressed-tensors for plain transformers)"),
    "bench": ("pege_hf.bench", "micro-benchmarks: training-step speed and memory, packed checkpoint size, step-size init"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pege", description="PEGE quantization-aware training for Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            importlib.import_module(module).add_arguments(p)
    return parser


def run_command(name: str, main, args) -> int:
    """``main(args)``; bad input (ValueError, FileNotFoundError, FileExistsError) becomes one line on stderr,
    ``pege NAME: error: ...``, and exit code 2, as argparse reports a bad option. ``args`` may be a callable
    that parses them (so a parse that validates is covered too)."""
    try:
        return main(args() if callable(args) else args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one clear line, no traceback
        print(f"pege {name}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    return run_command(args.command, importlib.import_module(COMMANDS[args.command][0]).main, args)


if __name__ == "__main__":
    sys.exit(main())
