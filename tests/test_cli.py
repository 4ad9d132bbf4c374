"""The layer the four commands share (capsnet_hf.cli): the exit convention, the boolean parser, the CPU threads and
allocator, model loading that refuses broken folders, and outputs written aside then renamed."""

import argparse
import json
import os
import platform
import subprocess
import sys

import pytest
from conftest import small_config

from capsnet_hf import CapsNetForImageClassification
from capsnet_hf.cli import (
    PARTIAL_PREFIX,
    UsageError,
    cpu_threads_choice,
    keep_freed_cpu_memory,
    load_model_and_processor,
    parse_bool,
    run_command,
    use_cpu_threads,
    write_aside,
)


def test_run_command_prints_one_line_and_exits_2(capsys):
    def body(argv):
        raise UsageError("--thing is wrong")

    assert run_command("capsnet-x", body, []) == 2
    assert capsys.readouterr().err == "capsnet-x: error: --thing is wrong\n"
    assert run_command("capsnet-x", lambda argv: None, []) == 0


@pytest.mark.parametrize("word, value", [("true", True), ("Yes", True), ("on", True), ("1", True), ("off", False)])
def test_parse_bool_accepts_the_usual_words(word, value):
    assert parse_bool(word) is value


def test_parse_bool_names_a_bad_word():
    with pytest.raises(argparse.ArgumentTypeError, match="expected a boolean.*'maybe'"):
        parse_bool("maybe")


def test_write_aside_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    with pytest.raises(RuntimeError), write_aside(target) as partial:
        with open(partial, "w") as handle:
            handle.write("{half")
        raise RuntimeError("killed")
    assert not target.exists() and os.listdir(target.parent) == []
    with write_aside(target) as partial:
        with open(partial, "w") as handle:
            handle.write("{}")
    assert target.read_text() == "{}" and os.listdir(target.parent) == ["metrics.json"]


def test_write_aside_folder_keeps_other_entries_and_moves_config_last(tmp_path, renamed_names):
    moved = renamed_names
    folder = tmp_path / "model"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text("old")
    (folder / "model.safetensors").write_text("old")
    with write_aside(folder, folder=True) as partial:
        for name in ("config.json", "model.safetensors", "README.md"):
            (tmp_path / partial / name).write_text("new")
    assert moved[-1] == "config.json"
    assert sorted(os.listdir(folder)) == ["README.md", "checkpoints", "config.json", "model.safetensors"]
    assert (folder / "config.json").read_text() == "new"


def test_write_aside_folder_failure_leaves_the_old_model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("old")
    with pytest.raises(RuntimeError), write_aside(folder, folder=True) as partial:
        (tmp_path / partial / "config.json").write_text("new")
        raise RuntimeError("parity failed")
    assert os.listdir(folder) == ["config.json"] and (folder / "config.json").read_text() == "old"


def test_write_aside_folder_failure_removes_a_folder_it_created(tmp_path):
    with pytest.raises(RuntimeError), write_aside(tmp_path / "new", folder=True):
        raise RuntimeError("conversion failed")
    assert not (tmp_path / "new").exists()


def test_write_aside_removes_a_killed_runs_temporaries(tmp_path):
    folder = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f"{PARTIAL_PREFIX}{int(dead.stdout)}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    with write_aside(folder, folder=True) as partial:
        (tmp_path / partial / "config.json").write_text("{}")
    assert os.listdir(folder) == ["config.json"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "capsnet"
    CapsNetForImageClassification(small_config()).save_pretrained(folder)
    return folder


def test_load_model_and_processor_loads_a_model_folder(saved_model):
    model, processor = load_model_and_processor(str(saved_model))
    assert isinstance(model, CapsNetForImageClassification)
    assert processor.size["height"] == 16 and processor.num_channels == 1


def _broken_copy(saved_model, tmp_path, damage):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved_model, folder)
    damage(folder)
    return str(folder)


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _ensemble_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["num_ensemble_members"], config["use_decoder"] = 2, False
    (folder / "config.json").write_text(json.dumps(config))


def _other_geometry(folder):
    config = json.loads((folder / "config.json").read_text())
    config["capsule_dim"] = 8
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "config.json").unlink(), "is not a model folder"),
        (_truncate_weights, "cannot load a model from"),
        (_ensemble_config, "do not match its config.json \\(missing: "),
        (_other_geometry, "do not match its config.json \\(differently shaped"),
    ],
    ids=["no-config", "truncated-weights", "ensemble-config-over-one-member", "other-geometry"],
)
def test_load_model_and_processor_refuses_broken_folders(saved_model, tmp_path, damage, message):
    with pytest.raises(UsageError, match=message):
        load_model_and_processor(_broken_copy(saved_model, tmp_path, damage))


def test_load_model_and_processor_refuses_missing_paths_and_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model_and_processor(str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a model folder"):
        load_model_and_processor(str(tmp_path / "file.txt"))


@pytest.fixture
def torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield torch
    torch.set_num_threads(threads)


def launched_by_accelerate(monkeypatch, omp_threads: str | None, local_processes: str | None = None, cores: int = 4):
    """The environment `accelerate launch` gives its processes, on a machine with `cores` physical cores."""
    import psutil

    for name in [name for name in os.environ if name.startswith("ACCELERATE_")] + ["LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    if omp_threads is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_threads)
    if local_processes is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_processes)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2 * cores)))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2 * cores if logical else cores)


@pytest.mark.parametrize("local_processes, expected", [(None, 4), ("2", 2), ("4", None)])
def test_cpu_threads_auto_undoes_accelerate_launchs_single_thread(
    monkeypatch, torch_threads, local_processes, expected
):
    """accelerate launch sets OMP_NUM_THREADS=1 unless told --cpu: 'auto' gives each process its share of the physical
    cores instead (none to give when they are all taken)."""
    launched_by_accelerate(monkeypatch, "1", local_processes)
    torch_threads.set_num_threads(1)
    note = use_cpu_threads("auto", "cpu")
    if expected is None:
        assert note is None and torch_threads.get_num_threads() == 1
    else:
        assert torch_threads.get_num_threads() == expected
        assert note == (
            f"CPU threads: {expected} (auto: accelerate launch set OMP_NUM_THREADS=1; --cpu_threads 1 keeps one thread)"
        )


def test_cpu_threads_auto_leaves_other_settings_alone(monkeypatch, torch_threads):
    torch_threads.set_num_threads(1)
    for omp_threads in (None, "3"):
        launched_by_accelerate(monkeypatch, omp_threads)
        assert use_cpu_threads("auto", "cpu") is None
    launched_by_accelerate(monkeypatch, "1")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # not started by accelerate launch: OMP_NUM_THREADS is the user's
    assert use_cpu_threads("auto", "cpu") is None
    launched_by_accelerate(monkeypatch, "1")
    assert use_cpu_threads("auto", "cuda") is None
    assert torch_threads.get_num_threads() == 1
    assert use_cpu_threads(3, "cpu") == "CPU threads: 3 (--cpu_threads)"
    assert torch_threads.get_num_threads() == 3


GLIBC = platform.libc_ver()[0] == "glibc"
REALLOCATION_FAULTS = """
import ctypes, resource, sys, torch
from capsnet_hf.cli import keep_freed_cpu_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages, whatever the host's transparent huge pages
note = keep_freed_cpu_memory(sys.argv[1] == "keep", "cpu")
for _ in range(5):  # while the heap grows to hold it
    torch.empty(16 << 20).fill_(1.0)  # 64 MB: above glibc's largest dynamic mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, note is not None)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_keeping_freed_cpu_memory_spares_the_page_faults_of_each_reallocation():
    """A 64 MB tensor freed and allocated again: by default fresh pages every time (16k faults each), kept: none once
    the heap has grown."""
    faults = {}
    for mode in ("default", "keep"):
        run = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        count, noted = run.stdout.split()
        faults[mode] = int(count)
        assert noted == str(mode == "keep")
    assert faults["default"] > 10 * 16000 * 0.9 and faults["keep"] < 1000, faults


def test_keeping_freed_cpu_memory_leaves_other_devices_and_the_users_settings_alone(monkeypatch):
    assert keep_freed_cpu_memory(False, "cpu") is None
    assert keep_freed_cpu_memory(True, "cuda") is None
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert keep_freed_cpu_memory(True, "cpu") is None
    monkeypatch.delenv("MALLOC_TOP_PAD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_freed_cpu_memory(True, "cpu") is None


@pytest.mark.parametrize("command", ["capsnet_hf.train", "capsnet_hf.evaluate"])
def test_cpu_threads_must_be_auto_or_a_positive_number(command, tmp_path):
    argv = {
        "capsnet_hf.train": ["--dataset_name", "x", "--output_dir", str(tmp_path / "out")],
        "capsnet_hf.evaluate": ["--model_name_or_path", str(tmp_path)],
    }[command]
    prog = {"capsnet_hf.train": "capsnet-train", "capsnet_hf.evaluate": "capsnet-eval"}[command]
    done = subprocess.run(
        [sys.executable, "-m", command, *argv, "--cpu_threads", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"{prog}: error: argument --cpu_threads: expected a positive integer, got '0'"
    )
    assert cpu_threads_choice("AUTO") == "auto" and cpu_threads_choice("2") == 2
