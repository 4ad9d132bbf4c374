"""Write the TensorFlow test fixtures under tests/fixtures/tf/ (needs TensorFlow; the tests do not).

Run once, in an environment with `tensorflow-cpu` (2.x; the official code runs under `tensorflow.compat.v1`):

    python conversion/make_tf_fixtures.py --official_dir /path/to/Sarasra/models/research/capsules \
        --output_dir tests/fixtures/tf

It writes:

* `dtypes/model.ckpt` + `dtypes.npz`: variables of every numeric dtype TensorFlow can hold in a variable, strings,
  scalars and an empty tensor, saved by `tf.compat.v1.train.Saver`; the `.npz` holds the values TensorFlow's own
  `tf.train.load_checkpoint` reads back (strings as fixed-width bytes, bfloat16 widened to float32).
* `sharded/model.ckpt` + `sharded.npz`: the same kind of checkpoint split over two data shards (variables placed
  on two CPU devices, `Saver(sharded=True)`).
* `mnist_style/model.ckpt-2` + `mnist_style.npz` and `cifar_style/cifar{0,1,2}/model.ckpt-2` + `cifar_style.npz`:
  checkpoints of the OFFICIAL CapsNet graph (`models.capsule_model.CapsuleModel` imported from `--official_dir`,
  nothing copied) after two Adam steps, with its outputs on a few inputs.

How the official code is run (nothing of it is copied; only its module globals are patched):

* Its modules use the TensorFlow 1 API, so their global `tf` is replaced by `tf.compat.v1` (graph mode) with
  `nn.conv2d` computing NCHW convolutions as NHWC between transposes (TensorFlow's CPU kernels have no NCHW
  gradient), plus a
  small `contrib` namespace: `layers.flatten`, `layers.stack`, `layers.fully_connected` (re-implemented with the
  same variable names, `recons/recons_{1,2,3}/{weights,biases}`), `metrics.set_difference`/`set_size`
  (`tf.sets`); `xrange` is aliased to `range`; hyperparameters are a plain namespace instead of
  `tf.contrib.training.HParams`.
* To keep the fixtures small the geometry is reduced by wrapping three calls made by `capsule_model.py`:
  the 256 channels of conv1 (hard-coded) become `--conv1_channels` (both conv1's kernel/bias and the
  `input_atoms` of the primary capsule layer), and the decoder's hidden sizes [512, 1024] become
  `--decoder_hidden_sizes`. The official layers then run unchanged. The wrapper of `layers.capsule` and
  `layers.conv_slim_capsule` also records their outputs (class capsule poses, primary capsules) as references.
* MNIST-style: 1x20x20 input, VALID padding, 4 primary capsule types, 10 classes, no leaky routing, decoder on.
  CIFAR-style: 3x10x10 input, SAME padding (the stride-2 primary conv pads 3 before / 4 after), 2 primary types,
  5 classes, leaky routing, no decoder, 3 ensemble members with different seeds. `--released_geometry` writes
  the released models' sizes instead (too large for tests/; used once to check parity at full scale). The `hparams_override` used by the
  official README for CIFAR-10 is `num_prime_capsules=64,padding=SAME,leaky=true,remake=false`.
* Each model is trained two Adam steps on random data (so `global_step`, `beta1_power`, `beta2_power` and the Adam
  slots exist), then every trainable variable gets TensorFlow-generated noise added (`assign_add`), because after
  two steps the biases are all still ~0.1 and would not reveal a transposed or mis-ordered bias mapping.
* The references are `session.run` outputs of the official graph: capsule lengths (the official "logits"), class
  capsule poses, primary capsules and, for MNIST, the reconstruction masked by the given label. For the ensemble
  the members are restored one after another into one graph, as the official `evaluate_ensemble` does, and the
  summed lengths are stored. `cifar_style.npz` also holds TensorFlow's CIFAR-10 evaluation preprocessing
  (`resize_image_with_crop_or_pad` then `per_image_standardization` on the 0..255 scale) of a few uint8 images.
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1


# ------------------------------------------------------------------------------------------------------------------
# A TF1-API namespace for the official modules.
# ------------------------------------------------------------------------------------------------------------------


def _fully_connected(
    inputs, num_outputs, activation_fn=None, reuse=None, scope=None, weights_initializer=None, biases_initializer=None
):
    """tf.contrib.layers.fully_connected for 2-D inputs: variables `scope/weights` [in, out], `scope/biases`."""
    with tf1.variable_scope(scope, reuse=reuse):
        weights = tf1.get_variable(
            "weights", [inputs.get_shape()[-1].value, num_outputs], initializer=weights_initializer
        )
        biases = tf1.get_variable("biases", [num_outputs], initializer=biases_initializer)
        outputs = tf1.nn.bias_add(tf1.matmul(inputs, weights), biases)
        return activation_fn(outputs) if activation_fn is not None else outputs


def _stack(inputs, layer, stack_args, scope=None, **kwargs):
    """tf.contrib.layers.stack: layer i+1 in variable scope `scope/scope_{i+1}`."""
    with tf1.variable_scope(scope, "Stack", [inputs]):
        outputs = inputs
        for i, args in enumerate(stack_args):
            kwargs["scope"] = f"{scope}_{i + 1}"
            outputs = layer(outputs, *args, **kwargs)
        return outputs


def _flatten(inputs):
    return tf1.reshape(inputs, [tf1.shape(inputs)[0], int(np.prod(inputs.get_shape().as_list()[1:]))])


def _conv2d(inputs, kernel, strides, padding, data_format="NHWC", **kwargs):
    """tf.nn.conv2d; NCHW is computed as NHWC between transposes (TensorFlow's CPU kernels lack NCHW gradients)."""
    if data_format != "NCHW":
        return tf1.nn.conv2d(inputs, kernel, strides, padding, data_format=data_format, **kwargs)
    nhwc = tf1.transpose(inputs, [0, 2, 3, 1])
    strides = [strides[0], strides[2], strides[3], strides[1]]
    out = tf1.nn.conv2d(nhwc, kernel, strides, padding, data_format="NHWC", **kwargs)
    return tf1.transpose(out, [0, 3, 1, 2])


class _TF1(types.ModuleType):
    """`tf.compat.v1` plus the few `tf.contrib` members the official model code uses."""

    def __getattr__(self, name):
        return getattr(tf1, name)


class _TF1NN(types.ModuleType):
    """`tf.compat.v1.nn` with `conv2d` replaced by `_conv2d`."""

    def __getattr__(self, name):
        return getattr(tf1.nn, name)


def _tf1_namespace() -> _TF1:
    shim = _TF1("tf1_for_official_capsules")
    shim.nn = _TF1NN("tf1_nn_for_official_capsules")
    shim.nn.conv2d = _conv2d
    shim.contrib = types.SimpleNamespace(
        layers=types.SimpleNamespace(flatten=_flatten, stack=_stack, fully_connected=_fully_connected),
        metrics=types.SimpleNamespace(set_difference=tf1.sets.difference, set_size=tf1.sets.size),
    )
    return shim


def load_official(official_dir: Path, conv1_channels: int, decoder_hidden_sizes: list[int], records: dict):
    """Import the official modules from `official_dir` and patch their globals (see the module docstring)."""
    sys.path.insert(0, str(official_dir))
    builtins.xrange = range
    shim = _tf1_namespace()
    capsule_model = importlib.import_module("models.capsule_model")
    layers = importlib.import_module("models.layers.layers")
    variables = importlib.import_module("models.layers.variables")
    base_model = importlib.import_module("models.model")
    for module in (capsule_model, layers, variables, base_model):
        module.tf = shim

    def weight_variable(shape, **kwargs):
        if list(shape[:2]) == [9, 9] and shape[3] == 256:  # conv1 kernel [9, 9, depth, 256]
            shape = [9, 9, shape[2], conv1_channels]
        return variables.weight_variable(shape, **kwargs)

    def bias_variable(shape, **kwargs):
        return variables.bias_variable([conv1_channels] if list(shape) == [256] else shape, **kwargs)

    def conv_slim_capsule(*args, **kwargs):
        kwargs["input_atoms"] = conv1_channels
        out = layers.conv_slim_capsule(*args, **kwargs)
        records["primary"] = out
        return out

    def capsule(*args, **kwargs):
        out = layers.capsule(*args, **kwargs)
        records["poses"] = out
        return out

    def reconstruction(*args, **kwargs):
        kwargs["layer_sizes"] = decoder_hidden_sizes
        out = layers.reconstruction(*args, **kwargs)
        records["reconstruction"] = out
        return out

    capsule_model.variables = types.SimpleNamespace(weight_variable=weight_variable, bias_variable=bias_variable)
    capsule_model.layers = types.SimpleNamespace(
        conv_slim_capsule=conv_slim_capsule, capsule=capsule, reconstruction=reconstruction
    )
    return capsule_model


# ------------------------------------------------------------------------------------------------------------------
# Official CapsNet checkpoints.
# ------------------------------------------------------------------------------------------------------------------


def official_hparams(num_prime_capsules: int, padding: str, leaky: bool, remake: bool) -> types.SimpleNamespace:
    """Hyperparameters of the official `CapsuleModel`: the values both fixtures share, and the four that differ."""
    return types.SimpleNamespace(
        decay_rate=0.96,
        decay_steps=2000,
        leaky=leaky,
        learning_rate=0.001,
        loss_type="margin",
        num_prime_capsules=num_prime_capsules,
        padding=padding,
        remake=remake,
        routing=3,
        verbose=False,
    )


def build_graph(capsule_model, hparams, depth, dim, num_classes):
    features = {
        "images": tf1.placeholder(tf1.float32, [None, depth, dim, dim]),
        "labels": tf1.placeholder(tf1.float32, [None, num_classes]),
        "recons_label": tf1.placeholder(tf1.int32, [None]),
        "height": dim,
        "depth": depth,
        "num_classes": num_classes,
        "num_targets": 1,
    }
    features["recons_image"] = features["images"]
    model = capsule_model.CapsuleModel(hparams)
    result, inferred = model.multi_gpu([features], 1)
    return features, result, inferred[0]


def _feed(features, images, labels, num_classes):
    return {
        features["images"]: images,
        features["labels"]: np.eye(num_classes, dtype=np.float32)[labels],
        features["recons_label"]: labels,
    }


def train_and_save(session, features, result, prefix: Path, seed: int, depth, dim, num_classes):
    """Two Adam steps on random data, TF-generated noise on every trainable variable, then `Saver.save`."""
    rng = np.random.default_rng(seed)
    for _ in range(2):
        images = rng.uniform(0, 1, (4, depth, dim, dim)).astype(np.float32)
        labels = rng.integers(0, num_classes, 4)
        session.run(result.train_op, _feed(features, images, labels, num_classes))
    noise = [
        v.assign_add(tf1.random.normal(v.shape, stddev=0.3 if "biases" in v.op.name else 0.05, seed=seed + i))
        for i, v in enumerate(tf1.trainable_variables())
    ]
    session.run(noise)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tf1.train.Saver().save(session, str(prefix), global_step=2, write_meta_graph=False)
    (prefix.parent / "checkpoint").unlink()


def make_mnist_style(official_dir: Path, out: Path, args) -> None:
    records: dict = {}
    depth, dim, num_classes = 1, args.mnist_size, 10
    with tf1.Graph().as_default():
        tf1.set_random_seed(1)
        capsule_model = load_official(official_dir, args.conv1_channels, args.decoder_hidden_sizes, records)
        hparams = official_hparams(args.mnist_types, "VALID", leaky=False, remake=True)
        features, result, inferred = build_graph(capsule_model, hparams, depth, dim, num_classes)
        with tf1.Session(config=tf1.ConfigProto(allow_soft_placement=True)) as session:
            session.run(tf1.global_variables_initializer())
            train_and_save(session, features, result, out / "mnist_style" / "model.ckpt", 11, depth, dim, num_classes)
            rng = np.random.default_rng(5)
            images = rng.uniform(0, 1, (3, depth, dim, dim)).astype(np.float32)
            labels = np.array([3, 0, 7])
            lengths, poses, primary, recons = session.run(
                [inferred.logits, records["poses"], records["primary"], inferred.remakes[0]],
                _feed(features, images, labels, num_classes),
            )
    np.savez(
        out / "mnist_style.npz",
        pixel_values=images,
        labels=labels,
        capsule_lengths=lengths,
        capsule_poses=poses,
        primary_capsules=primary,
        reconstructions=recons,
    )


def make_cifar_style(official_dir: Path, out: Path, args) -> None:
    records: dict = {}
    depth, dim, num_classes, members = 3, args.cifar_size, args.cifar_classes, args.cifar_members
    hparams = official_hparams(args.cifar_types, "SAME", leaky=True, remake=False)
    for member in range(members):
        with tf1.Graph().as_default():
            tf1.set_random_seed(100 + member)
            capsule_model = load_official(official_dir, args.conv1_channels, args.decoder_hidden_sizes, records)
            features, result, _ = build_graph(capsule_model, hparams, depth, dim, num_classes)
            with tf1.Session(config=tf1.ConfigProto(allow_soft_placement=True)) as session:
                session.run(tf1.global_variables_initializer())
                prefix = out / "cifar_style" / f"cifar{member}" / "model.ckpt"
                train_and_save(session, features, result, prefix, 20 + member, depth, dim, num_classes)

    # Evaluation as the official evaluate_ensemble: one graph, each member restored in turn, lengths summed.
    rng = np.random.default_rng(7)
    images = rng.normal(0, 1, (3, depth, dim, dim)).astype(np.float32)
    labels = np.array([1, 4, 2])
    with tf1.Graph().as_default():
        capsule_model = load_official(official_dir, args.conv1_channels, args.decoder_hidden_sizes, records)
        features, _, inferred = build_graph(capsule_model, hparams, depth, dim, num_classes)
        saver = tf1.train.Saver()
        lengths, poses, primary = [], [], []
        with tf1.Session(config=tf1.ConfigProto(allow_soft_placement=True)) as session:
            for member in range(members):
                saver.restore(session, str(out / "cifar_style" / f"cifar{member}" / "model.ckpt-2"))
                outs = session.run(
                    [inferred.logits, records["poses"], records["primary"]],
                    _feed(features, images, labels, num_classes),
                )
                for store, value in zip((lengths, poses, primary), outs, strict=True):
                    store.append(value)
        # TensorFlow's CIFAR-10 evaluation preprocessing (cifar10_input.inputs, split="test"), at fixture scale:
        # crop (size+2) -> size, pad (size-2) -> size. Image 1 is black but for one pixel of value 1: its std, sqrt(p(1-p)) with p = 1/300,
        # lies below the floor 1/sqrt(300), so the floor applies (on a 0 background float32 stays exact; on a grey
        # one TensorFlow's float32 mean is off by an ulp of 128, which moves the std across the floor).
        raw = rng.integers(0, 256, (3, dim + 2, dim + 2, 3)).astype(np.uint8)
        raw[1] = 0
        raw[1, dim // 2, dim // 2, 0] = 1
        padded_raw = rng.integers(0, 256, (1, dim - 2, dim - 2, 3)).astype(np.uint8)
        crop = tf1.placeholder(tf1.float32, [None, None, 3])
        standardized = tf1.image.per_image_standardization(tf1.image.resize_image_with_crop_or_pad(crop, dim, dim))
        with tf1.Session(config=tf1.ConfigProto(allow_soft_placement=True)) as session:
            preprocessed = np.stack([session.run(standardized, {crop: im.astype(np.float32)}) for im in raw])
            padded = np.stack([session.run(standardized, {crop: im.astype(np.float32)}) for im in padded_raw])
    lengths = np.stack(lengths, 1)  # [B, M, J]
    np.savez(
        out / "cifar_style.npz",
        pixel_values=images,
        labels=labels,
        capsule_lengths=lengths,
        capsule_poses=np.stack(poses, 1),
        primary_capsules=np.stack(primary, 1),
        summed_lengths=lengths.sum(1),
        raw_images=raw,
        preprocessed=preprocessed.transpose(0, 3, 1, 2),
        raw_images_small=padded_raw,
        preprocessed_small=padded.transpose(0, 3, 1, 2),
    )


# ------------------------------------------------------------------------------------------------------------------
# Reader fixtures: every dtype, scalars, strings, two shards.
# ------------------------------------------------------------------------------------------------------------------


def _dtype_values(rng):
    values = {
        "float32/matrix": rng.normal(size=(3, 4)).astype(np.float32),
        "float32/scalar": np.float32(-2.5),
        "float32/empty": np.zeros((0, 3), np.float32),
        "float64/vector": rng.normal(size=(5,)),
        "float16/vector": rng.normal(size=(6,)).astype(np.float16),
        "int8/vector": rng.integers(-128, 128, 7).astype(np.int8),
        "int16/vector": rng.integers(-30000, 30000, 7).astype(np.int16),
        "int32/tensor3": rng.integers(-(2**31), 2**31, (2, 3, 4)).astype(np.int32),
        "int64/scalar": np.int64(-(2**40) - 3),
        "uint8/vector": rng.integers(0, 256, 9).astype(np.uint8),
        "uint16/vector": rng.integers(0, 65536, 9).astype(np.uint16),
        "bool/vector": rng.integers(0, 2, 5).astype(bool),
        "complex64/vector": (rng.normal(size=3) + 1j * rng.normal(size=3)).astype(np.complex64),
        "complex128/vector": rng.normal(size=3) + 1j * rng.normal(size=3),
        "string/vector": np.array([b"capsule", b"", b"routing \xff by agreement"], dtype=object),
        "string/scalar": np.array(b"dynamic", dtype=object),
    }
    return values


def make_reader_fixture(out: Path, name: str, shards: int) -> None:
    rng = np.random.default_rng(3 if shards == 1 else 4)
    values = _dtype_values(rng)
    prefix = out / name / "model.ckpt"
    with tf1.Graph().as_default():
        variables = {}
        for i, (key, value) in enumerate(values.items()):
            with tf1.device(f"/cpu:{i % shards}"):
                variables[key] = tf1.Variable(value, name=key)
        with tf1.device("/cpu:0"):
            variables["bfloat16/vector"] = tf1.Variable(
                tf1.cast(tf1.constant(rng.normal(size=(4,)).astype(np.float32)), tf1.bfloat16), name="bfloat16/vector"
            )
        config = tf1.ConfigProto(device_count={"CPU": shards}, allow_soft_placement=False)
        with tf1.Session(config=config) as session:
            session.run(tf1.global_variables_initializer())
            prefix.parent.mkdir(parents=True, exist_ok=True)
            tf1.train.Saver(variables, sharded=shards > 1).save(session, str(prefix), write_meta_graph=False)
    (prefix.parent / "checkpoint").unlink()
    reader = tf.train.load_checkpoint(str(prefix))
    expected = {}
    for key in reader.get_variable_to_shape_map():
        value = np.asarray(reader.get_tensor(key))
        if value.dtype == object:
            value = value.astype(bytes)
        elif value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        expected[key] = value
    np.savez(out / f"{name}.npz", **expected)
    data_files = sorted(p.name for p in prefix.parent.glob("model.ckpt.data-*"))
    assert len(data_files) == shards, data_files


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official_dir", type=Path, required=True, help="Sarasra/models research/capsules folder")
    parser.add_argument("--output_dir", type=Path, default=Path("tests/fixtures/tf"))
    parser.add_argument("--conv1_channels", type=int, default=8)
    parser.add_argument("--decoder_hidden_sizes", type=int, nargs=2, default=[32, 48])
    parser.add_argument("--mnist_size", type=int, default=20)
    parser.add_argument("--mnist_types", type=int, default=4)
    parser.add_argument("--cifar_size", type=int, default=10)
    parser.add_argument("--cifar_types", type=int, default=2)
    parser.add_argument("--cifar_classes", type=int, default=5)
    parser.add_argument("--cifar_members", type=int, default=3)
    parser.add_argument(
        "--released_geometry",
        action="store_true",
        help="the released models' geometry (256 conv1 channels, 512-1024 decoder, MNIST 28x28 with 32 types, "
        "CIFAR-10 24x24 with 64 types and 10 classes; 2 members): hundreds of MB, for a parity check, not for tests/",
    )
    args = parser.parse_args(argv)
    if args.released_geometry:
        args.conv1_channels, args.decoder_hidden_sizes = 256, [512, 1024]
        args.mnist_size, args.mnist_types = 28, 32
        args.cifar_size, args.cifar_types, args.cifar_classes, args.cifar_members = 24, 64, 10, 2
    tf1.disable_v2_behavior()
    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    args.output_dir.mkdir(parents=True)
    make_reader_fixture(args.output_dir, "dtypes", 1)
    make_reader_fixture(args.output_dir, "sharded", 2)
    make_mnist_style(args.official_dir.resolve(), args.output_dir, args)
    make_cifar_style(args.official_dir.resolve(), args.output_dir, args)


if __name__ == "__main__":
    main()
