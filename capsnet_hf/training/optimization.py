"""Adam and the official learning-rate schedule."""

from __future__ import annotations

import argparse

import torch


def decayed_learning_rate_factor(step: int, args: argparse.Namespace) -> float:
    """Official schedule as a multiple of --learning_rate: rate^(step / decay_steps), floored at min_learning_rate."""
    factor = args.lr_decay_rate ** (step / args.lr_decay_steps)
    return max(factor, args.min_learning_rate / args.learning_rate)


def create_optimizer(parameters, learning_rate: float, device: torch.device | str = "cpu") -> torch.optim.Adam:
    """Adam (as the paper), with torch's fused implementation on CPU and CUDA: one kernel per parameter instead of a
    chain of element-wise passes (docs/performance.md). Same algorithm; the numbers differ only by float rounding.
    Create it while the parameters are on CPU or `device`."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=torch.device(device).type in ("cpu", "cuda"))
