"""Where the checkpoints of `--checkpoint` are: a prefix, its folder, or an ensemble pattern with `{}`."""

from __future__ import annotations

import re
from pathlib import Path

from ..cli import UsageError
from .tf_checkpoint import CheckpointError


def checkpoint_members(pattern: str, num_trials: int) -> list[str]:
    """Checkpoint prefixes of the ensemble: `pattern` with `{}` replaced by 0..num_trials-1 (as the official
    `evaluate_ensemble`), or `[pattern]` for a single checkpoint. Raises `CheckpointError` if any is missing."""
    if num_trials < 1:
        raise UsageError(f"--num_trials must be at least 1, got {num_trials}")
    if "{}" not in pattern:
        if num_trials > 1:
            raise UsageError(f"--num_trials {num_trials} needs a checkpoint pattern with '{{}}', got {pattern!r}")
        return [latest_checkpoint(pattern) if Path(pattern).is_dir() else pattern]
    prefixes = [pattern.replace("{}", str(trial)) for trial in range(num_trials)]
    missing = [p for p in prefixes if not Path(re.sub(r"\.index$", "", p) + ".index").is_file()]
    if len(missing) == len(prefixes):
        raise CheckpointError(
            f"checkpoint pattern {pattern!r} matches no files: no {prefixes[0]}.index ... {prefixes[-1]}.index"
        )
    if missing:
        raise CheckpointError(
            f"checkpoint pattern {pattern!r}: ensemble member(s) missing: {', '.join(p + '.index' for p in missing)}"
        )
    return prefixes


def latest_checkpoint(folder: str) -> str:
    """The checkpoint prefix of a folder: `model_checkpoint_path` of its `checkpoint` file, else its only `.index`."""
    state = Path(folder) / "checkpoint"
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state.read_text(errors="replace"), re.MULTILINE)
        if match:
            return str(Path(folder) / match.group(1))
    indexes = sorted(Path(folder).glob("*.index"))
    if len(indexes) != 1:
        found = ", ".join(p.name for p in indexes) or "none"
        raise CheckpointError(f"{folder} is a folder: pass a checkpoint prefix (its .index files: {found})")
    return str(indexes[0])[: -len(".index")]


def display_checkpoint(pattern: str) -> str:
    """The checkpoint path as it appears inside the official archive (no local directories)."""
    parts = Path(re.sub(r"\.index$", "", pattern)).parts
    return "/".join(parts[-3:] if "{}" in pattern and len(parts) >= 3 else parts[-2:])
