"""`convert`: official checkpoint(s) -> a model folder that appears only once it passed the parity check."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..cli import UsageError, write_aside
from ..configuration_capsnet import CapsNetConfig
from ..modeling_capsnet import CapsNetForImageClassification
from .card import ConversionRequest, write_model_card
from .checkpoint_paths import checkpoint_members
from .geometry import (
    DATASETS,
    PRESETS,
    OfficialGeometry,
    build_config,
    infer_dataset,
    infer_geometry,
    resolve_image_size,
)
from .parity import ParityReference, check_parity, measure_parity, parity_reference
from .tf_checkpoint import CheckpointError, TFCheckpointReader
from .weights import model_state_dict, read_arrays


@dataclass
class ConversionResult:
    """What `convert` wrote: the folder, its configuration, the dataset kind and the measured parity."""

    folder: Path
    config: CapsNetConfig
    dataset: str
    parity: dict[str, float]
    reference: ParityReference


def convert(
    checkpoint: str,
    output_dir: str | os.PathLike,
    num_trials: int = 1,
    dataset: str | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-4,
    hub_model_id: str | None = None,
) -> ConversionResult:
    """Convert one official checkpoint, or an ensemble (`checkpoint` with `{}`), into a model folder.

    The folder holds `model.safetensors`, `config.json`, `preprocessor_config.json`, the remote code files and a
    model card; it appears only once the converted model reproduces the NumPy reference forward pass of every
    member to `tolerance` (max absolute difference of capsule lengths, poses and reconstructions). Bad input,
    a failed parity check included, raises `UsageError` and leaves `output_dir` as it was.
    """
    output_dir = Path(output_dir)
    if dataset is not None and dataset not in PRESETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise UsageError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    check_output_dir(output_dir, overwrite)
    request = ConversionRequest(checkpoint, dataset, image_size, hub_model_id or output_dir.name)
    readers, geometry = open_members(checkpoint, num_trials)
    dataset = dataset or infer_dataset(geometry, readers[0].prefix)
    preset = PRESETS[dataset]
    size = resolve_image_size(geometry, preset, readers[0].prefix, image_size)
    use_decoder = geometry.decoder_sizes is not None and len(readers) == 1
    if geometry.decoder_sizes is not None and not use_decoder:
        print("note: the members' reconstruction decoders are dropped (an ensemble has none)", file=sys.stderr)
    member_arrays = [read_arrays(reader, use_decoder) for reader in readers]

    config = build_config(geometry, dataset, size, len(readers), use_decoder)
    model = CapsNetForImageClassification(config)
    model.load_state_dict(model_state_dict(member_arrays, use_decoder), strict=True)
    reference = parity_reference(member_arrays, config, preset)
    with output_folder(output_dir, replace=overwrite) as staging:
        model.save_pretrained(staging)
        preset.image_processor(config).save_pretrained(staging)
        parity = measure_parity(staging, reference)
        check_parity(parity, tolerance)
        num_parameters = sum(p.numel() for p in model.parameters())
        write_model_card(staging, request, readers, config, dataset, num_parameters, parity)
    return ConversionResult(output_dir, config, dataset, parity, reference)


def open_members(checkpoint: str, num_trials: int) -> tuple[list[TFCheckpointReader], OfficialGeometry]:
    """The readers of the ensemble's members and their geometry, which must be the same for all."""
    readers = [TFCheckpointReader(prefix) for prefix in checkpoint_members(checkpoint, num_trials)]
    geometries = [infer_geometry(reader.variables(), reader.prefix) for reader in readers]
    for reader, geometry in zip(readers[1:], geometries[1:], strict=True):
        if geometry != geometries[0]:
            raise CheckpointError(
                f"ensemble members differ: {reader.prefix} has {geometry}, {readers[0].prefix} has {geometries[0]}"
            )
    return readers, geometries[0]


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """A missing or empty folder is written; a folder with files in it only with `overwrite` (it is replaced)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UsageError(
            f"output folder {output_dir} exists and is not empty; pass --overwrite_output_dir to replace it"
        )


@contextlib.contextmanager
def output_folder(output_dir: Path, replace: bool) -> Iterator[Path]:
    """`cli.write_aside(output_dir, folder=True)`, plus: a folder this call created is removed again when the
    block fails, and with `replace` the folder's earlier entries are removed just before the new ones move in."""
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create --output_dir {output_dir}: {error.strerror or error}") from error
    try:
        with write_aside(output_dir, folder=True) as staging:
            yield Path(staging)
            if replace:
                _remove_entries(output_dir, keep=os.path.basename(staging))
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise


def _remove_entries(folder: Path, keep: str) -> None:
    for entry in os.scandir(folder):
        if entry.name != keep:
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)
