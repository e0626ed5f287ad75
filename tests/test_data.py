"""Tests for pege_hf.data: loading, decoding, batch transforms, the shipped sample."""

from __future__ import annotations

import io
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pege_hf.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DEFAULT_DATASET,
    TensorImageDataset,
    crop_flip,
    load_image_dataset,
    make_cifar_sample,
    normalize,
    preprocess_pil,
    random_crop_flip,
    to_tensors,
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- helpers


def _gray_digits(n=20, size=28, seed=0):
    """Synthetic MNIST-like data: L-mode PIL images in `image`, int labels in `digit`."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
    images = [Image.fromarray(a, "L") for a in arrays]
    digits = [i % 10 for i in range(n)]
    return arrays, images, digits


def _rgb_image(value=(10, 20, 30), size=(32, 32)):
    return Image.new("RGB", size, value)


def _save(ds, tmp_path, name="ds"):
    path = tmp_path / name
    ds.save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- loading


def test_shipped_sample_loads():
    data = load_image_dataset(DEFAULT_DATASET)
    assert len(data.train) == 4000 and len(data.test) == 1000
    assert data.class_names == CIFAR10_NAMES
    assert (data.image_column, data.label_column) == ("img", "label")
    images, labels = to_tensors(data.test, data.image_column, data.label_column)
    assert images.shape == (1000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert sorted(labels.unique().tolist()) == list(range(10))
    # the fast byte-level decode agrees with datasets' own decoding
    for i in (0, 1, 999):
        expected = np.asarray(data.test[i]["img"].convert("RGB"))
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), expected)
        assert labels[i].item() == data.test[i]["label"]


def test_shipped_sample_size_on_disk():
    files = sorted(os.listdir(DEFAULT_DATASET))
    assert files == ["test.parquet", "train.parquet"]
    total = sum(os.path.getsize(os.path.join(DEFAULT_DATASET, f)) for f in files)
    assert total < 5.5e6


def test_autodetect_gray_digits_to_rgb32(tmp_path):
    arrays, images, digits = _gray_digits()
    ds = datasets.Dataset.from_dict({"image": images, "digit": digits})
    data = load_image_dataset(_save(ds, tmp_path), test_size=0.25, seed=1)
    assert (data.image_column, data.label_column) == ("image", "digit")
    assert data.class_names == [str(d) for d in range(10)]
    assert len(data.train) == 15 and len(data.test) == 5

    x, y = to_tensors(data.train, data.image_column, data.label_column, image_size=32)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8
    # grayscale replicated to three channels, resized with PIL bilinear
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    row = data.train[0]
    reference = np.asarray(row["image"].resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(x[0, 0].numpy(), reference)
    assert y[0].item() == row["digit"]


def test_carved_split_is_seeded_and_disjoint(tmp_path):
    _, images, digits = _gray_digits(n=40)
    ids = list(range(40))
    ds = datasets.Dataset.from_dict({"image": images, "digit": digits, "id": ids})
    path = _save(ds, tmp_path)
    a = load_image_dataset(path, test_size=0.2, seed=3)
    b = load_image_dataset(path, test_size=0.2, seed=3)
    c = load_image_dataset(path, test_size=0.2, seed=4)
    assert a.test["id"] == b.test["id"]
    assert a.test["id"] != c.test["id"]
    assert len(a.test) == 8
    assert set(a.train["id"]).isdisjoint(a.test["id"])
    assert set(a.train["id"]) | set(a.test["id"]) == set(ids)


def test_parquet_folder_with_validation_split_and_max_rows(tmp_path):
    _, images, digits = _gray_digits(n=30)
    ds = datasets.Dataset.from_dict({"img": images, "label": digits})
    folder = tmp_path / "pq"
    folder.mkdir()
    ds.select(range(20)).to_parquet(str(folder / "train-00000.parquet"))
    ds.select(range(20, 30)).to_parquet(str(folder / "validation-00000.parquet"))
    data = load_image_dataset(folder, max_train=7)
    assert len(data.train) == 7 and len(data.test) == 10
    assert data.test["label"] == [digits[i] for i in range(20, 30)]


def test_string_labels_encoded_consistently_across_splits(tmp_path):
    img = _rgb_image()
    train = datasets.Dataset.from_dict({"image": [img] * 4, "label": ["dog", "cat", "dog", "ant"]})
    test = datasets.Dataset.from_dict({"image": [img] * 2, "label": ["emu", "cat"]})
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    data = load_image_dataset(path)
    assert data.class_names == ["ant", "cat", "dog", "emu"]
    _, y_train = to_tensors(data.train, data.image_column, data.label_column)
    _, y_test = to_tensors(data.test, data.image_column, data.label_column)
    assert y_train.tolist() == [2, 1, 2, 0]
    assert y_test.tolist() == [3, 1]


def test_imagefolder(tmp_path):
    root = tmp_path / "folder"
    for name, value in (("cat", 50), ("dog", 200)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (value, i, 0)).save(root / name / f"{i}.png")
    data = load_image_dataset(root, test_size=2, seed=0)
    assert data.class_names == ["cat", "dog"]
    assert len(data.train) == 6 and len(data.test) == 2
    x, y = to_tensors(data.train, data.image_column, data.label_column)
    assert x.shape == (6, 3, 32, 32)
    assert all(x[i, 0, 0, 0].item() == (50, 200)[y[i].item()] for i in range(6))


def test_missing_path(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*does not exist"):
        load_image_dataset(missing)


def test_no_label_column(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [_rgb_image()] * 3, "caption": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"no label column.*'caption'.*label_column="):
        load_image_dataset(_save(ds, tmp_path))


def test_no_image_column(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"no image column.*'text'.*image_column="):
        load_image_dataset(_save(ds, tmp_path))


def test_ambiguous_image_column(tmp_path):
    img = _rgb_image()
    ds = datasets.Dataset.from_dict({"photo": [img] * 3, "mask": [img] * 3, "label": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"ambiguous image.*'photo'.*'mask'.*image_column="):
        load_image_dataset(_save(ds, tmp_path))
    data = load_image_dataset(tmp_path / "ds", image_column="mask")
    assert data.image_column == "mask"


def test_ambiguous_label_column(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"image": [_rgb_image()] * 4, "label": [0, 1, 0, 1], "target": [1, 1, 0, 0]})
    with pytest.raises(ValueError, match=r"ambiguous label.*'label'.*'target'.*label_column="):
        load_image_dataset(_save(ds, tmp_path))
    assert load_image_dataset(tmp_path / "ds", label_column="target").label_column == "target"


def test_two_classlabels_resolved_by_name(tmp_path):
    # CIFAR-100's layout: fine_label and coarse_label are both ClassLabel columns
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(names=["a", "b"]),
                                  "coarse_label": datasets.ClassLabel(names=["x", "y"])})
    ds = datasets.Dataset.from_dict(
        {"img": [_rgb_image()] * 4, "fine_label": [0, 1, 0, 1], "coarse_label": [1, 1, 0, 0]},
        features=features)
    data = load_image_dataset(_save(ds, tmp_path))
    assert data.label_column == "fine_label" and data.class_names == ["a", "b"]


def test_wrong_column_names(tmp_path):
    _, images, digits = _gray_digits(n=6)
    path = _save(datasets.Dataset.from_dict({"image": images, "digit": digits}), tmp_path)
    with pytest.raises(ValueError, match=r"label_column='nope'.*\['image', 'digit'\]"):
        load_image_dataset(path, label_column="nope")
    with pytest.raises(ValueError, match=r"image_column='picture'.*\['image', 'digit'\]"):
        load_image_dataset(path, image_column="picture")


def test_wrong_split_name(tmp_path):
    with pytest.raises(ValueError, match=r"test_split='dev'.*\['test', 'train'\]"):
        load_image_dataset(DEFAULT_DATASET, test_split="dev")


# ----------------------------------------------------------------------------- decoding


def test_to_tensors_rgba_and_resize():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))                # fully transparent
    opaque = Image.new("RGBA", (32, 32), (1, 2, 3, 255))
    ds = datasets.Dataset.from_dict({"img": [rgba, opaque], "label": [0, 1]})
    x, y = to_tensors(ds, "img", "label", image_size=(24, 16))
    assert x.shape == (2, 3, 24, 16)
    assert (x[0] == 255).all()                                        # onto white
    assert x[1, :, 0, 0].tolist() == [1, 2, 3]
    assert y.tolist() == [0, 1]


def test_to_tensors_rejects_string_labels():
    ds = datasets.Dataset.from_dict({"img": [_rgb_image()] * 2, "label": ["cat", "dog"]})
    with pytest.raises(ValueError, match="'label'.*not integers"):
        to_tensors(ds, "img", "label")


def test_tensor_image_dataset_batches():
    images = torch.arange(5 * 3 * 4 * 4, dtype=torch.int64).reshape(5, 3, 4, 4).to(torch.uint8)
    labels = torch.arange(5)
    loader = torch.utils.data.DataLoader(TensorImageDataset(images, labels), batch_size=2)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), images)
    assert batches[0][0].dtype == torch.uint8
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        TensorImageDataset(images, labels[:4])


# ----------------------------------------------------------------------------- transforms


def _reference_crop_flip(image, top, left, flip, padding):
    """Per-image numpy reference: zero pad, slice the window, mirror."""
    c, h, w = image.shape
    padded = np.zeros((c, h + 2 * padding, w + 2 * padding), dtype=image.dtype)
    padded[:, padding:padding + h, padding:padding + w] = image
    window = padded[:, top:top + h, left:left + w]
    return window[:, :, ::-1] if flip else window


def _random_batch(n=16, seed=0, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_crop_flip_matches_reference():
    images = _random_batch(n=12, h=8, w=10)
    g = torch.Generator().manual_seed(1)
    top = torch.randint(0, 5, (12,), generator=g)
    left = torch.randint(0, 5, (12,), generator=g)
    flip = torch.randint(0, 2, (12,), generator=g).bool()
    out = crop_flip(images, top, left, flip, padding=2)
    for i in range(12):
        expected = _reference_crop_flip(images[i].numpy(), int(top[i]), int(left[i]),
                                        bool(flip[i]), 2)
        assert np.array_equal(out[i].numpy(), expected), i


def test_random_crop_flip_shape_dtype_and_reproducible():
    images = _random_batch()
    a = random_crop_flip(images, generator=torch.Generator().manual_seed(5))
    b = random_crop_flip(images, generator=torch.Generator().manual_seed(5))
    c = random_crop_flip(images, generator=torch.Generator().manual_seed(6))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random_crop_flip(images[0]).shape == images[0].shape


def test_random_crop_flip_identity_without_padding_and_flip():
    images = _random_batch()
    assert torch.equal(random_crop_flip(images, padding=0, flip=False), images)


def test_random_crop_flip_padding0_flips_some_exactly():
    images = _random_batch(n=64)
    out = random_crop_flip(images, padding=0, generator=torch.Generator().manual_seed(0))
    flipped = torch.flip(images, dims=[3])
    is_same = (out == images).flatten(1).all(1)
    is_flipped = (out == flipped).flatten(1).all(1)
    assert (is_same | is_flipped).all()
    assert is_flipped.any() and is_same.any()


def test_random_crop_flip_outputs_are_windows_of_padded_input():
    padding = 4
    images = _random_batch(n=96)
    out = random_crop_flip(images, padding, generator=torch.Generator().manual_seed(2))
    chosen = []
    for i in range(len(images)):
        src, got = images[i].numpy(), out[i].numpy()
        matches = [(t, l, f) for t in range(2 * padding + 1) for l in range(2 * padding + 1)
                   for f in (False, True)
                   if np.array_equal(got, _reference_crop_flip(src, t, l, f, padding))]
        assert matches, f"output {i} is no crop/flip of its input"
        chosen.append(matches[0])
    tops, lefts, flips = zip(*chosen)
    assert set(tops) == set(lefts) == set(range(2 * padding + 1))      # every offset occurs
    assert len(set(zip(tops, lefts))) > 30
    assert set(flips) == {False, True}


def test_normalize_matches_float64():
    images = _random_batch(n=4)
    got = normalize(images, CIFAR10_MEAN, CIFAR10_STD)
    assert got.dtype == torch.float32 and got.shape == images.shape
    x = images.numpy().astype(np.float64) / 255.0
    mean = np.array(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(got.numpy(), (x - mean) / std, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 channels"):
        normalize(images, (0.5,), (0.5,))


# ----------------------------------------------------------------------------- preprocess_pil


def _normalized_pixel(rgb):
    return [(v / 255.0 - m) / s for v, m, s in zip(rgb, CIFAR10_MEAN, CIFAR10_STD)]


def test_preprocess_pil_rgba():
    opaque = preprocess_pil(Image.new("RGBA", (64, 48), (10, 20, 30, 255)))
    assert opaque.shape == (1, 3, 32, 32) and opaque.dtype == torch.float32
    np.testing.assert_allclose(opaque[0, :, 5, 7].numpy(), _normalized_pixel((10, 20, 30)),
                               atol=1e-6)
    assert torch.equal(opaque, preprocess_pil(Image.new("RGB", (64, 48), (10, 20, 30))))
    clear = preprocess_pil(Image.new("RGBA", (32, 32), (10, 20, 30, 0)))
    np.testing.assert_allclose(clear[0, :, 0, 0].numpy(), _normalized_pixel((255, 255, 255)),
                               atol=1e-6)


def test_preprocess_pil_grayscale_and_size():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20), np.uint8), "L")
    out = preprocess_pil(gray, image_size=20, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 20, 20)
    expected = np.asarray(gray, dtype=np.float32) / 255.0
    for c in range(3):
        np.testing.assert_allclose(out[0, c].numpy(), expected, atol=1e-7)


def test_preprocess_pil_from_bytes():
    buf = io.BytesIO()
    _rgb_image((40, 50, 60)).save(buf, format="PNG")
    out = preprocess_pil(buf.getvalue())
    np.testing.assert_allclose(out[0, :, 3, 3].numpy(), _normalized_pixel((40, 50, 60)),
                               atol=1e-6)


@pytest.mark.parametrize("bad", [None, "not an image", b"\x00\x01 no image here",
                                 np.zeros(3), 42])
def test_preprocess_pil_rejects_non_images(bad):
    with pytest.raises(ValueError, match="image"):
        preprocess_pil(bad)


# ----------------------------------------------------------------------------- sample maker


def test_make_cifar_sample_keeps_schema_and_first_rows(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CIFAR10_NAMES)})
    for split, n in (("train", 12), ("test", 6)):
        ds = datasets.Dataset.from_dict(
            {"img": [_rgb_image((i, 0, 0)) for i in range(n)], "label": [i % 10 for i in range(n)]},
            features=features)
        ds.to_parquet(str(src / f"{split}.parquet"))
    dst = tmp_path / "sample"
    make_cifar_sample(src, dst, n_train=5, n_test=3)
    data = load_image_dataset(dst)
    assert len(data.train) == 5 and len(data.test) == 3
    assert data.class_names == CIFAR10_NAMES
    x, y = to_tensors(data.train, "img", "label")
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="asked for 99 test rows"):
        make_cifar_sample(src, tmp_path / "too_many", n_train=5, n_test=99)


# --------------------------------------------------------------------------- splits the way datasets names them


def _labelled_parquet(path, n, labels, names=("a", "b")):
    from PIL import Image as PILImage

    datasets.Dataset.from_dict(
        {"image": [PILImage.new("RGB", (8, 8), (i, 0, 0)) for i in range(n)], "label": [labels(i) for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}),
    ).to_parquet(str(path))


def test_split_files_named_as_datasets_names_them_load_as_those_splits(tmp_path, caplog):
    _labelled_parquet(tmp_path / "pets-train.parquet", 20, lambda i: i % 2)
    _labelled_parquet(tmp_path / "pets-test.parquet", 6, lambda i: i % 2)
    with caplog.at_level("WARNING"):
        data = load_image_dataset(tmp_path)
    assert (len(data.train), len(data.test)) == (20, 6)  # the held-out file is the test split, never trained on
    assert not [r for r in caplog.records if "held out" in r.getMessage()]


def test_carving_a_test_split_is_said(tmp_path, caplog):
    _labelled_parquet(tmp_path / "only.parquet", 20, lambda i: i % 2)
    with caplog.at_level("WARNING"):
        data = load_image_dataset(tmp_path / "only.parquet")
    assert (len(data.train), len(data.test)) == (18, 2)
    assert any("no test split: 2 of its 20 'train' rows" in r.getMessage() for r in caplog.records)


def test_a_label_column_with_one_value_or_undeclared_labels_is_refused(tmp_path):
    _labelled_parquet(tmp_path / "one-train.parquet", 10, lambda i: 1)
    with pytest.raises(ValueError, match="label column 'label' holds a single value in the train split"):
        load_image_dataset(tmp_path / "one-train.parquet")
    _labelled_parquet(tmp_path / "neg-train.parquet", 10, lambda i: -1 if i == 3 else i % 2)
    with pytest.raises(ValueError, match=r"label column 'label' holds values outside its 2 declared classes: \[-1\]"):
        load_image_dataset(tmp_path / "neg-train.parquet")
