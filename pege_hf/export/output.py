"""Where an export may write: checked before any export work, so that nothing already saved is lost."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin")  # a save_pretrained folder's own files: configs, weights


def check_output(path: Path, model, *, folder: bool, overwrite: bool) -> None:
    """Refuse an output the export cannot write or must not replace: an existing one without ``overwrite``, a file
    where the export writes a folder (``folder``) or the reverse, and one whose replacement would delete the
    checkpoint being exported (its folder, a folder holding it, or one of its files)."""
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if folder and not path.is_dir():
        raise ValueError(f"{path} is a file; this export writes a folder: choose another output")
    if not folder and path.is_dir():
        raise ValueError(f"{path} is a folder; this export writes one file: choose a file name")
    source = getattr(getattr(model, "config", None), "name_or_path", None)
    if source and Path(source).is_dir():
        src, out = Path(source).resolve(), path.resolve()
        own_file = out.parent == src and out.suffix in CHECKPOINT_SUFFIXES
        if out == src or out in src.parents or own_file:
            raise ValueError(f"{path} is (or holds, or is a file of) the checkpoint {source} being exported; "
                             "replacing it would delete the checkpoint: choose another output")
