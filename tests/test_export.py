"""Deployment paths of vision models: ONNX (`capsnet-export-onnx`, run in onnxruntime), `torch.export` with a
dynamic batch, and the image-feature-extraction pipeline."""

import json

import pytest
import torch
from conftest import small_config
from transformers import pipeline

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification, CapsNetImageProcessor, CapsNetModel
from capsnet_hf.export_onnx import export_program, exportable_routing, main, onnxruntime_outputs

# 28x28 like MNIST, so that the fixture digits are real inputs, but small enough to export in seconds.
MNIST_GEOMETRY = dict(conv1_channels=16, primary_capsule_types=4, capsule_dim=8, decoder_hidden_sizes=[32, 64])


@pytest.fixture
def mnist_model_folder(tmp_path):
    """A saved 28x28 CapsNet classifier with its image processor, and the model."""
    model = CapsNetForImageClassification(CapsNetConfig(**MNIST_GEOMETRY)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    CapsNetImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder, model


def real_digits(folder, images) -> torch.Tensor:
    return CapsNetImageProcessor.from_pretrained(folder)([image for image, _ in images], return_tensors="pt")[
        "pixel_values"
    ]


def test_onnx_export_runs_in_onnxruntime_like_pytorch_on_real_digits(mnist_model_folder, mnist_fixture_images):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    import onnx

    folder, model = mnist_model_folder
    output = folder.parent / "capsnet.onnx"
    assert main(["--model_name_or_path", str(folder), "--output", str(output)]) == 0
    pixel_values = real_digits(folder, mnist_fixture_images)
    with torch.no_grad():
        expected = model(pixel_values)
    for batch in (pixel_values, pixel_values[:1]):  # the export was traced on a batch of 2
        outputs = onnxruntime_outputs(output, batch)
        assert list(outputs) == ["logits", "capsule_lengths", "capsule_poses", "reconstructions"]
        for name, value in outputs.items():
            torch.testing.assert_close(torch.from_numpy(value), expected[name][: len(batch)], rtol=0, atol=1e-4)
    metadata = {prop.key: prop.value for prop in onnx.load(output).metadata_props}
    assert json.loads(metadata["id2label"]) == {str(i): label for i, label in model.config.id2label.items()}


def test_onnx_export_errors_are_one_line(tmp_path, mnist_model_folder, monkeypatch, capsys):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)
    import capsnet_hf.export_onnx as export_onnx

    folder, _ = mnist_model_folder
    assert main(["--model_name_or_path", str(tmp_path / "missing"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert main(["--model_name_or_path", str(folder), "--output", str(tmp_path / "m.bin")]) == 2
    monkeypatch.setattr(export_onnx, "max_logit_difference", lambda *args: 0.5)
    assert main(["--model_name_or_path", str(folder), "--output", str(tmp_path / "m.onnx")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]  # not progress bars
    assert [line.split(": error: ")[0] for line in errors] == ["capsnet-export-onnx"] * 3
    assert "does not exist" in errors[0] and ".onnx file" in errors[1] and "differ from PyTorch's by 0.5" in errors[2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # nothing written, no temporary left


@pytest.mark.parametrize("members", [1, 2])
def test_torch_export_with_a_dynamic_batch(members):
    model = CapsNetForImageClassification(small_config(num_ensemble_members=members, use_decoder=members == 1))
    program = export_program(model, torch.rand(2, 1, 16, 16))
    for batch_size in (1, 5):
        pixel_values = torch.rand(batch_size, 1, 16, 16)
        with torch.no_grad():
            exported, eager = program.module()(pixel_values), model(pixel_values)
        assert exported.keys() == eager.keys()
        for name in eager.keys():
            torch.testing.assert_close(exported[name], eager[name])


def test_torch_export_of_a_fixed_batch_needs_nothing_special():
    model = CapsNetModel(small_config()).eval()
    pixel_values = torch.rand(3, 1, 16, 16)
    program = torch.export.export(model, (pixel_values,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(pixel_values).capsule_poses, model(pixel_values).capsule_poses)


def test_exportable_routing_is_undone_after_the_block():
    model = CapsNetForImageClassification(small_config())
    layer = model.capsnet.members[0].class_capsules
    kernel = object()  # stands for an attached CPU routing kernel
    layer.routing_kernel = kernel
    with exportable_routing(model):
        assert layer.routing_kernel is None and layer.examples_per_chunk(True, False) is None
    assert layer.routing_kernel is kernel and layer.examples_per_chunk(True, False) == layer.max_examples_per_chunk


def test_image_feature_extraction_pipeline_gives_the_class_capsules(mnist_model_folder, mnist_fixture_images):
    folder, model = mnist_model_folder
    extractor = pipeline("image-feature-extraction", model=str(folder))
    assert isinstance(extractor.model, CapsNetModel)
    features = extractor([image for image, _ in mnist_fixture_images], return_tensors=True)
    with torch.no_grad():
        expected = model.capsnet(real_digits(folder, mnist_fixture_images)).capsule_poses
    assert [tuple(feature.shape) for feature in features] == [(1, 10, 8)] * 3  # [1, classes, capsule_dim] per image
    torch.testing.assert_close(torch.cat(features), expected)
