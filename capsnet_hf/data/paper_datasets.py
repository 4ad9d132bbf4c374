"""Data sets of the paper's experiments, generated lazily from MNIST on any torch device.

* [`MultiMNIST`] (paper, Section 6): two overlapping digits of different classes on a 36x36 canvas, each shifted by
  up to 4 pixels in each direction; both source images are kept as reconstruction targets.
* [`ExpandedMNIST`] (paper, Section 5.2): one digit placed at random on a 40x40 canvas (shifts of up to 6 pixels),
  the training set of the affNIST experiment.
* [`AffNISTStyle`]: an affNIST-like test set made from MNIST digits with random affine transformations (the real
  affNIST files cannot be downloaded offline; [`load_affnist_mat`] reads them where they are available).

Every generator is deterministic given its seed and the example index: example `k` depends only on `(seed, k)`,
through a counter-based integer hash evaluated on the generator's device, so any batch can be produced on demand
(no disk, no state); the random draws are integer arithmetic, identical on every device. Each generator holds the source digits
as a uint8 tensor `[N, 28, 28]` and returns float32 images in [0, 1].
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MNIST_SIZE = 28
_MASK32 = 0xFFFFFFFF
_STREAM_STRIDE = 0x9E3779B9

# Ranges of the affNIST-style transformations, uniform in each (see `AffNISTStyle`).
AFFNIST_ROTATION_DEGREES = 20.0
AFFNIST_SHEAR = 0.2
AFFNIST_SCALE = (0.8, 1.2)
AFFNIST_CANVAS = 40


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash (xorshift-multiply rounds), on Python ints or int64 tensors holding values in
    [0, 2**32). The multipliers are below 2**31, so no int64 product overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def _random_bits(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Pseudo-random uint32 values (in an int64 tensor) for each entry of `index`, one independent stream per
    `(seed, stream)`."""
    key = _mix32((_mix32(seed & _MASK32) + stream * _STREAM_STRIDE) & _MASK32)
    return _mix32(_mix32(index ^ key) ^ key)


def _random_ints(seed: int, stream: int, index: torch.Tensor, high: int | torch.Tensor) -> torch.Tensor:
    """Integers uniform in [0, high) (relative modulo bias below high / 2**32)."""
    return _random_bits(seed, stream, index) % high


def _random_uniform(seed: int, stream: int, index: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """float32 values uniform in [low, high)."""
    unit = (_random_bits(seed, stream, index) >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return low + (high - low) * unit


def _as_uint8_images(images: torch.Tensor | np.ndarray, name: str = "images") -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dim() != 3 or tuple(images.shape[1:]) != (MNIST_SIZE, MNIST_SIZE):
        raise ValueError(f"{name} must have shape [N, 28, 28] (or [N, 1, 28, 28]), got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {images.dtype}")
    return images


def _as_labels(labels: torch.Tensor | np.ndarray | Sequence[int], num_images: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if labels.shape != (num_images,):
        raise ValueError(f"labels must have shape [{num_images}], got {tuple(labels.shape)}")
    if num_images and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]")
    return labels


def place_digits(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, canvas_size: int) -> torch.Tensor:
    """Paste uint8 digits `[B, h, w]` on zero canvases `[B, canvas_size, canvas_size]` with their top-left corners at
    integer `(top, left)` `[B]` each (parts falling outside the canvas are cut). Returns float32 in [0, 1]."""
    batch, height, width = images.shape
    device = images.device
    rows = torch.arange(canvas_size, device=device)[None, :] - top[:, None]  # [B, S] source row of each canvas row
    cols = torch.arange(canvas_size, device=device)[None, :] - left[:, None]
    valid = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
    batch_index = torch.arange(batch, device=device)[:, None, None]
    pasted = images[batch_index, rows.clamp(0, height - 1)[:, :, None], cols.clamp(0, width - 1)[:, None, :]]
    return pasted.to(torch.float32).mul_(1.0 / 255.0) * valid


class _DigitGenerator(abc.ABC):
    """Shared bookkeeping: source digits, labels, seed, device, length and index checks."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        variants_per_digit: int,
        seed: int,
        device: str | torch.device | None,
        num_classes: int = 10,
    ):
        if variants_per_digit < 1:
            raise ValueError(f"the number of examples per digit must be >= 1, got {variants_per_digit}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.images = _as_uint8_images(images).to(self.device)
        self.labels = _as_labels(labels, self.images.shape[0], num_classes).to(self.device)
        self.num_classes = num_classes
        self.variants_per_digit = int(variants_per_digit)
        self.seed = int(seed)
        if len(self) >= 2**32:
            raise ValueError(f"at most 2**32 - 1 examples, got {len(self)}")

    def __len__(self) -> int:
        return self.images.shape[0] * self.variants_per_digit

    num_channels = 1

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.canvas_size, self.canvas_size)

    def _indices(self, indices: torch.Tensor | Sequence[int] | range | int) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(np.asarray(indices))
        indices = indices.to(self.device, torch.int64).reshape(-1)
        if indices.numel() and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got [{indices.min()}, {indices.max()}]")
        return indices

    @abc.abstractmethod
    def batch(self, indices: torch.Tensor | Sequence[int] | range) -> dict[str, torch.Tensor]:
        """The examples at `indices` as a dict of batched tensors on the generator's device."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int (use .batch(indices) for many), got {type(index).__name__}")
        if index < 0:
            index += len(self)
        return {key: value[0] for key, value in self.batch([index]).items()}


class MultiMNIST(_DigitGenerator):
    r"""The MultiMNIST set of the paper (Section 6), generated on demand.

    Example `k` overlays the shifted digit `a = k // pairs_per_digit` and a shifted partner digit `b` of a different
    class drawn uniformly from the other classes' digits of the same split. Each digit is pasted on a 36x36 canvas
    (28 + 2 * max_shift) shifted by an integer offset uniform in [-max_shift, max_shift] in each direction. As in the
    official generator (`mnist_shift.py` of the released code), the base digit's shift depends only on the digit
    (shared by its `pairs_per_digit` pairs) while every pair draws its own partner and partner shift; partners are
    drawn with replacement (the official code draws them without replacement: a partner can repeat for one base
    digit here, with probability about pairs_per_digit / 54,000 per pair).

    overlay: `"max"` (default, as the project's specification asks) takes the pixel-wise maximum; `"sum"` adds the
    two images and clips at 1, as the official generator does (`minimum(a + b, 255)`).

    The paper trains on 1,000 pairs per training digit (60M examples) and tests on 1,000 pairs per test digit (10M).

    `batch(indices)` returns:
        pixel_values `[B, 1, 36, 36]` float32 in [0, 1],
        labels `[B, 10]` float32 two-hot,
        reconstruction_targets `[B, 2, 1, 36, 36]`: the two shifted source images ordered by increasing class (the
            order of the model's per-class reconstructions with multi-hot labels),
        digit_labels `[B, 2]` int64: the two classes, increasing.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        pairs_per_digit: int = 1000,
        seed: int = 0,
        max_shift: int = 4,
        overlay: str = "max",
        device: str | torch.device | None = None,
    ):
        super().__init__(images, labels, pairs_per_digit, seed, device)
        if overlay not in ("sum", "max"):
            raise ValueError(f"overlay must be 'sum' or 'max', got {overlay!r}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.pairs_per_digit = self.variants_per_digit
        self.max_shift = int(max_shift)
        self.overlay = overlay
        self.canvas_size = MNIST_SIZE + 2 * self.max_shift
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        if (counts > 0).sum() < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes")
        # Digits sorted by class: class c occupies order[offsets[c] : offsets[c] + counts[c]].
        self._order = torch.argsort(self.labels, stable=True)
        self._counts = counts
        self._offsets = torch.cumsum(counts, 0) - counts

    def pair_indices(self, indices: torch.Tensor | Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
        """(base digit index `[B]`, partner digit index `[B]`) into `images` of each example."""
        indices = self._indices(indices)
        base = indices // self.pairs_per_digit
        base_class = self.labels[base]
        num_other = self.images.shape[0] - self._counts[base_class]
        position = _random_ints(self.seed, 0, indices, num_other)
        position = position + (position >= self._offsets[base_class]) * self._counts[base_class]
        return base, self._order[position]

    def batch(self, indices: torch.Tensor | Sequence[int] | range) -> dict[str, torch.Tensor]:
        indices = self._indices(indices)
        base, partner = self.pair_indices(indices)
        span = 2 * self.max_shift + 1
        base_top = _random_ints(self.seed, 1, base, span)
        base_left = _random_ints(self.seed, 2, base, span)
        partner_top = _random_ints(self.seed, 3, indices, span)
        partner_left = _random_ints(self.seed, 4, indices, span)
        first = place_digits(self.images[base], base_top, base_left, self.canvas_size)
        second = place_digits(self.images[partner], partner_top, partner_left, self.canvas_size)
        merged = (first + second).clamp_(max=1.0) if self.overlay == "sum" else torch.maximum(first, second)

        base_class, partner_class = self.labels[base], self.labels[partner]
        swap = (partner_class < base_class)[:, None, None]
        low, high = torch.where(swap, second, first), torch.where(swap, first, second)
        labels = torch.zeros(indices.shape[0], self.num_classes, device=self.device)
        labels[torch.arange(indices.shape[0], device=self.device), base_class] = 1.0
        labels[torch.arange(indices.shape[0], device=self.device), partner_class] = 1.0
        return {
            "pixel_values": merged[:, None],
            "labels": labels,
            "reconstruction_targets": torch.stack([low, high], dim=1)[:, :, None],
            "digit_labels": torch.stack(
                [torch.minimum(base_class, partner_class), torch.maximum(base_class, partner_class)], dim=1
            ),
        }


class ExpandedMNIST(_DigitGenerator):
    """MNIST digits placed at random on a 40x40 canvas: the training set of the paper's affNIST experiment
    (Section 5.2: "MNIST digits placed randomly on a black background of 40x40 pixels"), i.e. shifts uniform in
    [-6, 6] pixels in each direction around the centre.

    Example `k` is digit `k % N` (so each run of N consecutive indices covers every digit once) in placement variant
    `k // N`; use `variants_per_digit` > 1 (or a new seed per epoch) for more placements.

    `batch(indices)` returns pixel_values `[B, 1, 40, 40]` float32 in [0, 1] and labels `[B]` int64.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        variants_per_digit: int = 1,
        seed: int = 0,
        max_shift: int = 6,
        device: str | torch.device | None = None,
    ):
        super().__init__(images, labels, variants_per_digit, seed, device)
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)
        self.canvas_size = MNIST_SIZE + 2 * self.max_shift

    def batch(self, indices: torch.Tensor | Sequence[int] | range) -> dict[str, torch.Tensor]:
        indices = self._indices(indices)
        digit = indices % self.images.shape[0]
        span = 2 * self.max_shift + 1
        top = _random_ints(self.seed, 5, indices, span)
        left = _random_ints(self.seed, 6, indices, span)
        return {
            "pixel_values": place_digits(self.images[digit], top, left, self.canvas_size)[:, None],
            "labels": self.labels[digit],
        }


def affine_matrices(rotation: torch.Tensor, shear: torch.Tensor, scale_x: torch.Tensor, scale_y: torch.Tensor):
    """2x2 matrices `[B, 2, 2]` acting on (x, y) column vectors (x to the right, y downwards):
    rotation(angle in radians) @ shear(x += shear * y) @ scale(diag(scale_x, scale_y))."""
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    zero, one = torch.zeros_like(shear), torch.ones_like(shear)
    shear_matrix = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    scale = torch.diag_embed(torch.stack([scale_x, scale_y], -1))
    return rotate @ shear_matrix @ scale


class AffNISTStyle(_DigitGenerator):
    r"""An affNIST-style test set: MNIST digits under random affine transformations on a 40x40 canvas.

    Each example draws, independently and uniformly:
        rotation in [-20, 20] degrees, shear factor in [-0.2, 0.2] (x += shear * y), horizontal and vertical scale
        each in [0.8, 1.2], composed as rotation @ shear @ scale about the centre of the 28x28 digit; then a
        translation, uniform over the positions where the transformed digit's ink bounding box lies inside the
        40x40 canvas (centred when it does not fit).
    The affNIST page (https://www.cs.toronto.edu/~tijmen/affNIST/) lists these kinds of transformation; the ranges
    are unconfirmed against it (docs/results.md) and each is a constructor argument.
    The image is resampled bilinearly (values stay in [0, 1]); affNIST's own resampling method is not known here.

    Example `k` is digit `k % N` in transformation variant `k // N`.
    `batch(indices)` returns pixel_values `[B, 1, 40, 40]` float32 in [0, 1], labels `[B]` int64, transforms
    `[B, 4]` float32 (rotation in degrees, shear, scale_x, scale_y) and translations `[B, 2]` float32 ((x, y) in
    pixels, of the digit centre from the canvas centre).
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        variants_per_digit: int = 1,
        seed: int = 0,
        rotation_degrees: float = AFFNIST_ROTATION_DEGREES,
        shear: float = AFFNIST_SHEAR,
        scale: tuple[float, float] = AFFNIST_SCALE,
        canvas_size: int = AFFNIST_CANVAS,
        device: str | torch.device | None = None,
    ):
        super().__init__(images, labels, variants_per_digit, seed, device)
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if rotation_degrees < 0 or shear < 0:
            raise ValueError("rotation_degrees and shear are half-widths of symmetric ranges and must be >= 0")
        self.rotation_degrees = float(rotation_degrees)
        self.shear = float(shear)
        self.scale = (float(scale[0]), float(scale[1]))
        self.canvas_size = int(canvas_size)

    def batch(self, indices: torch.Tensor | Sequence[int] | range) -> dict[str, torch.Tensor]:
        indices = self._indices(indices)
        count = indices.shape[0]
        digit = indices % self.images.shape[0]
        source = self.images[digit]
        rotation = _random_uniform(self.seed, 7, indices, -self.rotation_degrees, self.rotation_degrees)
        shear = _random_uniform(self.seed, 8, indices, -self.shear, self.shear)
        scale_x = _random_uniform(self.seed, 9, indices, *self.scale)
        scale_y = _random_uniform(self.seed, 10, indices, *self.scale)
        matrix = affine_matrices(torch.deg2rad(rotation), shear, scale_x, scale_y)  # [B, 2, 2]

        # Ink bounding box of each digit, as pixel-edge corners relative to the source centre (13.5, 13.5).
        ink = source > 0
        rows, cols = ink.any(dim=2), ink.any(dim=1)  # [B, 28]
        position = torch.arange(MNIST_SIZE, device=self.device)
        empty = ~rows.any(dim=1)
        y0 = torch.where(rows, position, MNIST_SIZE).amin(dim=1).where(~empty, 0)
        y1 = torch.where(rows, position, -1).amax(dim=1).where(~empty, MNIST_SIZE - 1)
        x0 = torch.where(cols, position, MNIST_SIZE).amin(dim=1).where(~empty, 0)
        x1 = torch.where(cols, position, -1).amax(dim=1).where(~empty, MNIST_SIZE - 1)
        centre = (MNIST_SIZE - 1) / 2
        corners_x = torch.stack([x0, x1 + 1, x0, x1 + 1], -1).to(torch.float32) - 0.5 - centre
        corners_y = torch.stack([y0, y0, y1 + 1, y1 + 1], -1).to(torch.float32) - 0.5 - centre
        moved = matrix @ torch.stack([corners_x, corners_y], 1)  # [B, 2, 4] relative to the canvas centre
        half = self.canvas_size / 2
        low = -half - moved.amin(dim=2)  # translations keeping the box inside [-half, half]
        high = half - moved.amax(dim=2)
        unit = torch.stack(
            [_random_uniform(self.seed, 11, indices, 0, 1), _random_uniform(self.seed, 12, indices, 0, 1)], -1
        )
        translation = torch.where(low <= high, low + unit * (high - low), (low + high) / 2)  # [B, 2] (x, y)

        # Inverse mapping: canvas pixel centre p -> source point A^-1 (p - c_canvas - t) + c_source.
        canvas_centre = (self.canvas_size - 1) / 2
        grid = torch.arange(self.canvas_size, device=self.device, dtype=torch.float32) - canvas_centre
        points = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(1, -1, 2)  # (x, y)
        points = points - translation[:, None, :]
        source_points = points @ torch.linalg.inv(matrix).transpose(1, 2)  # [B, S*S, 2] relative to source centre
        normalized = (source_points + centre + 0.5) * (2.0 / MNIST_SIZE) - 1.0  # align_corners=False convention
        image = F.grid_sample(
            source[:, None].to(torch.float32) / 255.0,
            normalized.reshape(count, self.canvas_size, self.canvas_size, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        ).clamp_(0.0, 1.0)
        return {
            "pixel_values": image,
            "labels": self.labels[digit],
            "transforms": torch.stack([rotation, shear, scale_x, scale_y], -1),
            "translations": translation,
        }


def load_affnist_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one of the real affNIST `.mat` files (MATLAB v5, `scipy.io.loadmat`).

    The files hold a struct `affNISTdata` with one column per image: `image` (`[1600, N]` uint8, each column a 40x40
    image in row-major order, as the public affNIST loaders reshape it), `label_int` (`[1, N]`), `label_one_of_n`
    (`[10, N]`) and transformation fields (`affine_transform`, `inverse_affine_transform`,
    `human_readable_transform`). Public loaders that index the struct by position read `image` at field 2,
    `label_one_of_n` at 4 and `label_int` at 5 (one notes 8 fields in all); this loader looks fields up by name
    and keeps every other per-image field whatever its name.

    Returns images `[N, 40, 40]` uint8 and labels `[N]` int64, plus every other per-image field present, transposed
    to one row per image (e.g. `label_one_of_n` `[N, 10]`).
    """
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no affNIST .mat file at {path!r}")
    try:
        contents = loadmat(path, squeeze_me=False, struct_as_record=True)
    except (MatReadError, ValueError, NotImplementedError, TypeError) as error:
        raise ValueError(f"{path!r} is not a MATLAB v5 .mat file that scipy can read: {error}") from error
    if "affNISTdata" not in contents:
        keys = sorted(key for key in contents if not key.startswith("__"))
        raise ValueError(f"{path!r} has no 'affNISTdata' struct (variables: {keys})")
    record = contents["affNISTdata"]
    if record.dtype.names is None:
        raise ValueError(f"'affNISTdata' in {path!r} is not a struct")
    fields = {name: np.asarray(record[name].reshape(-1)[0]) for name in record.dtype.names}
    for required in ("image", "label_int"):
        if required not in fields:
            raise ValueError(f"'affNISTdata' in {path!r} has no field {required!r} (fields: {sorted(fields)})")
    image = fields.pop("image")
    if image.ndim != 2 or image.shape[0] != 1600:
        raise ValueError(f"affNISTdata.image must be [1600, N], got {image.shape}")
    count = image.shape[1]
    labels = fields.pop("label_int").reshape(-1)
    if labels.shape[0] != count:
        raise ValueError(f"affNISTdata.label_int has {labels.shape[0]} labels for {count} images")
    if image.dtype != np.uint8:
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"affNISTdata.image values must lie in 0..255, got [{image.min()}, {image.max()}]")
        image = image.astype(np.uint8)
    result = {"images": np.ascontiguousarray(image.T).reshape(count, 40, 40), "labels": labels.astype(np.int64)}
    for name, value in fields.items():
        if value.ndim == 2 and value.shape[1] == count:
            result[name] = np.ascontiguousarray(value.T)
    return result


__all__ = [
    "AFFNIST_CANVAS",
    "AFFNIST_ROTATION_DEGREES",
    "AFFNIST_SCALE",
    "AFFNIST_SHEAR",
    "AffNISTStyle",
    "ExpandedMNIST",
    "MultiMNIST",
    "affine_matrices",
    "load_affnist_mat",
    "place_digits",
]
