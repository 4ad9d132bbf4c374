"""`capsnet-eval`: test accuracy, error, per-class accuracy and confusion matrix of one CapsNet or an ensemble.

    capsnet-eval --model_name_or_path capsnet-mnist --dataset_name ylecun/mnist --split test
    capsnet-eval --ensemble cifar0 cifar1 cifar2 --dataset_name cifar10 --split test --output_file results.json

An ensemble scores each class by the SUM of its members' capsule lengths (the official CIFAR-10 evaluation). The
metrics are written as JSON (stdout, and `--output_file`). Runs under `accelerate launch` too: every example is
counted exactly once (`gather_for_metrics`). On CPU the class capsules use the compiled routing kernel of
`cpu_routing_kernel.py` when it builds (`--cpu_routing_kernel auto|true|false`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .cli import (
    CPU_KEEP_FREED_MEMORY_HELP,
    CPU_THREADS_HELP,
    DataError,
    UsageError,
    cpu_threads_choice,
    end_processes,
    load_model_and_processor,
    parse_bool,
    positive_int,
    run_command,
    settle_cpu_and_precision,
    write_aside,
)
from .data.batching import BatchTransform
from .data.splits import load_splits
from .kernels.cpu_routing import KernelBuildError, cpu_routing_kernel_mode, use_cpu_routing_kernel
from .training import metrics
from .training.mixed_precision import MIXED_PRECISION_CHOICES


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, id2label: dict[int, str]) -> dict[str, Any]:
    """Metrics of class scores `[N, J]` (capsule lengths) against labels `[N]` (class indices) or two-hot `[N, J]`.

    Single-label: accuracy, error_percent, per_class_accuracy (by class name), confusion_matrix (rows = true class).
    Two-hot (MultiMNIST): the paper's criterion, both of the two highest-scoring classes right (Section 6).
    """
    scores, labels = scores.float().cpu(), labels.cpu()
    num_classes = scores.shape[1]
    result: dict[str, Any] = {"num_examples": int(scores.shape[0])}
    if labels.dim() == 2:
        correct = metrics.multi_digit_correct(scores, labels)
        result["accuracy"] = correct.double().mean().item()
        result["error_percent"] = 100.0 * (1.0 - result["accuracy"])
        result["metric"] = "both digits correct (top-2 capsules = the two labels)"
        return result
    predicted = metrics.predictions(scores)
    confusion = metrics.confusion_matrix(predicted, labels, num_classes)
    result["accuracy"] = (predicted == labels).double().mean().item()
    result["error_percent"] = 100.0 * (1.0 - result["accuracy"])
    totals = confusion.sum(1)
    result["per_class_accuracy"] = {
        id2label.get(index, str(index)): int(confusion[index, index]) / int(totals[index]) if totals[index] else None
        for index in range(num_classes)
    }
    result["confusion_matrix"] = confusion.tolist()
    return result


def class_scores(outputs: Any) -> torch.Tensor:
    """Class scores `[B, J]` float32 of one model's output: capsule lengths of a CapsNet, softmax probabilities of a
    model without capsules (the paper's baseline CNN)."""
    lengths = getattr(outputs, "capsule_lengths", None)
    if lengths is not None:
        return lengths.float()
    return outputs.logits.float().softmax(dim=-1)


@torch.no_grad()
def collect_scores(
    models: Sequence[torch.nn.Module],
    dataset: Any,
    transform: Callable[[torch.Tensor], torch.Tensor],
    accelerator: Any,
    batch_size: int,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """Summed class scores `[N, J]` ([`class_scores`]: capsule lengths, or softmax probabilities) of `models` on every example of an in-memory dataset, the labels, and the mean
    loss of a single model over the batches (None for an ensemble; the loss includes the few padding duplicates of a
    multi-process run, the scores and labels do not). Examples are split across processes by a prepared DataLoader of
    indices and gathered with `gather_for_metrics`, so each of the N examples counts once."""
    from tqdm.auto import tqdm

    loader = accelerator.prepare_data_loader(
        torch.utils.data.DataLoader(range(len(dataset)), batch_size=batch_size), device_placement=False
    )
    for model in models:
        model.eval()
    all_scores, all_labels, loss_sum, loss_count = [], [], 0.0, 0
    progress = tqdm(loader, desc="evaluate", disable=not (show_progress and accelerator.is_local_main_process))
    for indices in progress:
        batch = dataset.batch(indices)
        pixel_values = transform(batch["pixel_values"]).to(accelerator.device)
        labels = batch["labels"].to(accelerator.device)
        scores = None
        for model in models:
            inputs = {"pixel_values": pixel_values}
            if len(models) == 1:
                inputs["labels"] = labels
                if "reconstruction_targets" in batch:
                    inputs["reconstruction_targets"] = batch["reconstruction_targets"].to(accelerator.device)
            outputs = model(**inputs)
            model_scores = class_scores(outputs)
            scores = model_scores if scores is None else scores + model_scores
        if len(models) == 1:
            loss = outputs.loss.detach().float() * labels.shape[0]
            loss_sum += accelerator.reduce(loss, "sum").item()
            loss_count += accelerator.reduce(torch.tensor(labels.shape[0], device=accelerator.device), "sum").item()
        scores, labels = accelerator.gather_for_metrics((scores, labels))
        all_scores.append(scores.cpu())
        all_labels.append(labels.cpu())
    mean_loss = loss_sum / loss_count if loss_count else None
    return torch.cat(all_scores), torch.cat(all_labels), mean_loss


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="capsnet-eval", description=__doc__.split("\n\n")[0])
    models = parser.add_mutually_exclusive_group(required=True)
    models.add_argument("--model_name_or_path", help="a saved CapsNet folder or a Hub model id")
    models.add_argument("--ensemble", nargs="+", metavar="MODEL", help="several models; class scores are summed")
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="Hub id, local folder/file, or multimnist|expanded_mnist|affnist_style (generated from the source test split)",
    )
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--image_column_name", default=None, help="default: detected (image/img)")
    parser.add_argument("--label_column_name", default=None, help="default: detected (label/labels)")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None, help="evaluate a seeded random subset")
    parser.add_argument("--source_dataset_name", default="ylecun/mnist", help="MNIST source of generated data sets")
    parser.add_argument(
        "--eval_variants_per_digit", type=positive_int, default=1, help="generated examples per test digit"
    )
    parser.add_argument("--per_device_eval_batch_size", type=positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and of generated data sets")
    parser.add_argument(
        "--mixed_precision",
        choices=MIXED_PRECISION_CHOICES,
        default="auto",
        help="'auto' (default): bf16 where the device runs it natively and fast, else float32 "
        "(capsnet_hf.training.mixed_precision)",
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="load models through their own code")
    parser.add_argument(
        "--cpu_routing_kernel",
        default="auto",
        help="on CPU, route the class capsules with the compiled C++ kernel: 'auto' (default) when it builds, "
        "'true' requires it, 'false' keeps the torch path",
    )
    parser.add_argument(
        "--cpu_threads",
        type=cpu_threads_choice,
        default="auto",
        help=CPU_THREADS_HELP,
    )
    parser.add_argument(
        "--cpu_keep_freed_memory", type=parse_bool, default=True, metavar="BOOL", help=CPU_KEEP_FREED_MEMORY_HELP
    )
    parser.add_argument("--output_file", default=None, help="also write the JSON metrics here")
    args = parser.parse_args(argv)
    try:
        args.cpu_routing_kernel = cpu_routing_kernel_mode(args.cpu_routing_kernel)
    except ValueError as error:
        parser.error(str(error))
    return args


def load_models(paths: Sequence[str], trust_remote_code: bool = False) -> tuple[list[torch.nn.Module], Any]:
    """The models at `paths` (folders or Hub ids) and the first one's image processor; all must share geometry."""
    loaded = [load_model_and_processor(path, trust_remote_code) for path in paths]
    models, processor = [model for model, _ in loaded], loaded[0][1]
    first = models[0].config
    for path, model in zip(paths, models, strict=True):
        config = model.config
        if (config.num_channels, list(config.image_size), config.num_labels) != (
            first.num_channels,
            list(first.image_size),
            first.num_labels,
        ):
            raise UsageError(f"{path!r} takes other inputs or classes than {paths[0]!r}: they cannot be ensembled")
    return models, processor


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-eval`): 0 on success, 2 with a one-line message on bad input."""
    return run_command("capsnet-eval", evaluate, argv)


def evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, evaluate, print (and write) the JSON metrics and return them; bad input raises `UsageError`."""
    from accelerate import Accelerator

    args = parse_args(argv)
    paths = args.ensemble or [args.model_name_or_path]
    precision, notes = settle_cpu_and_precision(args)
    accelerator = Accelerator(mixed_precision=precision)
    if accelerator.is_main_process:
        print("\n".join(notes), file=sys.stderr)  # stdout is the JSON
    models, processor = load_models(paths, args.trust_remote_code)
    kernel_notes = []
    for path, model in zip(paths, models, strict=True):
        try:
            note = use_cpu_routing_kernel(model, args.cpu_routing_kernel, accelerator.device)
        except (KernelBuildError, ValueError) as error:
            raise UsageError(f"--cpu_routing_kernel for {path!r}: {error}") from error
        if note and note not in kernel_notes:
            kernel_notes.append(note)
    if accelerator.is_main_process and kernel_notes:
        print("\n".join(kernel_notes), file=sys.stderr)  # stdout is the JSON metrics
    config = models[0].config
    id2label = {int(key): value for key, value in config.id2label.items()}
    splits = load_splits(
        args.dataset_name,
        None,
        args.split,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column_name,
        label_column=args.label_column_name,
        max_eval_samples=args.max_eval_samples,
        image_size=None if processor.resize_mode == "crop_or_pad" else list(config.image_size),
        resize_mode=processor.resize_mode,
        num_classes=config.num_labels,
        num_channels=config.num_channels,
        seed=args.seed,
        source_dataset_name=args.source_dataset_name,
        eval_variants_per_digit=args.eval_variants_per_digit,
        device=accelerator.device,
    )
    dataset = splits.eval
    transform = BatchTransform.from_image_processor(processor)
    channels = dataset.num_channels
    if channels != config.num_channels:
        raise UsageError(f"the images have {channels} channels, the model takes {config.num_channels}")
    if len(dataset) == 0:
        raise DataError(f"split {args.split!r} of {args.dataset_name!r} has no examples")
    models = [accelerator.prepare_model(model, evaluation_mode=True) for model in models]
    scores, labels, loss = collect_scores(
        models, dataset, transform, accelerator, args.per_device_eval_batch_size, show_progress=True
    )
    broken = int((~scores.isfinite().all(dim=1)).sum())
    if broken:
        raise UsageError(f"the model's class scores are not finite for {broken} of {len(scores)} examples")
    result = {
        "models": list(paths),
        "dataset": args.dataset_name,
        "split": args.split,
        **classification_metrics(scores, labels, id2label),
    }
    if loss is not None:
        result["loss"] = loss
    if accelerator.is_main_process:
        text = json.dumps(result, indent=2)
        if args.output_file:
            with write_aside(args.output_file) as partial, open(partial, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        sys.stdout.write(text + "\n")
    end_processes(accelerator)
    return result


if __name__ == "__main__":
    sys.exit(main())
