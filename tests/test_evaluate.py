"""capsnet-eval: metrics, a saved model and an ensemble on a small data set, JSON output, bad input."""

import json

import pytest
import torch
from conftest import SHARED_DATASETS
from test_data import write_dataset
from test_train import TINY_MODEL, fresh_accelerate_state, tiny_args  # noqa: F401  (fixture)

from capsnet_hf.cli import UsageError
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


def test_eval_routes_with_the_cpu_kernel_by_default(trained, monkeypatch, capsys):
    from capsnet_hf.kernels.cpu_routing import CpuRoutingKernel

    calls = []
    original = CpuRoutingKernel.__call__
    monkeypatch.setattr(CpuRoutingKernel, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    dataset, model_dir = trained
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", dataset, "--per_device_eval_batch_size", "4"]
    argv += ["--mixed_precision", "no"]  # the same float32 arithmetic on both paths
    torch_path = evaluate([*argv, "--cpu_routing_kernel", "false"])
    assert calls == []
    _reset_accelerate()
    with_kernel = evaluate(argv)
    assert len(calls) == 3  # 11 examples in batches of 4
    assert with_kernel["confusion_matrix"] == torch_path["confusion_matrix"]
    assert with_kernel["loss"] == pytest.approx(torch_path["loss"], rel=1e-5)
    captured = capsys.readouterr()
    assert "class capsules: CPU routing kernel" in captured.err and "class capsules" not in captured.out


def test_eval_refuses_true_without_a_compiler(trained, no_compiler, capsys):
    dataset, model_dir = trained
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", dataset, "--cpu_routing_kernel", "true"]
    assert main(argv) == 2
    assert "capsnet-eval: error: --cpu_routing_kernel for " in capsys.readouterr().err


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


# ---- The paper's experiments (issue 6): baseline CNN, generated evaluation sets, two-target error ----


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_class_scores_are_capsule_lengths_or_softmax_probabilities():
    from transformers.modeling_outputs import ImageClassifierOutput

    from capsnet_hf import CapsNetImageClassifierOutput
    from capsnet_hf.evaluate import class_scores

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    lengths = torch.tensor([[0.1, 0.9, 0.2]])
    assert torch.equal(class_scores(CapsNetImageClassifierOutput(logits=logits, capsule_lengths=lengths)), lengths)
    assert torch.allclose(class_scores(ImageClassifierOutput(logits=logits)), logits.softmax(-1))


def test_baseline_cnn_trains_loads_with_auto_classes_and_evaluates(tmp_path):
    from transformers import AutoModelForImageClassification

    from capsnet_hf.paper.baseline_cnn import BaselineCNNForImageClassification

    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 11})
    output_dir = tmp_path / "baseline"
    results = train([
        "--model_type", "baseline_cnn", "--dataset_name", dataset, "--output_dir", str(output_dir),
        "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none",
    ])  # fmt: skip
    assert results["train_steps"] == 2 and results["eval_num_examples"] == 11
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    assert isinstance(model, BaselineCNNForImageClassification)
    assert model.config.model_type == "capsnet_baseline_cnn" and model.config.image_size == [16, 16]
    card = (output_dir / "README.md").read_text()
    assert "Baseline CNN" in card and "pipeline_tag: image-classification" in card and "license: apache-2.0" in card
    assert not (output_dir / "reconstructions.png").exists()  # no capsules, no decoder
    _reset_accelerate()
    result = evaluate(["--model_name_or_path", str(output_dir), "--dataset_name", dataset])
    assert result["accuracy"] == results["eval_accuracy"]
    assert sum(map(sum, result["confusion_matrix"])) == 11
    _reset_accelerate()
    with pytest.raises(UsageError, match="--cpu_routing_kernel for .*no CapsNet class-capsule layer"):
        evaluate(["--model_name_or_path", str(output_dir), "--dataset_name", dataset, "--cpu_routing_kernel", "true"])


def test_baseline_cnn_refuses_capsnet_options_and_multimnist(tmp_path):
    dataset = write_dataset(tmp_path / "data", {"train": 16, "test": 11})
    with pytest.raises(UsageError, match="routing_iterations"):
        train(["--model_type", "baseline_cnn", "--dataset_name", dataset, "--output_dir", str(tmp_path / "a"),
               "--routing_iterations", "2", "--per_device_train_batch_size", "8", "--report_to", "none"])  # fmt: skip
    source = SHARED_DATASETS / "mnist"
    if source.is_dir():
        _reset_accelerate()
        with pytest.raises(UsageError, match="multimnist"):
            train(["--model_type", "baseline_cnn", "--dataset_name", "multimnist", "--source_dataset_name",
                   str(source), "--max_train_samples", "32", "--max_eval_samples", "8", "--variants_per_digit", "1",
                   "--output_dir", str(tmp_path / "b"), "--per_device_train_batch_size", "8", "--report_to", "none"])  # fmt: skip


def _generated(tmp_path, name: str, *extra: str):
    """A 1-step tiny CapsNet trained on a generated set of the shared MNIST copy."""
    source = SHARED_DATASETS / "mnist"
    if not source.is_dir():
        pytest.skip(f"the shared MNIST copy is not at {source}")
    output_dir = tmp_path / name
    train([
        "--dataset_name", name, "--source_dataset_name", str(source), "--output_dir", str(output_dir),
        "--max_train_samples", "32", "--max_eval_samples", "8", "--variants_per_digit", "1", *TINY_MODEL,
        "--max_train_steps", "1", "--per_device_train_batch_size", "8", "--report_to", "none", *extra,
    ])  # fmt: skip
    _reset_accelerate()
    return source, output_dir


def test_expanded_mnist_model_evaluates_on_affnist_style(tmp_path):
    source, model_dir = _generated(tmp_path, "expanded_mnist")
    common = ["--model_name_or_path", str(model_dir), "--source_dataset_name", str(source), "--max_eval_samples", "6"]
    affine = evaluate([*common, "--dataset_name", "affnist_style", "--eval_variants_per_digit", "2"])
    assert affine["dataset"] == "affnist_style" and affine["num_examples"] == 12
    assert sum(map(sum, affine["confusion_matrix"])) == 12
    _reset_accelerate()
    expanded = evaluate([*common, "--dataset_name", "expanded_mnist"])
    assert expanded["num_examples"] == 6
    _reset_accelerate()
    with pytest.raises(UsageError, match="evaluation-only"):
        _generated(tmp_path, "affnist_style")


def test_multimnist_eval_reports_the_two_target_error(tmp_path):
    from capsnet_hf.data.batching import BatchTransform
    from capsnet_hf.data.splits import load_paper_splits
    from capsnet_hf.training import metrics

    source, model_dir = _generated(tmp_path, "multimnist")
    result = evaluate(["--model_name_or_path", str(model_dir), "--dataset_name", "multimnist",
                       "--source_dataset_name", str(source), "--max_eval_samples", "10", "--seed", "3"])  # fmt: skip
    assert result["num_examples"] == 10 and result["metric"].startswith("both digits correct")
    # The same number from the model's capsule lengths on the same generated pairs.
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    pairs = load_paper_splits("multimnist", str(source), False, 1, 1, seed=3, max_eval_samples=10).eval
    batch = pairs.batch(torch.arange(len(pairs)))
    with torch.no_grad():
        lengths = model(pixel_values=BatchTransform((36, 36))(batch["pixel_values"])).capsule_lengths
    assert result["error_percent"] == pytest.approx(metrics.multi_digit_error(lengths, batch["labels"]))


def test_eval_refuses_a_model_with_weights_of_another_config(trained, tmp_path, capsys):
    """An ensemble config over one member's weights used to evaluate a half-random model with exit status 0."""
    import shutil

    dataset, model_dir = trained
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_ensemble_members"], config["use_decoder"] = 2, False
    (broken / "config.json").write_text(json.dumps(config))
    output_file = tmp_path / "eval.json"
    argv = ["--model_name_or_path", str(broken), "--dataset_name", dataset, "--output_file", str(output_file)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("capsnet-eval: error: the weights of") and "missing: " in error
    assert not output_file.exists()


def test_eval_never_reports_the_accuracy_of_non_finite_scores(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    dataset, model_dir = trained
    import shutil

    broken = tmp_path / "nan-model"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(key for key in weights if key.endswith("conv1.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    output_file = tmp_path / "eval.json"
    assert (
        main(["--model_name_or_path", str(broken), "--dataset_name", dataset, "--output_file", str(output_file)]) == 2
    )
    assert "class scores are not finite for 11 of 11 examples" in capsys.readouterr().err
    assert not output_file.exists()
