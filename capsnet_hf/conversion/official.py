"""Convert the official TensorFlow CapsNet checkpoints (Sabour's `research/capsules`) into Hub model folders.

    capsnet-convert --checkpoint mnist_checkpoint/model.ckpt-1 --output_dir capsnet-mnist-official
    capsnet-convert --checkpoint 'cifar/cifar{}/model.ckpt-600000' --num_trials 7 --output_dir capsnet-cifar10-official

The checkpoint is read without TensorFlow (`capsnet_hf.tf_checkpoint`). The geometry (input channels and size,
conv1 channels and kernel, primary capsule types/dimension/kernel, classes, class capsule dimension, decoder) is
inferred from the variables' shapes; the dataset kind follows from the input channels (1: MNIST, 3: CIFAR-10) and
sets what the checkpoint does not record: padding, leaky routing and preprocessing, exactly as the official
README's commands (MNIST: VALID, no leak, x/255; CIFAR-10: SAME, leaky, centre crop to 24 and per-image
standardization on the 0..255 scale). The routing iterations (3) and primary stride (2) are the official code's.

Mapping (official variable -> `CapsNetForImageClassification` parameter, member m):

    conv1/weights [k,k,C,256] HWIO      -> capsnet.members.m.conv1.weight [256,C,k,k] (OIHW)
    conv1/biases [256]                  -> capsnet.members.m.conv1.bias
    conv_capsule1/weights [k,k,256,N*8] -> capsnet.members.m.primary_capsules.conv.weight [N*8,256,k,k]
                                           (unscaled: the model applies the official 1/N, 1/(N+1) when leaky)
    conv_capsule1/biases [N,8,1,1]      -> capsnet.members.m.primary_capsules.bias [N,8]
    capsule2/weights [I,8,J*16]         -> capsnet.members.m.class_capsules.weight [I,J,16,8]
    capsule2/biases [J,16]              -> capsnet.members.m.class_capsules.bias
    recons/recons_n/weights [in,out]    -> decoder.layers.(n-1).weight [out,in]; biases likewise

`global_step`, `beta1_power`, `beta2_power` and the Adam slots (`*/Adam`, `*/Adam_1`) are ignored. The output
folder is written to a temporary folder next to `--output_dir` and moved into place only once everything,
including the parity check, has succeeded.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cli import give_usual_file_modes
from ..configuration_capsnet import CapsNetConfig, conv_output_size
from ..hub import render_model_card
from ..image_processing_capsnet import CapsNetImageProcessor
from ..modeling_capsnet import LOGIT_EPSILON, CapsNetForImageClassification
from .tf_checkpoint import CheckpointError, TFCheckpointReader

OFFICIAL_REPOSITORY = "https://github.com/Sarasra/models/tree/master/research/capsules"
CARD_TEMPLATE = "converted_official"  # model_cards/converted_official.md
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("mnist", "cifar10")
PRIMARY_STRIDE = 2  # hard-coded in the official capsule_model.py
ROUTING_ITERATIONS = 3  # the official default hparams (routing=3), used by both released models
PARITY_IMAGES = 2  # fixed random inputs of the parity check
IGNORED = re.compile(r"^(global_step|beta1_power|beta2_power)$|/Adam(_1)?$")
REQUIRED = (
    "conv1/weights",
    "conv1/biases",
    "conv_capsule1/weights",
    "conv_capsule1/biases",
    "capsule2/weights",
    "capsule2/biases",
)
DECODER = tuple(f"recons/recons_{n}/{kind}" for n in (1, 2, 3) for kind in ("weights", "biases"))


@dataclass(frozen=True)
class OfficialGeometry:
    """Everything about a checkpoint's network that its variables' shapes determine."""

    num_channels: int
    conv1_channels: int
    conv1_kernel_size: int
    primary_capsule_types: int
    primary_capsule_dim: int
    primary_kernel_size: int
    num_primary_capsules: int
    num_classes: int
    capsule_dim: int
    decoder_sizes: tuple[int, ...] | None  # (hidden1, hidden2, output pixels) or None

    def image_sizes(self, padding: str) -> list[int]:
        """Square input sizes (ascending) that give this checkpoint's primary capsule grid with `padding`."""
        grid = math.isqrt(self.num_primary_capsules // self.primary_capsule_types)
        limit = 2 * grid + self.conv1_kernel_size + self.primary_kernel_size + 2
        return [size for size in range(1, limit) if _grid(size, self, padding) == grid]


def _grid(size: int, geometry: OfficialGeometry, padding: str) -> int:
    conv1 = conv_output_size(size, geometry.conv1_kernel_size, 1, padding)
    return conv_output_size(conv1, geometry.primary_kernel_size, PRIMARY_STRIDE, padding) if conv1 >= 1 else 0


def _shape_error(prefix: str, message: str) -> CheckpointError:
    return CheckpointError(f"{prefix}: shapes do not fit the official CapsNet: {message}")


def infer_geometry(variables: dict[str, tuple[str, tuple[int, ...]]], prefix: str) -> OfficialGeometry:
    """Read the CapsNet geometry off `TFCheckpointReader.variables()`; `CheckpointError` names what does not fit."""
    missing = [name for name in REQUIRED if name not in variables]
    if missing:
        raise CheckpointError(
            f"{prefix} is not an official CapsNet checkpoint: missing variable(s) {', '.join(missing)} "
            f"(it has {', '.join(sorted(n for n in variables if not IGNORED.search(n))[:8]) or 'no model variables'})"
        )
    unexpected = [n for n in variables if not IGNORED.search(n) and n not in REQUIRED and n not in DECODER]
    if unexpected:
        raise CheckpointError(
            f"{prefix} has variable(s) the official CapsNet graph does not: {', '.join(sorted(unexpected))}"
        )
    for name in (*REQUIRED, *DECODER):
        if name in variables and variables[name][0] != "float32":
            raise CheckpointError(f"{prefix}: variable {name} has dtype {variables[name][0]}, expected float32")
    shape = {name: variables[name][1] for name in (*REQUIRED, *DECODER) if name in variables}
    empty = [name for name, dims in shape.items() if 0 in dims]
    if empty:
        raise _shape_error(prefix, f"variable(s) with a zero dimension: {', '.join(empty)}")

    def expect(name: str, rank: int) -> tuple[int, ...]:
        if len(shape[name]) != rank:
            raise _shape_error(prefix, f"{name} has shape {list(shape[name])}, expected rank {rank}")
        return shape[name]

    k1, k1b, channels, conv1_channels = expect("conv1/weights", 4)
    kp, kpb, conv1_in, primary_out = expect("conv_capsule1/weights", 4)
    types, atoms, one, one_b = expect("conv_capsule1/biases", 4)
    inputs, input_atoms, votes = expect("capsule2/weights", 3)
    classes, capsule_dim = expect("capsule2/biases", 2)
    checks = [
        (k1 == k1b, f"conv1/weights kernel {k1}x{k1b} is not square"),
        (expect("conv1/biases", 1) == (conv1_channels,), f"conv1/biases {list(shape['conv1/biases'])} != [{conv1_channels}]"),
        (kp == kpb, f"conv_capsule1/weights kernel {kp}x{kpb} is not square"),
        (conv1_in == conv1_channels, f"conv_capsule1/weights takes {conv1_in} channels but conv1 gives {conv1_channels}"),
        ((one, one_b) == (1, 1), f"conv_capsule1/biases has shape {list(shape['conv_capsule1/biases'])}, expected [N, 8, 1, 1]"),
        (types * atoms == primary_out, f"conv_capsule1/weights has {primary_out} output channels, biases say {types}x{atoms}"),
        (input_atoms == atoms, f"capsule2/weights takes {input_atoms}-D capsules, primary capsules are {atoms}-D"),
        (classes * capsule_dim == votes, f"capsule2/weights has {votes} outputs per input, biases say {classes}x{capsule_dim}"),
        (inputs % types == 0 and math.isqrt(inputs // types) ** 2 == inputs // types,
         f"capsule2/weights has {inputs} input capsules, not {types} types on a square grid"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise _shape_error(prefix, message)
    decoder_sizes = None
    present = [name for name in DECODER if name in shape]
    if present:
        if len(present) != len(DECODER):
            missing = ", ".join(n for n in DECODER if n not in shape)
            raise _shape_error(prefix, f"incomplete decoder: missing {missing}")
        sizes = [classes * capsule_dim]
        for n in (1, 2, 3):
            n_in, n_out = expect(f"recons/recons_{n}/weights", 2)
            if n_in != sizes[-1] or expect(f"recons/recons_{n}/biases", 1) != (n_out,):
                raise _shape_error(
                    prefix, f"decoder layer recons_{n} has shape {[n_in, n_out]} after {sizes[-1]} inputs"
                )
            sizes.append(n_out)
        decoder_sizes = tuple(sizes[1:])
    return OfficialGeometry(
        num_channels=channels,
        conv1_channels=conv1_channels,
        conv1_kernel_size=k1,
        primary_capsule_types=types,
        primary_capsule_dim=atoms,
        primary_kernel_size=kp,
        num_primary_capsules=inputs,
        num_classes=classes,
        capsule_dim=capsule_dim,
        decoder_sizes=decoder_sizes,
    )


# ----------------------------------------------------------------------------------------------------------------
# Dataset presets, configuration and the parameter mapping.
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetPreset:
    """What the official README's command line sets for a dataset (not recorded in the checkpoint)."""

    padding: str
    leaky_routing: bool
    archive: str

    def image_processor(self, config: CapsNetConfig) -> CapsNetImageProcessor:
        if self.padding == "same":  # CIFAR-10: centre crop (or pad) to the input size, per-image standardization
            return CapsNetImageProcessor.from_model_config(
                config, resize_mode="crop_or_pad", do_rescale=False, do_standardize=True
            )
        return CapsNetImageProcessor.from_model_config(config)  # MNIST: x * (1/255)


PRESETS = {
    "mnist": DatasetPreset("valid", False, "mnist_checkpoints.tar.gz"),
    "cifar10": DatasetPreset("same", True, "cifar_checkpoints.tar.gz"),
}


def infer_dataset(geometry: OfficialGeometry, prefix: str) -> str:
    """MNIST for 1 input channel, CIFAR-10 for 3; anything else needs `--dataset`."""
    if geometry.num_channels == 1:
        return "mnist"
    if geometry.num_channels == 3:
        return "cifar10"
    raise CheckpointError(
        f"{prefix}: cannot infer the dataset from {geometry.num_channels} input channels; pass --dataset"
    )


def resolve_image_size(geometry: OfficialGeometry, preset: DatasetPreset, prefix: str, requested: int | None) -> int:
    """The input size: from the decoder's output when there is one, else the largest size giving the grid."""
    candidates = geometry.image_sizes(preset.padding)
    if geometry.decoder_sizes is not None:
        pixels = geometry.decoder_sizes[-1]
        side = math.isqrt(pixels // geometry.num_channels)
        if side * side * geometry.num_channels != pixels or side not in candidates:
            raise _shape_error(
                prefix,
                f"the decoder outputs {pixels} pixels, which is no {geometry.num_channels}-channel square image "
                f"giving {geometry.num_primary_capsules // geometry.primary_capsule_types} capsule positions",
            )
        candidates = [side]
    if not candidates:
        raise _shape_error(
            prefix,
            f"no input size gives {geometry.num_primary_capsules} primary capsules with {preset.padding} padding",
        )
    if requested is not None:
        if requested not in candidates:
            raise CheckpointError(f"{prefix}: --image_size {requested} does not fit; possible sizes: {candidates}")
        return requested
    return candidates[-1]


def build_config(
    geometry: OfficialGeometry, dataset: str, image_size: int, num_members: int, use_decoder: bool
) -> CapsNetConfig:
    """The `CapsNetConfig` of a converted checkpoint: its geometry plus the dataset preset and official constants."""
    preset = PRESETS[dataset]
    labels = None
    if geometry.num_classes == 10:
        labels = [str(i) for i in range(10)] if dataset == "mnist" else list(CIFAR10_LABELS)
    label_kwargs = (
        {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
        if labels
        else {"num_labels": geometry.num_classes}
    )
    return CapsNetConfig(
        num_channels=geometry.num_channels,
        image_size=image_size,
        conv1_channels=geometry.conv1_channels,
        conv1_kernel_size=geometry.conv1_kernel_size,
        primary_capsule_types=geometry.primary_capsule_types,
        primary_capsule_dim=geometry.primary_capsule_dim,
        primary_kernel_size=geometry.primary_kernel_size,
        primary_stride=PRIMARY_STRIDE,
        padding=preset.padding,
        capsule_dim=geometry.capsule_dim,
        routing_iterations=ROUTING_ITERATIONS,
        leaky_routing=preset.leaky_routing,
        routing_bias=True,
        use_decoder=use_decoder,
        num_ensemble_members=num_members,
        **({"decoder_hidden_sizes": list(geometry.decoder_sizes[:-1])} if use_decoder else {}),
        **label_kwargs,
    )


def read_arrays(reader: TFCheckpointReader, use_decoder: bool) -> dict[str, np.ndarray]:
    """The model variables of one checkpoint (optimizer slots and counters are never read)."""
    names = REQUIRED + (DECODER if use_decoder else ())
    return {name: reader.read(name) for name in names}


def member_state_dict(arrays: dict[str, np.ndarray], member: int) -> dict[str, torch.Tensor]:
    """Official arrays of one checkpoint -> `capsnet.members.{member}.*` tensors (see the module docstring)."""
    inputs, atoms, _ = arrays["capsule2/weights"].shape
    classes, capsule_dim = arrays["capsule2/biases"].shape
    prefix = f"capsnet.members.{member}."
    tensors = {
        "conv1.weight": arrays["conv1/weights"].transpose(3, 2, 0, 1),
        "conv1.bias": arrays["conv1/biases"],
        "primary_capsules.conv.weight": arrays["conv_capsule1/weights"].transpose(3, 2, 0, 1),
        "primary_capsules.bias": arrays["conv_capsule1/biases"][:, :, 0, 0],
        # W[i, a, j*K + k] -> W[i, j, k, a]
        "class_capsules.weight": arrays["capsule2/weights"].reshape(inputs, atoms, classes, capsule_dim).transpose(0, 2, 3, 1),
        "class_capsules.bias": arrays["capsule2/biases"],
    }  # fmt: skip
    return {prefix + name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in tensors.items()}


def decoder_state_dict(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """`recons/recons_n/{weights [in, out], biases}` -> `decoder.layers.(n-1).{weight [out, in], bias}`."""
    state = {}
    for n in (1, 2, 3):
        state[f"decoder.layers.{n - 1}.weight"] = torch.from_numpy(
            np.ascontiguousarray(arrays[f"recons/recons_{n}/weights"].T)
        )
        state[f"decoder.layers.{n - 1}.bias"] = torch.from_numpy(arrays[f"recons/recons_{n}/biases"].copy())
    return state


# ----------------------------------------------------------------------------------------------------------------
# Reference forward pass, straight from the checkpoint arrays (NumPy, float64), for the parity check.
# ----------------------------------------------------------------------------------------------------------------


def _conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """TensorFlow `conv2d` (NHWC input, HWIO kernel); "same" puts the odd extra padding at the bottom/right."""
    size = kernel.shape[0]
    if padding == "same":
        pads = []
        for n in x.shape[1:3]:
            total = max((-(-n // stride) - 1) * stride + size - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), *pads, (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("bhwcyx,yxco->bhwo", windows, kernel, optimize=True)


def _squash(s: np.ndarray) -> np.ndarray:
    squared = (s * s).sum(-1, keepdims=True)
    return s / np.sqrt(squared) * squared / (1 + squared)


def _softmax(logits: np.ndarray, leaky: bool) -> np.ndarray:
    if leaky:
        logits = np.concatenate([np.zeros_like(logits[..., :1]), logits], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    route = e / e.sum(-1, keepdims=True)
    return route[..., 1:] if leaky else route


def reference_forward(
    arrays: dict[str, np.ndarray],
    pixel_values: np.ndarray,
    padding: str,
    leaky: bool,
    routing_iterations: int = ROUTING_ITERATIONS,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The official forward pass in NumPy float64 on the checkpoint's own layouts.

    pixel_values [B, C, H, W] -> capsule_lengths [B, J], capsule_poses [B, J, K], primary_capsules [B, I, A] and,
    with decoder arrays, reconstructions [B, C, H, W] masked by `labels` (default: the predicted class).
    """
    a = {name: value.astype(np.float64) for name, value in arrays.items()}
    x = pixel_values.astype(np.float64).transpose(0, 2, 3, 1)
    hidden = np.maximum(_conv2d_nhwc(x, a["conv1/weights"], 1, padding) + a["conv1/biases"], 0)
    types, atoms = a["conv_capsule1/biases"].shape[:2]
    primary = _conv2d_nhwc(hidden, a["conv_capsule1/weights"], PRIMARY_STRIDE, padding) / (types + int(leaky))
    batch, height, width, _ = primary.shape
    primary = primary.reshape(batch, height, width, types, atoms) + a["conv_capsule1/biases"][:, :, 0, 0]
    u = _squash(primary.transpose(0, 3, 1, 2, 4).reshape(batch, types * height * width, atoms))
    classes, capsule_dim = a["capsule2/biases"].shape
    votes = np.einsum("bia,iao->bio", u, a["capsule2/weights"]).reshape(batch, -1, classes, capsule_dim)
    logits = np.zeros(votes.shape[:3])
    for _ in range(routing_iterations):
        route = _softmax(logits, leaky)
        poses = _squash(np.einsum("bij,bijk->bjk", route, votes) + a["capsule2/biases"])
        logits = logits + np.einsum("bijk,bjk->bij", votes, poses)
    lengths = np.sqrt((poses * poses).sum(-1))
    out = {"capsule_lengths": lengths, "capsule_poses": poses, "primary_capsules": u}
    if "recons/recons_1/weights" in a:
        mask = np.eye(classes)[lengths.argmax(-1) if labels is None else labels]
        hidden = (poses * mask[..., None]).reshape(batch, -1)
        for n in (1, 2, 3):
            hidden = hidden @ a[f"recons/recons_{n}/weights"] + a[f"recons/recons_{n}/biases"]
            hidden = np.maximum(hidden, 0) if n < 3 else 1 / (1 + np.exp(-hidden))
        out["reconstructions"] = hidden.reshape(pixel_values.shape)
    return out


@dataclass
class ParityReference:
    """Fixed inputs [B, C, H, W] and `reference_forward` outputs of every ensemble member on them."""

    pixel_values: np.ndarray
    members: list[dict[str, np.ndarray]]


def parity_reference(
    member_arrays: list[dict[str, np.ndarray]], config: CapsNetConfig, preset: DatasetPreset
) -> ParityReference:
    """Reference outputs on `PARITY_IMAGES` fixed random inputs: uniform in [0, 1] for MNIST, standard normal
    (standardized images) for CIFAR-10."""
    rng = np.random.default_rng(0)
    shape = (PARITY_IMAGES, config.num_channels, *config.image_size)
    pixels = rng.uniform(0, 1, shape) if preset.padding == "valid" else rng.normal(0, 1, shape)
    pixels = pixels.astype(np.float32)
    return ParityReference(
        pixels, [reference_forward(a, pixels, preset.padding, preset.leaky_routing) for a in member_arrays]
    )


def measure_parity(folder: Path, reference: ParityReference) -> dict[str, float]:
    """Load the converted folder and compare it with the reference forward pass.

    Returns the max absolute differences: `logits` (`logit(capsule length)`, the model's logits), `capsule_lengths`
    (the official code's "logits"; summed over members for an ensemble), `capsule_poses` (every member) and
    `reconstructions` (decoder, masked by the reference's predicted class).
    """
    model = CapsNetForImageClassification.from_pretrained(folder).eval()
    pixels, refs = reference.pixel_values, reference.members
    num_images = len(pixels)
    summed = sum(ref["capsule_lengths"] for ref in refs)
    labels = summed.argmax(-1)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), labels=torch.from_numpy(labels) if model.decoder is not None else None)
    poses = out.capsule_poses.numpy().reshape(num_images, len(refs), *refs[0]["capsule_poses"].shape[1:])
    ref_lengths = summed / len(refs)
    ref_logits = np.log(np.clip(ref_lengths, LOGIT_EPSILON, 1 - LOGIT_EPSILON)) - np.log1p(
        -np.clip(ref_lengths, LOGIT_EPSILON, 1 - LOGIT_EPSILON)
    )
    parity = {
        "logits": float(np.abs(out.logits.numpy() - ref_logits).max()),
        "capsule_lengths": float(np.abs(out.capsule_lengths.numpy() * len(refs) - summed).max()),
        "capsule_poses": float(max(np.abs(poses[:, m] - ref["capsule_poses"]).max() for m, ref in enumerate(refs))),
    }
    if out.reconstructions is not None:
        parity["reconstructions"] = float(np.abs(out.reconstructions.numpy() - refs[0]["reconstructions"]).max())
    return parity


def parity_error(parity: dict[str, float]) -> float:
    """The difference judged against `--tolerance`: lengths, poses and reconstructions, which are bounded. The
    logits are reported but not judged: logit(p) has slope 1/(p(1-p)), so a 1e-7 difference in a length of
    0.9999 becomes 1e-3 in its logit without any error in the conversion. Any NaN or infinity is an infinite
    error (a NaN compared with the tolerance would pass)."""
    if not all(math.isfinite(value) for value in parity.values()):
        return math.inf
    return max(value for name, value in parity.items() if name != "logits")


# ----------------------------------------------------------------------------------------------------------------
# Conversion, model card, Hub upload, command line.
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_members(pattern: str, num_trials: int) -> list[str]:
    """Checkpoint prefixes of the ensemble: `pattern` with `{}` replaced by 0..num_trials-1 (as the official
    `evaluate_ensemble`), or `[pattern]` for a single checkpoint. Raises `CheckpointError` if any is missing."""
    if num_trials < 1:
        raise CheckpointError(f"--num_trials must be at least 1, got {num_trials}")
    if "{}" not in pattern:
        if num_trials > 1:
            raise CheckpointError(f"--num_trials {num_trials} needs a checkpoint pattern with '{{}}', got {pattern!r}")
        return [latest_checkpoint(pattern) if Path(pattern).is_dir() else pattern]
    prefixes = [pattern.replace("{}", str(trial)) for trial in range(num_trials)]
    missing = [p for p in prefixes if not Path(re.sub(r"\.index$", "", p) + ".index").is_file()]
    if len(missing) == len(prefixes):
        raise CheckpointError(
            f"checkpoint pattern {pattern!r} matches no files: no {prefixes[0]}.index ... {prefixes[-1]}.index"
        )
    if missing:
        raise CheckpointError(
            f"checkpoint pattern {pattern!r}: ensemble member(s) missing: {', '.join(p + '.index' for p in missing)}"
        )
    return prefixes


def latest_checkpoint(folder: str) -> str:
    """The checkpoint prefix of a folder: `model_checkpoint_path` of its `checkpoint` file, else its only `.index`."""
    state = Path(folder) / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.MULTILINE)
        if match:
            return str(Path(folder) / match.group(1))
    indexes = sorted(Path(folder).glob("*.index"))
    if len(indexes) != 1:
        found = ", ".join(p.name for p in indexes) or "none"
        raise CheckpointError(f"{folder} is a folder: pass a checkpoint prefix (its .index files: {found})")
    return str(indexes[0])[: -len(".index")]


def display_checkpoint(pattern: str) -> str:
    """The checkpoint path as it appears inside the official archive (no local directories)."""
    parts = Path(re.sub(r"\.index$", "", pattern)).parts
    return "/".join(parts[-3:] if "{}" in pattern and len(parts) >= 3 else parts[-2:])


@dataclass
class ConversionResult:
    """What `convert` wrote: the folder, its configuration, the dataset kind and the measured parity."""

    folder: Path
    config: CapsNetConfig
    dataset: str
    parity: dict[str, float]
    reference: ParityReference


def convert(
    checkpoint: str,
    output_dir: str | os.PathLike,
    num_trials: int = 1,
    dataset: str | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    hub_model_id: str | None = None,
) -> ConversionResult:
    """Convert one official checkpoint, or an ensemble (`checkpoint` with `{}`), into a model folder.

    The folder holds `model.safetensors`, `config.json`, `preprocessor_config.json`, the remote code files and a
    model card; it appears only once the converted model reproduces the NumPy reference forward pass of every
    member to `tolerance` (max absolute difference of capsule lengths, poses and reconstructions).
    """
    output_dir = Path(output_dir)
    model_id = hub_model_id or output_dir.name
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {output_dir} exists; pass --overwrite_output_dir to replace it")
    if dataset is not None and dataset not in PRESETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    readers = [TFCheckpointReader(prefix) for prefix in checkpoint_members(checkpoint, num_trials)]
    geometries = [infer_geometry(reader.variables(), reader.prefix) for reader in readers]
    for reader, geometry in zip(readers[1:], geometries[1:], strict=True):
        if geometry != geometries[0]:
            raise CheckpointError(
                f"ensemble members differ: {reader.prefix} has {geometry}, {readers[0].prefix} has {geometries[0]}"
            )
    geometry = geometries[0]
    dataset_given = dataset
    dataset = dataset or infer_dataset(geometry, readers[0].prefix)
    preset = PRESETS[dataset]
    size = resolve_image_size(geometry, preset, readers[0].prefix, image_size)
    use_decoder = geometry.decoder_sizes is not None and len(readers) == 1
    if geometry.decoder_sizes is not None and not use_decoder:
        print("note: the members' reconstruction decoders are dropped (an ensemble has none)", file=sys.stderr)
    member_arrays = [read_arrays(reader, use_decoder) for reader in readers]

    config = build_config(geometry, dataset, size, len(readers), use_decoder)
    model = CapsNetForImageClassification(config)
    state = {}
    for member, arrays in enumerate(member_arrays):
        state.update(member_state_dict(arrays, member))
    if use_decoder:
        state.update(decoder_state_dict(member_arrays[0]))
    model.load_state_dict(state, strict=True)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        preset.image_processor(config).save_pretrained(staging)
        reference = parity_reference(member_arrays, config, preset)
        parity = measure_parity(staging, reference)
        if parity_error(parity) > tolerance:
            raise RuntimeError(f"the converted model does not reproduce the checkpoint's forward pass: {parity}")
        write_model_card(
            staging,
            config=config,
            num_parameters=sum(p.numel() for p in model.parameters()),
            dataset=dataset,
            checkpoint=checkpoint,
            readers=readers,
            parity=parity,
            command=conversion_command(checkpoint, len(readers), dataset_given, image_size, Path(model_id).name),
            model_id=model_id,
        )
        if output_dir.exists():
            shutil.rmtree(output_dir)
        give_usual_file_modes(staging)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionResult(output_dir, config, dataset, parity, reference)


def conversion_command(
    checkpoint: str, num_trials: int, dataset: str | None, image_size: int | None, name: str
) -> str:
    args = ["python", "conversion/convert_official_tf_checkpoint.py", "--checkpoint", display_checkpoint(checkpoint)]
    if num_trials > 1:
        args += ["--num_trials", str(num_trials)]
    if dataset is not None:
        args += ["--dataset", dataset]
    if image_size is not None:
        args += ["--image_size", str(image_size)]
    return shlex.join(args + ["--output_dir", name])


def write_model_card(
    folder: Path,
    config: CapsNetConfig,
    num_parameters: int,
    dataset: str,
    checkpoint: str,
    readers: list[TFCheckpointReader],
    parity: dict[str, float],
    command: str,
    model_id: str,
) -> None:
    """Render model_cards/converted_official.md into `folder/README.md` (provenance, command, measured parity)."""
    preset = PRESETS[dataset]
    card_data = {
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "datasets": ["ylecun/mnist" if dataset == "mnist" else "uoft-cs/cifar10"],
        "tags": ["capsnet", "capsule-network", "dynamic-routing", "converted-from-tensorflow"],
    }
    members = [
        {
            "name": display_checkpoint(checkpoint).replace("{}", str(trial)),
            "sha256": hashlib.sha256(reader.index_path.read_bytes()).hexdigest(),
        }
        for trial, reader in enumerate(readers)
    ]
    fields = {
        "model_id": model_id,
        "dataset": dataset,
        "dataset_title": "MNIST" if dataset == "mnist" else "CIFAR-10",
        "original_repository": OFFICIAL_REPOSITORY,
        "archive": preset.archive,
        "checkpoint": display_checkpoint(checkpoint),
        "members": members,
        "num_members": len(readers),
        "command": command,
        "parity": parity,
        "parity_images": PARITY_IMAGES,
        "config": config,
        "num_parameters": num_parameters,
        "preprocessing": (
            "x / 255"
            if preset.padding == "valid"
            else f"centre crop (or zero pad) to {config.image_size[0]}x{config.image_size[1]}, then per-image "
            "standardization (x - mean) / max(std, 1/sqrt(N)) on the 0..255 scale"
        ),
    }
    render_model_card(CARD_TEMPLATE, fields, card_data).save(folder / "README.md")
