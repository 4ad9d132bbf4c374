"""The layer the four commands share (capsnet_hf.cli): the exit convention, the boolean parser, model loading that
refuses broken folders, and outputs written aside then renamed."""

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import small_config

from capsnet_hf import CapsNetForImageClassification
from capsnet_hf.cli import (
    PARTIAL_PREFIX,
    UsageError,
    load_model_and_processor,
    parse_bool,
    run_command,
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
