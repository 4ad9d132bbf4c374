"""Tests of the evaluation metrics on hand-made examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsnet_hf.training.metrics import (
    confusion_matrix,
    label_sets,
    multi_digit_correct,
    multi_digit_error,
    top_k_classes,
)

# Four examples of 5 classes. Labels {1, 3} each.
SCORES = torch.tensor(
    [
        [0.1, 0.9, 0.2, 0.8, 0.0],  # top-2 = {1, 3}: correct
        [0.1, 0.9, 0.85, 0.8, 0.0],  # top-2 = {1, 2}: wrong (the second digit is missed)
        [0.1, 0.7, 0.2, 0.95, 0.3],  # top-2 = {1, 3} in the other order: correct
        [0.9, 0.1, 0.2, 0.3, 0.95],  # top-2 = {0, 4}: wrong
    ]
)
TWO_HOT = torch.zeros(4, 5)
TWO_HOT[:, [1, 3]] = 1.0


def test_top_k_classes_are_sorted_by_class():
    assert top_k_classes(SCORES, 2).tolist() == [[1, 3], [1, 2], [1, 3], [0, 4]]


def test_multi_digit_metric_with_two_hot_and_pair_labels():
    assert multi_digit_correct(SCORES, TWO_HOT).tolist() == [True, False, True, False]
    pairs = torch.tensor([[3, 1], [1, 3], [1, 3], [3, 1]])
    assert multi_digit_correct(SCORES, pairs).tolist() == [True, False, True, False]
    assert multi_digit_error(SCORES, TWO_HOT) == pytest.approx(50.0)
    assert multi_digit_error(SCORES.numpy(), TWO_HOT.numpy()) == pytest.approx(50.0)
    # One right digit out of two is still an error.
    assert multi_digit_error(torch.tensor([[0.0, 0.9, 0.0, 0.0, 0.8]]), torch.tensor([[1, 3]])) == 100.0


def test_label_sets_validation():
    assert label_sets(TWO_HOT, 5).tolist() == [[1, 3]] * 4
    with pytest.raises(ValueError, match="exactly 2"):
        label_sets(torch.tensor([[1.0, 0, 0, 0, 0]]), 5)
    with pytest.raises(ValueError, match="distinct"):
        label_sets(torch.tensor([[2, 2]]), 5)


def test_confusion_matrix():
    matrix = confusion_matrix(np.array([0, 1, 2, 0, 2]), [0, 1, 1, 0, 2], num_classes=3)
    assert matrix.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert matrix.sum().item() == 5
    with pytest.raises(ValueError, match="lie in"):
        confusion_matrix([3], [0], num_classes=3)


def test_two_target_margin_loss_on_hand_made_lengths():
    """Eq. 4 with two present classes: lengths (0.95, 0.5, 0.05, 0.3), classes 0 and 1 present:
    present terms max(0, 0.9 - 0.95)^2 = 0 and (0.9 - 0.5)^2 = 0.16; absent terms 0.5 * max(0, 0.05 - 0.1)^2 = 0
    and 0.5 * (0.3 - 0.1)^2 = 0.02; sum 0.18 ("paper"), 0.5 * mean over 4 classes = 0.0225 ("official")."""
    from capsnet_hf.modeling_capsnet import margin_loss

    lengths = torch.tensor([[0.95, 0.5, 0.05, 0.3]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert margin_loss(lengths, targets, reduction="paper").item() == pytest.approx(0.18)
    assert margin_loss(lengths, targets, reduction="official").item() == pytest.approx(0.0225)


def test_two_target_training_loss_reconstructs_each_digit_against_its_own_image():
    from capsnet_hf import CapsNetConfig, CapsNetForImageClassification
    from capsnet_hf.modeling_capsnet import margin_loss

    torch.manual_seed(0)
    config = CapsNetConfig(
        image_size=12,
        conv1_channels=4,
        conv1_kernel_size=3,
        primary_capsule_types=2,
        primary_kernel_size=3,
        primary_stride=2,
        decoder_hidden_sizes=[8, 8],
        margin_loss_reduction="paper",
    )
    model = CapsNetForImageClassification(config).eval()
    pixels = torch.rand(2, 1, 12, 12)
    labels = torch.zeros(2, 10)
    labels[0, [2, 7]] = 1.0
    labels[1, [0, 9]] = 1.0
    targets = torch.rand(2, 2, 1, 12, 12)
    output = model(pixels, labels=labels, reconstruction_targets=targets)
    assert output.reconstructions.shape == (2, 2, 1, 12, 12)
    # Each slot is the decoding of one class's capsule, lower class first.
    for example, classes in ((0, (2, 7)), (1, (0, 9))):
        for slot, label in enumerate(classes):
            mask = torch.nn.functional.one_hot(torch.tensor([label]), 10).float()
            expected = model.reconstruct(output.capsule_poses[example : example + 1], mask)[0]
            assert torch.allclose(output.reconstructions[example, slot], expected, atol=1e-6)
    sse = (output.reconstructions - targets).pow(2).sum() / 2
    assert output.reconstruction_loss.item() == pytest.approx(sse.item(), rel=1e-5)
    margin = margin_loss(output.capsule_lengths, labels, reduction="paper")
    assert output.loss.item() == pytest.approx((margin + 0.0005 * sse).item(), rel=1e-5)
    # The paper's metric on the same outputs agrees with a direct top-2 check.
    correct = multi_digit_correct(output.capsule_lengths, labels)
    top_two = output.capsule_lengths.topk(2).indices.sort().values
    assert correct.tolist() == [top_two[0].tolist() == [2, 7], top_two[1].tolist() == [0, 9]]
