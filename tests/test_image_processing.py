"""Tests of CapsNetImageProcessor: input kinds, channel conversion, geometry, scaling, serialization, bad input."""

import ast
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_without_capsnet_hf
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_processing_base import BatchFeature

from capsnet_hf import CapsNetConfig
from capsnet_hf.image_processing_capsnet import CapsNetImageProcessor, standardize_per_image

PROCESSOR_FILE = Path(__file__).resolve().parents[1] / "capsnet_hf" / "image_processing_capsnet.py"
MNIST_LABELS = (7, 2, 1)


def pixels(processor, images, **kwargs) -> np.ndarray:
    """`pixel_values` as a NumPy array."""
    return np.asarray(processor(images, **kwargs)["pixel_values"])


@pytest.fixture(scope="module")
def digits() -> list[Image.Image]:
    """The three real MNIST test digits (labels 7, 2, 1), PIL mode L, 28x28."""
    images = []
    for label in MNIST_LABELS:
        with Image.open(FIXTURES / f"mnist_{label}.png") as image:
            image.load()
            images.append(image)
    return images


@pytest.fixture(scope="module")
def digit(digits) -> np.ndarray:
    """The digit 7 as a uint8 (28, 28) array."""
    return np.asarray(digits[0])


@pytest.fixture(scope="module")
def expected(digit) -> np.ndarray:
    """What the default processor must give for the digit 7: [1, 1, 28, 28] on [0, 1]."""
    return (digit.astype(np.float64) / 255.0)[None, None]


# ---------------------------------------------------------------------------------------------------------------------
# Real MNIST digits, defaults, output type
# ---------------------------------------------------------------------------------------------------------------------


def test_mnist_fixtures_default_processing(digits):
    processor = CapsNetImageProcessor()
    features = processor(digits)
    assert isinstance(features, BatchFeature)
    values = features["pixel_values"]
    assert values.shape == (3, 1, 28, 28) and values.dtype == np.float32
    for image, processed in zip(digits, values, strict=True):
        assert image.mode == "L" and image.size == (28, 28)
        np.testing.assert_allclose(processed[0], np.asarray(image) / 255.0, atol=1e-7)
    # Real digits: a black background and a saturated stroke.
    assert values.min() == 0.0 and values.max() == 1.0
    assert 0.05 < (values > 0.5).mean() < 0.3


def test_return_tensors_pt(digits):
    values = CapsNetImageProcessor()(digits, return_tensors="pt")["pixel_values"]
    assert isinstance(values, torch.Tensor)
    assert values.shape == (3, 1, 28, 28) and values.dtype == torch.float32


def test_paths_are_loaded_keeping_their_mode(digits, tmp_path):
    processor = CapsNetImageProcessor()
    paths = [str(FIXTURES / f"mnist_{label}.png") for label in MNIST_LABELS]
    np.testing.assert_array_equal(pixels(processor, paths), pixels(processor, digits))
    # A 16-bit PNG keeps its 16 bits (transformers' URL loader would have converted it to 8-bit RGB).
    path = tmp_path / "digit16.png"
    Image.fromarray(np.asarray(digits[0]).astype(np.uint16) * 257).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    np.testing.assert_allclose(pixels(processor, str(path)), pixels(processor, digits[0]), atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Every input kind gives the same image
# ---------------------------------------------------------------------------------------------------------------------


def _palette_image(gray: np.ndarray) -> Image.Image:
    image = Image.new("P", (gray.shape[1], gray.shape[0]))
    image.putpalette([value for level in range(256) for value in (level, level, level)])
    image.putdata(gray.ravel().tolist())
    return image


INPUT_KINDS = {
    "pil_L": lambda g: Image.fromarray(g),
    "pil_RGB": lambda g: Image.fromarray(g).convert("RGB"),
    "pil_RGBA_opaque": lambda g: Image.fromarray(g).convert("RGBA"),
    "pil_LA_opaque": lambda g: Image.fromarray(g).convert("LA"),
    "pil_P": _palette_image,
    "pil_I;16": lambda g: Image.fromarray(g.astype(np.uint16) * 257),
    "pil_I": lambda g: Image.fromarray(g.astype(np.int32)),  # 32-bit integers, read like an int32 array
    "pil_F_unit_scale": lambda g: Image.fromarray((g / 255.0).astype(np.float32)),
    "np_HW_uint8": lambda g: g,
    "np_HWC1_uint8": lambda g: g[:, :, None],
    "np_CHW1_uint8": lambda g: g[None],
    "np_HWC3_uint8": lambda g: np.repeat(g[:, :, None], 3, axis=2),
    "np_CHW3_uint8": lambda g: np.repeat(g[None], 3, axis=0),
    "np_HWC4_uint8_opaque": lambda g: np.dstack([g, g, g, np.full_like(g, 255)]),
    "np_HW_float32": lambda g: (g / 255.0).astype(np.float32),
    "np_HW_float64": lambda g: g / 255.0,
    "np_CHW1_float32": lambda g: (g / 255.0).astype(np.float32)[None],
    "np_HWC3_float64": lambda g: np.repeat((g / 255.0)[:, :, None], 3, axis=2),
    "np_HW_uint16": lambda g: g.astype(np.uint16) * 257,
    "np_HW_int64": lambda g: g.astype(np.int64),
    "torch_CHW_uint8": lambda g: torch.from_numpy(g.copy())[None],
    "torch_HW_float32": lambda g: torch.from_numpy(g / 255.0).float(),
    "torch_HWC3_float16": lambda g: torch.from_numpy(g / 255.0).half()[:, :, None].repeat(1, 1, 3),
}


@pytest.mark.parametrize("kind", sorted(INPUT_KINDS))
def test_every_input_kind_gives_the_same_pixels(kind, digit, expected):
    # float16 holds 0..1 to ~5e-4; every other kind is exact up to float32 rounding.
    atol = 5e-4 if "float16" in kind else 1e-6
    np.testing.assert_allclose(pixels(CapsNetImageProcessor(), INPUT_KINDS[kind](digit)), expected, atol=atol)


def test_batches_keep_their_order(digits):
    processor = CapsNetImageProcessor()
    arrays = [np.asarray(image) for image in digits]
    reference = pixels(processor, digits)
    stacked_last = np.stack(arrays)[..., None]  # [3, 28, 28, 1]
    batches = {
        "np_BHWC": stacked_last,
        "np_BCHW": stacked_last.transpose(0, 3, 1, 2),
        "torch_BCHW_float": torch.from_numpy(stacked_last.transpose(0, 3, 1, 2) / 255.0),
        "tuple_mixed": (digits[0], arrays[1], torch.from_numpy(arrays[2].copy())),
        "nested_lists": [[digits[0]], [arrays[1], arrays[2] / 255.0]],
        "list_of_4d_batches": [stacked_last[:1], stacked_last[1:]],
    }
    for name, batch in batches.items():
        np.testing.assert_allclose(pixels(processor, batch), reference, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Channel conversion
# ---------------------------------------------------------------------------------------------------------------------


def test_rgb_to_gray_uses_itu_r_601_2_luma():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], dtype=np.uint8)  # (1, 4, 3)
    values = pixels(CapsNetImageProcessor(size={"height": 1, "width": 4}), rgb, input_data_format="channels_last")
    hand = np.array([0.299, 0.587, 0.114, (0.299 * 10 + 0.587 * 20 + 0.114 * 30) / 255])
    np.testing.assert_allclose(values[0, 0, 0], hand, atol=1e-7)
    # Same weights as PIL's "L" conversion, which rounds to integers.
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)[0] / 255
    np.testing.assert_allclose(values[0, 0, 0], pil_gray, atol=0.5 / 255 + 1e-7)


def test_gray_to_rgb_replicates(digit, expected):
    values = pixels(CapsNetImageProcessor(num_channels=3), Image.fromarray(digit))
    assert values.shape == (1, 3, 28, 28)
    for channel in range(3):
        np.testing.assert_allclose(values[:, channel], expected[:, 0], atol=1e-7)


def test_rgb_to_rgb_keeps_channel_order():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 60, 90
    processor = CapsNetImageProcessor(size=8, num_channels=3)
    for image in (rgb, Image.fromarray(rgb), rgb.transpose(2, 0, 1)):
        np.testing.assert_allclose(pixels(processor, image)[0, :, 0, 0], [30 / 255, 60 / 255, 90 / 255], atol=1e-7)


def test_alpha_is_composited_on_black():
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 0)
    rgba[0, 0] = (200, 100, 50, 255)
    rgba[0, 1] = (200, 100, 50, 51)  # alpha 0.2
    color = np.array([200, 100, 50]) / 255
    for image in (rgba, Image.fromarray(rgba, mode="RGBA")):
        rgb_out = pixels(CapsNetImageProcessor(size=(5, 6), num_channels=3), image)[0]
        np.testing.assert_allclose(rgb_out[:, 0, 0], color, atol=1e-7)
        np.testing.assert_allclose(rgb_out[:, 0, 1], 0.2 * color, atol=1e-7)
        assert np.all(rgb_out[:, 1:] == 0)
        gray_out = pixels(CapsNetImageProcessor(size=(5, 6)), image)[0, 0]
        luma = color @ [0.299, 0.587, 0.114]
        np.testing.assert_allclose(gray_out[0, :2], [luma, 0.2 * luma], atol=1e-7)
    # Gray + alpha (PIL "LA") and a palette with a transparent entry.
    la = Image.fromarray(np.dstack([np.full((2, 2), 200, np.uint8), np.array([[255, 0], [51, 0]], np.uint8)]))
    assert la.mode == "LA"
    np.testing.assert_allclose(pixels(CapsNetImageProcessor(size=2), la)[0, 0], [[200 / 255, 0], [40 / 255, 0]])
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 255, 255, 255, 255, 255])  # two white entries, the second fully transparent
    palette.info["transparency"] = 1
    palette.putdata([0, 1])
    np.testing.assert_allclose(pixels(CapsNetImageProcessor(size={"height": 1, "width": 2}), palette)[0, 0], [[1, 0]])


def test_bilevel_and_16_bit_scales():
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert bilevel.mode == "1"
    size = {"height": 1, "width": 2}
    np.testing.assert_allclose(pixels(CapsNetImageProcessor(size=size), bilevel)[0, 0], [[1, 0]])
    sixteen = np.array([[65535, 32768]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (2, 1), sixteen.astype(">u2").tobytes())
    for image in (sixteen, Image.fromarray(sixteen), big_endian):
        values = pixels(CapsNetImageProcessor(size=size), image)[0, 0, 0]
        np.testing.assert_allclose(values, [1.0, 32768 / 65535], atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: resize, crop_or_pad
# ---------------------------------------------------------------------------------------------------------------------


def test_crop_or_pad_32_to_24_is_the_central_window():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    processor = CapsNetImageProcessor(size=24, num_channels=3, resize_mode="crop_or_pad")
    values = pixels(processor, image)
    assert values.shape == (1, 3, 24, 24)
    # (32 - 24) // 2 = 4: rows and columns 4..27 of the original.
    np.testing.assert_allclose(values[0], image[4:28, 4:28].transpose(2, 0, 1) / 255.0, atol=1e-7)
    np.testing.assert_allclose(values[0, :, 0, 0], image[4, 4] / 255.0, atol=1e-7)
    np.testing.assert_allclose(values[0, :, -1, -1], image[27, 27] / 255.0, atol=1e-7)


def test_crop_or_pad_odd_sizes_and_mixed_dimensions():
    image = np.arange(1, 31 * 21 + 1, dtype=np.int64).reshape(31, 21) % 250 + 1  # no zeros: padding shows
    values = pixels(CapsNetImageProcessor(size=24, resize_mode="crop_or_pad", do_rescale=False), image)[0, 0]
    # Height 31 -> 24: crop from row (31 - 24) // 2 = 3. Width 21 -> 24: pad (24 - 21) // 2 = 1 before, 2 after.
    np.testing.assert_array_equal(values[:, 1:22], image[3:27])
    assert np.all(values[:, 0] == 0) and np.all(values[:, 22:] == 0)


def test_resize_is_bilinear_in_float(digit):
    processor = CapsNetImageProcessor(size=14)
    values = pixels(processor, digit)
    assert values.shape == (1, 1, 14, 14)
    # Halving with PIL's (antialiased) bilinear filter, by hand: output pixel i averages input pixels 2i-1..2i+2
    # with triangle weights 1/4, 3/4, 3/4, 1/4 (renormalized where the window leaves the image).
    halve = np.zeros((14, 28))
    for i in range(14):
        for j, weight in zip(range(2 * i - 1, 2 * i + 3), (0.25, 0.75, 0.75, 0.25), strict=True):
            if 0 <= j < 28:
                halve[i, j] = weight
    halve /= halve.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(values[0, 0], halve @ (digit / 255.0) @ halve.T, atol=1e-6)
    # PIL's resize of the 8-bit image agrees up to its 8-bit fixed-point arithmetic.
    pil = np.asarray(Image.fromarray(digit).resize((14, 14), resample=Image.Resampling.BILINEAR)) / 255.0
    np.testing.assert_allclose(values[0, 0], pil, atol=1 / 255)
    # Non-square target sizes are (height, width); upsampling stays within [0, 1].
    upsampled = pixels(CapsNetImageProcessor(size={"height": 40, "width": 50}, resample=3), digit)
    assert upsampled.shape == (1, 1, 40, 50) and upsampled.min() >= 0 and upsampled.max() <= 1
    # A constant image stays constant.
    np.testing.assert_allclose(pixels(processor, np.full((50, 30), 77, np.uint8)), 77 / 255, atol=1e-6)


def test_resample_option_is_honoured(digit):
    nearest = pixels(CapsNetImageProcessor(size=10, resample=Image.Resampling.NEAREST), digit)
    pil = np.asarray(Image.fromarray(digit).resize((10, 10), resample=Image.Resampling.NEAREST)) / 255.0
    np.testing.assert_allclose(nearest[0, 0], pil, atol=1e-7)
    assert not np.allclose(nearest, pixels(CapsNetImageProcessor(size=10), digit))


def test_no_resize_needs_equal_sizes(digit):
    processor = CapsNetImageProcessor(do_resize=False)
    assert pixels(processor, np.zeros((20, 30), np.uint8)).shape == (1, 1, 20, 30)
    with pytest.raises(ValueError, match="different sizes"):
        processor([np.zeros((20, 30), np.uint8), digit])


def test_standard_center_crop_pad_and_channels_last(digit, expected):
    cropped = pixels(CapsNetImageProcessor(do_center_crop=True, crop_size={"height": 20, "width": 20}), digit)
    np.testing.assert_allclose(cropped, expected[..., 4:24, 4:24], atol=1e-7)
    padded = pixels(CapsNetImageProcessor(do_pad=True, pad_size={"height": 30, "width": 29}), digit)
    np.testing.assert_allclose(padded[..., :28, :28], expected, atol=1e-7)
    assert np.all(padded[..., 28:, :] == 0) and np.all(padded[..., 28:] == 0)
    last = pixels(CapsNetImageProcessor(num_channels=3), digit, data_format="channels_last")
    assert last.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(last[..., 1], expected[:, 0], atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# Scaling: rescale, standardization, inversion, normalization
# ---------------------------------------------------------------------------------------------------------------------


def test_do_rescale_false_keeps_the_0_255_scale(digit):
    processor = CapsNetImageProcessor(do_rescale=False)
    for image in (digit, digit / 255.0, Image.fromarray(digit)):
        np.testing.assert_allclose(pixels(processor, image)[0, 0], digit, atol=1e-4)


def _hand_standardization(values: np.ndarray) -> np.ndarray:
    """TF's per_image_standardization written out with Python sums."""
    flat = [float(v) for v in values.ravel()]
    count = len(flat)
    mean = sum(flat) / count
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / count)
    return (values - mean) / max(std, 1 / math.sqrt(count))


def test_standardization_matches_a_hand_computation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    processor = CapsNetImageProcessor(
        size=24, num_channels=3, resize_mode="crop_or_pad", do_rescale=False, do_standardize=True
    )
    values = pixels(processor, image)[0]
    hand = _hand_standardization(image[4:28, 4:28].transpose(2, 0, 1).astype(np.float64))
    np.testing.assert_allclose(values, hand, atol=1e-5)
    assert abs(values.mean()) < 1e-5 and values.std() == pytest.approx(1.0, abs=1e-5)
    # Rescaling does not apply: do_rescale makes no difference.
    processor_rescale = CapsNetImageProcessor(
        size=24, num_channels=3, resize_mode="crop_or_pad", do_rescale=True, do_standardize=True
    )
    np.testing.assert_array_equal(pixels(processor_rescale, image)[0], values)


def test_standardization_floor_on_a_nearly_flat_image():
    image = np.full((24, 24, 3), 100, dtype=np.uint8)
    image[5, 7, 1] = 101
    count = 24 * 24 * 3
    processor = CapsNetImageProcessor(size=24, num_channels=3, do_standardize=True)
    values = pixels(processor, image)[0]
    # std = sqrt(1727) / 1728 < 1 / sqrt(1728): the floor divides, on the 0..255 scale.
    assert math.sqrt(count - 1) / count < 1 / math.sqrt(count)
    np.testing.assert_allclose(values, _hand_standardization(image.transpose(2, 0, 1).astype(np.float64)), atol=1e-6)
    assert values[1, 5, 7] == pytest.approx((1 - 1 / count) * math.sqrt(count), rel=1e-6)
    assert values[0, 0, 0] == pytest.approx(-math.sqrt(count) / count, rel=1e-6)
    # On the 0..1 scale the floor would give 255 times smaller values: not the official preprocessing.
    unit = _hand_standardization(image.transpose(2, 0, 1) / 255.0)
    assert values[1, 5, 7] == pytest.approx(255 * unit[1, 5, 7], rel=1e-6)
    # A perfectly flat image gives zeros, not NaN.
    np.testing.assert_array_equal(pixels(processor, np.full((24, 24, 3), 9, np.uint8)), 0.0)


def test_standardization_is_per_image(digits):
    processor = CapsNetImageProcessor(do_standardize=True)
    batch = pixels(processor, digits)
    for image, standardized in zip(digits, batch, strict=True):
        np.testing.assert_allclose(standardized, pixels(processor, image)[0], atol=1e-6)
    np.testing.assert_allclose(
        standardize_per_image(np.stack([np.asarray(d, np.float64)[None] for d in digits])), batch, atol=1e-5
    )


def test_inversion(digit, expected):
    inverted = pixels(CapsNetImageProcessor(do_invert=True), digit)
    np.testing.assert_allclose(inverted, 1 - expected, atol=1e-7)
    np.testing.assert_allclose(pixels(CapsNetImageProcessor(do_invert=True), digit / 255.0), 1 - expected, atol=1e-6)
    # Dark-on-light drawing: inverted before padding, so the padding is black like the background.
    drawing = np.full((20, 20), 255, np.uint8)
    drawing[8:12, 5:15] = 0
    padded = pixels(CapsNetImageProcessor(do_invert=True, resize_mode="crop_or_pad"), drawing)[0, 0]
    assert np.all(padded[:4] == 0) and np.all(padded[4:24, 4:24][8:12, 5:15] == 1) and padded.sum() == 40
    # Inverted before standardization: standardize(255 - x) = -standardize(x).
    standardized = pixels(CapsNetImageProcessor(do_standardize=True), digit)
    inverted_standardized = pixels(CapsNetImageProcessor(do_standardize=True, do_invert=True), digit)
    np.testing.assert_allclose(inverted_standardized, -standardized, atol=1e-5)


def test_normalize_after_rescale(digit, expected):
    processor = CapsNetImageProcessor(do_normalize=True, image_mean=0.1307, image_std=0.3081)
    np.testing.assert_allclose(pixels(processor, digit), (expected - 0.1307) / 0.3081, atol=1e-6)


def test_call_time_kwargs_override_the_defaults(digit):
    processor = CapsNetImageProcessor()
    values = pixels(processor, digit, size={"height": 24, "width": 24}, num_channels=3, resize_mode="crop_or_pad")
    assert values.shape == (1, 3, 24, 24)
    assert processor.num_channels == 1 and processor.size.height == 28


# ---------------------------------------------------------------------------------------------------------------------
# Serialization, AutoImageProcessor, single-file rule, from_model_config
# ---------------------------------------------------------------------------------------------------------------------


def _cifar_processor() -> CapsNetImageProcessor:
    return CapsNetImageProcessor(
        size=24, num_channels=3, resize_mode="crop_or_pad", do_rescale=False, do_standardize=True, do_invert=True
    )


def test_save_and_load_round_trip(tmp_path):
    processor = _cifar_processor()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CapsNetImageProcessor"
    assert saved["size"] == {"height": 24, "width": 24}
    expected_options = {"num_channels": 3, "resize_mode": "crop_or_pad", "do_standardize": True, "do_invert": True}
    assert {key: saved[key] for key in expected_options} == expected_options
    loaded = CapsNetImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixels(loaded, image), pixels(processor, image))
    overridden = CapsNetImageProcessor.from_pretrained(tmp_path, do_invert=False)
    assert overridden.do_invert is False


def test_auto_image_processor_loads_the_saved_folder(tmp_path):
    AutoImageProcessor.register(CapsNetConfig, image_processor_classes={"pil": CapsNetImageProcessor}, exist_ok=True)
    _cifar_processor().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, CapsNetImageProcessor)
    settings = {key: value for key, value in loaded.to_dict().items() if key != "auto_map"}  # added by export
    assert settings == {key: value for key, value in _cifar_processor().to_dict().items() if key != "auto_map"}
    assert pixels(loaded, np.zeros((32, 32, 3), np.uint8)).shape == (1, 3, 24, 24)


def test_file_imports_only_transformers_numpy_pil_and_stdlib():
    tree = ast.parse(PROCESSOR_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the single-file image processor"
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"numpy", "PIL", "transformers"}


def test_trust_remote_code_loads_the_copied_file(tmp_path):
    """The file alone, copied into a folder with an auto_map, loads in a fresh interpreter without capsnet_hf."""
    folder = tmp_path / "processor"
    _cifar_processor().save_pretrained(folder)
    shutil.copy(PROCESSOR_FILE, folder / PROCESSOR_FILE.name)
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoImageProcessor": "image_processing_capsnet.CapsNetImageProcessor"}
    config_path.write_text(json.dumps(config))
    script = """
    import json
    import numpy as np
    from transformers import AutoImageProcessor
    p = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    v = p(np.zeros((32, 32, 3), np.uint8), return_tensors="pt")["pixel_values"]
    print(json.dumps({"module": type(p).__module__, "shape": list(v.shape), "resize_mode": p.resize_mode}))
    """
    remote = run_without_capsnet_hf(script, str(folder), workdir=tmp_path)
    assert remote["module"].startswith("transformers_modules") and remote["module"].endswith(
        "image_processing_capsnet"
    )
    assert remote["shape"] == [1, 3, 24, 24] and remote["resize_mode"] == "crop_or_pad"


def test_from_model_config():
    processor = CapsNetImageProcessor.from_model_config(CapsNetConfig(num_channels=3, image_size=24))
    assert (processor.size.height, processor.size.width, processor.num_channels) == (24, 24, 3)
    assert processor.resize_mode == "resize" and not processor.do_standardize
    official_cifar = CapsNetImageProcessor.from_model_config(
        CapsNetConfig(num_channels=3, image_size=[24, 24]), resize_mode="crop_or_pad", do_standardize=True
    )
    assert official_cifar.resize_mode == "crop_or_pad" and official_cifar.do_standardize
    duck = CapsNetImageProcessor.from_model_config(SimpleNamespace(num_channels=1, image_size=[20, 30]))
    assert pixels(duck, np.zeros((28, 28), np.uint8)).shape == (1, 1, 20, 30)
    with pytest.raises(ValueError, match="image_size"):
        CapsNetImageProcessor.from_model_config(SimpleNamespace(num_channels=1))


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------

BAD_IMAGES = {
    "empty_array": (np.zeros((0, 28), np.uint8), "empty array"),
    "empty_list": ([], "no images"),
    "empty_batch": (np.zeros((0, 28, 28, 1), np.uint8), "no images"),
    "nan": (np.full((28, 28), np.nan), "NaN"),
    "inf": (np.full((28, 28), np.inf, np.float32), "infinite"),
    "rank_1": (np.zeros(28, np.uint8), "wrong rank"),
    "rank_5": (np.zeros((1, 1, 28, 28, 1), np.uint8), "wrong rank"),
    "unsupported_mode": (Image.new("HSV", (28, 28)), "unsupported PIL image mode 'HSV'"),
    "zero_size_image": (Image.new("L", (0, 28)), "zero-size image"),
    "float_on_0_255_scale": (np.full((28, 28), 200.0), r"must lie in \[0, 1\].*divide by 255"),
    "negative": (np.full((28, 28), -1, np.int64), r"must lie in \[0, 255\]"),
    "int_above_255": (np.full((28, 28), 300, np.int32), r"must lie in \[0, 255\]"),
    "mode_I_above_8_bit": (
        Image.fromarray(np.full((4, 4), 300, np.int32)),
        r"PIL mode 'I' values must lie in \[0, 255\]",
    ),
    "ambiguous_layout": (np.zeros((3, 4, 4), np.uint8), "ambiguous channel axis"),
    "no_channel_axis": (np.zeros((28, 28, 5), np.uint8), "unknown channel axis"),
    "complex_dtype": (np.zeros((28, 28), np.complex64), "unsupported pixel data type"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_raise_value_error_naming_the_problem(name):
    image, message = BAD_IMAGES[name]
    with pytest.raises(ValueError, match=message):
        CapsNetImageProcessor()(image)


def test_bad_image_in_a_batch_is_named_by_index(digit):
    with pytest.raises(ValueError, match="image 1 of the batch: .*NaN"):
        CapsNetImageProcessor()([digit, np.full((28, 28), np.nan)])


def test_explicit_layout_resolves_ambiguity():
    image = np.zeros((3, 4, 4), np.uint8)
    image[0] = 255  # red, channels first
    processor = CapsNetImageProcessor(size=4, num_channels=3)
    first = pixels(processor, image, input_data_format="channels_first")
    np.testing.assert_array_equal(first[0, :, 0, 0], [1, 0, 0])
    assert pixels(processor, image, input_data_format="channels_last").shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="1 to 4 channels"):
        processor(np.zeros((28, 28, 6), np.uint8), input_data_format="channels_last")


def test_non_image_input_raises_type_error():
    with pytest.raises(TypeError, match="expected PIL images"):
        CapsNetImageProcessor()(42)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_channels": 2}, "num_channels must be one of"),
        ({"resize_mode": "stretch"}, "resize_mode must be one of"),
        ({"do_standardize": True, "do_normalize": True, "image_mean": 0.5, "image_std": 0.5}, "exclusive"),
        ({"do_convert_rgb": True}, "do_convert_rgb"),
        ({"size": {"shortest_edge": 28}}, "'height' and 'width'"),
        ({"rescale_factor": -1.0}, "rescale_factor must be positive"),
    ],
)
def test_bad_options_raise_value_error(options, message, digit):
    with pytest.raises(ValueError, match=message):
        CapsNetImageProcessor(**options)
    with pytest.raises(ValueError, match=message):
        CapsNetImageProcessor()(digit, **options)


def test_a_corrupt_image_file_is_named(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes((FIXTURES / "mnist_7.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot decode image file '.*broken.png'"):
        CapsNetImageProcessor()(str(path))


def test_mode_i_reads_like_the_same_int32_array():
    values = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.int32)
    image = Image.fromarray(values)
    assert image.mode == "I"
    processor = CapsNetImageProcessor()
    np.testing.assert_array_equal(pixels(processor, image), pixels(processor, values))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    for image in (str(path), Image.new("L", (300, 200))):
        with pytest.raises(ValueError, match="is 300x200 pixels, more than PIL's limit of 50000"):
            CapsNetImageProcessor()(image)
