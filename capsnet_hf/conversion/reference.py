"""The official CapsNet forward pass in NumPy float64, straight from the checkpoint arrays in their own layouts:
what the parity check compares a converted model with."""

from __future__ import annotations

import numpy as np

from .geometry import PRIMARY_STRIDE, ROUTING_ITERATIONS
from .weights import Arrays


def _conv2d_nhwc(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """TensorFlow `conv2d` (NHWC input, HWIO kernel); "same" puts the odd extra padding at the bottom/right."""
    size = kernel.shape[0]
    if padding == "same":
        pads = []
        for n in x.shape[1:3]:
            total = max((-(-n // stride) - 1) * stride + size - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, ((0, 0), *pads, (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("bhwcyx,yxco->bhwo", windows, kernel, optimize=True)


def _squash(s: np.ndarray) -> np.ndarray:
    """Eq. 1 over the last axis."""
    squared = (s * s).sum(-1, keepdims=True)
    return s / np.sqrt(squared) * squared / (1 + squared)


def _softmax(logits: np.ndarray, leaky: bool) -> np.ndarray:
    """Eq. 3 over the classes; leaky routing adds a zero logit for a "none of them" class, then drops it."""
    if leaky:
        logits = np.concatenate([np.zeros_like(logits[..., :1]), logits], -1)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    route = e / e.sum(-1, keepdims=True)
    return route[..., 1:] if leaky else route


def _primary_capsules(a: Arrays, x: np.ndarray, padding: str, leaky: bool) -> np.ndarray:
    """x [B, H, W, C] -> squashed primary capsules u [B, I, A], i = type*H'*W' + y*W' + x (the official order).

    The official primary layer is a capsule layer with one routing iteration: its conv output is scaled by the
    uniform coupling 1/N (1/(N+1) with the leak) before the bias is added."""
    hidden = np.maximum(_conv2d_nhwc(x, a["conv1/weights"], 1, padding) + a["conv1/biases"], 0)
    types, atoms = a["conv_capsule1/biases"].shape[:2]
    primary = _conv2d_nhwc(hidden, a["conv_capsule1/weights"], PRIMARY_STRIDE, padding) / (types + int(leaky))
    batch, height, width, _ = primary.shape
    primary = primary.reshape(batch, height, width, types, atoms) + a["conv_capsule1/biases"][:, :, 0, 0]
    return _squash(primary.transpose(0, 3, 1, 2, 4).reshape(batch, types * height * width, atoms))


def _reconstruct(a: Arrays, poses: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The decoder on the poses [B, J, K] with all but `classes` [B] masked out -> [B, pixels]."""
    mask = np.eye(poses.shape[1])[classes]
    hidden = (poses * mask[..., None]).reshape(len(poses), -1)
    for n in (1, 2, 3):
        hidden = hidden @ a[f"recons/recons_{n}/weights"] + a[f"recons/recons_{n}/biases"]
        hidden = np.maximum(hidden, 0) if n < 3 else 1 / (1 + np.exp(-hidden))
    return hidden


def reference_forward(
    arrays: Arrays,
    pixel_values: np.ndarray,
    padding: str,
    leaky: bool,
    routing_iterations: int = ROUTING_ITERATIONS,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The official forward pass (Procedure 1 routing with the class capsule bias added in every iteration).

    pixel_values [B, C, H, W] -> capsule_lengths [B, J], capsule_poses [B, J, K], primary_capsules [B, I, A] and,
    with decoder arrays, reconstructions [B, C, H, W] masked by `labels` (default: the predicted class).
    """
    a = {name: value.astype(np.float64) for name, value in arrays.items()}
    u = _primary_capsules(a, pixel_values.astype(np.float64).transpose(0, 2, 3, 1), padding, leaky)
    classes, capsule_dim = a["capsule2/biases"].shape
    votes = np.einsum("bia,iao->bio", u, a["capsule2/weights"]).reshape(len(u), -1, classes, capsule_dim)
    logits = np.zeros(votes.shape[:3])
    for _ in range(routing_iterations):
        route = _softmax(logits, leaky)
        poses = _squash(np.einsum("bij,bijk->bjk", route, votes) + a["capsule2/biases"])
        logits = logits + np.einsum("bijk,bjk->bij", votes, poses)
    lengths = np.sqrt((poses * poses).sum(-1))
    out = {"capsule_lengths": lengths, "capsule_poses": poses, "primary_capsules": u}
    if "recons/recons_1/weights" in a:
        shown = lengths.argmax(-1) if labels is None else labels
        out["reconstructions"] = _reconstruct(a, poses, shown).reshape(pixel_values.shape)
    return out
