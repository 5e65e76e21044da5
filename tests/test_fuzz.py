"""Property-based fuzzing of the readers: on any input, only polyak's own errors escape.

Each property feeds a reader random or mutated input (random bytes, random JSON
headers, byte flips and truncations of real files, hostile zip member names, random
``.npy`` headers) and opens it, lists its tensors, reads each one's info and data.
Either that works, and what was read is consistent (the data has the declared shape),
or it raises a ``polyak.errors.PolyakError``: never a ``KeyError``, ``TypeError``,
``OSError``, an h5py or zipfile error, ``RecursionError`` or ``MemoryError``.

The default run is short and deterministic (``derandomize=True``);
``POLYAK_FUZZ_EXAMPLES=N`` sets the examples per property (``make fuzz`` runs 5000).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import struct
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from polyak.errors import PolyakError
from polyak.formats import open_checkpoint
from polyak.formats.safetensors import ShardedSafetensorsReader, parse_header

EXAMPLES = int(os.environ.get("POLYAK_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def exercise(path: Path) -> None:
    """Open a checkpoint and read everything in it; only PolyakError may escape."""
    try:
        with open_checkpoint(path) as reader:
            for name in reader.names():
                info = reader.info(name)
                array = np.asarray(reader.read(name))
                assert tuple(array.shape) == info.shape, name
    except PolyakError:
        pass


# -- the real files the mutations start from ----------------------------------------------


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.normal(size=(4, 2)).astype(np.float32),
        "0.bias": rng.normal(size=4).astype(np.float16),
        "1.weight": rng.normal(size=(3, 4)).astype(np.float64),
        "steps": np.array(7, dtype=np.int64),
    }


class Originals(dict):
    """Bytes by format, with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<originals of {', '.join(self)}>"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Originals:
    """The bytes of one real file per format."""
    directory = tmp_path_factory.mktemp("originals")
    save_file(tensors(), str(directory / "m.safetensors"), metadata={"format": "pt"})
    np.savez(directory / "m.npz", **tensors())
    np.savez_compressed(directory / "c.npz", **tensors())
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(4, name="dense"), keras.layers.Dense(3, name="head")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
    model.fit(np.zeros((8, 2)), np.zeros((8, 3)), epochs=1, verbose=0)
    model.save(directory / "m.keras")
    model.save(directory / "m.h5")
    model.save_weights(directory / "m.weights.h5")
    names = {
        "safetensors": "m.safetensors",
        "npz": "m.npz",
        "npz-compressed": "c.npz",
        "keras": "m.keras",
        "h5": "m.h5",
        "weights.h5": "m.weights.h5",
    }
    return Originals({fmt: (directory / name).read_bytes() for fmt, name in names.items()})


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory the examples write their file into (a fixture per example is too slow)."""
    return tmp_path_factory.mktemp("fuzz")


def written(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# -- mutations ---------------------------------------------------------------------------------


@st.composite
def mutated(draw, original: bytes, hot: int = 4096) -> bytes:
    """``original`` with a few bytes overwritten (mostly in its first ``hot`` bytes, where
    headers and metadata live), maybe a range deleted or inserted, maybe truncated."""
    data = bytearray(original)
    size = len(data)
    position = st.one_of(st.integers(0, min(hot, size) - 1), st.integers(0, size - 1))
    for where, value in draw(st.lists(st.tuples(position, st.integers(0, 255)), max_size=8)):
        data[where] = value
    for where, width in draw(st.lists(st.tuples(position, st.integers(1, 64)), max_size=2)):
        if draw(st.booleans()):
            del data[where : where + width]
        else:
            data[where:where] = draw(st.binary(min_size=width, max_size=width))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def mutations_of(fmt: str) -> Callable:
    return lambda originals: mutated(originals[fmt])


# -- safetensors: the header parser and the reader ---------------------------------------------

DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
OFFSET = st.one_of(st.integers(0, 256), st.integers(-(2**64), 2**64), JSON)


@st.composite
def header_entries(draw) -> dict:
    """Headers that look like safetensors headers: mostly well-formed, sometimes not."""
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | JSON
        )
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.text(max_size=10))
        entry = {
            "dtype": draw(st.sampled_from([*DTYPE_CODES, "BOOL", "F8_E4M3", "C64"]) | JSON),
            "shape": draw(st.lists(st.integers(-2, 6) | st.integers(0, 2**40), max_size=4) | JSON),
            "data_offsets": draw(st.lists(OFFSET, min_size=2, max_size=2) | JSON),
        }
        if draw(st.integers(0, 9)) == 0:
            entry = draw(JSON)
        header[name] = entry
    return header


@given(header=st.binary(max_size=512), data_size=st.integers(0, 2**40))
@FUZZ
def test_header_parser_on_random_bytes(header: bytes, data_size: int):
    try:
        parse_header(Path("fuzz.safetensors"), header, data_size)
    except PolyakError:
        pass


@given(header=header_entries() | JSON, data_size=st.integers(0, 512))
@example(header={"": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}, data_size=0)  # TypeError
@FUZZ
def test_header_parser_on_random_headers(header, data_size: int):
    encoded = json.dumps(header).encode()
    try:
        entries, metadata = parse_header(Path("fuzz.safetensors"), encoded, data_size)
    except PolyakError:
        return
    # Accepted: every tensor fits in the data, is exactly as long as its shape, and
    # tensors holding bytes do not overlap.
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items())
    spans = []
    for info, begin, end in entries.values():
        assert 0 <= begin <= end <= data_size
        assert end - begin == info.nbytes
        if info.nbytes:
            spans.append((begin, end))
    spans.sort()
    assert all(a_end <= b_begin for (_, a_end), (b_begin, _) in itertools.pairwise(spans))


@given(data=st.binary(max_size=1024))
@FUZZ
def test_safetensors_reader_on_random_files(data: bytes, scratch: Path):
    exercise(written(scratch, "random.safetensors", data))


@given(header=header_entries(), data=st.binary(max_size=256), pad=st.integers(0, 8))
@FUZZ
def test_safetensors_reader_on_random_headers(header, data: bytes, pad: int, scratch: Path):
    encoded = json.dumps(header).encode() + b" " * pad
    raw = struct.pack("<Q", len(encoded)) + encoded + data
    exercise(written(scratch, "header.safetensors", raw))


@given(data=st.data())
@FUZZ
def test_safetensors_reader_on_mutated_files(data, originals, scratch: Path):
    raw = data.draw(mutated(originals["safetensors"], hot=512))
    exercise(written(scratch, "mutated.safetensors", raw))


# -- the sharded index resolver -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """``base/checkpoint/`` with two real shards; a file beside the checkpoint and one
    in a subdirectory, which an index must never reach."""
    base = tmp_path_factory.mktemp("sharded")
    checkpoint = base / "checkpoint"
    (checkpoint / "sub").mkdir(parents=True)
    everything = tensors()
    save_file({"0.weight": everything["0.weight"]}, str(checkpoint / "a.safetensors"))
    save_file({"0.bias": everything["0.bias"]}, str(checkpoint / "b.safetensors"))
    save_file({"outside": everything["steps"]}, str(base / "outside.safetensors"))
    save_file({"inside": everything["steps"]}, str(checkpoint / "sub" / "c.safetensors"))
    return checkpoint


def shard_names(checkpoint: Path):
    hostile = [
        "a.safetensors",
        "b.safetensors",
        "missing.safetensors",
        "../outside.safetensors",
        str(checkpoint.parent / "outside.safetensors"),
        "sub/c.safetensors",
        "sub",
        ".",
        "..",
        "",
        "/",
        "a.safetensors\x00",
        "x" * 300,
        "./a.safetensors",
        "a.safetensors/",
        "~/a.safetensors",
    ]
    return st.sampled_from(hostile) | st.text(max_size=12) | JSON


@st.composite
def indices(draw, checkpoint: Path):
    tensor_names = st.sampled_from(["0.weight", "0.bias", "outside", "inside"]) | st.text(
        max_size=8
    )
    weight_map = draw(st.dictionaries(tensor_names, shard_names(checkpoint), max_size=5))
    index: object = {"metadata": draw(JSON), "weight_map": weight_map}
    if draw(st.integers(0, 7)) == 0:
        index = draw(JSON)
    return index


@given(data=st.data())
@FUZZ
def test_sharded_index_resolver(data, sharded: Path):
    index = data.draw(indices(sharded))
    path = sharded / "model.safetensors.index.json"
    path.write_text(json.dumps(index), encoding="utf-8")
    try:
        with ShardedSafetensorsReader(path) as reader:
            for shard in reader.shard_files:
                # Never a file outside the checkpoint's own directory.
                assert shard.parent == sharded and shard.resolve().parent == sharded.resolve()
            for name in reader.names():
                assert reader.read(name).shape == reader.info(name).shape
    except PolyakError:
        pass


@given(raw=st.binary(max_size=256))
@FUZZ
def test_sharded_index_resolver_on_random_bytes(raw: bytes, sharded: Path):
    path = sharded / "model.safetensors.index.json"
    path.write_bytes(raw)
    try:
        ShardedSafetensorsReader(path).close()
    except PolyakError:
        pass


# -- Keras: .weights.h5, legacy .h5 and .keras ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["weights.h5", "h5", "keras"])
@given(data=st.data())
@FUZZ
def test_keras_readers_on_mutated_files(fmt: str, data, originals, scratch: Path):
    raw = data.draw(mutated(originals[fmt]))
    exercise(written(scratch, f"mutated.{fmt}", raw))


MEMBER_NAMES = st.sampled_from(
    [
        "model.weights.h5",
        "config.json",
        "metadata.json",
        "../model.weights.h5",
        "/model.weights.h5",
        "assets/../../x",
        "C:/x",
        "a\\..\\..\\x",
        "assets/",
        "",
    ]
) | st.text(max_size=16)


@st.composite
def keras_zips(draw, original: bytes) -> bytes:
    """The real archive's members, some renamed, dropped, duplicated or recompressed, plus
    members with hostile names."""
    with zipfile.ZipFile(io.BytesIO(original)) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are on purpose
        for name, content in members:
            action = draw(st.sampled_from(["keep", "keep", "rename", "drop", "twice"]))
            if action == "drop":
                continue
            if action == "rename":
                name = draw(MEMBER_NAMES)
            compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            for _ in range(2 if action == "twice" else 1):
                archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), content, compression)
        for name in draw(st.lists(MEMBER_NAMES, max_size=3)):
            archive.writestr(
                zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), draw(st.binary(max_size=64))
            )
    return out.getvalue()


@given(data=st.data())
@FUZZ
def test_keras_archive_reader_on_rearranged_zips(data, originals, scratch: Path):
    raw = data.draw(keras_zips(originals["keras"]))
    before = set(scratch.iterdir())
    exercise(written(scratch, "rearranged.keras", raw))
    # Nothing extracted beside the archive (only its own file was added).
    assert set(scratch.iterdir()) <= before | {scratch / "rearranged.keras"}


# -- npz ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npz", "npz-compressed"])
@given(data=st.data())
@FUZZ
def test_npz_reader_on_mutated_archives(fmt: str, data, originals, scratch: Path):
    raw = data.draw(mutated(originals[fmt], hot=len(originals[fmt])))
    exercise(written(scratch, "mutated.npz", raw))


DESCRS = st.sampled_from(
    ["<f4", ">f4", "<f8", "<f2", "<i8", "|u1", "|b1", "<c8", "|O", "<U3", "|V8", "|S2", "<M8[s]"]
)


@st.composite
def npy_members(draw) -> bytes:
    """A ``.npy`` member with a random (often lying) header and random data."""
    shape = tuple(draw(st.lists(st.integers(-2, 5) | st.integers(0, 2**40), max_size=3)))
    header = {"descr": draw(DESCRS), "fortran_order": draw(st.booleans()), "shape": shape}
    buffer = io.BytesIO()
    if draw(st.integers(0, 5)) == 0:
        # A header numpy would not write: arbitrary text in place of the dict.
        text = draw(st.text(max_size=40)).encode("latin-1", "replace")
        buffer.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text)
    else:
        try:
            np.lib.format.write_array_header_1_0(buffer, header)
        except ValueError:
            buffer.write(b"\x93NUMPY\x01\x00")
    return buffer.getvalue() + draw(st.binary(max_size=96))


@given(members=st.lists(npy_members(), min_size=1, max_size=3), compressed=st.booleans())
@example(members=[b"\x93NUMPY\x01\x00\x01\x00["], compressed=False)  # tokenize.TokenError
@FUZZ
def test_npz_reader_on_random_npy_headers(members: list[bytes], compressed: bool, scratch: Path):
    path = scratch / "headers.npz"
    compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression) as archive:
        for number, member in enumerate(members):
            archive.writestr(f"t{number}.npy", member)
    exercise(path)
