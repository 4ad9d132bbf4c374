"""Tests of the figures and of `capsnet-visualize`, on small random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from capsnet_hf import CapsNetConfig, CapsNetForImageClassification
from capsnet_hf.paper.figures import (
    PERTURBATION_STEPS,
    perturbed_reconstructions,
    plot_multimnist,
    plot_perturbations,
    plot_reconstructions,
    plot_routing,
    routing_maps,
    save_png,
)
from capsnet_hf.visualize import main

DPI = 40


def tiny_model(image_size: int = 20, use_decoder: bool = True, seed: int = 0) -> CapsNetForImageClassification:
    torch.manual_seed(seed)
    config = CapsNetConfig(
        image_size=image_size,
        conv1_channels=8,
        conv1_kernel_size=5,
        primary_capsule_types=2,
        primary_kernel_size=5,
        primary_stride=2,
        decoder_hidden_sizes=[16, 32],
        use_decoder=use_decoder,
        id2label={i: str(i) for i in range(10)},
    )
    return CapsNetForImageClassification(config).eval()


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pixels():
    return torch.rand(3, 1, 20, 20, generator=torch.Generator().manual_seed(1))


def test_perturbation_steps_are_the_papers():
    assert PERTURBATION_STEPS == (-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


def test_perturbed_reconstructions_tweak_one_dimension_of_the_predicted_capsule(model, pixels):
    images, target = perturbed_reconstructions(model, pixels[:1])
    output = model(pixels[:1])
    assert target == int(output.capsule_lengths.argmax())
    assert images.shape == (16, 11, 1, 20, 20)
    mask = torch.nn.functional.one_hot(torch.tensor([target]), 10).float()
    plain = model.reconstruct(output.capsule_poses, mask)[0]
    for dimension in (0, 7, 15):
        assert torch.allclose(images[dimension, 5], plain, atol=1e-6), "step 0 must reproduce the reconstruction"
        poses = output.capsule_poses.clone()
        poses[0, target, dimension] += 0.25
        assert torch.allclose(images[dimension, 10], model.reconstruct(poses, mask)[0], atol=1e-6)
    assert not torch.allclose(images[3, 0], images[3, 10])


def test_routing_maps_are_the_coupling_to_the_predicted_class(model, pixels):
    maps, predicted = routing_maps(model, pixels)
    assert maps.shape == (3, 6, 6)
    weights = model(pixels, output_routing_weights=True).routing_weights  # [B, I, J]
    assert torch.allclose(weights.sum(-1), torch.ones(3, 72), atol=1e-5), "c_ij sums to 1 over the classes j"
    b, y, x = 2, 4, 1
    expected = (weights[b, y * 6 + x, predicted[b]] + weights[b, 36 + y * 6 + x, predicted[b]]) / 2
    assert maps[b, y, x].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("name", "expected_panels"),
    [("reconstructions", (3, 2)), ("perturbation", (11, 16)), ("multimnist", (3, 2)), ("routing", (3, 2))],
)
def test_each_figure_renders_a_png_of_the_expected_size(model, pixels, tmp_path, name, expected_panels):
    if name == "reconstructions":
        figure = plot_reconstructions(model, pixels, torch.tensor([1, 2, 3]), panel_inches=1.0)
    elif name == "perturbation":
        figure = plot_perturbations(model, pixels[:1], panel_inches=1.0)
    elif name == "multimnist":
        figure = plot_multimnist(model, pixels, torch.tensor([[1, 2], [3, 4], [0, 9]]), panel_inches=1.0)
    else:
        figure = plot_routing(model, pixels, panel_inches=1.0)
    path = save_png(figure, tmp_path / f"{name}.png", dpi=DPI)
    assert png_size(path) == (expected_panels[0] * DPI, expected_panels[1] * DPI)
    with Image.open(path) as image:
        assert np.asarray(image.convert("L")).std() > 5, "the figure must not be blank"
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.png"], "no temporary file may be left"


def test_figures_needing_a_decoder_refuse_a_model_without_one(pixels):
    model = tiny_model(use_decoder=False)
    with pytest.raises(ValueError, match="decoder"):
        plot_reconstructions(model, pixels)
    with pytest.raises(ValueError, match="one image"):
        perturbed_reconstructions(tiny_model(), pixels)
    plot_routing(model, pixels)  # routing needs no decoder


def write_digit_dataset(folder, count: int = 6) -> None:
    import datasets

    rng = np.random.default_rng(0)
    arrays = np.zeros((count, 28, 28), dtype=np.uint8)
    arrays[:, 6:22, 6:22] = rng.integers(0, 256, size=(count, 16, 16), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    dataset = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arrays], "label": list(range(count))}, features=features
    )
    (folder / "data").mkdir(parents=True)
    dataset.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))


def test_command_line_writes_every_figure(tmp_path):
    model_dir, data_dir, out_dir = tmp_path / "model", tmp_path / "digits", tmp_path / "figures"
    tiny_model(image_size=28).save_pretrained(model_dir)
    write_digit_dataset(data_dir)
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--output_dir", str(out_dir)]
    argv += ["--num_examples", "4", "--dpi", str(DPI)]
    assert main(argv) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "multimnist.png",
        "perturbation.png",
        "reconstructions.png",
        "routing.png",
    ]
    assert png_size(out_dir / "reconstructions.png") == (4 * DPI, 2 * DPI)
    assert png_size(out_dir / "perturbation.png") == (11 * DPI, 16 * DPI)


def _error_of(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("capsnet-visualize: error: ")
    return lines[-1]


def test_command_line_errors(tmp_path, capsys):
    model_dir, data_dir = tmp_path / "model", tmp_path / "digits"
    tiny_model(image_size=28, use_decoder=False).save_pretrained(model_dir)
    write_digit_dataset(data_dir)
    base = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir)]
    assert "no decoder" in _error_of(capsys, [*base, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    missing = ["--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")]
    assert "does not exist" in _error_of(capsys, missing)
    not_a_model = ["--model_name_or_path", str(data_dir), "--dataset_name", str(data_dir)]
    assert "is not a model folder" in _error_of(capsys, [*not_a_model, "--output_dir", str(tmp_path / "out")])
    bad_column = [*base, "--image_column_name", "pixels", "--figures", "routing", "--output_dir", str(tmp_path / "o")]
    assert "image" in _error_of(capsys, bad_column)
    offset = [*base, "--example_offset", "-1", "--figures", "routing", "--output_dir", str(tmp_path / "out")]
    assert "--example_offset -1 is outside" in _error_of(capsys, offset)
    with pytest.raises(SystemExit):  # argparse: usage and `capsnet-visualize: error: ...`, status 2
        main([*base, "--num_examples", "0", "--output_dir", str(tmp_path / "out")])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
