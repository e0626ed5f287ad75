"""Data for a run: the deterministic sampler, per-batch seeds, label checks, loading on the main process first."""

from __future__ import annotations

import torch

from ..data import TensorImageDataset, load_image_dataset, to_tensors
from .model import model_input_spec


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A deterministic shuffle: the order of epoch e is randperm(n) seeded with (seed, e), the same on
    every rank and in a resumed run."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The augmentation seed of one batch on one rank: the same in a resumed run."""
    return (((seed * 10_007 + epoch) * 1_000_003 + batch) * 4099 + rank) % (2**62)


def check_labels(labels: torch.Tensor, num_labels: int, split: str) -> None:
    """ValueError when a label does not fit the model's head."""
    if len(labels) == 0:
        raise ValueError(f"the {split} split is empty")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_labels:
        raise ValueError(
            f"the {split} split has labels in [{low}, {high}] but the model's head has {num_labels} "
            f"outputs (model.config.num_labels = {num_labels}): labels must lie in [0, {num_labels - 1}]. "
            "Use a model trained on this label set, or check --label-column.")


def main_process_first(accelerator, fn):
    """fn() on the local main process first (datasets' cache), then on the others; an error on the main
    process is raised everywhere instead of leaving the others waiting at the barrier."""
    result, error = None, None
    if accelerator.is_local_main_process:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the barrier
            error = err
    accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        result = fn()
    if error is not None:
        raise error
    return result


def load_data(accelerator, args, max_train=None):
    """The run's ImageData (train/test splits, columns, class names), read on the main process first."""
    return main_process_first(accelerator, lambda: load_image_dataset(
        args.dataset, image_column=args.image_column, label_column=args.label_column,
        train_split=args.train_split, test_split=args.test_split, seed=args.seed,
        max_train=max_train if max_train is not None else args.max_train, max_test=args.max_test))


def split_tensors(accelerator, split, data, model, name: str):
    """(uint8 images, labels) of one split, decoded at the model's input size and checked against its head."""
    channels, image_size = model_input_spec(model)
    images, labels = to_tensors(split, data.image_column, data.label_column, image_size, channels,
                                progress=None if accelerator.is_main_process else False)
    check_labels(labels, int(model.config.num_labels), name)
    return images, labels


def eval_loader(images, labels, batch_size: int, device, num_workers: int = 0):
    """An ordered DataLoader over in-memory images."""
    return torch.utils.data.DataLoader(TensorImageDataset(images, labels), batch_size=batch_size, shuffle=False,
                                       num_workers=num_workers, pin_memory=device.type == "cuda")
