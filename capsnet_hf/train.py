"""Train a CapsNet with accelerate on a `datasets` image-classification data set.

    accelerate launch -m capsnet_hf.train --dataset_name ylecun/mnist --recipe mnist --output_dir capsnet-mnist
    capsnet-train --dataset_name ../shared/datasets/mnist --max_train_steps 500 --output_dir capsnet-mnist

Flags follow transformers' `run_image_classification_no_trainer.py` where one exists. `--recipe mnist|cifar10`
reproduces the official training; any value can be overridden by `--config_file` (YAML/JSON) and the command line.

[`train`] reads top to bottom: arguments -> data (decoded once to uint8 tensors on the device) -> model (on CPU with
the compiled routing kernel of `kernels/cpu_routing.py` when it builds) -> optimizer and schedule -> resume -> the
loop of optimizer steps (batched on-device augmentation, gradient accumulation, logging, checkpoints, evaluation)
-> final evaluation -> the model folder (weights, processor, results, card) -> optional push to the Hub.

Reproducibility: example order is a permutation fixed by (seed, epoch) and augmentation draws from a generator
seeded by (seed, step, micro-step, process), so training is a pure function of the step number and a resumed run
(`--resume_from_checkpoint latest|PATH`, restoring model, optimizer, scheduler and RNG states) ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .cli import UsageError, end_processes, lock_output_dir, run_command, settle_cpu_and_precision
from .data.batching import BatchTransform, EpochOrder, make_generator
from .data.splits import load_splits
from .kernels.cpu_routing import KernelBuildError, use_cpu_routing_kernel
from .training.arguments import build_config, parse_args
from .training.checkpoints import (
    BEST_MODEL_DIR,
    CHECKPOINT_DIR,
    LOG_FILE,
    NOT_PUBLISHED,
    TRACKER_PROJECT,
    check_output_dir,
    load_checkpoint,
    resolve_checkpoint,
    run_identity,
    save_checkpoint,
)
from .training.model_folder import TrainingRecord, save_best_model, save_model_folder
from .training.optimization import create_optimizer, decayed_learning_rate_factor


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`capsnet-train`): 0 on success, 2 with a one-line message on bad input."""
    return run_command("capsnet-train", train, argv)


def train(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, train, save (and push); returns the train and evaluation results. Bad input raises
    `UsageError` before any training."""
    args = parse_args(argv)
    started = time.time()
    accelerator = create_accelerator(args)
    checkpoint = None
    if args.resume_from_checkpoint is not None:
        checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint, accelerator.print)
    data = load_data(args, accelerator.device, accelerator.num_processes)
    model, processor = build_model(args, data, accelerator)
    check_output_dir(args.output_dir, model.config, args.overwrite_output_dir, resuming=checkpoint is not None)
    optimizer = create_optimizer(model.parameters(), args.learning_rate, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decayed_learning_rate_factor(step, args))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    output_lock = prepare_output_dir(args, accelerator, fresh=checkpoint is None)  # noqa: F841 (held until return)
    if args.report_to != "none":
        hyperparameters = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters)

    identity = run_identity(args, data.train, data.eval, accelerator.num_processes)
    state = {
        "step": 0,
        "best_accuracy": None,
        "best_step": None,
        "last_eval": None,
        "train_examples_seen": 0,
        "train_seconds": 0.0,  # of the earlier segments of a resumed run
        "run": identity,
    }
    if checkpoint is not None:
        state.update(load_checkpoint(accelerator, checkpoint, identity, args.allow_resume_changes))
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")

    last_result = run_training_loop(args, accelerator, model, optimizer, scheduler, data, state, started)
    final_model, last_result = final_model_and_result(args, accelerator, model, data, state, last_result)
    record = TrainingRecord(
        command="capsnet-train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        train_results={
            "train_runtime_seconds": state["train_seconds"] + time.time() - started,  # all segments of a resumed run
            "train_steps": data.max_train_steps,
            "train_examples_seen": state["train_examples_seen"],
            "epochs": data.max_train_steps / data.steps_per_epoch,
            "train_loss_last": state.get("last_train_loss"),
            "best_eval_accuracy": state["best_accuracy"],
            "best_step": state["best_step"],
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "mixed_precision": args.mixed_precision,
        },
        eval_results={**{"eval_" + key: value for key, value in last_result.items()}, "eval_split": data.eval_split},
        num_train_examples=len(data.train),
        steps_per_epoch=data.steps_per_epoch,
        max_train_steps=data.max_train_steps,
    )
    if accelerator.is_main_process:
        save_model_folder(args, final_model.to("cpu"), processor, record, data.eval, data.eval_transform)
    del model, optimizer  # the DDP wrapper must be gone before the process group (end_processes)
    end_processes(accelerator)
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
    return {**record.train_results, **record.eval_results}


# ---------------------------------------------------------------------------------------------------------------------
# The steps of train(), in order.
# ---------------------------------------------------------------------------------------------------------------------


def create_accelerator(args):
    """The Accelerator of the run, in the precision `--mixed_precision` resolves to (recorded in `args`), after
    `--cpu_threads` has set torch's threads (and `--cpu_keep_freed_memory` the allocator)."""
    from accelerate import Accelerator

    precision, notes = settle_cpu_and_precision(args)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_dir=args.output_dir,
    )
    accelerator.print("\n".join(notes))
    args.mixed_precision = precision  # what ran, for the model card
    return accelerator


@dataclass
class TrainingData:
    """Decoded splits on the device, their batch transforms and the schedule they imply."""

    train: Any
    eval: Any
    id2label: dict[int, str]
    eval_split: str | None
    num_channels: int
    image_size: tuple[int, int]  # the model's input
    train_transform: BatchTransform
    eval_transform: BatchTransform
    examples_per_step: int
    steps_per_epoch: int
    max_train_steps: int


def load_data(args, device: torch.device, world: int) -> TrainingData:
    """Load, check and decode the splits once (every problem raises `DataError` before any training)."""
    if args.model_type == "baseline_cnn" and args.dataset_name == "multimnist":
        raise UsageError("the baseline CNN is a single-label softmax classifier: it cannot train on multimnist")
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
        source_dataset_name=args.source_dataset_name,
        variants_per_digit=args.variants_per_digit,
        eval_variants_per_digit=args.eval_variants_per_digit,
        device=device,
    )
    num_channels, data_size = splits.train.num_channels, splits.train.image_size
    image_size = tuple(args.image_size or data_size)
    if args.augmentation == "cifar" and any(s > d for s, d in zip(image_size, data_size, strict=True)):
        raise UsageError(f"random crops of {list(image_size)} need images at least that large, got {list(data_size)}")
    examples_per_step = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    steps_per_epoch = len(splits.train) // examples_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            f"{len(splits.train)} training examples do not fill one step of {examples_per_step} "
            "(per-device batch x processes x gradient accumulation)"
        )
    cifar = args.augmentation == "cifar"
    return TrainingData(
        train=splits.train,
        eval=splits.eval,
        id2label=splits.id2label,
        eval_split=splits.eval_split,
        num_channels=num_channels,
        image_size=image_size,
        train_transform=BatchTransform(
            image_size,
            do_standardize=args.do_standardize,
            max_shift=args.max_shift if args.augmentation == "shift" else 0,
            random_crop=cifar,
            random_flip=cifar,
            max_brightness_delta=args.max_brightness_delta if cifar else 0.0,
            contrast_range=tuple(args.contrast_range) if cifar else None,
        ),
        eval_transform=BatchTransform(image_size, do_standardize=args.do_standardize),
        examples_per_step=examples_per_step,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=args.max_train_steps or args.num_train_epochs * steps_per_epoch,
    )


def model_class_of(args):
    from .modeling_capsnet import CapsNetForImageClassification
    from .paper.baseline_cnn import BaselineCNNForImageClassification

    return BaselineCNNForImageClassification if args.model_type == "baseline_cnn" else CapsNetForImageClassification


def build_model(args, data: TrainingData, accelerator):
    """A fresh (seeded) or pretrained model for the data, with the CPU routing kernel when asked for, and the image
    processor that feeds it what training fed it."""
    from accelerate.utils import set_seed

    from .cli import load_pretrained_model
    from .image_processing_capsnet import CapsNetImageProcessor

    config = build_config(args, data.num_channels, data.image_size, data.id2label)
    set_seed(args.seed)
    model_class = model_class_of(args)
    if args.model_name_or_path is not None:
        model = load_pretrained_model(model_class, args.model_name_or_path, config=config)
    else:
        model = model_class(config)
    try:  # the baseline CNN has no class capsules: 'auto' leaves it alone, parse_args refuses 'true'
        kernel_note = use_cpu_routing_kernel(model, args.cpu_routing_kernel, accelerator.device)
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
    return model, processor


def prepare_output_dir(args, accelerator, fresh: bool):
    """Lock `--output_dir` before the first step (a folder we cannot write, or one another run is writing, is an
    error now rather than after the first checkpoint); a fresh `--overwrite_output_dir` run drops old checkpoints."""
    if not accelerator.is_main_process:
        return None
    try:
        lock = lock_output_dir(args.output_dir, "capsnet-train")
    except (BlockingIOError, PermissionError, FileExistsError, NotADirectoryError) as error:
        raise UsageError(f"--output_dir: {error}") from error
    if args.overwrite_output_dir and fresh:
        shutil.rmtree(os.path.join(args.output_dir, CHECKPOINT_DIR), ignore_errors=True)
    return lock


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


def evaluate_model(args, accelerator, model, data: TrainingData, state: dict[str, Any], step: int) -> dict[str, Any]:
    """Evaluate, log, track the best accuracy (saving the best model when asked to) and record it in `state`."""
    from .evaluate import classification_metrics, collect_scores

    scores, labels, loss = collect_scores(
        [model], data.eval, data.eval_transform, accelerator, args.per_device_eval_batch_size
    )
    result = {**classification_metrics(scores, labels, data.id2label), "loss": loss, "step": step}
    values = {f"eval_{k}": result[k] for k in ("accuracy", "error_percent", "loss")}
    log_metrics(accelerator, args.output_dir, {**values, "epoch": step / data.steps_per_epoch}, step)
    if state["best_accuracy"] is None or result["accuracy"] > state["best_accuracy"]:
        state["best_accuracy"], state["best_step"] = result["accuracy"], step
        if args.load_best_model_at_end:
            save_best_model(accelerator, model, args.output_dir)
    state["last_eval"] = {k: result[k] for k in ("accuracy", "error_percent", "loss", "step", "num_examples")}
    return result


def optimizer_step(args, accelerator, model, train_forward, optimizer, data: TrainingData, order, step: int):
    """One optimizer step of `gradient_accumulation_steps` micro-batches, each this process's slice of the step's
    examples, augmented on the device from a generator seeded by (seed, step, micro-batch, process); returns the
    summed [loss, margin loss, reconstruction loss] of its micro-batches."""
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    epoch, position = divmod(step, data.steps_per_epoch)
    batch_size = args.per_device_train_batch_size
    losses = torch.zeros(3, device=device)
    model.train()
    for micro in range(args.gradient_accumulation_steps):
        start = ((position * args.gradient_accumulation_steps + micro) * world + rank) * batch_size
        batch = data.train.batch(order.indices(epoch, start, batch_size))
        generator = make_generator(device, args.seed, step, micro, rank)
        inputs = {
            "pixel_values": data.train_transform(batch["pixel_values"].to(device), generator),
            "labels": batch["labels"].to(device),
        }
        if "reconstruction_targets" in batch:
            inputs["reconstruction_targets"] = batch["reconstruction_targets"].to(device)
        with accelerator.accumulate(model):
            outputs = train_forward(**inputs)
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad()
        parts = [outputs.loss, getattr(outputs, "margin_loss", None), getattr(outputs, "reconstruction_loss", None)]
        losses += torch.stack([p.detach().float() if p is not None else torch.zeros((), device=device) for p in parts])
    return losses


def log_training_window(args, accelerator, scheduler, data: TrainingData, state, mean_losses, images_per_second):
    """Log the mean losses of the micro-batches since the last log (over all processes); a non-finite loss stops
    training before anything is saved."""
    means = accelerator.reduce(mean_losses, "mean").tolist()
    if not math.isfinite(means[0]):
        raise UsageError(
            f"the training loss became {means[0]} by step {state['step']} (is the learning rate too high?); "
            "training stopped and no model was saved"
        )
    values = {
        "train_loss": means[0],
        "train_margin_loss": means[1],
        "train_reconstruction_loss": means[2],
        "learning_rate": scheduler.get_last_lr()[0],
        "epoch": state["step"] / data.steps_per_epoch,
        "train_images_per_second": images_per_second,
    }
    log_metrics(accelerator, args.output_dir, values, state["step"])
    state["last_train_loss"] = means[0]


def run_training_loop(args, accelerator, model, optimizer, scheduler, data: TrainingData, state, started: float):
    """Optimizer steps from `state["step"]` to the end (one iteration = gradient_accumulation_steps micro-batches),
    logging, evaluating and checkpointing on schedule; returns the last evaluation. `--max_train_minutes` may end
    the run early, at a step that then logs and evaluates (`data.max_train_steps` is set to it)."""
    from tqdm.auto import tqdm

    device, world = accelerator.device, accelerator.num_processes
    train_forward = model
    if args.torch_compile:
        train_forward = torch.compile(model, backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    accelerator.print(
        f"{len(data.train)} training / {len(data.eval)} evaluation examples, {data.steps_per_epoch} steps per epoch, "
        f"{data.max_train_steps} steps of {data.examples_per_step} examples on {world} process(es), device {device}"
    )
    progress = tqdm(range(data.max_train_steps), initial=state["step"], disable=not accelerator.is_local_main_process)
    running = torch.zeros(3, device=device)  # loss, margin loss, reconstruction loss summed since the last log
    window_micro_batches, window_start = 0, time.time()
    order, last_result = EpochOrder(len(data.train), args.seed, device), None
    deadline = None if args.max_train_minutes is None else time.time() + 60 * args.max_train_minutes
    batch_size = args.per_device_train_batch_size
    for step in range(state["step"], data.max_train_steps):
        running += optimizer_step(args, accelerator, model, train_forward, optimizer, data, order, step)
        window_micro_batches += args.gradient_accumulation_steps
        scheduler.step()
        state["step"] = step + 1
        state["train_examples_seen"] = state["train_examples_seen"] + data.examples_per_step
        progress.update(1)
        if deadline is not None and state["step"] < data.max_train_steps and out_of_time(accelerator, deadline):
            accelerator.print(f"--max_train_minutes {args.max_train_minutes}: stopping after step {state['step']}")
            data.max_train_steps = state["step"]  # this step is the last: it logs, evaluates and ends the loop

        if state["step"] % args.logging_steps == 0 or state["step"] == data.max_train_steps:
            images_per_second = window_micro_batches * batch_size * world / max(time.time() - window_start, 1e-9)
            try:
                log_training_window(
                    args, accelerator, scheduler, data, state, running / window_micro_batches, images_per_second
                )
            except UsageError:
                progress.close()  # the message on a line of its own
                raise
            progress.set_postfix(loss=f"{state['last_train_loss']:.4f}")
            running.zero_()
            window_micro_batches, window_start = 0, time.time()

        end_of_epoch = (step + 1) % data.steps_per_epoch == 0
        due = end_of_epoch if args.eval_steps is None else state["step"] % args.eval_steps == 0
        if due or state["step"] == data.max_train_steps:
            last_result = evaluate_model(args, accelerator, model, data, state, state["step"])
            accelerator.print(f"step {state['step']}: eval accuracy {last_result['accuracy']:.4f}")
        periodic = isinstance(args.checkpointing_steps, int) and state["step"] % args.checkpointing_steps == 0
        if periodic or (args.checkpointing_steps == "epoch" and end_of_epoch):
            saved = {**state, "train_seconds": state["train_seconds"] + time.time() - started}
            save_checkpoint(accelerator, args.output_dir, state["step"], saved, args.checkpoints_total_limit)
        if state["step"] == data.max_train_steps:
            break
    progress.close()
    if last_result is None or last_result["step"] != data.max_train_steps:
        last_result = evaluate_model(args, accelerator, model, data, state, data.max_train_steps)
    return last_result


def final_model_and_result(args, accelerator, model, data: TrainingData, state, last_result):
    """The model to publish (the last, or with `--load_best_model_at_end` the best) and its evaluation; a model
    whose weights or evaluation loss are not finite is an error, so nothing broken is published."""
    from .evaluate import classification_metrics, collect_scores

    accelerator.wait_for_everyone()
    final_model = accelerator.unwrap_model(model)
    broken = [name for name, parameter in final_model.named_parameters() if not parameter.isfinite().all()]
    if broken or not math.isfinite(last_result.get("loss") or 0.0):
        raise UsageError(
            f"the trained model is not finite ({', '.join(broken[:3]) or 'evaluation loss'}); no model was saved"
        )
    if args.load_best_model_at_end and state["best_step"] != last_result["step"]:
        best = os.path.join(args.output_dir, CHECKPOINT_DIR, BEST_MODEL_DIR)
        final_model = model_class_of(args).from_pretrained(best).to(accelerator.device)
        scores, labels, loss = collect_scores(
            [final_model], data.eval, data.eval_transform, accelerator, args.per_device_eval_batch_size
        )
        last_result = {
            **classification_metrics(scores, labels, data.id2label),
            "loss": loss,
            "step": state["best_step"],
        }
    return final_model, last_result


if __name__ == "__main__":
    sys.exit(main())
