"""Small evaluation metrics for the paper's experiments (pure functions on torch tensors or numpy arrays).

Scores are any per-class scores whose ranking decides the prediction: CapsNet capsule lengths `[B, J]`, logits, or
probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _tensor(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach()
    return torch.as_tensor(np.asarray(values))


def _scores(scores: Any) -> torch.Tensor:
    scores = _tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [batch, num_classes], got shape {tuple(scores.shape)}")
    return scores


def _class_indices(labels: Any, num_classes: int) -> torch.Tensor:
    """Class indices `[B]` from indices `[B]` or one-hot `[B, J]` labels."""
    labels = _tensor(labels)
    if labels.dim() == 2:
        if labels.shape[1] != num_classes:
            raise ValueError(f"one-hot labels must have {num_classes} columns, got {labels.shape[1]}")
        return labels.argmax(dim=1)
    if labels.dim() != 1:
        raise ValueError(f"labels must be class indices [B] or one-hot [B, J], got shape {tuple(labels.shape)}")
    return labels.long()


def top_k_classes(scores: Any, k: int) -> torch.Tensor:
    """The `k` highest-scoring classes of each example, `[B, k]` int64, in increasing class order."""
    scores = _scores(scores)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must lie in [1, {scores.shape[1]}], got {k}")
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def label_sets(labels: Any, num_classes: int, k: int = 2) -> torch.Tensor:
    """The `k` label classes of each example, `[B, k]` int64 increasing, from multi-hot `[B, J]` labels (exactly `k`
    ones per row) or class lists `[B, k]` (distinct classes per row)."""
    labels = _tensor(labels)
    if labels.dim() != 2:
        raise ValueError(f"labels must be multi-hot [B, {num_classes}] or class lists [B, {k}], got {labels.shape}")
    if labels.shape[1] == num_classes and not (labels.shape[1] == k and labels.dtype in (torch.int32, torch.int64)):
        present = labels > 0.5
        if not (present.sum(dim=1) == k).all():
            raise ValueError(f"every multi-hot label row must have exactly {k} classes")
        return present.nonzero()[:, 1].reshape(-1, k)
    if labels.shape[1] != k:
        raise ValueError(f"class-list labels must be [B, {k}], got {tuple(labels.shape)}")
    classes = labels.long().sort(dim=1).values
    if (classes[:, 1:] == classes[:, :-1]).any():
        raise ValueError("the classes of an example must be distinct")
    return classes


def multi_digit_correct(scores: Any, labels: Any) -> torch.Tensor:
    """The paper's MultiMNIST criterion (Section 6): an example is correct iff its two highest-scoring classes are
    exactly its two label classes. `labels`: two-hot `[B, J]` or class pairs `[B, 2]`. Returns bool `[B]`."""
    scores = _scores(scores)
    targets = label_sets(labels, scores.shape[1], k=2).to(scores.device)
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {targets.shape[0]} labels")
    return (top_k_classes(scores, 2) == targets).all(dim=1)


def multi_digit_error(scores: Any, labels: Any) -> float:
    """MultiMNIST test error in percent: 100 * (1 - mean of `multi_digit_correct`)."""
    correct = multi_digit_correct(scores, labels)
    return 100.0 * (1.0 - correct.float().mean().item())


def predictions(scores: Any) -> torch.Tensor:
    """Highest-scoring class `[B]`."""
    return _scores(scores).argmax(dim=1)


def confusion_matrix(predicted: Any, labels: Any, num_classes: int) -> torch.Tensor:
    """Counts `[num_classes, num_classes]` int64: row = true class, column = predicted class."""
    predicted = _tensor(predicted).long().reshape(-1)
    labels = _tensor(labels).long().reshape(-1).to(predicted.device)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.numel()} predictions for {labels.numel()} labels")
    for name, values in (("predicted", predicted), ("labels", labels)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    flat = labels * num_classes + predicted
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


__all__ = [
    "confusion_matrix",
    "label_sets",
    "multi_digit_correct",
    "multi_digit_error",
    "predictions",
    "top_k_classes",
]
