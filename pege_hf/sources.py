"""Where a model or data set comes from: one rule for "local path or Hub id?" and one checkpoint check.

Every command that takes a model or data source (``pege train``, ``eval``, ``push``, ``demo``) and the
data loader use these, so the same text means the same thing everywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The models shipped inside the package (full precision and its PEGE W2A2/W3A3/W4A4 checkpoints).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "assets" / "models"
SHIPPED_FP_MODEL = SHIPPED_MODELS_DIR / "resnet20-fp"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".parquet", ".arrow")


def looks_like_path(text: str | os.PathLike) -> bool:
    """True for text that can only be a local path, never a Hub id ("name" or "owner/name"): absolute,
    starting with . or ~, more than one /, a backslash, or a file suffix."""
    text = os.fspath(text)
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
            or text.endswith(_FILE_SUFFIXES))


def is_hub_id(text: str | os.PathLike | None) -> bool:
    """True when ``text`` names no local file or folder and has the form of a Hub repo id."""
    if not text:
        return False
    text = os.fspath(text)
    return (not Path(text).expanduser().exists() and not looks_like_path(text)
            and _HUB_ID.match(text) is not None)


def check_checkpoint_dir(path: str | os.PathLike, flag: str = "checkpoint folder") -> Path:
    """``path`` as a Path; FileNotFoundError (naming ``flag``) unless it is a folder with a config.json,
    as save_pretrained writes it."""
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{flag} {text!r} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {text!r} is a file, not a checkpoint folder (a folder written by "
                                "save_pretrained or `pege train`)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {text!r} is not a model checkpoint: it has no config.json (expected a "
                                "folder written by save_pretrained or `pege train`)")
    return folder


def check_model_source(source: str | os.PathLike, flag: str = "--model") -> str:
    """A checkpoint folder (checked) or a Hub id (passed through); FileNotFoundError for a local path that
    is not a saved model, so a typo fails before anything is loaded."""
    text = os.fspath(source)
    if Path(text).expanduser().exists() or looks_like_path(text):
        try:
            return str(check_checkpoint_dir(text, flag))
        except FileNotFoundError as err:
            if not Path(text).expanduser().exists():
                raise FileNotFoundError(f"{flag} {text!r} does not exist (expected a checkpoint folder with "
                                        "config.json, or a Hub model id such as owner/name)") from err
            raise
    return text
