"""PyTorch's zip checkpoint format, read and written with numpy and the standard library.

Why polyak does this itself rather than call torch: ``import torch`` alone takes over a
second, and ``torch.save`` needs the whole output state dict in memory (about 1.3 times
the model). Averaging is I/O-bound, so both costs dominate. Here a file is parsed from
one memory map (each tensor a read-only numpy view of the page cache) and written in
one pass, the pickle first and then each tensor as the engine computes it, chunk by
chunk. torch stays the fallback (:mod:`polyak.formats.torch` calls ``torch.load`` and
``torch.save`` for whatever this module declines) and the reference in the tests.

The format (what ``torch.save`` writes since torch 1.6, via miniz): a zip archive of
stored (uncompressed) records under one folder, ``archive/`` here:

- ``data.pkl``: a protocol-2 pickle of the object, each tensor as
  ``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, requires_grad,
  backward_hooks)`` (``_rebuild_tensor_v3(..., dtype)`` for the unsigned dtypes torch
  added late), each storage a persistent id ``('storage', torch.FloatStorage, key,
  location, numel)``;
- ``data/<key>``: a storage's bytes, little-endian, starting at a multiple of 64 bytes
  (padding goes in a local-header extra field ``FB``), records in key order;
- ``byteorder`` (``little``), ``version`` (``3``), ``.format_version`` (``1``),
  ``.storage_alignment`` (``64``) and ``.data/serialization_id``.

Reading (:func:`load`) is a subset of ``torch.load(weights_only=True)``; the allowlist is
there. Writing (:func:`write`) mirrors miniz's layout byte for byte where torch's reader
depends on it (data descriptors after non-empty records, ZIP64 fields where a size or
an offset reaches 4 GiB, ZIP64 end records), so ``torch.load`` reads the output with
and without ``mmap=True``.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from polyak.formats.base import DTYPES, StreamedTensor, TensorInfo, itemsize
from polyak.formats.limits import MAX_DIMENSIONS, MAX_PICKLE_BYTES, inflation_refusal
from polyak.formats.marks import ZIP_COMMENT

__all__ = [
    "NewTensor",
    "NotFastPath",
    "PickledNamespace",
    "StoredTensor",
    "load",
    "load_buffer",
    "write",
]

_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE = 0x04034B50
_CENTRAL_SIGNATURE = 0x02014B50
_DESCRIPTOR_SIGNATURE = 0x08074B50
_UINT32_MAX = 0xFFFFFFFF  # also the mark of a value moved to a ZIP64 field
_UINT16_MAX = 0xFFFF
# Sizes and offsets from which miniz writes ZIP64 fields (a test lowers it).
_ZIP64_LIMIT = _UINT32_MAX
_ALIGNMENT = 64
_FLAG_DESCRIPTOR = 0x0008
_FLAG_UTF8 = 0x0800
_ZIP64_EXTRA = 0x0001
_PADDING_EXTRA = 0x4246  # "FB", as torch writes it
_ARCHIVE = "archive"  # the folder torch.save uses when given a file object
_FILE_VERSION = b"3\n"
_MAX_FILE_VERSION = 10  # torch's kMaxSupportedFileFormatVersion
_COPY_BYTES = 64 << 20  # slices written (and checksummed) at a time

# Storage classes of the typed storages torch.save writes, and their dtypes.
_TYPED_STORAGES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_STORAGE_OF = {dtype: name for name, dtype in _TYPED_STORAGES.items()}
_UNTYPED_STORAGE = "UntypedStorage"


class NotFastPath(Exception):
    """The file is not one this module reads; the caller loads it with torch instead."""


class Refused(Exception):
    """The file is declined for a safety reason: the caller refuses it, never hands it to torch.

    A record shorter than its storage, a tensor whose view reaches past its storage or
    declares more elements than its storage holds, a record outside the file, a
    compressed record that would inflate beyond the shared limit, or a pickle beyond
    the bounds on nesting, memo and containers: ``torch.load(mmap=True)`` would read
    the bytes of other records, or allocate what the file only declares.
    """


# Bounds on what a pickle may build, checked before anything is allocated.
_MAX_DIMENSION_SIZE = 2**62
_MAX_DEPTH = 100  # nesting of containers in the pickle
_MAX_MEMO = 10_000_000  # memo entries
_MAX_CONTAINER = 10_000_000  # items in one list, dict or tuple
_MAX_KEY_INT = 2**63  # a dict key that is an int is below this in size


# --- what the pickle holds ---------------------------------------------------------------


class _Global:
    """A stand-in for a torch global: unpickled from it, and pickled as ``GLOBAL`` again."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: object) -> None:
        # Stand-ins are never called: REDUCE refuses them (see _Unpickler).
        raise NotFastPath(f"{self.module}.{self.name} cannot be called")

    def __repr__(self) -> str:
        return f"<global {self.module}.{self.name}>"


class PickledNamespace(dict):
    """An ``argparse.Namespace`` of a checkpoint (timm's ``args``), as a dict of its attributes.

    Read without importing or calling ``argparse``: the pickle's ``NEWOBJ`` makes an
    empty one and its ``BUILD`` state (a dict of str keys) fills it. Written back, it is
    an ``argparse.Namespace`` again, as ``torch.load`` and timm expect.
    """

    __slots__ = ()


_STORAGE_GLOBALS = {name: _Global("torch", name) for name in _TYPED_STORAGES}
_STORAGE_GLOBALS[_UNTYPED_STORAGE] = _Global("torch.storage", _UNTYPED_STORAGE)
_DTYPE_GLOBALS = {name: _Global("torch", name) for name in DTYPES}
_REBUILD_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_REBUILD_V3 = _Global("torch._utils", "_rebuild_tensor_v3")
_REBUILD_PARAMETER = _Global("torch._utils", "_rebuild_parameter")
_NAMESPACE = _Global("argparse", "Namespace")


class _Storage:
    """One ``data/<key>`` record: its bytes, read-only, in the file's memory map."""

    __slots__ = ("data", "key", "kind", "numel")

    def __init__(self, kind: str, key: str, numel: int, data: np.ndarray) -> None:
        self.kind = kind  # the storage class name, e.g. "FloatStorage"
        self.key = key
        self.numel = numel  # as in the persistent id: elements, or bytes when untyped
        self.data = data  # uint8


class StoredTensor:
    """A tensor of a file read by :func:`load`: where its data lies, read on demand.

    Attributes:
        dtype: the canonical dtype name (``"float32"``...).
        shape: the shape, a tuple of ints.
        stride: torch's strides, in elements.
        offset: where the tensor starts in its storage, in elements.
        requires_grad: as saved.
        is_parameter: saved as an ``nn.Parameter``.
    """

    __slots__ = ("dtype", "is_parameter", "offset", "requires_grad", "shape", "storage", "stride")

    def __init__(
        self,
        storage: _Storage,
        dtype: str,
        offset: int,
        shape: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool,
        is_parameter: bool = False,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.shape = shape
        self.stride = stride
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter

    @property
    def info(self) -> TensorInfo:
        return TensorInfo(self.shape, self.dtype)

    def numpy(self) -> np.ndarray:
        """The data, read-only: a view of the memory map, or a C-ordered copy of a strided view."""
        dtype = DTYPES[self.dtype]
        size = int(np.prod(self.shape, dtype=np.int64))
        if size == 0:
            array = np.zeros(self.shape, dtype)
        else:
            data = self.storage.data
            elements = data[: data.size // dtype.itemsize * dtype.itemsize].view(dtype)
            array = np.lib.stride_tricks.as_strided(
                elements[self.offset :],
                self.shape,
                tuple(step * dtype.itemsize for step in self.stride),
                writeable=False,
            )
            if not array.flags.c_contiguous:
                array = np.ascontiguousarray(array)
        array.flags.writeable = False
        return array

    def __repr__(self) -> str:
        return f"<StoredTensor {self.shape} {self.dtype}>"


def _check_view(
    storage: _Storage, dtype: str, offset: object, shape: object, stride: object
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Offset, shape and stride, checked to stay inside the storage."""
    if type(offset) is not int or type(shape) is not tuple or type(stride) is not tuple:
        raise NotFastPath("malformed tensor")
    if len(shape) != len(stride) or not all(type(v) is int and v >= 0 for v in shape + stride):
        raise NotFastPath("malformed tensor")
    if offset < 0:
        raise NotFastPath("negative storage offset")
    if len(shape) > MAX_DIMENSIONS:
        raise Refused(f"a tensor has {len(shape)} dimensions, more than {MAX_DIMENSIONS}")
    if any(size > _MAX_DIMENSION_SIZE for size in shape + stride) or offset > _MAX_DIMENSION_SIZE:
        raise Refused(f"a tensor declares shape {_shown(shape)}, larger than any file")
    elements = storage.data.size // itemsize(dtype)
    count = 1
    for size in shape:
        count *= size
    # A view (stride 0, overlapping) may not declare more elements than its storage
    # holds: the output would be larger than the input by a factor the file chooses.
    if count > elements:
        raise Refused(
            f"a tensor of shape {_shown(shape)} declares {count} elements, more than the "
            f"{elements} its storage holds"
        )
    if count:
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
        if last >= elements:
            raise Refused("a tensor reaches beyond its storage")
    return offset, shape, stride


def _shown(shape: tuple[int, ...]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_hooks(backward_hooks: object) -> None:
    if type(backward_hooks) not in (dict, OrderedDict) or backward_hooks:
        raise NotFastPath("tensor with backward hooks")


def _stored_tensor(
    storage: _Storage,
    dtype: str,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object,
) -> StoredTensor:
    """What both rebuild functions make of their checked storage and dtype."""
    if type(requires_grad) is not bool or metadata is not None:
        raise NotFastPath("tensor with metadata")
    _no_hooks(backward_hooks)
    return StoredTensor(
        storage, dtype, *_check_view(storage, dtype, offset, shape, stride), requires_grad
    )


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    metadata: object = None,
) -> StoredTensor:
    if type(storage) is not _Storage or storage.kind == _UNTYPED_STORAGE:
        raise NotFastPath("_rebuild_tensor_v2 without a typed storage")
    return _stored_tensor(
        storage, _TYPED_STORAGES[storage.kind], offset, shape, stride, requires_grad,
        backward_hooks, metadata,
    )  # fmt: skip


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    shape: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> StoredTensor:
    if type(storage) is not _Storage or storage.kind != _UNTYPED_STORAGE:
        raise NotFastPath("_rebuild_tensor_v3 without an untyped storage")
    if type(dtype) is not _Global or dtype not in _DTYPE_GLOBALS.values():
        raise NotFastPath("unknown dtype")
    return _stored_tensor(
        storage, dtype.name, offset, shape, stride, requires_grad, backward_hooks, metadata
    )


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> StoredTensor:
    if type(data) is not StoredTensor or data.is_parameter or type(requires_grad) is not bool:
        raise NotFastPath("malformed parameter")
    _no_hooks(backward_hooks)
    return StoredTensor(
        data.storage, data.dtype, data.offset, data.shape, data.stride, requires_grad, True
    )


def _encode(text: object, encoding: object) -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes, and for nothing else."""
    if type(text) is not str or encoding != "latin1":
        raise NotFastPath("_codecs.encode used for something other than bytes")
    return text.encode("latin-1")


_CALLABLES: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("_codecs", "encode"): _encode,
}
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_CALLABLES,
    **{(g.module, g.name): g for g in _STORAGE_GLOBALS.values()},
    **{(g.module, g.name): g for g in _DTYPE_GLOBALS.values()},
    (_NAMESPACE.module, _NAMESPACE.name): _NAMESPACE,
}
_ALLOWED_CALLS = frozenset(id(value) for value in _CALLABLES.values())

# The opcodes torch's weights-only unpickler accepts, less EMPTY_SET (sets are refused) and
# SHORT_BINSTRING (Python 2 strings). NEWOBJ makes argparse.Namespace and nothing else.
_OPCODES = frozenset(
    code[0]
    for code in (
        pickle.PROTO, pickle.STOP, pickle.GLOBAL, pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ,
        pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.MARK,
        pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.NONE,
        pickle.NEWFALSE, pickle.NEWTRUE, pickle.EMPTY_TUPLE, pickle.EMPTY_LIST,
        pickle.EMPTY_DICT, pickle.BININT, pickle.BININT1, pickle.BININT2, pickle.BINFLOAT,
        pickle.BINUNICODE, pickle.BINPERSID, pickle.BINGET, pickle.LONG_BINGET,
        pickle.BINPUT, pickle.LONG_BINPUT, pickle.LONG1,
    )
)  # fmt: skip


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The standard pure-Python unpickler, cut down to what ``weights_only`` allows.

    Only the opcodes in ``_OPCODES`` are dispatched; a global outside the allowlist, a
    call of anything but an allowlisted function, BUILD on anything but an OrderedDict,
    and items set on anything but a dict or list raise ``NotFastPath``.
    """

    dispatch: ClassVar[dict] = {
        code: op for code, op in pickle._Unpickler.dispatch.items() if code in _OPCODES
    }

    def __init__(self, data: bytes, storage: Any) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise NotFastPath(f"global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise NotFastPath("persistent id other than a storage")
        _, kind, key, _location, numel = pid
        if type(kind) is not _Global or kind not in _STORAGE_GLOBALS.values():
            raise NotFastPath("unknown storage class")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise NotFastPath("malformed storage")
        return self._storage(kind.name, key, numel)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if id(function) not in _ALLOWED_CALLS or type(args) is not tuple:
            raise NotFastPath("call of a function outside the allowlist")
        self.stack[-1] = function(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack[-1]
        if cls is not _NAMESPACE or args != ():
            raise NotFastPath("NEWOBJ of something other than argparse.Namespace()")
        self.stack[-1] = PickledNamespace()

    def load_build(self) -> None:
        state = self.stack.pop()
        instance = self.stack[-1]
        if type(state) is not dict:
            raise NotFastPath("BUILD with a state other than a dict")
        if type(instance) is PickledNamespace:
            if instance or not all(type(name) is str for name in state):
                raise NotFastPath("argparse.Namespace built twice, or with non-string names")
            instance.update(state)
            return
        if type(instance) is not OrderedDict:
            raise NotFastPath("BUILD on something other than an OrderedDict")
        # As torch's weights-only unpickler does: state becomes attributes. torch.save
        # writes only _metadata; any other name could shadow a method (items, keys).
        if set(state) - {"_metadata"}:
            raise Refused("the pickle sets attributes other than _metadata on a dict")
        instance.__dict__.update(state)

    def load_append(self) -> None:
        if type(self.stack[-2]) is not list:
            raise NotFastPath("APPEND to something other than a list")
        super().load_append()

    def load_appends(self) -> None:
        if type(self.metastack[-1][-1]) is not list:
            raise NotFastPath("APPENDS to something other than a list")
        super().load_appends()

    def load_setitem(self) -> None:
        if type(self.stack[-3]) not in (dict, OrderedDict):
            raise NotFastPath("SETITEM on something other than a dict")
        _check_key(self.stack[-2])
        super().load_setitem()

    def load_setitems(self) -> None:
        if type(self.metastack[-1][-1]) not in (dict, OrderedDict):
            raise NotFastPath("SETITEMS on something other than a dict")
        for key in self.stack[::2]:
            _check_key(key)
        super().load_setitems()

    def load_binput(self) -> None:
        self._count_memo()
        super().load_binput()

    def load_long_binput(self) -> None:
        self._count_memo()
        super().load_long_binput()

    def _count_memo(self) -> None:
        if len(self.memo) >= _MAX_MEMO:
            raise Refused(f"the pickle memoizes more than {_MAX_MEMO} objects")

    for _code, _method in (
        (pickle.REDUCE, load_reduce),
        (pickle.NEWOBJ, load_newobj),
        (pickle.BUILD, load_build),
        (pickle.APPEND, load_append),
        (pickle.APPENDS, load_appends),
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.BINPUT, load_binput),
        (pickle.LONG_BINPUT, load_long_binput),
    ):
        dispatch[_code[0]] = _method
    del _code, _method


def _check_key(key: object) -> None:
    """A dict key must be a string or a small int: hashing an attacker-built tuple key
    recurses in C (a deep one crashes the process) or takes exponential time (a DAG)."""
    if type(key) is str or (type(key) is int and abs(key) < _MAX_KEY_INT):
        return
    raise Refused(f"a dict key of type {type(key).__name__}; keys must be strings or ints")


def _check_depth(obj: object) -> None:
    """Containers nest at most ``_MAX_DEPTH`` deep (writing back and printing recurse).

    Iterative, and each container is visited once, so a shared (DAG) structure costs
    its size, not its number of paths.
    """
    seen: set[int] = set()
    pending = [(obj, 0)]
    while pending:
        value, depth = pending.pop()
        if type(value) not in (dict, OrderedDict, list, tuple) or id(value) in seen:
            continue
        if depth > _MAX_DEPTH:
            raise Refused(f"containers nest more than {_MAX_DEPTH} deep")
        seen.add(id(value))
        children = value.values() if isinstance(value, dict) else value
        if len(children) > _MAX_CONTAINER:
            raise Refused(f"a container holds more than {_MAX_CONTAINER} items")
        pending.extend((child, depth + 1) for child in children)


# --- reading -----------------------------------------------------------------------------


def _record_data(buffer: np.ndarray, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """The bytes of a stored record, a view of the memory map."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise NotFastPath(f"no record {name}") from None
    if info.compress_size > buffer.size:
        raise Refused(f"record {name} lies outside the file")
    limit = MAX_PICKLE_BYTES if name.endswith("/data.pkl") else None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        # torch inflates what it is handed: only a plausible size goes to it.
        refusal = inflation_refusal(info.file_size, info.compress_size, limit=limit)
        if refusal is not None:
            raise Refused(f"record {name} {refusal}")
        raise NotFastPath(f"record {name} is compressed or encrypted")
    if limit is not None and info.file_size > limit:
        raise Refused(f"record {name} has {info.file_size} bytes, more than {limit} allowed")
    if info.compress_size != info.file_size:
        raise NotFastPath(f"record {name} has inconsistent sizes")
    start = info.header_offset
    if start + _LOCAL_HEADER.size > buffer.size:
        raise Refused(f"record {name} lies outside the file")
    fields = _LOCAL_HEADER.unpack(buffer[start : start + _LOCAL_HEADER.size].tobytes())
    if fields[0] != _LOCAL_SIGNATURE:
        raise NotFastPath(f"record {name} has no local header")
    begin = start + _LOCAL_HEADER.size + fields[9] + fields[10]
    end = begin + info.file_size
    if end > buffer.size:
        raise Refused(f"record {name} lies outside the file")
    return buffer[begin:end]


def load(path: Path) -> Any:
    """The object a torch zip checkpoint holds, its tensors :class:`StoredTensor` views.

    Reading (:func:`load`) is a subset of ``torch.load(weights_only=True)`` with
    ``argparse.Namespace`` allowed: the pickle may use only the opcodes torch's weights-only
    unpickler knows, and only these globals: ``collections.OrderedDict``,
    ``torch._utils._rebuild_tensor_v2``/``_v3``, ``torch._utils._rebuild_parameter``, the
    storage classes and dtypes of the dtypes polyak supports, ``_codecs.encode`` (how
    protocol 2 pickles bytes), and ``argparse.Namespace`` (timm's ``train.py`` saves its
    command line as ``args``). The Namespace is never imported or called: it becomes a
    :class:`PickledNamespace` of plain data, pickled back as an ``argparse.Namespace``.
    Nothing else is ever called. Anything outside that (another global, a big-endian file,
    an unknown storage, a compressed or missing record, a malformed zip) raises
    :class:`NotFastPath`, and the caller loads the file with torch (``weights_only``, with
    the same Namespace allowed), which accepts it or refuses it with its own message: this
    module never accepts a file that this fallback refuses.

    Raises:
        NotFastPath: the file is anything but a little-endian torch zip checkpoint whose
            pickle stays inside the allowlist (above).
    """
    if sys.byteorder != "little":
        raise NotFastPath("big-endian machine")
    try:
        with open(path, "rb") as file:
            if file.read(4) != _ZIP_MAGIC:
                raise NotFastPath("not a zip file")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            buffer = np.frombuffer(mapped, np.uint8)
            file.seek(0)
            archive = zipfile.ZipFile(file)
            return _load_archive(archive, buffer)
    except (NotFastPath, Refused):
        raise
    except RecursionError:
        raise Refused(f"containers nest more than {_MAX_DEPTH} deep") from None
    except Exception as error:  # a malformed file: torch.load gives the message
        raise NotFastPath(f"{type(error).__name__}: {error}") from None


class _BufferFile(io.RawIOBase):
    """A read-only, seekable file over a byte array, without copying it (for ``zipfile``)."""

    def __init__(self, buffer: np.ndarray) -> None:
        self._view = memoryview(buffer)
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, target: Any) -> int:
        data = self._view[self._position : self._position + len(target)]
        target[: len(data)] = data
        self._position += len(data)
        return len(data)


def load_buffer(buffer: np.ndarray) -> Any:
    """:func:`load` of a torch zip checkpoint held in a byte array (a slice of a memory map).

    The tensors are views of ``buffer``. Used for the payloads that
    ``torch.distributed.checkpoint`` writes inside its ``.distcp`` files.

    Raises:
        NotFastPath: as :func:`load`.
    """
    if sys.byteorder != "little":
        raise NotFastPath("big-endian machine")
    if buffer[:4].tobytes() != _ZIP_MAGIC:
        raise NotFastPath("not a zip file")
    try:
        with zipfile.ZipFile(io.BufferedReader(_BufferFile(buffer))) as archive:
            return _load_archive(archive, buffer)
    except NotFastPath:
        raise
    except Exception as error:
        raise NotFastPath(f"{type(error).__name__}: {error}") from None


def _load_archive(archive: zipfile.ZipFile, buffer: np.ndarray) -> Any:
    names = archive.namelist()
    if not names or len(set(names)) != len(names):
        raise NotFastPath("empty archive or repeated record names")
    folder = names[0].split("/", 1)[0] + "/"
    if not all(name.startswith(folder) for name in names):
        raise NotFastPath("records outside one folder")

    def record(name: str) -> np.ndarray:
        return _record_data(buffer, archive, folder + name)

    found = set(names)
    byteorder = record("byteorder").tobytes() if folder + "byteorder" in found else b"little"
    if byteorder != b"little":
        raise NotFastPath("big-endian file")
    version_name = ".data/version" if folder + ".data/version" in found else "version"
    version = int(record(version_name).tobytes())
    if not 1 <= version <= _MAX_FILE_VERSION:
        raise NotFastPath(f"file format version {version}")

    storages: dict[str, _Storage] = {}

    def storage(kind: str, key: str, numel: int) -> _Storage:
        existing = storages.get(key)
        if existing is not None:
            if (existing.kind, existing.numel) != (kind, numel):
                raise NotFastPath(f"storage {key} is described twice differently")
            return existing
        data = record(f"data/{key}")
        width = 1 if kind == _UNTYPED_STORAGE else itemsize(_TYPED_STORAGES[kind])
        if data.size < numel * width:
            # torch.load(mmap=True) would read past the record, into other records.
            raise Refused(f"storage {key} has {data.size} bytes, fewer than its {numel * width}")
        if data.size != numel * width:
            raise NotFastPath(f"storage {key} has {data.size} bytes, not {numel * width}")
        storages[key] = _Storage(kind, key, numel, data)
        return storages[key]

    loaded = _Unpickler(record("data.pkl").tobytes(), storage).load()
    _check_depth(loaded)
    return loaded


# --- the zip records, as miniz writes them -----------------------------------------------


def _zip64_extra(size: int, offset: int) -> bytes:
    """The ZIP64 extra field of a local header, as miniz writes it (empty when not needed)."""
    fields = b""
    if size >= _ZIP64_LIMIT:
        fields += struct.pack("<QQ", size, size)
    if offset >= _ZIP64_LIMIT:
        fields += struct.pack("<Q", offset)
    return struct.pack("<HH", _ZIP64_EXTRA, len(fields)) + fields if fields else b""


def local_header(name: bytes, size: int, offset: int) -> bytes:
    """The local header of a stored record at ``offset``; its data starts 64-byte aligned.

    Sizes and CRC are left zero: a data descriptor after the data holds them (miniz
    writes none for an empty record, whose zeros are then right).
    """
    extra = _zip64_extra(size, offset)
    start = offset + _LOCAL_HEADER.size + len(name) + len(extra) + 4
    padding = -start % _ALIGNMENT
    extra += struct.pack("<HH", _PADDING_EXTRA, padding) + b"Z" * padding
    flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
    fields = (_LOCAL_SIGNATURE, 0, flags, 0, 0, 0, 0, 0, 0, len(name), len(extra))
    return _LOCAL_HEADER.pack(*fields) + name + extra


def data_descriptor(crc: int, size: int, offset: int) -> bytes:
    """What follows a record's data: 64-bit sizes where the local header had ZIP64 fields."""
    if not size:
        return b""
    if size >= _ZIP64_LIMIT or offset >= _ZIP64_LIMIT:
        return struct.pack("<IIQQ", _DESCRIPTOR_SIGNATURE, crc, size, size)
    return struct.pack("<IIII", _DESCRIPTOR_SIGNATURE, crc, size, size)


def central_header(name: bytes, size: int, crc: int, offset: int) -> bytes:
    """A central-directory entry; sizes and offset past 4 GiB go in a ZIP64 extra field."""
    extra = _zip64_extra(size, offset)
    flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
    small = size if size < _ZIP64_LIMIT else _UINT32_MAX
    header = struct.pack(
        "<IHHHHHHIIIHHHHHII",
        _CENTRAL_SIGNATURE, 0, 0, flags, 0, 0, 0, crc, small, small,
        len(name), len(extra), 0, 0, 0, 0, offset if offset < _ZIP64_LIMIT else _UINT32_MAX,
    )  # fmt: skip
    return header + name + extra


def _small(value: int) -> int:
    return value if value < _ZIP64_LIMIT else _UINT32_MAX


def end_records(
    count: int, directory_offset: int, directory_size: int, comment: bytes = b""
) -> bytes:
    """The ZIP64 end record and locator (miniz always writes them), then the end record
    and its ``comment`` (polyak's mark on its outputs; torch's reader ignores it)."""
    zip64_end = directory_offset + directory_size
    return (
        struct.pack(
            "<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0,
            count, count, directory_size, directory_offset,
        )
        + struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1)
        + struct.pack(
            "<IHHHHIIH", 0x06054B50, 0, 0, min(count, _UINT16_MAX), min(count, _UINT16_MAX),
            _small(directory_size), _small(directory_offset), len(comment),
        )
        + comment
    )  # fmt: skip


class _ZipWriter:
    """Writes stored records one after the other, each streamed, then the directory."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._offset = 0
        self._directory: list[bytes] = []
        self._open: tuple[bytes, int, int] | None = None
        self._crc = 0
        self._written = 0
        # Of every record's name, size and CRC: what the serialization id is made from.
        self._digest = hashlib.blake2b(digest_size=16)

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._offset += memoryview(data).nbytes

    def begin(self, name: str, size: int) -> None:
        encoded = name.encode("utf-8")
        self._open = (encoded, size, self._offset)
        self._crc = self._written = 0
        self._put(local_header(encoded, size, self._offset))

    def write(self, data: memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._written += data.nbytes
        self._put(data)

    def end(self) -> None:
        assert self._open is not None
        name, size, offset = self._open
        if self._written != size:
            raise ValueError(f"record {name.decode()}: {self._written} bytes; planned {size}.")
        self._put(data_descriptor(self._crc, size, offset))
        self._digest.update(name + struct.pack("<QI", size, self._crc))
        self._directory.append(central_header(name, size, self._crc, offset))
        self._open = None

    def add(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.write(memoryview(data))
        self.end()

    def serialization_id(self) -> bytes:
        """40 decimal digits that identify the content, so the same tensors give the same file.

        torch combines the records' CRCs and name hashes; any content digest will do.
        """
        return f"{int.from_bytes(self._digest.digest(), 'big'):040d}".encode()

    def close(self) -> None:
        start = self._offset
        for entry in self._directory:
            self._put(entry)
        size = self._offset - start
        self._put(end_records(len(self._directory), start, size, ZIP_COMMENT))


# --- writing -----------------------------------------------------------------------------


class NewTensor:
    """A tensor of the output, to be streamed after the pickle: its stand-in in the object.

    Args:
        name: the tensor's name in the stream of arrays (prefix stripped).
        info: its shape and dtype.
    """

    __slots__ = ("info", "key", "name")

    def __init__(self, name: str, info: TensorInfo) -> None:
        self.name = name
        self.info = info
        self.key: str | None = None


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride = []
    step = 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


class _StorageRef:
    """A storage in the pickle, saved as its persistent id."""

    __slots__ = ("key", "kind", "numel")

    def __init__(self, kind: str, key: str, numel: int) -> None:
        self.kind, self.key, self.numel = kind, key, numel


class _Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2, as ``torch.save``: tensors as rebuild calls on persistent storages.

    Storages get keys ``"0"``, ``"1"``, ... in the order the pickle meets them, as
    torch numbers them; ``sources`` lists them in that order.
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, protocol=2)
        self.sources: list[NewTensor | _Storage] = []
        self._refs: dict[int, _StorageRef] = {}

    def _ref(self, source: NewTensor | _Storage, kind: str, numel: int) -> _StorageRef:
        ref = self._refs.get(id(source))
        if ref is None:
            ref = _StorageRef(kind, str(len(self.sources)), numel)
            self._refs[id(source)] = ref
            self.sources.append(source)
            if isinstance(source, NewTensor):
                source.key = ref.key
        return ref

    def persistent_id(self, obj: Any) -> tuple | None:
        if type(obj) is _StorageRef:
            return ("storage", _STORAGE_GLOBALS[obj.kind], obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is NewTensor:
            info = obj.info
            stride = _contiguous_stride(info.shape)
            if info.dtype in _STORAGE_OF:
                ref = self._ref(obj, _STORAGE_OF[info.dtype], info.size)
                return _REBUILD_V2, (ref, 0, info.shape, stride, False, OrderedDict())
            ref = self._ref(obj, _UNTYPED_STORAGE, info.nbytes)
            arguments = (ref, 0, info.shape, stride, False, OrderedDict())
            return _REBUILD_V3, (*arguments, _DTYPE_GLOBALS[info.dtype])
        if type(obj) is StoredTensor:
            storage = obj.storage
            ref = self._ref(storage, storage.kind, storage.numel)
            arguments = (ref, obj.offset, obj.shape, obj.stride, obj.requires_grad, OrderedDict())
            if storage.kind == _UNTYPED_STORAGE:
                rebuilt = (_REBUILD_V3, (*arguments, _DTYPE_GLOBALS[obj.dtype]))
            else:
                rebuilt = (_REBUILD_V2, arguments)
            if obj.is_parameter:
                # The parameter's data: the same tensor, rebuilt as a plain one.
                return _REBUILD_PARAMETER, (_Rebuilt(*rebuilt), obj.requires_grad, OrderedDict())
            return rebuilt
        return NotImplemented

    def save_standin(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def save_namespace(self, obj: PickledNamespace) -> None:
        # As pickle writes an argparse.Namespace: argparse.Namespace(), then its attributes.
        self.save(_NAMESPACE)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(dict(obj))
        self.write(pickle.BUILD)

    dispatch[_Global] = save_standin
    dispatch[PickledNamespace] = save_namespace


class _Rebuilt:
    """A reduce value pickled as given (the tensor inside a parameter)."""

    __slots__ = ("value",)

    def __init__(self, function: _Global, arguments: tuple) -> None:
        self.value = (function, arguments)

    def __reduce__(self) -> tuple:
        return self.value


def _pickle(obj: Any) -> tuple[bytes, list[NewTensor | _Storage]]:
    buffer = io.BytesIO()
    pickler = _Pickler(buffer)
    pickler.dump(obj)
    return buffer.getvalue(), pickler.sources


def _write_array(zip_writer: _ZipWriter, tensor: NewTensor, array: Any) -> None:
    info = tensor.info
    dtype = DTYPES[info.dtype]
    if isinstance(array, StreamedTensor):
        # Chunk by chunk as the engine computes them: no whole tensor in memory.
        chunks: Iterator[np.ndarray] = array.chunks()
    else:
        chunks = iter([np.asarray(array)])
    for chunk in chunks:
        data = np.ascontiguousarray(chunk, dtype=dtype).reshape(-1).view(np.uint8)
        for start in range(0, data.size, _COPY_BYTES):
            zip_writer.write(data[start : start + _COPY_BYTES].data)


def write(
    file: BinaryIO,
    obj: Any,
    new_tensors: list[NewTensor],
    arrays: Iterator[tuple[str, Any]],
) -> None:
    """Write ``obj`` as ``torch.save`` would, streaming the data of its new tensors.

    The pickle goes first: ``obj`` holds a :class:`NewTensor` for each tensor to come
    and may hold :class:`StoredTensor` values of a file read by :func:`load` (their
    storages are copied from that file). Then the storages, in key order: each new
    tensor's data as ``arrays`` yields it (in the order of ``new_tensors``), each stored
    one copied.

    Args:
        file: a binary file open for writing, at its start.
        obj: the object to save.
        new_tensors: the stand-ins in ``obj``, in the order their arrays come.
        arrays: ``(name, array)`` pairs, one per new tensor, in the same order; an
            array may be a :class:`StreamedTensor`.

    Raises:
        ValueError: the arrays do not match the new tensors (a bug of the caller).
        OSError: the file cannot be written.
    """
    pickled, sources = _pickle(obj)
    pending = iter(new_tensors)
    zip_writer = _ZipWriter(file)
    zip_writer.add(f"{_ARCHIVE}/data.pkl", pickled)
    zip_writer.add(f"{_ARCHIVE}/.format_version", b"1")
    zip_writer.add(f"{_ARCHIVE}/.storage_alignment", str(_ALIGNMENT).encode())
    zip_writer.add(f"{_ARCHIVE}/byteorder", b"little")
    for key, source in enumerate(sources):
        name = f"{_ARCHIVE}/data/{key}"
        if isinstance(source, _Storage):
            zip_writer.begin(name, source.data.size)
            for start in range(0, source.data.size, _COPY_BYTES):
                zip_writer.write(source.data[start : start + _COPY_BYTES].data)
            zip_writer.end()
            continue
        if next(pending, None) is not source:
            raise ValueError(f"tensor {source.name}: is not in the order of the arrays.")
        try:
            given, array = next(arrays)
        except StopIteration:
            raise ValueError(f"tensor {source.name}: was planned but never given.") from None
        if given != source.name or tuple(array.shape) != source.info.shape:
            raise ValueError(f"tensor {given}: does not match the planned {source.name}.")
        zip_writer.begin(name, source.info.nbytes)
        _write_array(zip_writer, source, array)
        zip_writer.end()
    missing = next(pending, None)
    if missing is not None:
        raise ValueError(f"tensor {missing.name}: is not in the object to save.")
    zip_writer.add(f"{_ARCHIVE}/version", _FILE_VERSION)
    zip_writer.add(f"{_ARCHIVE}/.data/serialization_id", zip_writer.serialization_id())
    zip_writer.close()
    extra = next(arrays, None)
    if extra is not None:
        raise ValueError(f"tensor {extra[0]}: was given but not planned.")
