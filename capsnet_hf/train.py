"""Train a CapsNet with accelerate on a `datasets` image-classification data set.

    accelerate launch -m capsnet_hf.train --dataset_name ylecun/mnist --recipe mnist --output_dir capsnet-mnist
    capsnet-train --dataset_name ../shared/datasets/mnist --max_train_steps 500 --output_dir capsnet-mnist

Flags follow transformers' `run_image_classification_no_trainer.py` where one exists. `--recipe mnist|cifar10`
reproduces the official training; any value can be overridden by `--config_file` (YAML/JSON) and the command line.

The script, top to bottom: arguments -> data (decoded once to uint8 tensors on the device) -> model (on CPU with the
compiled routing kernel of `cpu_routing_kernel.py` when it builds) -> optimizer and learning-rate schedule -> resume
-> one loop of optimizer steps (batched on-device augmentation, gradient accumulation, logging, periodic
`save_state`, evaluation each epoch) -> final evaluation -> `save_pretrained`, image processor, results, model card
-> optional push to the Hub.

Reproducibility: example order is a permutation fixed by (seed, epoch) and augmentation draws from a generator
seeded by (seed, step, micro-step, process), so training is a pure function of the step number and a resumed run
(`--resume_from_checkpoint latest|PATH`, restoring model, optimizer, scheduler and RNG states) ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .cpu_routing_kernel import KernelBuildError, cpu_routing_kernel_mode, use_cpu_routing_kernel
from .data import (
    PAPER_DATASETS,
    BatchTransform,
    EpochOrder,
    UsageError,
    load_paper_splits,
    load_splits,
    make_generator,
)
from .mixed_precision import MIXED_PRECISION_CHOICES, accelerate_device, describe, resolve_mixed_precision
from .output_files import LOCK_FILE, give_usual_file_modes, lock_output_dir
from .recipes import RECIPES, preset_defaults

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
BEST_MODEL_DIR = "best_model"
TRAINING_STATE_FILE = "training_state.json"
LOG_FILE = "training_log.jsonl"
TRACKER_PROJECT = "capsnet"
# Files of an output folder that are not published with the model.
NOT_PUBLISHED = (f"{CHECKPOINT_DIR}/*", f"{TRACKER_PROJECT}/*", LOG_FILE, LOCK_FILE)
# CapsNetConfig fields settable from the command line (None: keep the config's default or the pretrained value).
MODEL_ARGUMENTS: dict[str, Any] = {
    "conv1_channels": int,
    "conv1_kernel_size": int,
    "primary_capsule_types": int,
    "primary_capsule_dim": int,
    "primary_kernel_size": int,
    "primary_stride": int,
    "padding": str,
    "capsule_dim": int,
    "routing_iterations": int,
    "leaky_routing": "bool",
    "routing_bias": "bool",
    "detach_inner_votes": "bool",
    "use_decoder": "bool",
    "reconstruction_loss_weight": float,
    "margin_loss_reduction": str,
}


MODEL_TYPES = ("capsnet", "baseline_cnn")


def _bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet-train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    # Presets.
    add("--recipe", choices=sorted(RECIPES), default=None, help="official training preset (overridable)")
    add("--config_file", default=None, help="YAML/JSON file of argument values (over the recipe, under the CLI)")
    # Data.
    add(
        "--dataset_name",
        required=True,
        help=f"Hub id, local folder/file for datasets.load_dataset, or {PAPER_DATASETS}",
    )
    add("--dataset_config_name", default=None)
    add("--train_split_name", default="train")
    add("--eval_split_name", default="auto", help="default: 'test', else 'validation', else --train_val_split")
    add("--train_val_split", type=float, default=0.15, help="held-out fraction when there is no test/validation split")
    add("--image_column_name", default=None, help="default: detected ('image' or 'img')")
    add("--label_column_name", default=None, help="default: detected ('label' or 'labels')")
    add("--max_train_samples", type=int, default=None)
    add("--max_eval_samples", type=int, default=None)
    add(
        "--source_dataset_name",
        default="ylecun/mnist",
        help="MNIST source of multimnist/expanded_mnist (--max_*_samples then count its digits)",
    )
    add("--variants_per_digit", type=int, default=1000, help="generated training examples per source digit")
    add("--eval_variants_per_digit", type=int, default=1, help="generated test examples per source digit")
    # Preprocessing and augmentation (on the device, per batch).
    add("--image_size", type=int, nargs="+", default=None, help="model input (height [width]); default: the data's")
    add("--resize_mode", choices=("resize", "crop_or_pad"), default="resize")
    add("--do_standardize", type=_bool, default=False, help="per-image standardization instead of rescaling to 0..1")
    add("--augmentation", choices=("none", "shift", "cifar"), default="none")
    add("--max_shift", type=int, default=2, help="'shift': largest shift in pixels (zero padding)")
    add("--max_brightness_delta", type=float, default=63.0, help="'cifar': brightness delta on the 0..255 scale")
    add("--contrast_range", type=float, nargs=2, default=[0.2, 1.8], help="'cifar': contrast factor range")
    # Model.
    add(
        "--model_type",
        choices=MODEL_TYPES,
        default="capsnet",
        help="'baseline_cnn': the paper's baseline CNN (capsnet_hf.baseline_cnn), trained the same way",
    )
    add("--model_name_or_path", default=None, help="start from a saved model (of --model_type) instead of a fresh one")
    for name, kind in MODEL_ARGUMENTS.items():
        add(f"--{name}", type=_bool if kind == "bool" else kind, default=None, help="CapsNetConfig." + name)
    add("--decoder_hidden_sizes", type=int, nargs="+", default=None, help="CapsNetConfig.decoder_hidden_sizes")
    add(
        "--config_overrides",
        default=None,
        help="any other config fields, transformers' convention: 'initializer_range=0.01,bias_init=0.0'",
    )
    # Optimization.
    add("--num_train_epochs", type=int, default=3)
    add("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs")
    add(
        "--max_train_minutes",
        type=float,
        default=None,
        help="also stop after the first step past this many minutes of training (the schedule is unchanged)",
    )
    add("--per_device_train_batch_size", type=int, default=128)
    add("--per_device_eval_batch_size", type=int, default=256)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=1e-3, help="Adam learning rate at step 0")
    add("--lr_decay_rate", type=float, default=0.96, help="lr = learning_rate * rate^(step / lr_decay_steps)")
    add("--lr_decay_steps", type=int, default=2000)
    add("--min_learning_rate", type=float, default=1e-6)
    add("--seed", type=int, default=42)
    add("--torch_compile", action="store_true", help="train with torch.compile(model) (evaluation stays eager)")
    add("--torch_compile_backend", default="inductor", help="backend of --torch_compile")
    add("--torch_compile_mode", default=None, help="mode of --torch_compile (e.g. max-autotune)")
    add(
        "--mixed_precision",
        choices=MIXED_PRECISION_CHOICES,
        default="auto",
        help="'auto' (default): bf16 where the device runs it natively (CUDA with bf16, CPUs with AVX512-BF16 or "
        "AMX), else float32 (capsnet_hf.mixed_precision); 'no', 'fp16', 'bf16' force it",
    )
    add(
        "--cpu_routing_kernel",
        default="auto",
        help="on CPU, route the class capsules with the compiled C++ kernel (capsnet_hf.enable_cpu_routing_kernel): "
        "'auto' (default) when it builds, else the torch path; 'true' requires it (needs a C++ compiler)",
    )
    # Output, checkpoints, logging.
    add("--output_dir", required=True)
    add("--overwrite_output_dir", action="store_true", help="replace a different model already in --output_dir")
    add("--checkpointing_steps", default=None, help="save_state every N steps, or 'epoch'")
    add("--checkpoints_total_limit", type=int, default=2, help="keep this many newest checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' (in --output_dir) or a checkpoint folder")
    add("--load_best_model_at_end", action="store_true", help="save the best-evaluating model, not the last")
    add("--logging_steps", type=int, default=50)
    add("--eval_steps", type=int, default=None, help="evaluate every N steps (default: after every epoch)")
    add("--report_to", default="all", help="accelerate trackers: 'all' (installed ones), 'none', or names")
    add("--license", default="apache-2.0", help="license in the model card")
    add("--dataset_hub_id", default=None, help="Hub id of the data set for the card when --dataset_name is local")
    # Hub.
    add("--push_to_hub", action="store_true")
    add("--hub_model_id", default=None, help="org/name of the Hub repository")
    add("--hub_private_repo", action="store_true")
    add("--hub_token", default=None)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line over `--config_file` over `--recipe` over the defaults; then checks that need no data."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--config_file", default=None)
    presets, _ = pre.parse_known_args(argv)
    known = {action.dest for action in parser._actions} - {"help", "recipe", "config_file"}
    try:
        parser.set_defaults(**checked_presets(parser, preset_defaults(presets.recipe, presets.config_file, known)))
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    args = parser.parse_args(argv)
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.image_size is not None:
        if len(args.image_size) == 1:
            args.image_size = args.image_size * 2
        if len(args.image_size) != 2:
            parser.error(f"--image_size takes height [width], got {args.image_size}")
    try:
        args.cpu_routing_kernel = cpu_routing_kernel_mode(args.cpu_routing_kernel)
    except ValueError as error:
        parser.error(str(error))
    if args.cpu_routing_kernel == "true" and args.model_type != "capsnet":
        parser.error(f"--cpu_routing_kernel applies to CapsNet models, not --model_type {args.model_type}")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")
    problem = out_of_range(args)
    if problem:
        parser.error(problem)
    if args.torch_compile and args.cpu_routing_kernel == "true":
        parser.error("--torch_compile traces the torch path; it cannot be combined with --cpu_routing_kernel true")
    return args


# Flags that must be >= 1 when given.
POSITIVE_INTEGER_FLAGS = (
    "num_train_epochs",
    "max_train_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "lr_decay_steps",
    "logging_steps",
    "eval_steps",
    "max_train_samples",
    "max_eval_samples",
    "variants_per_digit",
    "eval_variants_per_digit",
)
# Numeric flags and their intervals as (low, high, "[)"-style brackets); NaN is outside every interval.
NUMBER_RANGES = {
    "learning_rate": (0.0, math.inf, "()"),
    "min_learning_rate": (0.0, math.inf, "[)"),
    "lr_decay_rate": (0.0, 1.0, "(]"),
    "train_val_split": (0.0, 1.0, "()"),
    "max_train_minutes": (0.0, math.inf, "()"),
    "max_brightness_delta": (0.0, math.inf, "[)"),
    "max_shift": (0, math.inf, "[)"),
    "checkpoints_total_limit": (0, math.inf, "[)"),
}


def out_of_range(args: argparse.Namespace) -> str | None:
    """The first flag whose value is outside its range, as an error message, or None."""
    for name in POSITIVE_INTEGER_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name} must be a positive integer, got {value}"
    if args.image_size is not None and min(args.image_size) < 1:
        return f"--image_size must be positive, got {args.image_size}"
    for name, (low, high, brackets) in NUMBER_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        above = value >= low if brackets[0] == "[" else value > low
        below = value <= high if brackets[1] == "]" else value < high
        if not (above and below):
            return f"--{name} must lie in {brackets[0]}{low}, {high}{brackets[1]}, got {value}"
    return None


def checked_presets(parser: argparse.ArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """Recipe and --config_file values through the command line's type and choice checks (argparse checks neither
    for defaults); a ValueError names the flag."""
    actions = {action.dest: action for action in parser._actions}
    checked = {}
    for name, value in values.items():
        action = actions[name]
        flag = f"--config_file/--recipe value of {action.option_strings[0]}"
        if action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be true or false, got {value!r}")
            checked[name] = value
            continue
        many = action.nargs is not None and action.nargs != "?"
        items = list(value) if many and isinstance(value, (list, tuple)) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise ValueError(f"{flag} takes {action.nargs} values, got {value!r}")
        for index, item in enumerate(items):
            if action.type is int and (isinstance(item, bool) or not isinstance(item, int)):
                raise ValueError(f"{flag} must be an integer, got {item!r}")
            if action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
                raise ValueError(f"{flag} must be a number, got {item!r}")
            if action.type is _bool:
                try:
                    items[index] = item = _bool(item if isinstance(item, bool) else str(item))
                except argparse.ArgumentTypeError as error:
                    raise ValueError(f"{flag}: {error}") from error
            if isinstance(item, (list, dict)):
                raise ValueError(f"{flag} must be a single value, got {item!r}")
            if action.choices is not None and item not in action.choices:
                raise ValueError(f"{flag} must be one of {list(action.choices)}, got {item!r}")
        checked[name] = items if many else items[0]
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# Helpers of the loop: output folder checks, checkpoints, logging, learning rate.
# ---------------------------------------------------------------------------------------------------------------------


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


def log_metrics(accelerator, output_dir: str, values: dict[str, Any], step: int) -> None:
    """To accelerate's trackers and, always, one JSON line of `output_dir/training_log.jsonl` (main process)."""
    accelerator.log({key: value for key, value in values.items() if isinstance(value, (int, float))}, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, LOG_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")


def out_of_time(accelerator, deadline: float) -> bool:
    """Whether `deadline` (time.time()) has passed; with several processes, as soon as it has for any of them, so
    that all stop at the same step. A single process reads only its clock: a device read would wait for the queue."""
    late = time.time() >= deadline
    if accelerator.num_processes == 1:
        return late
    return bool(accelerator.reduce(torch.tensor(float(late), device=accelerator.device), "max").item())


def decayed_learning_rate_factor(step: int, args: argparse.Namespace) -> float:
    """Official schedule as a multiple of --learning_rate: rate^(step / decay_steps), floored at min_learning_rate."""
    factor = args.lr_decay_rate ** (step / args.lr_decay_steps)
    return max(factor, args.min_learning_rate / args.learning_rate)


def create_optimizer(parameters, learning_rate: float, device: torch.device | str = "cpu") -> torch.optim.Adam:
    """Adam (as the paper), with torch's fused implementation on CPU and CUDA: one kernel per parameter instead of a
    chain of element-wise passes (the 8.2 M-parameter MNIST model on 2 CPU threads: 25 -> 5 ms per step). Same
    algorithm; the numbers differ only by float rounding. Create it while the parameters are on CPU or `device`."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=torch.device(device).type in ("cpu", "cuda"))


def build_config(args: argparse.Namespace, num_channels: int, image_size: Sequence[int], id2label: dict[int, str]):
    """A `CapsNetConfig` (or, with `--model_type baseline_cnn`, a `BaselineCNNConfig`) for the data (channels, size,
    class names), with the command line's architecture values (CapsNet only)."""
    from .baseline_cnn import BaselineCNNConfig
    from .configuration_capsnet import CapsNetConfig

    values = {name: getattr(args, name) for name in (*MODEL_ARGUMENTS, "decoder_hidden_sizes")}
    values = {name: value for name, value in values.items() if value is not None}
    config_class = CapsNetConfig
    if args.model_type == "baseline_cnn":
        if values:
            raise UsageError(f"--{', --'.join(values)} set CapsNet options; --model_type baseline_cnn has none")
        config_class = BaselineCNNConfig
    if args.model_name_or_path is not None:
        config = config_class.from_pretrained(args.model_name_or_path, **values)
        if (config.num_channels, tuple(config.image_size), config.num_labels) != (
            num_channels,
            tuple(image_size),
            len(id2label),
        ):
            raise UsageError(
                f"{args.model_name_or_path!r} takes {config.num_channels}x{config.image_size} images and "
                f"{config.num_labels} classes; the data has {num_channels}x{list(image_size)} and {len(id2label)}"
            )
        config.id2label, config.label2id = id2label, {name: index for index, name in id2label.items()}
    else:
        config = config_class(
            num_channels=num_channels,
            image_size=list(image_size),
            id2label=id2label,
            label2id={name: index for index, name in id2label.items()},
            **values,
        )
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
            type(config)(**config.to_dict())  # the same checks as a config built with these values
        except (ValueError, TypeError) as error:
            raise UsageError(f"--config_overrides {args.config_overrides!r}: {error}") from error
    return config


# ---------------------------------------------------------------------------------------------------------------------
# The training script.
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-train`): 0 on success, 2 with a one-line message on bad input."""
    try:
        train(argv)
    except UsageError as error:
        print(f"capsnet-train: error: {error}", file=sys.stderr)
        return 2
    return 0


def train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, train, save (and push); returns the train and evaluation results. Bad input raises
    `UsageError` before any training."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .baseline_cnn import BaselineCNNForImageClassification
    from .evaluate import classification_metrics, collect_scores
    from .image_processing_capsnet import CapsNetImageProcessor
    from .modeling_capsnet import CapsNetForImageClassification

    args = parse_args(argv)
    model_class = (
        BaselineCNNForImageClassification if args.model_type == "baseline_cnn" else CapsNetForImageClassification
    )
    started = time.time()
    precision, precision_reason = resolve_mixed_precision(args.mixed_precision, accelerate_device())
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_dir=args.output_dir,
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    accelerator.print(f"precision: {describe(precision)} ({precision_reason})")
    args.mixed_precision = precision  # what ran, for the model card
    checkpoint = None
    if args.resume_from_checkpoint is not None:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)

    # ---- Data: load, check and decode once (every problem raises before any training) ----
    if args.dataset_name in PAPER_DATASETS:
        splits = load_paper_splits(
            args.dataset_name,
            args.source_dataset_name,
            train=True,
            variants_per_digit=args.variants_per_digit,
            eval_variants_per_digit=args.eval_variants_per_digit,
            seed=args.seed,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            device=device,
        )
        num_channels, data_size = 1, (splits.train.canvas_size, splits.train.canvas_size)
        if args.model_type == "baseline_cnn" and args.dataset_name == "multimnist":
            raise UsageError("the baseline CNN is a single-label softmax classifier: it cannot train on multimnist")
    else:
        splits = load_splits(
            args.dataset_name,
            args.train_split_name,
            args.eval_split_name,
            dataset_config_name=args.dataset_config_name,
            image_column=args.image_column_name,
            label_column=args.label_column_name,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            image_size=args.image_size if args.resize_mode == "resize" else None,
            resize_mode=args.resize_mode,
            seed=args.seed,
            train_val_split=args.train_val_split,
        )
        splits.train, splits.eval = splits.train.to(device), splits.eval.to(device)
        num_channels, data_size = splits.train.num_channels, splits.train.image_size
    train_data, eval_data, id2label = splits.train, splits.eval, splits.id2label
    image_size = tuple(args.image_size or data_size)
    if args.augmentation == "cifar" and any(s > d for s, d in zip(image_size, data_size, strict=True)):
        raise UsageError(f"random crops of {list(image_size)} need images at least that large, got {list(data_size)}")
    examples_per_step = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    steps_per_epoch = len(train_data) // examples_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            f"{len(train_data)} training examples do not fill one step of {examples_per_step} "
            "(per-device batch x processes x gradient accumulation)"
        )
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    train_transform = BatchTransform(
        image_size,
        do_standardize=args.do_standardize,
        max_shift=args.max_shift if args.augmentation == "shift" else 0,
        random_crop=args.augmentation == "cifar",
        random_flip=args.augmentation == "cifar",
        max_brightness_delta=args.max_brightness_delta if args.augmentation == "cifar" else 0.0,
        contrast_range=tuple(args.contrast_range) if args.augmentation == "cifar" else None,
    )
    eval_transform = BatchTransform(image_size, do_standardize=args.do_standardize)

    # ---- Model, image processor, optimizer, schedule ----
    config = build_config(args, num_channels, image_size, id2label)
    check_output_dir(args.output_dir, config, args.overwrite_output_dir, resuming=checkpoint is not None)
    set_seed(args.seed)
    if args.model_name_or_path is not None:
        model = model_class.from_pretrained(args.model_name_or_path, config=config)
    else:
        model = model_class(config)
    kernel_mode = "false" if args.torch_compile else args.cpu_routing_kernel  # compile traces the torch ops
    try:  # the baseline CNN has no class capsules: 'auto' leaves it alone, parse_args refuses 'true'
        kernel_note = use_cpu_routing_kernel(model, kernel_mode, device)
    except KernelBuildError as error:
        raise UsageError(f"--cpu_routing_kernel: {error}") from error
    if kernel_note:
        accelerator.print(kernel_note)
    processor = CapsNetImageProcessor.from_model_config(
        config,
        resize_mode="crop_or_pad" if args.augmentation == "cifar" else args.resize_mode,
        do_rescale=not args.do_standardize,
        do_standardize=args.do_standardize,
    )
    optimizer = create_optimizer(model.parameters(), args.learning_rate, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decayed_learning_rate_factor(step, args))
    model, optimizer = accelerator.prepare(model, optimizer)
    train_forward = model
    if args.torch_compile:
        train_forward = torch.compile(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process:
        try:  # before the first step: a folder we cannot write, or one that another run is writing
            output_lock = lock_output_dir(args.output_dir, "capsnet-train")  # noqa: F841 (held while train() runs)
        except (BlockingIOError, PermissionError, FileExistsError, NotADirectoryError) as error:
            raise UsageError(f"--output_dir: {error}") from error
        if args.overwrite_output_dir and checkpoint is None:  # a fresh run: drop an earlier run's checkpoints
            shutil.rmtree(os.path.join(args.output_dir, CHECKPOINT_DIR), ignore_errors=True)
    if args.report_to != "none":
        hyperparameters = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters)

    # ---- Resume: model, optimizer, scheduler, RNG states, and the loop's position ----
    state = {
        "step": 0,
        "best_accuracy": None,
        "best_step": None,
        "last_eval": None,
        "train_examples_seen": 0,
        "train_seconds": 0.0,  # of the earlier segments of a resumed run
    }
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as handle:
            state.update(json.load(handle))
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")

    def evaluate(step: int) -> dict[str, Any]:
        scores, labels, loss = collect_scores(
            [model], eval_data, eval_transform, accelerator, args.per_device_eval_batch_size
        )
        result = {**classification_metrics(scores, labels, id2label), "loss": loss, "step": step}
        values = {f"eval_{k}": result[k] for k in ("accuracy", "error_percent", "loss")}
        log_metrics(accelerator, args.output_dir, {**values, "epoch": step / steps_per_epoch}, step)
        if state["best_accuracy"] is None or result["accuracy"] > state["best_accuracy"]:
            state["best_accuracy"], state["best_step"] = result["accuracy"], step
            if args.load_best_model_at_end:
                save_best_model(accelerator, model, args.output_dir)
        state["last_eval"] = {k: result[k] for k in ("accuracy", "error_percent", "loss", "step", "num_examples")}
        return result

    # ---- The loop: one iteration = one optimizer step of gradient_accumulation_steps micro-batches ----
    accelerator.print(
        f"{len(train_data)} training / {len(eval_data)} evaluation examples, {steps_per_epoch} steps per epoch, "
        f"{max_train_steps} steps of {examples_per_step} examples on {world} process(es), device {device}"
    )
    progress = tqdm(range(max_train_steps), initial=state["step"], disable=not accelerator.is_local_main_process)
    running = torch.zeros(3, device=device)  # loss, margin loss, reconstruction loss summed since the last log
    window_micro_batches, window_start = 0, time.time()
    order, last_result = EpochOrder(len(train_data), args.seed, device), None
    deadline = None if args.max_train_minutes is None else time.time() + 60 * args.max_train_minutes
    for step in range(state["step"], max_train_steps):
        epoch, position = divmod(step, steps_per_epoch)
        model.train()
        for micro in range(args.gradient_accumulation_steps):
            start = (
                (position * args.gradient_accumulation_steps + micro) * world + rank
            ) * args.per_device_train_batch_size
            batch = train_data.batch(order.indices(epoch, start, args.per_device_train_batch_size))
            generator = make_generator(device, args.seed, step, micro, rank)
            inputs = {
                "pixel_values": train_transform(batch["pixel_values"].to(device), generator),
                "labels": batch["labels"].to(device),
            }
            if "reconstruction_targets" in batch:
                inputs["reconstruction_targets"] = batch["reconstruction_targets"].to(device)
            with accelerator.accumulate(model):
                outputs = train_forward(**inputs)
                accelerator.backward(outputs.loss)
                optimizer.step()
                optimizer.zero_grad()
            parts = [
                outputs.loss,
                getattr(outputs, "margin_loss", None),
                getattr(outputs, "reconstruction_loss", None),
            ]
            running += torch.stack(
                [p.detach().float() if p is not None else torch.zeros((), device=device) for p in parts]
            )
            window_micro_batches += 1
        scheduler.step()
        state["step"] = step + 1
        state["train_examples_seen"] = state["train_examples_seen"] + examples_per_step
        progress.update(1)
        if deadline is not None and state["step"] < max_train_steps and out_of_time(accelerator, deadline):
            accelerator.print(f"--max_train_minutes {args.max_train_minutes}: stopping after step {state['step']}")
            max_train_steps = state["step"]  # this step is the last: it logs, evaluates and ends the loop

        if state["step"] % args.logging_steps == 0 or state["step"] == max_train_steps:
            means = (accelerator.reduce(running, "mean") / window_micro_batches).tolist()
            if not math.isfinite(means[0]):
                progress.close()  # the message on a line of its own
                raise UsageError(
                    f"the training loss became {means[0]} by step {state['step']} (is the learning rate too high?); "
                    "training stopped and no model was saved"
                )
            images = window_micro_batches * args.per_device_train_batch_size * world
            values = {
                "train_loss": means[0],
                "train_margin_loss": means[1],
                "train_reconstruction_loss": means[2],
                "learning_rate": scheduler.get_last_lr()[0],
                "epoch": state["step"] / steps_per_epoch,
                "train_images_per_second": images / max(time.time() - window_start, 1e-9),
            }
            log_metrics(accelerator, args.output_dir, values, state["step"])
            progress.set_postfix(loss=f"{means[0]:.4f}")
            state["last_train_loss"] = means[0]
            running.zero_()
            window_micro_batches, window_start = 0, time.time()

        end_of_epoch = (step + 1) % steps_per_epoch == 0
        due = end_of_epoch if args.eval_steps is None else state["step"] % args.eval_steps == 0
        if due or state["step"] == max_train_steps:
            last_result = evaluate(state["step"])
            accelerator.print(f"step {state['step']}: eval accuracy {last_result['accuracy']:.4f}")
        periodic = isinstance(args.checkpointing_steps, int) and state["step"] % args.checkpointing_steps == 0
        if periodic or (args.checkpointing_steps == "epoch" and end_of_epoch):
            saved = {**state, "train_seconds": state["train_seconds"] + time.time() - started}
            save_checkpoint(accelerator, args.output_dir, state["step"], saved, args.checkpoints_total_limit)
        if state["step"] == max_train_steps:
            break
    progress.close()
    if last_result is None or last_result["step"] != max_train_steps:
        last_result = evaluate(max_train_steps)
    train_seconds = state["train_seconds"] + time.time() - started  # all segments of a resumed run

    # ---- Save the model folder (written aside, moved into place), results and card; push ----
    accelerator.wait_for_everyone()
    final_model = accelerator.unwrap_model(model)
    broken = [name for name, parameter in final_model.named_parameters() if not parameter.isfinite().all()]
    if broken or not math.isfinite(last_result.get("loss") or 0.0):
        raise UsageError(
            f"the trained model is not finite ({', '.join(broken[:3]) or 'evaluation loss'}); no model was saved"
        )
    if args.load_best_model_at_end and state["best_step"] != last_result["step"]:
        final_model = model_class.from_pretrained(os.path.join(args.output_dir, CHECKPOINT_DIR, BEST_MODEL_DIR))
        final_model.to(device)
        scores, labels, loss = collect_scores(
            [final_model], eval_data, eval_transform, accelerator, args.per_device_eval_batch_size
        )
        last_result = {**classification_metrics(scores, labels, id2label), "loss": loss, "step": state["best_step"]}
    train_results = {
        "train_runtime_seconds": train_seconds,
        "train_steps": max_train_steps,
        "train_examples_seen": state["train_examples_seen"],
        "epochs": max_train_steps / steps_per_epoch,
        "train_loss_last": state.get("last_train_loss"),
        "best_eval_accuracy": state["best_accuracy"],
        "best_step": state["best_step"],
        "num_processes": world,
        "device": str(device),
        "mixed_precision": precision,
    }
    eval_results = {"eval_" + key: value for key, value in last_result.items()}
    eval_results["eval_split"] = splits.eval_split
    if accelerator.is_main_process:
        save_model_folder(
            args,
            "capsnet-train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
            final_model.to("cpu"),
            processor,
            train_results,
            eval_results,
            eval_data,
            eval_transform,
            len(train_data),
            steps_per_epoch,
            max_train_steps,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import push_folder_to_hub

        push_folder_to_hub(
            args.output_dir,
            args.hub_model_id,
            private=args.hub_private_repo,
            token=args.hub_token,
            commit_message=f"CapsNet trained on {args.dataset_name}",
            ignore_patterns=NOT_PUBLISHED,
        )
    return {**train_results, **eval_results}


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
    from .hub import render_trained_model_card

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
    from . import visualize

    batch = eval_data.batch(torch.arange(min(count, len(eval_data))))
    pixel_values = eval_transform(batch["pixel_values"]).to(model.device)
    model.eval()
    multi_hot = batch["labels"].dim() == 2
    plot = visualize.plot_multimnist if multi_hot else visualize.plot_reconstructions
    figure = plot(model, pixel_values, batch["labels"].cpu())
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
