"""The command line of `capsnet-train`: flags, presets (`--recipe`, `--config_file`), range checks, and the
model config they describe."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, get_args

from ..cli import CPU_KEEP_FREED_MEMORY_HELP, CPU_THREADS_HELP, UsageError, cpu_threads_choice, parse_bool
from ..configuration_capsnet import CapsNetConfig, model_options, option_kind
from ..data.splits import PAPER_DATASETS
from ..kernels.cpu_routing import cpu_routing_kernel_mode
from .mixed_precision import BF16_MIN_SPEEDUP, MIXED_PRECISION_CHOICES
from .recipes import RECIPES, preset_defaults

# CapsNetConfig options that are no flags: the data set decides them (build_config passes them).
NOT_MODEL_FLAGS = ("num_channels", "image_size")
# Every other CapsNetConfig option is a flag of the same name (None: keep the config's or the pretrained value).
MODEL_FLAGS = tuple(field.name for field in model_options(CapsNetConfig) if field.name not in NOT_MODEL_FLAGS)
FLAG_TYPES = {"int": int, "float": float, "bool": parse_bool, "choice": str, "ints": int}

MODEL_TYPES = ("capsnet", "baseline_cnn")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per CapsNetConfig option in MODEL_FLAGS: its type from the annotation, its help from the field."""
    for field in model_options(CapsNetConfig):
        if field.name not in MODEL_FLAGS:
            continue
        kind = option_kind(field)
        if kind not in FLAG_TYPES:
            raise TypeError(f"CapsNetConfig.{field.name} has no flag type: list it in NOT_MODEL_FLAGS or give it one")
        default = list(field.default) if kind == "ints" else field.default
        parser.add_argument(
            f"--{field.name}",
            type=FLAG_TYPES[kind],
            nargs="+" if kind == "ints" else None,
            choices=get_args(field.type) if kind == "choice" else None,
            default=None,
            help=f"{field.metadata['help']} (CapsNetConfig default: {default})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capsnet-train", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    # Presets.
    add(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="training preset (overridable): the official mnist or cifar10, or mnist_fast for short budgets",
    )
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
    add(
        "--do_standardize",
        type=parse_bool,
        default=False,
        help="per-image standardization instead of rescaling to 0..1",
    )
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
    add_model_flags(parser)
    add(
        "--config_overrides",
        default=None,
        help="config fields in transformers' convention, over the flags: 'initializer_range=0.01,bias_init=0.0'",
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
        help="'auto' (default): bf16 where the device runs it natively and fast (CUDA with bf16; CPUs with "
        f"AVX512-BF16 or AMX where a start-up probe runs it >= {BF16_MIN_SPEEDUP}x faster), else float32 "
        "(capsnet_hf.training.mixed_precision); 'no', 'fp16', 'bf16' force it",
    )
    add(
        "--cpu_routing_kernel",
        default="auto",
        help="on CPU, route the class capsules with the compiled C++ kernel (capsnet_hf.enable_cpu_routing_kernel): "
        "'auto' (default) when it builds, else the torch path; 'true' requires it (needs a C++ compiler)",
    )
    add(
        "--cpu_threads",
        type=cpu_threads_choice,
        default="auto",
        help=CPU_THREADS_HELP,
    )
    add("--cpu_keep_freed_memory", type=parse_bool, default=True, metavar="BOOL", help=CPU_KEEP_FREED_MEMORY_HELP)
    # Output, checkpoints, logging.
    add("--output_dir", required=True)
    add("--overwrite_output_dir", action="store_true", help="replace a different model already in --output_dir")
    add("--checkpointing_steps", default=None, help="save_state every N steps, or 'epoch'")
    add("--checkpoints_total_limit", type=int, default=2, help="keep this many newest checkpoints")
    add("--resume_from_checkpoint", default=None, help="'latest' (in --output_dir) or a checkpoint folder")
    add(
        "--allow_resume_changes",
        action="store_true",
        help="resume although the data set, batch size, seed, learning rate or augmentation differ from the run's",
    )
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
        values = preset_defaults(presets.recipe, presets.config_file, set(MODEL_FLAGS), known - set(MODEL_FLAGS))
        parser.set_defaults(**checked_presets(parser, values))
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
            if action.type is parse_bool:
                try:
                    items[index] = item = parse_bool(item)
                except argparse.ArgumentTypeError as error:
                    raise ValueError(f"{flag}: {error}") from error
            if isinstance(item, (list, dict)):
                raise ValueError(f"{flag} must be a single value, got {item!r}")
            if action.choices is not None and item not in action.choices:
                raise ValueError(f"{flag} must be one of {list(action.choices)}, got {item!r}")
        checked[name] = items if many else items[0]
    return checked


def build_config(args: argparse.Namespace, num_channels: int, image_size: Sequence[int], id2label: dict[int, str]):
    """A `CapsNetConfig` (or, with `--model_type baseline_cnn`, a `BaselineCNNConfig`) for the data (channels, size,
    class names), with the command line's model options (CapsNet only), then `--config_overrides`."""
    from ..paper.baseline_cnn import BaselineCNNConfig

    values = {name: getattr(args, name) for name in MODEL_FLAGS if getattr(args, name) is not None}
    config_class = CapsNetConfig
    if args.model_type == "baseline_cnn":
        if values:
            raise UsageError(f"--{', --'.join(values)} set CapsNet options; --model_type baseline_cnn has none")
        config_class = BaselineCNNConfig
    try:
        if args.model_name_or_path is not None:
            config = config_class.from_pretrained(args.model_name_or_path, **values)
            config.validate()  # from_pretrained sets the flags' values after its own checks
        else:
            labels = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
            config = config_class(num_channels=num_channels, image_size=list(image_size), **labels, **values)
    except ValueError as error:
        raise UsageError(f"{config_class.__name__}: {error}") from error
    if args.model_name_or_path is not None:
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
    if args.config_overrides:
        try:
            config.update_from_string(args.config_overrides)
            config.validate()
        except (ValueError, TypeError) as error:
            raise UsageError(f"--config_overrides {args.config_overrides!r}: {error}") from error
    return config
