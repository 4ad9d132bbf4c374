"""Batches on the training device: crop, shift, flip, brightness/contrast and rescale/standardize a whole batch
(`BatchTransform`), and the example order fixed by (seed, epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


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
