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

from .cli import UsageError, lock_output_dir
from .data.batching import BatchTransform, EpochOrder, make_generator
from .data.splits import PAPER_DATASETS, load_paper_splits, load_splits
from .kernels.cpu_routing import KernelBuildError, use_cpu_routing_kernel
from .training.arguments import build_config, parse_args
from .training.checkpoints import (
    BEST_MODEL_DIR,
    CHECKPOINT_DIR,
    LOG_FILE,
    NOT_PUBLISHED,
    TRACKER_PROJECT,
    TRAINING_STATE_FILE,
    check_output_dir,
    resolve_checkpoint,
    save_checkpoint,
)
from .training.mixed_precision import accelerate_device, describe, resolve_mixed_precision
from .training.model_folder import save_best_model, save_model_folder
from .training.optimization import create_optimizer, decayed_learning_rate_factor


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

    from .evaluate import classification_metrics, collect_scores
    from .image_processing_capsnet import CapsNetImageProcessor
    from .modeling_capsnet import CapsNetForImageClassification
    from .paper.baseline_cnn import BaselineCNNForImageClassification

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


if __name__ == "__main__":
    sys.exit(main())
