"""Training recipes that reproduce the official CapsNet training, and YAML/JSON config files.

Precedence, lowest first: the argument parser's defaults, `--recipe`, `--config_file`, the command line. A recipe has
two sections of argument values (names as on the command line, without dashes): `model`, CapsNetConfig options (each
a flag of the same name), and `training`, the other flags. A config file has the same two sections, or is one flat
mapping of argument values.
"""

from __future__ import annotations

import json
import os
from typing import Any

# The official code's training ("Dynamic Routing Between Capsules", Sarasra/models research/capsules): Adam with
# lr 1e-3 * 0.96^(step / 2000) (continuous) floored at 1e-6, batch 128; MNIST: 300k steps (= 640 epochs of 60k),
# shifts of up to 2 px with zero padding, decoder with weight 0.0005; CIFAR-10: 600k steps (= 1536 epochs of 50k),
# random 24x24 crop, flip, brightness (63) and contrast (0.2..1.8), per-image standardization, 64 primary capsule
# types, SAME padding, leaky routing, no decoder.
_OPTIMIZER = {
    "learning_rate": 1e-3,
    "lr_decay_rate": 0.96,
    "lr_decay_steps": 2000,
    "min_learning_rate": 1e-6,
    "per_device_train_batch_size": 128,
}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "mnist": {
        "model": {
            "routing_iterations": 3,
            "reconstruction_loss_weight": 0.0005,
            "use_decoder": True,
            "primary_capsule_types": 32,
            "padding": "valid",
            "leaky_routing": False,
        },
        "training": {**_OPTIMIZER, "num_train_epochs": 640, "augmentation": "shift", "max_shift": 2},
    },
    # The MNIST recipe for short budgets (docs/results.md: learning curves): Eq. 4 summed over classes as in the
    # paper, and the learning rate decayed 0.9x per epoch of 60k at batch 128 (as the public PyTorch re-implementations
    # do) instead of 0.96x per 4.3 epochs.
    "mnist_fast": {
        "model": {
            "routing_iterations": 3,
            "reconstruction_loss_weight": 0.0005,
            "margin_loss_reduction": "paper",
            "use_decoder": True,
            "primary_capsule_types": 32,
            "padding": "valid",
            "leaky_routing": False,
        },
        "training": {
            **_OPTIMIZER,
            "num_train_epochs": 50,
            "lr_decay_rate": 0.9,
            "lr_decay_steps": 469,
            "augmentation": "shift",
            "max_shift": 2,
        },
    },
    "cifar10": {
        "model": {
            "routing_iterations": 3,
            "primary_capsule_types": 64,
            "padding": "same",
            "leaky_routing": True,
            "use_decoder": False,
        },
        "training": {
            **_OPTIMIZER,
            "num_train_epochs": 1536,
            "augmentation": "cifar",
            "image_size": [24, 24],  # the preprocessing's output, hence the model's input
            "resize_mode": "crop_or_pad",
            "do_standardize": True,
            "max_brightness_delta": 63.0,
            "contrast_range": [0.2, 1.8],
        },
    },
}
SECTIONS = ("model", "training")
# What each recipe is, in the words of the model card it trains ("The `--recipe mnist` preset is ...").
RECIPE_DESCRIPTIONS = {
    "mnist": "the official TensorFlow training code released with the paper",
    "mnist_fast": (
        "the official MNIST training changed for short budgets (Eq. 4 at the paper's scale, the learning rate decayed "
        "0.9x per epoch)"
    ),
    "cifar10": "the official TensorFlow training code released with the paper (one model of its CIFAR-10 ensemble)",
}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a `.yaml`/`.yml` or `.json` file, keys as argument names (no dashes): sections `model` and
    `training` like a recipe's, or the flat form."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(handle)
        elif path.endswith(".json"):
            values = json.load(handle)
        else:
            raise ValueError(f"config file {path!r} must end in .yaml, .yml or .json")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of argument names to values")
    return _argument_names(values)


def _argument_names(values: dict[str, Any]) -> dict[str, Any]:
    return {
        str(key).lstrip("-").replace("-", "_"): _argument_names(value)
        if key in SECTIONS and isinstance(value, dict)
        else value
        for key, value in values.items()
    }


def flat_values(
    values: dict[str, Any], source: str, model_flags: set[str], training_flags: set[str]
) -> dict[str, Any]:
    """The argument values of a recipe or config file (`source` names it in errors): its `model` section (model
    flags only) and `training` section (the other flags) merged, or the flat form as it is."""
    if not set(values) & set(SECTIONS):
        unknown = sorted(set(values) - model_flags - training_flags)
        if unknown:
            raise ValueError(f"{source} has unknown arguments {unknown}")
        return dict(values)
    if set(values) - set(SECTIONS) or not all(isinstance(section, dict) for section in values.values()):
        raise ValueError(
            f"{source} mixes sections with other keys: put CapsNetConfig options under 'model:' and the other "
            f"arguments under 'training:' (or write every argument at the top level), got keys {sorted(values)}"
        )
    flat: dict[str, Any] = {}
    for section, allowed, other in (("model", model_flags, training_flags), ("training", training_flags, model_flags)):
        names = set(values.get(section, {}))
        misplaced, unknown = sorted(names & other), sorted(names - allowed - other)
        if misplaced:
            place = "training" if section == "model" else "model"
            raise ValueError(f"{source}: {misplaced} belong in the '{place}' section, not '{section}'")
        if unknown:
            raise ValueError(f"{source}: section '{section}' has unknown arguments {unknown}")
        flat.update(values.get(section, {}))
    return flat


def preset_defaults(
    recipe: str | None, config_file: str | None, model_flags: set[str], training_flags: set[str]
) -> dict[str, Any]:
    """Defaults from a recipe and a config file (the file wins), each checked against the parser's argument names:
    `model_flags` (CapsNetConfig options) and `training_flags` (the others)."""
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        values.update(flat_values(RECIPES[recipe], f"recipe {recipe!r}", model_flags, training_flags))
    if config_file is not None:
        from_file = load_config_file(config_file)
        values.update(flat_values(from_file, f"config file {config_file!r}", model_flags, training_flags))
    return values


__all__ = ["RECIPES", "SECTIONS", "flat_values", "load_config_file", "preset_defaults"]
