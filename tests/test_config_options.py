"""Every model option is declared once, as a config field: capsnet-train's flags, the recipes' and config files'
sections, the output-folder check and the model card are derived from the declarations."""

import json

import pytest
import torch
from conftest import small_config

from capsnet_hf import BaselineCNNConfig, CapsNetConfig, CapsNetForImageClassification
from capsnet_hf.cli import UsageError, parse_bool
from capsnet_hf.configuration_capsnet import architecture_options, changed_options, model_options, option_kind
from capsnet_hf.paper.baseline_cnn import BaselineCNNForImageClassification
from capsnet_hf.training.arguments import MODEL_FLAGS, NOT_MODEL_FLAGS, build_config, build_parser, parse_args
from capsnet_hf.training.checkpoints import check_output_dir
from capsnet_hf.training.recipes import RECIPES

BASE = ["--dataset_name", "x", "--output_dir", "y"]
LABELS = {i: str(i) for i in range(10)}
BASELINE_TINY = {"image_size": 20, "conv_channels": [4, 4, 2], "hidden_sizes": [8, 6]}


def other_value(config, field):
    """A valid value of option `field` other than `config`'s."""
    value = getattr(config, field.name)
    kind = option_kind(field)
    if kind == "int":
        return value + 2  # keeps an odd kernel odd
    if kind == "float":
        return value / 2 if value else 0.5
    if kind == "bool":
        return not value
    if kind == "choice":
        return next(choice for choice in field.type.__args__ if choice not in (value, "auto"))
    return [*value[:-1], value[-1] + 1]  # "ints" and "height_width"


def weight_shapes(model_class, config):
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def capsnet_pair(field):
    """A small CapsNetConfig and one that differs from it in option `field` only."""
    base = {"use_decoder": False} if field.name == "num_ensemble_members" else {}
    config = small_config(**base)
    return config, small_config(**base, **{field.name: other_value(config, field)})


def baseline_pair(field):
    config = BaselineCNNConfig(**BASELINE_TINY)
    return config, BaselineCNNConfig(**{**BASELINE_TINY, field.name: other_value(config, field)})


def option_named(name):
    return next(field for field in model_options(CapsNetConfig) if field.name == name)


@pytest.mark.parametrize(
    "config_class, pair, model_class",
    [
        (CapsNetConfig, capsnet_pair, CapsNetForImageClassification),
        (BaselineCNNConfig, baseline_pair, BaselineCNNForImageClassification),
    ],
    ids=["capsnet", "baseline_cnn"],
)
def test_architecture_options_are_those_that_change_the_weights(config_class, pair, model_class):
    for field in model_options(config_class):
        config, changed = pair(field)
        differs = weight_shapes(model_class, config) != weight_shapes(model_class, changed)
        assert field.metadata["architecture"] == differs, field.name


@pytest.mark.parametrize("config_class", [CapsNetConfig, BaselineCNNConfig])
def test_every_option_has_a_checked_kind_and_a_help_line(config_class):
    for field in model_options(config_class):
        assert option_kind(field) is not None, f"{field.name}: annotation {field.type} is not checked"
        assert field.metadata["help"] and "\n" not in field.metadata["help"]


def test_every_option_but_the_data_decided_ones_is_a_flag_of_its_type_with_its_help():
    actions = {action.dest: action for action in build_parser()._actions}
    options = {field.name: field for field in model_options(CapsNetConfig)}
    assert set(MODEL_FLAGS) == set(options) - set(NOT_MODEL_FLAGS) and set(NOT_MODEL_FLAGS) <= set(options)
    for name in MODEL_FLAGS:
        action, kind = actions[name], option_kind(options[name])
        assert action.option_strings == [f"--{name}"] and action.default is None
        assert options[name].metadata["help"] in action.help
        assert action.type is {"int": int, "float": float, "bool": parse_bool, "choice": str, "ints": int}[kind]
        assert action.nargs == ("+" if kind == "ints" else None)
        if kind == "choice":
            assert tuple(action.choices) == options[name].type.__args__
    assert actions["do_standardize"].type is parse_bool  # the one boolean parser, for every boolean flag


@pytest.mark.parametrize("name", MODEL_FLAGS)
def test_each_model_flag_reaches_the_config(name):
    value = other_value(CapsNetConfig(), option_named(name))
    words = [str(item) for item in value] if isinstance(value, list) else [str(value).lower()]
    extra = ["--use_decoder", "false"] if name == "num_ensemble_members" else []
    args = parse_args([*BASE, f"--{name}", *words, *extra])
    config = build_config(args, num_channels=1, image_size=[28, 28], id2label=LABELS)
    assert getattr(config, name) == value and type(getattr(config, name)) is type(value)


def test_model_flags_are_checked_over_a_pretrained_config_too(tmp_path):
    CapsNetConfig(id2label=LABELS).save_pretrained(tmp_path)
    args = parse_args([*BASE, "--model_name_or_path", str(tmp_path), "--routing_iterations", "0"])
    with pytest.raises(UsageError, match="CapsNetConfig: routing_iterations must be a positive integer, got 0"):
        build_config(args, num_channels=1, image_size=[28, 28], id2label=LABELS)


def test_an_invalid_option_value_is_a_one_line_usage_error():
    args = parse_args([*BASE, "--primary_stride", "0"])
    with pytest.raises(UsageError, match="^CapsNetConfig: primary_stride must be a positive integer, got 0$"):
        build_config(args, num_channels=1, image_size=[28, 28], id2label=LABELS)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_split_model_options_from_training_flags(name):
    recipe = RECIPES[name]
    assert sorted(recipe) == ["model", "training"]
    assert set(recipe["model"]) <= set(MODEL_FLAGS)
    assert not set(recipe["training"]) & {field.name for field in model_options(CapsNetConfig)} - {"image_size"}
    CapsNetConfig(**recipe["model"])  # valid options
    args = parse_args([*BASE, "--recipe", name])
    assert all(getattr(args, key) == value for key, value in {**recipe["model"], **recipe["training"]}.items())


def write_config(tmp_path, values, suffix=".json"):
    path = tmp_path / f"config{suffix}"
    path.write_text(json.dumps(values))
    return str(path)


def test_config_file_sections_and_the_flat_form_give_the_same_arguments(tmp_path):
    sections = {"model": {"routing_iterations": 2, "padding": "same"}, "training": {"learning_rate": 0.01}}
    flat = {"routing_iterations": 2, "padding": "same", "learning_rate": 0.01}
    from_sections = parse_args([*BASE, "--config_file", write_config(tmp_path, sections)])
    from_flat = parse_args([*BASE, "--config_file", write_config(tmp_path, flat, ".yaml")])
    assert vars(from_sections) == {**vars(from_flat), "config_file": vars(from_sections)["config_file"]}
    assert (from_sections.routing_iterations, from_sections.padding, from_sections.learning_rate) == (2, "same", 0.01)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": {"learning_rate": 0.01}}, "['learning_rate'] belong in the 'training' section, not 'model'"),
        ({"training": {"capsule_dim": 8}}, "['capsule_dim'] belong in the 'model' section, not 'training'"),
        ({"model": {"no_such_option": 1}}, "section 'model' has unknown arguments ['no_such_option']"),
        ({"model": {"capsule_dim": 8}, "seed": 1}, "mixes sections with other keys: put CapsNetConfig options"),
        ({"model": {"padding": "SAME"}}, "--padding must be one of ['valid', 'same'], got 'SAME'"),
        ({"model": {"leaky_routing": "maybe"}}, "expected a boolean"),
        ({"model": {"decoder_hidden_sizes": [16, 1.5]}}, "--decoder_hidden_sizes must be an integer, got 1.5"),
    ],
)
def test_config_file_sections_are_checked_like_the_command_line(tmp_path, capsys, values, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*BASE, "--config_file", write_config(tmp_path, values)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.startswith("capsnet-train: error: ") and message in error


@pytest.mark.parametrize("name", architecture_options(CapsNetConfig))
def test_output_dir_with_another_architecture_is_refused(tmp_path, name):
    saved, new = capsnet_pair(option_named(name))
    saved.save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=rf"holds a different model \({name} differ\)"):
        check_output_dir(str(tmp_path), new, overwrite=False, resuming=False)
    check_output_dir(str(tmp_path), new, overwrite=True, resuming=False)


def test_output_dir_with_the_same_architecture_is_accepted(tmp_path):
    weights_alone = [field for field in model_options(CapsNetConfig) if not field.metadata["architecture"]]
    assert {field.name for field in weights_alone} >= {"routing_iterations", "margin_loss_reduction", "bias_init"}
    saved = small_config()
    saved.save_pretrained(tmp_path)
    new = small_config(**{field.name: other_value(saved, field) for field in weights_alone})
    check_output_dir(str(tmp_path), new, overwrite=False, resuming=True)
    # A key missing from config.json (a diff-style file) has its default.
    saved_json = json.loads((tmp_path / "config.json").read_text())
    del saved_json["routing_bias"], saved_json["padding"]
    (tmp_path / "config.json").write_text(json.dumps(saved_json))
    check_output_dir(str(tmp_path), new, overwrite=False, resuming=True)
    with pytest.raises(UsageError, match=r"\(padding differ\)"):
        check_output_dir(str(tmp_path), small_config(padding="same"), overwrite=False, resuming=True)


def test_a_finished_output_dir_is_refused_even_for_the_same_model(tmp_path):
    small_config().save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="holds a trained model: pass --overwrite_output_dir to replace it"):
        check_output_dir(str(tmp_path), small_config(), overwrite=False, resuming=False)
    check_output_dir(str(tmp_path), small_config(), overwrite=True, resuming=False)


def test_output_dir_with_another_model_type_or_an_invalid_config_is_refused(tmp_path):
    BaselineCNNConfig(num_labels=4).save_pretrained(tmp_path / "baseline")
    with pytest.raises(UsageError, match=r"\(model_type differ\)"):
        check_output_dir(str(tmp_path / "baseline"), small_config(), overwrite=False, resuming=False)
    (tmp_path / "bad").mkdir()
    bad = {**small_config().to_dict(), "capsule_dim": 0}
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="no valid CapsNetConfig .*capsule_dim must be a positive integer"):
        check_output_dir(str(tmp_path / "bad"), small_config(), overwrite=False, resuming=False)


def test_changed_options_are_those_that_differ_from_the_defaults():
    assert changed_options(CapsNetConfig()) == {}
    assert changed_options(CapsNetConfig(image_size=(28, 28), decoder_hidden_sizes=(512, 1024))) == {}
    cifar = CapsNetConfig(num_channels=3, image_size=24, padding="same", use_decoder=False)
    assert changed_options(cifar) == {
        "num_channels": 3,
        "image_size": [24, 24],
        "padding": "same",
        "use_decoder": False,
    }
    assert changed_options(BaselineCNNConfig(image_size=40)) == {"image_size": [40, 40], "padding": "valid"}


def test_validate_runs_on_save_and_raises_value_errors(tmp_path):
    config = CapsNetConfig()
    config.routing_iterations = 0
    with pytest.raises(ValueError, match="routing_iterations must be a positive integer"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_help_renders():
    assert "--margin_positive" in build_parser().format_help()
