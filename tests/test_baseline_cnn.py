"""Tests of the paper's baseline CNN."""

from __future__ import annotations

import pytest
import torch

from capsnet_hf.baseline_cnn import PAPER_PARAMETER_COUNT, BaselineCNN, count_parameters


def test_parameter_count_matches_the_paper_on_mnist():
    model = BaselineCNN(image_size=28)
    assert model.padding == "same"
    assert count_parameters(model) == PAPER_PARAMETER_COUNT == 35_445_522
    assert round(count_parameters(model) / 1e6, 1) == 35.4


def test_expanded_mnist_input_keeps_the_parameter_count():
    model = BaselineCNN(image_size=40)
    assert model.padding == "valid"
    assert count_parameters(model) == PAPER_PARAMETER_COUNT


def test_forward_loss_and_dropout():
    torch.manual_seed(0)
    model = BaselineCNN(image_size=12, conv_channels=(4, 4, 2), hidden_sizes=(8, 6))
    pixels = torch.rand(3, 1, 12, 12)
    labels = torch.tensor([0, 4, 9])
    model.eval()
    output = model(pixels, labels=labels)
    assert output.logits.shape == (3, 10)
    expected = torch.nn.functional.cross_entropy(output.logits, labels)
    assert torch.allclose(output.loss, expected)
    assert torch.equal(model(pixels).logits, output.logits), "eval mode must be deterministic"
    assert model(pixels).loss is None
    model.train()
    assert not torch.equal(model(pixels).logits, output.logits), "dropout must act in training"
    output.loss.backward()


def test_bad_input():
    with pytest.raises(ValueError, match="padding"):
        BaselineCNN(padding="reflect")
    with pytest.raises(ValueError, match="too small"):
        BaselineCNN(image_size=10, padding="valid")
    with pytest.raises(ValueError, match="pixel_values"):
        BaselineCNN(image_size=12, conv_channels=(2, 2, 2), hidden_sizes=(4,))(torch.rand(1, 1, 28, 28))
