"""The reader/writer interface's shared pieces: StreamedTensor, PlannedTensors, ArrayReader."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from polyak.formats.base import (
    DTYPES,
    ArrayReader,
    PlannedTensors,
    StreamedTensor,
    TensorInfo,
    dtype_name,
)


def streamed(values: np.ndarray, chunk: int) -> StreamedTensor:
    info = TensorInfo(values.shape, "float32")

    def chunks():
        buffer = np.empty(chunk, np.float32)  # reused, as the engine does
        flat = values.reshape(-1)
        for start in range(0, flat.size, chunk):
            part = buffer[: min(chunk, flat.size - start)]
            part[:] = flat[start : start + chunk]
            yield part

    return StreamedTensor(info, chunks)


def test_streamed_tensor_collects_its_chunks_into_a_whole_array():
    values = np.arange(35, dtype=np.float32).reshape(5, 7)
    tensor = streamed(values, chunk=4)
    assert (tensor.shape, tensor.dtype, tensor.size, tensor.nbytes) == ((5, 7), np.float32, 35, 140)
    whole = np.asarray(tensor)
    np.testing.assert_array_equal(whole, values)
    assert whole.flags.writeable


def test_streamed_tensor_casts_on_request():
    tensor = streamed(np.ones((2, 3), np.float32), chunk=5)
    assert np.asarray(tensor, dtype=np.float64).dtype == np.float64


def test_streamed_tensor_chunks_are_read_once():
    tensor = streamed(np.ones(10, np.float32), chunk=3)
    assert sum(chunk.size for chunk in tensor.chunks()) == 10
    with pytest.raises(RuntimeError, match="only once"):
        tensor.chunks()


def test_streamed_tensor_cannot_be_viewed_without_a_copy():
    with pytest.raises(ValueError, match="without a copy"):
        np.array(streamed(np.ones(4, np.float32), chunk=2), copy=False)


def test_planned_tensors_from_arrays_and_array_reader():
    arrays = {"a": np.zeros((2, 2), np.float16), "b": np.array(3, np.int64)}
    planned = PlannedTensors.from_arrays(arrays.items())
    assert planned.infos == [("a", TensorInfo((2, 2), "float16")), ("b", TensorInfo((), "int64"))]
    assert [name for name, _ in planned] == ["a", "b"]
    with ArrayReader("memory", arrays) as reader:
        assert reader.names() == ["a", "b"]
        assert reader.info("b") == TensorInfo((), "int64")


def test_dtype_table_imports_ml_dtypes_only_for_bfloat16():
    # A fresh process: this one may hold ml_dtypes already.
    probe = """
import sys
from polyak.formats.base import DTYPES, TensorInfo, dtype_name, itemsize
import numpy as np
names = list(DTYPES)
assert TensorInfo((3, 4), "bfloat16").nbytes == 24 and itemsize("bfloat16") == 2
assert dtype_name(np.float16) == "float16" and dtype_name(np.dtype(">f4")) == "float32"
assert dtype_name(np.complex64) is None
before = "ml_dtypes" in sys.modules
bfloat16 = DTYPES["bfloat16"]
import ml_dtypes
assert bfloat16 == np.dtype(ml_dtypes.bfloat16) and dtype_name(bfloat16) == "bfloat16"
print(",".join(names), before)
"""
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    names, before = completed.stdout.split()
    assert names.split(",")[:5] == ["float64", "float32", "float16", "bfloat16", "int64"]
    assert before == "False"


def test_dtype_table_lookups():
    import ml_dtypes

    assert DTYPES["float32"] == np.float32 and DTYPES["bool"] == np.bool_
    assert DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)
    assert "bfloat16" in DTYPES and "complex64" not in DTYPES and len(DTYPES) == 13
    with pytest.raises(KeyError):
        DTYPES["complex64"]
    assert dtype_name(ml_dtypes.bfloat16) == "bfloat16"
    assert dtype_name(ml_dtypes.float8_e4m3fn) is None
