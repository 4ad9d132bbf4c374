"""Tests of the paper's baseline CNN as a transformers model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageClassification

import capsnet_hf  # noqa: F401  (registers the Auto classes)
from capsnet_hf.paper.baseline_cnn import (
    PAPER_PARAMETER_COUNT,
    BaselineCNNConfig,
    BaselineCNNForImageClassification,
)

TINY = {"conv_channels": [4, 4, 2], "hidden_sizes": [8, 6]}


def test_parameter_count_matches_the_paper_on_mnist():
    config = BaselineCNNConfig(image_size=28)
    assert config.padding == "same"
    with torch.device("meta"):
        model = BaselineCNNForImageClassification(config)
    assert model.num_parameters() == PAPER_PARAMETER_COUNT == 35_445_522
    assert round(model.num_parameters() / 1e6, 1) == 35.4


def test_expanded_mnist_input_keeps_the_parameter_count():
    config = BaselineCNNConfig(image_size=40)
    assert config.padding == "valid" and config.feature_map_size == (28, 28)
    with torch.device("meta"):
        model = BaselineCNNForImageClassification(config)
    assert model.num_parameters() == PAPER_PARAMETER_COUNT


def test_forward_loss_and_dropout():
    torch.manual_seed(0)
    model = BaselineCNNForImageClassification(BaselineCNNConfig(image_size=12, **TINY))
    pixels = torch.rand(3, 1, 12, 12)
    labels = torch.tensor([0, 4, 9])
    model.eval()
    output = model(pixels, labels=labels, transforms=torch.zeros(3, 4))  # extra batch keys are ignored
    assert output.logits.shape == (3, 10)
    assert torch.allclose(output.loss, torch.nn.functional.cross_entropy(output.logits, labels))
    assert torch.equal(model(pixels).logits, output.logits), "eval mode must be deterministic"
    assert model(pixels).loss is None
    model.train()
    assert not torch.equal(model(pixels).logits, output.logits), "dropout must act in training"
    output.loss.backward()
    assert model.classifier.weight.grad is not None


def test_save_and_load_through_the_auto_classes(tmp_path):
    torch.manual_seed(0)
    config = BaselineCNNConfig(num_channels=1, image_size=[12, 12], id2label={i: f"c{i}" for i in range(3)}, **TINY)
    model = BaselineCNNForImageClassification(config).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "capsnet_baseline_cnn"
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BaselineCNNForImageClassification)
    assert loaded.config.padding == "same" and loaded.config.image_size == [12, 12]
    pixels = torch.rand(2, 1, 12, 12)
    assert torch.equal(loaded(pixels).logits, model(pixels).logits)


def test_bad_input():
    with pytest.raises(ValueError, match="padding"):
        BaselineCNNConfig(padding="reflect")
    with pytest.raises(ValueError, match="too small"):
        BaselineCNNConfig(image_size=10, padding="valid")
    with pytest.raises(ValueError, match="kernel_size"):
        BaselineCNNConfig(kernel_size=4)
    with pytest.raises(ValueError, match="dropout"):
        BaselineCNNConfig(dropout=1.0)
    model = BaselineCNNForImageClassification(BaselineCNNConfig(image_size=12, **TINY))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="labels"):
        model(torch.rand(2, 1, 12, 12), labels=torch.zeros(2, 10))
