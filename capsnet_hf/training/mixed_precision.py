"""`--mixed_precision auto`: bf16 where the hardware runs it natively and fast, float32 elsewhere.

bf16 autocast trains faster than float32 on a GPU at large batches (an H100: 1.56x at batch 1024) and on some CPUs
with native bf16 instructions (an AVX512-BF16 AMD EPYC: 2.04x), is level with or slower than float32 on others (an
AVX512-BF16 Xeon without AMX: 1.05-1.17x the time), and on a CPU without them oneDNN emulates bf16, about 14x slower
(docs/benchmarks.md, "By machine kind"). So the choice is made from the hardware, never hard-coded:

- CUDA: bf16 when `torch.cuda.is_bf16_supported()` (Ampere and later), else float32 (fp16 is never chosen by itself:
  it needs loss scaling);
- CPU: float32 unless the CPU has AVX512-BF16 or AMX tiles, as reported by PyTorch's cpuinfo probes
  (`torch.cpu._is_avx512_bf16_supported()`, `torch.cpu._is_amx_tile_supported()`; Linux `lscpu` flags
  `avx512_bf16`, `amx_bf16`); where it has them, a probe (1.2-1.7 s on a 2-core Zen 5) times a primary-capsule
  convolution's forward and backward in both precisions (`cpu_bf16_speedup`), and bf16 is chosen when it ran at
  least `BF16_MIN_SPEEDUP` times faster. With several processes the main process's measurement decides for all;
- other devices: float32.

`accelerate launch --mixed_precision bf16|fp16` (or its config file) is honoured under `auto`; its default "no" is
not taken as a choice. An explicit `--mixed_precision no|fp16|bf16` always wins.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
# bf16 only where it pays: the probe measured 1.25-1.91x on a CPU whose bf16 training step takes half the float32
# time, and at most 0.93x where bf16 is no faster (docs/performance.md, "An AMD EPYC Zen 5").
BF16_MIN_SPEEDUP = 1.1
# Examples in the probe's convolution: at 8 the first probe of a process measured 0.55-1.26x on the CPU above (two
# warm-ups; 1.11-1.42x with eight), at 16 with five warm-ups 1.25-1.91x.
PROBE_BATCH_SIZE = 16


def cpu_native_bf16_features() -> list[str]:
    """The native bf16 features of this CPU that oneDNN uses (empty when bf16 would be emulated)."""
    probes = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def cpu_bf16_speedup(repeats: int = 3) -> float:
    """float32 time over bf16-autocast time of one forward and backward of a primary-capsule convolution (the paper
    model's, 256 -> 256 channels, 9 x 9, stride 2, `PROBE_BATCH_SIZE` examples) on this CPU: above 1 where bf16 is
    faster. Best of `repeats` interleaved runs after five warm-ups each; a local generator leaves the global RNG
    alone."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(PROBE_BATCH_SIZE, 256, 20, 20, generator=generator)
    weight = (0.01 * torch.randn(256, 256, 9, 9, generator=generator)).requires_grad_()

    def forward_backward(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = F.conv2d(features, weight, stride=2)
        output.float().sum().backward()
        weight.grad = None
        return time.perf_counter() - start

    # oneDNN creates each precision's kernels on its first calls, and a fresh process's first few calls stay slow:
    # with two warm-ups the first probe of a process measured 0.73-1.51x where later ones measured 1.37-2.2x
    for _ in range(5):
        forward_backward(False), forward_backward(True)
    times = {False: [], True: []}
    for _ in range(repeats):
        for bf16 in (False, True):
            times[bf16].append(forward_backward(bf16))
    return min(times[False]) / min(times[True])


def _main_process_speedup() -> float:
    """`cpu_bf16_speedup` of the main process, broadcast to every process of a distributed run (`accelerate launch`
    has set up its process group by now) so that all of them choose alike."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return cpu_bf16_speedup()
    speedup = [cpu_bf16_speedup() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(speedup, src=0)
    return speedup[0]


def accelerate_device() -> torch.device:
    """The device an `Accelerator()` of this process will use, found before creating it (its precision is fixed at
    construction). `cpu` is read from the environment as `Accelerator` does: `PartialState()` alone ignores it."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device


def resolve_mixed_precision(choice: str | None, device: torch.device | str) -> tuple[str, str]:
    """The precision to run on `device` for the command-line `choice`, and why: `("no"|"fp16"|"bf16", reason)`."""
    choice = "auto" if choice is None else choice
    if choice not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice, "chosen with --mixed_precision"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher in ("bf16", "fp16"):
        return launcher, "auto: set by accelerate launch or its config"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "no", f"auto: {torch.cuda.get_device_name(device)} has no bf16, float32"
    if device.type == "cpu":
        features = cpu_native_bf16_features()
        if not features:
            return (
                "no",
                "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is emulated and slow; float32",
            )
        speedup = _main_process_speedup()
        native = f"auto: this CPU has native bf16 ({', '.join(features)})"
        if speedup >= BF16_MIN_SPEEDUP:
            return "bf16", f"{native} and ran a convolution {speedup:.2f}x faster in bf16"
        return "no", f"{native} but ran a convolution only {speedup:.2f}x as fast in bf16 as in float32; float32"
    return "no", f"auto: float32 on {device.type}"


def describe(precision: str) -> str:
    """A human name of an accelerate precision value."""
    return {"no": "float32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[precision]


__all__ = [
    "BF16_MIN_SPEEDUP",
    "MIXED_PRECISION_CHOICES",
    "PROBE_BATCH_SIZE",
    "accelerate_device",
    "cpu_bf16_speedup",
    "cpu_native_bf16_features",
    "describe",
    "resolve_mixed_precision",
]
