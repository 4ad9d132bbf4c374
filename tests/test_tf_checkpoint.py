"""The TensorFlow-free checkpoint reader against checkpoints written by TensorFlow (tests/fixtures/tf, made by
conversion/make_tf_fixtures.py with `tf.compat.v1.train.Saver`; the expected values were read back by TensorFlow)."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from capsnet_hf.conversion.tf_checkpoint import CheckpointError, TFCheckpointReader, _crc_bytes, crc32c, masked_crc32c

FIXTURES = Path(__file__).parent / "fixtures" / "tf"


def _expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("name", ["dtypes", "sharded"])
def test_reads_every_tensor_as_tensorflow_does(name):
    reader = TFCheckpointReader(FIXTURES / name / "model.ckpt")
    expected = _expected(name)
    assert set(reader.variables()) == set(expected)
    for key, value in expected.items():
        got = reader.read(key)
        dtype, shape = reader.variables()[key]
        assert shape == value.shape, key
        if dtype == "string":
            assert got.dtype == object and [bytes(v) for v in got.reshape(-1)] == list(value.reshape(-1)), key
        else:
            assert got.dtype == value.dtype, key
            np.testing.assert_array_equal(got, value, err_msg=key)


def test_dtypes_and_scalars_are_reported():
    variables = TFCheckpointReader(FIXTURES / "dtypes" / "model.ckpt").variables()
    assert variables["float32/scalar"] == ("float32", ())
    assert variables["int64/scalar"] == ("int64", ())
    assert variables["bfloat16/vector"] == ("bfloat16", (4,))
    assert variables["float32/empty"] == ("float32", (0, 3))
    assert {dtype for dtype, _ in variables.values()} == {
        "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
        "bool", "complex64", "complex128", "string",
    }  # fmt: skip


def test_sharded_checkpoint_uses_both_shards():
    reader = TFCheckpointReader(FIXTURES / "sharded" / "model.ckpt.index")
    assert reader.num_shards == 2
    assert {entry.shard_id for entry in reader.entries().values()} == {0, 1}


def test_official_graph_checkpoint_variables():
    """The MNIST-style fixture (official graph, reduced geometry) lists model variables, Adam slots and counters."""
    variables = TFCheckpointReader(FIXTURES / "mnist_style" / "model.ckpt-2").variables()
    assert variables["global_step"] == ("float32", ())
    assert variables["conv1/weights"] == ("float32", (9, 9, 1, 8))
    assert variables["conv_capsule1/biases"] == ("float32", (4, 8, 1, 1))
    assert variables["capsule2/weights"] == ("float32", (16, 8, 160))
    assert variables["capsule2/weights/Adam_1"] == ("float32", (16, 8, 160))
    assert {"beta1_power", "beta2_power", "recons/recons_3/weights"} <= set(variables)


def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vectors
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
    assert masked_crc32c(b"") == 0xA282EAD8


def test_crc32c_vectorised_path_matches_bytewise():
    """Long inputs take the lane-parallel path; compare with the byte-at-a-time definition on an odd length."""
    data = np.random.default_rng(0).integers(0, 256, 70_001, dtype=np.uint8).tobytes()
    reference = 0xFFFFFFFF
    for byte in data[:20_000]:
        reference ^= byte
        for _ in range(8):
            reference = (reference >> 1) ^ (0x82F63B78 if reference & 1 else 0)
    assert crc32c(data[:20_000]) == reference ^ 0xFFFFFFFF
    assert crc32c(data) == _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF  # several lanes plus a ragged tail


# -- bad input --------------------------------------------------------------------------------------------------


def _copy(tmp_path: Path, name: str = "mnist_style", prefix: str = "model.ckpt-2") -> Path:
    shutil.copytree(FIXTURES / name, tmp_path / name)
    return tmp_path / name / prefix


def test_missing_index(tmp_path):
    with pytest.raises(CheckpointError, match=r"index file not found: .*nothing\.index"):
        TFCheckpointReader(tmp_path / "nothing")


def test_missing_data_shard(tmp_path):
    prefix = _copy(tmp_path)
    Path(f"{prefix}.data-00000-of-00001").unlink()
    reader = TFCheckpointReader(prefix)  # the index alone is readable
    with pytest.raises(CheckpointError, match=r"data shard not found: .*model\.ckpt-2\.data-00000-of-00001"):
        reader.read("conv1/weights")


def test_unreadable_files_are_checkpoint_errors(tmp_path, monkeypatch):
    """An OSError opening the index or a shard (permissions, I/O) is a one-line usage error, not a traceback."""
    import builtins

    from capsnet_hf.cli import UsageError

    prefix = _copy(tmp_path)
    reader = TFCheckpointReader(prefix)
    real_open = builtins.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(prefix)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.ckpt-2\.index: Permission denied"):
        TFCheckpointReader(prefix)
    with pytest.raises(UsageError, match=r"cannot read .*model\.ckpt-2\.data-00000-of-00001: Permission denied"):
        reader.read("conv1/weights")


def test_truncated_data_file(tmp_path):
    prefix = _copy(tmp_path)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:1000])
    reader = TFCheckpointReader(prefix)
    last = max(reader.entries().values(), key=lambda e: e.offset)
    with pytest.raises(CheckpointError, match=rf"data-00000-of-00001 is truncated: tensor '{last.name}'"):
        reader.read(last.name)


def test_corrupted_data_file(tmp_path):
    prefix = _copy(tmp_path)
    reader = TFCheckpointReader(prefix)
    entry = reader.entries()["capsule2/weights"]
    data = Path(f"{prefix}.data-00000-of-00001")
    raw = bytearray(data.read_bytes())
    raw[entry.offset + 17] ^= 0x40
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"tensor 'capsule2/weights' is corrupted: CRC-32C mismatch"):
        reader.read("capsule2/weights")
    assert TFCheckpointReader(prefix, verify_checksums=False).read("capsule2/weights").shape == (16, 8, 160)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:30], "too short"),
        (lambda raw: raw[:-1], "bad magic number"),
        (lambda raw: bytes([raw[0] ^ 0x01]) + raw[1:], "checksum mismatch in the block at offset 0"),
    ],
)
def test_corrupted_index(tmp_path, damage, message):
    prefix = _copy(tmp_path)
    index = Path(f"{prefix}.index")
    index.write_bytes(damage(index.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        TFCheckpointReader(prefix)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "model.index").write_bytes(b"not a checkpoint index, just some text" * 3)
    with pytest.raises(CheckpointError, match="not a TensorFlow V2 checkpoint"):
        TFCheckpointReader(tmp_path / "model")


def test_unknown_tensor():
    with pytest.raises(KeyError, match="no tensor 'conv9/weights'"):
        TFCheckpointReader(FIXTURES / "mnist_style" / "model.ckpt-2").read("conv9/weights")
