"""Model cards from templates and the one-commit Hub upload, with `HfApi` mocked (offline)."""

import json

import pytest
from huggingface_hub import CommitOperationAdd, ModelCard
from test_data import write_dataset
from test_train import fresh_accelerate_state, tiny_args  # noqa: F401  (fixture)

from capsnet_hf import hub
from capsnet_hf.train import train
from capsnet_hf.training.recipes import RECIPE_DESCRIPTIONS, RECIPES


class FakeHfApi:
    """Records the `HfApi` calls that `push_folder_to_hub` makes."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        return "commit-info"


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_folder_uploads_every_file_in_one_commit(tmp_path, fake_api):
    (tmp_path / "sub").mkdir()
    for name in ("README.md", "config.json", "model.safetensors", "sub/extra.txt", "log.jsonl", ".hidden"):
        (tmp_path / name).write_text(name)
    result = hub.push_folder_to_hub(
        tmp_path, "org/capsnet", private=True, commit_message="msg", token="tok", ignore_patterns=["*.jsonl"]
    )
    assert result == "commit-info"
    names = [name for name, _ in fake_api.calls]
    assert names == ["init", "create_repo", "create_commit"]
    assert fake_api.calls[0][1] == {"token": "tok"}
    assert fake_api.calls[1][1] == {"repo_id": "org/capsnet", "repo_type": "model", "private": True, "exist_ok": True}
    commit = fake_api.calls[2][1]
    assert commit["repo_id"] == "org/capsnet" and commit["commit_message"] == "msg"
    assert all(isinstance(operation, CommitOperationAdd) for operation in commit["operations"])
    uploaded = {operation.path_in_repo: operation.path_or_fileobj for operation in commit["operations"]}
    assert sorted(uploaded) == ["README.md", "config.json", "model.safetensors", "sub/extra.txt"]
    assert uploaded["sub/extra.txt"] == str(tmp_path / "sub" / "extra.txt")


def test_push_of_an_empty_folder_is_refused(tmp_path, fake_api):
    with pytest.raises(ValueError, match="nothing to upload"):
        hub.push_folder_to_hub(tmp_path, "org/capsnet")
    assert fake_api.calls == []


def test_find_template():
    assert hub.find_template("trained_capsnet").name == "trained_capsnet.md"
    with pytest.raises(FileNotFoundError, match="no_such_card"):
        hub.find_template("no_such_card")


def test_train_push_to_hub_publishes_the_model_folder_with_our_card(tmp_path, fake_api):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 6})
    output_dir = tmp_path / "out"
    train(tiny_args(dataset, output_dir, "--max_train_steps", "2", "--checkpointing_steps", "1",
                   "--push_to_hub", "--hub_model_id", "org/tiny-capsnet", "--hub_private_repo"))  # fmt: skip
    create_repo = dict(fake_api.calls)["create_repo"]
    assert create_repo["repo_id"] == "org/tiny-capsnet" and create_repo["private"] is True
    commits = [kwargs for name, kwargs in fake_api.calls if name == "create_commit"]
    assert len(commits) == 1
    uploaded = sorted(operation.path_in_repo for operation in commits[0]["operations"])
    assert uploaded == [
        "README.md",
        "config.json",
        "configuration_capsnet.py",
        "eval_results.json",
        "image_processing_capsnet.py",
        "model.safetensors",
        "modeling_capsnet.py",
        "preprocessor_config.json",
        "reconstructions.png",
        "train_results.json",
    ]
    assert (output_dir / "checkpoints").is_dir() and (output_dir / "training_log.jsonl").is_file()  # kept, unpublished
    card = ModelCard.load(output_dir / "README.md")
    accuracy = json.loads((output_dir / "eval_results.json").read_text())["eval_accuracy"]
    assert card.data.model_name == "tiny-capsnet" and card.data.eval_results[0].metric_value == round(accuracy, 6)
    assert 'from_pretrained("org/tiny-capsnet")' in card.text and "--push_to_hub" in card.text


def trained_card_text(config, **args) -> str:
    """The text of the card of a one-step training run on ylecun/mnist with `config` and these extra arguments."""
    args = {
        "dataset_name": "ylecun/mnist", "output_dir": "out/capsnet", "learning_rate": 1e-3, "lr_decay_rate": 0.96,
        "lr_decay_steps": 2000, "min_learning_rate": 1e-6, "per_device_train_batch_size": 128,
        "gradient_accumulation_steps": 1, "seed": 0, "command": "capsnet-train ...", **args,
    }  # fmt: skip
    train_results = {"train_steps": 1, "epochs": 0.1, "train_examples_seen": 128, "train_runtime_seconds": 1.0}
    eval_results = {"eval_accuracy": 0.5, "eval_error_percent": 50.0}
    return hub.render_trained_model_card(args, config, train_results, eval_results, 128, 469, 1).text


def test_trained_card_lists_the_options_that_differ_from_the_defaults():
    from capsnet_hf import CapsNetConfig

    changed = trained_card_text(
        CapsNetConfig(routing_iterations=2, padding="same", id2label={i: str(i) for i in range(10)})
    )
    rows = [line for line in changed.splitlines() if line.startswith("| `")]
    assert rows == ["| `padding` | same | valid |", "| `routing_iterations` | 2 | 3 |"]
    assert "every option at its default" in trained_card_text(CapsNetConfig(id2label={i: str(i) for i in range(10)}))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_trained_card_says_what_its_recipe_is(recipe):
    from capsnet_hf import CapsNetConfig

    text = " ".join(trained_card_text(CapsNetConfig(), recipe=recipe).split())
    epochs = RECIPES[recipe]["training"]["num_train_epochs"]
    assert (
        f"The `--recipe {recipe}` preset is {RECIPE_DESCRIPTIONS[recipe]}; its full run trains {epochs} epochs" in text
    )
