"""Files the commands write: the usual permissions whatever wrote them."""

from __future__ import annotations

import os


def usual_file_mode(directory: bool = False) -> int:
    """0o666 (0o777 for a directory) less the process umask: what `open(path, "w")` or `mkdir` gives."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def give_usual_file_modes(folder: str | os.PathLike) -> None:
    """chmod `folder` and every file directly in it to [`usual_file_mode`]: what was written through temporary
    files or folders (`model.safetensors` from `save_pretrained`, a `mkdtemp` staging folder) is 0600/0700
    otherwise, unlike its neighbours."""
    os.chmod(folder, usual_file_mode(directory=True))
    mode = usual_file_mode()
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)
