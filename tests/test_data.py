"""Data layer: column detection, checks, decode-once tensors and the batched on-device transforms."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet_hf.cli import DataError
from capsnet_hf.data.batching import (
    BatchTransform,
    EpochOrder,
    epoch_permutation,
    make_generator,
    standardize_per_image,
    translate_crop,
)
from capsnet_hf.data.loading import ImageTensorDataset, decode_images, detect_column
from capsnet_hf.data.splits import load_splits
from capsnet_hf.image_processing_capsnet import CapsNetImageProcessor


def write_dataset(folder, splits, size=(16, 16), mode="L", columns=("image", "label"), labels=None, class_names=None):
    """A tiny image-classification data set as `{split}.parquet` files that `datasets.load_dataset(folder)` reads.
    `splits` maps split names to example counts; images are random, labels cycle over 4 classes unless given."""
    import datasets

    rng = np.random.default_rng(0)
    image_column, label_column = columns
    for split, count in splits.items():
        sizes = size[:count] if isinstance(size, list) else [size] * count
        shape = (3,) if mode == "RGB" else ()
        images = [Image.fromarray(rng.integers(0, 256, (h, w, *shape), dtype=np.uint8)) for h, w in sizes]
        split_labels = labels[split] if labels is not None else [index % 4 for index in range(count)]
        label_feature = datasets.ClassLabel(names=class_names) if class_names else datasets.Value("int64")
        features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
        data = datasets.Dataset.from_dict({image_column: images, label_column: split_labels}, features=features)
        data.to_parquet(str(folder / f"{split}.parquet"))
    return str(folder)


def test_detect_column():
    assert detect_column(["img", "label"], ("image", "img"), None, "image") == "img"
    assert detect_column(["image", "img"], ("image", "img"), "img", "image") == "img"
    with pytest.raises(DataError, match="no image column"):
        detect_column(["pixels", "label"], ("image", "img"), None, "image")
    with pytest.raises(DataError, match="ambiguous label column"):
        detect_column(["image", "label", "labels"], ("label", "labels"), None, "label")
    with pytest.raises(DataError, match="'photo' not found"):
        detect_column(["image", "label"], ("image", "img"), "photo", "image")


def test_load_splits_reads_class_names_and_geometry(tmp_path):
    folder = write_dataset(tmp_path, {"train": 8, "test": 5}, size=(12, 10), mode="RGB", class_names=list("abcd"))
    splits = load_splits(folder, "train", "auto")
    assert splits.eval_split == "test"
    assert splits.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert splits.train.images.shape == (8, 3, 12, 10) and splits.train.images.dtype == torch.uint8
    assert splits.eval.labels.tolist() == [0, 1, 2, 3, 0]
    subset = load_splits(folder, "train", "test", max_train_samples=3, seed=1)
    assert len(subset.train) == 3 and len(subset.eval) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dataset="missing"), "cannot load dataset"),
        (dict(eval_split="validation"), "no split 'validation'"),
        (dict(columns=("picture", "label")), "no image column"),
        (dict(labels={"train": [0, 1, 2, 3], "test": [0, 9]}), r"must lie in \[0, 4\)"),
        (dict(labels={"train": [0, 1, -1, 3], "test": [0, 1]}), r"got values in \[-1, 3\]"),
        (dict(size=[(16, 16), (16, 16), (20, 16), (16, 16)]), "mixed sizes"),
    ],
)
def test_load_splits_rejects_bad_input(tmp_path, kwargs, message):
    columns = kwargs.get("columns", ("image", "label"))
    labels = kwargs.get("labels")
    size = kwargs.get("size", (16, 16))
    counts = {"train": 4, "test": 2} if labels is None else {name: len(values) for name, values in labels.items()}
    folder = write_dataset(tmp_path, counts, size=size, columns=columns, labels=labels)
    if kwargs.get("dataset") == "missing":
        folder = str(tmp_path / "no_such_dataset")
    with pytest.raises(DataError, match=message):
        load_splits(folder, "train", kwargs.get("eval_split", "test"))


def test_mixed_sizes_are_resized_to_a_target(tmp_path):
    folder = write_dataset(tmp_path, {"train": 4, "test": 2}, size=[(16, 16), (20, 18), (16, 16), (9, 9)])
    splits = load_splits(folder, "train", None, image_size=[16, 16])
    assert splits.train.images.shape == (4, 1, 16, 16)


def test_decode_images_converts_channels():
    gray = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    rgb = gray.convert("RGB")
    assert decode_images([gray, rgb]).shape == (2, 3, 4, 4)  # any colour image -> 3 channels
    decoded = decode_images([rgb], num_channels=1)
    assert torch.equal(decoded[0, 0], torch.arange(16, dtype=torch.uint8).view(4, 4))


def test_translate_crop_shifts_with_zero_padding():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    out = translate_crop(images, torch.tensor([-1, 1]), torch.tensor([0, -2]), 4, 4)
    # Image 0 moved down by one row: first row zero, then rows 0..2.
    assert torch.equal(out[0, 0, 0], torch.zeros(4)) and torch.equal(out[0, 0, 1:], images[0, 0, :3])
    # Image 1 moved up by one row and right by two columns.
    assert torch.equal(out[1, 0, :3, 2:], images[1, 0, 1:, :2]) and out[1, 0, :, :2].abs().sum() == 0
    assert out[1, 0, 3].abs().sum() == 0


def test_random_shift_stays_within_max_shift_and_is_seeded():
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, :, 13, 13] = 255
    transform = BatchTransform((28, 28), max_shift=2)
    first = transform(images, make_generator(torch.device("cpu"), 0, 5))
    again = transform(images, make_generator(torch.device("cpu"), 0, 5))
    assert torch.equal(first, again)
    assert first.dtype == torch.float32 and first.max() == 1.0
    positions = first[:, 0].flatten(1).argmax(1)
    rows, cols = positions // 28, positions % 28
    assert rows.min() >= 11 and rows.max() <= 15 and cols.min() >= 11 and cols.max() <= 15
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # several of the 25 shifts are drawn
    assert torch.equal(transform(images), images.float() / 255)  # evaluation: no shift


def test_eval_transform_matches_the_image_processor():
    """Centre crop 32 -> 24 and per-image standardization on 0..255: same numbers as CapsNetImageProcessor."""
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    arrays[2] = 7  # a flat image: the 1/sqrt(N) floor of the standardization
    processor = CapsNetImageProcessor(
        size=24, num_channels=3, resize_mode="crop_or_pad", do_rescale=False, do_standardize=True
    )
    expected = processor([Image.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    transform = BatchTransform.from_image_processor(processor)
    actual = transform(torch.from_numpy(arrays).permute(0, 3, 1, 2))
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    mnist = BatchTransform.from_image_processor(CapsNetImageProcessor())
    gray = torch.from_numpy(arrays[:, :28, :28, :1]).permute(0, 3, 1, 2).contiguous()
    processed = CapsNetImageProcessor()([Image.fromarray(a[:28, :28, 0]) for a in arrays], return_tensors="pt")
    torch.testing.assert_close(mnist(gray), processed["pixel_values"], atol=1e-6, rtol=1e-6)


def test_cifar_training_transform_shapes_and_statistics():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    transform = BatchTransform(
        (24, 24),
        do_standardize=True,
        random_crop=True,
        random_flip=True,
        max_brightness_delta=63.0,
        contrast_range=(0.2, 1.8),
    )
    out = transform(images, make_generator(torch.device("cpu"), 1))
    assert out.shape == (16, 3, 24, 24)
    torch.testing.assert_close(out.flatten(1).mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.flatten(1).std(1, correction=0), torch.ones(16), atol=1e-3, rtol=0)


def test_standardize_floor_on_flat_images():
    flat = torch.full((1, 1, 4, 4), 9.0)
    assert torch.equal(standardize_per_image(flat), torch.zeros(1, 1, 4, 4))


def test_image_tensor_dataset_and_permutation():
    data = ImageTensorDataset(torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1), torch.arange(5))
    batch = data.batch(torch.tensor([4, 0]))
    assert batch["pixel_values"].view(-1).tolist() == [4, 0] and batch["labels"].tolist() == [4, 0]
    assert torch.equal(epoch_permutation(100, 3, 1), epoch_permutation(100, 3, 1))
    assert not torch.equal(epoch_permutation(100, 3, 1), epoch_permutation(100, 3, 2))


def test_epoch_order_slices_each_epochs_permutation_drawn_once():
    order = EpochOrder(100, seed=3, device="cpu")
    first = order.indices(1, 10, 8)
    assert torch.equal(first, epoch_permutation(100, 3, 1)[10:18]) and first.dtype == torch.int64
    # Same epoch: a view of the same device tensor, not a new permutation.
    assert order.indices(1, 0, 4).untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert torch.equal(order.indices(2, 96, 8), epoch_permutation(100, 3, 2)[96:])


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_image_names_the_dataset_split_and_row(tmp_path, damage):
    import datasets

    from capsnet_hf.data.splits import load_splits

    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(buffer, format="PNG")
    good = buffer.getvalue()
    bad = good[: len(good) // 2] if damage == "truncated" else b"not an image at all"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": good, "path": None}] * 3 + [{"bytes": bad, "path": None}], "label": [0, 1, 0, 1]}
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "test"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    with pytest.raises(DataError, match=r"cannot decode the image in row 3 of split 'train' of '.*data'"):
        load_splits(str(folder), "train", "test")
