"""A TensorFlow-free reader of TensorFlow "V2" checkpoints (`NAME.index` + `NAME.data-SSSSS-of-NNNNN`).

Format (TensorFlow's `tensor_bundle`):

* `NAME.index` is an immutable sorted table in the LevelDB "SSTable" layout: data blocks of prefix-compressed
  `key -> value` entries with a restart array, an index block mapping the last key of every data block to its
  `BlockHandle` (offset, size as varints), a metaindex block, and a 48-byte footer (two block handles padded to
  40 bytes, then the magic number `0xdb4775248b80fb57`). Every block is followed by a one-byte compression type
  (TensorFlow writes 0, uncompressed) and the masked CRC-32C of the block and that byte.
* The value of the empty key is a `BundleHeaderProto` (num_shards, endianness, version); every other key is a
  tensor name whose value is a `BundleEntryProto` (dtype, shape, shard_id, offset, size, masked CRC-32C).
* `NAME.data-SSSSS-of-NNNNN` holds the raw tensor bytes (numeric tensors: the flat array in the header's byte
  order; string tensors: varint64 lengths, a masked CRC-32C of the lengths, then the bytes).

The protobufs are decoded by a minimal wire-format parser, so neither TensorFlow nor protobuf is needed. CRC-32C
checks of the index blocks and of every tensor read are on by default (`verify_checksums`); the tensor check is
vectorised with NumPy (about a second per 90 MB on one CPU core).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli import UsageError

__all__ = ["CheckpointError", "TensorEntry", "TFCheckpointReader", "crc32c", "masked_crc32c"]

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# tensorflow/core/framework/types.proto -> NumPy dtype (None: decoded specially).
DTYPES: dict[int, tuple[str, np.dtype | None]] = {
    1: ("float32", np.dtype("float32")),
    2: ("float64", np.dtype("float64")),
    3: ("int32", np.dtype("int32")),
    4: ("uint8", np.dtype("uint8")),
    5: ("int16", np.dtype("int16")),
    6: ("int8", np.dtype("int8")),
    7: ("string", None),
    8: ("complex64", np.dtype("complex64")),
    9: ("int64", np.dtype("int64")),
    10: ("bool", np.dtype("bool")),
    14: ("bfloat16", None),
    17: ("uint16", np.dtype("uint16")),
    18: ("complex128", np.dtype("complex128")),
    19: ("float16", np.dtype("float16")),
    22: ("uint32", np.dtype("uint32")),
    23: ("uint64", np.dtype("uint64")),
}
DTYPES_BY_NAME = {name: dtype for name, dtype in DTYPES.values() if dtype is not None}


class CheckpointError(UsageError):
    """A checkpoint file is missing, unreadable, truncated, corrupted or not a TensorFlow V2 checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as used by LevelDB tables and TensorFlow bundles.
# ----------------------------------------------------------------------------------------------------------------


def _make_tables() -> np.ndarray:
    """Slicing-by-4 lookup tables [4, 256] of the reflected CRC-32C polynomial 0x82F63B78."""
    table = np.zeros((4, 256), dtype=np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table[0, n] = c
    for k in range(1, 4):
        table[k] = (table[k - 1] >> 8) ^ table[0][table[k - 1] & 0xFF]
    return table


_TABLES = _make_tables()
_T0 = [int(v) for v in _TABLES[0]]
_LANE_BYTES = 4096  # bytes per lane of the vectorised CRC


def _crc_bytes(crc: int, data: bytes | memoryview) -> int:
    """Raw (no pre/post inversion) byte-at-a-time CRC-32C update; for short inputs."""
    table = _T0
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _shift_tables(num_bytes: int) -> list[list[int]]:
    """Byte tables of the linear map "append `num_bytes` zero bytes" on a raw CRC state."""
    state = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
    t0, t1, t2, t3 = _TABLES
    for _ in range(num_bytes // 4):
        state = t3[state & 0xFF] ^ t2[(state >> 8) & 0xFF] ^ t1[(state >> 16) & 0xFF] ^ t0[state >> 24]
    bits = [int(v) for v in state]
    tables = []
    for byte in range(4):
        column = [0] * 256
        for value in range(1, 256):
            low = value & -value
            column[value] = column[value ^ low] ^ bits[8 * byte + low.bit_length() - 1]
        tables.append(column)
    return tables


_SHIFT = _shift_tables(_LANE_BYTES)


def _crc_raw_vectorised(data: np.ndarray) -> int:
    """Raw CRC-32C (initial state 0) of `data` (uint8, length a multiple of `_LANE_BYTES`).

    The message is cut into lanes of `_LANE_BYTES` bytes whose CRCs are computed side by side (slicing-by-4,
    one NumPy step per 4 bytes of every lane), then combined: CRC is linear, so
    raw(A || B) = shift_{|B|}(raw(A)) ^ raw(B).
    """
    lanes = data.reshape(-1, _LANE_BYTES // 4, 4).astype(np.uint32)
    words = lanes[..., 0] | (lanes[..., 1] << 8) | (lanes[..., 2] << 16) | (lanes[..., 3] << 24)
    t0, t1, t2, t3 = _TABLES
    state = np.zeros(words.shape[0], dtype=np.uint32)
    for k in range(words.shape[1]):
        state ^= words[:, k]
        state = t3[state & 0xFF] ^ t2[(state >> 8) & 0xFF] ^ t1[(state >> 16) & 0xFF] ^ t0[state >> 24]
    s0, s1, s2, s3 = _SHIFT
    crc = 0
    for lane_crc in state.tolist():
        crc = s0[crc & 0xFF] ^ s1[(crc >> 8) & 0xFF] ^ s2[(crc >> 16) & 0xFF] ^ s3[crc >> 24] ^ lane_crc
    return crc


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32C (Castagnoli) of `data`, e.g. `crc32c(b"123456789") == 0xE3069283`."""
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if buf.size < 4 * _LANE_BYTES:
        return _crc_bytes(0xFFFFFFFF, buf.tobytes()) ^ 0xFFFFFFFF
    # Starting from 0xFFFFFFFF equals starting from 0 with the first 4 bytes inverted (reflected CRC).
    head = buf[: buf.size - buf.size % _LANE_BYTES].copy()
    head[:4] ^= 0xFF
    crc = _crc_raw_vectorised(head)
    return _crc_bytes(crc, buf[head.size :].tobytes()) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """The "masked" CRC-32C that LevelDB and TensorFlow store (rotate right by 15, add 0xa282ead8)."""
    return _mask(crc32c(data))


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------
# Protobuf wire format and SSTable blocks.
# ----------------------------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise CheckpointError(f"truncated or malformed varint in {what}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes, what: str) -> list[tuple[int, int | bytes]]:
    """Decode a protobuf message into (field number, value) pairs: varints as int, fixed32/64 as int, bytes."""
    fields = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, what)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, what)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, what)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire} in {what}")
        if pos > len(buf):
            raise CheckpointError(f"truncated protobuf in {what}")
        fields.append((number, value))
    return fields


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class TensorEntry:
    """Where and how one tensor is stored (a decoded `BundleEntryProto`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None


def _parse_entry(name: str, value: bytes) -> TensorEntry:
    what = f"the index entry of {name!r}"
    dtype_code, shape, shard_id, offset, size, crc, sliced = 0, [], 0, 0, 0, None, False
    for number, field in _proto_fields(value, what):
        if number == 1:
            dtype_code = field
        elif number == 2:
            for dim_number, dim in _proto_fields(field, what):
                if dim_number == 2:
                    size_fields = [v for n, v in _proto_fields(dim, what) if n == 1]
                    shape.append(_signed64(size_fields[0]) if size_fields else 0)
                elif dim_number == 3 and dim:
                    raise CheckpointError(f"{what} has an unknown rank")
        elif number == 3:
            shard_id = field
        elif number == 4:
            offset = field
        elif number == 5:
            size = field
        elif number == 6:
            crc = field
        elif number == 7:
            sliced = True
    if sliced:
        raise CheckpointError(f"tensor {name!r} is stored as slices of a partitioned variable, which is not supported")
    if dtype_code not in DTYPES:
        raise CheckpointError(f"tensor {name!r} has unsupported TensorFlow dtype enum {dtype_code}")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"tensor {name!r} has a negative dimension in shape {shape}")
    return TensorEntry(name, DTYPES[dtype_code][0], tuple(shape), shard_id, offset, size, crc)


def _read_file(path: Path, offset: int = 0, size: int = -1) -> bytes:
    """`size` bytes of `path` from `offset` (all with -1); an unreadable file is a `CheckpointError`."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror or error}") from error


class TFCheckpointReader:
    """Reads the tensors of a TensorFlow V2 checkpoint without TensorFlow.

    Args:
        path: the checkpoint prefix (`.../model.ckpt-1`), or its `.index` or a `.data-*` file.
        verify_checksums: check the CRC-32C of every index block and of every tensor read.

    Raises:
        CheckpointError: if the `.index` file or a data shard is missing, truncated or corrupted.

    Example:
        >>> reader = TFCheckpointReader("mnist_checkpoint/model.ckpt-1")
        >>> reader.variables()["conv1/weights"]
        ('float32', (9, 9, 1, 256))
        >>> kernel = reader.read("conv1/weights")  # np.ndarray [9, 9, 1, 256]
    """

    def __init__(self, path: str | os.PathLike, verify_checksums: bool = True):
        path = str(path)
        self.prefix = re.sub(r"\.(index|data-\d{5}-of-\d{5})$", "", path)
        self.verify_checksums = verify_checksums
        self.index_path = Path(self.prefix + ".index")
        if not self.index_path.is_file():
            raise CheckpointError(f"checkpoint index file not found: {self.index_path}")
        raw = _read_file(self.index_path)
        table = self._read_table(raw)
        if b"" not in table:
            raise CheckpointError(
                f"{self.index_path} has no bundle header (empty key): not a TensorFlow V2 checkpoint"
            )
        self.num_shards, big_endian = 1, False
        for number, value in _proto_fields(table.pop(b""), f"the bundle header of {self.index_path}"):
            if number == 1:
                self.num_shards = value
            elif number == 2:
                big_endian = value == 1
        if self.num_shards < 1:
            raise CheckpointError(f"{self.index_path} declares {self.num_shards} data shards")
        self.byte_order = ">" if big_endian else "<"
        self._entries: dict[str, TensorEntry] = {}
        for key, value in table.items():
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CheckpointError(f"{self.index_path} has a non-UTF-8 tensor name {key!r}") from err
            entry = _parse_entry(name, value)
            if entry.shard_id >= self.num_shards:
                raise CheckpointError(f"tensor {name!r} is in shard {entry.shard_id} of only {self.num_shards}")
            self._entries[name] = entry
        self._shard_sizes: dict[int, int] = {}

    # -- index table ------------------------------------------------------------------------------------------

    def _read_block(self, raw: bytes, offset: int, size: int) -> bytes:
        end = offset + size
        if offset < 0 or end + BLOCK_TRAILER_SIZE > len(raw):
            raise CheckpointError(f"{self.index_path} is truncated: block at {offset} (+{size}) lies past its end")
        block, compression = raw[offset:end], raw[end]
        if self.verify_checksums:
            (stored,) = struct.unpack_from("<I", raw, end + 1)
            if _mask(crc32c(raw[offset : end + 1])) != stored:
                raise CheckpointError(
                    f"{self.index_path} is corrupted: checksum mismatch in the block at offset {offset}"
                )
        if compression != 0:
            kind = "snappy" if compression == 1 else f"type {compression}"
            raise CheckpointError(
                f"{self.index_path} uses {kind} block compression, which this reader does not support "
                "(TensorFlow writes checkpoint indexes uncompressed)"
            )
        return block

    def _block_entries(self, block: bytes) -> list[tuple[bytes, bytes]]:
        what = f"an index block of {self.index_path}"
        if len(block) < 4:
            raise CheckpointError(f"{what} is too short")
        (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
        limit = len(block) - 4 - 4 * num_restarts
        if limit < 0:
            raise CheckpointError(f"{what} has a malformed restart array")
        entries, key, pos = [], b"", 0
        while pos < limit:
            shared, pos = _varint(block, pos, what)
            unshared, pos = _varint(block, pos, what)
            value_len, pos = _varint(block, pos, what)
            if shared > len(key) or pos + unshared + value_len > limit:
                raise CheckpointError(f"{what} has a malformed entry")
            key = key[:shared] + block[pos : pos + unshared]
            pos += unshared
            entries.append((key, block[pos : pos + value_len]))
            pos += value_len
        return entries

    def _read_table(self, raw: bytes) -> dict[bytes, bytes]:
        if len(raw) < FOOTER_SIZE:
            raise CheckpointError(f"{self.index_path} is too short ({len(raw)} bytes) to be a checkpoint index")
        footer = raw[-FOOTER_SIZE:]
        (magic,) = struct.unpack_from("<Q", footer, 40)
        if magic != TABLE_MAGIC:
            raise CheckpointError(f"{self.index_path} is not a TensorFlow V2 checkpoint index (bad magic number)")
        what = f"the footer of {self.index_path}"
        _, pos = _varint(footer, 0, what)  # metaindex handle: unused
        _, pos = _varint(footer, pos, what)
        index_offset, pos = _varint(footer, pos, what)
        index_size, pos = _varint(footer, pos, what)
        table: dict[bytes, bytes] = {}
        for _, handle in self._block_entries(self._read_block(raw, index_offset, index_size)):
            offset, pos = _varint(handle, 0, what)
            size, _ = _varint(handle, pos, what)
            table.update(self._block_entries(self._read_block(raw, offset, size)))
        return table

    # -- public API ---------------------------------------------------------------------------------------------

    def data_path(self, shard_id: int) -> Path:
        """Path of data shard `shard_id`: `PREFIX.data-0000S-of-0000N`."""
        return Path(f"{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def entries(self) -> dict[str, TensorEntry]:
        """All tensor entries, by name (sorted, as in the index)."""
        return dict(self._entries)

    def variables(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """`{name: (dtype name, shape)}` of every tensor in the checkpoint, e.g. `("float32", (9, 9, 1, 256))`."""
        return {name: (e.dtype, e.shape) for name, e in self._entries.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def read(self, name: str) -> np.ndarray:
        """The tensor `name` as a NumPy array (native byte order; bfloat16 is widened to float32, strings are an
        object array of `bytes`).

        Raises:
            KeyError: no tensor of that name.
            CheckpointError: the data shard is missing, truncated, or its bytes fail the CRC-32C check.
        """
        if name not in self._entries:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.prefix}")
        entry = self._entries[name]
        data = self._read_bytes(entry)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.dtype == "string":
            strings, checksummed = self._decode_strings(entry, data, count)
        else:
            checksummed = data
        if self.verify_checksums and entry.crc32c is not None and masked_crc32c(checksummed) != entry.crc32c:
            raise CheckpointError(
                f"tensor {name!r} is corrupted: CRC-32C mismatch in {self.data_path(entry.shard_id)} "
                f"(bytes {entry.offset}..{entry.offset + entry.size})"
            )
        if entry.dtype == "string":
            return strings
        itemsize = 2 if entry.dtype == "bfloat16" else DTYPES_BY_NAME[entry.dtype].itemsize
        if entry.size != count * itemsize:
            raise CheckpointError(
                f"tensor {name!r}: {entry.size} stored bytes do not fit dtype {entry.dtype} and shape {entry.shape}"
            )
        if entry.dtype == "bfloat16":
            bits = np.frombuffer(data, dtype=np.dtype("uint16").newbyteorder(self.byte_order)).astype(np.uint32)
            return (bits << 16).view(np.float32).reshape(entry.shape)
        array = np.frombuffer(data, dtype=DTYPES_BY_NAME[entry.dtype].newbyteorder(self.byte_order))
        return array.astype(DTYPES_BY_NAME[entry.dtype]).reshape(entry.shape)

    def _read_bytes(self, entry: TensorEntry) -> bytes:
        path = self.data_path(entry.shard_id)
        if entry.shard_id not in self._shard_sizes:
            if not path.is_file():
                raise CheckpointError(f"checkpoint data shard not found: {path}")
            self._shard_sizes[entry.shard_id] = path.stat().st_size
        if entry.offset + entry.size > self._shard_sizes[entry.shard_id]:
            raise CheckpointError(
                f"{path} is truncated: tensor {entry.name!r} needs bytes {entry.offset}..{entry.offset + entry.size} "
                f"but the file has {self._shard_sizes[entry.shard_id]}"
            )
        return _read_file(path, entry.offset, entry.size)

    def _decode_strings(self, entry: TensorEntry, data: bytes, count: int) -> tuple[np.ndarray, bytes]:
        """Decode a string tensor: varint64 lengths, their masked CRC-32C, then the bytes.

        Returns the object array of `bytes` and the byte string TensorFlow's entry checksum covers: every length
        as a little-endian uint32 (uint64 above 4 GiB), the stored length checksum, then the string bytes.
        """
        what = f"string tensor {entry.name!r}"
        lengths, pos = [], 0
        for _ in range(count):
            length, pos = _varint(data, pos, what)
            lengths.append(length)
        length_checksum = data[pos : pos + 4]
        pos += 4
        out = np.empty(count, dtype=object)
        for i, length in enumerate(lengths):
            out[i] = data[pos : pos + length]
            pos += length
        if pos != len(data):
            raise CheckpointError(f"{what}: lengths do not add up to its {len(data)} stored bytes")
        packed = b"".join(n.to_bytes(4 if n <= 0xFFFFFFFF else 8, "little") for n in lengths)
        return out.reshape(entry.shape), packed + length_checksum + b"".join(out.tolist())
