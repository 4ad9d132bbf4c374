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


LOCK_FILE = ".capsnet.lock"


def lock_output_dir(folder: str | os.PathLike, command: str):
    """Create `folder` if needed and hold an exclusive lock on it for this process's life (the returned handle):
    two runs into one folder would interleave their logs and checkpoints. Raises PermissionError if the folder is
    not writable and BlockingIOError naming the holder if another process holds the lock."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BlockingIOError(f"{os.fspath(folder)!r} is in use by {holder}") from None
    handle.truncate(0)
    handle.write(f"{command} (pid {os.getpid()})\n")
    handle.flush()
    return handle
