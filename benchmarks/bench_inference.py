"""Inference throughput of `CapsNetForImageClassification`: batch-1 latency and large-batch images/s.

Times the full classifier forward (class capsules and the decoder's reconstruction of the predicted class, what
`pipeline("image-classification")` runs) under `torch.inference_mode`, for every precision (float32, bf16 autocast)
and routing path (torch ops; on CPU the compiled routing kernel when it builds), interleaved in shuffled rounds so
that machine load hits all variants alike. A peer implementation can be timed beside it from its own source file,
kept outside this repository:

    python benchmarks/bench_inference.py --device cpu --threads 2 --batch-sizes 1 256 --precision fp32 bf16 \
        --peer xifengguo=/path/to/CapsNet-Pytorch/capsulenet.py:"CapsuleNet([1, 28, 28], 10, 3)" --json inference.json

`--peer NAME=FILE:EXPRESSION` imports FILE as a module and evaluates EXPRESSION in its namespace to build a model
that takes `[B, 1, 28, 28]` float images (its forward is called with the images alone, in eval mode; peers.py).

`--compile` adds `<path>_compiled` variants, `torch.compile(model, mode=--compile-mode)`, compiled afresh for each
batch size (static shapes; the first call of a batch size, compiling, is reported as `first_call_s`). `--freezing`
turns on inductor's freezing for them: the weights become constants of the graph, so on CPU the convolutions' weights
are re-laid out for oneDNN once, at compile time, instead of on every eager call (docs/performance.md); the compiled
model then no longer sees changes to its parameters.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from peers import PeerError, peer_factory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's package, installed or not
from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, enable_cpu_routing_kernel  # noqa: E402
from capsnet_hf.kernels.cpu_routing import KernelBuildError  # noqa: E402
from capsnet_hf.training.mixed_precision import cpu_native_bf16_features  # noqa: E402


def variants(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[torch.Tensor], object]]:
    """Name -> forward of one variant (model built once, seeded)."""
    torch.manual_seed(0)
    model = CapsNetForImageClassification(CapsNetConfig()).to(device).eval()
    calls: dict[str, Callable[[torch.Tensor], object]] = {"torch": model}
    if device.type == "cpu" and args.cpu_routing_kernel:
        kernel_model = CapsNetForImageClassification(CapsNetConfig()).eval()
        kernel_model.load_state_dict(model.state_dict())
        try:
            calls["kernel"] = enable_cpu_routing_kernel(kernel_model)
        except KernelBuildError as error:
            print(f"no kernel variant: {str(error).splitlines()[0]}", file=sys.stderr)
    if args.compile:
        for name, model_of_path in list(calls.items()):
            calls[f"{name}_compiled"] = torch.compile(model_of_path, mode=args.compile_mode)
    for spec in args.peer:
        name, build_peer = peer_factory(spec)
        calls[f"peer_{name}"] = build_peer().to(device).eval()
    timed = {}
    for precision in args.precision:
        for name, call in calls.items():
            if precision == "bf16":
                timed[f"{name}_bf16"] = _under_bf16(call, device)
            else:
                timed[name] = call
    return timed


def _under_bf16(call: Callable[[torch.Tensor], object], device: torch.device) -> Callable[[torch.Tensor], object]:
    def autocast_call(pixels: torch.Tensor) -> object:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return call(pixels)

    return autocast_call


def time_round(calls: dict, pixels: torch.Tensor, device: torch.device, order: list[str]) -> dict[str, float]:
    seconds = {}
    for name in order:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        calls[name](pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start
    return seconds


def check_compiled_outputs(calls: dict, pixels: torch.Tensor) -> None:
    """Every `<path>_compiled[_bf16]` variant's class scores equal its eager twin's (to float rounding), so that what
    is timed is the same model."""
    for name, call in calls.items():
        if "_compiled" in name:
            eager = calls[name.replace("_compiled", "")]
            tolerance = 2e-2 if name.endswith("_bf16") else 1e-4
            torch.testing.assert_close(call(pixels).logits, eager(pixels).logits, rtol=tolerance, atol=tolerance)


def bench(args: argparse.Namespace, device: torch.device) -> list[dict]:
    calls = variants(args, device)
    rows = []
    shuffle = random.Random(0)
    for batch_size in args.batch_sizes:
        pixels = torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(batch_size)).to(device)
        samples: dict[str, list[float]] = {name: [] for name in calls}
        if args.compile:
            torch.compiler.reset()  # static shapes for this batch size, not a dynamic recompile of an earlier one
        with torch.inference_mode():
            for round_index in range(args.warmup + args.repeats):
                order = list(calls)
                shuffle.shuffle(order)
                seconds = time_round(calls, pixels, device, order)
                if round_index == 0:
                    first_call = seconds
                if round_index >= args.warmup:
                    for name, value in seconds.items():
                        samples[name].append(value)
            check_compiled_outputs(calls, pixels)
        for name, values in samples.items():
            median = statistics.median(values)
            rows.append(
                {
                    "variant": name,
                    "batch_size": batch_size,
                    "median_ms": 1000 * median,
                    "min_ms": 1000 * min(values),
                    "images_per_second": batch_size / median,
                    "first_call_s": first_call[name],
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<24} {'batch':>6} {'median ms':>10} {'min ms':>9} {'images/s':>10} {'first s':>8}")
    for row in rows:
        print(
            f"{row['variant']:<24} {row['batch_size']:>6} {row['median_ms']:>10.2f} {row['min_ms']:>9.2f} "
            f"{row['images_per_second']:>10.1f} {row['first_call_s']:>8.2f}"
        )


def machine(device: torch.device) -> dict:
    details = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_native_bf16_features(),
    }
    if device.type == "cuda":
        details["gpu"] = torch.cuda.get_device_name(device)
    return details


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_inference.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--precision", choices=("fp32", "bf16"), nargs="+", default=["fp32"])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--no-cpu-routing-kernel", dest="cpu_routing_kernel", action="store_false")
    parser.add_argument("--compile", action="store_true", help="also time each routing path under torch.compile")
    parser.add_argument(
        "--compile-mode",
        choices=list(torch._inductor.list_mode_options()),
        default=None,
        help="torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--freezing", action="store_true", help="inductor freezing for --compile: weights as constants"
    )
    parser.add_argument("--peer", action="append", default=[], metavar="NAME=FILE:EXPRESSION")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer")
    if min(args.batch_sizes) < 1 or args.warmup < 0:
        parser.error("--batch-sizes must be positive and --warmup non-negative")
    if (args.freezing or args.compile_mode) and not args.compile:
        parser.error("--freezing and --compile-mode need --compile")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup 1 or more: the first call of each batch size compiles")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_inference.py: error: CUDA is not available", file=sys.stderr)
        return 2
    try:
        with inductor_config.patch(freezing=args.freezing):  # compiling happens at each batch size's first call
            rows = bench(args, device)
    except PeerError as error:
        print(f"bench_inference.py: error: {error}", file=sys.stderr)
        return 2
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(device), "args": vars(args) | {"json": str(args.json)},
                                         "results": rows}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
