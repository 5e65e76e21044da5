"""numpy ``.npz`` archives: one ``.npy`` member per tensor.

Read member by member with ``allow_pickle=False``: an archive holding pickled
objects is refused, never unpickled. Shapes and dtypes come from each member's
``.npy`` header, without reading the data. A header that declares more data than
its member holds (a huge shape in a small file), or a member that declares more
bytes than its compressed data can inflate to, is refused from the zip directory and
the header alone, before anything is allocated. The writer streams one member at a
time into the zip (stored, like ``numpy.savez``), so the whole model is never
held in memory.

numpy's ``.npy`` format has no bfloat16; such tensors are refused on write with
a pointer to safetensors.
"""

from __future__ import annotations

import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from polyak.errors import CheckpointError, OutputError
from polyak.formats.base import ReaderBase, TensorInfo, dtype_name
from polyak.formats.limits import MAX_INFLATION as _MAX_INFLATION
from polyak.formats.limits import shape_refusal
from polyak.formats.marks import ZIP_COMMENT

__all__ = ["NpzReader", "read_npy_header", "write_npz"]

_SUFFIX = ".npy"
# What reading a damaged member raises: zipfile's own errors, zlib's for corrupt deflate
# data, numpy's for a bad .npy header (it parses the header as a Python literal, so
# also SyntaxError and tokenize's TokenError), and those for encrypted or unsupported
# members (RuntimeError, NotImplementedError).
_READ_ERRORS = (
    OSError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
    RuntimeError,
    SyntaxError,
    tokenize.TokenError,
)


def read_npy_header(file: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and header size of a ``.npy`` stream, reading its header only.

    numpy's own header parser (``numpy.lib.format``): the array's bytes are not read, so
    what a crafted header declares can be checked before anything is allocated.
    """
    version = np.lib.format.read_magic(file)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(file)
    return shape, dtype, file.tell()


class NpzReader(ReaderBase):
    """A lazily read ``.npz`` archive.

    Example:
        >>> with NpzReader(Path("weights.npz")) as reader:  # doctest: +SKIP
        ...     print(reader.info("dense/kernel"))
    """

    format = "npz"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except _READ_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: cannot be read as a .npz archive ({error})."
            ) from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        self._infos: dict[str, TensorInfo] = {}
        try:
            archive_size = os.fstat(self._zip.fp.fileno()).st_size
            for member in self._zip.infolist():
                filename = member.filename
                name = filename[: -len(_SUFFIX)] if filename.endswith(_SUFFIX) else filename
                if name in self._members:
                    raise CheckpointError(f"checkpoint {self.path}: tensor {name} appears twice.")
                self._members[name] = member
                self._infos[name] = self._read_header(name, member, archive_size)
        except BaseException:
            self._zip.close()
            raise

    def _read_header(self, name: str, member: zipfile.ZipInfo, archive_size: int) -> TensorInfo:
        where = f"checkpoint {self.path}: tensor {name}"
        stored = member.compress_type == zipfile.ZIP_STORED
        inflation = 1 if stored else _MAX_INFLATION
        if member.compress_size > archive_size or member.file_size > (
            inflation * member.compress_size
        ):
            raise CheckpointError(
                f"{where}: the zip directory declares {member.file_size} bytes from "
                f"{member.compress_size} compressed bytes in a {archive_size}-byte file, more "
                "than the data can hold; the archive is corrupt or crafted. Save it again with "
                "numpy.savez."
            )
        try:
            with self._zip.open(member) as file:
                shape, dtype, header_size = read_npy_header(file)
        except _READ_ERRORS as error:
            raise CheckpointError(f"{where}: not a valid .npy member ({error}).") from None
        if dtype.hasobject:
            raise CheckpointError(
                f"{where}: holds Python objects, which would need unpickling; polyak reads "
                "only numeric arrays (allow_pickle=False)."
            )
        canonical = dtype_name(dtype)
        if canonical is None:
            raise CheckpointError(f"{where}: dtype {dtype} is not supported.")
        if any(int(d) < 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape} has a negative dimension.")
        refusal = shape_refusal(shape)
        if refusal is not None:
            raise CheckpointError(f"{where}: {refusal}; the file is corrupt or crafted.")
        info = TensorInfo(tuple(int(d) for d in shape), canonical)
        held = member.file_size - header_size
        if info.nbytes > held:
            raise CheckpointError(
                f"{where}: declares shape {info.shape} of {info.dtype} ({info.nbytes} bytes) "
                f"but its member holds {max(held, 0)} bytes of data; the archive is truncated "
                "or crafted. Save it again with numpy.savez."
            )
        return info

    def names(self) -> list[str]:
        return list(self._members)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: no tensor named {name}.") from None

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        try:
            with self._zip.open(self._members[name]) as file:
                array = np.lib.format.read_array(file, allow_pickle=False)
        except _READ_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name} cannot be read ({error})."
            ) from None
        if tuple(array.shape) != info.shape:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name} is truncated.")
        return array

    def close(self) -> None:
        self._zip.close()


def write_npz(
    path: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: object | None = None,
) -> None:
    """Write tensors to a ``.npz`` archive, one member at a time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.comment = ZIP_COMMENT  # polyak's mark: numpy.load ignores it
        for name, array in tensors:
            if dtype_name(array.dtype) == "bfloat16":
                raise OutputError(
                    f"output {path}: tensor {name} is bfloat16, which .npz cannot hold. "
                    "Write .safetensors or .pt instead."
                )
            with archive.open(name + _SUFFIX, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
