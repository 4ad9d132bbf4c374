"""The final model folder of `capsnet-train`: weights, image processor, results, figure and model card."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..cli import write_aside
from .checkpoints import BEST_MODEL_DIR, CHECKPOINT_DIR


def save_best_model(accelerator, model, output_dir: str) -> None:
    """`save_pretrained` of the current weights into `checkpoints/best_model` (written aside, then renamed)."""
    if accelerator.is_main_process:
        with write_aside(os.path.join(output_dir, CHECKPOINT_DIR, BEST_MODEL_DIR), folder=True) as partial:
            accelerator.unwrap_model(model).save_pretrained(partial)


@dataclass
class TrainingRecord:
    """What the model folder reports about a finished run: the command, results and schedule."""

    command: str
    train_results: dict[str, Any]
    eval_results: dict[str, Any]
    num_train_examples: int
    steps_per_epoch: int
    max_train_steps: int


def save_model_folder(args, model, processor, record: TrainingRecord, eval_data, eval_transform) -> None:
    """Model (safetensors), image processor, results, reconstruction figure and model card into `--output_dir`,
    written aside and moved in with `config.json` last (`cli.write_aside`); checkpoints and logs stay."""
    from ..hub import render_trained_model_card

    with write_aside(args.output_dir, folder=True) as partial:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        for name, values in (("train_results.json", record.train_results), ("eval_results.json", record.eval_results)):
            with open(os.path.join(partial, name), "w", encoding="utf-8") as handle:
                json.dump(values, handle, indent=2)
        figure = None
        if getattr(model.config, "use_decoder", False):
            figure = "reconstructions.png"
            save_reconstruction_figure(model, eval_data, eval_transform, os.path.join(partial, figure))
        if args.model_type == "baseline_cnn":
            write_baseline_card(
                os.path.join(partial, "README.md"), args, record.command, record.train_results, record.eval_results
            )
            return
        card = render_trained_model_card(
            args={**vars(args), "command": record.command},
            config=model.config,
            train_results=record.train_results,
            eval_results=record.eval_results,
            num_train_examples=record.num_train_examples,
            steps_per_epoch=record.steps_per_epoch,
            max_train_steps=record.max_train_steps,
            figure=figure,
        )
        card.save(os.path.join(partial, "README.md"))


def write_baseline_card(path: str, args, command: str, train_results: dict[str, Any], eval_results: dict[str, Any]):
    """A short model card for the paper's baseline CNN (no capsules: no routing or reconstruction sections), with the
    Hub metadata of the CapsNet cards (library, pipeline, license, data set)."""
    from huggingface_hub import ModelCardData

    from ..hub import hub_dataset_id

    dataset_id = hub_dataset_id(vars(args))
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=args.license or "apache-2.0",
        datasets=[dataset_id] if dataset_id else None,
        tags=["image-classification", "capsnet-baseline"],
        metrics=["accuracy"],
    )
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        '# Baseline CNN of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017)',
        "",
        "Three 5x5 ReLU convolutions (256, 256, 128), FC 328, FC 192, dropout, softmax (`capsnet_hf.paper.baseline_cnn`).",
        "Load with `import capsnet_hf` and `AutoModelForImageClassification.from_pretrained`.",
        "",
        f"Trained with `{command}`: {train_results['train_steps']} steps, {train_results['train_examples_seen']} "
        f"examples ({train_results['epochs']:.3f} epochs) in {train_results['train_runtime_seconds']:.0f} s on "
        f"{train_results['device']}.",
        "",
        f"Evaluation ({eval_results.get('eval_split')} split, {eval_results['eval_num_examples']} examples): "
        f"accuracy {eval_results['eval_accuracy']:.4f}.",
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


@torch.no_grad()
def save_reconstruction_figure(model, eval_data, eval_transform, path: str, count: int = 8) -> None:
    """The first `count` test images (top) and their reconstructions (bottom) as a PNG (`capsnet_hf.visualize`)."""
    from ..paper import figures

    batch = eval_data.batch(torch.arange(min(count, len(eval_data))))
    pixel_values = eval_transform(batch["pixel_values"]).to(model.device)
    model.eval()
    multi_hot = batch["labels"].dim() == 2
    plot = figures.plot_multimnist if multi_hot else figures.plot_reconstructions
    figure = plot(model, pixel_values, batch["labels"].cpu())
    figure.savefig(path, dpi=100)
