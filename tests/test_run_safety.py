"""capsnet-train never mixes runs or publishes half a model: resume checks the run's identity and skips a damaged
checkpoint, a broken --model_name_or_path is one line, and the final folder gets config.json last."""

import json
import os
import shutil

import pytest
from test_data import write_dataset
from test_train import checkpoint_steps, fresh_accelerate_state, tiny_args  # noqa: F401  (fixture)

from capsnet_hf.cli import UsageError
from capsnet_hf.train import main, train
from capsnet_hf.training.checkpoints import TRAINING_STATE_FILE


@pytest.fixture
def checkpointed_run(tmp_path):
    """Four steps with a checkpoint every two."""
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8})
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, "--max_train_steps", "4", "--checkpointing_steps", "2",
                    "--checkpoints_total_limit", "3"))  # fmt: skip
    assert checkpoint_steps(output_dir) == [2, 4]
    return dataset, output_dir


def _reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize(
    "change, named",
    [
        (["--seed", "7"], "seed 42 -> 7"),
        (["--learning_rate", "0.002"], "learning_rate 0.001 -> 0.002"),
        (["--per_device_train_batch_size", "4"], "per_device_train_batch_size 8 -> 4"),
    ],
)
def test_resume_with_other_arguments_is_refused_unless_allowed(checkpointed_run, change, named, capsys):
    dataset, output_dir = checkpointed_run
    _reset()
    argv = tiny_args(dataset, output_dir, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert main([*argv, *change]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is a checkpoint of another run" in error and named in error and "--allow_resume_changes" in error
    _reset()
    assert main([*argv, *change, "--allow_resume_changes"]) == 0


def test_resume_on_other_data_is_refused(checkpointed_run, tmp_path):
    _, output_dir = checkpointed_run
    other = write_dataset(tmp_path / "other", {"train": 24, "test": 8})
    _reset()
    with pytest.raises(UsageError, match="the training data"):
        train(tiny_args(other, output_dir, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))


def test_a_damaged_newest_checkpoint_is_skipped_with_a_message(checkpointed_run, capsys):
    dataset, output_dir = checkpointed_run
    newest = output_dir / "checkpoints" / "step_4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    _reset()
    train(tiny_args(dataset, output_dir, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_4" in out and "resumed from" in out and "step_2 at step 2" in out


def test_a_damaged_checkpoint_given_by_path_is_one_line(checkpointed_run):
    dataset, output_dir = checkpointed_run
    chosen = output_dir / "checkpoints" / "step_2"
    (chosen / TRAINING_STATE_FILE).write_text("{half")
    _reset()
    with pytest.raises(UsageError, match=f"cannot resume from .*{TRAINING_STATE_FILE} is unreadable"):
        train(tiny_args(dataset, output_dir, "--max_train_steps", "6", "--resume_from_checkpoint", str(chosen)))


def test_broken_model_name_or_path_is_one_line(checkpointed_run, tmp_path):
    dataset, output_dir = checkpointed_run
    broken = tmp_path / "broken"
    shutil.copytree(output_dir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _reset()
    with pytest.raises(UsageError, match="cannot load a model from"):
        train(tiny_args(dataset, tmp_path / "new", "--max_train_steps", "1", "--model_name_or_path", str(broken)))
    assert not (tmp_path / "new" / "config.json").exists()


def test_final_folder_moves_config_last_and_leaves_no_staging(tmp_path, renamed_names):
    moved = renamed_names
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8})
    train(tiny_args(dataset, tmp_path / "run", "--max_train_steps", "2"))
    assert moved[-1] == "config.json" and "model.safetensors" in moved
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith(".partial")]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "capsnet"


def test_images_too_small_for_the_model_are_one_line(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(1, 1))
    assert main(tiny_args(dataset, tmp_path / "run", "--max_train_steps", "1")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("capsnet-train: error: ") and "image_size [1, 1] is too small" in error
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_finished_output_dir_is_not_trained_over(tmp_path, capsys):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8})
    train(tiny_args(dataset, tmp_path / "run", "--max_train_steps", "1"))
    _reset()
    assert main(tiny_args(dataset, tmp_path / "run", "--max_train_steps", "1")) == 2
    assert "holds a trained model" in capsys.readouterr().err
    _reset()
    assert main(tiny_args(dataset, tmp_path / "run", "--max_train_steps", "1", "--overwrite_output_dir")) == 0
