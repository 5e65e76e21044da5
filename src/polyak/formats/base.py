"""The one small interface every checkpoint format implements.

A reader looks like ``safetensors.safe_open``: it lists tensor names and tells each
tensor's shape and dtype without reading data, then reads one tensor at a time.
The averaging engine therefore holds one running sum and one tensor at a time,
whatever the format.

A writer is a function ``write(path, tensors, template)``: ``tensors`` is an
iterable of ``(name, array)`` pairs in the order the output should hold them, and
``template`` is the reader of the member whose container the output copies
(the newest member: its architecture, its optimizer state where the container
needs one). Each array is valid only until the next pair is requested, so the
engine can reuse its buffers; a writer that must hold arrays copies them.

An array may be a :class:`StreamedTensor`: a tensor the engine computes chunk by
chunk. A writer that can stream (safetensors) writes its ``chunks()`` as they come,
so no whole tensor is ever in memory; any other writer calls ``numpy.asarray`` on
it and gets the whole array.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "DTYPES",
    "ArrayReader",
    "CheckpointReader",
    "CheckpointWriter",
    "PlannedTensors",
    "StreamedTensor",
    "TensorInfo",
    "dtype_name",
    "is_floating",
    "itemsize",
    "numpy_dtype",
]

# Canonical dtype names polyak reports and compares, in this order.
_NAMES = (
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
)
_NUMPY_DTYPES = {name: np.dtype(name) for name in _NAMES if name != "bfloat16"}
# bfloat16 comes from ml_dtypes (numpy has none). ``import ml_dtypes`` 0.7 takes 0.56 s
# after numpy (0.01 s for 0.5 and 0.6; measured side by side), more than averaging ten
# 100 MB models, so it is imported only when a bfloat16 tensor is met: readers know dtypes
# from headers before they touch data. Not capped in pyproject.toml: jax and TensorFlow
# pin ml_dtypes themselves; not replaced by uint16 bit views either: readers hand out
# bfloat16 arrays, which users and the framework adapters expect.
_ML_DTYPES = ("bfloat16",)
# Bytes per element, known without the dtype itself (so without ml_dtypes).
_ITEMSIZES = {**{name: dtype.itemsize for name, dtype in _NUMPY_DTYPES.items()}, "bfloat16": 2}


def _ml_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


class _DtypeTable(Mapping[str, np.dtype]):
    """Canonical dtype name -> numpy dtype; looking up bfloat16 imports ml_dtypes."""

    def __getitem__(self, name: str) -> np.dtype:
        dtype = _NUMPY_DTYPES.get(name)
        if dtype is not None:
            return dtype
        if name in _ML_DTYPES:
            return _ml_dtype(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)

    def __contains__(self, name: object) -> bool:
        return name in _NAMES

    def __repr__(self) -> str:
        return f"<polyak dtypes: {', '.join(_NAMES)}>"


DTYPES: Mapping[str, np.dtype] = _DtypeTable()
_FLOATING = frozenset({"float64", "float32", "float16", "bfloat16"})
_NAMES_BY_NUMPY_DTYPE = {dtype: name for name, dtype in _NUMPY_DTYPES.items()}


def dtype_name(dtype: np.dtype) -> str | None:
    """The canonical name of a numpy dtype, or None if polyak does not support it."""
    dtype = np.dtype(dtype).newbyteorder("=")
    name = _NAMES_BY_NUMPY_DTYPE.get(dtype)
    # An array of an ml_dtypes type exists only once something imported ml_dtypes.
    if name is None and "ml_dtypes" in sys.modules:
        name = next((other for other in _ML_DTYPES if _ml_dtype(other) == dtype), None)
    return name


def itemsize(name: str) -> int:
    """Bytes per element of a canonical dtype name (no import of ml_dtypes for bfloat16)."""
    return _ITEMSIZES[name]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a canonical dtype name."""
    return DTYPES[name]


def is_floating(name: str) -> bool:
    """Whether tensors of this dtype are averaged (the others are carried over)."""
    return name in _FLOATING


@dataclass(frozen=True)
class TensorInfo:
    """What a reader knows about a tensor before reading it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Number of bytes of the data."""
        return self.size * _ITEMSIZES[self.dtype]


class StreamedTensor:
    """A tensor produced chunk by chunk, in C order, each chunk flat and in its dtype.

    ``chunks()`` may be iterated once; each chunk is valid only until the next one is
    requested (the producer reuses its buffers). ``numpy.asarray(tensor)`` collects
    the chunks into a new array instead, for writers that need whole tensors.

    Args:
        info: the tensor's shape and dtype.
        produce: returns the iterator of chunks; called once, on first use.
    """

    def __init__(self, info: TensorInfo, produce: Callable[[], Iterator[np.ndarray]]) -> None:
        self.info = info
        self._produce: Callable[[], Iterator[np.ndarray]] | None = produce

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.info.dtype]

    @property
    def ndim(self) -> int:
        return len(self.info.shape)

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def chunks(self) -> Iterator[np.ndarray]:
        """The flat chunks, in order; they cover the tensor exactly once."""
        if self._produce is None:
            raise RuntimeError("a StreamedTensor's chunks can be read only once.")
        produce, self._produce = self._produce, None
        return produce()

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a StreamedTensor cannot be viewed without a copy.")
        whole = np.empty(self.info.size, self.dtype)
        position = 0
        for chunk in self.chunks():
            whole[position : position + chunk.size] = chunk
            position += chunk.size
        whole = whole.reshape(self.info.shape)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"<StreamedTensor {self.info.shape} {self.info.dtype}>"


class PlannedTensors:
    """Tensors to write, with every name, shape and dtype known before any data.

    Iterating yields ``(name, array)`` pairs in the order of ``infos``. Writers
    whose format puts a header before the data (safetensors) read ``infos`` first
    and stream the arrays after it; the others simply iterate.

    ``aliases`` maps a tensor name to an earlier name whose tensor it shares (tied
    weights, such as an embedding and an output layer) in every member; the values
    are then equal, and a writer that can share storage (torch) writes them once.
    """

    def __init__(
        self,
        infos: list[tuple[str, TensorInfo]],
        arrays: Iterable[tuple[str, np.ndarray]],
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.infos = infos
        self._arrays = arrays
        self.aliases: dict[str, str] = aliases or {}

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(self._arrays)

    @classmethod
    def from_arrays(cls, tensors: Iterable[tuple[str, np.ndarray]]) -> PlannedTensors:
        """Plan tensors that are all in memory already (e.g. a dict's items)."""
        pairs = list(tensors)
        infos = []
        for name, array in pairs:
            dtype = dtype_name(array.dtype)
            if dtype is None:
                raise ValueError(f"tensor {name}: dtype {array.dtype} is not supported.")
            infos.append((name, TensorInfo(tuple(int(d) for d in array.shape), dtype)))
        return cls(infos, pairs)


class CheckpointReader(Protocol):
    """A lazily opened checkpoint: names and infos first, data one tensor at a time."""

    path: Path
    format: str

    def names(self) -> list[str]:
        """Tensor names, in the file's own order."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor, without reading its data."""
        ...

    def read(self, name: str) -> np.ndarray:
        """The data of one tensor (possibly a read-only memory map)."""
        ...

    def close(self) -> None:
        """Release files and memory maps."""
        ...

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(self, *exc_info: object) -> None: ...


class CheckpointWriter(Protocol):
    """Writes tensors to ``path`` in a format, copying ``template``'s container."""

    def __call__(
        self,
        path: Path,
        tensors: Iterable[tuple[str, np.ndarray]],
        template: CheckpointReader | None,
    ) -> None: ...


class ReaderBase:
    """Context-manager plumbing shared by the readers."""

    path: Path
    format: str

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - overridden where there is something to close
        pass

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every tensor, one at a time, in the file's order."""
        for name in self.names():
            yield name, self.read(name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"


class ArrayReader(ReaderBase):
    """A reader over arrays already in memory, e.g. a Keras model's ``get_weights()``.

    ``path`` only names the member in messages.
    """

    format = "memory"

    def __init__(self, name: str | Path, tensors: dict[str, np.ndarray]) -> None:
        self.path = Path(name)
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        array = self._tensors[name]
        dtype = dtype_name(array.dtype)
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {array.dtype}.")
        return TensorInfo(tuple(int(d) for d in array.shape), dtype)

    def read(self, name: str) -> np.ndarray:
        return self._tensors[name]
