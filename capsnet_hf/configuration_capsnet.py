"""Configuration of the CapsNet of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017)."""

from __future__ import annotations

import numbers

from transformers import PreTrainedConfig

PADDING_MODES = ("valid", "same")
MARGIN_LOSS_REDUCTIONS = ("official", "paper")
# Where trust_remote_code finds each class in a saved folder (save_pretrained copies the three files).
REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_capsnet.CapsNetConfig",
    "AutoModel": "modeling_capsnet.CapsNetModel",
    "AutoModelForImageClassification": "modeling_capsnet.CapsNetForImageClassification",
    "AutoImageProcessor": "image_processing_capsnet.CapsNetImageProcessor",
}


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def conv_output_size(size: int, kernel_size: int, stride: int, padding: str) -> int:
    """Spatial output size of a convolution with TensorFlow's "valid"/"same" semantics."""
    if padding == "same":
        return -(-size // stride)
    return (size - kernel_size) // stride + 1


def tf_same_padding(size: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's "same" convolution: the odd extra pixel goes at the end."""
    total = max((conv_output_size(size, kernel_size, stride, "same") - 1) * stride + kernel_size - size, 0)
    return total // 2, total - total // 2


class CapsNetConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CapsNetModel`] / [`CapsNetForImageClassification`]. The defaults build the paper's MNIST
    model (and the official code's): 28x28x1 input, 9x9 conv of 256 channels, 32 primary capsule types of 8
    dimensions (9x9 kernel, stride 2, 1152 capsules), 10 class capsules of 16 dimensions, 3 routing iterations and a
    512-1024-784 reconstruction decoder.

    Args:
        num_channels (`int`, defaults to 1): channels of the input image.
        image_size (`int` or `(height, width)`, defaults to 28): input size; every other size is derived from it.
        conv1_channels (`int`, defaults to 256): output channels of the first (ReLU) convolution.
        conv1_kernel_size (`int`, defaults to 9): kernel of the first convolution (stride 1).
        primary_capsule_types (`int`, defaults to 32): number of primary capsule types (channels / dimension).
        primary_capsule_dim (`int`, defaults to 8): dimension of a primary capsule.
        primary_kernel_size (`int`, defaults to 9), primary_stride (`int`, defaults to 2): primary convolution.
        padding (`str`, defaults to `"valid"`): `"valid"` or `"same"` (TensorFlow semantics: when the total padding
            is odd, the extra row/column goes at the bottom/right) for both convolutions.
        capsule_dim (`int`, defaults to 16): dimension of a class capsule.
        routing_iterations (`int`, defaults to 3): iterations of routing-by-agreement (Procedure 1 of the paper).
        leaky_routing (`bool`, defaults to `False`): add a "leak" parent with logit 0 to every softmax (official
            CIFAR-10 models); its share of each vote is dropped.
        routing_bias (`bool`, defaults to `True`): learnable bias added to every class capsule's input before the
            squash, in every iteration (official code; the paper has none).
        detach_inner_votes (`bool`, defaults to `False`): stop gradients through the votes in all but the last
            routing iteration.
        use_decoder (`bool`, defaults to `True`): build the reconstruction decoder.
        decoder_hidden_sizes (`list[int]`, defaults to `[512, 1024]`): hidden layers of the decoder.
        margin_positive, margin_negative, margin_downweight (`float`, defaults to 0.9, 0.1, 0.5): m+, m- and lambda
            of the margin loss (paper Eq. 4).
        margin_loss_reduction (`str`, defaults to `"official"`): `"official"` takes 0.5 x the mean over classes (the
            official code, 1/20 of Eq. 4 summed over 10 classes, the balance against the reconstruction loss under
            which the released models were trained); `"paper"` sums Eq. 4 over classes. Both average over the batch.
        reconstruction_loss_weight (`float`, defaults to 0.0005): weight of the reconstruction loss (per-image sum
            of squared errors, averaged over the batch).
        initializer_range (`float`, defaults to 0.1): std of the truncated-normal initialisation of the primary
            convolution, the capsule transformation matrices and the decoder.
        conv1_initializer_range (`float`, defaults to 0.05): std of the truncated-normal init of the first conv.
        bias_init (`float`, defaults to 0.1): initial value of every bias.
        squash_epsilon (`float`, defaults to 1e-9): added under the square roots of the squash and of the capsule
            lengths, so both have finite values and gradients at the zero vector.
        num_ensemble_members (`int`, defaults to 1): with more than one, [`CapsNetForImageClassification`] holds that
            many independent CapsNets and scores a class by the mean of their capsule lengths (the official CIFAR-10
            evaluation ranks by their sum; the ranking is the same).

    Capsule lengths are independent probabilities that each class is present (paper, Section 2), so
    `problem_type` defaults to `"multi_label_classification"`: the image-classification pipeline then reports
    `sigmoid(logits)`, which equals the capsule lengths.
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

    def __init__(
        self,
        num_channels: int = 1,
        image_size: int | list[int] | tuple[int, int] = 28,
        conv1_channels: int = 256,
        conv1_kernel_size: int = 9,
        primary_capsule_types: int = 32,
        primary_capsule_dim: int = 8,
        primary_kernel_size: int = 9,
        primary_stride: int = 2,
        padding: str = "valid",
        capsule_dim: int = 16,
        routing_iterations: int = 3,
        leaky_routing: bool = False,
        routing_bias: bool = True,
        detach_inner_votes: bool = False,
        use_decoder: bool = True,
        decoder_hidden_sizes: list[int] | tuple[int, ...] = (512, 1024),
        margin_positive: float = 0.9,
        margin_negative: float = 0.1,
        margin_downweight: float = 0.5,
        margin_loss_reduction: str = "official",
        reconstruction_loss_weight: float = 0.0005,
        initializer_range: float = 0.1,
        conv1_initializer_range: float = 0.05,
        bias_init: float = 0.1,
        squash_epsilon: float = 1e-9,
        num_ensemble_members: int = 1,
        **kwargs,
    ):
        kwargs.setdefault("problem_type", "multi_label_classification")
        # Every Auto class is mapped, whichever model class is saved; the processor entry lets AutoImageProcessor
        # find the remote code from config.json too (the processor saves image_processing_capsnet.py beside it).
        kwargs.setdefault("auto_map", dict(REMOTE_CODE_AUTO_MAP))
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 10
        super().__init__(**kwargs)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.num_channels = num_channels
        self.image_size = [int(s) for s in image_size]
        self.conv1_channels = conv1_channels
        self.conv1_kernel_size = conv1_kernel_size
        self.primary_capsule_types = primary_capsule_types
        self.primary_capsule_dim = primary_capsule_dim
        self.primary_kernel_size = primary_kernel_size
        self.primary_stride = primary_stride
        self.padding = padding
        self.capsule_dim = capsule_dim
        self.routing_iterations = routing_iterations
        self.leaky_routing = leaky_routing
        self.routing_bias = routing_bias
        self.detach_inner_votes = detach_inner_votes
        self.use_decoder = use_decoder
        self.decoder_hidden_sizes = list(decoder_hidden_sizes)
        self.margin_positive = margin_positive
        self.margin_negative = margin_negative
        self.margin_downweight = margin_downweight
        self.margin_loss_reduction = margin_loss_reduction
        self.reconstruction_loss_weight = reconstruction_loss_weight
        self.initializer_range = initializer_range
        self.conv1_initializer_range = conv1_initializer_range
        self.bias_init = bias_init
        self.squash_epsilon = squash_epsilon
        self.num_ensemble_members = num_ensemble_members
        self._validate_capsnet()

    POSITIVE_SIZES = (
        "num_channels",
        "conv1_channels",
        "conv1_kernel_size",
        "primary_capsule_types",
        "primary_capsule_dim",
        "primary_kernel_size",
        "primary_stride",
        "capsule_dim",
        "routing_iterations",
        "num_ensemble_members",
    )

    def _validate_capsnet(self) -> None:
        for name in self.POSITIVE_SIZES:
            value = getattr(self, name)
            if not _is_positive_integer(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        sizes = self.decoder_hidden_sizes
        if not all(_is_positive_integer(size) for size in sizes):
            raise ValueError(f"decoder_hidden_sizes must be positive integers, got {sizes!r}")
        if not self.squash_epsilon > 0 or self.squash_epsilon == float("inf"):
            raise ValueError(f"squash_epsilon must be a positive number, got {self.squash_epsilon!r}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be a positive int or (height, width), got {self.image_size}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.margin_loss_reduction not in MARGIN_LOSS_REDUCTIONS:
            raise ValueError(
                f"margin_loss_reduction must be one of {MARGIN_LOSS_REDUCTIONS}, got {self.margin_loss_reduction!r}"
            )
        if self.num_ensemble_members > 1 and self.use_decoder:
            raise ValueError("an ensemble (num_ensemble_members > 1) has no decoder: set use_decoder=False")
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
