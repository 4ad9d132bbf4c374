"""The baseline CNN of "Dynamic Routing Between Capsules" (Sabour, Frosst & Hinton, 2017), Section 5.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

PAPER_PARAMETER_COUNT = 35_445_522  # 28x28x1 input, "same" padding (or 40x40x1 with "valid"): the paper's 35.4M


class BaselineCNN(nn.Module):
    """The paper's baseline CNN: three 5x5 stride-1 ReLU convolutions (256, 256, 128 channels), FC 328, FC 192,
    dropout, and a 10-way softmax classifier (cross-entropy loss).

    Args:
        num_channels: channels of the input image.
        image_size: height and width of the (square) input.
        num_labels: number of classes.
        conv_channels, kernel_size: the convolutions.
        padding: `"same"`, `"valid"` or `"auto"` (`"same"` for 28x28 inputs, `"valid"` for 40x40 ones: both keep the
            paper's 35.4M parameters; other sizes use `"same"`).
        hidden_sizes: the fully connected layers.
        dropout: dropout rate before the classifier.

    `forward(pixel_values [B, C, H, W], labels [B] | None)` returns an `ImageClassifierOutput` with logits `[B, L]`
    and, when labels are given, the mean cross-entropy loss, so it trains with the same loops as the CapsNet.
    """

    def __init__(
        self,
        num_channels: int = 1,
        image_size: int = 28,
        num_labels: int = 10,
        conv_channels: Sequence[int] = (256, 256, 128),
        kernel_size: int = 5,
        padding: str = "auto",
        hidden_sizes: Sequence[int] = (328, 192),
        dropout: float = 0.5,
    ):
        super().__init__()
        if padding == "auto":
            padding = "valid" if image_size == 28 + len(conv_channels) * (kernel_size - 1) else "same"
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid' or 'auto', got {padding!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.padding = padding
        self.image_size = image_size
        layers: list[nn.Module] = []
        size, channels = image_size, num_channels
        for out_channels in conv_channels:
            layers += [nn.Conv2d(channels, out_channels, kernel_size, padding=padding), nn.ReLU()]
            channels = out_channels
            if padding == "valid":
                size -= kernel_size - 1
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(conv_channels)} valid convolutions")
        self.features = nn.Sequential(*layers)
        fully_connected: list[nn.Module] = [nn.Flatten()]
        width = channels * size * size
        for hidden in hidden_sizes:
            fully_connected += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.fully_connected = nn.Sequential(*fully_connected)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_labels)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        """Extra keyword arguments (other keys of a data-set batch, e.g. the affNIST-style `transforms`) are ignored,
        as by the CapsNet models, so both train with `model(**batch)`."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be [B, C, {self.image_size}, {self.image_size}], got {tuple(pixel_values.shape)}"
            )
        logits = self.classifier(self.dropout(self.fully_connected(self.features(pixel_values))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


__all__ = ["PAPER_PARAMETER_COUNT", "BaselineCNN", "count_parameters"]
