"""Training throughput of the MNIST CapsNet in images per second, with the training set resident on the device.

Every step is the one ``capsnet-train`` runs on MNIST: a batch taken from the shuffled epoch order (kept on the
device), the paper's random shift of up to 2 px (``BatchTransform``, on the device), forward with labels (margin +
reconstruction loss), backward, and the optimizer step with the fused Adam ``capsnet-train`` builds
(``capsnet_hf.train.create_optimizer``). Modes (``--modes``):

- ``fp32``: float32 throughout;
- ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around forward and loss (squash, capsule lengths and the
  losses stay float32, as in ``capsnet-train --mixed_precision bf16``);
- ``fp32-compile`` / ``bf16-compile``: the same with ``torch.compile(model, fullgraph=True)``; the first, compiling
  step is timed apart (``compile_s``). ``--compile-mode`` passes torch.compile's ``mode`` (``reduce-overhead``: CUDA
  graphs; ``max-autotune``: also autotuned kernels).

``--memory-formats channels_last`` puts the convolutions' weights and every batch of pixels in
``torch.channels_last`` memory format (NHWC convolutions, as cuDNN prefers them in bf16); with ``contiguous
channels_last`` every mode runs in both, in the same process.

For each (mode, batch size), on a freshly initialised model: ``--warmup`` untimed steps, then ``--windows`` windows
of ``--steps`` steps, the device synchronised only at the ends of a window (so the host queues work ahead, as in
training). Reported: images/s (median over the windows, with min-max), milliseconds per step, the implied time of one
epoch over the training set, peak device memory (CUDA), and the last window's mean loss, which must be finite.
``--profile`` then records ``--profile-steps`` more steps under ``torch.profiler`` and prints the ops that took the
most self time on the device (self CPU time on CPU): where the time goes.

Data: ``--dataset`` (a local ``datasets`` folder or a Hub id with a training split, e.g. ``../shared/datasets/mnist``);
without it, ``--synthetic-examples`` uniformly random 28x28 uint8 images and labels (the arithmetic, and so the
throughput, does not depend on the pixel values).

Example (GPU):
    python benchmarks/bench_training_throughput.py --device cuda --dataset ylecun/mnist --batch-size 128 512 1024 \
        --modes fp32 bf16 bf16-compile --profile --json throughput.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_capsnet import load_average, open_device, synchronize, write_json
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's package, installed or not
from capsnet_hf import CapsNetConfig, CapsNetForImageClassification  # noqa: E402
from capsnet_hf.cli import DataError  # noqa: E402
from capsnet_hf.data.batching import BatchTransform, EpochOrder, make_generator  # noqa: E402
from capsnet_hf.data.loading import ImageTensorDataset  # noqa: E402
from capsnet_hf.data.splits import load_splits  # noqa: E402
from capsnet_hf.training.optimization import create_optimizer  # noqa: E402

MODES = ("fp32", "bf16", "fp32-compile", "bf16-compile")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MIB = 2**20


class TrainingSteps:
    """Callable running one ``capsnet-train`` MNIST step on device-resident data; returns the detached loss."""

    def __init__(
        self, mode: str, data: ImageTensorDataset, batch_size: int, args: argparse.Namespace, memory_format: str
    ):
        self.device = data.device
        self.data, self.batch_size, self.seed = data, batch_size, args.seed
        self.steps_per_epoch = len(data) // batch_size
        self.transform = BatchTransform(data.image_size, max_shift=2)
        self.autocast_dtype = torch.bfloat16 if mode.startswith("bf16") else None
        torch.manual_seed(args.seed)
        self.memory_format = MEMORY_FORMATS[memory_format]
        model = CapsNetForImageClassification(CapsNetConfig()).to(self.device)
        for module in model.modules():  # the convolutions only: the class capsules' 4-d weight is no image
            if isinstance(module, torch.nn.Conv2d):
                module.to(memory_format=self.memory_format)
        self.model = self.forward = model.train()
        if mode.endswith("-compile"):
            torch.compiler.reset()  # static shapes for this batch size, not a dynamic recompile of an earlier case
            self.forward = torch.compile(model, fullgraph=True, backend=args.compile_backend, mode=args.compile_mode)
        self.optimizer = create_optimizer(self.model.parameters(), 1e-3, self.device)
        self.order, self.step = EpochOrder(len(data), args.seed, self.device), 0

    def __call__(self) -> torch.Tensor:
        epoch, position = divmod(self.step, self.steps_per_epoch)
        batch = self.data.batch(self.order.indices(epoch, position * self.batch_size, self.batch_size))
        pixel_values = self.transform(batch["pixel_values"], make_generator(self.device, self.seed, self.step))
        pixel_values = pixel_values.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            loss = self.forward(pixel_values=pixel_values, labels=batch["labels"]).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()


def profile_table(run_step: TrainingSteps, steps: int, rows: int) -> str:
    """`torch.profiler`'s table of the ops with the most self device time (CPU time on CPU) over `steps` steps."""
    on_cuda = run_step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run_step()
        synchronize(run_step.device)
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def bench_mode(
    mode: str, data: ImageTensorDataset, batch_size: int, args: argparse.Namespace, memory_format: str
) -> dict:
    device = data.device
    run_step = TrainingSteps(mode, data, batch_size, args, memory_format)
    result = {
        "mode": mode,
        "batch_size": batch_size,
        "memory_format": memory_format,
        "load_average_before": load_average(),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if mode.endswith("-compile"):
        started = time.perf_counter()
        run_step()
        synchronize(device)
        result["compile_s"] = time.perf_counter() - started
    for _ in range(args.warmup):
        run_step()
    synchronize(device)
    window_seconds, losses = [], []
    for _ in range(args.windows):
        started = time.perf_counter()
        losses = [run_step() for _ in range(args.steps)]
        synchronize(device)
        window_seconds.append(time.perf_counter() - started)
    mean_loss = torch.stack(losses).float().mean().item()
    if not math.isfinite(mean_loss):
        raise RuntimeError(f"mode {mode}, batch {batch_size}: the training loss is not finite ({mean_loss})")
    rates = [args.steps * batch_size / seconds for seconds in window_seconds]
    median_rate = statistics.median(rates)
    result.update(
        images_per_s={"median": median_rate, "min": min(rates), "max": max(rates)},
        step_ms=statistics.median(window_seconds) / args.steps * 1e3,
        epoch_s=len(data) / median_rate,
        loss_last_window=mean_loss,
        steps_timed=args.windows * args.steps,
    )
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    if args.profile:
        result["profile"] = profile_table(run_step, args.profile_steps, args.profile_rows)
    result["load_average_after"] = load_average()
    return result


def load_data(args: argparse.Namespace, device: torch.device) -> tuple[ImageTensorDataset, str]:
    if args.dataset is None:
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (args.synthetic_examples, 1, 28, 28), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (args.synthetic_examples,), generator=generator)
        description = f"synthetic: {args.synthetic_examples} uniform random 28x28 uint8 images"
        return ImageTensorDataset(images, labels).to(device), description
    splits = load_splits(args.dataset, args.train_split, None, num_classes=10, num_channels=1)
    if splits.train.image_size != (28, 28):
        raise DataError(f"{args.dataset!r} has {list(splits.train.image_size)} images; the MNIST model takes 28x28")
    return splits.train.to(device), f"{args.dataset} ({args.train_split}: {len(splits.train)} images)"


def print_table(results: list[dict]) -> None:
    header = f"{'mode':>13} {'B':>5} {'format':>13} | {'images/s':>10} {'(min-max)':>17}"
    header += f" {'ms/step':>9} {'epoch s':>9} {'compile s':>9} {'peak MiB':>9} {'loss':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        rate = r["images_per_s"]
        spread = f"({rate['min']:.0f}-{rate['max']:.0f})"
        compile_s = f"{r['compile_s']:9.1f}" if "compile_s" in r else f"{'-':>9}"
        peak = f"{r['peak_memory_mib']:9.0f}" if "peak_memory_mib" in r else f"{'-':>9}"
        print(
            f"{r['mode']:>13} {r['batch_size']:>5} {r['memory_format']:>13} | {rate['median']:10.1f} {spread:>17}"
            f" {r['step_ms']:9.2f} {r['epoch_s']:9.1f} {compile_s} {peak} {r['loss_last_window']:7.4f}"
        )
    for r in results:
        if "profile" in r:
            print(f"\nprofile, {r['mode']}, batch {r['batch_size']}, {r['memory_format']}:\n{r['profile']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dataset", help="local folder or Hub id of an MNIST-like data set (default: synthetic)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--synthetic-examples", type=int, default=60000, help="size of the synthetic training set")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fp32", "bf16", "bf16-compile"])
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the -compile modes")
    parser.add_argument(
        "--compile-mode",
        choices=list(torch._inductor.list_mode_options()),
        default="default",
        help="torch.compile mode of the -compile modes (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--memory-formats",
        nargs="+",
        choices=list(MEMORY_FORMATS),
        default=["contiguous"],
        help="the convolutions' weights and pixels in each of these memory formats (channels_last: NHWC)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the compiling step")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per case")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1 or args.synthetic_examples < 1 or args.threads < 1:
        parser.error("--batch-size, --synthetic-examples and --threads must be >= 1")
    if args.steps < 1 or args.windows < 1 or args.profile_steps < 1 or args.profile_rows < 1 or args.warmup < 0:
        parser.error("--steps, --windows, --profile-steps and --profile-rows must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = open_device(args.device, args.threads)
    if device is None:
        return 2
    try:
        data, description = load_data(args, device)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if max(args.batch_size) > len(data):
        print(f"error: batch size {max(args.batch_size)} exceeds the {len(data)} training images", file=sys.stderr)
        return 2
    print(f"data: {description}, on {device}", file=sys.stderr)
    results = []
    for memory_format, mode, batch_size in itertools.product(args.memory_formats, args.modes, args.batch_size):
        results.append(bench_mode(mode, data, batch_size, args, memory_format))
        print(f"done {mode} batch {batch_size} {memory_format}", file=sys.stderr, flush=True)
    print_table(results)
    if args.json is not None:
        write_json(args.json, args, device, data=description, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
