"""Text for causal-LM training (`pege train-lm`): a data set read with datasets' own loaders, tokenized
and packed into blocks of ``block_size`` tokens (the recipe of transformers' run_clm example).

Sources: a text file or a folder of text files (any extension; one row per file, so a split never cuts a
file in two), a folder or file of parquet / JSON lines / CSV, a ``save_to_disk`` folder, or a Hub id.
Splits follow datasets' file-name rules (``train/``, ``validation/`` folders or ``*train*`` files); with
no validation split, ``validation_percentage`` % of the training rows (files) are held out, seeded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

from ..sources import is_hub_id

TABULAR = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}
VALIDATION_SPLITS = ("validation", "valid", "val", "dev", "test")


@dataclass
class TextData:
    """Packed token blocks of the two splits (LongTensor, blocks x block_size) and what they came from."""

    train: torch.Tensor
    validation: torch.Tensor
    text_column: str
    validation_split: str  # the split's name, or "N% of train" when carved off
    train_rows: int
    validation_rows: int


def check_text_source(source: str | os.PathLike) -> str:
    """The data source as given, or a one-line FileNotFoundError when it is neither a local file or folder
    nor something a Hub id can be."""
    text = str(source)
    if Path(text).expanduser().exists():
        return text
    if is_hub_id(text) and not text.startswith((".", "~")) and "/" in text:
        return text
    raise FileNotFoundError(f"--dataset {text!r}: no such file or folder (and not a Hub dataset id 'owner/name')")


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-3:])]


def read_text_dataset(source: str, config_name: str | None = None):
    """A DatasetDict of ``source`` (see the module docstring), read with datasets' loaders."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    if path.is_file():
        builder = TABULAR.get(path.suffix.lower())
        if builder:
            return datasets.load_dataset(builder, data_files={"train": str(path)})
        return datasets.load_dataset("text", data_files={"train": str(path)}, sample_by="document")
    if path.is_dir():
        files = _files(path)
        if not files:
            raise ValueError(f"--dataset {source!r}: the folder holds no files")
        if any(p.suffix.lower() in TABULAR for p in files):
            return datasets.load_dataset(str(path))
        return datasets.load_dataset("text", data_dir=str(path), sample_by="document")
    return datasets.load_dataset(source, config_name)


def text_column_of(split, wanted: str | None) -> str:
    """The column holding the text: ``wanted`` (checked), else 'text', else the only string column."""
    from datasets import Value

    columns = list(split.column_names)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"--text-column {wanted!r} is not a column of the data set; its columns: {columns}")
        return wanted
    if "text" in columns:
        return "text"
    strings = [c for c, f in split.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"the data set has no 'text' column and {len(strings)} string columns ({strings}); name the "
                     f"one to train on with --text-column (columns: {columns})")


DEFAULT_VALIDATION_PERCENTAGE = 5.0


def train_and_validation(dd, train_split: str, validation_split: str | None, percentage: float | None, seed: int):
    """(train rows, validation rows, validation split name): the split named, else the first of VALIDATION_SPLITS the
    data set has, else ``percentage`` % (default 5) of the training rows; a percentage given for a data set with a
    validation split is an error (it would carve nothing)."""
    if train_split not in dd:
        raise ValueError(f"--train-split {train_split!r} is not a split of the data set; its splits: {list(dd)}")
    if validation_split is not None:
        if validation_split not in dd:
            raise ValueError(f"--validation-split {validation_split!r} is not a split of the data set; its splits: "
                             f"{list(dd)}")
        return dd[train_split], dd[validation_split], validation_split
    found = next((name for name in VALIDATION_SPLITS if name in dd and name != train_split), None)
    if found:
        if percentage is not None:
            raise ValueError(f"--validation-percentage {percentage:g}: the data set has a {found!r} split, which is the "
                             "validation split; drop the option (or name another split with --validation-split)")
        return dd[train_split], dd[found], found
    percentage = DEFAULT_VALIDATION_PERCENTAGE if percentage is None else percentage
    rows = dd[train_split]
    if len(rows) < 2:
        raise ValueError(f"the data set has one {train_split!r} row (file) and no validation split: there is nothing "
                         "to hold out; add a validation split (a validation/ folder) or more files")
    parts = rows.train_test_split(test_size=max(1, round(len(rows) * percentage / 100)), seed=seed, shuffle=True)
    return parts["train"], parts["test"], f"{percentage:g}% of {train_split} (seed {seed})"


def pack(rows, tokenizer, column: str, block_size: int, desc: str) -> torch.Tensor:
    """Tokenize every row, end each with the EOS token, concatenate and cut into blocks of ``block_size``
    tokens (the last partial block is dropped). LongTensor of shape (blocks, block_size)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch):
        return {"input_ids": [ids + eos for ids in tokenizer(batch[column], add_special_tokens=False)["input_ids"]]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // block_size * block_size
        return {"input_ids": [ids[i:i + block_size] for i in range(0, usable, block_size)]}

    tokens = rows.map(tokenize, batched=True, remove_columns=rows.column_names, desc=f"tokenize {desc}")
    total = sum(len(ids) for ids in tokens["input_ids"])
    if total < block_size:
        raise ValueError(f"the {desc} split has {total} tokens, fewer than one block of --block-size {block_size}; "
                         "use a smaller --block-size or more text")
    blocks = tokens.map(group, batched=True, batch_size=len(tokens), desc=f"pack {desc}")
    return torch.tensor(blocks["input_ids"], dtype=torch.long)


def subset(blocks: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """At most ``limit`` blocks, a seeded random choice (all of them when ``limit`` is None)."""
    if limit is None or limit >= len(blocks):
        return blocks
    keep = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return blocks[keep]
