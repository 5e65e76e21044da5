"""Tests of polyak.formats.safetensors, checked both ways against the safetensors package."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from polyak.errors import ArgumentError, CheckpointError, OutputError
from polyak.formats import (
    FORMATS,
    format_for_output,
    format_from_name,
    format_of,
    open_checkpoint,
)
from polyak.formats.base import PlannedTensors, StreamedTensor, TensorInfo
from polyak.formats.safetensors import (
    INDEX_NAME,
    SafetensorsReader,
    ShardedParts,
    ShardedSafetensorsReader,
    append_file,
    parse_size,
    plan_shards,
    shard_names,
    write_safetensors,
    write_sharded_safetensors,
)

FORMAT = {fmt.name: fmt for fmt in FORMATS}


def sample_tensors() -> dict[str, np.ndarray]:
    """One tensor of each kind the brief names, with values that are not all alike."""
    rng = np.random.default_rng(0)
    return {
        "dense.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "dense.bias": rng.standard_normal(4).astype(np.float16),
        "embed": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "double": rng.standard_normal((2, 2, 2)),
        "steps": np.array([1, -2, 3_000_000_000_000], dtype=np.int64),
        "small": np.array([-7, 8], dtype=np.int8),
        "counts": np.array([1, 65535], dtype=np.uint16),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.25, dtype=np.float32),
        "int_scalar": np.array(42, dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float32),
    }


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, same shape, same bits."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(
        np.ascontiguousarray(actual).view(np.uint8), np.ascontiguousarray(expected).view(np.uint8)
    )


def raw_file(path: Path, header: object, data: bytes = b"", *, pad: bool = True) -> Path:
    """Write a safetensors file by hand: 8-byte little-endian length, JSON header, data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def in_message(path: Path) -> str:
    return re.escape(f"checkpoint {path}")


# ---------------------------------------------------------------- reading files from safetensors


def test_reads_what_safetensors_writes(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    with SafetensorsReader(path) as reader:
        assert reader.format == "safetensors"
        assert sorted(reader.names()) == sorted(tensors)
        for name, expected in tensors.items():
            info = reader.info(name)
            assert info == TensorInfo(expected.shape, expected.dtype.name)
            assert_same(reader.read(name), expected)
        assert reader.metadata == {}


def test_info_names_canonical_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), path)
    with SafetensorsReader(path) as reader:
        assert reader.info("embed") == TensorInfo((2, 3), "bfloat16")
        assert reader.info("dense.bias") == TensorInfo((4,), "float16")
        assert reader.info("double") == TensorInfo((2, 2, 2), "float64")
        assert reader.info("steps") == TensorInfo((3,), "int64")
        assert reader.info("mask") == TensorInfo((2, 2), "bool")
        assert reader.info("scalar") == TensorInfo((), "float32")
        assert reader.info("empty") == TensorInfo((0,), "float32")
        assert reader.info("dense.weight").nbytes == 3 * 4 * 4


def test_reads_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path, metadata={"format": "pt", "note": "x"})
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"format": "pt", "note": "x"}


def test_reads_are_zero_copy_read_only_views(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), path)
    with SafetensorsReader(path) as reader:
        first = reader.read("dense.weight")
        second = reader.read("dense.weight")
        assert first.flags.writeable is False
        assert first.flags.owndata is False
        assert np.shares_memory(first, second)
        with pytest.raises(ValueError, match="read-only"):
            first[0, 0] = 1.0
        assert reader.read("scalar").flags.writeable is False


def test_empty_tensor_at_the_very_end_of_the_data(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [("a", np.arange(3, dtype=np.float32)), ("z", np.zeros((0, 5)))])
    with SafetensorsReader(path) as reader:
        assert reader.read("z").shape == (0, 5)
        assert reader.read("z").dtype == np.float64
    assert load_file(path)["z"].shape == (0, 5)


def test_a_file_with_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    write_safetensors(path, [])
    with SafetensorsReader(path) as reader:
        assert reader.names() == []
    assert load_file(path) == {}


def test_unknown_tensor_name(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path)
    with SafetensorsReader(path) as reader:
        with pytest.raises(CheckpointError, match=rf"{in_message(path)}: no tensor named b"):
            reader.info("b")
        with pytest.raises(CheckpointError, match="no tensor named b"):
            reader.read("b")


def test_read_after_close(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(2, np.float32)}, path)
    reader = SafetensorsReader(path)
    kept = reader.read("a")
    reader.close()  # a view is still alive; closing must not crash
    np.testing.assert_array_equal(kept, [1.0, 1.0])
    with pytest.raises(CheckpointError, match="the reader is closed"):
        reader.read("a")
    reader.close()  # twice is fine


def test_items_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [("b", np.ones(1)), ("a", np.zeros(1))])
    with SafetensorsReader(path) as reader:
        assert reader.names() == ["b", "a"]
        assert [name for name, _ in reader.items()] == ["b", "a"]


# ---------------------------------------------------------------- writing files for safetensors


def test_safetensors_reads_what_polyak_writes(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "out.safetensors"
    write_safetensors(path, tensors.items())
    loaded = load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, expected in tensors.items():
        assert_same(loaded[name], expected)
    with safe_open(path, framework="np") as handle:
        assert handle.metadata() == {"polyak": "average"}  # polyak's mark alone


def test_round_trip_through_polyak_both_ways(tmp_path: Path) -> None:
    tensors = sample_tensors()
    first = tmp_path / "first.safetensors"
    second = tmp_path / "second.safetensors"
    save_file(tensors, first, metadata={"format": "pt"})
    with SafetensorsReader(first) as reader:
        write_safetensors(second, reader.items(), reader)
    with safe_open(second, framework="np") as handle:
        assert handle.metadata() == {"format": "pt", "polyak": "average"}
        for name, expected in tensors.items():
            assert_same(handle.get_tensor(name), expected)


def test_metadata_dropped_when_template_has_none_or_it_is_not_strings(tmp_path: Path) -> None:
    template = SimpleNamespace(metadata={"total_size": 12})  # a sharded index's metadata
    path = tmp_path / "out.safetensors"
    write_safetensors(path, [("a", np.ones(2, np.float32))], template)
    with safe_open(path, framework="np") as handle:
        assert handle.metadata() == {"polyak": "average"}


def test_writer_converts_byte_order_and_layout(tmp_path: Path) -> None:
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    transposed = np.arange(12, dtype=np.float64).reshape(3, 4).T
    path = tmp_path / "out.safetensors"
    write_safetensors(path, [("big", big_endian), ("t", transposed)])
    loaded = load_file(path)
    np.testing.assert_array_equal(loaded["big"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["big"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(loaded["t"], transposed)


def test_writer_streams_planned_tensors(tmp_path: Path) -> None:
    infos = [("a", TensorInfo((2,), "float32")), ("b", TensorInfo((), "int64"))]

    def arrays():
        yield "a", np.array([1.5, 2.5], dtype=np.float32)
        yield "b", np.array(7, dtype=np.int64)

    path = tmp_path / "out.safetensors"
    write_safetensors(path, PlannedTensors(infos, arrays()))
    loaded = load_file(path)
    np.testing.assert_array_equal(loaded["a"], [1.5, 2.5])
    assert loaded["b"] == 7


def test_writer_refuses_an_array_that_is_not_the_planned_one(tmp_path: Path) -> None:
    infos = [("a", TensorInfo((2,), "float32"))]
    with pytest.raises(ValueError, match="tensor b: does not match the planned a"):
        write_safetensors(tmp_path / "x.safetensors", PlannedTensors(infos, [("b", np.ones(2))]))


@settings(max_examples=30, deadline=None)
@given(name_length=st.integers(min_value=1, max_value=40), with_metadata=st.booleans())
def test_writer_pads_the_header_to_eight_bytes(
    tmp_path_factory: pytest.TempPathFactory, name_length: int, with_metadata: bool
) -> None:
    path = tmp_path_factory.mktemp("pad") / "out.safetensors"

    template = SimpleNamespace(metadata={"format": "pt"} if with_metadata else {})
    write_safetensors(path, [("x" * name_length, np.arange(3, dtype=np.float16))], template)
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert header_length % 8 == 0
    header = raw[8 : 8 + header_length]
    assert json.loads(header) == json.loads(header.rstrip(b" "))
    assert len(raw) == 8 + header_length + 3 * 2
    np.testing.assert_array_equal(load_file(path)["x" * name_length], [0, 1, 2])


# ---------------------------------------------------------------- header checks


def test_file_too_small(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=rf"{in_message(path)}: 3 bytes is too small"):
        SafetensorsReader(path)


def test_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "truncated.safetensors"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        CheckpointError, match=rf"{in_message(path)}: safetensors header length 1000 is larger"
    ):
        SafetensorsReader(path)


def test_absurd_header_length(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="the file is truncated or not safetensors"):
        SafetensorsReader(path)


def test_header_not_json(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", b"{not json")
    with pytest.raises(
        CheckpointError, match=rf"{in_message(path)}: safetensors header is invalid"
    ):
        SafetensorsReader(path)


def test_header_not_utf8(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", b'{"\xff": 1}')
    with pytest.raises(
        CheckpointError, match=rf"{in_message(path)}: safetensors header is not UTF-8"
    ):
        SafetensorsReader(path)


@pytest.mark.parametrize("header", [[], "text", 3, None])
def test_header_not_an_object(tmp_path: Path, header: object) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"{in_message(path)}: .*not a JSON object"):
        SafetensorsReader(path)


def test_entry_not_an_object(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"a": [1, 2]})
    with pytest.raises(CheckpointError, match=rf"{in_message(path)}: tensor a: header entry"):
        SafetensorsReader(path)


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"__metadata__": {"n": 1}})
    with pytest.raises(CheckpointError, match="__metadata__ must map strings to strings"):
        SafetensorsReader(path)


@pytest.mark.parametrize("code", ["F8_E4M3", "C64", "float32", None])
def test_unknown_dtype(tmp_path: Path, code: object) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"a": entry(code, [1], 0, 4)}, b"\0" * 4)
    with pytest.raises(
        CheckpointError,
        match=rf"{in_message(path)}: tensor a: dtype .* is not supported \(known: F64",
    ):
        SafetensorsReader(path)


@pytest.mark.parametrize("shape", [[-1], [2.0], [True], "2", [None], None])
def test_bad_shape(tmp_path: Path, shape: object) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"a": entry("F32", shape, 0, 8)}, b"\0" * 8)
    with pytest.raises(
        CheckpointError, match=rf"{in_message(path)}: tensor a: shape .* is not a list of integers"
    ):
        SafetensorsReader(path)


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], "0,4", None])
def test_bad_offsets_form(tmp_path: Path, offsets: object) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"tensor a: data_offsets .* is not \[begin, end\]"):
        SafetensorsReader(path)


@pytest.mark.parametrize(("begin", "end"), [(0, 16), (-4, 4), (8, 4), (4, 12)])
def test_offsets_out_of_range(tmp_path: Path, begin: int, end: int) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"a": entry("F32", [2], begin, end)}, b"\0" * 8)
    with pytest.raises(
        CheckpointError,
        match=rf"{in_message(path)}: tensor a: data_offsets \[{begin}, {end}\] fall outside "
        r"the 8 bytes of data",
    ):
        SafetensorsReader(path)


def test_size_not_matching_shape(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"a": entry("F32", [3], 0, 8)}, b"\0" * 8)
    with pytest.raises(
        CheckpointError,
        match=rf"{in_message(path)}: tensor a: shape \(3,\) of float32 needs 12 bytes; "
        r"data_offsets give 8",
    ):
        SafetensorsReader(path)


def test_overlapping_offsets(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match=rf"{in_message(path)}: tensors a and b overlap"):
        SafetensorsReader(path)


def test_two_tensors_on_the_same_bytes(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("I32", [2], 0, 8)}
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="overlap in the data"):
        SafetensorsReader(path)


def test_empty_tensors_may_share_an_offset(tmp_path: Path) -> None:
    header = {
        "a": entry("F32", [0], 4, 4),
        "b": entry("F32", [1], 0, 4),
        "c": entry("F32", [0], 4, 4),
    }
    path = raw_file(tmp_path / "ok.safetensors", header, b"\0" * 4)
    with SafetensorsReader(path) as reader:
        assert reader.read("a").shape == (0,)
        assert reader.read("b").tolist() == [0.0]


def test_duplicate_names(tmp_path: Path) -> None:
    text = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    path = raw_file(tmp_path / "bad.safetensors", text, b"\0" * 8)
    with pytest.raises(CheckpointError, match=rf"{in_message(path)}: .*duplicate tensor name 'a'"):
        SafetensorsReader(path)


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be read"):
        SafetensorsReader(tmp_path / "missing.safetensors")


def test_hand_written_valid_file_agrees_with_safetensors(tmp_path: Path) -> None:
    data = np.array([1.0, 2.0], dtype="<f4").tobytes() + np.array([5], dtype="<i8").tobytes()
    header = {
        "__metadata__": {"k": "v"},
        "w": entry("F32", [2], 0, 8),
        "n": entry("I64", [], 8, 16),
    }
    path = raw_file(tmp_path / "hand.safetensors", header, data)
    with SafetensorsReader(path) as reader:
        np.testing.assert_array_equal(reader.read("w"), [1.0, 2.0])
        assert reader.read("n").shape == ()
        assert int(reader.read("n")) == 5
        assert reader.metadata == {"k": "v"}
    reference = load_file(path)
    np.testing.assert_array_equal(reference["w"], [1.0, 2.0])


# ---------------------------------------------------------------- sharded checkpoints


def write_sharded(directory: Path, *, weight_map: dict | None = None) -> dict[str, np.ndarray]:
    """Two shards written by safetensors' save_file, and their index."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    first = {
        "layer.0.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(3).astype(np.float32),
    }
    second = {
        "layer.1.weight": rng.standard_normal((3, 2)).astype(ml_dtypes.bfloat16),
        "step": np.array(9, dtype=np.int64),
    }
    save_file(first, directory / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, directory / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
        weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    index = {"metadata": {"total_size": 12}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return first | second


def test_sharded_reader(tmp_path: Path) -> None:
    tensors = write_sharded(tmp_path / "checkpoint-500")
    index = tmp_path / "checkpoint-500" / "model.safetensors.index.json"
    with ShardedSafetensorsReader(index) as reader:
        assert reader.format == "sharded-safetensors"
        assert sorted(reader.names()) == sorted(tensors)
        assert reader.metadata == {"total_size": 12}
        assert reader.shard_files == [
            index.parent / "model-00001-of-00002.safetensors",
            index.parent / "model-00002-of-00002.safetensors",
        ]
        assert reader.shard_of("step").name == "model-00002-of-00002.safetensors"
        for name, expected in tensors.items():
            assert reader.info(name) == TensorInfo(expected.shape, expected.dtype.name)
            array = reader.read(name)
            assert_same(array, expected)
            assert array.flags.writeable is False
        with pytest.raises(CheckpointError, match="no tensor named missing"):
            reader.read("missing")


def test_open_checkpoint_on_a_sharded_directory(tmp_path: Path) -> None:
    tensors = write_sharded(tmp_path / "checkpoint-500")
    with open_checkpoint(tmp_path / "checkpoint-500") as reader:
        assert isinstance(reader, ShardedSafetensorsReader)
        assert_same(reader.read("layer.1.weight"), tensors["layer.1.weight"])
    assert format_of(tmp_path / "checkpoint-500").name == "sharded-safetensors"


def test_sharded_output_keeps_no_non_string_index_metadata(tmp_path: Path) -> None:
    tensors = write_sharded(tmp_path / "checkpoint-500")
    out = tmp_path / "merged.safetensors"
    with open_checkpoint(tmp_path / "checkpoint-500") as reader:
        write_safetensors(out, reader.items(), reader)
    loaded = load_file(out)
    for name, expected in tensors.items():
        assert_same(loaded[name], expected)


def test_missing_shard(tmp_path: Path) -> None:
    write_sharded(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    with pytest.raises(
        CheckpointError,
        match=rf"{in_message(index)}: shard model-00002-of-00002\.safetensors named in the "
        "index is missing",
    ):
        ShardedSafetensorsReader(index)


@pytest.mark.parametrize(
    "shard", ["../x.safetensors", "sub/x.safetensors", "./x.safetensors", "..", "", 3]
)
def test_shard_outside_the_directory_refused(tmp_path: Path, shard: object) -> None:
    # Real shard files wherever the name points, so only the name rule can refuse them.
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for place in (tmp_path, tmp_path / "ckpt", tmp_path / "ckpt" / "sub"):
        save_file({"a": np.ones(1, np.float32)}, place / "x.safetensors")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(
        CheckpointError, match=r"tensor a points to shard .*; shards must be plain file names"
    ):
        ShardedSafetensorsReader(index)


def test_index_not_json(tmp_path: Path) -> None:
    write_sharded(tmp_path / "ckpt")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text("{weight_map")
    with pytest.raises(
        CheckpointError, match=rf"{in_message(index)}: the shard index cannot be read as JSON"
    ):
        ShardedSafetensorsReader(index)


@pytest.mark.parametrize(
    "content", [[], {"weight_map": {}}, {"weight_map": ["a"]}, {"metadata": {}}]
)
def test_index_without_weight_map(tmp_path: Path, content: object) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="the shard index has no 'weight_map'"):
        ShardedSafetensorsReader(index)


def test_tensor_in_a_shard_not_in_the_index(tmp_path: Path) -> None:
    weight_map = {
        "layer.0.weight": "model-00001-of-00002.safetensors",
        "layer.0.bias": "model-00001-of-00002.safetensors",
        "layer.1.weight": "model-00002-of-00002.safetensors",
    }  # "step" is in shard 2 but not listed
    write_sharded(tmp_path / "ckpt", weight_map=weight_map)
    with pytest.raises(
        CheckpointError,
        match=r"tensor step is in shard model-00002-of-00002\.safetensors but the index does "
        "not map it there",
    ):
        ShardedSafetensorsReader(tmp_path / "ckpt" / "model.safetensors.index.json")


def test_tensor_in_the_index_not_in_its_shard(tmp_path: Path) -> None:
    weight_map = {
        "layer.0.weight": "model-00001-of-00002.safetensors",
        "layer.0.bias": "model-00001-of-00002.safetensors",
        "layer.1.weight": "model-00002-of-00002.safetensors",
        "step": "model-00002-of-00002.safetensors",
        "ghost": "model-00001-of-00002.safetensors",
    }
    write_sharded(tmp_path / "ckpt", weight_map=weight_map)
    with pytest.raises(
        CheckpointError,
        match=r"tensor ghost is in the index but not in shard model-00001-of-00002\.safetensors",
    ):
        ShardedSafetensorsReader(tmp_path / "ckpt" / "model.safetensors.index.json")


def test_tensor_mapped_to_the_wrong_shard(tmp_path: Path) -> None:
    weight_map = {
        "layer.0.weight": "model-00002-of-00002.safetensors",
        "layer.0.bias": "model-00001-of-00002.safetensors",
        "layer.1.weight": "model-00002-of-00002.safetensors",
        "step": "model-00002-of-00002.safetensors",
    }
    write_sharded(tmp_path / "ckpt", weight_map=weight_map)
    with pytest.raises(CheckpointError, match="tensor layer.0.weight is in shard model-00001"):
        ShardedSafetensorsReader(tmp_path / "ckpt" / "model.safetensors.index.json")


# ---------------------------------------------------------------- open_checkpoint and formats


def test_open_checkpoint_on_a_file_and_a_directory(tmp_path: Path) -> None:
    save_file({"a": np.arange(3, dtype=np.float32)}, tmp_path / "single.safetensors")
    (tmp_path / "checkpoint-7").mkdir()
    save_file(
        {"a": np.arange(3, dtype=np.float32)}, tmp_path / "checkpoint-7" / "model.safetensors"
    )
    for path in (tmp_path / "single.safetensors", tmp_path / "checkpoint-7"):
        with open_checkpoint(path) as reader:
            assert isinstance(reader, SafetensorsReader)
            np.testing.assert_array_equal(reader.read("a"), [0, 1, 2])


def test_open_checkpoint_refusals(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=rf"{in_message(missing)}: no such file"):
        open_checkpoint(missing)
    empty = tmp_path / "checkpoint-1"
    empty.mkdir()
    (empty / "optimizer.pt").touch()
    with pytest.raises(
        CheckpointError, match=rf"{in_message(empty)}: the directory holds no model file"
    ):
        open_checkpoint(empty)
    path = tmp_path / "a.safetensors"
    save_file({"a": np.ones(1, np.float32)}, path)
    with pytest.raises(CheckpointError, match=r"option\(s\) \['key'\] do not apply to safetensors"):
        open_checkpoint(path, key="state_dict")
    with open_checkpoint(path, key=None) as reader:  # None options are dropped
        assert reader.names() == ["a"]
    unknown = tmp_path / "model.onnx"
    unknown.touch()
    with pytest.raises(CheckpointError, match=r"unknown format of 'model\.onnx'\. Known suffixes"):
        open_checkpoint(unknown)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.safetensors", "safetensors"),
        ("MODEL.SAFETENSORS", "safetensors"),
        ("model.safetensors.index.json", "sharded-safetensors"),
        ("weights.npz", "npz"),
        ("model_3.pt", "torch"),
        ("model.pth", "torch"),
        ("pytorch_model.bin", "torch"),
        ("epoch=3-step=1200.ckpt", "torch"),
        ("model_499.weights.h5", "keras-weights"),
        ("model_499.h5", "keras-h5"),
        ("model_499.hdf5", "keras-h5"),
        ("model.keras", "keras"),
    ],
)
def test_format_from_the_suffix(name: str, expected: str) -> None:
    assert format_from_name(name).name == expected
    assert format_of(name).name == expected


def test_unknown_suffix(tmp_path: Path) -> None:
    assert format_from_name("model.onnx") is None
    assert format_from_name("model.json") is None
    with pytest.raises(CheckpointError, match=r"checkpoint model\.onnx: unknown format"):
        format_of("model.onnx")


def test_format_of_directories(tmp_path: Path) -> None:
    for name, expected in [
        ("model.safetensors", "safetensors"),
        ("pytorch_model.bin", "torch"),
        ("model.safetensors.index.json", "sharded-safetensors"),
    ]:
        directory = tmp_path / expected
        directory.mkdir()
        (directory / name).touch()
        assert format_of(directory).name == expected


@pytest.mark.parametrize("input_name", ["safetensors", "npz", "torch", "keras-h5", "keras"])
@pytest.mark.parametrize(
    ("output", "expected"),
    [("avg.safetensors", "safetensors"), ("avg.npz", "npz"), ("avg.pt", "torch")],
)
def test_any_format_converts_to_safetensors_npz_torch(input_name, output, expected) -> None:
    assert format_for_output(output, FORMAT[input_name]).name == expected


@pytest.mark.parametrize("name", ["keras-weights", "keras", "keras-h5"])
def test_keras_output_from_the_same_keras_format(name: str) -> None:
    output = {"keras-weights": "avg.weights.h5", "keras": "avg.keras", "keras-h5": "avg.h5"}[name]
    assert format_for_output(output, FORMAT[name]).name == name


def test_weights_h5_output_is_keras_weights_not_legacy_h5() -> None:
    assert format_for_output("avg.weights.h5", FORMAT["keras-weights"]).name == "keras-weights"
    with pytest.raises(OutputError, match="a keras-weights file can only be written from keras-"):
        format_for_output("avg.weights.h5", FORMAT["keras-h5"])


@pytest.mark.parametrize("output", ["avg.keras", "avg.h5", "avg.weights.h5"])
def test_keras_output_from_safetensors_refused(output: str) -> None:
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(output)}: a keras.* file can only be written from .*"
        r"the inputs are safetensors\. Write \.safetensors, \.npz or \.pt instead",
    ):
        format_for_output(output, FORMAT["safetensors"])


def test_unknown_output_suffix_refused() -> None:
    with pytest.raises(OutputError, match=r"output avg\.onnx: unknown suffix\. Use one of: "):
        format_for_output("avg.onnx", FORMAT["safetensors"])
    assert issubclass(OutputError, OSError)


def test_index_json_output_is_refused_naming_the_directory_to_give(tmp_path: Path) -> None:
    out = tmp_path / "avg" / "model.safetensors.index.json"
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: a shard index is not a checkpoint file of its "
        rf"own\. Give the directory to write the shards and the index into instead: "
        rf"{re.escape(str(out.parent))}/",
    ):
        format_for_output(out, FORMAT["safetensors"])


@pytest.mark.parametrize("output", ["averaged/", "averaged", "runs/avg.v1/", "runs/averaged"])
@pytest.mark.parametrize("input_name", ["safetensors", "sharded-safetensors", "torch", "keras"])
def test_directory_output_is_a_safetensors_checkpoint_directory(output, input_name) -> None:
    assert format_for_output(output, FORMAT[input_name]).name == "sharded-safetensors"


def test_unknown_suffix_mentions_directories() -> None:
    with pytest.raises(OutputError, match=r"or a directory \(a path ending with / or without"):
        format_for_output("avg.v1", FORMAT["safetensors"])


# ---------------------------------------------------------------- writing checkpoint directories


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500MB", 500_000_000),
        ("2GB", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("1.5GiB", 3 * 2**29),
        ("1.5 GiB", 3 * 2**29),
        ("10KiB", 10_240),
        ("1TB", 10**12),
        ("0.5KB", 500),
        ("4096", 4096),
        ("4096B", 4096),
        (" 7 ", 7),
        (4096, 4096),
        ("1.0000001KB", 1000),  # fractions of a byte are dropped
    ],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "5 parsecs", "-1GB", "0", "0MB", "1.5", "1.5B", "1e9", "2 G B", 0, -5, True]
)
def test_parse_size_refuses_what_is_not_a_size(text) -> None:
    with pytest.raises(
        ArgumentError,
        match=rf"max_shard_size must be a size above 0 such as 500MB, 2GB, 1\.5GiB or a whole "
        rf"number of bytes; received {re.escape(repr(text))}\.",
    ):
        parse_size(text)


def infos_of(sizes: list[int]) -> list[tuple[str, TensorInfo]]:
    """Planned uint8 tensors of the given byte sizes, named t0, t1, ..."""
    return [(f"t{i}", TensorInfo((size,), "uint8")) for i, size in enumerate(sizes)]


def grouped(shards) -> list[list[str]]:
    return [[name for name, _ in shard] for shard in shards]


def test_plan_shards_by_size_keeps_order_and_isolates_large_tensors() -> None:
    infos = infos_of([400, 400, 300, 50, 2000, 10, 1000, 0, 1])
    assert grouped(plan_shards(infos, 1000)) == [
        ["t0", "t1"],  # 800; t2 would make 1100
        ["t2", "t3"],  # 350; t4 alone is over the limit
        ["t4"],
        ["t5"],  # 10; t6 would make 1010
        ["t6", "t7"],  # exactly the limit, and an empty tensor adds nothing
        ["t8"],
    ]
    assert grouped(plan_shards(infos, 10**9)) == [[name for name, _ in infos]]
    assert grouped(plan_shards(infos, 1)) == [
        ["t0"],
        ["t1"],
        ["t2"],
        ["t3"],
        ["t4"],
        ["t5"],
        ["t6"],
        ["t7", "t8"],
    ]


def test_plan_shards_by_key_and_unsplit() -> None:
    infos = infos_of([1, 1, 1, 1])
    key = {"t0": "a", "t1": "a", "t2": "b", "t3": "a"}.get
    assert grouped(plan_shards(infos, None, key)) == [["t0", "t1"], ["t2"], ["t3"]]
    assert grouped(plan_shards(infos)) == [["t0", "t1", "t2", "t3"]]


def test_shard_names_follow_hugging_face() -> None:
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


class OneAtATime:
    """Yields copies of planned tensors through one reused buffer, as the engine does."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def planned(self) -> PlannedTensors:
        infos = PlannedTensors.from_arrays(self.tensors.items()).infos
        largest = max(array.nbytes for array in self.tensors.values())
        buffer = np.empty(largest, np.uint8)

        def generate():
            for name, array in self.tensors.items():
                view = buffer[: array.nbytes].view(array.dtype).reshape(array.shape)
                view[...] = array
                yield name, view
                buffer[:] = 0xFF  # anything kept past the next request would now be garbage

        return PlannedTensors(infos, generate())


def test_sharded_writer_streams_shards_and_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    source = OneAtATime(tensors)
    files = write_sharded_safetensors(tmp_path, source.planned(), None, max_shard_size=40)
    assert files[-1] == INDEX_NAME and all(f.startswith("model-0000") for f in files[:-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {
        "total_size": sum(a.nbytes for a in tensors.values()),
        "polyak": "average",
    }
    assert list(index["weight_map"]) == list(tensors)  # in output order
    assert set(index["weight_map"].values()) == set(files[:-1])
    for shard in files[:-1]:
        data = (tmp_path / shard).read_bytes()
        assert int.from_bytes(data[:8], "little") % 8 == 0
        loaded = load_file(tmp_path / shard)  # the safetensors package reads each shard
        assert sorted(loaded) == sorted(n for n, f in index["weight_map"].items() if f == shard)
        payload = sum(array.nbytes for array in loaded.values())
        assert payload <= 40 or len(loaded) == 1
        for name, array in loaded.items():
            assert_same(array, tensors[name])
    with ShardedSafetensorsReader(tmp_path / INDEX_NAME) as reader:
        assert reader.names() == list(tensors)
        for name, expected in tensors.items():
            assert_same(reader.read(name), expected)


def test_sharded_writer_one_shard_is_model_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    files = write_sharded_safetensors(tmp_path, tensors.items(), None, max_shard_size="1GB")
    assert files == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    for name, expected in tensors.items():
        assert_same(loaded[name], expected)


def test_sharded_writer_copies_the_templates_layout_and_metadata(tmp_path: Path) -> None:
    tensors = write_sharded(tmp_path / "checkpoint-500")
    out = tmp_path / "out"
    out.mkdir()
    with open_checkpoint(tmp_path / "checkpoint-500") as template:
        assert template.shard_metadata == {"format": "pt"}
        files = write_sharded_safetensors(out, template.items(), template)
        layout = {name: template.shard_of(name).name for name in template.names()}
    assert files == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        INDEX_NAME,
    ]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == layout
    for shard in files[:-1]:
        with safe_open(out / shard, framework="numpy") as opened:
            assert opened.metadata() == {"format": "pt", "polyak": "average"}
    with open_checkpoint(out) as reader:
        for name, expected in tensors.items():
            assert_same(reader.read(name), expected)
    # A size limit replaces the template's layout.
    again = tmp_path / "again"
    again.mkdir()
    with open_checkpoint(tmp_path / "checkpoint-500") as template:
        assert write_sharded_safetensors(again, template.items(), template, max_shard_size=1) == [
            *shard_names(4),
            INDEX_NAME,
        ]


def test_single_file_from_a_sharded_template_keeps_the_shards_metadata(tmp_path: Path) -> None:
    write_sharded(tmp_path / "checkpoint-500")
    with open_checkpoint(tmp_path / "checkpoint-500") as template:
        write_safetensors(tmp_path / "one.safetensors", template.items(), template)
    with safe_open(tmp_path / "one.safetensors", framework="numpy") as opened:
        assert opened.metadata() == {"format": "pt", "polyak": "average"}


def test_sharded_writer_refuses_tensors_that_differ_from_the_plan(tmp_path: Path) -> None:
    infos = [("a", TensorInfo((2,), "float32")), ("b", TensorInfo((2,), "float32"))]
    two = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="tensor b: was planned but never given"):
        write_sharded_safetensors(tmp_path, PlannedTensors(infos, [("a", two)]), None)
    with pytest.raises(ValueError, match="tensor c: was given but not planned"):
        write_sharded_safetensors(
            tmp_path, PlannedTensors(infos, [("a", two), ("b", two), ("c", two)]), None
        )
    with pytest.raises(ValueError, match="tensor x: does not match the planned a"):
        write_sharded_safetensors(tmp_path, PlannedTensors(infos, [("x", two)]), None)


def parts_tensors() -> dict[str, np.ndarray]:
    """Tensors of uneven sizes, an empty one and an integer one among them."""
    rng = np.random.default_rng(7)
    sizes = [300, 7, 0, 1000, 64, 513, 2, 800, 90, 45]
    tensors = {f"t{i}": rng.normal(size=n).astype(np.float32) for i, n in enumerate(sizes)}
    tensors["steps"] = np.array([3, 4], np.int64)
    tensors["half"] = rng.normal(size=(20, 33)).astype(np.float16)
    return tensors


def streamed(tensors: dict[str, np.ndarray], computed: list[str]) -> PlannedTensors:
    """``tensors`` as the engine gives them: lazy, each one's chunks computed only when
    a writer asks; ``computed`` records which were."""

    def chunks(name: str, array: np.ndarray):
        computed.append(name)
        flat = array.reshape(-1)
        for start in range(0, max(flat.size, 1), 128):
            yield flat[start : start + 128].copy()

    infos = PlannedTensors.from_arrays(tensors.items()).infos
    pairs = (
        (name, StreamedTensor(info, lambda n=name, a=tensors[name]: chunks(n, a)))
        for name, info in infos
    )
    return PlannedTensors(infos, pairs)


@pytest.mark.parametrize("processes", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("max_shard_size", [None, 40, 1500, "1GB"])
def test_processes_writing_their_parts_give_the_one_process_files(
    tmp_path: Path, processes, max_shard_size
) -> None:
    """The steps of a torchrun write, taken here process after process; each process
    computes its run of tensors alone, and the files are the one-process files."""
    tensors = parts_tensors()
    one, together = tmp_path / "one", tmp_path / "together"
    one.mkdir()
    together.mkdir()
    files = write_sharded_safetensors(one, tensors.items(), None, max_shard_size=max_shard_size)
    infos = PlannedTensors.from_arrays(tensors.items()).infos
    plans = [
        ShardedParts(infos, None, max_shard_size=max_shard_size, processes=processes)
        for _ in range(processes)
    ]  # every process plans alike
    runs = []
    for process, parts in enumerate(plans):
        computed: list[str] = []
        parts.write(together, streamed(tensors, computed), process)
        assert computed == parts.tensors_of(process)  # never another process's tensor
        runs.append(computed)
    assert [name for run in runs for name in run] == list(tensors)  # contiguous runs, in order
    sizes = [sum(tensors[name].nbytes for name in run) for run in runs]
    largest = max(array.nbytes for array in tensors.values())
    total = sum(sizes)
    assert max(sizes) <= total / processes + largest  # about equal bytes
    for process, parts in enumerate(plans):
        parts.assemble(together, process)
    plans[0].write_index(together)
    assert plans[0].files == files
    assert sorted(p.name for p in together.iterdir()) == sorted(files)  # no piece left
    for name in files:
        assert (together / name).read_bytes() == (one / name).read_bytes(), name


def test_one_shard_between_two_processes_is_cut_and_put_together(tmp_path: Path) -> None:
    tensors = parts_tensors()
    infos = PlannedTensors.from_arrays(tensors.items()).infos
    parts = ShardedParts(infos, None, max_shard_size="1GB", processes=2)
    assert parts.files == ["model.safetensors"]
    assert [(piece.process, piece.file) for piece in parts.pieces] == [
        (0, "model.safetensors"),
        (1, "model.safetensors.from-1"),
    ]
    assert parts.tensors_of(0) and parts.tensors_of(1)


@pytest.mark.parametrize("kernel", [True, False])
def test_append_file_copies_in_pieces_of_bounded_size(tmp_path: Path, kernel, monkeypatch):
    monkeypatch.setattr("polyak.formats.safetensors._COPY_BYTES", 1000)
    data = np.random.default_rng(1).integers(0, 256, 4567, dtype=np.uint8).tobytes()
    (tmp_path / "piece").write_bytes(data)
    (tmp_path / "shard").write_bytes(b"head")
    with open(tmp_path / "shard", "r+b") as target:
        target.seek(0, 2)
        append_file(target, tmp_path / "piece", len(data), kernel=kernel)
        append_file(target, tmp_path / "piece", len(data), kernel=kernel)
    assert (tmp_path / "shard").read_bytes() == b"head" + data + data
    with open(tmp_path / "shard", "r+b") as target, pytest.raises(OSError, match="not 4568"):
        append_file(target, tmp_path / "piece", len(data) + 1, kernel=kernel)


@pytest.mark.parametrize(
    ("shape", "data", "message"),
    [
        ([1] * 65, b"\x00" * 4, "has 65 dimensions, more than 64"),
        ([2**100, 0], b"", "has shape (1267650600228229401496703205376, 0), larger than any file"),
    ],
)
def test_impossible_shapes_are_refused_from_the_header(tmp_path: Path, shape, data, message):
    """Before: "internal error" from numpy, which cannot describe such an array."""
    path = raw_file(
        tmp_path / "crafted.safetensors", {"w": entry("F32", shape, 0, len(data))}, data
    )
    with pytest.raises(CheckpointError, match=re.escape(f"tensor w: {message}")):
        with SafetensorsReader(path) as reader:
            reader.read("w")
