"""The final model folder of `capsnet-train`: weights, image processor, results, figure and model card."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from ..cli import give_usual_file_modes
from .checkpoints import BEST_MODEL_DIR, CHECKPOINT_DIR


def save_best_model(accelerator, model, output_dir: str) -> None:
    """`save_pretrained` of the current weights into `checkpoints/best_model` (written aside, then renamed)."""
    if not accelerator.is_main_process:
        return
    final = os.path.join(output_dir, CHECKPOINT_DIR, BEST_MODEL_DIR)
    partial = final + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def save_model_folder(
    args,
    command,
    model,
    processor,
    train_results,
    eval_results,
    eval_data,
    eval_transform,
    num_train_examples,
    steps_per_epoch,
    max_train_steps,
) -> None:
    """Write model (safetensors), image processor, results, reconstruction figure and model card into a temporary
    folder beside `--output_dir`, then move each file into `--output_dir` (checkpoints and logs stay)."""
    from ..hub import render_trained_model_card

    partial = os.path.join(args.output_dir, ".partial_model")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    for name, values in (("train_results.json", train_results), ("eval_results.json", eval_results)):
        with open(os.path.join(partial, name), "w", encoding="utf-8") as handle:
            json.dump(values, handle, indent=2)
    figure = None
    if getattr(model.config, "use_decoder", False):
        figure = "reconstructions.png"
        save_reconstruction_figure(model, eval_data, eval_transform, os.path.join(partial, figure))
    if args.model_type == "baseline_cnn":
        write_baseline_card(os.path.join(partial, "README.md"), command, train_results, eval_results)
    else:
        card = render_trained_model_card(
            args={**vars(args), "command": command},
            config=model.config,
            train_results=train_results,
            eval_results=eval_results,
            num_train_examples=num_train_examples,
            steps_per_epoch=steps_per_epoch,
            max_train_steps=max_train_steps,
            figure=figure,
        )
        card.save(os.path.join(partial, "README.md"))
    give_usual_file_modes(partial)
    for name in os.listdir(partial):
        target = os.path.join(args.output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(partial, name), target)
    os.rmdir(partial)


def write_baseline_card(path: str, command: str, train_results: dict[str, Any], eval_results: dict[str, Any]) -> None:
    """A short model card for the paper's baseline CNN (no capsules: no routing or reconstruction sections)."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [image-classification, capsnet-baseline]",
        "---",
        '# Baseline CNN of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017)',
        "",
        "Three 5x5 ReLU convolutions (256, 256, 128), FC 328, FC 192, dropout, softmax (`capsnet_hf.baseline_cnn`).",
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
