"""Opt-in CPU inference kernel for the class capsules: votes and routing fused per example.

`modeling_capsnet.py` computes the votes [B, J, I, K] with one batched matmul and routes them with batched torch
ops: portable, differentiable and compilable, but on a CPU it writes the votes to memory and streams them
2 x iterations - 1 times, which costs far more than their arithmetic (docs/performance.md).
`csrc/capsule_routing.cpp` instead keeps a few examples' votes in a per-thread buffer and routes each example with
one pass per iteration. `enable_cpu_routing_kernel(model)` builds it with the system C++ compiler on first use
(about a second, cached under `default_cache_dir()`) and attaches it to every class-capsule layer; those layers then
use it for float32 CPU forward passes without autograd, outside `torch.compile`, on `torch.get_num_threads()`
OpenMP threads. Training, GPUs, other dtypes and compiled models keep the torch path. The results equal the torch
path's to float32 rounding (tests/test_routing_reference.py). Needs a C++ compiler (g++ or clang++, or `CXX`);
tested on Linux x86-64 with GCC 12.

    model = AutoModelForImageClassification.from_pretrained(...)
    enable_cpu_routing_kernel(model.eval())
    with torch.inference_mode():
        logits = model(pixel_values).logits
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("csrc") / "capsule_routing.cpp"
COMPILE_FLAGS = ("-std=c++17", "-O3", "-march=native", "-shared", "-fPIC")
# With OpenMP the kernel runs on the process's OpenMP threads (torch's own pool on Linux, where both use libgomp);
# a compiler without it builds a single-threaded kernel instead.
OPENMP_FLAGS = ("-fopenmp",)
EXAMPLES_PER_BLOCK = 2  # examples sharing a sweep over the weight: of 1, 2, 4 the best or within 12 % at 28-64 px


class KernelBuildError(RuntimeError):
    """The CPU routing kernel could not be compiled or loaded."""


def default_cache_dir() -> Path:
    """`$CAPSNET_HF_KERNEL_CACHE`, else `$XDG_CACHE_HOME/capsnet_hf/kernels` (default `~/.cache/...`)."""
    if "CAPSNET_HF_KERNEL_CACHE" in os.environ:
        return Path(os.environ["CAPSNET_HF_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capsnet_hf" / "kernels"


def _find_compiler() -> str:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for candidate in candidates:
        if shutil.which(candidate):
            return candidate
    raise KernelBuildError(
        f"the CPU routing kernel is compiled on first use and needs a C++ compiler, but {' / '.join(candidates)} "
        "was not found on PATH (install g++ or set CXX)"
    )


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compile(compiler: str, flags: Sequence[str], target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([compiler, *flags, str(KERNEL_SOURCE), "-o", str(target)], capture_output=True, text=True)


@functools.cache
def load_kernel_library(cache_dir: str | None = None) -> ctypes.CDLL:
    """Compile `csrc/capsule_routing.cpp` (once per source, compiler and CPU) and load it.

    The shared library is written to a temporary file and renamed into `cache_dir`, so a failed or interrupted
    build leaves nothing behind. Raises `KernelBuildError` naming what went wrong.
    """
    compiler = _find_compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise KernelBuildError(f"the C++ compiler {compiler!r} does not run: {error}") from error
    source = KERNEL_SOURCE.read_bytes()
    identity = b"\0".join(
        [
            source,
            " ".join((*COMPILE_FLAGS, *OPENMP_FLAGS)).encode(),
            version.encode(),
            platform.machine().encode(),
            _cpu_identity().encode(),
        ]
    )
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    library_path = directory / f"capsule_routing-{hashlib.sha256(identity).hexdigest()[:16]}.so"
    if not library_path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as build_dir:
            built = Path(build_dir) / library_path.name
            result = _compile(compiler, (*COMPILE_FLAGS, *OPENMP_FLAGS), built)
            if result.returncode != 0:
                if _compile(compiler, COMPILE_FLAGS, built).returncode != 0:
                    raise KernelBuildError(
                        f"compiling the CPU routing kernel with {compiler} failed:\n{result.stderr.strip()[-2000:]}"
                    )
                logger.warning(
                    "%s could not build the CPU routing kernel with OpenMP (%s): built it single-threaded instead",
                    compiler,
                    " ".join(OPENMP_FLAGS),
                )
            os.replace(built, library_path)
    try:
        library = ctypes.CDLL(str(library_path))
    except OSError as error:
        raise KernelBuildError(
            f"cannot load the CPU routing kernel {library_path} ({error}); delete it to rebuild"
        ) from error
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.capsnet_route.argtypes = [pointer] * 5 + [size] * 7 + [ctypes.c_int, ctypes.c_float, size, ctypes.c_int]
    library.capsnet_route.restype = None
    library.capsnet_lanes.restype = ctypes.c_int
    library.capsnet_threaded.restype = ctypes.c_int
    return library


class CpuRoutingKernel:
    """A class-capsule layer's `inference_kernel`: (layer, primary capsules [B, I, A]) -> poses [B, J, K], couplings
    [B, J, I], as `CapsNetClassCapsules.forward`. Keeps the weight re-laid out for the kernel until it changes."""

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir
        self.lanes = load_kernel_library(cache_dir).capsnet_lanes()
        self._packed_weight: torch.Tensor | None = None
        self._packed_from: tuple | None = None
        self._packed_storage = None  # held, so that no other weight can take its address while it is the key

    def __getstate__(self) -> dict:  # copies and pickles rebuild the packed weight on their first call
        return {**self.__dict__, "_packed_weight": None, "_packed_from": None, "_packed_storage": None}

    def packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W [I, J, K, A] -> [P / L, J, K, A, L]: L input capsules side by side, I padded to P with zeros."""
        source = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if self._packed_from != source:
            num_inputs, num_classes, capsule_dim, input_dim = weight.shape
            padded = -(-num_inputs // self.lanes) * self.lanes
            packed = weight.detach().new_zeros(padded, num_classes, capsule_dim, input_dim)
            packed[:num_inputs] = weight.detach()
            packed = packed.view(padded // self.lanes, self.lanes, num_classes, capsule_dim, input_dim)
            self._packed_weight = packed.permute(0, 2, 3, 4, 1).contiguous()
            self._packed_from = source
            self._packed_storage = weight.untyped_storage()
        return self._packed_weight

    def __call__(self, layer: nn.Module, primary_capsules: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_inputs, _, _, input_dim = layer.weight.shape
        if primary_capsules.dim() != 3 or tuple(primary_capsules.shape[1:]) != (num_inputs, input_dim):
            raise ValueError(
                f"primary capsules of shape {tuple(primary_capsules.shape)} do not fit this layer's weight "
                f"{tuple(layer.weight.shape)}: expected (batch, {num_inputs}, {input_dim})"
            )
        weight = self.packed_weight(layer.weight)
        inputs = primary_capsules.contiguous()
        bias = None if layer.bias is None else layer.bias.detach().contiguous()
        batch_size = inputs.shape[0]
        num_classes, capsule_dim = weight.shape[1], weight.shape[2]
        threads = torch.get_num_threads()
        poses = inputs.new_empty(batch_size, num_classes, capsule_dim)
        coupling = inputs.new_empty(batch_size, num_classes, num_inputs)
        load_kernel_library(self.cache_dir).capsnet_route(
            inputs.data_ptr(),
            weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            poses.data_ptr(),
            coupling.data_ptr(),
            batch_size,
            num_inputs,
            input_dim,
            num_classes,
            capsule_dim,
            weight.shape[0] * self.lanes,
            layer.routing_iterations,
            int(layer.leaky_routing),
            layer.epsilon,
            min(EXAMPLES_PER_BLOCK, -(-batch_size // threads)) or 1,  # at least one block per thread if possible
            threads,
        )
        return poses, coupling


def _class_capsule_layers(model: nn.Module) -> list[nn.Module]:
    layers = [module for module in model.modules() if hasattr(module, "inference_kernel")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no CapsNet class-capsule layer to attach the kernel to")
    return layers


def enable_cpu_routing_kernel(model: nn.Module, cache_dir: str | None = None) -> nn.Module:
    """Build the kernel if needed and use it in every class-capsule layer of `model` (a CapsNet model); returns it.

    Raises `KernelBuildError` if it cannot be built (no C++ compiler, ...); the model is then left unchanged.
    """
    layers = _class_capsule_layers(model)
    for layer in layers:
        layer.inference_kernel = CpuRoutingKernel(cache_dir)
    return model


def disable_cpu_routing_kernel(model: nn.Module) -> nn.Module:
    """Back to the torch formulation in every class-capsule layer of `model`; returns it."""
    for layer in _class_capsule_layers(model):
        layer.inference_kernel = None
    return model
