"""What the four commands share: one error type and exit convention, one boolean parser, the CPU thread count and
allocator, the end of a multi-process run, model loading, and the files they write (the usual modes, written aside
then renamed, an output folder locked against a second run)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class UsageError(ValueError):
    """Bad input to a command (flags, data, model folders), raised before any output is written; the command prints
    `prog: error: <message>` and exits with status 2, as argparse does for a bad flag."""


class DataError(UsageError):
    """Bad data-set input (unknown data set/split, columns, labels, images)."""


USAGE_EXIT_STATUS = 2


def run_command(prog: str, body: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None) -> int:
    """The exit convention of every command: `body(argv)` returns 0; a `UsageError` is one line on stderr,
    `prog: error: <message>`, and status 2."""
    try:
        body(argv)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return USAGE_EXIT_STATUS
    return 0


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


CPU_THREADS_HELP = (
    "torch threads on CPU: 'auto' (default) gives the process its share of the physical cores where accelerate "
    "launch left its default of one (OMP_NUM_THREADS=1), else keeps torch's; or a number"
)


def cpu_threads_choice(value: str) -> int | str:
    """An argparse type for `--cpu_threads`: 'auto' or an integer >= 1."""
    return "auto" if str(value).lower() == "auto" else positive_int(value)


def use_cpu_threads(choice: int | str, device: Any) -> str | None:
    """Apply `--cpu_threads` when running on the CPU; returns a line for the log, or None when nothing changed.

    'auto' undoes `accelerate launch`'s default of one OpenMP thread per process: without `--cpu` or
    `--num_cpu_threads_per_process` it sets OMP_NUM_THREADS=1 (meant for processes that each drive a GPU), which
    leaves a CPU run on one core, about 1.7x slower on two. So in a process it started (its ACCELERATE_* variables)
    with OMP_NUM_THREADS=1, torch gets the physical cores available to the process shared among the machine's
    processes (LOCAL_WORLD_SIZE), as `accelerate launch --cpu` would give; anything else is left alone. An integer
    sets that many threads; `--cpu_threads 1` keeps one.
    """
    import torch

    if getattr(device, "type", device) != "cpu":
        return None
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return f"CPU threads: {choice} (--cpu_threads)"
    launched = any(name.startswith("ACCELERATE_") for name in os.environ)
    if not launched or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    import psutil

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(available, psutil.cpu_count(logical=False) or available)
    threads = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if threads == 1:
        return None
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} (auto: accelerate launch set OMP_NUM_THREADS=1; --cpu_threads 1 keeps one thread)"


CPU_KEEP_FREED_MEMORY_HELP = (
    "on CPU (Linux, glibc): true (default) has malloc keep the memory of freed tensors for the next step instead of "
    "handing it back to the system, which spares each training step ~100k page faults (float32 steps 2-23%% faster, "
    "peak resident memory up to a third higher; docs/performance.md); false, or MALLOC_* / GLIBC_TUNABLES malloc "
    "settings of your own, leave glibc's defaults"
)
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_cpu_memory(enabled: bool, device: Any) -> str | None:
    """Apply `--cpu_keep_freed_memory` when running on the CPU; returns a line for the log, or None if nothing changed.

    By default glibc serves every block above its mmap threshold (at most 32 MB) with fresh pages from the kernel and
    unmaps them when freed, and trims the heap's free top; a training step frees and reallocates the same 10-50 MB
    activations and gradients, so each step faults all their pages in again. Serving every size from the heap and
    never trimming it keeps those pages mapped for reuse.
    """
    if not enabled or getattr(device, "type", device) != "cpu" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in os.environ for name in GLIBC_MALLOC_VARIABLES) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return None  # the user's own malloc settings
    libc = ctypes.CDLL(None)
    largest = 2**31 - 1  # mallopt takes an int; some glibc versions cap the mmap threshold at 32 MB
    libc.mallopt(M_MMAP_THRESHOLD, largest) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, largest)
    libc.mallopt(M_TOP_PAD, 128 << 20)  # grow the heap in large steps: fewer brk calls while it reaches its peak
    return "CPU memory: freed tensors' memory kept for reuse (--cpu_keep_freed_memory false: glibc's defaults)"


def settle_cpu_and_precision(args: argparse.Namespace) -> tuple[str, list[str]]:
    """What `capsnet-train` and `capsnet-eval` settle before building their Accelerator, whose precision is fixed at
    construction: `--cpu_threads` and `--cpu_keep_freed_memory` applied (on the CPU), then `--mixed_precision`
    resolved, since its bf16 probe is timed on those threads. Returns accelerate's precision value and the lines for
    the log."""
    from .training.mixed_precision import accelerate_device, describe, resolve_mixed_precision

    device = accelerate_device()
    notes = [use_cpu_threads(args.cpu_threads, device), keep_freed_cpu_memory(args.cpu_keep_freed_memory, device)]
    precision, reason = resolve_mixed_precision(args.mixed_precision, device)
    return precision, [f"precision: {describe(precision)} ({reason})", *filter(None, notes)]


def end_processes(accelerator) -> None:
    """The last step of `capsnet-train` and `capsnet-eval`: wait for every process, drop what `accelerator.prepare`
    wrapped, then destroy the process group (`end_training`, which also ends the trackers).

    In that order because a DDP model freed after the group is destroyed is what destroys the group, still holding the
    GIL, while a gloo thread may need the GIL to free a finished collective's tensors: the process then hangs at exit
    (pytorch/pytorch#56297). The caller must hold no reference to the prepared model either.
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")


def parse_bool(value: str | bool) -> bool:
    """A boolean flag value: true/false, yes/no, on/off, 1/0 (any case); argparse reports anything else."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


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


PARTIAL_PREFIX = ".partial-"
COMMIT_FILE = "config.json"  # what makes a folder a model for from_pretrained: moved in last


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(directory: str, prefix: str) -> None:
    """Remove `directory/<prefix><pid>` temporaries whose process is gone (a killed run's)."""
    for entry in os.scandir(directory):
        tail = entry.name[len(prefix) :]
        if entry.name.startswith(prefix) and tail.isdigit() and not _process_alive(int(tail)):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.remove(entry.path)


@contextlib.contextmanager
def write_aside(final: str | os.PathLike, folder: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `final` to write into (a folder with `folder=True`); when the block succeeds
    it takes `final`'s place with the usual file modes, when it raises it is removed and `final` is untouched (or, if
    this call created it, removed).

    A file is renamed over `final` (atomic). A folder's entries are moved into `final` (created if needed; other
    entries, such as checkpoints, stay) with `config.json` removed first and moved in last, so that a run killed
    meanwhile leaves the old model, a folder that is not a model, or the new model, never new weights beside an old
    config. Temporaries of killed runs are removed first."""
    final = os.fspath(final)
    created = folder and not os.path.exists(final)
    if folder:
        os.makedirs(final, exist_ok=True)
        _remove_stale_partials(final, PARTIAL_PREFIX)
        staging = os.path.join(final, f"{PARTIAL_PREFIX}{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging)
    else:
        directory, name = os.path.split(os.path.abspath(final))
        os.makedirs(directory, exist_ok=True)
        _remove_stale_partials(directory, f".{name}{PARTIAL_PREFIX}")
        staging = os.path.join(directory, f".{name}{PARTIAL_PREFIX}{os.getpid()}")
    try:
        yield staging
        if folder:
            give_usual_file_modes(staging)
            _move_entries(staging, final)
        else:
            os.chmod(staging, usual_file_mode())
            os.replace(staging, final)
    except BaseException:
        if created:  # a folder this call created holds nothing else
            shutil.rmtree(final, ignore_errors=True)
        raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        elif os.path.exists(staging):
            os.remove(staging)


def _move_entries(staging: str, final: str) -> None:
    names = sorted(os.listdir(staging), key=lambda name: name == COMMIT_FILE)  # the commit file last
    if COMMIT_FILE in names and os.path.exists(os.path.join(final, COMMIT_FILE)):
        os.remove(os.path.join(final, COMMIT_FILE))
    for name in names:
        target = os.path.join(final, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)


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


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (`./x`, `/x`, `~/x`, `a/b/c`) names a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def load_pretrained_model(loader: Any, name: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(name, **kwargs)` (an Auto class or a model class) for a folder or a Hub id.

    A missing path, a folder that is not a model, unreadable weights and weights that do not match the config
    (missing, unexpected or differently shaped tensors) are one-line `UsageError`s: a partly random model would
    otherwise evaluate, or train on, with exit status 0."""
    if not os.path.exists(name) and _looks_like_a_path(name):
        raise UsageError(f"model {name!r} does not exist")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UsageError(f"{name!r} is not a model folder (it has no config.json)")
    if os.path.exists(name) and not os.path.isdir(name):
        raise UsageError(f"{name!r} is a file, not a model folder")
    try:
        model, loading = loader.from_pretrained(name, output_loading_info=True, **kwargs)
    except Exception as error:  # transformers, safetensors and json raise many types for one broken folder
        if "ignore_mismatched_sizes" in str(error):
            raise UsageError(f"the weights of {name!r} do not match its config.json (differently shaped)") from error
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot load a model from {name!r}: {detail}") from error
    problems = {
        "missing": loading.get("missing_keys", []),
        "unexpected": loading.get("unexpected_keys", []),
        "differently shaped": [key for key, *_ in loading.get("mismatched_keys", [])],
    }
    found = [
        f"{kind}: {', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''}"
        for kind, keys in problems.items()
        if keys
    ]
    if found:
        raise UsageError(f"the weights of {name!r} do not match its config.json ({'; '.join(found)})")
    return model


def load_model_and_processor(name: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The image-classification model saved at `name` (a folder or a Hub id, checked by [`load_pretrained_model`])
    and its image processor (its `preprocessor_config.json`, else the one matching the model's input geometry)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .image_processing_capsnet import CapsNetImageProcessor

    model = load_pretrained_model(AutoModelForImageClassification, name, trust_remote_code=trust_remote_code)
    try:
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError:  # no preprocessor_config.json: the processor of the model's input geometry
        processor = CapsNetImageProcessor.from_model_config(model.config)
    return model, processor
