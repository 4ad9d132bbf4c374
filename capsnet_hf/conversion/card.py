"""The model card of a converted folder (model_cards/converted_official.md): provenance, command, measured parity."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..configuration_capsnet import CapsNetConfig
from ..hub import render_model_card
from .checkpoint_paths import display_checkpoint
from .geometry import PRESETS
from .parity import PARITY_IMAGES
from .tf_checkpoint import TFCheckpointReader

OFFICIAL_REPOSITORY = "https://github.com/Sarasra/models/tree/master/research/capsules"
CARD_TEMPLATE = "converted_official"
CARD_TAGS = ["capsnet", "capsule-network", "dynamic-routing", "converted-from-tensorflow"]


@dataclass(frozen=True)
class ConversionRequest:
    """The conversion as the user asked for it: what the card's command line repeats (no local directories)."""

    checkpoint: str
    dataset: str | None  # None: inferred
    image_size: int | None  # None: inferred
    model_id: str

    def command(self, num_members: int) -> str:
        args = ["python", "conversion/convert_official_tf_checkpoint.py", "--checkpoint"]
        args.append(display_checkpoint(self.checkpoint))
        if num_members > 1:
            args += ["--num_trials", str(num_members)]
        if self.dataset is not None:
            args += ["--dataset", self.dataset]
        if self.image_size is not None:
            args += ["--image_size", str(self.image_size)]
        return shlex.join(args + ["--output_dir", Path(self.model_id).name])


def write_model_card(
    folder: Path,
    request: ConversionRequest,
    readers: list[TFCheckpointReader],
    config: CapsNetConfig,
    dataset: str,
    num_parameters: int,
    parity: dict[str, float],
) -> None:
    """Render the card into `folder/README.md`; each member is named and identified by its index file's SHA-256."""
    preset = PRESETS[dataset]
    checkpoint = display_checkpoint(request.checkpoint)
    members = [
        {"name": checkpoint.replace("{}", str(trial)), "sha256": hashlib.sha256(reader.index_path.read_bytes()).hexdigest()}
        for trial, reader in enumerate(readers)
    ]  # fmt: skip
    fields = {
        "model_id": request.model_id,
        "dataset": dataset,
        "dataset_title": preset.title,
        "original_repository": OFFICIAL_REPOSITORY,
        "archive": preset.archive,
        "checkpoint": checkpoint,
        "members": members,
        "num_members": len(readers),
        "command": request.command(len(readers)),
        "parity": parity,
        "parity_images": PARITY_IMAGES,
        "config": config,
        "num_parameters": num_parameters,
        "preprocessing": preset.preprocessing(config),
    }
    card_data = {
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "datasets": [preset.hub_dataset],
        "tags": CARD_TAGS,
    }
    render_model_card(CARD_TEMPLATE, fields, card_data).save(folder / "README.md")
