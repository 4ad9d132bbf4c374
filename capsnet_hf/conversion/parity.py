"""Parity of a converted folder with the NumPy reference of the official forward pass on fixed random inputs."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..cli import UsageError
from ..configuration_capsnet import CapsNetConfig
from ..modeling_capsnet import LOGIT_EPSILON, CapsNetForImageClassification
from .geometry import DatasetPreset
from .reference import reference_forward
from .weights import Arrays

PARITY_IMAGES = 2  # fixed random inputs of the parity check


class ParityError(UsageError):
    """The converted model does not reproduce the checkpoint's forward pass to the tolerance."""


@dataclass
class ParityReference:
    """Fixed inputs [B, C, H, W] and `reference_forward` outputs of every ensemble member on them."""

    pixel_values: np.ndarray
    members: list[dict[str, np.ndarray]]


def parity_reference(member_arrays: list[Arrays], config: CapsNetConfig, preset: DatasetPreset) -> ParityReference:
    """Reference outputs on `PARITY_IMAGES` fixed random inputs: uniform in [0, 1] for MNIST, standard normal
    (standardized images) for CIFAR-10."""
    rng = np.random.default_rng(0)
    shape = (PARITY_IMAGES, config.num_channels, *config.image_size)
    pixels = rng.uniform(0, 1, shape) if preset.padding == "valid" else rng.normal(0, 1, shape)
    pixels = pixels.astype(np.float32)
    return ParityReference(
        pixels, [reference_forward(a, pixels, preset.padding, preset.leaky_routing) for a in member_arrays]
    )


def measure_parity(folder: str | os.PathLike, reference: ParityReference) -> dict[str, float]:
    """Load the converted folder and compare it with the reference forward pass.

    Returns the max absolute differences: `logits` (`logit(capsule length)`, the model's logits), `capsule_lengths`
    (the official code's "logits"; summed over members for an ensemble), `capsule_poses` (every member) and
    `reconstructions` (decoder, masked by the reference's predicted class).
    """
    model = CapsNetForImageClassification.from_pretrained(folder).eval()
    pixels, refs = reference.pixel_values, reference.members
    summed = sum(ref["capsule_lengths"] for ref in refs)
    labels = torch.from_numpy(summed.argmax(-1)) if model.decoder is not None else None
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), labels=labels)
    poses = out.capsule_poses.numpy().reshape(len(pixels), len(refs), *refs[0]["capsule_poses"].shape[1:])
    ref_lengths = np.clip(summed / len(refs), LOGIT_EPSILON, 1 - LOGIT_EPSILON)
    ref_logits = np.log(ref_lengths) - np.log1p(-ref_lengths)
    parity = {
        "logits": float(np.abs(out.logits.numpy() - ref_logits).max()),
        "capsule_lengths": float(np.abs(out.capsule_lengths.numpy() * len(refs) - summed).max()),
        "capsule_poses": float(max(np.abs(poses[:, m] - ref["capsule_poses"]).max() for m, ref in enumerate(refs))),
    }
    if out.reconstructions is not None:
        parity["reconstructions"] = float(np.abs(out.reconstructions.numpy() - refs[0]["reconstructions"]).max())
    return parity


def parity_error(parity: dict[str, float]) -> float:
    """The difference judged against `--tolerance`: lengths, poses and reconstructions, which are bounded. The
    logits are reported but not judged: logit(p) has slope 1/(p(1-p)), so a 1e-7 difference in a length of
    0.9999 becomes 1e-3 in its logit without any error in the conversion. Any NaN or infinity is an infinite
    error (a NaN compared with the tolerance would pass)."""
    if not all(math.isfinite(value) for value in parity.values()):
        return math.inf
    return max(value for name, value in parity.items() if name != "logits")


def check_parity(parity: dict[str, float], tolerance: float) -> None:
    """Raise `ParityError` if `parity_error(parity)` exceeds `tolerance`."""
    if parity_error(parity) > tolerance:
        measured = ", ".join(f"{name} {value:.3g}" for name, value in parity.items())
        raise ParityError(
            f"the converted model does not reproduce the checkpoint's forward pass to --tolerance {tolerance:g} "
            f"(max |difference|: {measured})"
        )
