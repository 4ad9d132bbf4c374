"""Peer CapsNet implementations, timed beside this one from their own files, kept outside this repository.

`--peer NAME=FILE:EXPRESSION` (bench_capsnet.py, bench_inference.py) imports FILE as a module and evaluates
EXPRESSION in its namespace to build a model for `[B, 1, 28, 28]` float images: `model(pixels)` is its inference
forward (eval mode); `model(pixels, labels)`, with int64 class labels `[B]`, returns its training loss as a scalar
tensor (train mode), which the file's own wrapper computes with the peer's loss. docs/benchmarks.md shows such a
file for the XifengGuo and gram-ai models. A spec or model that does not keep this contract raises `PeerError`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch


class PeerError(ValueError):
    """A `--peer` spec that cannot be loaded, or a peer model that does not keep the contract above."""


def peer_factory(spec: str) -> tuple[str, Callable[[], torch.nn.Module]]:
    """`NAME=FILE:EXPRESSION` -> (NAME, a function that builds a new model by EXPRESSION); FILE is imported once."""
    name, _, location = spec.partition("=")
    path, _, expression = location.partition(":")
    if not name or not path or not expression:
        raise PeerError(f"--peer takes NAME=FILE:EXPRESSION, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location(f"peer_{name}", path)
    if module_spec is None or not Path(path).is_file():
        raise PeerError(f"--peer {name}: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return name, lambda: eval(expression, vars(module))  # noqa: S307 (the user's own expression, as on a command line)


def training_loss(name: str, model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The peer's training loss `model(pixels, labels)`, checked to be a scalar tensor with a gradient."""
    loss = model(pixels, labels)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
        raise PeerError(
            f"--peer {name}: model(pixels, labels) must return the training loss as a scalar tensor with a gradient, "
            f"got {type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
        )
    return loss
