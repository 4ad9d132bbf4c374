"""CapsNet behaves like a built-in transformers vision model: hidden states, strict forward arguments, device maps,
and transformers.Trainer with the image-classification tutorial's metric."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DATASETS, small_config

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, CapsNetImageProcessor, CapsNetModel


@pytest.mark.parametrize("members", [1, 2])
def test_hidden_states_per_stage_with_retainable_gradients(members):
    config = small_config(num_ensemble_members=members, use_decoder=members == 1)
    model = CapsNetForImageClassification(config)
    pixel_values = torch.rand(3, 1, 16, 16)
    assert model(pixel_values).hidden_states is None
    output = model(pixel_values, output_hidden_states=True)
    member_axis = (members,) if members > 1 else ()
    assert [tuple(h.shape) for h in output.hidden_states] == [
        (3, *member_axis, 8, 12, 12),  # ReLU conv1 (5x5 on 16x16)
        (3, *member_axis, config.num_primary_capsules, 4),  # squashed primary capsules
        (3, *member_axis, 4, 6),  # class capsules
    ]
    if members == 1:  # an ensemble's are stacked copies, off the path to the logits
        for hidden in output.hidden_states:
            hidden.retain_grad()
        output.logits.sum().backward()
        assert all(hidden.grad is not None and hidden.grad.abs().sum() > 0 for hidden in output.hidden_states)

    config.output_hidden_states = True  # the config's default is honoured, in tuples too
    as_tuple = CapsNetModel(config)(pixel_values, return_dict=False)
    assert len(as_tuple[-1]) == 3 and as_tuple[-1][2].shape[-2:] == (4, 6)


def test_unknown_forward_arguments_are_rejected():
    model = CapsNetForImageClassification(small_config())
    with pytest.raises(TypeError, match="output_hidden_state"):
        model(torch.rand(1, 1, 16, 16), output_hidden_state=True)
    with pytest.raises(TypeError, match="interpolate"):
        model.capsnet(torch.rand(1, 1, 16, 16), interpolate=True)
    assert model.accepts_loss_kwargs is False  # Trainer scales the mean loss for gradient accumulation itself


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_from_pretrained_with_a_device_map(tmp_path, device_map):
    pytest.importorskip("accelerate")
    model = CapsNetForImageClassification(small_config())
    model.save_pretrained(tmp_path)
    loaded = CapsNetForImageClassification.from_pretrained(tmp_path, device_map=device_map)
    assert loaded.device == torch.device("cpu") and set(model._no_split_modules) == {
        "CapsNetEncoder",
        "CapsNetDecoder",
    }
    pixel_values = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded(pixel_values).logits, model.eval()(pixel_values).logits)


def test_trainer_evaluates_and_predicts_with_the_tutorial_metric(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    if not (SHARED_DATASETS / "mnist").is_dir():
        pytest.skip("the shared MNIST copy is not there")
    mnist = datasets.load_dataset(str(SHARED_DATASETS / "mnist"))
    train, test = mnist["train"].select(range(256)), mnist["test"].select(range(64))
    processor = CapsNetImageProcessor()

    def transform(batch):
        return {
            "pixel_values": processor(batch["image"], return_tensors="pt")["pixel_values"],
            "labels": batch["label"],
        }

    def compute_metrics(eval_pred):  # the image-classification tutorial's metric, unchanged
        predictions = np.argmax(eval_pred.predictions, axis=1)
        return {"accuracy": float((predictions == eval_pred.label_ids).mean())}

    config = CapsNetConfig(conv1_channels=16, primary_capsule_types=4, capsule_dim=8, decoder_hidden_sizes=[32, 64])
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=32,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=4,
        learning_rate=3e-3,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = Trainer(
        model=CapsNetForImageClassification(config),
        args=args,
        train_dataset=train.with_transform(transform),
        eval_dataset=test.with_transform(transform),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = Trainer(
        model=CapsNetForImageClassification.from_pretrained(tmp_path / "saved"),
        args=args,
        eval_dataset=test.with_transform(transform),
    )
    prediction = reloaded.predict(test.with_transform(transform))
    assert prediction.predictions.shape == (64, 10)  # the logits alone, no capsules or reconstructions
    assert prediction.metrics["test_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_pipeline_in_a_terminal_never_asks_to_run_custom_code(tmp_path):
    """In a pseudo-terminal (where transformers would prompt and wait 15 s), with capsnet_hf imported."""
    import os
    import pty
    import sys
    import time

    model = CapsNetForImageClassification(small_config())
    model.save_pretrained(tmp_path / "model")
    CapsNetImageProcessor.from_model_config(model.config).save_pretrained(tmp_path / "model")
    script = tmp_path / "run.py"
    script.write_text(
        "import capsnet_hf\nfrom transformers import pipeline\n"
        f"classifier = pipeline('image-classification', model={str(tmp_path / 'model')!r})\n"
        "print('LOADED', type(classifier.image_processor).__name__, flush=True)\n"
    )
    pid, descriptor = pty.fork()
    if pid == 0:  # the child: a fresh interpreter on the terminal
        os.execvpe(sys.executable, [sys.executable, str(script)], {**os.environ, "HF_HUB_OFFLINE": "1"})
    output, started = b"", time.time()
    while time.time() - started < 120:
        try:
            chunk = os.read(descriptor, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert "LOADED CapsNetImageProcessor" in text
    assert "custom code" not in text and "[y/N]" not in text
