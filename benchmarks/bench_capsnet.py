"""Speed and memory of CapsNet training and inference against the bound set by its two convolutions.

For every (image size, batch size) it builds the MNIST-geometry CapsNet (28 px is the paper's model; larger sizes
grow the primary-capsule grid), and times, interleaved in rounds so that machine load hits all of them alike (in
an order shuffled every round: what runs just before a call changes its time through the allocator's and the caches'
state, and a fixed order would always give each variant the same predecessor):

- ``conv_fwd`` / ``conv_fwd_bwd``: conv1 + primary conv alone (no ReLU, no capsules), forward / forward + backward
  of the sum of the primary conv output, parameter gradients only: the bound the capsule layers are measured against;
- ``infer``: ``CapsNetModel`` forward (no decoder) under ``torch.no_grad``;
- ``train``: a full ``CapsNetForImageClassification`` step: forward with labels (margin + reconstruction loss),
  backward, Adam step with the optimizer ``capsnet-train`` builds (``capsnet_hf.train.create_optimizer``: torch's
  fused Adam on CPU and CUDA);
- ``train_plain_adam`` (with ``--plain-adam``): the same step with ``torch.optim.Adam``'s default implementation;
- ``train_saver``: the same step with the memory saver on (``model.activation_checkpointing_enable()``);
- on CPU (``--cpu-routing-kernel auto``, the default, when it builds; ``false`` leaves them out): ``infer_kernel`` /
  ``train_kernel``, ``infer`` / ``train`` with the CPU routing kernel (``capsnet_hf.enable_cpu_routing_kernel``, the
  default of ``capsnet-train`` and ``capsnet-eval`` on CPU; it is built before the timings);
- with ``--compile``: ``infer_compiled`` / ``train_compiled`` with ``torch.compile(model, fullgraph=True)`` (the
  compile time of the first call is reported apart);
- with ``--peer NAME=FILE:EXPRESSION`` (at 28 px): ``train_peer_<NAME>``, a training step of a peer implementation
  built from its own file (``peers.py``): its forward and loss, backward, ``torch.optim.Adam``'s default step;
- with ``--precision bf16`` (``fp32`` is the default, both may be given): ``conv_fwd_bf16``, ``conv_fwd_bwd_bf16``,
  ``infer_bf16``, ``train_bf16`` (and ``infer_kernel_bf16``, ``train_kernel_bf16``), the same calls under bf16
  autocast, each measured against the bf16 bound (the kernel computes in float32 under autocast, but for its votes
  from bf16-rounded operands where the CPU has AVX512-BF16).

Times are medians (and minima) over ``--repeats`` rounds after ``--warmup`` rounds. ``--memory`` also measures one
training step, plain and with the memory saver: the peak of tensor memory allocated during the step above what was
live before it (from the profiler's allocation records on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; it
includes the step's new parameter gradients), and the bytes autograd saved for backward (distinct storages other than
the parameters, seen by ``torch.autograd.graph.saved_tensors_hooks``). ``--memory-only`` skips the timings.
``--cpu-keep-freed-memory`` first sets glibc's malloc as ``capsnet-train`` does by default
(``capsnet_hf.cli.keep_freed_cpu_memory``), so that bound and variants run under the commands' allocator.

Example:
    python benchmarks/bench_capsnet.py --device cpu --threads 2 --batch-size 32 128 --image-size 28 40 64 \
        --compile --memory --json benchmarks/results.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peers import PeerError, peer_factory, training_loss
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's package, installed or not
from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, enable_cpu_routing_kernel  # noqa: E402
from capsnet_hf.cli import keep_freed_cpu_memory  # noqa: E402
from capsnet_hf.kernels.cpu_routing import (  # noqa: E402
    KernelBuildError,
    cpu_routing_kernel_mode,
    load_kernel_library,
)
from capsnet_hf.training.mixed_precision import cpu_native_bf16_features  # noqa: E402
from capsnet_hf.training.optimization import create_optimizer  # noqa: E402

MIB = 2**20
BF16_VARIANTS = ("conv_fwd", "conv_fwd_bwd", "infer", "infer_kernel", "train", "train_kernel")
PROG = "bench_capsnet.py"
PEER_IMAGE_SIZE = 28  # the MNIST geometry the peers are written for


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: CapsNetConfig, device: torch.device, state: dict | None, memory_saver: bool):
    model = CapsNetForImageClassification(config).to(device).train()
    if state is not None:
        model.load_state_dict(state)
    if memory_saver:
        model.activation_checkpointing_enable()
    return model


def capsnet_loss(forward: Callable, pixels: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The training loss of a CapsNet forward (a model, or its compiled form) on one batch."""
    return lambda: forward(pixel_values=pixels, labels=labels).loss


def make_train_step(
    model: torch.nn.Module, loss: Callable[[], torch.Tensor], device: torch.device, plain_adam: bool = False
) -> Callable[[], None]:
    """One optimizer step of `model` on `loss()`: with `capsnet-train`'s optimizer, or `torch.optim.Adam`'s default
    implementation (`plain_adam`, what the peers' own training scripts use)."""
    if plain_adam:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        optimizer = create_optimizer(model.parameters(), 1e-3, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def under_bf16_autocast(function: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`function` (a whole call or training step) under `torch.autocast(dtype=torch.bfloat16)`."""

    def autocast_function() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            function()

    return autocast_function


def make_conv_functions(model, pixels: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    encoder = model.capsnet.members[0]
    conv1, primary_conv = encoder.conv1, encoder.primary_capsules.conv
    parameters = [*conv1.parameters(), *primary_conv.parameters()]

    def conv_fwd() -> None:
        with torch.no_grad():
            primary_conv(conv1(pixels))

    def conv_fwd_bwd() -> None:
        for parameter in parameters:
            parameter.grad = None
        primary_conv(conv1(pixels)).sum().backward()

    return conv_fwd, conv_fwd_bwd


def time_interleaved(
    functions: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every function `warmup` times, then `repeats` rounds of all of them, each round in a shuffled order.

    Returns wall-clock and process CPU (user + system, all threads) seconds per call. On a shared machine the CPU
    time is the steadier measure of the work done: it does not count the time spent waiting for a core.
    """
    cpu_times: dict[str, list[float]] = {name: [] for name in functions}

    def timed(function: Callable[[], None], name: str | None = None) -> float:
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        synchronize(device)
        if name is not None:
            cpu_times[name].append(time.process_time() - cpu_start)
        return time.perf_counter() - start

    for _ in range(warmup):
        for function in functions.values():
            timed(function)
    times: dict[str, list[float]] = {name: [] for name in functions}
    order = list(functions)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(timed(functions[name], name))
    return times, cpu_times


def saved_tensor_bytes(function: Callable[[], None], model: torch.nn.Module) -> int:
    """Bytes of the distinct storages, other than the model's parameters, autograd saves while `function` runs."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def peak_step_memory(function: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while `function` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    # Allocations are charged to the operator that made them (self memory) at its start, frees are "[memory]" events.
    changes = sorted(
        (event.time_range.start, event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage)
        for event in prof.events()
    )
    return max(itertools.accumulate(change for _, change in changes), default=0)


def summarize(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": 1e3 * statistics.median(samples),
        "min_ms": 1e3 * min(samples),
        "max_ms": 1e3 * max(samples),
        "samples_ms": [1e3 * s for s in samples],
    }


def bench_case(
    image_size: int, batch_size: int, args: argparse.Namespace, device: torch.device, peers: list[tuple[str, Callable]]
) -> dict:
    config = CapsNetConfig(image_size=image_size)
    torch.manual_seed(0)
    model = build_model(config, device, None, memory_saver=False)
    state = model.state_dict()
    pixels = torch.rand(batch_size, 1, image_size, image_size, device=device)
    labels = torch.randint(0, config.num_labels, (batch_size,), device=device)
    conv_fwd, conv_fwd_bwd = make_conv_functions(model, pixels)

    def infer() -> None:
        with torch.no_grad():
            model.capsnet(pixels)

    functions = {
        "conv_fwd": conv_fwd,
        "conv_fwd_bwd": conv_fwd_bwd,
        "infer": infer,
        "train": make_train_step(model, capsnet_loss(model, pixels, labels), device),
    }
    kernel_model = None
    if args.cpu_routing_kernel != "false":
        kernel_model = enable_cpu_routing_kernel(build_model(config, device, state, memory_saver=False))

        def infer_kernel() -> None:
            with torch.no_grad():
                kernel_model.capsnet(pixels)

        functions["infer_kernel"] = infer_kernel
        functions["train_kernel"] = make_train_step(kernel_model, capsnet_loss(kernel_model, pixels, labels), device)
    if args.plain_adam:
        plain_model = build_model(config, device, state, memory_saver=False)
        functions["train_plain_adam"] = make_train_step(
            plain_model, capsnet_loss(plain_model, pixels, labels), device, plain_adam=True
        )
    if image_size == PEER_IMAGE_SIZE:
        for name, build_peer in peers:
            peer = build_peer().to(device).train()
            loss = functools.partial(training_loss, name, peer, pixels, labels)
            functions[f"train_peer_{name}"] = make_train_step(peer, loss, device, plain_adam=True)
    saver = None
    if not args.no_saver:
        saver = build_model(config, device, state, memory_saver=True)
        functions["train_saver"] = make_train_step(saver, capsnet_loss(saver, pixels, labels), device)
    result = {"image_size": image_size, "batch_size": batch_size, "num_primary_capsules": config.num_primary_capsules}
    if args.compile:
        # Without a reset, the compiled code of an earlier case would make this one recompile with a dynamic batch
        # size (torch's automatic dynamic shapes): each case gets its own static-shape graphs.
        torch.compiler.reset()
        compiled_model = build_model(config, device, state, memory_saver=False)
        compiled = torch.compile(compiled_model, fullgraph=True, backend=args.compile_backend)
        compiled_encoder = torch.compile(compiled_model.capsnet, fullgraph=True, backend=args.compile_backend)

        def infer_compiled() -> None:
            with torch.no_grad():
                compiled_encoder(pixels)

        train_compiled = make_train_step(compiled_model, capsnet_loss(compiled, pixels, labels), device)
        compile_seconds = {}
        for name, function in (("infer_compiled", infer_compiled), ("train_compiled", train_compiled)):
            start = time.perf_counter()
            function()
            compile_seconds[name] = time.perf_counter() - start
            functions[name] = function
        result["first_call_seconds"] = compile_seconds

    if "bf16" in args.precision:
        in_bf16 = [name for name in functions if name in BF16_VARIANTS or name.startswith("train_peer_")]
        functions.update({f"{name}_bf16": under_bf16_autocast(functions[name], device) for name in in_bf16})
    if "fp32" not in args.precision:
        functions = {name: function for name, function in functions.items() if name.endswith("_bf16")}
    if args.memory_only:
        functions = {}
    times, cpu_times = time_interleaved(functions, args.repeats, args.warmup, device)
    result["times"] = {name: summarize(samples) for name, samples in times.items()}
    result["cpu_times"] = {name: summarize(samples) for name, samples in cpu_times.items()}
    median = {name: statistics.median(samples) for name, samples in times.items()}
    minimum = {name: min(samples) for name, samples in times.items()}
    cpu_median = {name: statistics.median(samples) for name, samples in cpu_times.items()}
    ratios = {}
    for name in median:
        bound = ("conv_fwd" if name.startswith("infer") else "conv_fwd_bwd") + ("_bf16" if "_bf16" in name else "")
        if not name.startswith("conv"):
            ratios[name] = {
                "median": median[name] / median[bound],
                "min": minimum[name] / minimum[bound],
                "cpu_median": cpu_median[name] / cpu_median[bound],
            }
    result["ratio_to_conv_bound"] = ratios
    if "train_saver" in median:
        result["saver_time_ratio"] = median["train_saver"] / median["train"]

    if args.memory or args.memory_only:
        del functions
        memory = {}
        variants = [("train", model)] + ([] if saver is None else [("train_saver", saver)])
        variants += [] if kernel_model is None else [("train_kernel", kernel_model)]
        for name, variant in variants:
            step = make_train_step(variant, capsnet_loss(variant, pixels, labels), device)
            step()  # gradients and Adam state exist before the measured step, as in training
            memory[name] = {
                "peak_mib": peak_step_memory(step, device) / MIB,
                "saved_for_backward_mib": saved_tensor_bytes(lambda v=variant: v(pixels, labels=labels).loss, variant)
                / MIB,
            }
        if saver is not None:
            memory["saver_peak_reduction"] = memory["train"]["peak_mib"] / memory["train_saver"]["peak_mib"]
        result["memory"] = memory
    return result


def machine_details(device: torch.device) -> dict:
    details = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_native_bf16": cpu_native_bf16_features(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        details["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    if device.type == "cuda":
        details["gpu"] = torch.cuda.get_device_name(device)
    return details


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_table(results: list[dict]) -> None:
    """One line per case: median times (ms), each followed by its ratio to the conv-only bound, then memory."""
    columns = [
        "conv_fwd",
        "infer",
        "infer_kernel",
        "infer_compiled",
        "conv_fwd_bwd",
        "train",
        "train_kernel",
        "train_plain_adam",
        "train_compiled",
    ]
    columns += ["train_saver", *(f"{name}_bf16" for name in BF16_VARIANTS)]
    columns += dict.fromkeys(name for r in results for name in r["times"] if name.startswith("train_peer_"))
    present = [name for name in columns if any(name in r["times"] for r in results)]
    width = {name: max(16, len(name)) for name in present}
    header = f"{'px':>4} {'B':>4} {'I':>6} |" + "".join(
        f" {name:>{width[name]}}" + ("" if name.startswith("conv") else f" {'x':>5}") for name in present
    )
    # Memory: the plain step's peak, the saver's and the kernel's peaks, and the plain step's saved bytes.
    peaks = [
        name for name in ("train", "train_saver", "train_kernel") if any(name in r.get("memory", {}) for r in results)
    ]
    peak_titles = {"train": "peak MiB", "train_saver": "saver MiB", "train_kernel": "kernel MiB"}
    header += " |" + "".join(f" {peak_titles[name]:>10}" for name in peaks or ["train"]) + f" {'saved MiB':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        line = f"{r['image_size']:>4} {r['batch_size']:>4} {r['num_primary_capsules']:>6} |"
        for name in present:
            time_ms = r["times"].get(name, {}).get("median_ms")
            line += f" {time_ms:{width[name]}.1f}" if time_ms is not None else f" {'-':>{width[name]}}"
            if not name.startswith("conv"):
                ratio = r["ratio_to_conv_bound"].get(name, {}).get("median")
                line += f" {ratio:5.2f}" if ratio is not None else f" {'-':>5}"
        memory = r.get("memory", {})
        values = [memory.get(name, {}).get("peak_mib") for name in peaks or ["train"]]
        for value in [*values, memory.get("train", {}).get("saved_for_backward_mib")]:
            line += f" {value:10.1f}" if value is not None else f" {'-':>10}"
        print(line)
    print("times: median ms over the rounds; x: ratio of medians to the conv-only bound (conv_fwd for inference,")
    print("conv_fwd_bwd for training); peak / saver / kernel: tensor memory allocated during one training step above")
    print("what was live before it (plain, memory saver, CPU routing kernel); saved: bytes saved for backward by the")
    print("plain step.")
    timed = [r for r in results if r["ratio_to_conv_bound"]]
    if timed:
        print("\nratio of median process CPU times (user + system) to the conv-only bound's:")
        for r in timed:
            ratios = ", ".join(f"{name} {v['cpu_median']:.2f}" for name, v in r["ratio_to_conv_bound"].items())
            print(f"  {r['image_size']} px, batch {r['batch_size']}: {ratios}")


def open_device(name: str, threads: int) -> torch.device | None:
    """The device `--device` names, with `threads` torch CPU threads; None, after an error message, for a CUDA
    device on a machine without CUDA."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {name} requested but CUDA is not available", file=sys.stderr)
        return None
    torch.set_num_threads(threads)
    return device


def write_json(path: Path, args: argparse.Namespace, device: torch.device, **results) -> None:
    """The machine details, the arguments and `results` as JSON, written atomically: a temporary file in the same
    folder, moved into place."""
    payload = {"machine": machine_details(device), "args": {k: str(v) for k, v in vars(args).items()}, **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=1)
    os.replace(handle.name, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's figures use 2)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--image-size", type=int, nargs="+", default=[28])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model, fullgraph=True)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of one training step")
    parser.add_argument("--no-saver", action="store_true", help="skip the memory-saver training step")
    parser.add_argument("--memory-only", action="store_true", help="measure memory, skip the timings")
    parser.add_argument(
        "--plain-adam", action="store_true", help="also time the train step with the default torch.optim.Adam"
    )
    parser.add_argument(
        "--cpu-routing-kernel",
        nargs="?",
        const="true",
        default="auto",
        metavar="auto|true|false",
        help="also time inference and training with the CPU routing kernel (the CLIs' default on CPU): 'auto' "
        "(default) on CPU when it builds; the bare flag or 'true' requires it; 'false' leaves it out",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="time in float32 and/or under bf16 autocast (the bf16 variants get a _bf16 suffix)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=FILE:EXPRESSION",
        help=f"also time a peer implementation's training step, at {PEER_IMAGE_SIZE} px only (peers.py)",
    )
    parser.add_argument(
        "--cpu-keep-freed-memory",
        action="store_true",
        help="have glibc's malloc keep freed memory for reuse, as capsnet-train and capsnet-eval do by default "
        "(--cpu_keep_freed_memory); without it glibc's defaults, as in the runs before the twentieth session",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    try:
        kernel_mode = cpu_routing_kernel_mode(args.cpu_routing_kernel)
    except ValueError:
        parser.error(f"--cpu-routing-kernel takes auto, true or false, got {args.cpu_routing_kernel!r}")
    if kernel_mode == "true" and not args.device.startswith("cpu"):
        parser.error("--cpu-routing-kernel needs --device cpu")
    args.cpu_routing_kernel = kernel_mode if args.device.startswith("cpu") else "false"
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if min(args.batch_size) < 1 or min(args.image_size) < 25:
        parser.error("batch sizes must be >= 1 and image sizes >= 25 (two valid 9x9 convolutions, stride 2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = open_device(args.device, args.threads)
    if device is None:
        return 2
    if args.cpu_keep_freed_memory:
        note = keep_freed_cpu_memory(True, device)
        print(
            note or "CPU memory: malloc left as it is (not glibc, or the user's own malloc settings)", file=sys.stderr
        )
    if args.cpu_routing_kernel != "false":
        try:
            load_kernel_library()  # build it before the timings
        except KernelBuildError as error:
            if args.cpu_routing_kernel == "true":
                print(f"{PROG}: error: {error}", file=sys.stderr)
                return 2
            print(f"no CPU routing kernel columns: {str(error).splitlines()[0]}", file=sys.stderr)
            args.cpu_routing_kernel = "false"
    results = []
    try:
        peers = [peer_factory(spec) for spec in args.peer]
        for image_size, batch_size in itertools.product(args.image_size, args.batch_size):
            load_before = load_average()
            result = bench_case(image_size, batch_size, args, device, peers)
            result["load_average_before"] = load_before
            result["load_average_after"] = load_average()
            results.append(result)
            print(
                f"done {image_size}px batch {batch_size}: load {load_before} -> {result['load_average_after']}",
                file=sys.stderr,
                flush=True,
            )
    except PeerError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json is not None:
        write_json(args.json, args, device, results=results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
