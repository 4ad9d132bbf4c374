"""The output folder of a training run: its checkpoints (`save_state` + the loop's position) and the checks that
keep a new run from mixing with an earlier one."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from ..cli import LOCK_FILE, UsageError

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
BEST_MODEL_DIR = "best_model"
TRAINING_STATE_FILE = "training_state.json"
LOG_FILE = "training_log.jsonl"
TRACKER_PROJECT = "capsnet"
# Files of an output folder that are not published with the model.
NOT_PUBLISHED = (f"{CHECKPOINT_DIR}/*", f"{TRACKER_PROJECT}/*", LOG_FILE, LOCK_FILE)


def check_output_dir(output_dir: str, config: Any, overwrite: bool, resuming: bool) -> None:
    """Refuse an output folder that holds a different model (not a CapsNet of the same architecture), or checkpoints
    of an earlier run that a new run would mix with its own (resume it, or pass --overwrite_output_dir)."""
    if overwrite or resuming:
        return
    if list_checkpoints(output_dir):
        raise UsageError(
            f"--output_dir {output_dir!r} holds checkpoints of an earlier run: continue it with "
            "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start afresh"
        )
    path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        existing = json.load(handle)
    new = config.to_dict()
    existing["num_labels"], new["num_labels"] = len(existing.get("id2label", {})), len(new["id2label"])
    keys = (
        "model_type",
        "num_channels",
        "image_size",
        "num_labels",
        "conv1_channels",
        "primary_capsule_types",
        "primary_capsule_dim",
        "capsule_dim",
        "padding",
        "use_decoder",
        "num_ensemble_members",
    )
    different = [key for key in keys if existing.get(key) != new.get(key)]
    if different:
        raise UsageError(
            f"--output_dir {output_dir!r} holds a different model ({', '.join(different)} differ); "
            "choose another folder or pass --overwrite_output_dir"
        )


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints `output_dir/checkpoints/step_N`, oldest first."""
    folder = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    steps = [name for name in os.listdir(folder) if name.startswith(CHECKPOINT_PREFIX) and name[5:].isdigit()]
    return [os.path.join(folder, name) for name in sorted(steps, key=lambda name: int(name[5:]))]


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict[str, Any], total_limit: int | None) -> None:
    """`save_state` into a temporary folder renamed to `checkpoints/step_N` when complete (a run killed meanwhile
    leaves no half checkpoint), plus the loop's position and best metrics; keep the newest `total_limit`."""
    final = os.path.join(output_dir, CHECKPOINT_DIR, f"{CHECKPOINT_PREFIX}{step}")
    partial = os.path.join(output_dir, CHECKPOINT_DIR, f".partial_{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.isdir(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, TRAINING_STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str:
    if resume_from_checkpoint != "latest":
        if not os.path.exists(resume_from_checkpoint):
            raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist")
        if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINING_STATE_FILE)):
            raise UsageError(
                f"{resume_from_checkpoint!r} is not a checkpoint of capsnet-train (no {TRAINING_STATE_FILE})"
            )
        return resume_from_checkpoint
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise UsageError(
            f"--resume_from_checkpoint latest: no checkpoint in {os.path.join(output_dir, CHECKPOINT_DIR)!r}"
        )
    return checkpoints[-1]
