"""What the demo shows, computed from a CapsNet and one image without gradio: the prediction (class capsule lengths,
poses, routing map), the reconstruction from the predicted capsule with its dimensions tweaked (paper, Section 5.1),
and everything as arrays ready to display."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..cli import UsageError, load_model_and_processor
from ..configuration_capsnet import CapsNetConfig
from ..paper.figures import class_name, display_array, plot_perturbations, routing_maps

DISPLAY_SIZE = 224  # pixels of the longer side of a displayed image (nearest-neighbour upscaling keeps pixels sharp)
MNIST_DIGIT_FRACTION = 20 / 28  # an MNIST digit fits a 20x20 box centred in its 28x28 image
GRID_PANEL_INCHES = 0.6  # the Figure 4 grid at 100 dpi: 60 pixels a panel, 660 x 960 for 11 steps x 16 dimensions
LENGTH_COLUMN = "capsule length"
CLASS_COLUMN = "class"
KIND_COLUMN = "capsule"
PREDICTED, OTHER = "predicted", "other"


def load_capsnet(name: str, trust_remote_code: bool = False, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode on `device`, image processor) of the CapsNet saved at `name` (a folder or a Hub id).

    Raises a one-line `UsageError` for a missing or broken folder (`cli.load_model_and_processor`) and for an image
    classifier that is not a CapsNet (the baseline CNN, for example): it has no capsules to show."""
    model, processor = load_model_and_processor(name, trust_remote_code)
    model_type = getattr(model.config, "model_type", None)
    if model_type != CapsNetConfig.model_type or not hasattr(model, "reconstruct"):
        raise UsageError(f"{name!r} holds a {model_type!r} model, not a CapsNet: the demo needs class capsules")
    return model.to(device).eval(), processor


def has_decoder(model: Any) -> bool:
    """Whether `model` reconstructs images (config.use_decoder; an ensemble never does)."""
    return getattr(model, "decoder", None) is not None


def drawing_to_image(composite: Image.Image | None) -> Image.Image | None:
    """A sketchpad drawing (RGBA, transparent where nothing is drawn) as the person sees it, dark strokes on white,
    cropped to the strokes and centred on a square white canvas with the margin of an MNIST digit; None when nothing
    is drawn. The processor then inverts it (`do_invert`) to the light-on-dark digits the model was trained on."""
    if composite is None:
        return None
    drawing = composite.convert("RGBA")
    strokes = drawing.getchannel("A").getbbox()
    if strokes is None:
        return None
    paper = Image.new("RGBA", drawing.size, "white")
    flattened = Image.alpha_composite(paper, drawing).convert("RGB").crop(strokes)
    side = round(max(flattened.size) / MNIST_DIGIT_FRACTION)
    framed = Image.new("RGB", (side, side), "white")
    framed.paste(flattened, ((side - flattened.width) // 2, (side - flattened.height) // 2))
    return framed


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image through the model.

    pixel_values: `[1, C, H, W]`, as the processor prepared it. capsule_lengths: `[J]`, |v_j| of the squashed class
    capsules (Eq. 1). capsule_poses: `[J, K]` class capsules v_j (`[M, J, K]` for an ensemble of M). routing_map:
    `[H', W']` coupling coefficients c_ij (Eq. 3) of the primary capsules to the predicted class, averaged over the
    capsule types."""

    pixel_values: torch.Tensor
    capsule_lengths: torch.Tensor
    capsule_poses: torch.Tensor
    predicted_class: int
    routing_map: torch.Tensor


@torch.no_grad()
def predict(model: Any, processor: Any, image: Any, invert: bool = False) -> Prediction:
    """Prepare `image` (a PIL image or array; `invert` for a dark digit on a light background) and run the model.
    An image the processor refuses is a one-line `UsageError`."""
    try:
        pixel_values = processor(image, do_invert=invert, return_tensors="pt")["pixel_values"]
    except ValueError as error:
        raise UsageError(f"cannot prepare this image: {error}") from error
    pixel_values = pixel_values.to(model.device)
    output = model(pixel_values)
    maps, predicted = routing_maps(model, pixel_values)
    return Prediction(
        pixel_values=pixel_values,
        capsule_lengths=output.capsule_lengths[0],
        capsule_poses=output.capsule_poses[0],
        predicted_class=int(predicted[0]),
        routing_map=maps[0],
    )


def summary(model: Any, prediction: Prediction) -> str:
    """One line of Markdown: the predicted class, its capsule length and the runner-up's."""
    lengths = prediction.capsule_lengths.float().cpu()
    order = lengths.argsort(descending=True).tolist()
    text = f"Prediction: **{class_name(model, order[0])}**, capsule length {lengths[order[0]]:.3f}"
    if len(order) > 1:
        text += f" (next: {class_name(model, order[1])}, {lengths[order[1]]:.3f})"
    return text


def lengths_table(model: Any, prediction: Prediction) -> pd.DataFrame:
    """The class capsule lengths as a table for a bar chart: one row per class, in class order."""
    lengths = prediction.capsule_lengths.float().cpu().tolist()
    return pd.DataFrame(
        {
            CLASS_COLUMN: [class_name(model, index) for index in range(len(lengths))],
            LENGTH_COLUMN: lengths,
            KIND_COLUMN: [
                PREDICTED if index == prediction.predicted_class else OTHER for index in range(len(lengths))
            ],
        }
    )


def display_image(image: torch.Tensor, size: int = DISPLAY_SIZE) -> np.ndarray:
    """`[C, H, W]` -> uint8 `[h, w]` (gray) or `[h, w, 3]`, upscaled by a whole factor towards `size` pixels on the
    longer side; inputs outside [0, 1] (standardized) are min-max scaled as in the paper's figures."""
    array = display_array(image)
    scale = max(1, size // max(array.shape[:2]))
    array = np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)
    return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)


def routing_image(prediction: Prediction, size: int = DISPLAY_SIZE) -> np.ndarray:
    """The routing map as uint8 RGB `[h, w, 3]` (viridis, min-max scaled: bright = coupled most to the prediction)."""
    values = prediction.routing_map.float().cpu()
    scaled = (values - values.min()) / (values.max() - values.min()).clamp(min=1e-12)
    colours = matplotlib.colormaps["viridis"](scaled.numpy())[..., :3]  # [H', W', 3] in 0..1
    return display_image(torch.from_numpy(colours).permute(2, 0, 1), size)


def routing_caption(model: Any, prediction: Prediction) -> str:
    """What the routing map's colours span, against uniform routing (c_ij = 1/J)."""
    values = prediction.routing_map.float()
    uniform = 1 / prediction.capsule_lengths.shape[-1]
    return (
        f"Coupling of the primary capsules to class {class_name(model, prediction.predicted_class)}: "
        f"{values.min():.3f} (dark) to {values.max():.3f} (bright); uniform routing is {uniform:.3f}"
    )


@torch.no_grad()
def reconstruction(model: Any, prediction: Prediction, offsets: Sequence[float] | None = None) -> torch.Tensor:
    """`[C, H, W]`: the decoder's image of the predicted class's capsule with `offsets[d]` added to its dimension d
    (none: the plain reconstruction; one nonzero: one image of the paper's Figure 4)."""
    if not has_decoder(model):
        raise UsageError("this model has no decoder (config.use_decoder=False): it cannot reconstruct")
    poses = prediction.capsule_poses.clone()[None]  # [1, J, K]
    target = prediction.predicted_class
    if offsets is not None:
        if len(offsets) != poses.shape[-1]:
            raise UsageError(f"expected {poses.shape[-1]} offsets (one per capsule dimension), got {len(offsets)}")
        poses[0, target] += torch.tensor([float(offset) for offset in offsets], dtype=poses.dtype, device=poses.device)
    mask = torch.nn.functional.one_hot(torch.tensor([target], device=poses.device), poses.shape[1])
    return model.reconstruct(poses, mask)[0]


def perturbation_grid(model: Any, prediction: Prediction) -> np.ndarray:
    """The paper's Figure 4 for this image (every dimension of the predicted capsule moved by -0.25..0.25, one row
    per dimension) as uint8 RGB `[h, w, 3]`."""
    figure = plot_perturbations(
        model, prediction.pixel_values, class_index=prediction.predicted_class, panel_inches=GRID_PANEL_INCHES
    )
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
