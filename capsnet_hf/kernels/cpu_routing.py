"""CPU kernel for the class capsules: votes and routing fused per example, forward and backward.

`modeling_capsnet.py` computes the votes [B, J, I, K] with one batched matmul and routes them with batched torch
ops: portable, differentiable and compilable, but on a CPU it writes the votes to memory and streams them
2 x iterations - 1 times (and autograd keeps them for the backward), which costs far more than their arithmetic
(docs/performance.md). `csrc/capsule_routing.cpp` instead keeps a few examples' votes in a per-thread buffer and
routes each example with one pass per iteration; its backward recomputes them rather than saving them.
`enable_cpu_routing_kernel(model)` builds it with the system C++ compiler on first use (about a second, cached under
`default_cache_dir()`) and attaches it to every class-capsule layer; those layers then use it for float32 CPU
inputs, in inference and in training, outside `torch.compile`, on `torch.get_num_threads()` OpenMP threads. GPUs,
other dtypes and compiled models keep the torch path. Outputs and gradients equal the torch path's to float32
rounding (tests/test_routing_reference.py). Needs a C++ compiler (g++ or clang++, or `CXX`); tested on Linux x86-64
with GCC 12. For a library it is opt-in, since it runs a compiler on the user's machine; `capsnet-train` and
`capsnet-eval` turn it on by default on CPU (`--cpu_routing_kernel auto`, `use_cpu_routing_kernel`), falling back
to the torch path when it cannot be built.

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
import torch.nn.functional as F
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
    library.capsnet_route_backward.argtypes = (
        [pointer] * 11 + [size] * 7 + [ctypes.c_int, ctypes.c_float, ctypes.c_int, size, ctypes.c_int]
    )
    library.capsnet_route_backward.restype = None
    library.capsnet_lanes.restype = ctypes.c_int
    library.capsnet_threaded.restype = ctypes.c_int
    return library


class CpuRoutingKernel:
    """A class-capsule layer's `routing_kernel`: (layer, primary capsules [B, I, A]) -> poses [B, J, K], couplings
    [B, J, I], as `CapsNetClassCapsules.forward`, differentiable w.r.t. the capsules, the weight and the bias.

    The weight is re-laid out on every call (0.5 ms for the MNIST model's 1.5 M weights on 2 threads): a cached copy
    cannot tell when the weight has changed, since in-place updates such as torch's fused Adam do not bump its version.
    """

    def __init__(self, cache_dir: str | None = None):
        self.cache_dir = cache_dir
        self.lanes = load_kernel_library(cache_dir).capsnet_lanes()

    def padded(self, num_inputs: int) -> int:
        """P: the number of input capsules rounded up to whole blocks of L (the kernel's vector lanes)."""
        return -(-num_inputs // self.lanes) * self.lanes

    def packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W [I, J, K, A] -> [P / L, J, K, A, L]: L input capsules side by side, I padded to P with zeros."""
        num_inputs, num_classes, capsule_dim, input_dim = weight.shape
        padded = self.padded(num_inputs)
        weight = weight.detach()
        if padded > num_inputs:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, padded - num_inputs))
        packed = weight.reshape(padded // self.lanes, self.lanes, num_classes, capsule_dim, input_dim)
        return packed.permute(0, 2, 3, 4, 1).contiguous()

    def __call__(self, layer: nn.Module, primary_capsules: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_inputs, _, _, input_dim = layer.weight.shape
        if primary_capsules.dim() != 3 or tuple(primary_capsules.shape[1:]) != (num_inputs, input_dim):
            raise ValueError(
                f"primary capsules of shape {tuple(primary_capsules.shape)} do not fit this layer's weight "
                f"{tuple(layer.weight.shape)}: expected (batch, {num_inputs}, {input_dim})"
            )
        return _KernelRouting.apply(primary_capsules, layer.weight, layer.bias, self, layer)

    def geometry(self, layer: nn.Module, batch_size: int) -> tuple:
        """The sizes and settings both entry points take, in their order (batch ... epsilon)."""
        num_inputs, num_classes, capsule_dim, input_dim = layer.weight.shape
        return (
            batch_size,
            num_inputs,
            input_dim,
            num_classes,
            capsule_dim,
            self.padded(num_inputs),
            layer.routing_iterations,
            int(layer.leaky_routing),
            layer.epsilon,
        )


def _examples_per_block(batch_size: int, threads: int) -> int:
    return min(EXAMPLES_PER_BLOCK, -(-batch_size // threads)) or 1  # at least one block per thread if possible


class _KernelRouting(torch.autograd.Function):
    """The kernel as an autograd op: the forward saves no votes; the backward recomputes them and the routing."""

    @staticmethod
    def forward(ctx, primary_capsules, weight, bias, kernel, layer):
        inputs = primary_capsules.detach().contiguous()
        packed_weight = kernel.packed_weight(weight)
        bias = None if bias is None else bias.detach().contiguous()
        geometry = kernel.geometry(layer, inputs.shape[0])
        batch_size, _, _, num_classes, capsule_dim = geometry[:5]
        threads = torch.get_num_threads()
        poses = inputs.new_empty(batch_size, num_classes, capsule_dim)
        coupling = inputs.new_empty(batch_size, num_classes, inputs.shape[1])
        load_kernel_library(kernel.cache_dir).capsnet_route(
            inputs.data_ptr(),
            packed_weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            poses.data_ptr(),
            coupling.data_ptr(),
            *geometry,
            _examples_per_block(batch_size, threads),
            threads,
        )
        # The weight itself only so that autograd refuses a backward after it was changed in place (version check).
        ctx.save_for_backward(inputs, weight, bias)
        ctx.packed_weight = packed_weight
        ctx.kernel, ctx.geometry, ctx.detach_inner_votes = kernel, geometry, layer.detach_inner_votes
        return poses, coupling

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_poses, grad_coupling):
        inputs, _, bias = ctx.saved_tensors
        batch_size, num_inputs, input_dim, num_classes, capsule_dim, padded, iterations = ctx.geometry[:7]
        lanes = ctx.kernel.lanes
        # [B, I, A] -> [P / L, B, A, L]: input blocks of the packed weight, zero padded, block-major (the forward packs
        # each thread's examples itself, in cache; this layout serves the second phase, which runs over input blocks)
        packed_inputs = F.pad(inputs, (0, 0, 0, padded - num_inputs)).view(batch_size, padded // lanes, lanes, -1)
        packed_inputs = packed_inputs.permute(1, 0, 3, 2).contiguous()
        terms = 1 if ctx.detach_inner_votes else 2 * iterations - 1
        left = inputs.new_empty(padded // lanes, batch_size, terms, num_classes, lanes)
        right = inputs.new_empty(batch_size, terms, num_classes, capsule_dim)
        grad_inputs = torch.empty_like(inputs)
        grad_packed_weight = torch.empty_like(ctx.packed_weight)
        grad_bias = inputs.new_empty(batch_size, num_classes, capsule_dim)
        grad_poses, grad_coupling = grad_poses.contiguous(), grad_coupling.contiguous()  # alive during the call
        threads = torch.get_num_threads()
        load_kernel_library(ctx.kernel.cache_dir).capsnet_route_backward(
            inputs.data_ptr(),
            packed_inputs.data_ptr(),
            ctx.packed_weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            grad_poses.data_ptr(),
            grad_coupling.data_ptr(),
            grad_inputs.data_ptr(),
            grad_packed_weight.data_ptr(),
            grad_bias.data_ptr(),
            left.data_ptr(),
            right.data_ptr(),
            *ctx.geometry,
            int(ctx.detach_inner_votes),
            _examples_per_block(batch_size, threads),
            threads,
        )
        # [P / L, J, K, A, L] -> [I, J, K, A]
        grad_weight = grad_packed_weight.permute(0, 4, 1, 2, 3).reshape(padded, num_classes, capsule_dim, input_dim)
        return grad_inputs, grad_weight[:num_inputs], None if bias is None else grad_bias.sum(0), None, None


def _class_capsule_layers(model: nn.Module, required: bool = True) -> list[nn.Module]:
    layers = [module for module in model.modules() if hasattr(module, "routing_kernel")]
    if required and not layers:
        raise ValueError(f"{type(model).__name__} has no CapsNet class-capsule layer to attach the kernel to")
    return layers


def enable_cpu_routing_kernel(model: nn.Module, cache_dir: str | None = None) -> nn.Module:
    """Build the kernel if needed and use it in every class-capsule layer of `model` (a CapsNet model); returns it.

    Raises `KernelBuildError` if it cannot be built (no C++ compiler, ...); the model is then left unchanged.
    """
    layers = _class_capsule_layers(model)
    for layer in layers:
        layer.routing_kernel = CpuRoutingKernel(cache_dir)
    return model


def disable_cpu_routing_kernel(model: nn.Module) -> nn.Module:
    """Back to the torch formulation in every class-capsule layer of `model`; returns it."""
    for layer in _class_capsule_layers(model):
        layer.routing_kernel = None
    return model


CPU_ROUTING_KERNEL_MODES = ("auto", "true", "false")
_MODE_ALIASES = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}


def cpu_routing_kernel_mode(value: str | bool) -> str:
    """The command lines' `--cpu_routing_kernel` value, 'auto', 'true' or 'false', from a string (yes/no/on/off/1/0
    also) or a config file's boolean; raises `ValueError` naming the flag otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = _MODE_ALIASES.get(str(value).lower(), str(value).lower())
    if mode not in CPU_ROUTING_KERNEL_MODES:
        raise ValueError(f"--cpu_routing_kernel takes auto, true or false, got {value!r}")
    return mode


def use_cpu_routing_kernel(model: nn.Module, mode: str, device: torch.device | str) -> str | None:
    """Apply a `--cpu_routing_kernel` mode to `model` for running on `device`; returns a line for the log, or None.

    'false' keeps the torch path. 'auto' attaches the kernel on CPU when it builds and runs on torch's threads (a
    build without OpenMP is slower than the torch path on several threads), and otherwise, or for a model without
    class capsules, keeps the torch path. 'true' attaches it on CPU whatever the threads and raises
    `KernelBuildError` if it cannot be built. The kernel takes float32 weights and capsules; the primary capsules are
    float32 under bf16/fp16 autocast too (squash computes in float32), so there the class capsules run in float32.
    """
    mode = cpu_routing_kernel_mode(mode)
    if mode == "false":
        return None
    device = torch.device(device)
    if device.type != "cpu":
        if mode == "true":
            return f"--cpu_routing_kernel has no effect on {device}: the kernel runs on CPU only"
        return None
    if mode == "auto" and not _class_capsule_layers(model, required=False):
        return None
    try:
        enable_cpu_routing_kernel(model)
    except KernelBuildError as error:
        if mode == "true":
            raise
        return f"class capsules: torch path, the CPU routing kernel is unavailable ({str(error).splitlines()[0]})"
    threads = torch.get_num_threads()
    if mode == "auto" and threads > 1 and not load_kernel_library().capsnet_threaded():
        disable_cpu_routing_kernel(model)
        return f"class capsules: torch path, the CPU routing kernel was built without OpenMP (1 thread, not {threads})"
    return "class capsules: CPU routing kernel (--cpu_routing_kernel false for the torch path)"
