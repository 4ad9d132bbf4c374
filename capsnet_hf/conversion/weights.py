"""Official checkpoint arrays -> `CapsNetForImageClassification` state dicts (the mapping table is in
conversion/README.md)."""

from __future__ import annotations

import numpy as np
import torch

from .geometry import DECODER, REQUIRED
from .tf_checkpoint import TFCheckpointReader

Arrays = dict[str, np.ndarray]  # official variable name -> array, in the checkpoint's layouts


def read_arrays(reader: TFCheckpointReader, use_decoder: bool) -> Arrays:
    """The model variables of one checkpoint (optimizer slots and counters are never read)."""
    names = REQUIRED + (DECODER if use_decoder else ())
    return {name: reader.read(name) for name in names}


def member_state_dict(arrays: Arrays, member: int) -> dict[str, torch.Tensor]:
    """The arrays of one checkpoint -> the `capsnet.members.{member}.*` tensors."""
    inputs, atoms, _ = arrays["capsule2/weights"].shape
    classes, capsule_dim = arrays["capsule2/biases"].shape
    tensors = {
        "conv1.weight": arrays["conv1/weights"].transpose(3, 2, 0, 1),  # HWIO -> OIHW
        "conv1.bias": arrays["conv1/biases"],
        "primary_capsules.conv.weight": arrays["conv_capsule1/weights"].transpose(3, 2, 0, 1),
        "primary_capsules.bias": arrays["conv_capsule1/biases"][:, :, 0, 0],
        # W[i, a, j*K + k] -> W[i, j, k, a]
        "class_capsules.weight": arrays["capsule2/weights"].reshape(inputs, atoms, classes, capsule_dim).transpose(0, 2, 3, 1),
        "class_capsules.bias": arrays["capsule2/biases"],
    }  # fmt: skip
    prefix = f"capsnet.members.{member}."
    return {prefix + name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in tensors.items()}


def decoder_state_dict(arrays: Arrays) -> dict[str, torch.Tensor]:
    """`recons/recons_n/{weights [in, out], biases}` -> `decoder.layers.(n-1).{weight [out, in], bias}`."""
    state = {}
    for n in (1, 2, 3):
        weight, bias = arrays[f"recons/recons_{n}/weights"], arrays[f"recons/recons_{n}/biases"]
        state[f"decoder.layers.{n - 1}.weight"] = torch.from_numpy(np.ascontiguousarray(weight.T))
        state[f"decoder.layers.{n - 1}.bias"] = torch.from_numpy(bias.copy())
    return state


def model_state_dict(member_arrays: list[Arrays], use_decoder: bool) -> dict[str, torch.Tensor]:
    """Every member's tensors, plus the first member's decoder when the model has one."""
    state = {}
    for member, arrays in enumerate(member_arrays):
        state.update(member_state_dict(arrays, member))
    if use_decoder:
        state.update(decoder_state_dict(member_arrays[0]))
    return state
