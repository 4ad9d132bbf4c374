"""`capsnet-visualize`: the paper's figures (capsnet_hf.paper.figures) for a saved model and a `datasets` image
data set, as PNG files in `--output_dir`.

    capsnet-visualize --model_name_or_path capsnet-mnist --dataset_name ylecun/mnist --output_dir figures
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .cli import DataError, UsageError, load_model_and_processor, positive_int, run_command, write_aside
from .data.loading import IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, detect_column
from .paper.figures import (
    DEFAULT_DPI,
    DEFAULT_PANEL_INCHES,
    FIGURES,
    plot_multimnist,
    plot_perturbations,
    plot_reconstructions,
    plot_routing,
    save_png,
)


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
    parser.add_argument("--num_examples", type=positive_int, default=8, help="examples (columns) per figure")
    parser.add_argument("--example_offset", type=int, default=0, help="index of the first data-set example used")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated MultiMNIST pairs")
    parser.add_argument("--dpi", type=positive_int, default=DEFAULT_DPI)
    parser.add_argument("--panel_inches", type=float, default=DEFAULT_PANEL_INCHES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser


def _load_examples(args: argparse.Namespace) -> tuple[list[Any], torch.Tensor | None]:
    """The PIL images (and labels, when the data set has them) of the examples the figures show."""
    import datasets

    try:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split)
    except Exception as error:  # datasets raises many types for unknown names/splits
        raise DataError(f"cannot load split {args.split!r} of {args.dataset_name!r}: {error}") from error
    columns = dataset.column_names
    has_labels = args.label_column_name is not None or any(name in columns for name in LABEL_COLUMN_CANDIDATES)
    image_column = detect_column(columns, IMAGE_COLUMN_CANDIDATES, args.image_column_name, "image")
    label_column = (
        detect_column(columns, LABEL_COLUMN_CANDIDATES, args.label_column_name, "label") if has_labels else None
    )
    end = min(args.example_offset + args.num_examples, len(dataset))
    if args.example_offset < 0 or args.example_offset >= end:
        raise DataError(f"--example_offset {args.example_offset} is outside the {len(dataset)} examples")
    subset = dataset.select(range(args.example_offset, end))
    labels = torch.as_tensor(subset[label_column], dtype=torch.int64) if label_column else None
    images = []
    for row in range(len(subset)):
        try:
            images.append(subset[row][image_column])
        except Exception as error:  # PIL and datasets raise many types for one corrupt image
            where = f"row {args.example_offset + row} of split {args.split!r} of {args.dataset_name!r}"
            raise DataError(f"cannot decode the image in {where}: {error}") from error
    return images, labels


def _multimnist_inputs(
    model: Any, images: list[Any], labels: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiMNIST pairs of the loaded digits on the model's canvas (36x36 for the paper's model)."""
    from .data.paper_datasets import MNIST_SIZE, MultiMNIST

    height, width = model.config.image_size
    if height != width or height < MNIST_SIZE or (height - MNIST_SIZE) % 2 or model.config.num_channels != 1:
        raise UsageError(
            f"the multimnist figure needs a 1-channel model with a square input of 28 + 2 x shift pixels "
            f"(36 for the paper's MultiMNIST model), got {model.config.num_channels}x{height}x{width}"
        )
    if labels is None:
        raise UsageError("the multimnist figure needs a label column (partners must be of another class)")
    digits = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in images])
    if digits.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise UsageError(f"the multimnist figure needs 28x28 digits, got {digits.shape[1:]}")
    generator = MultiMNIST(digits, labels, 1, seed=seed, max_shift=(height - MNIST_SIZE) // 2)
    batch = generator.batch(range(len(generator)))
    return batch["pixel_values"], batch["labels"]


def visualize(argv: Sequence[str] | None = None) -> list[str]:
    """Parse `argv`, draw the figures and write them (all or none) into `--output_dir`; returns their paths."""
    args = build_parser().parse_args(argv)
    model, processor = load_model_and_processor(args.model_name_or_path, args.trust_remote_code)
    model = model.to(args.device).eval()
    if "routing" in args.figures and not hasattr(model.config, "primary_grid_size"):
        raise UsageError("the routing figure needs a CapsNet model")
    if any(name != "routing" for name in args.figures) and getattr(model, "decoder", None) is None:
        raise UsageError("this model has no decoder: only --figures routing can be drawn")

    images, labels = _load_examples(args)
    pixel_values = None
    if any(name != "multimnist" for name in args.figures):
        try:
            pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(args.device)
        except ValueError as error:
            raise DataError(f"cannot preprocess the images of {args.dataset_name!r}: {error}") from error

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

    with write_aside(args.output_dir, folder=True) as partial:
        for name, figure in figures.items():
            save_png(figure, os.path.join(partial, f"{name}.png"), args.dpi)
    written = [os.path.join(args.output_dir, f"{name}.png") for name in figures]
    print("\n".join(written))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-visualize`): 0 on success, 2 with a one-line message on bad input."""
    return run_command("capsnet-visualize", visualize, argv)


if __name__ == "__main__":
    raise SystemExit(main())
