"""`pege train-lm` arguments: the model and text options, the PEGEConfig options generated from the
config's fields (training.args), the shared optimisation and run options, and their checks (before
anything is loaded)."""

from __future__ import annotations

import argparse

from ..config import PEGEConfig
from ..sources import check_model_source
from .args import add_config_arguments, add_optimisation_options, add_run_options
from .args import build_quant_config, check_training_options
from .text import check_text_source

DEFAULT_LM_LR = 1e-4
DEFAULT_LM_EPOCHS = 1
DESCRIPTION = """\
Train a causal language model (LlamaForCausalLM, GPT-2, ...) on text, in full precision or with
quantization-aware training (PEGE, STE, EWGS), with Accelerate.

The text is tokenized with the model's tokenizer, each document ends with the EOS token, and the
stream is cut into blocks of --block-size tokens. Every --eval-steps steps and at the end the
validation loss and perplexity are measured. The final model is saved packed (low-bit codes and step
sizes) with its tokenizer and a model card; embeddings, norms and the lm_head stay float.

`pege train-lm ARGS` runs one process; `accelerate launch [launch options] -m pege_hf.train_lm ARGS`
runs the same code on several GPUs, machines or CPU processes. --batch-size is per process.
Outputs: the final model, metrics.json, metrics.jsonl, logs/ (TensorBoard), checkpoints/step_N/ and
README.md (model card)."""
EPILOG = """\
examples:
  pege train-lm --model runs/llama-fp --dataset corpus/ --w-bits 4 --group-size 32 --a-bits none
  pege train-lm --model runs/llama-fp --dataset corpus.txt --w-bits 4 --group-size 32 \\
      --a-bits 8 --a-quantizer dynamic_token --max-steps 300 --block-size 256
  pege train-lm --model runs/llama-init --dataset corpus/ --estimator none --lr 1e-3   # full precision
  accelerate launch --num_processes 2 -m pege_hf.train_lm --model ... --dataset ...
"""


def _add_model_and_data(parser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="PATH_OR_ID",
                   help="causal LM checkpoint to train (a save_pretrained folder or a Hub id); float for QAT")
    g.add_argument("--tokenizer", default=None, metavar="PATH_OR_ID", help="tokenizer (default: the model's)")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, metavar="SOURCE",
                   help="a text file, a folder of text files (one document per file; train/ and validation/ "
                        "subfolders or *train* / *validation* names are the splits), a parquet / JSON lines / CSV "
                        "file or folder, a save_to_disk folder, or a Hub dataset id")
    g.add_argument("--dataset-config", default=None, metavar="NAME", help="the Hub data set's configuration")
    g.add_argument("--text-column", default=None, metavar="NAME",
                   help="column holding the text (default: 'text', else the only string column)")
    g.add_argument("--train-split", default="train", metavar="NAME", help="training split (default train)")
    g.add_argument("--validation-split", default=None, metavar="NAME",
                   help="validation split (default: validation/valid/val/dev/test, else --validation-percentage of "
                        "the training rows)")
    g.add_argument("--validation-percentage", type=float, default=None, metavar="P",
                   help="%% of training rows (files) held out when the data has no validation split (default 5; an "
                        "error when a validation split is used)")
    g.add_argument("--block-size", type=int, default=None, metavar="N",
                   help="tokens per training sequence (default: min(1024, the model's max_position_embeddings))")
    g.add_argument("--max-train-samples", type=int, default=None, metavar="N", help="train on N random blocks")
    g.add_argument("--max-eval-samples", type=int, default=None, metavar="N", help="evaluate on N random blocks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description, parser.epilog = DESCRIPTION, EPILOG
    _add_model_and_data(parser)
    add_config_arguments(parser)
    g = parser.add_argument_group("optimisation")
    add_optimisation_options(g, batch_size=8, optimizer="adam", weight_decay=0.0,
                             lr_help=f"learning rate (default {DEFAULT_LM_LR:g})",
                             epochs_help=f"passes over the training blocks (default {DEFAULT_LM_EPOCHS}; "
                                         "--max-steps wins)")
    g.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="optimizer steps in all (default: --epochs passes over the data)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default 1; 0: off)")
    g.add_argument("--eval-steps", type=int, default=None, metavar="N",
                   help="measure validation loss every N optimizer steps (default: only at the end)")
    add_run_options(parser.add_argument_group("run"), default_output="runs/<model>-<quant>")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pege_hf.train_lm")
    add_arguments(parser)
    return parser.parse_args(argv)


_LM_RULES = (
    ("block_size", lambda v: v is None or v >= 2, ">= 2"),
    ("max_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("eval_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("max_train_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("max_eval_samples", lambda v: v is None or v >= 1, ">= 1"),
    ("validation_percentage", lambda v: v is None or 0 < v < 100, "in (0, 100)"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
)


def resolve_lm(args) -> PEGEConfig | None:
    """Check every argument and fill the defaults; the run's PEGEConfig (None: full precision). Only the
    model's config (a small JSON file) may be read here, for the block size."""
    check_training_options(args)
    for name, ok, what in _LM_RULES:
        if not ok(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be {what}; got {getattr(args, name)}")
    if args.checkpointing_steps == "epoch":
        raise ValueError("--checkpointing-steps epoch: pege train-lm checkpoints by optimizer steps; pass a number N")
    if args.validation_split is not None and args.validation_split == args.train_split:
        raise ValueError(f"--validation-split {args.validation_split!r} is also the training split: the perplexity "
                         "would be measured on training text; name another split")
    if args.validation_split is not None and args.validation_percentage is not None:
        raise ValueError(f"--validation-percentage {args.validation_percentage:g} carves a validation split off the "
                         f"training rows, but --validation-split {args.validation_split!r} names one: pass one of them")
    if getattr(args, "skip_stem", None) is not None:
        raise ValueError("--skip-stem / --no-skip-stem: a causal LM's first Linear reads the token embedding, so it is "
                         "never a float stem; keep layers float with --modules-to-not-convert")
    quant_config = build_quant_config(args)
    check_model_source(args.model)
    if args.tokenizer is not None:
        check_model_source(args.tokenizer, "--tokenizer")
    args.dataset = check_text_source(args.dataset)
    args.lr = DEFAULT_LM_LR if args.lr is None else args.lr
    args.epochs = args.epochs or DEFAULT_LM_EPOCHS
    args.block_size = check_block_size(args.model, args.block_size)
    if quant_config is not None and (quant_config.group_size or quant_config.layer_overrides):
        check_layer_shapes(args.model, quant_config)
    return quant_config


def check_layer_shapes(model: str, quant_config: PEGEConfig) -> None:
    """The layer swap tried on the model built on the meta device from its config (no weights, no memory): a
    group_size that does not divide a layer's inputs fails here, before the text is read and tokenized."""
    import torch
    from transformers import AutoConfig

    from ..hf.loading import model_class_for
    from ..hf.quantizer import swap_layers

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        skeleton = model_class_for(model)._from_config(config)
    swap_layers(skeleton, quant_config)


def check_block_size(model: str, block_size: int | None) -> int:
    """--block-size, checked against the model's max_position_embeddings (default min(1024, it))."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if block_size is None:
        return min(1024, limit) if limit else 1024
    if limit and block_size > limit:
        raise ValueError(f"--block-size {block_size} is larger than the model's max_position_embeddings ({limit})")
    return block_size

