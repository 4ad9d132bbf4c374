"""CapsNet model: geometry, routing invariants, squash, losses, outputs, numerics under autocast."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, CapsNetModel
from capsnet_hf.configuration_capsnet import tf_same_padding
from capsnet_hf.modeling_capsnet import (
    capsule_length,
    dynamic_routing,
    margin_loss,
    reconstruction_loss,
    squash,
)

MNIST = dict()
MULTIMNIST = dict(image_size=36)
CIFAR = dict(
    num_channels=3, image_size=24, padding="same", primary_capsule_types=64, leaky_routing=True, use_decoder=False
)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_of_the_paper_mnist_model():
    assert count_parameters(CapsNetForImageClassification(CapsNetConfig())) == 8_215_728
    assert count_parameters(CapsNetForImageClassification(CapsNetConfig(routing_bias=False))) == 8_215_568


@pytest.mark.parametrize(
    "geometry, num_primary, image_shape",
    [(MNIST, 1152, (1, 28, 28)), (MULTIMNIST, 3200, (1, 36, 36)), (CIFAR, 9216, (3, 24, 24))],
    ids=["mnist", "multimnist", "cifar10"],
)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_output_shapes(geometry, num_primary, image_shape, batch_size):
    config = CapsNetConfig(**geometry)
    assert config.num_primary_capsules == num_primary
    model = CapsNetForImageClassification(config).eval()
    pixel_values = torch.rand(batch_size, *image_shape)
    with torch.no_grad():
        out = model(
            pixel_values,
            labels=torch.zeros(batch_size, dtype=torch.long),
            output_routing_weights=True,
            output_primary_capsules=True,
        )
    assert out.logits.shape == (batch_size, 10)
    assert out.capsule_lengths.shape == (batch_size, 10)
    assert out.capsule_poses.shape == (batch_size, 10, 16)
    assert out.routing_weights.shape == (batch_size, num_primary, 10)
    assert out.primary_capsules.shape == (batch_size, num_primary, 8)
    assert out.loss.shape == ()
    if config.use_decoder:
        assert out.reconstructions.shape == (batch_size, *image_shape)
    else:
        assert out.reconstructions is None and out.reconstruction_loss is None


def test_tf_same_padding_puts_the_extra_pixel_at_the_end():
    assert tf_same_padding(24, 9, 2) == (3, 4)  # CIFAR-10 primary conv
    assert tf_same_padding(24, 9, 1) == (4, 4)  # CIFAR-10 conv1
    config = small_config(padding="same", image_size=10, conv1_kernel_size=4, primary_kernel_size=3)
    conv = CapsNetModel(config).members[0].conv1
    image = torch.randn(1, 1, 10, 10)
    expected = F.conv2d(F.pad(image, (1, 2, 1, 2)), conv.weight, conv.bias)  # kernel 4: total 3 = 1 before, 2 after
    torch.testing.assert_close(conv(image), expected)
    assert conv(image).shape[-2:] == (10, 10)


def test_geometry_too_small_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        CapsNetConfig(image_size=12)
    with pytest.raises(ValueError, match="padding"):
        CapsNetConfig(padding="SAME-ish")


@pytest.mark.parametrize("leaky", [False, True])
def test_routing_coefficients_sum_to_one_over_parents_or_less_when_leaky(leaky):
    model = CapsNetModel(small_config(leaky_routing=leaky)).eval()
    with torch.no_grad():
        weights = model(torch.rand(3, 1, 16, 16), output_routing_weights=True).routing_weights
    totals = weights.sum(-1)  # [B, I]
    assert (weights >= 0).all()
    if leaky:
        assert (totals < 1).all() and (totals > 0).all()
    else:
        torch.testing.assert_close(totals, torch.ones_like(totals))


def test_routing_uses_bias_every_iteration_and_returns_last_coupling():
    votes = torch.randn(2, 3, 5, 4)  # [B, J, I, K]
    bias = torch.randn(3, 4)
    poses, coupling = dynamic_routing(votes, bias, num_iterations=1)
    torch.testing.assert_close(coupling, torch.full((2, 3, 5), 1 / 3))
    torch.testing.assert_close(poses, squash(votes.sum(2) / 3 + bias))  # s_j = sum_i (1/J) u_hat_ij + b_j
    poses3, _ = dynamic_routing(votes, bias, num_iterations=3)
    assert not torch.allclose(poses, poses3)


def test_squash_norms_in_unit_interval_and_finite_at_zero():
    vectors = torch.cat([torch.randn(100, 8) * scale for scale in (1e-4, 1e-1, 1.0, 10.0, 100.0)])
    norms = squash(vectors).norm(dim=-1)
    assert (norms >= 0).all() and (norms < 1).all()
    # beyond |s|^2 ~ 2^24, |s|^2 / (1 + |s|^2) rounds to 1 in float32, never above
    assert (squash(torch.randn(100, 8) * 1e6).norm(dim=-1) <= 1 + 1e-6).all()
    zero = torch.zeros(2, 8, requires_grad=True)
    out = squash(zero)
    (out.sum() + capsule_length(out).sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(zero.grad).all()
    # Eq. 1: |v| = |s|^2 / (1 + |s|^2)
    s = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(squash(s).norm(), torch.tensor(25.0 / 26.0))


def test_margin_loss_against_hand_computation():
    lengths = torch.tensor([[0.95, 0.20, 0.05], [0.50, 0.60, 0.00]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # example 0: class 0 present, above m+ -> 0; class 1 absent: 0.5 * (0.2 - 0.1)^2 = 0.005; class 2 -> 0
    # example 1: (0.9 - 0.5)^2 = 0.16; (0.9 - 0.6)^2 = 0.09; class 2 absent, below m- -> 0
    per_example = torch.tensor([0.005, 0.25])
    torch.testing.assert_close(margin_loss(lengths, targets, reduction="paper"), per_example.mean())
    torch.testing.assert_close(margin_loss(lengths, targets, reduction="official"), 0.5 * per_example.sum() / 6)


def test_model_loss_is_margin_plus_weighted_reconstruction():
    config = small_config(margin_loss_reduction="paper")
    model = CapsNetForImageClassification(config).eval()
    pixel_values = torch.rand(2, 1, 16, 16)
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out = model(pixel_values, labels=labels)
    expected_margin = margin_loss(out.capsule_lengths, F.one_hot(labels, 4).float(), reduction="paper")
    expected_recon = (out.reconstructions - pixel_values).pow(2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(out.margin_loss, expected_margin)
    torch.testing.assert_close(out.reconstruction_loss, expected_recon)
    torch.testing.assert_close(out.loss, expected_margin + 0.0005 * expected_recon)


def test_logits_are_log_odds_of_capsule_lengths():
    model = CapsNetForImageClassification(small_config()).eval()
    with torch.no_grad():
        out = model(torch.rand(4, 1, 16, 16))
    torch.testing.assert_close(torch.sigmoid(out.logits), out.capsule_lengths)
    assert torch.equal(out.logits.argmax(-1), out.capsule_lengths.argmax(-1))


def test_reconstruction_is_masked_by_label_or_prediction():
    model = CapsNetForImageClassification(small_config()).eval()
    pixel_values = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        predicted = model(pixel_values)
        poses = predicted.capsule_poses
        by_prediction = model.reconstruct(poses, F.one_hot(predicted.capsule_lengths.argmax(-1), 4))
        by_label = model.reconstruct(poses, F.one_hot(torch.tensor([2, 0]), 4))
        labelled = model(pixel_values, labels=torch.tensor([2, 0]))
    torch.testing.assert_close(predicted.reconstructions, by_prediction)
    torch.testing.assert_close(labelled.reconstructions, by_label)


def test_multi_hot_labels_reconstruct_each_present_class_in_class_order():
    model = CapsNetForImageClassification(small_config()).eval()
    pixel_values = torch.rand(2, 1, 16, 16)
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    targets = torch.rand(2, 2, 1, 16, 16)
    with torch.no_grad():
        out = model(pixel_values, labels=labels, reconstruction_targets=targets)
        poses = out.capsule_poses
        first = model.reconstruct(poses, F.one_hot(torch.tensor([1, 0]), 4))
        second = model.reconstruct(poses, F.one_hot(torch.tensor([3, 2]), 4))
    assert out.reconstructions.shape == (2, 2, 1, 16, 16)
    torch.testing.assert_close(out.reconstructions[:, 0], first)
    torch.testing.assert_close(out.reconstructions[:, 1], second)
    torch.testing.assert_close(out.reconstruction_loss, reconstruction_loss(out.reconstructions, targets))
    torch.testing.assert_close(out.margin_loss, margin_loss(out.capsule_lengths, labels))


def test_multi_hot_with_unequal_counts_pads_with_zero_images():
    model = CapsNetForImageClassification(small_config()).eval()
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    with torch.no_grad():
        out = model(torch.rand(2, 1, 16, 16), labels=labels)
    assert out.reconstructions.shape == (2, 2, 1, 16, 16)
    assert torch.count_nonzero(out.reconstructions[1, 1]) == 0
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("routing_bias", [True, False])
def test_gradients_finite_for_an_all_zero_image(routing_bias):
    model = CapsNetForImageClassification(small_config(routing_bias=routing_bias))
    if not routing_bias:  # make every capsule exactly the zero vector
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.zeros_(param)
    out = model(torch.zeros(2, 1, 16, 16), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_detach_inner_votes_changes_gradients_not_outputs():
    torch.manual_seed(0)
    config = small_config()
    attached = CapsNetForImageClassification(config)
    detached = CapsNetForImageClassification(small_config(detach_inner_votes=True))
    detached.load_state_dict(attached.state_dict())
    pixel_values, labels = torch.rand(2, 1, 16, 16), torch.tensor([0, 3])
    out_a, out_d = attached(pixel_values, labels=labels), detached(pixel_values, labels=labels)
    torch.testing.assert_close(out_a.logits, out_d.logits)
    out_a.loss.backward()
    out_d.loss.backward()
    grad_a = attached.capsnet.members[0].class_capsules.weight.grad
    grad_d = detached.capsnet.members[0].class_capsules.weight.grad
    assert not torch.allclose(grad_a, grad_d)


def test_squash_and_lengths_stay_float32_under_bf16_autocast():
    model = CapsNetForImageClassification(small_config()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 16, 16), labels=torch.tensor([0, 1]), output_primary_capsules=True)
    assert out.capsule_lengths.dtype == torch.float32
    assert out.capsule_poses.dtype == torch.float32
    assert out.primary_capsules.dtype == torch.float32
    assert torch.isfinite(out.loss)


def test_ensemble_averages_member_lengths():
    config = small_config(num_ensemble_members=3, use_decoder=False)
    model = CapsNetForImageClassification(config).eval()
    pixel_values = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        out = model(pixel_values, output_routing_weights=True)
        member_lengths = torch.stack(
            [capsule_length(member(pixel_values)[0]) for member in model.capsnet.members], dim=1
        )
    assert out.capsule_poses.shape == (2, 3, 4, 6)
    assert out.routing_weights.shape == (2, 3, 32, 4)
    torch.testing.assert_close(out.capsule_lengths, member_lengths.mean(1))
    assert torch.equal(out.logits.argmax(-1), member_lengths.sum(1).argmax(-1))
    with pytest.raises(ValueError, match="decoder"):
        small_config(num_ensemble_members=2)


def test_wrong_input_shape_names_the_expected_shape():
    model = CapsNetModel(small_config())
    with pytest.raises(ValueError, match=r"\[batch, 1, 16, 16\]"):
        model(torch.rand(2, 3, 16, 16))


def test_official_initialisation():
    model = CapsNetForImageClassification(CapsNetConfig())
    member = model.capsnet.members[0]
    assert torch.all(member.conv1.bias == 0.1) and torch.all(member.primary_capsules.bias == 0.1)
    assert torch.all(member.class_capsules.bias == 0.1) and torch.all(model.decoder.layers[0].bias == 0.1)
    assert member.conv1.weight.abs().max() <= 0.1 + 1e-6  # truncated at 2 std = 0.1
    assert member.class_capsules.weight.abs().max() <= 0.2 + 1e-6
    assert math.isclose(member.class_capsules.weight.std().item(), 0.088, abs_tol=0.003)  # 0.1 * 0.88 (truncation)


@pytest.mark.parametrize("leaky", [False, True], ids=["softmax", "leaky"])
def test_unscaled_primary_capsules_start_as_the_official_model(leaky):
    """`primary_routing_scale=False` moves the 1/N from the forward into the primary conv's initial weights: from the
    same seed, the same parameters but that conv's, and the same outputs."""
    models = []
    for scaled in (True, False):
        torch.manual_seed(0)
        config = small_config(leaky_routing=leaky, primary_routing_scale=scaled)
        models.append(CapsNetForImageClassification(config).eval())
    official, unscaled = models
    scale = official.capsnet.members[0].primary_capsules.routing_scale
    assert scale == 1 / (2 + leaky) and unscaled.capsnet.members[0].primary_capsules.routing_scale == 1.0
    for (name, expected), (_, actual) in zip(official.named_parameters(), unscaled.named_parameters(), strict=True):
        if name.endswith("primary_capsules.conv.weight"):
            expected = expected * scale
        torch.testing.assert_close(actual, expected, msg=name)
    pixels = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unscaled(pixels).logits, official(pixels).logits)
