"""What a transformers user does: Auto classes, save/load, pipeline, and trust_remote_code without capsnet_hf."""

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_without_capsnet_hf
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

import capsnet_hf
from capsnet_hf import CapsNetConfig, CapsNetImageProcessor

DIGITS = ("7", "2", "1")


@pytest.fixture(scope="module")
def saved_mnist_model(tmp_path_factory):
    """The paper's MNIST model (random weights, fixed seed) and its processor, saved as a user would."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("capsnet-mnist")
    config = CapsNetConfig(id2label={i: str(i) for i in range(10)})
    model = AutoModelForImageClassification.from_config(config)
    processor = CapsNetImageProcessor.from_model_config(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


def fixture_batch(processor):
    from PIL import Image

    images = [Image.open(FIXTURES / f"mnist_{digit}.png") for digit in DIGITS]
    return images, processor(images, return_tensors="pt")["pixel_values"]


def test_saved_folder_holds_safetensors_and_auto_map(saved_mnist_model):
    folder, _, _ = saved_mnist_model
    files = {path.name for path in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert {"configuration_capsnet.py", "modeling_capsnet.py", "image_processing_capsnet.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_capsnet.CapsNetConfig",
        "AutoModel": "modeling_capsnet.CapsNetModel",
        "AutoModelForImageClassification": "modeling_capsnet.CapsNetForImageClassification",
        "AutoImageProcessor": "image_processing_capsnet.CapsNetImageProcessor",
    }
    processor_map = json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]
    assert processor_map["AutoImageProcessor"] == "image_processing_capsnet.CapsNetImageProcessor"


def test_round_trip_gives_bit_identical_weights_and_logits(saved_mnist_model):
    folder, model, processor = saved_mnist_model
    _, pixel_values = fixture_batch(processor)
    assert isinstance(AutoConfig.from_pretrained(folder), CapsNetConfig)
    reloaded = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert isinstance(reloaded, capsnet_hf.CapsNetForImageClassification)
    base = AutoModel.from_pretrained(folder).eval()
    assert isinstance(base, capsnet_hf.CapsNetModel)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), CapsNetImageProcessor)
    saved_weights, loaded_weights = model.state_dict(), reloaded.state_dict()
    assert saved_weights.keys() == loaded_weights.keys()
    assert all(torch.equal(saved_weights[name], loaded_weights[name]) for name in saved_weights)
    again = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        loaded = reloaded(pixel_values)
        assert torch.equal(again(pixel_values).logits, loaded.logits)
        assert torch.equal(base(pixel_values).capsule_lengths, loaded.capsule_lengths)
        # The in-memory original agrees to float32 rounding only: conv kernels choose their path by memory
        # alignment, which differs between freshly allocated and loaded weights.
        torch.testing.assert_close(model(pixel_values).logits, loaded.logits, rtol=0, atol=1e-5)


def test_load_in_bfloat16_with_dtype(saved_mnist_model):
    folder, _, processor = saved_mnist_model
    model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model.dtype == torch.bfloat16
    _, pixel_values = fixture_batch(processor)
    with torch.no_grad():
        out = model(pixel_values.to(torch.bfloat16))
    assert out.capsule_lengths.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_pipeline_top_k_scores_are_capsule_lengths(saved_mnist_model):
    folder, model, processor = saved_mnist_model
    images, pixel_values = fixture_batch(processor)
    classifier = pipeline("image-classification", model=str(folder))
    with torch.no_grad():
        lengths = model(pixel_values).capsule_lengths
    for image, image_lengths in zip(images, lengths, strict=True):
        predictions = classifier(image, top_k=3)
        assert len(predictions) == 3
        top = image_lengths.topk(3)
        assert [p["label"] for p in predictions] == [str(i) for i in top.indices.tolist()]
        np.testing.assert_allclose([p["score"] for p in predictions], top.values.numpy(), rtol=1e-5)


REMOTE_SCRIPT = """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

    folder, image_path = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    image = Image.open(image_path)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
        lengths = base(pixel_values).capsule_lengths
    print(json.dumps({
        "classes": [type(obj).__module__ + "." + type(obj).__name__ for obj in (config, processor, model, base)],
        "logits": logits[0].tolist(),
        "lengths": lengths[0].tolist(),
        "pipeline": classifier(image, top_k=3),
    }))
"""


def test_remote_code_loads_without_capsnet_hf(saved_mnist_model, tmp_path):
    folder, _, processor = saved_mnist_model
    remote = run_without_capsnet_hf(REMOTE_SCRIPT, str(folder), str(FIXTURES / "mnist_7.png"), workdir=tmp_path)
    assert all(name.startswith("transformers_modules.") for name in remote["classes"]), remote["classes"]
    assert [name.rsplit(".", 1)[1] for name in remote["classes"]] == [
        "CapsNetConfig",
        "CapsNetImageProcessor",
        "CapsNetForImageClassification",
        "CapsNetModel",
    ]
    from PIL import Image

    # Compare with the same folder loaded locally (a freshly initialised model can differ in the last bit: the
    # conv kernels pick their path by memory alignment, and loaded weights are aligned differently).
    local_model = AutoModelForImageClassification.from_pretrained(folder).eval()
    pixel_values = processor(Image.open(FIXTURES / "mnist_7.png"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        local = local_model(pixel_values)
    assert remote["logits"] == local.logits[0].tolist()  # identical, not merely close
    assert remote["lengths"] == local.capsule_lengths[0].tolist()
    top = local.capsule_lengths[0].topk(3)
    assert [p["label"] for p in remote["pipeline"]] == [str(i) for i in top.indices.tolist()]
