"""Conversion of official-graph TensorFlow checkpoints (tests/fixtures/tf, written by TensorFlow running Sabour's
`research/capsules` code in a reduced geometry, see conversion/make_tf_fixtures.py) into transformers folders."""

import contextlib
import io
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import FIXTURES, run_without_capsnet_hf
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, pipeline

import capsnet_hf.modeling_capsnet as modeling
from capsnet_hf import CapsNetConfig, CapsNetModel
from capsnet_hf.cli import UsageError
from capsnet_hf.conversion import converter, weights
from capsnet_hf.conversion.converter import convert
from capsnet_hf.conversion.geometry import PRESETS, build_config, infer_geometry, resolve_image_size
from capsnet_hf.conversion.reference import reference_forward
from capsnet_hf.conversion.tf_checkpoint import TFCheckpointReader
from capsnet_hf.convert import build_parser, main

TF = FIXTURES / "tf"
MNIST_CKPT = TF / "mnist_style" / "model.ckpt-2"
CIFAR_PATTERN = str(TF / "cifar_style" / "cifar{}" / "model.ckpt-2")
ATOL = 1e-5


def _reference(name: str) -> dict[str, np.ndarray]:
    with np.load(TF / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


def _type_major(primary: np.ndarray) -> np.ndarray:
    """TF primary capsules [..., N, A, H, W] -> [..., N*H*W, A], i = type*H*W + y*W + x."""
    *lead, types, atoms, height, width = primary.shape
    moved = np.moveaxis(primary, -3, -1)  # [..., N, H, W, A]
    return moved.reshape(*lead, types * height * width, atoms)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both fixtures converted through the command line, with --verify; returns folders and printed output."""
    root = tmp_path_factory.mktemp("converted")
    outputs = {}
    for name, argv in {
        "mnist": ["--checkpoint", str(MNIST_CKPT), "--output_dir", str(root / "mnist"), "--verify"],
        "cifar": ["--checkpoint", CIFAR_PATTERN, "--num-trials", "3", "--output-dir", str(root / "cifar"), "--verify"],
    }.items():
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main(argv) == 0
        outputs[name] = stdout.getvalue()
    return {"mnist": root / "mnist", "cifar": root / "cifar", "stdout": outputs}


def _load(folder: Path):
    return AutoModelForImageClassification.from_pretrained(folder).eval()


# -- parity with TensorFlow ------------------------------------------------------------------------------------


def test_mnist_style_parity_with_tensorflow(converted):
    ref = _reference("mnist_style")
    model = _load(converted["mnist"])
    assert model.config.padding == "valid" and not model.config.leaky_routing and model.config.use_decoder
    with torch.no_grad():
        out = model(
            torch.from_numpy(ref["pixel_values"]),
            labels=torch.from_numpy(ref["labels"]),
            output_primary_capsules=True,
        )
    np.testing.assert_allclose(out.capsule_lengths.numpy(), ref["capsule_lengths"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.capsule_poses.numpy(), ref["capsule_poses"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(out.primary_capsules.numpy(), _type_major(ref["primary_capsules"]), rtol=0, atol=ATOL)
    recons = out.reconstructions.numpy().reshape(len(ref["labels"]), -1)  # TF: flattened NCHW
    np.testing.assert_allclose(recons, ref["reconstructions"], rtol=0, atol=ATOL)
    expected_logits = np.log(ref["capsule_lengths"]) - np.log1p(-ref["capsule_lengths"])
    np.testing.assert_allclose(out.logits.numpy(), expected_logits, rtol=0, atol=1e-4)


def test_cifar_style_ensemble_parity_with_tensorflow(converted):
    ref = _reference("cifar_style")
    model = _load(converted["cifar"])
    config = model.config
    assert (config.padding, config.leaky_routing, config.use_decoder) == ("same", True, False)
    assert config.num_ensemble_members == 3 and model.decoder is None
    with torch.no_grad():
        out = model(torch.from_numpy(ref["pixel_values"]), output_primary_capsules=True)
    np.testing.assert_allclose(out.capsule_poses.numpy(), ref["capsule_poses"], rtol=0, atol=ATOL)  # [B, M, J, K]
    np.testing.assert_allclose(out.primary_capsules.numpy(), _type_major(ref["primary_capsules"]), rtol=0, atol=ATOL)
    summed = ref["summed_lengths"]
    np.testing.assert_allclose(out.capsule_lengths.numpy() * 3, summed, rtol=0, atol=ATOL)
    assert (out.logits.argmax(-1).numpy() == summed.argmax(-1)).all()
    # The members really differ, so the ensemble is more than one model repeated.
    assert np.abs(ref["capsule_lengths"][:, 0] - ref["capsule_lengths"][:, 1]).max() > 1e-2


@pytest.mark.parametrize("name", ["mnist_style", "cifar_style"])
def test_numpy_reference_matches_tensorflow(name):
    """The reference used by --verify reproduces TensorFlow from the raw checkpoint arrays."""
    ref = _reference(name)
    leaky, padding = (False, "valid") if name == "mnist_style" else (True, "same")
    prefixes = [str(MNIST_CKPT)] if name == "mnist_style" else [CIFAR_PATTERN.format(m) for m in range(3)]
    for member, prefix in enumerate(prefixes):
        reader = TFCheckpointReader(prefix)
        arrays = {n: reader.read(n) for n in reader.variables() if not n.endswith(("Adam", "Adam_1"))}
        out = reference_forward(arrays, ref["pixel_values"], padding, leaky, labels=ref["labels"])
        lengths = ref["capsule_lengths"] if name == "mnist_style" else ref["capsule_lengths"][:, member]
        np.testing.assert_allclose(out["capsule_lengths"], lengths, rtol=0, atol=ATOL)
        if name == "mnist_style":
            np.testing.assert_allclose(out["reconstructions"].reshape(3, -1), ref["reconstructions"], atol=ATOL)


def test_verify_prints_measured_parity(converted):
    for name in ("mnist", "cifar"):
        lines = [line for line in converted["stdout"][name].splitlines() if line.startswith("verify: {")]
        parity = json.loads(lines[0].removeprefix("verify: "))
        assert max(parity.values()) < ATOL
        assert "max |logit difference|" in converted["stdout"][name]
    assert "reconstructions" in json.loads(
        next(line for line in converted["stdout"]["mnist"].splitlines() if line.startswith("verify: {"))[8:]
    )


def _perturbed_max_diff(folder: Path, change) -> float:
    """Max |capsule length - TF| of the converted CIFAR-style model after one mapping detail is changed."""
    ref = _reference("cifar_style")
    model = _load(folder)
    change(model)
    with torch.no_grad():
        lengths = model(torch.from_numpy(ref["pixel_values"])).capsule_lengths.numpy()
    return float(np.abs(lengths * 3 - ref["summed_lengths"]).max())


def _permute_primary_channels(model):
    for member in model.capsnet.members:
        conv = member.primary_capsules.conv
        types, atoms = member.primary_capsules.bias.shape
        order = torch.arange(types * atoms).view(types, atoms).t().reshape(-1)  # atom-major instead of type-major
        conv.weight.data = conv.weight.data[order]


def _no_leak(model):
    for member in model.capsnet.members:
        member.class_capsules.leaky_routing = False


def _unscaled_primary(model):
    for member in model.capsnet.members:
        member.primary_capsules.routing_scale = 1.0


def _transposed_capsule_matrices(model):
    for member in model.capsnet.members:
        weight = member.class_capsules.weight.data  # [I, J, K, A]
        inputs, classes, dim, atoms = weight.shape
        member.class_capsules.weight.data = weight.reshape(inputs, dim, classes, atoms).transpose(1, 2).contiguous()


def _scale_folded_into_bias(model):
    for member in model.capsnet.members:
        member.primary_capsules.bias.data *= member.primary_capsules.routing_scale


@pytest.mark.parametrize(
    "change",
    [_permute_primary_channels, _no_leak, _unscaled_primary, _transposed_capsule_matrices, _scale_folded_into_bias],
)
def test_fixtures_detect_each_mapping_detail(converted, change):
    """Each detail of the mapping matters on these fixtures: getting it wrong breaks parity with TensorFlow."""
    assert _perturbed_max_diff(converted["cifar"], change) > 1e-3


def test_fixtures_detect_same_padding_side(converted, monkeypatch):
    """TF's odd extra SAME padding goes at the end; putting it at the start breaks parity."""
    from capsnet_hf.configuration_capsnet import tf_same_padding

    monkeypatch.setattr(modeling, "tf_same_padding", lambda *args: tuple(reversed(tf_same_padding(*args))))
    assert _perturbed_max_diff(converted["cifar"], lambda model: None) > 1e-3


def test_mapping_layouts():
    """HWIO -> OIHW kernels, unscaled primary kernels, [I, A, J*K] -> [I, J, K, A], decoder transposed."""
    reader = TFCheckpointReader(MNIST_CKPT)
    arrays = {name: reader.read(name) for name in reader.variables()}
    state = weights.member_state_dict(arrays, 0) | weights.decoder_state_dict(arrays)
    conv1 = state["capsnet.members.0.conv1.weight"]
    assert conv1.shape == (8, 1, 9, 9) and conv1[5, 0, 2, 7] == arrays["conv1/weights"][2, 7, 0, 5]
    primary = state["capsnet.members.0.primary_capsules.conv.weight"]
    assert primary[3 * 8 + 6, 4, 1, 8] == arrays["conv_capsule1/weights"][1, 8, 4, 3 * 8 + 6]
    capsules = state["capsnet.members.0.class_capsules.weight"]
    assert capsules.shape == (16, 10, 16, 8)
    assert capsules[11, 7, 13, 2] == arrays["capsule2/weights"][11, 2, 7 * 16 + 13]
    assert torch.equal(state["decoder.layers.2.weight"], torch.from_numpy(arrays["recons/recons_3/weights"].T))
    assert not any("Adam" in name or "step" in name or "power" in name for name in state)


# -- the folder through AutoModel, pipeline, remote code ---------------------------------------------------------


def test_folder_contents_and_card(converted):
    for name in ("mnist", "cifar"):
        files = {p.name for p in converted[name].iterdir()}
        assert files == {
            "README.md", "config.json", "model.safetensors", "preprocessor_config.json",
            "configuration_capsnet.py", "modeling_capsnet.py", "image_processing_capsnet.py",
        }  # fmt: skip
        assert not [p for p in converted[name].parent.iterdir() if ".partial-" in p.name]
    card = (converted["cifar"] / "README.md").read_text()
    assert "https://github.com/Sarasra/models/tree/master/research/capsules" in card
    assert "--checkpoint 'cifar_style/cifar{}/model.ckpt-2' --num_trials 3" in card
    assert "cifar_style/cifar2/model.ckpt-2.index" in card and "| capsule_poses |" in card
    assert "license: apache-2.0" in card and "cifar_checkpoints.tar.gz" in card
    mnist_card = (converted["mnist"] / "README.md").read_text()
    assert "--checkpoint mnist_style/model.ckpt-2 --output_dir mnist" in mnist_card
    assert "| reconstructions |" in mnist_card and "0.25%" in mnist_card


def test_processor_reproduces_tensorflow_preprocessing(converted):
    ref = _reference("cifar_style")
    processor = AutoImageProcessor.from_pretrained(converted["cifar"])
    for raw, expected in (("raw_images", "preprocessed"), ("raw_images_small", "preprocessed_small")):
        got = processor(list(ref[raw]), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(got, ref[expected], rtol=0, atol=ATOL)
    mnist = AutoImageProcessor.from_pretrained(converted["mnist"])
    raw = (_reference("mnist_style")["pixel_values"][:, 0] * 255).round().astype(np.uint8)
    np.testing.assert_allclose(mnist(list(raw), return_tensors="np")["pixel_values"][:, 0], raw / 255, atol=1e-7)


def test_automodel_loads_the_capsule_network_alone(converted):
    ref = _reference("cifar_style")
    base = AutoModel.from_pretrained(converted["cifar"]).eval()
    assert isinstance(base, CapsNetModel)
    with torch.no_grad():
        lengths = base(torch.from_numpy(ref["pixel_values"])).capsule_lengths.numpy()
    np.testing.assert_allclose(lengths * 3, ref["summed_lengths"], rtol=0, atol=ATOL)


def test_pipeline_on_ensemble_ranks_by_summed_lengths(converted):
    from PIL import Image

    ref = _reference("cifar_style")
    classifier = pipeline("image-classification", model=str(converted["cifar"]))
    model = _load(converted["cifar"])
    with torch.no_grad():
        lengths = model(torch.from_numpy(ref["preprocessed"])).capsule_lengths.numpy()
    for image, image_lengths in zip(ref["raw_images"], lengths, strict=True):
        predictions = classifier(Image.fromarray(image), top_k=2)
        top = np.argsort(-image_lengths)[:2]
        assert [p["label"] for p in predictions] == [model.config.id2label[int(i)] for i in top]
        np.testing.assert_allclose([p["score"] for p in predictions], image_lengths[top], rtol=1e-5)


REMOTE_SCRIPT = """
    import json, sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    folder, npz = sys.argv[1], sys.argv[2]
    data = np.load(npz)
    model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
    with torch.no_grad():
        out = model(torch.from_numpy(data["pixel_values"]))
    print(json.dumps({
        "module": type(model).__module__,
        "lengths": out.capsule_lengths.tolist(),
        "pipeline": classifier(Image.fromarray(data["raw_images"][0]), top_k=1),
    }))
"""


def test_remote_code_route(converted, tmp_path):
    remote = run_without_capsnet_hf(
        REMOTE_SCRIPT, str(converted["cifar"]), str(TF / "cifar_style.npz"), workdir=tmp_path
    )
    assert remote["module"].startswith("transformers_modules.")
    ref = _reference("cifar_style")
    np.testing.assert_allclose(np.array(remote["lengths"]) * 3, ref["summed_lengths"], rtol=0, atol=ATOL)
    model = _load(converted["cifar"])
    with torch.no_grad():
        lengths = model(torch.from_numpy(ref["preprocessed"][:1])).capsule_lengths[0]
    assert remote["pipeline"][0]["label"] == model.config.id2label[int(lengths.argmax())]


# -- geometry inference on the released checkpoints' shapes (official_checkpoints.md) ------------------------------


def _official_variables(dataset: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    channels, types, inputs = (1, 32, 1152) if dataset == "mnist" else (3, 64, 9216)
    shapes = {
        "conv1/weights": (9, 9, channels, 256),
        "conv1/biases": (256,),
        "conv_capsule1/weights": (9, 9, 256, types * 8),
        "conv_capsule1/biases": (types, 8, 1, 1),
        "capsule2/weights": (inputs, 8, 160),
        "capsule2/biases": (10, 16),
        "global_step": (),
        "beta1_power": (),
        "beta2_power": (),
    }
    if dataset == "mnist":
        shapes |= {"recons/recons_1/weights": (160, 512), "recons/recons_1/biases": (512,)}
        shapes |= {"recons/recons_2/weights": (512, 1024), "recons/recons_2/biases": (1024,)}
        shapes |= {"recons/recons_3/weights": (1024, 784), "recons/recons_3/biases": (784,)}
    shapes |= {f"{name}/Adam{s}": shape for name, shape in list(shapes.items()) if "/" in name for s in ("", "_1")}
    return {name: ("float32", shape) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    "dataset, size, parameters", [("mnist", 28, 8_215_728), ("cifar10", 24, 22_476_448)]
)  # fmt: skip
def test_geometry_of_the_released_checkpoints(dataset, size, parameters):
    geometry = infer_geometry(_official_variables(dataset), "released")
    assert resolve_image_size(geometry, PRESETS[dataset], "released", None) == size
    config = build_config(geometry, dataset, size, 1, geometry.decoder_sizes is not None)
    assert config.num_primary_capsules == geometry.num_primary_capsules
    with torch.device("meta"):
        model = AutoModelForImageClassification.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters  # as trained by the official code
    assert isinstance(config, CapsNetConfig) and config.id2label[3] == ("3" if dataset == "mnist" else "cat")


def test_dataset_override_and_dash_flags(tmp_path):
    args = build_parser().parse_args(["--checkpoint", "x", "--output-dir", "y", "--num-trials", "7", "--verify"])
    assert (args.num_trials, args.output_dir, args.verify) == (7, "y", True)
    args = build_parser().parse_args(["--checkpoint", "x", "--output_dir", "y", "--num_trials", "2", "--push-to-hub"])
    assert (args.num_trials, args.push_to_hub) == (2, True)
    # Without the override the 3-channel fixture is CIFAR-10 (SAME, leaky); --dataset mnist switches both.
    result = convert(CIFAR_PATTERN.format(0), tmp_path / "as-mnist", dataset="mnist", tolerance=1.0)
    assert (result.config.padding, result.config.leaky_routing) == ("valid", False)
    assert result.config.image_size == [26, 26]  # the largest VALID input giving a 5x5 capsule grid


# -- bad input: a clear error, and no output folder --------------------------------------------------------------


def _assert_error(argv, message, capsys):
    """The shared convention: exit status 2 and one line `capsnet-convert: error: ...` naming the problem."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()  # transformers' progress bars may come first
    assert [line for line in lines if "error" in line] == lines[-1:]
    assert lines[-1].startswith("capsnet-convert: error: ") and message in lines[-1]


def _assert_fails_cleanly(tmp_path, argv, message, capsys):
    out = tmp_path / "out"
    _assert_error([*argv, "--output_dir", str(out)], message, capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def _copy_mnist(tmp_path) -> Path:
    shutil.copytree(TF / "mnist_style", tmp_path / "ckpt")
    return tmp_path / "ckpt" / "model.ckpt-2"


def test_missing_index(tmp_path, capsys):
    prefix = _copy_mnist(tmp_path)
    Path(f"{prefix}.index").unlink()
    _assert_fails_cleanly(tmp_path, ["--checkpoint", str(prefix)], f"index file not found: {prefix}.index", capsys)


def test_missing_data_shard(tmp_path, capsys):
    prefix = _copy_mnist(tmp_path)
    Path(f"{prefix}.data-00000-of-00001").unlink()
    _assert_fails_cleanly(tmp_path, ["--checkpoint", str(prefix)], "data shard not found", capsys)


def test_truncated_data_file(tmp_path, capsys):
    prefix = _copy_mnist(tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    _assert_fails_cleanly(
        tmp_path, ["--checkpoint", str(prefix)], "model.ckpt-2.data-00000-of-00001 is truncated", capsys
    )


def test_corrupted_data_file(tmp_path, capsys):
    prefix = _copy_mnist(tmp_path)
    entry = TFCheckpointReader(prefix).entries()["conv_capsule1/weights"]
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 1234] ^= 0x10
    data.write_bytes(bytes(raw))
    _assert_fails_cleanly(
        tmp_path, ["--checkpoint", str(prefix)], "tensor 'conv_capsule1/weights' is corrupted", capsys
    )


def test_checkpoint_of_another_model(tmp_path, capsys):
    message = "is not an official CapsNet checkpoint: missing variable(s) conv1/weights"
    _assert_fails_cleanly(tmp_path, ["--checkpoint", str(TF / "dtypes" / "model.ckpt")], message, capsys)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("capsule2/weights", (15, 8, 160), "15 input capsules, not 4 types on a square grid"),
        ("conv_capsule1/weights", (9, 9, 6, 32), "takes 6 channels but conv1 gives 8"),
        ("capsule2/biases", (10, 12), "160 outputs per input, biases say 10x12"),
        ("recons/recons_3/weights", (48, 401), "the decoder outputs 401 pixels, which is no 1-channel square image"),
        ("recons/recons_2/weights", (33, 48), "decoder layer recons_2 has shape [33, 48] after 32 inputs"),
        ("conv1/weights", (9, 9, 1), "conv1/weights has shape [9, 9, 1], expected rank 4"),
        ("capsule2/weights", (16, 0, 160), "variable(s) with a zero dimension: capsule2/weights"),
    ],
)
def test_shapes_that_fit_no_capsnet(tmp_path, capsys, name, shape, message):
    variables = TFCheckpointReader(MNIST_CKPT).variables()
    if name == "recons/recons_3/weights":
        variables["recons/recons_3/biases"] = ("float32", (401,))
    variables[name] = ("float32", shape)
    with mock.patch.object(TFCheckpointReader, "variables", return_value=variables):
        _assert_fails_cleanly(tmp_path, ["--checkpoint", str(MNIST_CKPT)], message, capsys)


def test_pattern_that_matches_nothing(tmp_path, capsys):
    pattern = str(tmp_path / "cifar{}" / "model.ckpt-600000")
    _assert_fails_cleanly(tmp_path, ["--checkpoint", pattern, "--num_trials", "7"], "matches no files", capsys)


def test_pattern_with_a_missing_member(tmp_path, capsys):
    message = "ensemble member(s) missing: " + CIFAR_PATTERN.format(3) + ".index"
    _assert_fails_cleanly(tmp_path, ["--checkpoint", CIFAR_PATTERN, "--num_trials", "4"], message, capsys)


def test_failed_parity_check_leaves_nothing(tmp_path, capsys):
    """A mapping error (here: class capsule bias negated) is caught by the built-in parity check."""
    member_state_dict = weights.member_state_dict

    def wrong_bias(arrays, member):
        state = member_state_dict(arrays, member)
        key = f"capsnet.members.{member}.class_capsules.bias"
        state[key] = -state[key]  # not in place: the tensor shares memory with the checkpoint array
        return state

    with mock.patch.object(weights, "member_state_dict", wrong_bias):
        _assert_fails_cleanly(tmp_path, ["--checkpoint", str(MNIST_CKPT)], "does not reproduce", capsys)


def test_checkpoint_folder(tmp_path, capsys):
    """A folder is resolved through its `checkpoint` file (as TensorFlow writes it), else its only .index."""
    folder = _copy_mnist(tmp_path).parent
    assert main(["--checkpoint", str(folder), "--output_dir", str(tmp_path / "a")]) == 0
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-2"\nall_model_checkpoint_paths: "x"\n')
    assert main(["--checkpoint", str(folder), "--output_dir", str(tmp_path / "b")]) == 0
    shutil.copy(folder / "model.ckpt-2.index", folder / "model.ckpt-3.index")
    (folder / "checkpoint").unlink()
    _assert_error(
        ["--checkpoint", str(folder), "--output_dir", str(tmp_path / "c")],
        "model.ckpt-2.index, model.ckpt-3.index",
        capsys,
    )


def test_existing_output_folder_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_error(["--checkpoint", str(MNIST_CKPT), "--output_dir", str(out)], "exists and is not empty", capsys)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_empty_output_folder_is_written_and_overwrite_replaces_a_full_one(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["--checkpoint", str(MNIST_CKPT), "--output_dir", str(out)]) == 0
    (out / "old.txt").write_text("an earlier run's")
    assert main(["--checkpoint", CIFAR_PATTERN.format(0), "--output_dir", str(out), "--overwrite_output_dir"]) == 0
    assert not (out / "old.txt").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert _load(out).config.num_channels == 3


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_failed_parity_leaves_the_output_folder_as_it_was(converted, tmp_path, capsys):
    """Parity is measured on the staged folder: when it fails, a new folder is not created, an existing one is
    unchanged (with --overwrite_output_dir too), and no staging folder is left inside or beside it."""
    nan_parity = {"logits": np.nan, "capsule_lengths": np.nan, "capsule_poses": 0.0}
    new, existing = tmp_path / "new", tmp_path / "existing"
    shutil.copytree(converted["mnist"], existing)
    before = _folder_bytes(existing)
    with mock.patch.object(converter, "measure_parity", return_value=nan_parity):
        _assert_error(["--checkpoint", str(MNIST_CKPT), "--output_dir", str(new)], "capsule_lengths nan", capsys)
        argv = ["--checkpoint", CIFAR_PATTERN.format(0), "--output_dir", str(existing), "--overwrite_output_dir"]
        _assert_error(argv, "does not reproduce", capsys)
    assert not new.exists() and _folder_bytes(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_failed_verify_is_an_error(tmp_path, capsys):
    import capsnet_hf.convert as command

    out = tmp_path / "out"
    with mock.patch.object(command, "measure_parity", return_value={"logits": 0.0, "capsule_lengths": 1e-3}):
        _assert_error(
            ["--checkpoint", str(MNIST_CKPT), "--output_dir", str(out), "--verify"], "--tolerance 0.0001", capsys
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_trials", "2"], "--num_trials 2 needs a checkpoint pattern with '{}'"),
        (["--tolerance", "nan"], "--tolerance must be a finite number >= 0, got nan"),
        (["--tolerance", "-1"], "--tolerance must be a finite number >= 0, got -1"),
        (["--image_size", "27"], "--image_size 27 does not fit; possible sizes: [20]"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    ],
)
def test_bad_flag_values(tmp_path, capsys, flags, message):
    _assert_fails_cleanly(tmp_path, ["--checkpoint", str(MNIST_CKPT), *flags], message, capsys)


@pytest.mark.parametrize("flag", ["--num_trials", "--image_size"])
def test_flags_that_argparse_refuses(flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--checkpoint", str(MNIST_CKPT), "--output_dir", "x", flag, "0"])
    assert stopped.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"capsnet-convert: error: argument {flag}") and "expected a positive integer" in last


def test_num_trials_of_the_python_api(tmp_path):
    with pytest.raises(UsageError, match="--num_trials must be at least 1, got 0"):
        convert(str(MNIST_CKPT), tmp_path / "out", num_trials=0)
    assert not (tmp_path / "out").exists()


def test_output_folder_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["--checkpoint", str(MNIST_CKPT), "--output_dir", str(tmp_path / "file" / "out")]
    _assert_error(argv, "cannot create --output_dir", capsys)
    _assert_error([*argv[:3], str(tmp_path / "file")], "is a file, not a folder", capsys)


# -- Hub upload (mocked) -----------------------------------------------------------------------------------------


def test_push_to_hub_uploads_the_folder_in_one_commit(converted, tmp_path):
    folder = tmp_path / "published"
    shutil.copytree(converted["mnist"], folder)
    with mock.patch("huggingface_hub.HfApi") as api_class:
        assert main(["--checkpoint", str(MNIST_CKPT), "--output_dir", str(folder), "--overwrite_output_dir",
                     "--push_to_hub", "--hub-model-id", "me/capsnet-mnist-official", "--hub_token", "t"]) == 0  # fmt: skip
    api_class.assert_called_once_with(token="t")
    api = api_class.return_value
    api.create_repo.assert_called_once_with(
        repo_id="me/capsnet-mnist-official", repo_type="model", private=False, exist_ok=True
    )
    api.create_commit.assert_called_once()
    kwargs = api.create_commit.call_args.kwargs
    assert kwargs["repo_id"] == "me/capsnet-mnist-official"
    assert sorted(op.path_in_repo for op in kwargs["operations"]) == [
        "README.md", "config.json", "configuration_capsnet.py", "image_processing_capsnet.py",
        "model.safetensors", "modeling_capsnet.py", "preprocessor_config.json",
    ]  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "# me/capsnet-mnist-official" in card and 'model="me/capsnet-mnist-official"' in card
    assert "--output_dir capsnet-mnist-official" in card and "--hub_token" not in card


def test_conversion_parity_with_nan_is_an_error():
    import math

    from capsnet_hf.conversion.parity import parity_error

    assert parity_error({"lengths": 1e-6, "poses": 2e-6, "logits": 5e-3}) == 2e-6
    for parity in ({"lengths": math.nan, "poses": 0.0}, {"poses": 0.0, "lengths": math.nan}, {"logits": math.inf}):
        assert parity_error({"poses": 0.0, **parity}) == math.inf
