"""One call from a data-set name (Hub id, local folder, `.npz` archive or a paper data set) to decoded splits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..cli import DataError
from ..image_processing_capsnet import RESIZE_MODES
from .loading import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    ImageTensorDataset,
    check_labels,
    class_names,
    dataset_to_tensors,
    detect_column,
    get_split,
    load_dataset_dict,
)

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
    source_dataset_name: str = "ylecun/mnist",
    variants_per_digit: int = 1,
    eval_variants_per_digit: int = 1,
    device: str | torch.device | None = None,
) -> LoadedSplits:
    """Load, check and decode a training and/or an evaluation split of an image-classification data set.

    `eval_split` "auto" takes "test", else "validation", else `train_val_split` of the training split. Columns are
    detected (`image`/`img`, `label`/`labels`) unless named; images are converted to `num_channels` (default:
    3 if any image has colour, else 1). `num_classes` (a model's) bounds the labels; by default
    it is the `ClassLabel`'s number of names, else 1 + the largest training label. Subsets (`max_*_samples`) are the
    first examples after a shuffle fixed by `seed`, as in transformers' examples. Every problem raises `DataError`.
    A path ending in `.npz` is an archive of [`save_npz_splits`], read without `datasets` (no resizing); a name in
    `PAPER_DATASETS` is generated from `source_dataset_name` ([`load_paper_splits`]). The splits end up on `device`
    (default: CPU).
    """
    if dataset_name in PAPER_DATASETS:
        return load_paper_splits(
            dataset_name,
            source_dataset_name,
            train=train_split is not None,
            variants_per_digit=variants_per_digit,
            eval_variants_per_digit=eval_variants_per_digit,
            seed=seed,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            device=device,
        )
    loaded = _load_image_splits(
        dataset_name,
        train_split,
        eval_split,
        dataset_config_name,
        image_column,
        label_column,
        max_train_samples,
        max_eval_samples,
        image_size,
        resize_mode,
        num_classes,
        num_channels,
        seed,
        train_val_split,
    )
    if device is not None:
        loaded.train = None if loaded.train is None else loaded.train.to(device)
        loaded.eval = None if loaded.eval is None else loaded.eval.to(device)
    return loaded


def _load_image_splits(
    dataset_name: str,
    train_split: str | None,
    eval_split: str | None,
    dataset_config_name: str | None,
    image_column: str | None,
    label_column: str | None,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    image_size: Sequence[int] | None,
    resize_mode: str,
    num_classes: int | None,
    num_channels: int | None,
    seed: int,
    train_val_split: float | None,
) -> LoadedSplits:
    """[`load_splits`] of a `datasets` data set or an `.npz` archive, decoded on CPU."""
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
        if limit is not None:
            where += f" (rows of its subset shuffled with seed {seed})"
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
