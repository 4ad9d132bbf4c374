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
    """Unless `overwrite`: refuse an output folder that holds a different model, or a finished model or checkpoints
    of an earlier run that a new run would replace or mix with its own (resuming continues them). A different model:
    another model type or number of labels, or another value of an option declared with `architecture=True` (a key
    missing from config.json has its default, as in `to_diff_dict`); options that leave the weights alone (routing,
    losses, initialisation) may differ when resuming."""
    from ..configuration_capsnet import architecture_options

    if overwrite:
        return
    if not resuming and list_checkpoints(output_dir):
        raise UsageError(
            f"--output_dir {output_dir!r} holds checkpoints of an earlier run: continue it with "
            "--resume_from_checkpoint latest, or pass --overwrite_output_dir to start afresh"
        )
    path = os.path.join(output_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    different = ["model_type"] if saved.get("model_type") != config.model_type else []
    if not different:
        try:
            existing = type(config).from_dict(saved)
        except (ValueError, TypeError) as error:
            raise UsageError(
                f"--output_dir {output_dir!r} holds a config.json that is no valid {type(config).__name__} ({error}); "
                "choose another folder or pass --overwrite_output_dir"
            ) from error
        options = architecture_options(type(config))
        different = [name for name in options if getattr(existing, name) != getattr(config, name)]
    if len(saved.get("id2label", {})) != len(config.id2label):
        different.append("num_labels")
    if different:
        raise UsageError(
            f"--output_dir {output_dir!r} holds a different model ({', '.join(different)} differ); "
            "choose another folder or pass --overwrite_output_dir"
        )
    if not resuming:
        raise UsageError(
            f"--output_dir {output_dir!r} holds a trained model: pass --overwrite_output_dir to replace it, or "
            "continue its run with --resume_from_checkpoint latest"
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


def _checkpoint_problem(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (a killed or damaged write), or None."""
    try:
        with open(os.path.join(folder, TRAINING_STATE_FILE), encoding="utf-8") as handle:
            json.load(handle)
    except FileNotFoundError:
        return f"it is not a checkpoint of capsnet-train (no {TRAINING_STATE_FILE})"
    except (OSError, ValueError) as error:
        return f"its {TRAINING_STATE_FILE} is unreadable ({error})"
    from safetensors import SafetensorError, safe_open

    weights = [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    if not weights:
        return "it holds no model weights"
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), "pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
        except (SafetensorError, OSError) as error:
            return f"its {name} is unreadable ({error})"
    return None


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str, report=print) -> str:
    """The checkpoint folder to resume from: the given one, or for "latest" the newest readable one of
    `output_dir` (a damaged newest checkpoint is reported and skipped)."""
    if resume_from_checkpoint != "latest":
        if not os.path.exists(resume_from_checkpoint):
            raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist")
        problem = _checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise UsageError(f"cannot resume from {resume_from_checkpoint!r}: {problem}")
        return resume_from_checkpoint
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        raise UsageError(
            f"--resume_from_checkpoint latest: no checkpoint in {os.path.join(output_dir, CHECKPOINT_DIR)!r}"
        )
    for folder in reversed(checkpoints):
        problem = _checkpoint_problem(folder)
        if problem is None:
            return folder
        report(f"skipping checkpoint {folder}: {problem}")
    raise UsageError(f"--resume_from_checkpoint latest: no readable checkpoint in {output_dir!r}")


# Arguments a resumed run must share with the run it continues: they fix the example order, the augmentation and
# the schedule, so changing one silently makes a different run. The length of training may change.
RUN_ARGUMENTS = (
    "dataset_name",
    "dataset_config_name",
    "train_split_name",
    "max_train_samples",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "learning_rate",
    "lr_decay_rate",
    "lr_decay_steps",
    "min_learning_rate",
    "image_size",
    "resize_mode",
    "do_standardize",
    "augmentation",
    "max_shift",
    "model_type",
)


def run_identity(args, train_data, eval_data, num_processes: int) -> dict[str, Any]:
    """What a checkpoint records to recognise its run: the arguments of `RUN_ARGUMENTS`, the process count and a
    fingerprint of the training data (sizes and a hash of the labels and first images)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(f"{len(train_data)} {len(eval_data)}".encode())
    for name in ("labels", "images"):
        values = getattr(train_data, name, None)
        if values is not None:
            digest.update(np.ascontiguousarray(values[:1024].cpu().numpy()).tobytes())
    arguments = {name: getattr(args, name) for name in RUN_ARGUMENTS}
    arguments["image_size"] = list(arguments["image_size"]) if arguments["image_size"] else None
    return {"arguments": arguments, "num_processes": num_processes, "data_fingerprint": digest.hexdigest()[:16]}


def load_checkpoint(accelerator, checkpoint: str, identity: dict[str, Any], allow_changes: bool) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from `checkpoint` and return the loop's saved state; a
    checkpoint of a different run (arguments or data) is an error unless `allow_changes`."""
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    recorded = state.get("run")
    if recorded is not None and not allow_changes:
        changed = [
            f"{name} {recorded['arguments'].get(name)!r} -> {value!r}"
            for name, value in identity["arguments"].items()
            if recorded["arguments"].get(name) != value
        ]
        if recorded.get("num_processes") != identity["num_processes"]:
            changed.append(f"processes {recorded.get('num_processes')} -> {identity['num_processes']}")
        if recorded.get("data_fingerprint") != identity["data_fingerprint"]:
            changed.append("the training data")
        if changed:
            raise UsageError(
                f"{checkpoint!r} is a checkpoint of another run ({'; '.join(changed)}): resume with the same "
                "arguments, or pass --allow_resume_changes"
            )
    try:
        accelerator.load_state(checkpoint)
    except Exception as error:  # torch, safetensors and accelerate raise many types for a damaged checkpoint
        raise UsageError(f"cannot resume from {checkpoint!r}: {str(error).splitlines()[0]}") from error
    state["run"] = identity
    return state
