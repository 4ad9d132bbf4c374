"""capsnet-eval: metrics, a saved model and an ensemble on a small data set, JSON output, bad input."""

import json

import pytest
import torch
from test_data import write_dataset
from test_train import fresh_accelerate_state, tiny_args  # noqa: F401  (fixture)

from capsnet_hf.data import UsageError
from capsnet_hf.evaluate import classification_metrics, evaluate, main
from capsnet_hf.train import train


def test_classification_metrics_single_label():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    result = classification_metrics(scores, labels, {0: "a", 1: "b", 2: "c"})
    assert result["num_examples"] == 4 and result["accuracy"] == 0.75 and result["error_percent"] == 25.0
    assert result["per_class_accuracy"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_classification_metrics_two_hot_multimnist():
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.2, 0.9, 0.8]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    result = classification_metrics(scores, labels, {})
    assert result["accuracy"] == pytest.approx(2 / 3) and "confusion_matrix" not in result


@pytest.fixture
def trained(tmp_path):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 11})
    output_dir = tmp_path / "model"
    train(tiny_args(dataset, output_dir, "--max_train_steps", "2"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return dataset, output_dir


def test_eval_of_a_saved_model_matches_training_and_writes_json(trained, tmp_path):
    dataset, model_dir = trained
    output_file = tmp_path / "results" / "eval.json"
    result = evaluate(["--model_name_or_path", str(model_dir), "--dataset_name", dataset, "--split", "test",
                            "--per_device_eval_batch_size", "4", "--output_file", str(output_file)])  # fmt: skip
    from_training = json.loads((model_dir / "eval_results.json").read_text())
    assert result["num_examples"] == 11
    assert result["accuracy"] == from_training["eval_accuracy"]
    assert result["confusion_matrix"] == from_training["eval_confusion_matrix"]
    assert json.loads(output_file.read_text()) == json.loads(json.dumps(result))


def test_ensemble_sums_capsule_lengths(trained):
    from accelerate.state import AcceleratorState

    dataset, model_dir = trained
    single = evaluate(["--model_name_or_path", str(model_dir), "--dataset_name", dataset])
    AcceleratorState._reset_state(reset_partial_state=True)
    ensemble = evaluate(["--ensemble", str(model_dir), str(model_dir), "--dataset_name", dataset])
    assert ensemble["models"] == [str(model_dir)] * 2
    assert ensemble["confusion_matrix"] == single["confusion_matrix"] and "loss" not in ensemble


def test_eval_rejects_an_unknown_split(trained):
    dataset, model_dir = trained
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", dataset, "--split", "validation"]
    with pytest.raises(UsageError, match="no split 'validation'"):
        evaluate(argv)
    assert main(argv) == 2


def test_eval_rejects_labels_the_model_does_not_have(trained, tmp_path):
    _, model_dir = trained
    other = write_dataset(tmp_path / "other", {"test": 3}, labels={"test": [0, 1, 5]})
    with pytest.raises(UsageError, match=r"must lie in \[0, 4\)"):
        evaluate(["--model_name_or_path", str(model_dir), "--dataset_name", other])
