"""The reader/writer interface's shared pieces: StreamedTensor, PlannedTensors, ArrayReader."""

from __future__ import annotations

import numpy as np
import pytest

from polyak.formats.base import ArrayReader, PlannedTensors, StreamedTensor, TensorInfo


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
