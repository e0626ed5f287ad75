"""Image-classification data: loading with the `datasets` library, and tensor transforms.

The flow a training script follows::

    data = load_image_dataset(DEFAULT_DATASET)            # or a parquet file/folder, a
                                                          # save_to_disk folder, an
                                                          # imagefolder, a Hub id
    x_train, y_train = to_tensors(data.train, data.image_column, data.label_column)
    loader = DataLoader(TensorImageDataset(x_train, y_train), batch_size=128, shuffle=True)
    for images, labels in loader:                         # uint8, N x 3 x 32 x 32
        images = normalize(random_crop_flip(images), CIFAR10_MEAN, CIFAR10_STD)

Images are decoded once into one uint8 tensor; augmentation and normalisation then run
on whole batches, on whatever device the batch lives on.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import datasets
import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from .hf.cifar import CIFAR10_LABELS
from .sources import looks_like_path

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_MEAN",
    "image_processor",
    "CIFAR10_STD",
    "CIFAR10_CLASSES",
    "DEFAULT_DATASET",
    "ImageData",
    "TensorImageDataset",
    "load_image_dataset",
    "to_tensors",
    "crop_flip",
    "random_crop_flip",
    "normalize",
    "preprocess_pil",
    "make_cifar_sample",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = CIFAR10_LABELS

#: The CIFAR-10 sample shipped with the package (train.parquet + test.parquet).
DEFAULT_DATASET = str(Path(__file__).resolve().parent / "assets" / "cifar10_sample")

# Conventional column names, in order of preference, used when the features alone
# do not settle which column is which.
IMAGE_COLUMN_NAMES = ("img", "image", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "target", "digit", "class", "fine_label")



# --------------------------------------------------------------------------- loading


@dataclass
class ImageData:
    """A train/test pair of `datasets.Dataset`s plus what is needed to read them."""

    train: datasets.Dataset
    test: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]


def load_image_dataset(
    source: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    test_size: float | int = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> ImageData:
    """Load an image-classification data set as a train/test `ImageData`.

    `source` is one of: a parquet file; a folder of parquet files (split taken from the
    file names: train*, test*, valid*/val*; anything else counts as train); a folder
    written by `save_to_disk`; an imagefolder directory (one subfolder per class, or
    train/ and test/ folders holding those); a Hub id such as "uoft-cs/cifar10" (needs
    network).

    Columns are found from the features when unambiguous (an `Image` column; a
    `ClassLabel` column) and otherwise by conventional names (img/image/pixel_values;
    label/labels/target/digit/class/fine_label); `image_column` / `label_column`
    override. Class names come from the ClassLabel, otherwise they are the sorted unique
    label values (as strings), and the label column is re-encoded to indices into them.

    Splits: `train_split`/`test_split` when given, else "train" and "test" (or
    "validation"); with no test split one is carved off the train split with
    `test_size` (fraction or count) and `seed`. `max_train`/`max_test` keep a random
    subset (drawn with `seed`) of that many rows.
    """
    splits = _load_splits(source)
    train, test = _pick_splits(splits, train_split, test_split, test_size, seed, source)

    image_column = _find_image_column(train, image_column)
    label_column = _find_label_column(train, label_column, image_column)
    for name in (image_column, label_column):
        if name not in test.column_names:
            raise ValueError(f"column {name!r} is in the train split but not in the test "
                             f"split (test columns: {test.column_names})")

    train, test, class_names = _encode_labels(train, test, label_column)
    train = _subset(train, max_train, seed, "max_train")
    test = _subset(test, max_test, seed, "max_test")
    return ImageData(train, test, image_column, label_column, class_names)


def _load_splits(source: str | os.PathLike) -> dict[str, datasets.Dataset]:
    """Read `source` into a {split name: Dataset} dict."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"{text!r} is a file but not a .parquet file; expected a "
                             "parquet file, a folder (parquet files, save_to_disk output "
                             "or imagefolder) or a Hub dataset id")
        return dict(datasets.load_dataset("parquet", data_files={"train": str(path)}))
    if path.is_dir():
        return _load_dir(path)
    if looks_like_path(text):
        raise FileNotFoundError(f"dataset path {text!r} does not exist")
    try:  # a Hub id
        loaded = datasets.load_dataset(text)
    except Exception as err:  # noqa: BLE001 - re-raised with the context a user needs
        raise FileNotFoundError(
            f"{text!r} is not a local path, and loading it as a Hub dataset failed "
            f"({type(err).__name__}: {err})") from err
    return dict(loaded)


def _load_dir(path: Path) -> dict[str, datasets.Dataset]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)

    if any(path.rglob("*.parquet")):  # splits from the file names, by datasets' own rules (pets-test.parquet: test)
        return dict(datasets.load_dataset("parquet", data_dir=str(path)))

    try:
        return dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"{str(path)!r} holds no parquet files and no save_to_disk data set, and "
            f"reading it as an imagefolder (one subfolder of images per class) failed: "
            f"{type(err).__name__}: {err}") from err


def _pick_splits(splits, train_split, test_split, test_size, seed, source):
    available = sorted(splits)
    for flag, name in (("train_split", train_split), ("test_split", test_split)):
        if name is not None and name not in splits:
            raise ValueError(f"{flag}={name!r} is not a split of {os.fspath(source)!r}; "
                             f"available splits: {available}")

    if train_split is None:
        if "train" in splits:
            train_split = "train"
        elif len(splits) == 1:
            train_split = available[0]
        else:
            raise ValueError(f"cannot tell which split is for training among {available}; "
                             "set train_split=")
    if test_split is None:
        test_split = next((s for s in ("test", "validation") if s in splits
                           and s != train_split), None)
    elif test_split == train_split:
        raise ValueError(f"test_split={test_split!r} is also the training split of {os.fspath(source)!r}: the "
                         "accuracy would be measured on training images; name another split")

    train = splits[train_split]
    if test_split is not None:
        return train, splits[test_split]
    if len(train) < 2:
        raise ValueError(f"split {train_split!r} has {len(train)} row(s): too few to carve "
                         "a test split from")
    carved = train.train_test_split(test_size=test_size, seed=seed)
    logger.warning("%s has no test split: %d of its %d %r rows (test_size=%s, seed %d) are held out as the test "
                   "split", os.fspath(source), len(carved["test"]), len(train), train_split, test_size, seed)
    return carved["train"], carved["test"]


def _find_image_column(ds: datasets.Dataset, given: str | None) -> str:
    if given is not None:
        return _check_given(ds, given, "image_column")
    by_feature = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    return _choose(ds, by_feature, IMAGE_COLUMN_NAMES, "image", "image_column",
                   "an Image feature")


def _find_label_column(ds: datasets.Dataset, given: str | None, image_column: str) -> str:
    if given is not None:
        name = _check_given(ds, given, "label_column")
        if name == image_column:
            raise ValueError(f"label_column={given!r} is also the image column")
        return name
    by_feature = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    names = tuple(n for n in LABEL_COLUMN_NAMES if n != image_column)
    return _choose(ds, by_feature, names, "label", "label_column", "a ClassLabel feature")


def _check_given(ds: datasets.Dataset, given: str, flag: str) -> str:
    if given not in ds.column_names:
        raise ValueError(f"{flag}={given!r} is not a column of the data set; "
                         f"columns: {ds.column_names}")
    return given


def _choose(ds, by_feature, conventional, what, flag, feature_desc) -> str:
    """One column from the feature-typed candidates, else from conventional names."""
    if len(by_feature) == 1:
        return by_feature[0]
    if len(by_feature) > 1:
        named = [c for c in by_feature if c.lower() in conventional]
        if len(named) == 1:
            return named[0]
        raise ValueError(f"ambiguous {what} column: candidates {by_feature} all have "
                         f"{feature_desc}; set {flag}= to one of them")
    named = [c for c in ds.column_names if c.lower() in conventional]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ValueError(f"ambiguous {what} column: candidates {named}; set {flag}= to "
                         "one of them")
    raise ValueError(f"no {what} column found: none has {feature_desc} or is named one of "
                     f"{list(conventional)}; columns: {ds.column_names}; set {flag}=")


def _encode_labels(train, test, column):
    """Class names, and both splits' label column as indices into them."""
    feature = train.features[column]
    if len(train.unique(column)) < 2:
        raise ValueError(f"label column {column!r} holds a single value in the train split: nothing to classify "
                         "(is it the right column? set label_column=)")
    if isinstance(feature, datasets.ClassLabel):
        outside = sorted(v for v in set(train.unique(column)) | set(test.unique(column))
                         if not 0 <= v < feature.num_classes)
        if outside:
            raise ValueError(f"label column {column!r} holds values outside its {feature.num_classes} declared "
                             f"classes: {outside[:5]}")
        return train, test, list(feature.names)

    values = set(train.unique(column)) | set(test.unique(column))
    if None in values:
        raise ValueError(f"label column {column!r} has missing (None) values")
    try:
        ordered = sorted(values)
    except TypeError:  # mixed types
        ordered = sorted(values, key=str)
    index = {v: i for i, v in enumerate(ordered)}
    class_label = datasets.ClassLabel(names=[str(v) for v in ordered])

    def encode(ds):
        codes = [index[v] for v in ds[column]]
        return ds.remove_columns(column).add_column(column, codes, feature=class_label)

    return encode(train), encode(test), class_label.names


def _subset(ds: datasets.Dataset, limit: int | None, seed: int, flag: str):
    if limit is None or limit >= len(ds):
        return ds
    if limit < 1:
        raise ValueError(f"{flag} must be >= 1, got {limit}")
    return ds.shuffle(seed=seed).select(range(limit))


# --------------------------------------------------------------------------- decoding


def _size_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _to_mode(img: PILImage.Image, mode: str) -> PILImage.Image:
    """Convert to "RGB" or "L"; transparency is composited onto white, as transformers'
    image processors do, and 16/32-bit grayscale is scaled down to 8 bits."""
    if img.mode == mode:
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range to 8-bit
        img = PILImage.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = PILImage.alpha_composite(background, rgba)
    return img.convert(mode)


def _prepare(img: PILImage.Image, hw: tuple[int, int], mode: str) -> np.ndarray:
    """PIL image -> H x W (x C) uint8 array of the wanted mode and size."""
    img = _to_mode(img, mode)
    if img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), PILImage.Resampling.BILINEAR)
    return np.asarray(img)


def _as_pil(value) -> PILImage.Image:
    """One cell of an image column -> PIL image."""
    if isinstance(value, PILImage.Image):
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # undecoded Image
        if value.get("bytes") is not None:
            return PILImage.open(io.BytesIO(value["bytes"]))
        return PILImage.open(value["path"])
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # C x H x W -> H x W x C
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return PILImage.fromarray(arr)


def to_tensors(
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    image_size: int | tuple[int, int] = 32,
    channels: int = 3,
    *,
    batch_size: int = 1000,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split once: (uint8 N x C x H x W images, int64 N labels).

    Images are converted to RGB (`channels=3`, transparency onto white) or grayscale
    (`channels=1`) and resized with PIL bilinear when their size differs from
    `image_size` (an int or (height, width)). Labels must be integers (ClassLabel
    columns are); `load_image_dataset` encodes other labels. `progress=None` shows a
    tqdm bar for splits of 5,000 rows or more.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    for name in (image_column, label_column):
        if name not in dataset.column_names:
            raise ValueError(f"{name!r} is not a column of the data set; columns: "
                             f"{dataset.column_names}")
    hw = _size_hw(image_size)
    mode = "RGB" if channels == 3 else "L"

    # Read undecoded bytes and decode them here: datasets' own decoding would build the
    # PIL images anyway, and this skips its per-row feature machinery.
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset = dataset.select_columns([image_column, label_column])

    n = len(dataset)
    images = np.empty((n, hw[0], hw[1], channels), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    if progress is None:
        progress = n >= 5000
    from tqdm.auto import tqdm

    with tqdm(total=n, desc="decoding images", unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            batch = dataset[start:start + batch_size]
            for offset, cell in enumerate(batch[image_column]):
                arr = _prepare(_as_pil(cell), hw, mode)
                images[start + offset] = arr if channels == 3 else arr[..., None]
            batch_labels = batch[label_column]
            try:
                labels[start:start + len(batch_labels)] = batch_labels
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"labels in column {label_column!r} are not integers (e.g. "
                    f"{batch_labels[0]!r}); load the data with load_image_dataset, which "
                    "encodes them as class indices") from err
            bar.update(len(batch_labels))

    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


class TensorImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs over tensors decoded by `to_tensors`.

    Items are views into the uint8 tensors, so a DataLoader's default collate batches
    them cheaply; augment and normalise the batch afterwards (`random_crop_flip`,
    `normalize`) on the training device.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


# --------------------------------------------------------------------------- transforms


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
              flip: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Deterministic batch crop + flip.

    Zero-pads `images` (N x C x H x W, any dtype) by `padding` on every side, takes the
    H x W window whose corner is (`top[i]`, `left[i]`) in the padded image i, and mirrors
    it left-right where `flip[i]` is true. `top`/`left` are integer tensors in
    [0, 2 * padding], `flip` a bool tensor, each of length N.
    """
    n, _, height, width = images.shape
    device = images.device
    top, left, flip = top.to(device), left.to(device), flip.to(device=device, dtype=torch.bool)
    padded = torch.nn.functional.pad(images, (padding,) * 4) if padding else images
    rows = top.view(n, 1) + torch.arange(height, device=device)              # N x H
    cols = left.view(n, 1) + torch.arange(width, device=device)              # N x W
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, height, 1), cols.view(n, 1, width)]
    return out.permute(0, 3, 1, 2).contiguous()                              # N x C x H x W


def random_crop_flip(images_uint8: torch.Tensor, padding: int = 4,
                     generator: torch.Generator | None = None, *,
                     flip: bool = True) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad by `padding`, random crop back
    to the original size, random horizontal flip (probability 1/2; off with
    `flip=False`). Works on the batch's device; random numbers come from `generator`
    (on its own device) when given. A single C x H x W image is accepted too."""
    if images_uint8.ndim == 3:
        return random_crop_flip(images_uint8[None], padding, generator, flip=flip)[0]
    if images_uint8.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(images_uint8.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n = images_uint8.shape[0]
    rng_device = generator.device if generator is not None else images_uint8.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=rng_device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=rng_device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=rng_device)
    return crop_flip(images_uint8, offsets[0], offsets[1], flips, padding)


def image_processor(mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD, size: int = 32):
    """The transformers image processor doing what this package's evaluation does (resize to size x size,
    scale to [0, 1], normalise with mean/std): saved beside every checkpoint, it lets
    ``pipeline("image-classification", model=DIR)`` run the model on images as trained."""
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor  # PIL: no torchvision
    return cls(do_resize=True, size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(mean), image_std=list(std))


def normalize(images_uint8: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """uint8 images (... x C x H x W) -> float32 (x / 255 - mean) / std per channel."""
    channels = images_uint8.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"images have {channels} channels but mean has {len(mean)} and "
                         f"std {len(std)} values")
    device = images_uint8.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - mean_t) / std_t


def preprocess_pil(image, image_size: int | tuple[int, int] = 32,
                   mean: Sequence[float] = CIFAR10_MEAN,
                   std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """One image -> normalised float32 tensor 1 x 3 x H x W, ready for a model.

    Accepts a PIL image (any mode: RGBA/LA/P transparency goes onto white, grayscale is
    replicated to RGB) or a path/bytes of an image file; resizes to `image_size` with
    PIL bilinear, as `to_tensors` does. Raises ValueError for anything that is not an
    image.
    """
    if isinstance(image, (str, os.PathLike, bytes, bytearray)):
        try:
            source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
            image = PILImage.open(source)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"could not read an image from the given "
                             f"{type(image).__name__}: {err}") from err
    if not isinstance(image, PILImage.Image):
        raise ValueError(f"expected a PIL image (or an image file path/bytes), got "
                         f"{type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has no pixels (size {image.size})")
    arr = _prepare(image, _size_hw(image_size), "RGB")
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)
    return normalize(tensor, mean, std)


# --------------------------------------------------------------------------- sample


def make_cifar_sample(src_dir: str | os.PathLike, dst_path: str | os.PathLike,
                      n_train: int = 4000, n_test: int = 1000) -> list[Path]:
    """Write the first `n_train` / `n_test` rows of `src_dir`/{train,test}.parquet
    (rows there are already shuffled) to `dst_path`/{train,test}.parquet, keeping the
    schema (Image + ClassLabel features). Returns the written paths.

    The shipped sample was made with
    ``make_cifar_sample("path/to/cifar10", DEFAULT_DATASET)``.
    """
    src, dst = Path(src_dir), Path(dst_path)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for split, count in (("train", n_train), ("test", n_test)):
        file = src / f"{split}.parquet"
        if not file.is_file():
            raise FileNotFoundError(f"{str(file)!r} does not exist")
        ds = datasets.load_dataset("parquet", data_files={split: str(file)}, split=split)
        if count > len(ds):
            raise ValueError(f"asked for {count} {split} rows but {file} has {len(ds)}")
        out = dst / f"{split}.parquet"
        ds.select(range(count)).to_parquet(str(out))
        written.append(out)
    return written
