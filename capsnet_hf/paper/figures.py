"""Figures of "Dynamic Routing Between Capsules" from a CapsNet model (matplotlib, Agg backend, PNG).

* [`plot_reconstructions`]: inputs above their reconstructions (paper, Figure 3).
* [`plot_perturbations`]: each of the 16 dimensions of the predicted capsule tweaked by -0.25..0.25 in steps of
  0.05 and decoded (paper, Figure 4).
* [`plot_multimnist`]: MultiMNIST inputs above the two reconstructions of their two top classes in red and green
  (paper, Figure 5).
* [`plot_routing`]: the coupling coefficients c_ij of the primary capsules to the predicted class, averaged over
  the capsule types, on the primary capsules' spatial grid.

Each `plot_*` function returns a matplotlib `Figure` (Agg canvas, no pyplot) of exactly `columns x rows` panels of `panel_inches` each
(no tight bounding box, so the PNG size is known in advance); [`save_png`] writes one atomically. The command line
`capsnet-visualize` (capsnet_hf/visualize.py) draws them for a saved model and a `datasets` image data set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..cli import write_aside

FIGURES = ("reconstructions", "perturbation", "multimnist", "routing")
PERTURBATION_STEPS = tuple(round(-0.25 + 0.05 * step, 2) for step in range(11))  # -0.25, -0.20, ..., 0.25
DEFAULT_PANEL_INCHES = 1.0
DEFAULT_DPI = 100


def _new_figure(
    columns: int, rows: int, panel_inches: float, grid: tuple[int, int] | None = None, left_inches: float = 0.25
) -> tuple[Figure, np.ndarray]:
    """A figure of `columns x rows` panels of `panel_inches` with a `grid` of axes (default: one per panel)."""
    width, height = columns * panel_inches, rows * panel_inches
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # the Agg canvas, without pyplot's global state or backend switching
    # Fixed margins in inches (row labels on the left, titles on top), no layout engine (slow for many panels).
    gridspec = {
        "left": min(left_inches / width, 0.3),
        "right": 1 - min(0.05 / width, 0.1),
        "top": 1 - min(0.3 / height, 0.3),
        "bottom": min(0.05 / height, 0.1),
        "wspace": 0.1,
        "hspace": 0.15,
    }
    grid_rows, grid_columns = grid if grid is not None else (rows, columns)
    axes = figure.subplots(grid_rows, grid_columns, squeeze=False, gridspec_kw=gridspec)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    return figure, axes


def display_array(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] -> an array imshow can draw: [H, W] gray or [H, W, 3] RGB, min-max scaled when outside [0, 1]
    (standardized inputs)."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    if low < 0 or high > 1:
        image = (image - low) / (high - low).clamp(min=1e-12)
    array = image.numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def _show(axis: Any, image: torch.Tensor) -> None:
    array = display_array(image)
    axis.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")


def class_name(model: Any, index: int) -> str:
    """The name of class `index` in the model's `id2label`, else the index."""
    id2label = getattr(model.config, "id2label", None) or {}
    return str(id2label.get(index, index))


def _require_decoder(model: Any, figure: str) -> None:
    if getattr(model, "decoder", None) is None:
        raise ValueError(f"the {figure} figure needs a model with a reconstruction decoder (config.use_decoder=True)")


def _one_hot(classes: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, num_classes).to(dtype)


@torch.no_grad()
def plot_reconstructions(
    model: Any,
    pixel_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    panel_inches: float = DEFAULT_PANEL_INCHES,
) -> Figure:
    """Inputs `[B, C, H, W]` (top row) above their reconstructions from the predicted class's capsule (bottom row).
    Titles give the label `l` (when `labels` `[B]` is given) and the prediction `p`. Figure: B x 2 panels."""
    _require_decoder(model, "reconstructions")
    output = model(pixel_values)
    predicted = output.capsule_lengths.argmax(-1)
    mask = _one_hot(predicted, output.capsule_lengths.shape[-1], output.capsule_poses.dtype)
    reconstructions = model.reconstruct(output.capsule_poses, mask)
    figure, axes = _new_figure(pixel_values.shape[0], 2, panel_inches)
    for column in range(pixel_values.shape[0]):
        _show(axes[0, column], pixel_values[column])
        _show(axes[1, column], reconstructions[column])
        title = f"p={class_name(model, int(predicted[column]))}"
        if labels is not None:
            title = f"l={class_name(model, int(labels[column]))} {title}"
        axes[0, column].set_title(title, fontsize=7)
    axes[0, 0].set_ylabel("input", fontsize=7)
    axes[1, 0].set_ylabel("reconstruction", fontsize=7)
    return figure


@torch.no_grad()
def perturbed_reconstructions(
    model: Any,
    pixel_values: torch.Tensor,
    steps: Sequence[float] = PERTURBATION_STEPS,
    class_index: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(images `[D, S, C, H, W]`, class): image `[d, s]` decodes the capsule of the predicted class (or
    `class_index`) of one image `[1, C, H, W]` with `steps[s]` added to its dimension d (paper, Section 5.1)."""
    _require_decoder(model, "perturbation")
    if pixel_values.dim() == 3:
        pixel_values = pixel_values[None]
    if pixel_values.shape[0] != 1:
        raise ValueError(f"the perturbation figure takes one image, got a batch of {pixel_values.shape[0]}")
    output = model(pixel_values)
    num_classes, capsule_dim = output.capsule_poses.shape[-2:]
    target = int(output.capsule_lengths.argmax(-1)) if class_index is None else int(class_index)
    if not 0 <= target < num_classes:
        raise ValueError(f"class_index must lie in [0, {num_classes}), got {class_index}")
    deltas = torch.tensor(list(steps), dtype=output.capsule_poses.dtype, device=output.capsule_poses.device)
    # [D, S, J, K]: copy (d, s) of the poses has deltas[s] added to dimension d of the target capsule.
    poses = output.capsule_poses[0].expand(capsule_dim, len(steps), num_classes, capsule_dim).clone()
    dimension = torch.arange(capsule_dim, device=poses.device)
    poses[dimension, :, target, dimension] += deltas
    mask = torch.zeros(capsule_dim * len(steps), num_classes, dtype=poses.dtype, device=poses.device)
    mask[:, target] = 1.0
    images = model.reconstruct(poses.reshape(-1, num_classes, capsule_dim), mask)
    return images.reshape(capsule_dim, len(steps), *images.shape[1:]), target


def plot_perturbations(
    model: Any,
    pixel_values: torch.Tensor,
    steps: Sequence[float] = PERTURBATION_STEPS,
    class_index: int | None = None,
    panel_inches: float = DEFAULT_PANEL_INCHES,
) -> Figure:
    """Dimension perturbations (paper, Figure 4) of one image `[1, C, H, W]`: row d shows
    [`perturbed_reconstructions`] of dimension d, one column per step, drawn as one mosaic (one axes: fast).
    Figure: len(steps) x capsule_dim panels."""
    images, target = perturbed_reconstructions(model, pixel_values, steps, class_index)
    rows, columns = images.shape[:2]
    tiles = [[display_array(images[row, column]) for column in range(columns)] for row in range(rows)]
    height, width = tiles[0][0].shape[:2]
    gap = max(1, height // 10)
    mosaic = np.ones(((height + gap) * rows - gap, (width + gap) * columns - gap, *tiles[0][0].shape[2:]))
    for row in range(rows):
        for column in range(columns):
            top, left = row * (height + gap), column * (width + gap)
            mosaic[top : top + height, left : left + width] = tiles[row][column]
    figure, axes = _new_figure(columns, rows, panel_inches, grid=(1, 1), left_inches=0.45)
    axis = axes[0, 0]
    axis.imshow(mosaic, cmap="gray" if mosaic.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.set_xticks([column * (width + gap) + (width - 1) / 2 for column in range(columns)])
    axis.set_xticklabels([f"{delta:+.2f}" for delta in steps], fontsize=7)
    axis.xaxis.tick_top()
    axis.set_yticks([row * (height + gap) + (height - 1) / 2 for row in range(rows)])
    axis.set_yticklabels([f"dim {row}" for row in range(rows)], fontsize=7)
    axis.tick_params(length=0)
    axis.set_title(f"class {class_name(model, target)}", fontsize=8)
    return figure


@torch.no_grad()
def plot_multimnist(
    model: Any,
    pixel_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    panel_inches: float = DEFAULT_PANEL_INCHES,
) -> Figure:
    """MultiMNIST inputs `[B, 1, H, W]` (top row) above the reconstructions of their two highest-scoring classes,
    the lower class in red and the higher in green (paper, Figure 5). Titles give the labels `L` (two-hot `[B, J]`
    or class pairs `[B, 2]`, optional) and the two predicted classes `R`. Figure: B x 2 panels."""
    _require_decoder(model, "multimnist")
    output = model(pixel_values)
    num_classes = output.capsule_lengths.shape[-1]
    top_two = output.capsule_lengths.topk(2, dim=-1).indices.sort(dim=-1).values  # [B, 2]
    dtype = output.capsule_poses.dtype
    first = model.reconstruct(output.capsule_poses, _one_hot(top_two[:, 0], num_classes, dtype))
    second = model.reconstruct(output.capsule_poses, _one_hot(top_two[:, 1], num_classes, dtype))
    if labels is not None and labels.dim() == 2 and labels.shape[1] == num_classes:
        labels = (labels > 0.5).nonzero()[:, 1].reshape(-1, 2)
    figure, axes = _new_figure(pixel_values.shape[0], 2, panel_inches)
    for column in range(pixel_values.shape[0]):
        _show(axes[0, column], pixel_values[column])
        red = first[column].float().mean(0).clamp(0, 1).cpu()
        green = second[column].float().mean(0).clamp(0, 1).cpu()
        overlay = torch.stack([red, green, torch.zeros_like(red)], dim=-1).numpy()
        axes[1, column].imshow(overlay, interpolation="nearest")
        predicted = ",".join(class_name(model, int(c)) for c in top_two[column])
        title = f"R:({predicted})"
        if labels is not None:
            title = f"L:({','.join(class_name(model, int(c)) for c in labels[column])}) {title}"
        axes[0, column].set_title(title, fontsize=6)
    axes[0, 0].set_ylabel("input", fontsize=7)
    axes[1, 0].set_ylabel("red / green", fontsize=7)
    return figure


@torch.no_grad()
def routing_maps(model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps `[B, H', W']`, predicted classes `[B]`): the coupling coefficient c_ij of every primary capsule i to
    the predicted class j after the last routing iteration, averaged over the primary capsule types, on the primary
    grid (H', W') (capsule index i = type * H' * W' + y * W' + x). An ensemble's maps are averaged over members."""
    output = model(pixel_values, output_routing_weights=True)
    weights = output.routing_weights  # [B, I, J] or [B, M, I, J]
    if weights.dim() == 4:
        weights = weights.mean(1)
    predicted = output.capsule_lengths.argmax(-1)
    coupling = weights.gather(2, predicted[:, None, None].expand(-1, weights.shape[1], 1))[..., 0]  # [B, I]
    height, width = model.config.primary_grid_size
    maps = coupling.reshape(coupling.shape[0], model.config.primary_capsule_types, height, width).mean(1)
    return maps, predicted


@torch.no_grad()
def plot_routing(model: Any, pixel_values: torch.Tensor, panel_inches: float = DEFAULT_PANEL_INCHES) -> Figure:
    """Inputs `[B, C, H, W]` (top row) above their routing maps (see [`routing_maps`]; one colour scale per map,
    1/J is uniform routing). Figure: B x 2 panels."""
    maps, predicted = routing_maps(model, pixel_values)
    figure, axes = _new_figure(pixel_values.shape[0], 2, panel_inches)
    for column in range(pixel_values.shape[0]):
        _show(axes[0, column], pixel_values[column])
        axes[0, column].set_title(f"p={class_name(model, int(predicted[column]))}", fontsize=7)
        image = axes[1, column].imshow(maps[column].float().cpu().numpy(), cmap="viridis", interpolation="nearest")
        colorbar = figure.colorbar(image, ax=axes[1, column], fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=5)
        colorbar.ax.locator_params(nbins=3)
    axes[0, 0].set_ylabel("input", fontsize=7)
    axes[1, 0].set_ylabel("c_ij to p", fontsize=7)
    return figure


def save_png(figure: Figure, path: str | os.PathLike, dpi: int = DEFAULT_DPI) -> str:
    """Write `figure` as a PNG at `path` (written aside, then renamed into place)."""
    with write_aside(path) as partial:
        figure.savefig(partial, format="png", dpi=dpi)
    return os.fspath(path)
