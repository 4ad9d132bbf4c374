"""Model cards (rendered from the Jinja templates in `model_cards/` with `huggingface_hub.ModelCard`) and publishing
a model folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import fnmatch
import os
import shlex
import sys
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

TEMPLATE_SUFFIX = ".md"


def find_template(name: str) -> Path:
    """Path of the card template `name` (e.g. "trained_capsnet"): `model_cards/` beside the package in a clone or
    editable install, else `capsnet_hf/model_cards/` shipped as package data in a wheel."""
    filename = name if name.endswith(TEMPLATE_SUFFIX) else name + TEMPLATE_SUFFIX
    candidates = [Path(__file__).resolve().parents[1] / "model_cards" / filename]
    try:
        candidates.append(Path(str(resources.files("capsnet_hf") / "model_cards" / filename)))
    except (ModuleNotFoundError, TypeError):
        pass
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"model card template {filename!r} not found (looked in {[str(c) for c in candidates]})")


def render_model_card(template_name: str, fields: Mapping[str, Any], card_data: Mapping[str, Any]):
    """A `huggingface_hub.ModelCard` from template `template_name`, its Jinja `fields` and YAML metadata
    `card_data` (keyword arguments of `ModelCardData`, e.g. license, datasets, tags, model_name, eval_results)."""
    from huggingface_hub import ModelCard, ModelCardData

    return ModelCard.from_template(
        ModelCardData(**card_data), template_path=str(find_template(template_name)), **fields
    )


def hub_dataset_id(args: Mapping[str, Any]) -> str | None:
    """The Hub id of the training data for a card's metadata: `--dataset_hub_id`, else `--dataset_name` unless it is
    a local path."""
    name = args["dataset_name"]
    local = os.path.exists(name) or name.startswith((".", "/", "~"))
    return args.get("dataset_hub_id") or (None if local else name)


def render_trained_model_card(
    args: Mapping[str, Any],
    config: Any,
    train_results: Mapping[str, Any],
    eval_results: Mapping[str, Any],
    num_train_examples: int,
    steps_per_epoch: int,
    max_train_steps: int,
    figure: str | None = None,
):
    """The card of a model trained by `capsnet-train` (template `trained_capsnet`): metadata with a model-index of
    the measured test accuracy, the recipe, the training hyperparameters, the config options that differ from the
    defaults, the results and the reconstruction figure."""
    from huggingface_hub import EvalResult

    from .configuration_capsnet import changed_options
    from .training.recipes import RECIPE_DESCRIPTIONS, RECIPES

    dataset = args["dataset_name"]
    dataset_id = hub_dataset_id(args)
    dataset_title = dataset_id or os.path.basename(os.path.normpath(dataset))
    repo_id = args.get("hub_model_id") or os.path.basename(os.path.normpath(args["output_dir"]))
    model_name = repo_id.split("/")[-1]
    accuracy = float(eval_results["eval_accuracy"])
    eval_split = eval_results.get("eval_split") or "test"
    card_data = {
        "library_name": "transformers",
        "license": args.get("license") or "apache-2.0",
        "pipeline_tag": "image-classification",
        "tags": ["capsnet", "capsule-network", "dynamic-routing", "image-classification"],
        "datasets": [dataset_id] if dataset_id else None,
        "metrics": ["accuracy"],
        "model_name": model_name,
        "eval_results": [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_id or dataset_title,
                dataset_name=dataset_title,
                dataset_split=eval_split,
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=round(accuracy, 6),
            )
        ],
    }
    per_class = eval_results.get("eval_per_class_accuracy") or {}
    hyperparameters = [
        ("optimizer", "Adam"),
        (
            "learning rate",
            f"{args['learning_rate']:g} x {args['lr_decay_rate']:g}^(step / {args['lr_decay_steps']}), "
            f"floored at {args['min_learning_rate']:g}",
        ),
        ("batch size per device", args["per_device_train_batch_size"]),
        ("gradient accumulation steps", args["gradient_accumulation_steps"]),
        ("processes", train_results.get("num_processes", 1)),
        ("steps per epoch", steps_per_epoch),
        ("training steps", max_train_steps),
        ("augmentation", _augmentation_text(args)),
        ("preprocessing", "per-image standardization" if args.get("do_standardize") else "rescale to [0, 1]"),
        ("mixed precision", args.get("mixed_precision") or "no"),
        ("seed", args["seed"]),
    ]
    default = type(config)()
    changed = [(name, value, getattr(default, name)) for name, value in changed_options(config).items()]
    loss = eval_results.get("eval_loss")
    fields = {
        "model_name": model_name,
        "repo_id": repo_id,
        "dataset_title": dataset_title,
        "num_train_examples": num_train_examples,
        "max_train_samples": args.get("max_train_samples"),
        "num_channels": config.num_channels,
        "image_height": config.image_size[0],
        "image_width": config.image_size[1],
        "num_labels": config.num_labels,
        "class_names": ", ".join(str(config.id2label[i]) for i in range(config.num_labels)),
        "eval_split": eval_split,
        "eval_num_examples": eval_results.get("eval_num_examples"),
        "eval_accuracy": accuracy,
        "eval_error_percent": float(eval_results["eval_error_percent"]),
        "eval_loss_text": f"{loss:.5f}" if loss is not None else "-",
        "best_step": train_results.get("best_step"),
        "per_class_rows": [(name, "-" if value is None else f"{value:.4f}") for name, value in per_class.items()],
        "figure": figure,
        "command": args.get("command") or "capsnet-train " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "hyperparameters": hyperparameters,
        "changed_options": changed,
        "train_steps": train_results["train_steps"],
        "epochs": train_results["epochs"],
        "train_examples_seen": train_results["train_examples_seen"],
        "train_runtime_seconds": train_results["train_runtime_seconds"],
        "num_processes": train_results.get("num_processes", 1),
        "device": train_results.get("device", "cpu"),
        "recipe": args.get("recipe"),
        "recipe_description": RECIPE_DESCRIPTIONS.get(args.get("recipe")),
        "recipe_epochs": RECIPES[args["recipe"]]["training"]["num_train_epochs"] if args.get("recipe") else None,
    }
    return render_model_card("trained_capsnet", fields, card_data)


def _augmentation_text(args: Mapping[str, Any]) -> str:
    if args.get("augmentation") == "shift":
        return f"random shift up to {args['max_shift']} px (zero padding)"
    if args.get("augmentation") == "cifar":
        low, high = args["contrast_range"]
        return (
            f"random crop, horizontal flip, brightness +-{args['max_brightness_delta']:g}, contrast {low:g}..{high:g}"
        )
    return "none"


def folder_files(folder: str | os.PathLike, ignore_patterns: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the files under `folder`, sorted, minus those matching `ignore_patterns`."""
    root = Path(folder)
    files = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in ignore_patterns):
            if not any(part.startswith(".") for part in Path(relative).parts):
                files.append(relative)
    return files


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    commit_message: str = "Upload CapsNet",
    token: str | None = None,
    ignore_patterns: Iterable[str] = (),
):
    """Create the model repository `repo_id` (if needed) and upload every file of `folder` (hidden files and
    `ignore_patterns` excepted) in ONE commit. Returns the `CommitInfo` of `HfApi.create_commit`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    files = folder_files(folder, ignore_patterns)
    if not files:
        raise ValueError(f"nothing to upload: {os.fspath(folder)!r} holds no files")
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=relative, path_or_fileobj=os.path.join(os.fspath(folder), relative))
        for relative in files
    ]
    return api.create_commit(repo_id=repo_id, repo_type="model", operations=operations, commit_message=commit_message)


__all__ = ["find_template", "folder_files", "push_folder_to_hub", "render_model_card", "render_trained_model_card"]
