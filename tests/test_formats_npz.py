"""Tests of polyak.formats.npz: archives written by numpy itself, in tmp_path."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from polyak.errors import CheckpointError, OutputError
from polyak.formats import open_checkpoint
from polyak.formats.base import TensorInfo
from polyak.formats.npz import NpzReader, write_npz


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "dense/kernel": rng.standard_normal((3, 4)).astype(np.float32),
        "dense/bias": rng.standard_normal(4).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "steps": np.array([1, -2, 3_000_000_000_000], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "int_scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    }


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


class RunsCode:
    """Unpickling it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_reads_what_numpy_writes(tmp_path: Path, save) -> None:
    tensors = sample_tensors()
    path = tmp_path / "weights.npz"
    save(path, **tensors)
    with NpzReader(path) as reader:
        assert reader.format == "npz"
        assert sorted(reader.names()) == sorted(tensors)
        for name, expected in tensors.items():
            assert reader.info(name) == TensorInfo(expected.shape, expected.dtype.name)
            assert_same(reader.read(name), expected)


def test_names_in_archive_order(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    np.savez(path, b=np.ones(1), a=np.zeros(1), c=np.ones(2))
    with NpzReader(path) as reader:
        assert reader.names() == ["b", "a", "c"]


def test_info_from_the_header_without_reading_data(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "weights.npz"
    np.savez(path, kernel=np.ones((5, 7), dtype=np.float16), flag=np.array(True))
    with NpzReader(path) as reader:

        def no_reading(*args, **kwargs):
            raise AssertionError("info must not read the array data")

        monkeypatch.setattr(np.lib.format, "read_array", no_reading)
        assert reader.info("kernel") == TensorInfo((5, 7), "float16")
        assert reader.info("flag") == TensorInfo((), "bool")
        assert reader.info("kernel").nbytes == 5 * 7 * 2


def test_write_npz_is_read_by_numpy(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "out.npz"
    write_npz(path, tensors.items())
    with np.load(path, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(tensors)
        for name, expected in tensors.items():
            assert_same(loaded[name], expected)


def test_write_npz_stores_members_uncompressed(tmp_path: Path) -> None:
    path = tmp_path / "out.npz"
    write_npz(path, [("a", np.ones(100, np.float32))])
    with zipfile.ZipFile(path) as archive:
        assert [info.compress_type for info in archive.infolist()] == [zipfile.ZIP_STORED]
        assert archive.namelist() == ["a.npy"]


def test_round_trip_through_polyak(tmp_path: Path) -> None:
    tensors = sample_tensors()
    first = tmp_path / "first.npz"
    second = tmp_path / "second.npz"
    np.savez_compressed(first, **tensors)
    with open_checkpoint(first) as reader:
        assert isinstance(reader, NpzReader)
        write_npz(second, reader.items(), reader)
    with NpzReader(second) as reader:
        for name, expected in tensors.items():
            assert_same(reader.read(name), expected)


def test_write_reads_each_array_once_in_order(tmp_path: Path) -> None:
    seen = []

    def tensors():
        for index in range(3):
            seen.append(index)
            yield f"t{index}", np.full(2, index, dtype=np.float32)

    path = tmp_path / "out.npz"
    write_npz(path, tensors())
    assert seen == [0, 1, 2]
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["t2"], [2.0, 2.0])


def test_object_arrays_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = RunsCode(marker)
    path = tmp_path / "evil.npz"
    np.savez(path, weights=np.ones(2), payload=payload)
    assert not marker.exists()
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint {re.escape(str(path))}: tensor payload: holds Python objects.*"
        r"allow_pickle=False",
    ):
        NpzReader(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="Python objects"):
        open_checkpoint(path)
    assert not marker.exists()
    # The trap is real: numpy itself, told to unpickle, does run it.
    with np.load(path, allow_pickle=True) as loaded:
        loaded["payload"]
    assert marker.exists()


def test_not_a_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(
        CheckpointError, match=rf"checkpoint {re.escape(str(path))}: cannot be read as a \.npz"
    ):
        NpzReader(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot be read as a \.npz archive"):
        NpzReader(tmp_path / "missing.npz")


def test_member_that_is_not_npy(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.npy", b"not an npy member")
    with pytest.raises(CheckpointError, match=r"tensor a: not a valid \.npy member"):
        NpzReader(path)


def test_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    np.savez(path, z=np.ones(2, dtype=np.complex64))
    with pytest.raises(CheckpointError, match="tensor z: dtype complex64 is not supported"):
        NpzReader(path)


def test_bfloat16_refused_on_write(tmp_path: Path) -> None:
    path = tmp_path / "out.npz"
    tensors = [("ok", np.ones(2, np.float32)), ("emb", np.ones(2, dtype=ml_dtypes.bfloat16))]
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(path))}: tensor emb is bfloat16, which \.npz cannot hold\. "
        r"Write \.safetensors",
    ):
        write_npz(path, tensors)


def test_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones(1))
    with NpzReader(path) as reader:
        with pytest.raises(CheckpointError, match=r"weights\.npz: no tensor named b"):
            reader.info("b")
        with pytest.raises(CheckpointError, match="no tensor named b"):
            reader.read("b")


def test_key_option_does_not_apply(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.ones(1))
    with pytest.raises(CheckpointError, match=r"\['key'\] do not apply to npz files"):
        open_checkpoint(path, key="ema")
