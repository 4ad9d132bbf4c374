"""Configuration of the CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017).

Every model option is declared once, as a field of `CapsNetConfig` made with [`option`] (its type, default, one-line
help and whether it changes the weights), in the dataclass style of transformers v5 configs. `capsnet-train`'s model
flags, the recipes' checks, the output-folder check and the model card are derived from these declarations.
"""

# No `from __future__ import annotations`: the field annotations are read at run time (validation, flag types).
import dataclasses
import math
import numbers
from typing import Any, Literal, get_args, get_origin

from transformers import PreTrainedConfig

# Where trust_remote_code finds each class in a saved folder (save_pretrained copies the three files).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_capsnet.CapsNetConfig",
    "AutoModel": "modeling_capsnet.CapsNetModel",
    "AutoModelForImageClassification": "modeling_capsnet.CapsNetForImageClassification",
    "AutoImageProcessor": "image_processing_capsnet.CapsNetImageProcessor",
}


def option(default: Any, help: str, *, architecture: bool = False) -> Any:
    """Declare a model option: its `default` (a tuple for a list-valued option), a one-line `help` (the flag's help)
    and whether it changes the model's weights (`architecture=True`: a folder holding another value holds another
    model)."""
    return dataclasses.field(default=default, metadata={"help": help, "architecture": architecture})


def model_options(config_class: type) -> tuple[dataclasses.Field, ...]:
    """The fields of `config_class` declared with [`option`], in declaration order (not PreTrainedConfig's own)."""
    return tuple(field for field in dataclasses.fields(config_class) if "help" in field.metadata)


def architecture_options(config_class: type) -> tuple[str, ...]:
    """Names of the options that change the weights: two configs that differ in one hold different models."""
    return tuple(field.name for field in model_options(config_class) if field.metadata["architecture"])


def option_kind(field: dataclasses.Field) -> str | None:
    """What an option's annotation admits: "int" (a positive integer: every integer option counts or sizes
    something), "float", "bool", "choice" (a `Literal`), "ints" (`list[int] | tuple[int, ...]`: positive integers,
    stored as a list), "height_width" (`int | list[int] | tuple[int, int]`: stored as [height, width]), or None for
    an annotation that neither validation nor the flags know (tests/test_config_options.py refuses one)."""
    annotation = field.type
    if annotation in (int, float, bool):
        return annotation.__name__
    if get_origin(annotation) is Literal:
        return "choice"
    return {
        frozenset({list[int], tuple[int, ...]}): "ints",
        frozenset({int, list[int], tuple[int, int]}): "height_width",
    }.get(frozenset(get_args(annotation)))


def changed_options(config: PreTrainedConfig) -> dict[str, Any]:
    """The options of `config` whose values differ from those of a default config of its class."""
    default = type(config)()
    return {
        field.name: getattr(config, field.name)
        for field in model_options(type(config))
        if getattr(config, field.name) != getattr(default, field.name)
    }


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


class DeclaredOptionsConfig(PreTrainedConfig):
    """A config whose options are declared with [`option`]. `validate()` runs PreTrainedConfig's checks, the type
    check of every option, then each `validate_*` method of the subclasses in the order they are written; each
    raises a ValueError naming the field. It runs on construction and in `save_pretrained`.

    (transformers' own configs get `validate` from huggingface_hub's `@strict`, which wraps every error in an
    exception that is no ValueError and spans two lines, and refuses an int for a float field: `"bias_init": 0`.)"""

    def __post_init__(self, **kwargs):
        for field in model_options(type(self)):  # callers and JSON give ints, tuples or lists; lists are stored
            kind, value = option_kind(field), getattr(self, field.name)
            if kind == "height_width" and _is_positive_integer(value):
                setattr(self, field.name, [value, value])
            elif kind in ("height_width", "ints") and isinstance(value, tuple):
                setattr(self, field.name, list(value))
        super().__post_init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        super().validate()
        for owner in reversed(type(self).__mro__):
            if issubclass(owner, DeclaredOptionsConfig):
                for name, check in vars(owner).items():
                    if name.startswith("validate_"):
                        check(self)

    def validate_option_types(self) -> None:
        for field in model_options(type(self)):
            kind, value = option_kind(field), getattr(self, field.name)
            if kind == "int" and not _is_positive_integer(value):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
            if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise ValueError(f"{field.name} must be a number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{field.name} must be true or false, got {value!r}")
            if kind == "choice" and value not in get_args(field.type):
                raise ValueError(f"{field.name} must be one of {get_args(field.type)}, got {value!r}")
            if kind == "ints" and not (isinstance(value, list) and all(map(_is_positive_integer, value))):
                raise ValueError(f"{field.name} must be positive integers, got {value!r}")
            if kind == "height_width" and not (
                isinstance(value, list) and len(value) == 2 and all(map(_is_positive_integer, value))
            ):
                raise ValueError(f"{field.name} must be a positive int or (height, width), got {value!r}")


def conv_output_size(size: int, kernel_size: int, stride: int, padding: str) -> int:
    """Spatial output size of a convolution with TensorFlow's "valid"/"same" semantics."""
    if padding == "same":
        return -(-size // stride)
    return (size - kernel_size) // stride + 1


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's "same" convolution: the odd extra pixel goes at the end."""
    total = max((conv_output_size(size, kernel_size, stride, "same") - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class CapsNetConfig(DeclaredOptionsConfig):
    r"""
    Configuration of a [`CapsNetModel`] / [`CapsNetForImageClassification`]. The defaults build the paper's MNIST
    model (and the official code's): 28x28x1 input, 9x9 conv of 256 channels, 32 primary capsule types of 8
    dimensions (9x9 kernel, stride 2, 1152 capsules), 10 class capsules of 16 dimensions, 3 routing iterations and a
    512-1024-784 reconstruction decoder. Each option is documented where it is declared below.

    Capsule lengths are independent probabilities that each class is present (paper, Section 2), so
    `problem_type` defaults to `"multi_label_classification"`: the image-classification pipeline then reports
    `sigmoid(logits)`, which equals the capsule lengths. Without `num_labels`/`id2label` there are 10 classes.
    """

    model_type = "capsnet"
    # Trainer's evaluate()/predict() keep the logits only (the image-classification tutorial's metric takes them).
    keys_to_ignore_at_inference = [
        "capsule_lengths",
        "capsule_poses",
        "reconstructions",
        "margin_loss",
        "reconstruction_loss",
        "primary_capsules",
        "routing_weights",
        "hidden_states",
    ]

    num_channels: int = option(1, "channels of the input image", architecture=True)
    image_size: int | list[int] | tuple[int, int] = option(
        28,
        "input size, one int or (height, width); every other size follows from it",
        architecture=True,
    )
    conv1_channels: int = option(256, "output channels of the first (ReLU) convolution", architecture=True)
    conv1_kernel_size: int = option(9, "kernel of the first convolution (stride 1)", architecture=True)
    primary_capsule_types: int = option(
        32, "primary capsule types (primary conv channels / dimension)", architecture=True
    )
    primary_capsule_dim: int = option(8, "dimension of a primary capsule", architecture=True)
    primary_kernel_size: int = option(9, "kernel of the primary-capsule convolution", architecture=True)
    primary_stride: int = option(2, "stride of the primary-capsule convolution", architecture=True)
    padding: Literal["valid", "same"] = option(
        "valid",
        "padding of both convolutions, TensorFlow's ('same' puts an odd extra row/column at the bottom/right)",
        architecture=True,
    )
    primary_routing_scale: bool = option(
        True,
        "multiply the primary conv's output by 1/N (1/(N+1) with leaky routing), the coupling of the official code's "
        "one all-zero routing of the primary capsules; False: the scale starts in the conv's initial weights instead "
        "(the same initial model), so Adam moves the conv's output N times faster (docs/results.md)",
    )
    capsule_dim: int = option(16, "dimension of a class capsule", architecture=True)
    routing_iterations: int = option(3, "iterations of routing-by-agreement (Procedure 1 of the paper)")
    leaky_routing: bool = option(
        False, "add a leak parent with logit 0 to every softmax, its share of each vote dropped (official CIFAR-10)"
    )
    routing_bias: bool = option(
        True,
        "learnable bias on every class capsule's input before each squash (official code; not in the paper)",
        architecture=True,
    )
    detach_inner_votes: bool = option(False, "stop gradients through the votes in all but the last routing iteration")
    use_decoder: bool = option(True, "build the reconstruction decoder", architecture=True)
    decoder_hidden_sizes: list[int] | tuple[int, ...] = option(
        (512, 1024), "hidden layers of the decoder", architecture=True
    )
    margin_positive: float = option(0.9, "m+ of the margin loss (Eq. 4)")
    margin_negative: float = option(0.1, "m- of the margin loss (Eq. 4)")
    margin_downweight: float = option(0.5, "lambda of the margin loss (Eq. 4): the weight of absent classes")
    margin_loss_reduction: Literal["official", "paper"] = option(
        "official",
        "'official': 0.5 x the mean of Eq. 4 over classes (the released models' balance against the reconstruction "
        "loss); 'paper': Eq. 4 summed over classes; both averaged over the batch",
    )
    reconstruction_loss_weight: float = option(
        0.0005, "weight of the reconstruction loss (per-image sum of squared errors, averaged over the batch)"
    )
    initializer_range: float = option(
        0.1, "std of the truncated-normal init of the primary conv, the capsule transforms and the decoder"
    )
    conv1_initializer_range: float = option(0.05, "std of the truncated-normal init of the first convolution")
    bias_init: float = option(0.1, "initial value of every bias")
    squash_epsilon: float = option(
        1e-9, "added under the square roots of the squash and the capsule lengths: finite gradients at zero"
    )
    num_ensemble_members: int = option(
        1,
        "independent CapsNets whose mean capsule lengths score a class (official CIFAR-10; no decoder)",
        architecture=True,
    )
    problem_type: Literal["regression", "single_label_classification", "multi_label_classification"] | None = (
        "multi_label_classification"
    )

    def __post_init__(self, **kwargs):
        # Every Auto class is mapped, whichever model class is saved; the processor entry lets AutoImageProcessor
        # find the remote code from config.json too (the processor saves image_processing_capsnet.py beside it).
        kwargs.setdefault("auto_map", dict(REMOTE_CODE_AUTO_MAP))
        if self.id2label is None:
            kwargs.setdefault("num_labels", 10)
        super().__post_init__(**kwargs)

    def validate_squash_epsilon(self) -> None:
        if not 0 < self.squash_epsilon < math.inf:
            raise ValueError(f"squash_epsilon must be a positive number, got {self.squash_epsilon!r}")

    def validate_ensemble_has_no_decoder(self) -> None:
        if self.num_ensemble_members > 1 and self.use_decoder:
            raise ValueError("an ensemble (num_ensemble_members > 1) has no decoder: set use_decoder=False")

    def validate_geometry(self) -> None:
        if min(self.primary_grid_size) < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for two {self.conv1_kernel_size}x{self.conv1_kernel_size}"
                f"/{self.primary_kernel_size}x{self.primary_kernel_size} convolutions with padding={self.padding!r}"
            )

    @property
    def conv1_grid_size(self) -> tuple[int, int]:
        """(height, width) of the first convolution's output."""
        return tuple(conv_output_size(s, self.conv1_kernel_size, 1, self.padding) for s in self.image_size)

    @property
    def primary_grid_size(self) -> tuple[int, int]:
        """(height, width) of the grid of primary capsules (6x6 for MNIST, 12x12 for 24x24 CIFAR-10)."""
        return tuple(
            conv_output_size(s, self.primary_kernel_size, self.primary_stride, self.padding)
            for s in self.conv1_grid_size
        )

    @property
    def num_primary_capsules(self) -> int:
        """Number of input capsules of the routing layer: types x grid height x grid width."""
        height, width = self.primary_grid_size
        return self.primary_capsule_types * height * width

    @property
    def decoder_output_size(self) -> int:
        """Number of pixels the decoder reconstructs: channels x height x width."""
        return self.num_channels * self.image_size[0] * self.image_size[1]


__all__ = ["CapsNetConfig"]
