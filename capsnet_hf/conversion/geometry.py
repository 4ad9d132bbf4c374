"""The network an official checkpoint holds, read off its variables' shapes, and the `CapsNetConfig` it becomes
(with what the checkpoint does not record: the dataset preset of the official README's commands)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..configuration_capsnet import CapsNetConfig, conv_output_size
from ..image_processing_capsnet import CapsNetImageProcessor
from .tf_checkpoint import CheckpointError

PRIMARY_STRIDE = 2  # hard-coded in the official capsule_model.py
ROUTING_ITERATIONS = 3  # the official default hparams (routing=3), used by both released models
IGNORED = re.compile(r"^(global_step|beta1_power|beta2_power)$|/Adam(_1)?$")  # training state, never read
REQUIRED = (
    "conv1/weights",
    "conv1/biases",
    "conv_capsule1/weights",
    "conv_capsule1/biases",
    "capsule2/weights",
    "capsule2/biases",
)
DECODER = tuple(f"recons/recons_{n}/{kind}" for n in (1, 2, 3) for kind in ("weights", "biases"))
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Variables = dict[str, tuple[str, tuple[int, ...]]]  # `TFCheckpointReader.variables()`: name -> (dtype, shape)


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
        return [size for size in range(1, limit) if self._grid(size, padding) == grid]

    def _grid(self, size: int, padding: str) -> int:
        conv1 = conv_output_size(size, self.conv1_kernel_size, 1, padding)
        return conv_output_size(conv1, self.primary_kernel_size, PRIMARY_STRIDE, padding) if conv1 >= 1 else 0


def _shape_error(prefix: str, message: str) -> CheckpointError:
    return CheckpointError(f"{prefix}: shapes do not fit the official CapsNet: {message}")


def infer_geometry(variables: Variables, prefix: str) -> OfficialGeometry:
    """Read the CapsNet geometry off `TFCheckpointReader.variables()`; `CheckpointError` names what does not fit."""
    shape = _model_shapes(variables, prefix)

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
        decoder_sizes=_decoder_sizes(shape, classes * capsule_dim, prefix),
    )


def _model_shapes(variables: Variables, prefix: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the model variables, once they are known to be exactly the official graph's, in float32."""
    missing = [name for name in REQUIRED if name not in variables]
    if missing:
        present = sorted(name for name in variables if not IGNORED.search(name))[:8]
        raise CheckpointError(
            f"{prefix} is not an official CapsNet checkpoint: missing variable(s) {', '.join(missing)} "
            f"(it has {', '.join(present) or 'no model variables'})"
        )
    unexpected = sorted(n for n in variables if not IGNORED.search(n) and n not in REQUIRED and n not in DECODER)
    if unexpected:
        raise CheckpointError(f"{prefix} has variable(s) the official CapsNet graph does not: {', '.join(unexpected)}")
    shape = {name: variables[name][1] for name in (*REQUIRED, *DECODER) if name in variables}
    for name in shape:
        if variables[name][0] != "float32":
            raise CheckpointError(f"{prefix}: variable {name} has dtype {variables[name][0]}, expected float32")
    empty = [name for name, dims in shape.items() if 0 in dims]
    if empty:
        raise _shape_error(prefix, f"variable(s) with a zero dimension: {', '.join(empty)}")
    return shape


def _decoder_sizes(shape: dict[str, tuple[int, ...]], num_inputs: int, prefix: str) -> tuple[int, ...] | None:
    """(hidden1, hidden2, output pixels) of the `recons/recons_{1,2,3}` layers fed the masked poses, or None."""
    if not any(name in shape for name in DECODER):
        return None
    missing = [name for name in DECODER if name not in shape]
    if missing:
        raise _shape_error(prefix, f"incomplete decoder: missing {', '.join(missing)}")
    sizes = [num_inputs]
    for n in (1, 2, 3):
        weights, biases = shape[f"recons/recons_{n}/weights"], shape[f"recons/recons_{n}/biases"]
        if len(weights) != 2 or weights[0] != sizes[-1] or biases != weights[1:]:
            raise _shape_error(prefix, f"decoder layer recons_{n} has shape {list(weights)} after {sizes[-1]} inputs")
        sizes.append(weights[1])
    return tuple(sizes[1:])


@dataclass(frozen=True)
class DatasetPreset:
    """What the official README's command line sets for a dataset (not recorded in the checkpoint)."""

    padding: str
    leaky_routing: bool
    archive: str
    hub_dataset: str
    title: str

    def image_processor(self, config: CapsNetConfig) -> CapsNetImageProcessor:
        if self.padding == "same":  # CIFAR-10: centre crop (or pad) to the input size, per-image standardization
            return CapsNetImageProcessor.from_model_config(
                config, resize_mode="crop_or_pad", do_rescale=False, do_standardize=True
            )
        return CapsNetImageProcessor.from_model_config(config)  # MNIST: x * (1/255)

    def preprocessing(self, config: CapsNetConfig) -> str:
        """`image_processor` in words, for the model card."""
        if self.padding == "valid":
            return "x / 255"
        height, width = config.image_size
        return (
            f"centre crop (or zero pad) to {height}x{width}, then per-image standardization "
            "(x - mean) / max(std, 1/sqrt(N)) on the 0..255 scale"
        )


PRESETS = {
    "mnist": DatasetPreset("valid", False, "mnist_checkpoints.tar.gz", "ylecun/mnist", "MNIST"),
    "cifar10": DatasetPreset("same", True, "cifar_checkpoints.tar.gz", "uoft-cs/cifar10", "CIFAR-10"),
}
DATASETS = tuple(PRESETS)


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
    if geometry.num_classes == 10:
        labels = [str(i) for i in range(10)] if dataset == "mnist" else list(CIFAR10_LABELS)
        label_kwargs = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    else:
        label_kwargs = {"num_labels": geometry.num_classes}
    decoder_kwargs = {"decoder_hidden_sizes": list(geometry.decoder_sizes[:-1])} if use_decoder else {}
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
        primary_routing_scale=True,
        use_decoder=use_decoder,
        num_ensemble_members=num_members,
        **decoder_kwargs,
        **label_kwargs,
    )
