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
`capsnet-visualize` ([`main`]) draws them for a saved model and a `datasets` image data set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .cli import DataError, usual_file_mode
from .data.loading import IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, detect_column

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


def _display(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] -> an array imshow can draw: [H, W] gray or [H, W, 3] RGB, min-max scaled when outside [0, 1]
    (standardized inputs)."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    if low < 0 or high > 1:
        image = (image - low) / (high - low).clamp(min=1e-12)
    array = image.numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def _show(axis: Any, image: torch.Tensor) -> None:
    array = _display(image)
    axis.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")


def _class_name(model: Any, index: int) -> str:
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
        title = f"p={_class_name(model, int(predicted[column]))}"
        if labels is not None:
            title = f"l={_class_name(model, int(labels[column]))} {title}"
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
    tiles = [[_display(images[row, column]) for column in range(columns)] for row in range(rows)]
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
    axis.set_title(f"class {_class_name(model, target)}", fontsize=8)
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
        predicted = ",".join(_class_name(model, int(c)) for c in top_two[column])
        title = f"R:({predicted})"
        if labels is not None:
            title = f"L:({','.join(_class_name(model, int(c)) for c in labels[column])}) {title}"
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
        axes[0, column].set_title(f"p={_class_name(model, int(predicted[column]))}", fontsize=7)
        image = axes[1, column].imshow(maps[column].float().cpu().numpy(), cmap="viridis", interpolation="nearest")
        colorbar = figure.colorbar(image, ax=axes[1, column], fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=5)
        colorbar.ax.locator_params(nbins=3)
    axes[0, 0].set_ylabel("input", fontsize=7)
    axes[1, 0].set_ylabel("c_ij to p", fontsize=7)
    return figure


def save_png(figure: Figure, path: str | os.PathLike, dpi: int = DEFAULT_DPI) -> str:
    """Write `figure` as a PNG at `path` (via a temporary file renamed into place)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", dpi=dpi)
        os.chmod(temporary, usual_file_mode())  # mkstemp creates 0600
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsnet-visualize",
        description="Draw the paper's figures (reconstructions, dimension perturbations, MultiMNIST overlays, "
        "routing maps) for a saved CapsNet model, as PNG files.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="saved model folder or Hub id")
    parser.add_argument("--dataset_name", default="mnist", help="datasets.load_dataset name or local folder")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--image_column_name", default=None, help="default: detected ('image' or 'img')")
    parser.add_argument("--label_column_name", default=None, help="default: detected ('label' or 'labels'; optional)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--num_examples", type=int, default=8, help="examples (columns) per figure")
    parser.add_argument("--example_offset", type=int, default=0, help="index of the first data-set example used")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated MultiMNIST pairs")
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI)
    parser.add_argument("--panel_inches", type=float, default=DEFAULT_PANEL_INCHES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def _load_examples(args: argparse.Namespace) -> tuple[list[Any], torch.Tensor | None]:
    import datasets

    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split)
    except Exception as error:  # datasets raises many types for unknown names/splits
        raise SystemExit(f"error: cannot load split {args.split!r} of {args.dataset_name!r}: {error}") from error
    columns = dataset.column_names
    has_labels = args.label_column_name is not None or any(name in columns for name in LABEL_COLUMN_CANDIDATES)
    try:
        image_column = detect_column(columns, IMAGE_COLUMN_CANDIDATES, args.image_column_name, "image")
        label_column = (
            detect_column(columns, LABEL_COLUMN_CANDIDATES, args.label_column_name, "label") if has_labels else None
        )
    except DataError as error:
        raise SystemExit(f"error: {error}") from error
    end = min(args.example_offset + args.num_examples, len(dataset))
    if args.example_offset < 0 or args.example_offset >= end:
        raise SystemExit(f"error: --example_offset {args.example_offset} is outside the {len(dataset)} examples")
    subset = dataset.select(range(args.example_offset, end))
    labels = torch.as_tensor(subset[label_column], dtype=torch.int64) if label_column else None
    return list(subset[image_column]), labels


def _processor(model: Any, args: argparse.Namespace) -> Any:
    from .image_processing_capsnet import CapsNetImageProcessor

    if os.path.isfile(os.path.join(args.model_name_or_path, "preprocessor_config.json")):
        return CapsNetImageProcessor.from_pretrained(args.model_name_or_path)
    return CapsNetImageProcessor.from_model_config(model.config, resize_mode="crop_or_pad")


def _multimnist_inputs(
    model: Any, images: list[Any], labels: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiMNIST pairs of the loaded digits on the model's canvas (36x36 for the paper's model)."""
    from .data.paper_datasets import MNIST_SIZE, MultiMNIST

    height, width = model.config.image_size
    if height != width or height < MNIST_SIZE or (height - MNIST_SIZE) % 2 or model.config.num_channels != 1:
        raise SystemExit(
            f"error: the multimnist figure needs a 1-channel model with a square input of 28 + 2 x shift pixels "
            f"(36 for the paper's MultiMNIST model), got {model.config.num_channels}x{height}x{width}"
        )
    if labels is None:
        raise SystemExit("error: the multimnist figure needs a label column (partners must be of another class)")
    digits = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in images])
    if digits.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise SystemExit(f"error: the multimnist figure needs 28x28 digits, got {digits.shape[1:]}")
    generator = MultiMNIST(digits, labels, 1, seed=seed, max_shift=(height - MNIST_SIZE) // 2)
    batch = generator.batch(range(len(generator)))
    return batch["pixel_values"], batch["labels"]


def main(argv: Sequence[str] | None = None) -> int:
    """`capsnet-visualize`: write `<figure>.png` for each figure asked for into `--output_dir`."""
    args = build_parser().parse_args(argv)
    if args.num_examples < 1:
        raise SystemExit("error: --num_examples must be >= 1")
    from transformers import AutoModelForImageClassification

    import capsnet_hf  # noqa: F401  (registers CapsNet with the Auto classes)

    try:
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load a model from {args.model_name_or_path!r}: {error}") from error
    model = model.to(args.device).eval()
    if "routing" in args.figures and not hasattr(model.config, "primary_grid_size"):
        raise SystemExit("error: the routing figure needs a CapsNet model")
    if any(name != "routing" for name in args.figures) and getattr(model, "decoder", None) is None:
        raise SystemExit("error: this model has no decoder: only --figures routing can be drawn")

    images, labels = _load_examples(args)
    pixel_values = None
    if any(name != "multimnist" for name in args.figures):
        pixel_values = _processor(model, args)(images, return_tensors="pt")["pixel_values"].to(args.device)

    figures = {}
    for name in args.figures:
        if name == "reconstructions":
            figures[name] = plot_reconstructions(model, pixel_values, labels, args.panel_inches)
        elif name == "perturbation":
            figures[name] = plot_perturbations(model, pixel_values[:1], panel_inches=args.panel_inches)
        elif name == "multimnist":
            pairs, pair_labels = _multimnist_inputs(model, images, labels, args.seed)
            figures[name] = plot_multimnist(model, pairs.to(args.device), pair_labels, args.panel_inches)
        else:
            figures[name] = plot_routing(model, pixel_values, args.panel_inches)

    os.makedirs(args.output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".capsnet-visualize-", dir=args.output_dir)
    try:
        written = [
            save_png(figure, os.path.join(staging, f"{name}.png"), args.dpi) for name, figure in figures.items()
        ]
        for path in written:
            os.replace(path, os.path.join(args.output_dir, os.path.basename(path)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in figures:
        print(os.path.join(args.output_dir, f"{name}.png"))
    return 0


__all__ = [
    "FIGURES",
    "PERTURBATION_STEPS",
    "main",
    "plot_multimnist",
    "plot_perturbations",
    "plot_reconstructions",
    "plot_routing",
    "perturbed_reconstructions",
    "routing_maps",
    "save_png",
]


if __name__ == "__main__":
    raise SystemExit(main())
