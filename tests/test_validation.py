"""Bad input is refused at the boundary, before any work, with one line naming the problem: model sizes in
CapsNetConfig, capsnet-train's numeric flags, and --config_file values (the command line's type and choice checks)."""

import json

import pytest

from capsnet_hf import CapsNetConfig
from capsnet_hf.configuration_capsnet import model_options, option_kind
from capsnet_hf.training.arguments import parse_args

# Every integer option counts or sizes something.
POSITIVE_SIZES = [field.name for field in model_options(CapsNetConfig) if option_kind(field) == "int"]


def test_the_model_sizes_are_the_integer_options():
    assert POSITIVE_SIZES == [
        "num_channels", "conv1_channels", "conv1_kernel_size", "primary_capsule_types", "primary_capsule_dim",
        "primary_kernel_size", "primary_stride", "capsule_dim", "routing_iterations", "num_ensemble_members",
    ]  # fmt: skip


@pytest.mark.parametrize("name", POSITIVE_SIZES)
@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_every_model_size_must_be_a_positive_integer(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        CapsNetConfig(**{name: value})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"decoder_hidden_sizes": [512, 0]}, "decoder_hidden_sizes must be positive integers"),
        ({"squash_epsilon": 0.0}, "squash_epsilon must be a positive number"),
        ({"squash_epsilon": float("nan")}, "squash_epsilon must be a positive number"),
        ({"image_size": 0}, "image_size must be a positive int"),
        ({"image_size": [28, 28, 1]}, "image_size must be a positive int"),
        ({"leaky_routing": 1}, "leaky_routing must be true or false, got 1"),
        ({"bias_init": "0.1"}, "bias_init must be a number, got '0.1'"),
        ({"margin_loss_reduction": "sum"}, "margin_loss_reduction must be one of"),
        ({"num_ensemble_members": 2}, "an ensemble .* has no decoder"),
    ],
)
def test_other_model_values_are_checked(values, message):
    with pytest.raises(ValueError, match=message):
        CapsNetConfig(**values)


def test_an_int_is_a_valid_float_option():
    assert CapsNetConfig(bias_init=0, reconstruction_loss_weight=1).bias_init == 0


BASE = ["--dataset_name", "x", "--output_dir", "y"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_train_steps", "-5"], "--max_train_steps must be a positive integer, got -5"),
        (["--lr_decay_steps", "0"], "--lr_decay_steps must be a positive integer"),
        (["--logging_steps", "0"], "--logging_steps must be a positive integer"),
        (["--image_size", "0"], "--image_size must be positive"),
        (["--learning_rate=-1e-3"], "--learning_rate must lie in (0.0, inf)"),
        (["--learning_rate", "nan"], "--learning_rate must lie in (0.0, inf), got nan"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must lie in [0, inf)"),
        (["--train_val_split", "1.0"], "--train_val_split must lie in (0.0, 1.0)"),
        (["--lr_decay_rate", "1.5"], "--lr_decay_rate must lie in (0.0, 1.0]"),
        (["--max_shift", "-2"], "--max_shift must lie in [0, inf)"),
    ],
)
def test_training_flags_out_of_range_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("capsnet-train: error: ") and message in error


def test_in_range_values_pass():
    args = parse_args([*BASE, "--lr_decay_rate", "1.0", "--checkpoints_total_limit", "0", "--max_shift", "0"])
    assert args.lr_decay_rate == 1.0 and args.checkpoints_total_limit == 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"augmentation": "bogus"}, "--augmentation must be one of ['none', 'shift', 'cifar'], got 'bogus'"),
        ({"model_type": "resnet"}, "--model_type must be one of ['capsnet', 'baseline_cnn'], got 'resnet'"),
        ({"per_device_train_batch_size": 1.5}, "--per_device_train_batch_size must be an integer, got 1.5"),
        ({"learning_rate": "fast"}, "--learning_rate must be a number, got 'fast'"),
        ({"use_decoder": "maybe"}, "expected a boolean"),
        ({"overwrite_output_dir": "yes"}, "--overwrite_output_dir must be true or false"),
        ({"contrast_range": [0.5]}, "--contrast_range takes 2 values"),
        ({"learning_rate": -1.0}, "--learning_rate must lie in (0.0, inf)"),
    ],
)
def test_config_file_values_get_the_command_line_checks(tmp_path, capsys, values, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, "--config_file", str(path)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("capsnet-train: error: ") and message in error


def test_config_file_values_of_the_right_types_are_taken(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("use_decoder: false\nimage_size: [28, 28]\ncheckpointing_steps: 500\nmax_shift: 1\n")
    args = parse_args([*BASE, "--config_file", str(path)])
    assert args.use_decoder is False and args.image_size == [28, 28] and args.checkpointing_steps == 500


def test_a_diverging_run_stops_and_publishes_nothing(tmp_path, capsys):
    from test_data import write_dataset
    from test_train import tiny_args

    from capsnet_hf.train import main

    dataset = write_dataset(tmp_path / "data", {"train": 32, "test": 8}, size=(16, 16))
    argv = tiny_args(dataset, tmp_path / "out", "--max_train_steps", "6", "--learning_rate", "1e30")
    assert main(argv) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("capsnet-train: error: ") and "no model was saved" in error
    assert not (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "README.md").exists()


@pytest.mark.parametrize("kernel", [False, True])
def test_model_inputs_dtypes_and_empty_batches(kernel):
    import torch
    from conftest import small_config

    from capsnet_hf import CapsNetForImageClassification, enable_cpu_routing_kernel

    model = CapsNetForImageClassification(small_config()).eval()
    if kernel:
        enable_cpu_routing_kernel(model)
    pixels = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="pixel_values must be a floating-point tensor .* got torch.uint8"):
        model((pixels * 255).to(torch.uint8))
    torch.testing.assert_close(model(pixels.double()).logits, model(pixels).logits)
    empty = model(torch.rand(0, 1, 16, 16), labels=torch.zeros(0, dtype=torch.long))
    assert empty.logits.shape == (0, 4) and empty.reconstructions.shape == (0, 1, 16, 16)
    assert empty.loss.item() == 0.0 and empty.margin_loss.item() == 0.0


def test_saved_weights_have_the_folders_usual_file_mode(tmp_path):
    import os
    import stat

    from test_data import write_dataset
    from test_train import tiny_args

    from capsnet_hf.cli import usual_file_mode
    from capsnet_hf.train import train

    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(16, 16))
    train(tiny_args(dataset, tmp_path / "out", "--max_train_steps", "1"))
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")}
    assert modes["model.safetensors"] == modes["config.json"] == usual_file_mode()


def test_an_output_folder_in_use_or_not_writable_is_refused_before_training(tmp_path, capsys):
    import os

    from test_data import write_dataset
    from test_train import tiny_args

    from capsnet_hf.cli import lock_output_dir
    from capsnet_hf.train import main

    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 8}, size=(16, 16))
    held = lock_output_dir(tmp_path / "busy", "capsnet-train")  # as a run in progress holds it
    try:
        assert main(tiny_args(dataset, tmp_path / "busy", "--max_train_steps", "1")) == 2
    finally:
        held.close()
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error.startswith("capsnet-train: error: --output_dir:") and "in use by capsnet-train (pid" in error
    assert os.listdir(tmp_path / "busy") == [".capsnet.lock"]
    (tmp_path / "file").write_text("not a folder")
    assert main(tiny_args(dataset, tmp_path / "file" / "out", "--max_train_steps", "1")) == 2
    assert "capsnet-train: error: --output_dir:" in capsys.readouterr().err
