"""Data for CapsNet training and evaluation: `datasets` loading, checks, decode-once tensors, on-device augmentation.

A *batch* is a dict of tensors: `pixel_values` `[B, C, H, W]` (uint8 on 0..255, or float on 0..1), `labels` `[B]`
int64 or multi-hot `[B, J]` float, and optionally `reconstruction_targets` (MultiMNIST: `[B, 2, 1, H, W]`).
An *in-memory dataset* is any object with `__len__` and `batch(indices) -> dict` (indices a 1-D int64 tensor):
[`ImageTensorDataset`] here, or the generators of `capsnet_hf.paper_datasets` (`MultiMNIST`, `ExpandedMNIST`).

Images are decoded once into a uint8 tensor, which lives on the training device; [`BatchTransform`] then crops,
shifts, flips, changes brightness/contrast and rescales/standardizes a whole batch on that device, so MNIST-sized data
sets are never limited by per-image Python decoding.
"""
