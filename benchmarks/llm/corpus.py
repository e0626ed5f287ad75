"""The benchmark's text, tokenizer and model, all made on this machine: the standard library's source
split by file into train/validation, a byte-level BPE trained on the training files, and a small
Llama built from a LlamaConfig (random init)."""

from __future__ import annotations

import hashlib
import shutil
import sysconfig
from pathlib import Path

EOS = "<|endoftext|>"
# folders of the standard library left out: tests, GUI code, vendored or generated files
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data",
             "site-packages", "__pycache__", "unittest"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files (sorted), without its tests and the folders in SKIP_DIRS."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if set(parts[:-1]) & SKIP_DIRS or parts[0].startswith(("test", "config-")):
            continue
        files.append(path)
    return sorted(files)


def is_validation(relative: str, percent: int = 5) -> bool:
    """A file's split, from a hash of its path: deterministic, independent of which other files exist."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < percent


def write_corpus(dest: Path, root: Path | None = None, percent: int = 5) -> dict:
    """dest/train/*.py and dest/validation/*.py (one file per source file, path-flattened names)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    counts = {"train": 0, "validation": 0, "train_bytes": 0, "validation_bytes": 0}
    for split in ("train", "validation"):
        shutil.rmtree(dest / split, ignore_errors=True)
        (dest / split).mkdir(parents=True)
    for path in stdlib_files(root):
        relative = path.relative_to(root).as_posix()
        split = "validation" if is_validation(relative, percent) else "train"
        target = dest / split / relative.replace("/", "__")
        shutil.copyfile(path, target)
        counts[split] += 1
        counts[f"{split}_bytes"] += target.stat().st_size
    return counts


def train_tokenizer(files: list[Path], vocab_size: int, dest: Path):
    """A byte-level BPE (GPT-2 style) trained on ``files``, saved in ``dest`` as a transformers tokenizer
    whose EOS token is <|endoftext|>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(f) for f in files], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
              show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tokenizer.save_pretrained(dest)
    return tokenizer


def tiny_llama(tokenizer, dest: Path, *, hidden: int = 128, layers: int = 4, heads: int = 4,
               intermediate: int = 384, positions: int = 256, seed: int = 0):
    """A randomly initialised LlamaForCausalLM for ``tokenizer``'s vocabulary, saved (with the tokenizer)
    in ``dest``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=positions, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return model
