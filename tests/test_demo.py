"""Tests of the interactive demo (capsnet_hf.demo): its pure functions on a small random CapsNet and the three real
MNIST digits, the `capsnet-demo` command line, the Space entry, and the page end to end through `gradio_client`
against a server on a free loopback port (closed by the fixture)."""

from __future__ import annotations

import configparser
import contextlib
import json
import runpy
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import FIXTURES, REPO_ROOT, small_config
from gradio_client import Client, handle_file
from PIL import Image

from capsnet_hf import (
    BaselineCNNConfig,
    BaselineCNNForImageClassification,
    CapsNetForImageClassification,
    CapsNetImageProcessor,
)
from capsnet_hf.cli import UsageError
from capsnet_hf.demo import inference, launch, layout
from capsnet_hf.paper.figures import PERTURBATION_STEPS, perturbed_reconstructions, routing_maps

SPACE = REPO_ROOT / "spaces" / "capsnet-demo"
CALL_TIMEOUT_S = 60
DIGITS = {i: str(i) for i in range(4)}
# gradio's own use of pandas, not this package's
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def save_capsnet(folder: Path, **overrides) -> Path:
    torch.manual_seed(0)
    config = small_config(id2label=DIGITS, **overrides)
    CapsNetForImageClassification(config).save_pretrained(folder)
    CapsNetImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def gradio_environment(tmp_path_factory):
    """No usage reports, and gradio's cached files in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return save_capsnet(tmp_path_factory.mktemp("demo") / "capsnet")


@pytest.fixture(scope="module")
def loaded(model_folder):
    return inference.load_capsnet(str(model_folder))


@pytest.fixture
def seven():
    return Image.open(FIXTURES / "mnist_7.png")


def drawing(size: int = 280, box: tuple[int, int, int, int] = (40, 60, 100, 200)) -> Image.Image:
    """A sketchpad composite: transparent, with one opaque black rectangle (a stroke) at `box`."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), box)
    return image


# --------------------------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------------------------


def test_load_capsnet_gives_an_eval_model_and_its_processor(loaded):
    model, processor = loaded
    assert isinstance(model, CapsNetForImageClassification) and not model.training
    assert processor.size["height"] == 16


def test_load_capsnet_refuses_a_model_that_is_not_a_capsnet(tmp_path):
    folder = tmp_path / "baseline"
    config = BaselineCNNConfig(image_size=16, conv_channels=[4, 4, 2], hidden_sizes=[8, 6])
    BaselineCNNForImageClassification(config).save_pretrained(folder)
    with pytest.raises(UsageError, match="holds a 'capsnet_baseline_cnn' model, not a CapsNet"):
        inference.load_capsnet(str(folder))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "not a model folder"),
    ],
)
def test_command_line_refuses_folders_in_one_line(tmp_path, capsys, make, message):
    assert launch.main(["--model_name_or_path", str(make(tmp_path))]) == 2
    error = capsys.readouterr().err
    assert error.startswith("capsnet-demo: error: ") and message in error and error.count("\n") == 1


def test_command_line_serves_on_loopback_without_a_share_link(model_folder, monkeypatch):
    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.append((self, kwargs)))
    assert launch.main(["--model_name_or_path", str(model_folder)]) == 0
    (demo, kwargs), *rest = calls
    assert not rest and isinstance(demo, gr.Blocks)
    assert kwargs == {"server_name": "127.0.0.1", "server_port": None, "share": False}
    launch.main(["--model_name_or_path", str(model_folder), "--server_name", "0.0.0.0", "--server_port", "8000"])
    assert calls[1][1] == {"server_name": "0.0.0.0", "server_port": 8000, "share": False}


# --------------------------------------------------------------------------------------------------------------------
# The pure functions.
# --------------------------------------------------------------------------------------------------------------------


def test_predict_gives_the_models_outputs(loaded, seven):
    model, processor = loaded
    prediction = inference.predict(model, processor, seven)
    pixel_values = processor(seven, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(pixel_values)
    maps, predicted = routing_maps(model, pixel_values)
    torch.testing.assert_close(prediction.pixel_values, pixel_values)
    torch.testing.assert_close(prediction.capsule_lengths, output.capsule_lengths[0])
    torch.testing.assert_close(prediction.capsule_poses, output.capsule_poses[0])
    torch.testing.assert_close(prediction.routing_map, maps[0])
    assert prediction.predicted_class == int(predicted[0]) == int(output.capsule_lengths.argmax())


def test_predict_inverts_a_dark_on_light_image(loaded, seven):
    model, processor = loaded
    plain = inference.predict(model, processor, seven).pixel_values
    inverted = inference.predict(model, processor, seven, invert=True).pixel_values
    torch.testing.assert_close(inverted, 1 - plain)


def test_predict_names_an_image_the_processor_refuses(loaded):
    model, processor = loaded
    with pytest.raises(UsageError, match=r"cannot prepare this image: .*\[0, 1\]"):
        inference.predict(model, processor, np.full((16, 16), 2.0))


def test_drawing_is_flattened_on_white_and_framed_like_an_mnist_digit():
    framed = inference.drawing_to_image(drawing(box=(40, 60, 100, 200)))  # a 60 x 140 stroke
    assert framed.mode == "RGB" and framed.size == (196, 196)  # 140 / (20 / 28)
    pixels = np.asarray(framed.convert("L"))
    ink = np.argwhere(pixels < 128)
    assert ink.min(0).tolist() == [28, 68] and ink.max(0).tolist() == [167, 127]  # centred
    assert pixels[0, 0] == 255
    assert inference.drawing_to_image(drawing(box=(0, 0, 0, 0))) is None
    assert inference.drawing_to_image(None) is None


def test_a_drawing_reaches_the_model_light_on_dark(loaded):
    model, processor = loaded
    prediction = inference.predict(model, processor, inference.drawing_to_image(drawing()), invert=True)
    assert prediction.pixel_values[0, 0, 0, 0] == 0 and prediction.pixel_values.max() == 1


def test_lengths_table_and_summary(loaded, seven):
    model, processor = loaded
    prediction = inference.predict(model, processor, seven)
    table = inference.lengths_table(model, prediction)
    assert table[inference.CLASS_COLUMN].tolist() == ["0", "1", "2", "3"]
    np.testing.assert_allclose(table[inference.LENGTH_COLUMN], prediction.capsule_lengths.numpy(), rtol=1e-6)
    assert (table[inference.KIND_COLUMN] == inference.PREDICTED).tolist() == [
        index == prediction.predicted_class for index in range(4)
    ]
    top = prediction.capsule_lengths.max()
    assert inference.summary(model, prediction).startswith(f"Prediction: **{prediction.predicted_class}**, ")
    assert f"capsule length {top:.3f} (next: " in inference.summary(model, prediction)


def test_reconstruction_is_the_models_and_offsets_give_figure_4(loaded, seven):
    model, processor = loaded
    prediction = inference.predict(model, processor, seven)
    with torch.no_grad():
        plain = model(prediction.pixel_values).reconstructions[0]
    torch.testing.assert_close(inference.reconstruction(model, prediction), plain)
    grid, target = perturbed_reconstructions(model, prediction.pixel_values)
    assert target == prediction.predicted_class
    dimension, step = 2, 8
    offsets = [0.0] * model.config.capsule_dim
    offsets[dimension] = PERTURBATION_STEPS[step]
    torch.testing.assert_close(inference.reconstruction(model, prediction, offsets), grid[dimension, step])
    with pytest.raises(UsageError, match="expected 6 offsets"):
        inference.reconstruction(model, prediction, [0.1])


def test_display_images_are_sharp_uint8(loaded, seven):
    model, processor = loaded
    prediction = inference.predict(model, processor, seven)
    shown = inference.display_image(prediction.pixel_values[0])
    assert shown.dtype == np.uint8 and shown.shape == (224, 224)  # 16 px x 14
    np.testing.assert_array_equal(shown[::14, ::14], (prediction.pixel_values[0, 0].numpy() * 255).round())
    routing = inference.routing_image(prediction)
    assert routing.dtype == np.uint8 and routing.shape == (224, 224, 3)  # 4x4 grid x 56
    assert "uniform routing is 0.250" in inference.routing_caption(model, prediction)
    grid = inference.perturbation_grid(model, prediction)
    assert grid.dtype == np.uint8 and grid.shape == (6 * 60, 11 * 60, 3)  # 6 dimensions x 11 steps, 0.6 in at 100 dpi


# --------------------------------------------------------------------------------------------------------------------
# The page.
# --------------------------------------------------------------------------------------------------------------------


def test_space_entry_builds_the_demo_for_its_model(model_folder, monkeypatch):
    monkeypatch.setenv("CAPSNET_DEMO_MODEL", str(model_folder))
    namespace = runpy.run_path(str(SPACE / "app.py"), run_name="space")
    assert isinstance(namespace["demo"], gr.Blocks)
    front_matter = (SPACE / "README.md").read_text().split("---")[1]
    metadata = dict(line.split(": ", 1) for line in front_matter.strip().splitlines())
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py"
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert f"gradio>={metadata['sdk_version'].rsplit('.', 1)[0]}" in setup["options.extras_require"]["demo"]
    wheel = f"{setup['metadata']['name'].replace('-', '_')}-{setup['metadata']['version']}-py3-none-any.whl[demo]"
    assert f"./{wheel}" in (SPACE / "requirements.txt").read_text().splitlines()


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(demo: gr.Blocks, downloads: Path) -> Iterator[tuple[Client, str]]:
    """(client, URL) of `demo` served on a free loopback port; the server is closed on leaving."""
    port = free_loopback_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield Client(url, verbose=False, download_files=str(downloads)), url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def served(loaded, tmp_path_factory):
    """The demo of the small model, served for the module's tests."""
    with serving(layout.build_demo(*loaded), tmp_path_factory.mktemp("downloads")) as served:
        yield served


def call(client: Client, *args, api_name: str):
    return client.submit(*args, api_name=api_name).result(timeout=CALL_TIMEOUT_S)


def png(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_the_served_demo_classifies_an_upload_and_tweaks_its_capsule(served, loaded, seven):
    client, _ = served
    model, processor = loaded
    expected = inference.predict(model, processor, seven)
    verdict, model_input, lengths, routing, caption, reconstruction, tweaked, grid, *sliders = call(
        client, handle_file(str(FIXTURES / "mnist_7.png")), False, api_name="/classify_upload"
    )
    assert verdict == inference.summary(model, expected)
    assert caption == inference.routing_caption(model, expected)
    table = inference.lengths_table(model, expected)
    assert [row[0::2] for row in lengths["data"]] == table[
        [inference.CLASS_COLUMN, inference.KIND_COLUMN]
    ].values.tolist()
    assert [row[1] for row in lengths["data"]] == pytest.approx(table[inference.LENGTH_COLUMN].tolist(), rel=1e-6)
    np.testing.assert_array_equal(png(model_input), inference.display_image(expected.pixel_values[0]))
    np.testing.assert_array_equal(png(routing)[..., :3], inference.routing_image(expected))
    plain = inference.display_image(inference.reconstruction(model, expected))
    np.testing.assert_array_equal(png(reconstruction), plain)
    np.testing.assert_array_equal(png(tweaked), plain)
    assert png(grid).shape[:2] == (360, 660)
    assert sliders == [0.0] * model.config.capsule_dim

    offsets = [0.0, 0.0, 0.0, -0.25, 0.0, 0.1]
    moved = png(call(client, *offsets, api_name="/tweak"))
    np.testing.assert_array_equal(moved, inference.display_image(inference.reconstruction(model, expected, offsets)))
    assert not np.array_equal(moved, plain)


def test_the_served_demo_classifies_a_drawing(served, loaded, tmp_path):
    client, _ = served
    model, processor = loaded
    path = tmp_path / "drawing.png"
    drawing().save(path)
    editor_value = {"background": None, "layers": [], "composite": handle_file(str(path))}
    verdict, model_input, *_ = call(client, editor_value, api_name="/classify_drawing")
    expected = inference.predict(model, processor, inference.drawing_to_image(drawing()), invert=True)
    assert verdict == inference.summary(model, expected)
    np.testing.assert_array_equal(png(model_input), inference.display_image(expected.pixel_values[0]))
    empty = {"background": None, "layers": [], "composite": None}
    verdict, model_input, *_ = call(client, empty, api_name="/classify_drawing")
    assert verdict == layout.EMPTY_MESSAGE and model_input is None


def test_a_model_without_decoder_hides_the_reconstruction_with_a_note(tmp_path, seven):
    model, processor = inference.load_capsnet(str(save_capsnet(tmp_path / "no-decoder", use_decoder=False)))
    with pytest.raises(UsageError, match="no decoder"):
        inference.reconstruction(model, inference.predict(model, processor, seven))
    demo = layout.build_demo(model, processor)
    props = [component.get("props", {}) for component in demo.config["components"]]
    assert any(prop.get("value") == layout.NO_DECODER_NOTE for prop in props)
    hidden_rows = [prop for prop in props if prop.get("visible") is False]
    assert len(hidden_rows) == 2  # the two reconstructions, and the sliders with the Figure 4 grid
    with serving(demo, tmp_path / "downloads") as (client, _):
        assert "/tweak" not in client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        verdict, model_input, lengths, routing, caption = call(
            client, handle_file(str(FIXTURES / "mnist_7.png")), False, api_name="/classify_upload"
        )
    assert verdict == inference.summary(model, inference.predict(model, processor, seven))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_page_renders_in_a_headless_browser(served):
    _, url = served
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("What the model sees", "Class capsule lengths", "dimension 5"):
        assert text in result.stdout


def test_api_lists_the_three_endpoints(served):
    client, _ = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert sorted(endpoints) == ["/classify_drawing", "/classify_upload", "/tweak"]
    assert json.dumps(endpoints["/tweak"]).count('"label": "dimension') == 6
