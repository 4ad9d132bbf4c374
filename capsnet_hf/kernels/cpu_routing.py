"""CPU kernels for the capsule layers, forward and backward, as torch operators with their autograd formulas and shape
functions (so that autograd, `torch.compile` and `torch.export` see opaque ops):

- `torch.ops.capsnet_hf.route_class_capsules`: the class capsules' votes and routing fused per example. The torch
  path of `modeling_capsnet.py` writes the votes [B, J, I, K] to memory and streams them 2 x iterations - 1 times
  (and autograd keeps them for the backward); `csrc/capsule_routing.cpp` keeps a few examples' votes in a per-thread
  buffer, routes each example with one pass per iteration, and recomputes them in the backward instead of saving
  them (docs/performance.md). It reads the weight re-laid out by `torch.ops.capsnet_hf.pack_class_capsule_weight`,
  an op of its own so that a graph compiled with inductor's freezing runs it once.
- `torch.ops.capsnet_hf.squash_primary_capsules`: the primary capsules' scale, bias, reshape and squash after their
  convolution in one pass, where the torch path runs about twenty elementwise ops.

Both are built with the system C++ compiler on first use (`load_kernel_library`, cached under
`default_cache_dir()`), loaded with ctypes, and called with one argument struct each (`RoutingCall`, `PrimaryCall`)
whose layout is checked against the library's. Needs a C++ compiler (g++ or clang++, or `CXX`); tested on Linux
x86-64 with GCC 12.

For a library they are opt-in, since they run a compiler on the user's machine: `enable_cpu_routing_kernel(model)`
attaches them to every class- and primary-capsule layer, which then use them for float32 CPU inputs (the primary
capsules also for bf16/fp16 ones under autocast), in inference and training, eager or compiled, on
`torch.get_num_threads()` OpenMP threads; other devices and dtypes keep the torch path. Outputs and gradients equal
the torch path's to float32 rounding (tests/test_routing_reference.py, tests/test_cpu_routing_kernel.py). Under CPU
bf16 autocast, on a CPU with AVX512-BF16, the class capsules' votes multiply bf16-rounded operands (as autocast's
matmul would) and all else stays float32.
`capsnet-train` and `capsnet-eval` choose them with `--cpu_routing_kernel` (`use_cpu_routing_kernel`).

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
from torch import Tensor, nn

logger = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("csrc") / "capsule_routing.cpp"
COMPILE_FLAGS = ("-std=c++17", "-O3", "-march=native", "-shared", "-fPIC")
# With OpenMP the kernel runs on the process's OpenMP threads (torch's own pool on Linux, where both use libgomp);
# a compiler without it builds a single-threaded kernel instead.
OPENMP_FLAGS = ("-fopenmp",)
# Examples sharing a sweep over the weight: as many as 16 vector registers of inputs hold, 2 in float32 and 4 in bf16
# pairs (docs/performance.md).
EXAMPLES_PER_BLOCK = {False: 2, True: 4}  # by bf16_votes


class KernelBuildError(RuntimeError):
    """The CPU routing kernel could not be compiled or loaded."""


class RoutingCall(ctypes.Structure):
    """`CapsnetRoutingCall` of csrc/capsule_routing.cpp, field by field: the one argument of both routing entry
    points."""

    c_name = "CapsnetRoutingCall"
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("inputs", "packed_inputs", "weight", "packed_weight", "bias")),
        *((name, ctypes.c_void_p) for name in ("poses", "coupling", "record")),
        *((name, ctypes.c_void_p) for name in ("grad_poses", "grad_coupling", "grad_inputs", "grad_weight")),
        *((name, ctypes.c_void_p) for name in ("grad_bias", "left", "right")),
        *((name, ctypes.c_int64) for name in ("batch", "inputs_per_example", "input_dim", "parents", "pose_dim")),
        *((name, ctypes.c_int64) for name in ("padded_inputs", "iterations", "examples_per_block")),
        *((name, ctypes.c_int32) for name in ("leaky", "detach_inner_votes", "bf16_votes", "threads")),
        ("epsilon", ctypes.c_float),
    ]


class PrimaryCall(ctypes.Structure):
    """`CapsnetPrimaryCall` of csrc/capsule_routing.cpp: the argument of the primary capsules' squash, forward and
    backward."""

    c_name = "CapsnetPrimaryCall"
    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("conv", "bias", "capsules", "grad_capsules", "grad_conv", "grad_bias")),
        *((name, ctypes.c_int64) for name in ("batch", "types", "capsule_dim", "positions")),
        ("threads", ctypes.c_int32),
        ("scale", ctypes.c_float),
        ("epsilon", ctypes.c_float),
    ]


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
    return _open_library(str(library_path))


@functools.cache
def _open_library(path: str) -> ctypes.CDLL:
    """The built kernel at `path`, its entry points typed, its argument layouts checked against `RoutingCall` and
    `PrimaryCall`."""
    try:
        library = ctypes.CDLL(path)
    except OSError as error:
        raise KernelBuildError(f"cannot load the CPU routing kernel {path} ({error}); delete it to rebuild") from error
    try:
        entries = {
            RoutingCall: (library.capsnet_pack_weight, library.capsnet_route, library.capsnet_route_backward),
            PrimaryCall: (library.capsnet_squash_primary, library.capsnet_squash_primary_backward),
        }
    except AttributeError as error:
        raise KernelBuildError(f"the CPU routing kernel {path} lacks an entry point ({error}); delete it") from error
    for structure, functions in entries.items():
        for entry in functions:
            entry.argtypes = [ctypes.POINTER(structure)]
            entry.restype = ctypes.c_char_p  # null, or why the call was refused
    library.capsnet_call_layout.argtypes = [ctypes.c_char_p]
    library.capsnet_call_layout.restype = ctypes.c_char_p
    library.capsnet_lanes.restype = ctypes.c_int
    library.capsnet_record_floats.argtypes = [ctypes.c_int64] * 4
    library.capsnet_record_floats.restype = ctypes.c_int64
    library.capsnet_threaded.restype = ctypes.c_int
    library.capsnet_bf16_votes.restype = ctypes.c_int
    for structure in entries:
        check_call_layout(library, structure)
    return library


def check_call_layout(library: ctypes.CDLL, structure: type[ctypes.Structure]) -> None:
    """Raise `KernelBuildError` unless `structure` lays out its fields as the library's C struct `structure.c_name`
    does."""
    built = (library.capsnet_call_layout(structure.c_name.encode()) or b"no such struct").decode()
    # "name:offset:size;" per field, then "size:<total>", as the C side writes it
    fields = [
        f"{name}:{getattr(structure, name).offset}:{getattr(structure, name).size};" for name, *_ in structure._fields_
    ]
    described = f"{''.join(fields)}size:{ctypes.sizeof(structure)}"
    if built != described:
        raise KernelBuildError(
            f"the CPU routing kernel {library._name} takes another argument layout than {structure.__name__} "
            f"describes (C: {built}; Python: {described})"
        )


def _padded(num_inputs: int, lanes: int) -> int:
    """P: the number of input capsules rounded up to whole blocks of L (the kernel's vector lanes)."""
    return -(-num_inputs // lanes) * lanes


def _forward_buffer_shapes(
    kernel: ctypes.CDLL, batch_size: int, weight: Tensor, iterations: int, keep_for_backward: bool, bf16_votes: bool
) -> tuple[tuple[int, ...], tuple[int, int]]:
    """The buffers beside the forward's inputs and outputs: W [I, J, K, A] re-laid out as [P / L, J, K, A, L] (with
    `bf16_votes` [P / L, J, K, ceil(A / 2), L] words of bf16 pairs; `pack_class_capsule_weight`), and with
    `keep_for_backward` the routing record its backward reads ([B, record floats], else [B, 0])."""
    num_inputs, num_classes, capsule_dim, input_dim = weight.shape
    lanes = kernel.capsnet_lanes()
    padded = _padded(num_inputs, lanes)
    floats = kernel.capsnet_record_floats(num_classes, capsule_dim, padded, iterations) if keep_for_backward else 0
    words = -(-input_dim // 2) if bf16_votes else input_dim
    return (padded // lanes, num_classes, capsule_dim, words, lanes), (batch_size, floats)


def _checked_operands(primary_capsules: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, ...]:
    """The operands as the kernel reads them (contiguous float32 CPU tensors of matching shapes), or a ValueError."""
    tensors = [primary_capsules, weight] + ([] if bias is None else [bias])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("the CPU routing kernel takes float32 CPU tensors")
    if weight.dim() != 4 or primary_capsules.dim() != 3 or primary_capsules.shape[1:] != weight.shape[::3]:  # (I, A)
        raise ValueError(
            f"primary capsules {tuple(primary_capsules.shape)} do not fit the weight {tuple(weight.shape)}: expected "
            "[B, I, A] and [I, J, K, A]"
        )
    if bias is not None and bias.shape != weight.shape[1:3]:
        raise ValueError(
            f"the bias {tuple(bias.shape)} does not fit the weight {tuple(weight.shape)}: expected [J, K]"
        )
    return primary_capsules.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()


def _routing_call(
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    iterations: int,
    leaky: bool,
    epsilon: float,
    detach_inner_votes: bool,
    bf16_votes: bool,
    lanes: int,
) -> RoutingCall:
    """The fields both entry points share, for capsules [B, I, A] and the weight [I, J, K, A]; the caller sets the
    packed weight's and the other buffers."""
    batch_size, num_inputs, input_dim = inputs.shape
    _, num_classes, capsule_dim, _ = weight.shape
    threads = torch.get_num_threads()
    return RoutingCall(
        inputs=inputs.data_ptr(),
        weight=weight.data_ptr(),
        bias=None if bias is None else bias.data_ptr(),
        batch=batch_size,
        inputs_per_example=num_inputs,
        input_dim=input_dim,
        parents=num_classes,
        pose_dim=capsule_dim,
        padded_inputs=_padded(num_inputs, lanes),
        iterations=iterations,
        # at least one block per thread where the batch allows it
        examples_per_block=min(EXAMPLES_PER_BLOCK[bf16_votes], -(-batch_size // threads)) or 1,
        leaky=int(leaky),
        detach_inner_votes=int(detach_inner_votes),
        bf16_votes=int(bf16_votes),
        threads=threads,
        epsilon=epsilon,
    )


def _run(entry: ctypes._CFuncPtr, call: RoutingCall | PrimaryCall) -> None:
    """Call a C entry point; its refusal (sizes it cannot route, out of memory) becomes a RuntimeError."""
    refusal = entry(ctypes.byref(call))
    if refusal is not None:
        if isinstance(call, PrimaryCall):
            sizes = f"{call.types} x {call.capsule_dim} primary capsules at {call.positions} positions"
        else:
            sizes = (
                f"{call.inputs_per_example} x {call.input_dim} input capsules, {call.parents} x {call.pose_dim} "
                f"class capsules, {call.iterations} iterations"
            )
        raise RuntimeError(
            f"the CPU routing kernel refused the call: {refusal.decode()} (batch {call.batch}, {sizes})"
        )


@torch.library.custom_op("capsnet_hf::pack_class_capsule_weight", mutates_args=())
def pack_class_capsule_weight(weight: Tensor, bf16_votes: bool, library: str) -> Tensor:
    """W [I, J, K, A] re-laid out as `route_class_capsules` reads it, [P / L, J, K, A, L] (with `bf16_votes`
    [P / L, J, K, ceil(A / 2), L] words of bf16 pairs). An op of its own so that a graph compiled with inductor's
    freezing, where the weight is a constant, runs it once at compile time rather than on every call."""
    kernel = _open_library(library)
    if weight.dim() != 4:
        raise ValueError(f"the class capsules' weight must be [I, J, K, A], got {tuple(weight.shape)}")
    no_inputs = weight.new_empty(0, weight.shape[0], weight.shape[3])  # a batch of 0: the call reads the weight only
    _, weight, _ = _checked_operands(no_inputs, weight, None)
    packed_weight = weight.new_empty(_forward_buffer_shapes(kernel, 0, weight, 1, False, bf16_votes)[0])
    call = _routing_call(no_inputs, weight, None, 1, False, 0.0, False, bf16_votes, kernel.capsnet_lanes())
    call.packed_weight = packed_weight.data_ptr()
    _run(kernel.capsnet_pack_weight, call)
    return packed_weight


@pack_class_capsule_weight.register_fake
def _(weight, bf16_votes, library):
    return weight.new_empty(_forward_buffer_shapes(_open_library(library), 0, weight, 1, False, bf16_votes)[0])


def _checked_packed_weight(
    packed_weight: Tensor, expected: tuple[int, ...], weight: Tensor, bf16_votes: bool
) -> Tensor:
    """`packed_weight` as the kernel reads it, or a ValueError if it is not `pack_class_capsule_weight`'s shape."""
    if packed_weight.shape != expected or packed_weight.dtype != torch.float32:
        raise ValueError(
            f"the packed weight {tuple(packed_weight.shape)} is not pack_class_capsule_weight's for the weight "
            f"{tuple(weight.shape)} (bf16_votes={bf16_votes}): expected float32 {expected}"
        )
    return packed_weight.contiguous()


@torch.library.custom_op("capsnet_hf::route_class_capsules", mutates_args=())
def route_class_capsules(
    primary_capsules: Tensor,
    weight: Tensor,
    packed_weight: Tensor,
    bias: Tensor | None,
    iterations: int,
    leaky: bool,
    epsilon: float,
    detach_inner_votes: bool,
    keep_for_backward: bool,
    bf16_votes: bool,
    library: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class capsules u [B, I, A], W [I, J, K, A] (its `pack_class_capsule_weight` as `packed_weight`, what the
    kernel reads; W itself for autograd), bias [J, K] -> poses v [B, J, K] and last couplings c [B, J, I] (Eq. 2,
    Procedure 1), as `CapsNetClassCapsules`, then the routing record (empty unless `keep_for_backward`) that
    `route_class_capsules_backward` reads; `library` is the kernel's path (`load_kernel_library`).
    `detach_inner_votes` only changes the gradient. `bf16_votes` (a build where `capsnet_bf16_votes()` is 1) computes
    the votes from u and W rounded to bfloat16, as the torch path's matmul does under bf16 autocast, in float32 sums;
    the rest stays float32."""
    kernel = _open_library(library)
    inputs, weight, bias = _checked_operands(primary_capsules, weight, bias)
    batch_size, num_inputs, _ = inputs.shape
    _, num_classes, capsule_dim, _ = weight.shape
    packed_shape, record_shape = _forward_buffer_shapes(
        kernel, batch_size, weight, iterations, keep_for_backward, bf16_votes
    )
    packed_weight = _checked_packed_weight(packed_weight, packed_shape, weight, bf16_votes)
    record = inputs.new_empty(record_shape)
    poses = inputs.new_empty(batch_size, num_classes, capsule_dim)
    coupling = inputs.new_empty(batch_size, num_classes, num_inputs)
    call = _routing_call(
        inputs, weight, bias, iterations, leaky, epsilon, detach_inner_votes, bf16_votes, kernel.capsnet_lanes()
    )
    call.packed_weight, call.poses, call.coupling = packed_weight.data_ptr(), poses.data_ptr(), coupling.data_ptr()
    call.record = record.data_ptr() if keep_for_backward else None
    _run(kernel.capsnet_route, call)
    return poses, coupling, record


@route_class_capsules.register_fake
def _(
    primary_capsules,
    weight,
    packed_weight,
    bias,
    iterations,
    leaky,
    epsilon,
    detach_inner_votes,
    keep_for_backward,
    bf16_votes,
    library,
):
    batch_size, num_inputs, _ = primary_capsules.shape
    _, num_classes, capsule_dim, _ = weight.shape
    poses = primary_capsules.new_empty(batch_size, num_classes, capsule_dim)
    coupling = primary_capsules.new_empty(batch_size, num_classes, num_inputs)
    shapes = _forward_buffer_shapes(
        _open_library(library), batch_size, weight, iterations, keep_for_backward, bf16_votes
    )
    return poses, coupling, primary_capsules.new_empty(shapes[1])


@torch.library.custom_op("capsnet_hf::route_class_capsules_backward", mutates_args=())
def route_class_capsules_backward(
    primary_capsules: Tensor,
    weight: Tensor,
    packed_weight: Tensor,
    record: Tensor,
    bias: Tensor | None,
    grad_poses: Tensor,
    grad_coupling: Tensor,
    iterations: int,
    leaky: bool,
    epsilon: float,
    detach_inner_votes: bool,
    bf16_votes: bool,
    library: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `route_class_capsules` w.r.t. u, W and the bias (zeros [J, K] without one), given those of its
    poses and couplings, from its inputs and the packed weight and routing record it kept (`keep_for_backward`);
    recomputes the votes rather than saving them. With `bf16_votes` they are the gradients w.r.t. u and W of the
    votes' rounded operands (a straight-through rounding)."""
    kernel = _open_library(library)
    inputs, weight, bias = _checked_operands(primary_capsules, weight, bias)
    batch_size, num_inputs, input_dim = inputs.shape
    _, num_classes, capsule_dim, _ = weight.shape
    lanes = kernel.capsnet_lanes()
    padded = _padded(num_inputs, lanes)
    expected = _forward_buffer_shapes(kernel, batch_size, weight, iterations, True, bf16_votes)
    if (packed_weight.shape, record.shape) != expected:
        raise ValueError(
            f"the packed weight {tuple(packed_weight.shape)} or routing record {tuple(record.shape)} is not what "
            "route_class_capsules kept for this backward (it keeps a record only with keep_for_backward)"
        )
    packed_weight, record = packed_weight.contiguous(), record.contiguous()
    # the inputs as [P / L, B, A, L], input-block major for the second phase, which runs over input blocks
    packed_inputs = inputs.new_empty(padded // lanes, batch_size, input_dim, lanes)
    terms = 1 if detach_inner_votes else 2 * iterations - 1
    left = inputs.new_empty(padded // lanes, batch_size, num_classes, terms, lanes)
    right = inputs.new_empty(batch_size, terms, num_classes, capsule_dim)
    if grad_poses.shape != (batch_size, num_classes, capsule_dim) or grad_coupling.shape != (
        batch_size,
        num_classes,
        num_inputs,
    ):
        raise ValueError(f"gradients {tuple(grad_poses.shape)} / {tuple(grad_coupling.shape)} do not fit the outputs")
    grad_poses, grad_coupling = grad_poses.float().contiguous(), grad_coupling.float().contiguous()
    grad_inputs = torch.empty_like(inputs)
    grad_weight = torch.empty_like(weight)
    grad_bias = inputs.new_empty(batch_size, num_classes, capsule_dim)
    call = _routing_call(inputs, weight, bias, iterations, leaky, epsilon, detach_inner_votes, bf16_votes, lanes)
    call.packed_inputs, call.packed_weight, call.record = (
        packed_inputs.data_ptr(),
        packed_weight.data_ptr(),
        record.data_ptr(),
    )
    call.grad_poses, call.grad_coupling = grad_poses.data_ptr(), grad_coupling.data_ptr()
    call.grad_inputs, call.grad_weight, call.grad_bias = (
        grad_inputs.data_ptr(),
        grad_weight.data_ptr(),
        grad_bias.data_ptr(),
    )
    call.left, call.right = left.data_ptr(), right.data_ptr()
    _run(kernel.capsnet_route_backward, call)
    return grad_inputs, grad_weight, grad_bias.sum(0)


@route_class_capsules_backward.register_fake
def _(
    primary_capsules,
    weight,
    packed_weight,
    record,
    bias,
    grad_poses,
    grad_coupling,
    iterations,
    leaky,
    epsilon,
    detach_inner_votes,
    bf16_votes,
    library,
):
    return torch.empty_like(primary_capsules), torch.empty_like(weight), weight.new_empty(weight.shape[1:3])


def _setup_context(ctx, inputs, output) -> None:
    primary_capsules, weight, packed_weight, bias, iterations, leaky, epsilon, detach_inner_votes = inputs[:8]
    bf16_votes, library = inputs[9:]  # after keep_for_backward
    record = output[2]
    ctx.mark_non_differentiable(record)
    # The weight itself, so that autograd refuses a backward after it was changed in place (version check).
    ctx.save_for_backward(primary_capsules, weight, packed_weight, record, bias)
    ctx.settings = iterations, leaky, epsilon, detach_inner_votes, bf16_votes, library


def _backward(ctx, grad_poses: Tensor, grad_coupling: Tensor, _grad_record):
    primary_capsules, weight, packed_weight, record, bias = ctx.saved_tensors
    grad_inputs, grad_weight, grad_bias = route_class_capsules_backward(
        primary_capsules, weight, packed_weight, record, bias, grad_poses, grad_coupling, *ctx.settings
    )
    grad_bias = None if bias is None else grad_bias
    return grad_inputs, grad_weight, None, grad_bias, None, None, None, None, None, None, None


route_class_capsules.register_autograd(_backward, setup_context=_setup_context)


def _primary_call(conv: Tensor, bias: Tensor | None, types: int, scale: float, epsilon: float) -> PrimaryCall:
    """The fields both primary-capsule entry points share, for the conv output [B, N * A, H, W] (a ValueError if
    it is not float32 on the CPU or does not split into `types` capsule types, or the bias is not [N, A])."""
    if conv.dtype != torch.float32 or conv.device.type != "cpu" or conv.dim() != 4 or conv.shape[1] % types:
        raise ValueError(
            f"the primary capsules' kernel takes a float32 CPU conv output [B, {types} * A, H, W], got "
            f"{conv.dtype} {tuple(conv.shape)} on {conv.device}"
        )
    batch_size, channels, height, width = conv.shape
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (types, channels // types)):
        raise ValueError(f"the primary capsules' bias {bias.dtype} {tuple(bias.shape)} is not float32 [N, A]")
    return PrimaryCall(
        conv=conv.data_ptr(),
        bias=None if bias is None else bias.data_ptr(),
        batch=batch_size,
        types=types,
        capsule_dim=channels // types,
        positions=height * width,
        threads=torch.get_num_threads(),
        scale=scale,
        epsilon=epsilon,
    )


@torch.library.custom_op("capsnet_hf::squash_primary_capsules", mutates_args=())
def squash_primary_capsules(
    conv: Tensor, bias: Tensor | None, types: int, scale: float, epsilon: float, library: str
) -> Tensor:
    """Primary capsules from their convolution's output, as `CapsNetPrimaryCapsules`: conv [B, N * A, H, W] ->
    u = squash(scale * conv + bias) (Eq. 1) [B, N * H * W, A], flattened type-major."""
    kernel = _open_library(library)
    conv = conv.contiguous()
    bias = None if bias is None else bias.contiguous()
    call = _primary_call(conv, bias, types, scale, epsilon)
    capsules = conv.new_empty(call.batch, types * call.positions, call.capsule_dim)
    call.capsules = capsules.data_ptr()
    _run(kernel.capsnet_squash_primary, call)
    return capsules


@squash_primary_capsules.register_fake
def _(conv, bias, types, scale, epsilon, library):
    batch_size, channels, height, width = conv.shape
    return conv.new_empty(batch_size, types * height * width, channels // types)


@torch.library.custom_op("capsnet_hf::squash_primary_capsules_backward", mutates_args=())
def squash_primary_capsules_backward(
    conv: Tensor, bias: Tensor | None, grad_capsules: Tensor, types: int, scale: float, epsilon: float, library: str
) -> tuple[Tensor, Tensor]:
    """Gradients of `squash_primary_capsules` w.r.t. the conv output and the bias (zeros [N, A] without one)."""
    kernel = _open_library(library)
    conv = conv.contiguous()
    bias = None if bias is None else bias.contiguous()
    call = _primary_call(conv, bias, types, scale, epsilon)
    expected = (call.batch, types * call.positions, call.capsule_dim)
    if tuple(grad_capsules.shape) != expected:
        raise ValueError(f"the capsules' gradient {tuple(grad_capsules.shape)} does not fit the outputs {expected}")
    grad_capsules = grad_capsules.float().contiguous()
    grad_conv = torch.empty_like(conv)
    grad_bias = conv.new_zeros(call.batch, types, call.capsule_dim)  # per example; left zero without a bias
    call.grad_capsules, call.grad_conv = grad_capsules.data_ptr(), grad_conv.data_ptr()
    call.grad_bias = None if bias is None else grad_bias.data_ptr()
    _run(kernel.capsnet_squash_primary_backward, call)
    return grad_conv, grad_bias.sum(0)


@squash_primary_capsules_backward.register_fake
def _(conv, bias, grad_capsules, types, scale, epsilon, library):
    return torch.empty_like(conv), conv.new_empty(types, conv.shape[1] // types)


def _setup_primary_context(ctx, inputs, output) -> None:
    conv, bias, *settings = inputs
    ctx.save_for_backward(conv, bias)
    ctx.settings = settings


def _primary_backward(ctx, grad_capsules: Tensor):
    conv, bias = ctx.saved_tensors
    grad_conv, grad_bias = squash_primary_capsules_backward(conv, bias, grad_capsules, *ctx.settings)
    return grad_conv, None if bias is None else grad_bias, None, None, None, None


squash_primary_capsules.register_autograd(_primary_backward, setup_context=_setup_primary_context)


class CpuRoutingKernel:
    """What `enable_cpu_routing_kernel` sets as a class-capsule layer's `routing_kernel`: the layer routes the inputs
    the kernel `supports` with it, (layer, primary capsules [B, I, A]) -> poses [B, J, K], couplings [B, J, I].

    The weight is re-laid out on every forward call (`pack_class_capsule_weight`; its backward reuses that copy): a
    cached copy cannot tell when the weight has changed, since in-place updates such as torch's fused Adam do not
    bump its version. A graph compiled with inductor's freezing, whose weights are constants, re-lays it out once. Under CPU
    bf16 autocast, where the build has them (`bf16_votes`: AVX512-BF16), the votes are computed from bf16-rounded
    inputs and weight, as autocast's matmul would (docs/performance.md); elsewhere all in float32.
    """

    def __init__(self, cache_dir: str | None = None):
        library = load_kernel_library(cache_dir)
        self.library_path = library._name
        self.bf16_votes = bool(library.capsnet_bf16_votes())

    @staticmethod
    def supports(primary_capsules: Tensor, weight: Tensor) -> bool:
        """Whether the kernel routes these: float32 capsules and weight on the CPU."""
        return primary_capsules.device.type == "cpu" and primary_capsules.dtype == weight.dtype == torch.float32

    def __call__(self, layer: nn.Module, primary_capsules: Tensor) -> tuple[Tensor, Tensor]:
        num_inputs, _, _, input_dim = layer.weight.shape
        if primary_capsules.dim() != 3 or tuple(primary_capsules.shape[1:]) != (num_inputs, input_dim):
            raise ValueError(
                f"primary capsules of shape {tuple(primary_capsules.shape)} do not fit this layer's weight "
                f"{tuple(layer.weight.shape)}: expected (batch, {num_inputs}, {input_dim})"
            )
        # the routing record costs the forward a write of ~100 KB per example, which inference need not pay
        keep_for_backward = torch.is_grad_enabled() and (primary_capsules.requires_grad or layer.weight.requires_grad)
        bf16_votes = (
            self.bf16_votes and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        packed_weight = pack_class_capsule_weight(layer.weight.detach(), bf16_votes, self.library_path)
        poses, coupling, _ = route_class_capsules(
            primary_capsules,
            layer.weight,
            packed_weight,
            layer.bias,
            layer.routing_iterations,
            layer.leaky_routing,
            layer.epsilon,
            layer.detach_inner_votes,
            keep_for_backward,
            bf16_votes,
            self.library_path,
        )
        return poses, coupling


class CpuPrimaryCapsulesKernel:
    """What `enable_cpu_routing_kernel` sets as a primary-capsule layer's `squash_kernel`: (layer, its conv output
    [B, N * A, H, W]) -> primary capsules [B, N * H * W, A] in one pass, where the torch path runs about twenty
    elementwise ops forward and backward (docs/performance.md). Float32 conv outputs, and bf16/fp16 ones under
    autocast: like the torch path's squash it computes in float32."""

    def __init__(self, cache_dir: str | None = None):
        self.library_path = load_kernel_library(cache_dir)._name

    @staticmethod
    def supports(conv_output: Tensor) -> bool:
        return conv_output.device.type == "cpu" and conv_output.dtype in (torch.float32, torch.bfloat16, torch.float16)

    def __call__(self, layer: nn.Module, conv_output: Tensor) -> Tensor:
        return squash_primary_capsules(
            conv_output.float(),
            layer.bias.float(),
            layer.num_types,
            layer.routing_scale,
            layer.epsilon,
            self.library_path,
        )


def _layers_with(model: nn.Module, kernel_attribute: str) -> list[nn.Module]:
    """The layers of `model` that take a kernel as `kernel_attribute` (routing_kernel, squash_kernel)."""
    return [module for module in model.modules() if hasattr(module, kernel_attribute)]


def _class_capsule_layers(model: nn.Module, required: bool = True) -> list[nn.Module]:
    layers = _layers_with(model, "routing_kernel")
    if required and not layers:
        raise ValueError(f"{type(model).__name__} has no CapsNet class-capsule layer to attach the kernel to")
    return layers


def enable_cpu_routing_kernel(model: nn.Module, cache_dir: str | None = None) -> nn.Module:
    """Build the kernel if needed and use it in every class-capsule layer of `model` (a CapsNet model), and for the
    squash of every primary-capsule layer; returns the model.

    Raises `KernelBuildError` if it cannot be built (no C++ compiler, ...); the model is then left unchanged.
    """
    layers = _class_capsule_layers(model)
    routing, primary = CpuRoutingKernel(cache_dir), CpuPrimaryCapsulesKernel(cache_dir)
    for layer in layers:
        layer.routing_kernel = routing
    for layer in _layers_with(model, "squash_kernel"):
        layer.squash_kernel = primary
    return model


def disable_cpu_routing_kernel(model: nn.Module) -> nn.Module:
    """Back to the torch formulation in every class- and primary-capsule layer of `model`; returns it."""
    for layer in _class_capsule_layers(model):
        layer.routing_kernel = None
    for layer in _layers_with(model, "squash_kernel"):
        layer.squash_kernel = None
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
    float32 under bf16/fp16 autocast too (squash computes in float32), so there the class capsules run in float32,
    except for bf16 autocast's votes from bf16-rounded operands on CPUs with AVX512-BF16 (`CpuRoutingKernel`).
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
