"""Inputs at the edges of float32: squash stays finite for huge capsules, and so does the model."""

import torch
from conftest import small_config

from capsnet_hf import CapsNetForImageClassification
from capsnet_hf.modeling_capsnet import squash


def test_squash_of_huge_capsules_is_finite_and_exact_elsewhere():
    huge = torch.full((2, 8), 1e25)
    torch.testing.assert_close(squash(huge), torch.full((2, 8), 8**-0.5))
    ordinary = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)) * 40
    squared_norm = ordinary.pow(2).sum(-1, keepdim=True)
    plain = ordinary * (squared_norm / ((1.0 + squared_norm) * torch.sqrt(squared_norm + 1e-9)))
    assert torch.equal(squash(ordinary), plain)  # bitwise: the rescaling is by powers of two


def test_huge_pixel_values_give_finite_outputs():
    model = CapsNetForImageClassification(small_config()).eval()
    with torch.no_grad():
        outputs = model(torch.full((2, 1, 16, 16), 1e30), labels=torch.tensor([0, 1]))
    assert outputs.logits.isfinite().all() and outputs.capsule_poses.isfinite().all()
