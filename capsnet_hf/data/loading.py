"""Loading `datasets` image data: split and column detection, label checks, decode once to uint8 tensors."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..cli import DataError
from ..image_processing_capsnet import crop_or_pad

IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "labels")


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


def _decoded(value: Any, where: str, row: int) -> Image.Image:
    """The fully decoded image of one row; a corrupt or truncated one is a `DataError` naming the row."""
    try:
        image = _open_image(value)
        image.load()  # PIL decodes lazily: a truncated file fails here, not in the middle of training
    except DataError as error:
        raise DataError(f"row {row} of {where}: {error}") from error
    except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for a corrupt or truncated file
        raise DataError(f"cannot decode the image in row {row} of {where}: {error}") from error
    return image


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
    images = [_decoded(value, where, row) for row, value in enumerate(values)]
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
            pixels = crop_or_pad(pixels, height, width)
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
