"""The baseline CNN of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017), Section 5, as a small
transformers model (`BaselineCNNConfig`, model_type "capsnet_baseline_cnn"; `BaselineCNNForImageClassification`),
so that it trains with `capsnet-train --model_type baseline_cnn` and is scored by `capsnet-eval` like a CapsNet.

The paper: "The baseline is a standard CNN with three convolutional layers of 256, 256, 128 channels. Each has 5x5
kernels and stride of 1. The last convolutional layers are followed by two fully connected layers of size 328, 192.
The last fully connected layer is connected with dropout to a 10 class softmax layer with cross entropy loss."
and gives it 35.4M parameters.

Padding and pooling are not stated; the parameter count settles them. Without pooling and with "same" padding the
last feature map of a 28x28 MNIST image is 28x28x128 = 100,352 values, and the model has

    conv 1x256 (6,656) + conv 256x256 (1,638,656) + conv 256x128 (819,328)
    + FC 100,352x328 (32,915,784) + FC 328x192 (63,168) + FC 192x10 (1,930) = 35,445,522 = 35.4M parameters.

Any pooling, or "valid" padding on 28x28 (a 16x16x128 map: 13.3M parameters), misses 35.4M by far. For the 40x40
expanded-MNIST input of the affNIST experiment, "valid" padding gives the same 28x28x128 map and so exactly the same
35,445,522 parameters ("same" padding there would give 70.2M); `padding="auto"` picks whichever of the two keeps
the last map at 28x28. Activations are ReLU; the dropout rate (not given in the paper) defaults to 0.5.
Initialisation is PyTorch's default for `nn.Conv2d`/`nn.Linear` (the paper does not give one).
"""

# No `from __future__ import annotations`: the config's field annotations are read at run time.
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from ..configuration_capsnet import DeclaredOptionsConfig, option

PAPER_PARAMETER_COUNT = 35_445_522  # 28x28x1 input, "same" padding (or 40x40x1 with "valid"): the paper's 35.4M
MNIST_SIZE = 28


class BaselineCNNConfig(DeclaredOptionsConfig):
    r"""
    Configuration of [`BaselineCNNForImageClassification`]. The defaults build the paper's 35.4M-parameter baseline
    for 28x28x1 MNIST; each option is documented where it is declared below. Without `num_labels`/`id2label` there
    are 10 classes.
    """

    model_type = "capsnet_baseline_cnn"

    num_channels: int = option(1, "channels of the input image", architecture=True)
    image_size: int | list[int] | tuple[int, int] = option(
        MNIST_SIZE, "input size, one int or (height, width)", architecture=True
    )
    conv_channels: list[int] | tuple[int, ...] = option(
        (256, 256, 128), "output channels of the ReLU convolutions (stride 1)", architecture=True
    )
    kernel_size: int = option(5, "odd kernel size of every convolution", architecture=True)
    padding: Literal["auto", "same", "valid"] = option(
        "auto",
        "'auto' resolves (and is stored) as 'valid' when valid convolutions bring the input down to 28x28 (40x40 "
        "expanded MNIST: the paper's parameter count), else as 'same'",
        architecture=True,
    )
    hidden_sizes: list[int] | tuple[int, ...] = option((328, 192), "fully connected ReLU layers", architecture=True)
    dropout: float = option(0.5, "dropout rate before the softmax classifier")

    def __post_init__(self, **kwargs):
        if self.id2label is None:
            kwargs.setdefault("num_labels", 10)
        super().__post_init__(**kwargs)
        if self.padding == "auto":
            shrink = len(self.conv_channels) * (self.kernel_size - 1)
            valid_size = (self.image_size[0] - shrink, self.image_size[1] - shrink)
            self.padding = "valid" if valid_size == (MNIST_SIZE, MNIST_SIZE) else "same"

    def validate_kernel_size_is_odd(self) -> None:
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    def validate_layers(self) -> None:
        if not self.conv_channels:
            raise ValueError("conv_channels must hold at least one convolution")

    def validate_dropout(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    def validate_geometry(self) -> None:
        if self.padding == "valid" and min(self.feature_map_size) < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.conv_channels)} valid "
                f"{self.kernel_size}x{self.kernel_size} convolutions"
            )

    @property
    def feature_map_size(self) -> tuple[int, int]:
        """(height, width) of the last convolution's output."""
        shrink = 0 if self.padding == "same" else len(self.conv_channels) * (self.kernel_size - 1)
        return self.image_size[0] - shrink, self.image_size[1] - shrink


class BaselineCNNPreTrainedModel(PreTrainedModel):
    config_class = BaselineCNNConfig
    config: BaselineCNNConfig
    base_model_prefix = "baseline_cnn"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation of convolutions and linear layers."""
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()


class BaselineCNNForImageClassification(BaselineCNNPreTrainedModel):
    """The paper's baseline CNN: three 5x5 stride-1 ReLU convolutions (256, 256, 128 channels), FC 328, FC 192 (ReLU),
    dropout, and a 10-way softmax classifier trained with cross-entropy.

    `forward(pixel_values [B, C, H, W], labels [B] | None)` returns an `ImageClassifierOutput` with logits `[B, L]`
    (softmax scores) and, when labels are given, the mean cross-entropy loss. Other keyword arguments (keys of a
    generated data set's batch) are ignored, so it trains and evaluates with `model(**batch)` like the CapsNet.
    """

    def __init__(self, config: BaselineCNNConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        layers: list[nn.Module] = []
        channels = config.num_channels
        for out_channels in config.conv_channels:
            layers += [nn.Conv2d(channels, out_channels, config.kernel_size, padding=config.padding), nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        height, width = config.feature_map_size
        fully_connected: list[nn.Module] = [nn.Flatten()]
        size = channels * height * width
        for hidden in config.hidden_sizes:
            fully_connected += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        self.fully_connected = nn.Sequential(*fully_connected)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(size, config.num_labels)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        expected = (self.config.num_channels, *self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [B, {', '.join(map(str, expected))}], got {tuple(pixel_values.shape)}"
            )
        if labels is not None and labels.dim() != 1:
            raise ValueError(f"labels must be class indices [B] (single-label softmax), got {tuple(labels.shape)}")
        logits = self.classifier(self.dropout(self.fully_connected(self.features(pixel_values))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = [
    "PAPER_PARAMETER_COUNT",
    "BaselineCNNConfig",
    "BaselineCNNForImageClassification",
    "BaselineCNNPreTrainedModel",
]
