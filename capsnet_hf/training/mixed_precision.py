"""`--mixed_precision auto`: bf16 where the hardware runs it natively, float32 elsewhere.

bf16 autocast trains faster than float32 on a GPU at large batches (an H100: 1.56x at batch 1024) and on some CPUs
with native bf16 instructions (an AVX512-BF16 AMD EPYC: 2.04x), is level with or slower than float32 on others (an
AVX512-BF16 Xeon without AMX: 1.05-1.17x the time), and on a CPU without them oneDNN emulates bf16, about 14x slower
(docs/benchmarks.md, "By machine kind"). The choice is made from the hardware's flags, never hard-coded;
`--mixed_precision no` is the faster choice where bf16 is only level:

- CUDA: bf16 when `torch.cuda.is_bf16_supported()` (Ampere and later), else float32 (fp16 is never chosen by itself:
  it needs loss scaling);
- CPU: bf16 when the CPU has AVX512-BF16 or AMX tiles, as reported by PyTorch's cpuinfo probes
  (`torch.cpu._is_avx512_bf16_supported()`, `torch.cpu._is_amx_tile_supported()`; Linux `lscpu` flags
  `avx512_bf16`, `amx_bf16`), else float32;
- other devices: float32.

`accelerate launch --mixed_precision bf16|fp16` (or its config file) is honoured under `auto`; its default "no" is
not taken as a choice. An explicit `--mixed_precision no|fp16|bf16` always wins.
"""

from __future__ import annotations

import os

import torch

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


def cpu_native_bf16_features() -> list[str]:
    """The native bf16 features of this CPU that oneDNN uses (empty when bf16 would be emulated)."""
    probes = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


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
        if features:
            return "bf16", f"auto: this CPU has native bf16 ({', '.join(features)})"
        return "no", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is emulated and slow; float32"
    return "no", f"auto: float32 on {device.type}"


def describe(precision: str) -> str:
    """A human name of an accelerate precision value."""
    return {"no": "float32", "fp16": "fp16 autocast", "bf16": "bf16 autocast"}[precision]


__all__ = [
    "MIXED_PRECISION_CHOICES",
    "accelerate_device",
    "cpu_native_bf16_features",
    "describe",
    "resolve_mixed_precision",
]
