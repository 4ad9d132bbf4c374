"""Data for CapsNet training and evaluation: `datasets` loading, checks, decode-once tensors, on-device augmentation.

A *batch* is a dict of tensors: `pixel_values` `[B, C, H, W]` (uint8 on 0..255, or float on 0..1), `labels` `[B]`
int64 or multi-hot `[B, J]` float, and optionally `reconstruction_targets` (MultiMNIST: `[B, 2, 1, H, W]`).
An *in-memory dataset* is any object with `__len__` and `batch(indices) -> dict` (indices a 1-D int64 tensor):
[`ImageTensorDataset`] here, or the generators of `capsnet_hf.paper_datasets` (`MultiMNIST`, `ExpandedMNIST`).

Images are decoded once into a uint8 tensor, which lives on the training device; [`BatchTransform`] then crops,
shifts, flips, changes brightness/contrast and rescales/standardizes a whole batch on that device, so MNIST-sized data
sets are never limited by per-image Python decoding.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
RESIZE_MODES = ("resize", "crop_or_pad")


class UsageError(ValueError):
    """Bad input to `capsnet-train`/`capsnet-eval`, raised before any training or evaluation starts."""


class DataError(UsageError):
    """Bad data-set input (unknown data set/split, columns, labels, image sizes)."""


# ---------------------------------------------------------------------------------------------------------------------
# Loading and checks
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset_dict(dataset_name: str, dataset_config_name: str | None = None, **kwargs: Any):
    """`datasets.load_dataset(dataset_name)` as a `DatasetDict`, with a clear `DataError` when it cannot be found."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, **kwargs)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
        raise DataError(
            f"cannot load dataset {dataset_name!r}: not a Hub dataset id reachable from here nor a local folder/file "
            f"that datasets.load_dataset understands ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def get_split(dataset_dict, split: str, dataset_name: str = "dataset"):
    """One split of a `DatasetDict`, or a `DataError` listing the splits there are."""
    if split not in dataset_dict:
        raise DataError(f"{dataset_name!r} has no split {split!r} (splits: {sorted(dataset_dict)})")
    return dataset_dict[split]


def detect_column(column_names: Sequence[str], candidates: Sequence[str], given: str | None, what: str) -> str:
    """The column holding the `what` (image/label): `given` if set (must exist), else the one of `candidates` present."""
    if given is not None:
        if given not in column_names:
            raise DataError(f"{what} column {given!r} not found (columns: {list(column_names)})")
        return given
    found = [name for name in candidates if name in column_names]
    flag = f"--{what}_column_name"
    if not found:
        raise DataError(
            f"no {what} column: expected one of {list(candidates)} among the columns {list(column_names)}; "
            f"name it with {flag}"
        )
    if len(found) > 1:
        raise DataError(f"ambiguous {what} column: {found} are all present; choose one with {flag}")
    return found[0]


def class_names(dataset, label_column: str) -> list[str] | None:
    """Class names of a `ClassLabel` label column, or None."""
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    return list(names) if names else None


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise `DataError` unless every label lies in [0, num_classes)."""
    if labels.numel() == 0:
        raise DataError(f"{where} has no examples")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"labels of {where} must lie in [0, {num_classes}) ({num_classes} classes), got values in [{low}, {high}]"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Decode once
# ---------------------------------------------------------------------------------------------------------------------


def _open_image(value: Any) -> Image.Image:
    """A stored `datasets.Image` value ({"bytes", "path"} undecoded, or a decoded PIL image) -> PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise DataError(f"cannot read an image from a value of type {type(value).__name__}")


def _crop_or_pad(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop / zero pad `[H, W, C]` (TensorFlow's `resize_image_with_crop_or_pad`)."""
    for axis, target in ((0, height), (1, width)):
        current = pixels.shape[axis]
        if current > target:
            start = (current - target) // 2
            pixels = np.take(pixels, np.arange(start, start + target), axis=axis)
        elif current < target:
            pad = [(0, 0)] * 3
            pad[axis] = ((target - current) // 2, target - current - (target - current) // 2)
            pixels = np.pad(pixels, pad)
    return pixels


def decode_images(
    values: Sequence[Any],
    num_channels: int | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: str = "resize",
    where: str = "dataset",
) -> torch.Tensor:
    """Decode images once into uint8 `[N, C, H, W]`.

    `num_channels` None picks 3 if any image has colour, else 1. Images of a size other than `image_size`
    (height, width) are resized (PIL bilinear) or centre-cropped/padded, per `resize_mode`; without `image_size`,
    images of mixed sizes raise `DataError`.
    """
    images = [_open_image(value) for value in values]
    if not images:
        raise DataError(f"{where} has no images")
    if num_channels is None:
        num_channels = 3 if any(image.mode not in ("1", "L", "LA", "I", "I;16", "F") for image in images) else 1
    sizes = sorted({(image.height, image.width) for image in images})
    if image_size is None and len(sizes) > 1:
        raise DataError(
            f"{where} holds images of mixed sizes {sizes[:5]}{' ...' if len(sizes) > 5 else ''} (height, width): "
            "give a resize target with --image_size"
        )
    height, width = tuple(image_size) if image_size is not None else sizes[0]
    mode = "L" if num_channels == 1 else "RGB"
    output = np.empty((len(images), height, width, num_channels), dtype=np.uint8)
    for index, image in enumerate(images):
        if image.mode != mode:
            image = image.convert(mode)
        if (image.height, image.width) != (height, width) and resize_mode == "resize":
            image = image.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width, num_channels)
        if pixels.shape[:2] != (height, width):
            pixels = _crop_or_pad(pixels, height, width)
        output[index] = pixels
    return torch.from_numpy(output).permute(0, 3, 1, 2).contiguous()


@dataclass
class ImageTensorDataset:
    """Decoded images uint8 `[N, C, H, W]` and class labels int64 `[N]`, on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    id2label: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: str | torch.device) -> ImageTensorDataset:
        return ImageTensorDataset(self.images.to(device), self.labels.to(device), self.id2label)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """`{"pixel_values": uint8 [B, C, H, W], "labels": int64 [B]}` on the dataset's device."""
        indices = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return {"pixel_values": self.images[indices], "labels": self.labels[indices]}


def dataset_to_tensors(
    dataset,
    image_column: str,
    label_column: str,
    num_classes: int,
    num_channels: int | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: str = "resize",
    id2label: dict[int, str] | None = None,
    where: str = "dataset",
) -> ImageTensorDataset:
    """Decode a `datasets.Dataset` split once into an [`ImageTensorDataset`] (on CPU), checking its labels."""
    import datasets

    labels = dataset[label_column]
    if labels and not isinstance(labels[0], (int, np.integer)):
        raise DataError(
            f"label column {label_column!r} of {where} must hold class indices (int), got {type(labels[0]).__name__}"
        )
    labels = torch.as_tensor(labels, dtype=torch.int64)
    check_labels(labels, num_classes, where)
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    images = decode_images(dataset[image_column], num_channels, image_size, resize_mode, where)
    return ImageTensorDataset(images, labels, dict(id2label or {}))


# ---------------------------------------------------------------------------------------------------------------------
# Batched on-device transforms
# ---------------------------------------------------------------------------------------------------------------------


def translate_crop(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Per-image window `[B, C, height, width]` of `images` `[B, C, H, W]` starting at (top, left) `[B]` (may be
    negative or run past the border: those pixels are 0). A random shift by (dy, dx) is the window at (-dy, -dx)."""
    batch, channels, source_height, source_width = images.shape
    device = images.device
    rows = top[:, None] + torch.arange(height, device=device)  # [B, height]
    cols = left[:, None] + torch.arange(width, device=device)  # [B, width]
    valid = ((rows >= 0) & (rows < source_height))[:, :, None] & ((cols >= 0) & (cols < source_width))[:, None, :]
    window = images[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows.clamp(0, source_height - 1)[:, None, :, None],
        cols.clamp(0, source_width - 1)[:, None, None, :],
    ]
    return window * valid[:, None].to(window.dtype)


def standardize_per_image(pixels: torch.Tensor) -> torch.Tensor:
    """TensorFlow's `per_image_standardization` of `[B, C, H, W]` on the 0..255 scale: `(x - mean) /
    max(std, 1/sqrt(N))`, mean and population std over the N = C*H*W values of each image (the semantics of
    `CapsNetImageProcessor(do_standardize=True)`)."""
    flat = pixels.flatten(1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, correction=0, keepdim=True).clamp(min=1.0 / math.sqrt(flat.shape[1]))
    return ((flat - mean) / std).view_as(pixels)


@dataclass
class BatchTransform:
    """Turns a batch's `pixel_values` (uint8 0..255 or float 0..1) into model input `[B, C, height, width]` float32.

    Evaluation (`generator=None`): centre crop/pad to `image_size`, then rescale to 0..1 or per-image
    standardization (on the 0..255 scale). Training (with a `torch.Generator` on the batch's device) first applies,
    per image: a random crop (`random_crop`, the CIFAR-10 recipe) or a random shift by up to `max_shift` pixels with
    zero padding (the MNIST recipe), a random horizontal flip (`random_flip`), a random brightness delta in
    [-max_brightness_delta, max_brightness_delta] (on 0..255) and a random contrast factor in `contrast_range`
    (per channel around its mean, as TensorFlow's `adjust_contrast`).
    """

    image_size: tuple[int, int]
    do_standardize: bool = False
    max_shift: int = 0
    random_crop: bool = False
    random_flip: bool = False
    max_brightness_delta: float = 0.0
    contrast_range: tuple[float, float] | None = None

    def __call__(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = pixel_values.float() / 255.0 if pixel_values.dtype == torch.uint8 else pixel_values.float()
        batch, _, source_height, source_width = pixels.shape
        height, width = self.image_size
        device = pixels.device
        if generator is not None and self.random_crop:
            top = _randint(max(source_height - height, 0) + 1, batch, generator, device)
            left = _randint(max(source_width - width, 0) + 1, batch, generator, device)
            top = top - max(height - source_height, 0) // 2
            left = left - max(width - source_width, 0) // 2
        else:
            top = torch.full((batch,), (source_height - height) // 2, device=device)
            left = torch.full((batch,), (source_width - width) // 2, device=device)
        if generator is not None and self.max_shift > 0:
            top = top - _randint(2 * self.max_shift + 1, batch, generator, device) + self.max_shift
            left = left - _randint(2 * self.max_shift + 1, batch, generator, device) + self.max_shift
        # Decided from Python values only: testing the offsets themselves would wait for the device every batch.
        random_offsets = generator is not None and (self.random_crop or self.max_shift > 0)
        if (source_height, source_width) != (height, width) or random_offsets:
            pixels = translate_crop(pixels, top, left, height, width)
        if generator is not None:
            if self.random_flip:
                flip = torch.rand(batch, device=device, generator=generator) < 0.5
                pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
            if self.max_brightness_delta > 0:
                delta = (torch.rand(batch, device=device, generator=generator) * 2 - 1) * self.max_brightness_delta
                pixels = pixels + (delta / 255.0)[:, None, None, None]
            if self.contrast_range is not None:
                low, high = self.contrast_range
                factor = low + (high - low) * torch.rand(batch, device=device, generator=generator)
                mean = pixels.mean(dim=(2, 3), keepdim=True)
                pixels = (pixels - mean) * factor[:, None, None, None] + mean
        if self.do_standardize:
            pixels = standardize_per_image(pixels * 255.0)
        return pixels

    @classmethod
    def from_image_processor(cls, processor: Any, **augmentation: Any) -> BatchTransform:
        """The evaluation transform of a `CapsNetImageProcessor` (size, standardization), plus training options."""
        size = processor.size
        height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
        return cls(image_size=(int(height), int(width)), do_standardize=bool(processor.do_standardize), **augmentation)


def _randint(high: int, batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(high, (batch,), generator=generator, device=device)


def make_generator(device: torch.device, *seeds: int) -> torch.Generator:
    """A `torch.Generator` on `device` seeded from integers (e.g. seed, step, process index): augmentation is a pure
    function of them, so a resumed run draws exactly what an uninterrupted run draws."""
    seed = 0
    for value in seeds:
        seed = (seed * 1_000_003 + int(value)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch` (CPU int64 `[num_examples]`), fixed by (seed, epoch)."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class EpochOrder:
    """Batch indices from each epoch's [`epoch_permutation`], moved to `device` once per epoch: taking a batch's
    indices then never copies from the host (on a GPU a blocking host-to-device copy waits for all queued work)."""

    def __init__(self, num_examples: int, seed: int, device: torch.device | str):
        self.num_examples, self.seed, self.device = num_examples, seed, torch.device(device)
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def indices(self, epoch: int, start: int, count: int) -> torch.Tensor:
        """Positions `start` to `start + count` of epoch `epoch`'s order: int64 `[count]` on the device."""
        if epoch != self._epoch:
            self._order = epoch_permutation(self.num_examples, self.seed, epoch).to(self.device)
            self._epoch = epoch
        return self._order[start : start + count]


# ---------------------------------------------------------------------------------------------------------------------
# One call from a data-set name to tensors
# ---------------------------------------------------------------------------------------------------------------------

PAPER_DATASETS = ("multimnist", "expanded_mnist", "affnist_style")
EVALUATION_ONLY_DATASETS = ("affnist_style",)


@dataclass
class LoadedSplits:
    """Decoded splits (CPU) and the class names; `eval` is None when no evaluation split was asked for."""

    train: Any
    eval: Any
    id2label: dict[int, str]
    eval_split: str | None


NPZ_SUFFIX = ".npz"


def save_npz_splits(splits: LoadedSplits, path: str) -> None:
    """Write decoded splits as one NumPy archive that [`load_splits`] reads without `datasets` (for machines
    without it, such as a GPU image): `{split}_images` uint8 `[N, C, H, W]`, `{split}_labels` int64 `[N]` for the
    training split "train" and the evaluation split, and `class_names`."""
    arrays = {"class_names": np.array([splits.id2label[index] for index in sorted(splits.id2label)])}
    for name, split in (("train", splits.train), (splits.eval_split, splits.eval)):
        if split is not None:
            arrays[f"{name}_images"] = split.images.cpu().numpy()
            arrays[f"{name}_labels"] = split.labels.cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial.npz"
    np.savez_compressed(partial, **arrays)
    os.replace(partial, path)


def load_npz_splits(
    path: str,
    train_split: str | None,
    eval_split: str | None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> LoadedSplits:
    """Splits from an archive of [`save_npz_splits`]; `eval_split` "auto" takes "test", else "validation".
    Subsets (`max_*_samples`) are the first examples of a permutation fixed by `seed`."""
    if not os.path.isfile(path):
        raise DataError(f"data archive {path!r} does not exist")
    try:
        archive = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read data archive {path!r}: {error}") from error
    available = sorted(key[: -len("_images")] for key in archive if key.endswith("_images"))
    if eval_split == "auto":
        eval_split = next((name for name in ("test", "validation") if name in available), None)
        if eval_split is None:
            raise DataError(f"{path!r} has no 'test' or 'validation' split (splits: {available})")
    if "class_names" not in archive:
        raise DataError(f"{path!r} has no class_names: write it with capsnet_hf.data.save_npz_splits")
    names = [str(name) for name in archive["class_names"]]
    if num_classes is not None and len(names) != num_classes:
        raise DataError(f"{path!r} has {len(names)} classes but the model has {num_classes}")
    num_classes = len(names)
    id2label = dict(enumerate(names))

    def split(name: str | None, limit: int | None) -> ImageTensorDataset | None:
        if name is None:
            return None
        if f"{name}_images" not in archive or f"{name}_labels" not in archive:
            raise DataError(f"{path!r} has no split {name!r} (splits: {available})")
        images = torch.from_numpy(archive[f"{name}_images"])
        labels = torch.from_numpy(archive[f"{name}_labels"]).long()
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise DataError(f"split {name!r} of {path!r} is not uint8 [N, C, H, W] images with [N] labels")
        if limit is not None:
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:limit]
            images, labels = images[keep], labels[keep]
        check_labels(labels, num_classes, f"split {name!r} of {path!r}")
        return ImageTensorDataset(images, labels, id2label)

    return LoadedSplits(
        split(train_split, max_train_samples), split(eval_split, max_eval_samples), id2label, eval_split
    )


def load_splits(
    dataset_name: str,
    train_split: str | None,
    eval_split: str | None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    image_size: Sequence[int] | None = None,
    resize_mode: str = "resize",
    num_classes: int | None = None,
    num_channels: int | None = None,
    seed: int = 0,
    train_val_split: float | None = None,
) -> LoadedSplits:
    """Load, check and decode a training and/or an evaluation split of an image-classification data set.

    `eval_split` "auto" takes "test", else "validation", else `train_val_split` of the training split. Columns are
    detected (`image`/`img`, `label`/`labels`) unless named; images are converted to `num_channels` (default:
    3 if any image has colour, else 1). `num_classes` (a model's) bounds the labels; by default
    it is the `ClassLabel`'s number of names, else 1 + the largest training label. Subsets (`max_*_samples`) are the
    first examples after a shuffle fixed by `seed`, as in transformers' examples. Every problem raises `DataError`.
    A path ending in `.npz` is an archive of [`save_npz_splits`], read without `datasets` (no resizing).
    """
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if str(dataset_name).endswith(NPZ_SUFFIX):
        loaded = load_npz_splits(
            dataset_name, train_split, eval_split, max_train_samples, max_eval_samples, num_classes, seed
        )
        for split in (loaded.train, loaded.eval):
            if split is None:
                continue
            if image_size is not None and split.image_size != tuple(image_size):
                raise DataError(f"{dataset_name!r} holds {list(split.image_size)} images, not {list(image_size)}")
            if num_channels is not None and split.num_channels != num_channels:
                raise DataError(f"{dataset_name!r} holds {split.num_channels}-channel images, not {num_channels}")
        return loaded
    splits = load_dataset_dict(dataset_name, dataset_config_name)
    if eval_split == "auto":
        eval_split = next((name for name in ("test", "validation") if name in splits), None)
        if eval_split is None:
            if not train_val_split or train_split is None:
                raise DataError(f"{dataset_name!r} has no 'test' or 'validation' split (splits: {sorted(splits)})")
            parts = get_split(splits, train_split, dataset_name).train_test_split(train_val_split, seed=seed)
            splits = type(splits)({train_split: parts["train"], "validation": parts["test"]})
            eval_split = "validation"
    chosen = {name: get_split(splits, name, dataset_name) for name in (train_split, eval_split) if name is not None}
    reference = next(iter(chosen.values()))
    image_column = detect_column(reference.column_names, IMAGE_COLUMN_CANDIDATES, image_column, "image")
    label_column = detect_column(reference.column_names, LABEL_COLUMN_CANDIDATES, label_column, "label")
    for name, split in chosen.items():
        for column in (image_column, label_column):
            if column not in split.column_names:
                raise DataError(f"split {name!r} of {dataset_name!r} has no column {column!r}")
    names = class_names(reference, label_column)
    if num_classes is None:
        if names is not None:
            num_classes = len(names)
        elif train_split is not None:
            num_classes = int(max(chosen[train_split][label_column])) + 1
        else:
            raise DataError(f"the number of classes of {dataset_name!r} is unknown: its labels have no class names")
    if names is not None and len(names) != num_classes:
        raise DataError(f"{dataset_name!r} has {len(names)} classes but the model has {num_classes}")
    id2label = {index: (names[index] if names else str(index)) for index in range(num_classes)}

    def decode(split_name: str | None, limit: int | None, channels: int | None, size):
        if split_name is None:
            return None
        split = chosen[split_name]
        if limit is not None:
            split = split.shuffle(seed=seed).select(range(min(limit, len(split))))
        where = f"split {split_name!r} of {dataset_name!r}"
        return dataset_to_tensors(
            split, image_column, label_column, num_classes, channels, size, resize_mode, id2label, where
        )

    train = decode(train_split, max_train_samples, num_channels, image_size)
    # The evaluation images take the training images' channels and size (or the model's, when evaluating only).
    reference_size = image_size if train is None else (image_size or train.image_size)
    reference_channels = num_channels if train is None else train.num_channels
    evaluation = decode(eval_split, max_eval_samples, reference_channels, reference_size)
    if train is not None and evaluation is not None and evaluation.image_size != train.image_size:
        raise DataError(f"evaluation images are {evaluation.image_size}, training images {train.image_size}")
    return LoadedSplits(train, evaluation, id2label, eval_split)


def load_paper_splits(
    dataset_name: str,
    source_dataset_name: str,
    train: bool,
    variants_per_digit: int,
    eval_variants_per_digit: int,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    device: str | torch.device | None = None,
) -> LoadedSplits:
    """The paper's generated data sets (`capsnet_hf.paper_datasets`) built from an MNIST-like source data set:
    `"multimnist"` (two-hot labels and per-digit reconstruction targets), `"expanded_mnist"` (40x40) or
    `"affnist_style"` (40x40 random affine transformations of the test digits, `paper_datasets.AffNISTStyle`;
    evaluation only: `train=True` raises `DataError`).
    The source's train split feeds the training generator, its test split the evaluation generator (a new seed);
    the generators live on `device`."""
    from . import paper_datasets

    if dataset_name not in PAPER_DATASETS:
        raise DataError(f"unknown generated data set {dataset_name!r}; choose one of {PAPER_DATASETS}")
    if train and dataset_name in EVALUATION_ONLY_DATASETS:
        raise DataError(f"{dataset_name} is an evaluation-only data set (train on expanded_mnist)")
    source = load_splits(
        source_dataset_name,
        "train" if train else None,
        "test",
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        seed=seed,
    )
    if (source.train or source.eval).num_channels != 1 or (source.train or source.eval).image_size != (28, 28):
        raise DataError(f"{dataset_name} needs a 28x28 grayscale source data set, got {source_dataset_name!r}")
    generator = {
        "multimnist": paper_datasets.MultiMNIST,
        "expanded_mnist": paper_datasets.ExpandedMNIST,
        "affnist_style": paper_datasets.AffNISTStyle,
    }[dataset_name]

    def build(split: ImageTensorDataset | None, variants: int, split_seed: int):
        if split is None:
            return None
        return generator(split.images[:, 0], split.labels, variants, seed=split_seed, device=device)

    return LoadedSplits(
        build(source.train, variants_per_digit, seed),
        build(source.eval, eval_variants_per_digit, seed + 1),
        source.id2label,
        "test",
    )


__all__ = [
    "BatchTransform",
    "DataError",
    "EpochOrder",
    "EVALUATION_ONLY_DATASETS",
    "IMAGE_COLUMN_CANDIDATES",
    "ImageTensorDataset",
    "LABEL_COLUMN_CANDIDATES",
    "LoadedSplits",
    "PAPER_DATASETS",
    "check_labels",
    "class_names",
    "dataset_to_tensors",
    "decode_images",
    "detect_column",
    "epoch_permutation",
    "get_split",
    "load_dataset_dict",
    "load_npz_splits",
    "load_paper_splits",
    "load_splits",
    "make_generator",
    "save_npz_splits",
    "standardize_per_image",
    "translate_crop",
    "UsageError",
]
