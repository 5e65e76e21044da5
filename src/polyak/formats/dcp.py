"""torch.distributed.checkpoint (DCP) directories, read and written without torch.

A DCP directory is what ``torch.distributed.checkpoint.save`` writes (FSDP2, torchtitan's
``step-N/``, Megatron's ``torch_dist`` ``iter_XXXXXXX/``, accelerate's FSDP
``SHARDED_STATE_DICT`` ``pytorch_model_fsdp_0/``): a ``.metadata`` pickle and one or more
``__R_I.distcp`` files. The metadata lists every entry of the flattened state dict
(``model.0.weight``, ``optimizer.state.0.weight.exp_avg``, ``step``...): a tensor with its
global shape, dtype and chunks (the part each rank saved: offsets and sizes), or a
bytes entry (any other pickled object). For each chunk or bytes entry it says where
the payload lies: file, offset, length.

Reading:

- ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which knows only the
  records of ``torch.distributed.checkpoint.metadata`` (and ``filesystem._StorageInfo``;
  ``TensorProperties`` also under the ShardedTensor module path that torch 1.13 to 2.2
  wrote), ``torch.Size``, the dtypes, the layout and memory-format encodings and ``pathlib``
  paths, and builds plain Python records of them: it never imports or calls anything
  else. A pickle naming any other global is refused, naming it and the file, before
  anything of it runs. (torch itself reads the file with a plain ``pickle.load``.)
- A tensor chunk's payload is read directly from a memory map of its ``.distcp`` file:
  either a ``torch.save`` zip of the chunk (the default), parsed by polyak's own
  restricted reader (:func:`polyak.formats.torchzip.load_buffer`), or, for files
  written with ``FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)``,
  a safetensors blob holding every chunk of the file. A payload transformed by a
  storage extension (a ``transform_descriptors`` entry, e.g. compression) is refused
  by name.
- A tensor is assembled from its chunks by their offsets, so members saved with
  different world sizes give the same global tensors and average correctly. The
  averaging engine reads it through :meth:`DcpReader.read_flat` instead, range by
  range (:class:`FlatChunks`), so it never holds a whole tensor of a member.
- Bytes entries (learning rates, step counters, RNG states, ``_extra_state``) are never
  unpickled; the DCP writer copies them from the newest member byte for byte.

Everything the metadata says is checked before use: each payload file is a plain file
of the directory, each payload lies inside its file, no storage transform, and each
tensor's chunks tile it exactly (inside its shape, no overlap, no hole).

What is averaged: a DCP step holds the model and usually the optimizer state and more.
By default the reader takes the ``model`` subtree when there is one (FSDP2 with
``{"model": ..., "optimizer": ...}``, accelerate), else the top-level tensors outside
the subtrees in ``NON_MODEL_SUBTREES`` (torchtitan and Megatron save the model's entries
at the top level, beside ``optimizer``, ``lr_scheduler``...). ``key`` (CLI ``--key``)
selects another subtree, e.g. ``key="optimizer"``; optimizer state is never averaged
unless asked for this way. :attr:`DcpReader.selection` says which subtree was taken.

Writing (:func:`write_dcp`): one ``__0_0.distcp`` file holding each averaged tensor as
one chunk (a ``torch.save`` zip payload, streamed as the engine computes it), and a
``.metadata`` that ``torch.distributed.checkpoint.load`` reads into the same model on
any number of ranks. Everything else of the newest member (optimizer state, step,
bytes entries) is copied into it unless ``keep_other=False``. Under torchrun the
entries are split into one contiguous run per process, each written to that
process's ``__p_0.distcp``: the same payloads, spread over P files.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import pickle
import re
import reprlib
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from polyak.distributed import ProcessGroup, split_by_cost  # split_by_cost: its home was here
from polyak.errors import CheckpointError, OutputError
from polyak.formats import torchzip
from polyak.formats.base import DTYPES, CheckpointReader, PlannedTensors, ReaderBase, TensorInfo

__all__ = [
    "METADATA_NAME",
    "NON_MODEL_SUBTREES",
    "DcpReader",
    "rank_file",
    "read_metadata",
    "split_by_cost",
    "write_dcp",
]

METADATA_NAME = ".metadata"
# Top-level entries of a DCP step that are not the model's weights.
NON_MODEL_SUBTREES = (
    "optimizer",
    "optimizers",
    "optim",
    "optimizer_state",
    "lr_scheduler",
    "lr_schedulers",
    "scheduler",
    "dataloader",
    "train_state",
    "rng_state",
    "rng",
    "ema",
    "model_ema",
    "step",
    "epoch",
    "args",
)
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_FILESYSTEM_MODULE = "torch.distributed.checkpoint.filesystem"
# torch 1.13 to 2.2 pickled TensorProperties (and its memory-format encoding, then
# named MEM_FORMAT_ENCODING) from ShardedTensor's module; torch 2.3 (pytorch PR
# #116248) gave DCP its own copy of the same five-field record, which every later
# torch writes. The other records have lived in _METADATA_MODULE and
# _FILESYSTEM_MODULE since torch 1.13. Only these old names are accepted beside the
# current ones; anything else of ShardedTensor's module is refused like any global.
_SHARDED_TENSOR_MODULE = "torch.distributed._shard.sharded_tensor.metadata"
_OLD_RECORDS = {(_SHARDED_TENSOR_MODULE, "TensorProperties")}
_RECORDS = (
    _OLD_RECORDS
    | {
        (_METADATA_MODULE, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
        )
    }
    | {(_FILESYSTEM_MODULE, "_StorageInfo")}
)
# Every dtype torch has, so a checkpoint holding an unsupported one is described, not refused.
_TORCH_DTYPES = (
    *DTYPES,
    "complex32", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4", "bits8", "bits16",
    "bits1x8", "bits2x4", "bits4x2", "int1", "int2", "int3", "int4", "int5",
    "int6", "int7", "uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7",
)  # fmt: skip
_TENSOR_PROPERTIES = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_SAFE_FILE_NAME = re.compile(r"[^/\\\x00]+")
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")
_TOP = re.compile(r"[./]")
_ZIP_MAGIC = b"PK\x03\x04"
_COPY_BYTES = 64 << 20


# --- reading .metadata -------------------------------------------------------------------


class _Refused(Exception):
    """The pickle does something the metadata of a DCP checkpoint never does."""


class _Class:
    """An allowlisted class: NEWOBJ makes a :class:`_Record` of it; nothing is imported."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class _Record:
    """An instance of an allowlisted class: its class name and its fields, plain data."""

    __slots__ = ("fields", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.fields: dict[str, Any] = {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


class _Dtype:
    """A torch dtype, known by its name."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _size(values: object = ()) -> tuple[int, ...]:
    if type(values) not in (tuple, list) or not all(
        type(v) is int and v >= 0
        for v in values  # type: ignore[union-attr]
    ):
        raise _Refused("torch.Size of something other than non-negative integers")
    return tuple(values)  # type: ignore[arg-type]


def _layout(name: object) -> str:
    if name != "torch.strided":
        raise _Refused(f"tensor layout {reprlib.repr(name)} (polyak reads dense, strided tensors)")
    return name


def _memory_format(value: object) -> int:
    if type(value) is not int:
        raise _Refused("memory format other than an integer code")
    return value


def _path(*parts: object) -> str:
    if not all(type(part) is str for part in parts):
        raise _Refused("path made of something other than strings")
    return "/".join(parts)  # type: ignore[arg-type]


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _layout,
    (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): _memory_format,
    (_SHARDED_TENSOR_MODULE, "MEM_FORMAT_ENCODING"): _memory_format,  # torch <= 2.2
    ("pathlib", "PosixPath"): _path,
    ("pathlib", "WindowsPath"): _path,
    ("pathlib", "PurePosixPath"): _path,
    ("pathlib", "Path"): _path,
}
_GLOBALS: dict[tuple[str, str], Any] = {
    **_FUNCTIONS,
    **{key: _Class(*key) for key in _RECORDS},
    **{("torch", name): _Dtype(name) for name in _TORCH_DTYPES},
}
_CALLABLE = frozenset(id(function) for function in _FUNCTIONS.values())

_OPCODES = frozenset(
    code[0]
    for code in (
        pickle.PROTO, pickle.FRAME, pickle.STOP, pickle.GLOBAL, pickle.STACK_GLOBAL,
        pickle.REDUCE, pickle.BUILD, pickle.NEWOBJ, pickle.APPEND, pickle.APPENDS,
        pickle.SETITEM, pickle.SETITEMS, pickle.MARK, pickle.TUPLE, pickle.TUPLE1,
        pickle.TUPLE2, pickle.TUPLE3, pickle.NONE, pickle.NEWFALSE, pickle.NEWTRUE,
        pickle.EMPTY_TUPLE, pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.BININT,
        pickle.BININT1, pickle.BININT2, pickle.LONG1, pickle.BINFLOAT, pickle.BINUNICODE,
        pickle.SHORT_BINUNICODE, pickle.BINUNICODE8, pickle.BINGET, pickle.LONG_BINGET,
        pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE,
    )
)  # fmt: skip


class _MetadataUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler, cut down to what a DCP ``.metadata`` holds.

    Globals resolve to stand-ins from ``_GLOBALS`` (nothing is imported); NEWOBJ makes
    a :class:`_Record` of an allowlisted class, BUILD fills its fields, REDUCE calls
    only the checking functions of ``_FUNCTIONS``. Anything else raises ``_Refused``.
    """

    dispatch: ClassVar[dict] = {
        code: op for code, op in pickle._Unpickler.dispatch.items() if code in _OPCODES
    }

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"global {module}.{name}") from None

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(cls) is not _Class or args != ():
            raise _Refused("NEWOBJ of something other than a checkpoint metadata record")
        self.append(_Record(cls.name))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        function = self.stack[-1]
        if id(function) not in _CALLABLE or type(args) is not tuple:
            raise _Refused("a call of something other than torch.Size or an encoding")
        self.stack[-1] = function(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        record = self.stack[-1]
        if type(record) is not _Record:
            raise _Refused("BUILD on something other than a metadata record")
        if type(state) is tuple and record.kind == "TensorProperties":
            state = dict(zip(_TENSOR_PROPERTIES, state, strict=False))
        elif type(state) is tuple and len(state) == 2:  # (dict state, slot state)
            merged: dict = {}
            for part in state:
                if part is not None and type(part) is not dict:
                    raise _Refused("malformed record state")
                merged.update(part or {})
            state = merged
        if type(state) is not dict or not all(type(key) is str for key in state):
            raise _Refused("malformed record state")
        record.fields.update(state)

    def load_setitem(self) -> None:
        if type(self.stack[-3]) is not dict:
            raise _Refused("SETITEM on something other than a dict")
        super().load_setitem()

    def load_setitems(self) -> None:
        if type(self.metastack[-1][-1]) is not dict:
            raise _Refused("SETITEMS on something other than a dict")
        super().load_setitems()

    def load_append(self) -> None:
        if type(self.stack[-2]) is not list:
            raise _Refused("APPEND to something other than a list")
        super().load_append()

    def load_appends(self) -> None:
        if type(self.metastack[-1][-1]) is not list:
            raise _Refused("APPENDS to something other than a list")
        super().load_appends()

    for _code, _method in (
        (pickle.NEWOBJ, load_newobj),
        (pickle.REDUCE, load_reduce),
        (pickle.BUILD, load_build),
        (pickle.SETITEM, load_setitem),
        (pickle.SETITEMS, load_setitems),
        (pickle.APPEND, load_append),
        (pickle.APPENDS, load_appends),
    ):
        dispatch[_code[0]] = _method
    del _code, _method


@dataclass(frozen=True)
class Payload:
    """Where one chunk or bytes entry lies: a file of the directory, offset and length."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """One saved part of a tensor: its place in the global tensor and its payload."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    payload: Payload

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))


@dataclass(frozen=True)
class Entry:
    """One entry of the flattened state dict: a tensor (``dtype`` set) or bytes."""

    name: str
    path: tuple
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    payload: Payload | None = None  # bytes entries

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    @property
    def nbytes(self) -> int:
        if self.dtype in DTYPES:
            return math.prod(self.shape) * DTYPES[self.dtype].itemsize
        return 0


@dataclass(frozen=True)
class Metadata:
    """A checked ``.metadata``: its entries in the file's order, and its version."""

    entries: dict[str, Entry]
    version: str | None


def _fail(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {reason}")


def _unpickle(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _fail(path, f"cannot be read ({error.strerror}).") from None
    try:
        return _MetadataUnpickler(data).load()
    except _Refused as refused:
        raise _fail(
            path,
            f"refused to unpickle {refused}. A DCP .metadata holds only the records of "
            "torch.distributed.checkpoint.metadata, and polyak never runs other code from a "
            "checkpoint; this file is damaged or hostile (do not load it with torch either).",
        ) from None
    except Exception as error:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise _fail(path, f"is not a readable DCP .metadata pickle ({reason}).") from None


def _record(value: Any, kind: str, path: Path, what: str) -> _Record:
    if type(value) is not _Record or value.kind != kind:
        raise _fail(path, f"{what} is not a {kind} record.")
    return value


def _int_tuple(value: Any, path: Path, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or not all(type(v) is int and v >= 0 for v in value):
        raise _fail(path, f"{what} is not a tuple of non-negative integers.")
    return value


def _payload(info: Any, directory: Path, path: Path, name: str, sizes: dict[str, int]) -> Payload:
    info = _record(info, "_StorageInfo", path, f"the storage of {name}")
    file = info.get("relative_path")
    offset, length = info.get("offset"), info.get("length")
    if type(file) is not str or not _SAFE_FILE_NAME.fullmatch(file) or file in (".", ".."):
        raise _fail(
            path,
            f"entry {name} names the payload file {reprlib.repr(file)}, which is not a file of the "
            "checkpoint directory; refused.",
        )
    transforms = info.get("transform_descriptors")
    if transforms:
        names = (
            ", ".join(t if type(t) is str and len(t) <= 40 else reprlib.repr(t) for t in transforms)
            if type(transforms) in (list, tuple)
            else reprlib.repr(transforms)
        )
        raise _fail(
            path,
            f"entry {name} is stored with the transform(s) {names}, "
            "which polyak does not read (it reads payloads as torch.distributed.checkpoint "
            "writes them by default). Save without storage extensions.",
        )
    if file not in sizes:
        try:  # lstat: a symbolic link is not a regular file, and is not followed
            status = os.lstat(directory / file)
        except OSError:  # missing, or a name the file system refuses (too long...)
            status = None
        if status is None or not stat.S_ISREG(status.st_mode):
            raise _fail(
                path,
                f"entry {name} is stored in {reprlib.repr(file)}, which is missing (or a "
                "symbolic link, which polyak does not follow out of a checkpoint directory).",
            )
        sizes[file] = status.st_size
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise _fail(path, f"entry {name} has a malformed offset or length.")
    if offset + length > sizes[file]:
        raise _fail(
            directory / file,
            f"entry {name} lies at bytes {offset}..{offset + length} of the file, beyond its "
            f"end ({sizes[file]} bytes); the file is truncated or the metadata damaged.",
        )
    return Payload(file, offset, length)


def _check_tiling(name: str, shape: tuple[int, ...], chunks: list[Chunk], path: Path) -> None:
    """The chunks lie inside the tensor, do not overlap and cover it."""
    total = math.prod(shape)
    covered = 0
    for chunk in chunks:
        if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
            raise _fail(path, f"tensor {name}: a chunk has the wrong number of dimensions.")
        if any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, shape, strict=True)):
            raise _fail(
                path,
                f"tensor {name}: the chunk at {list(chunk.offsets)} of size "
                f"{list(chunk.sizes)} reaches outside its shape {list(shape)}.",
            )
        covered += math.prod(chunk.sizes)
    ordered = sorted(chunks, key=lambda chunk: chunk.offsets)
    for index, first in enumerate(ordered):
        for second in ordered[index + 1 :]:
            if len(shape) and second.offsets[0] >= first.offsets[0] + first.sizes[0]:
                break  # sorted by the first offset: no later chunk overlaps ``first``
            if all(
                a < c + d and c < a + b
                for a, b, c, d in zip(
                    first.offsets, first.sizes, second.offsets, second.sizes, strict=True
                )
            ) and min(first.sizes + second.sizes, default=1):
                raise _fail(
                    path,
                    f"tensor {name}: the chunks at {list(first.offsets)} and "
                    f"{list(second.offsets)} overlap.",
                )
    if covered != total:
        raise _fail(
            path,
            f"tensor {name}: its chunks cover {covered} of its {total} elements; the "
            "checkpoint is incomplete (a rank's part is missing).",
        )


def read_metadata(path: str | Path) -> Metadata:
    """Read and check a DCP ``.metadata`` file without running any code it names.

    Args:
        path: the ``.metadata`` file; its payload files are looked for beside it.

    Raises:
        CheckpointError: the pickle names anything outside the allowlist, is malformed,
            or describes payloads outside the directory or its files, storage
            transforms, or chunks that do not tile their tensor.
    """
    path = Path(path)
    directory = path.parent
    metadata = _record(_unpickle(path), "Metadata", path, "the pickled object")
    tensors = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data")
    planner = metadata.get("planner_data") or {}
    if type(tensors) is not dict or type(storage) is not dict or type(planner) is not dict:
        raise _fail(path, "the metadata lacks its state_dict_metadata or storage_data.")
    where: dict[tuple[str, tuple | None], Any] = {}
    for index, info in storage.items():
        index = _record(index, "MetadataIndex", path, "a storage key")
        fqn, offset = index.get("fqn"), index.get("offset")
        if type(fqn) is not str:
            raise _fail(path, "a storage key has a name (fqn) that is not a string.")
        if offset is not None:
            offset = _int_tuple(offset, path, f"the offset of the storage key of {fqn}")
        where[(fqn, offset)] = info
    sizes: dict[str, int] = {}
    entries: dict[str, Entry] = {}
    for name, value in tensors.items():
        if type(name) is not str:
            raise _fail(path, f"entry {reprlib.repr(name)} has a name that is not a string.")
        planned = planner.get(name)
        tree = planned if type(planned) is tuple else tuple(name.split("."))
        if type(value) is _Record and value.kind == "BytesStorageMetadata":
            if (name, None) not in where:
                raise _fail(path, f"entry {name} has no storage record.")
            payload = _payload(where[(name, None)], directory, path, name, sizes)
            entries[name] = Entry(name, tree, payload=payload)
            continue
        value = _record(value, "TensorStorageMetadata", path, f"entry {name}")
        properties = _record(value.get("properties"), "TensorProperties", path, name)
        dtype = properties.get("dtype")
        if type(dtype) is not _Dtype:
            raise _fail(path, f"tensor {name} has no dtype.")
        shape = _int_tuple(value.get("size"), path, f"the shape of tensor {name}")
        chunks = []
        listed = value.get("chunks")
        if type(listed) is not list:
            raise _fail(path, f"tensor {name} has no list of chunks.")
        for chunk in listed:
            chunk = _record(chunk, "ChunkStorageMetadata", path, f"a chunk of {name}")
            offsets = _int_tuple(chunk.get("offsets"), path, f"a chunk offset of {name}")
            chunk_sizes = _int_tuple(chunk.get("sizes"), path, f"a chunk size of {name}")
            info = where.get((name, offsets))
            if info is None:
                raise _fail(path, f"tensor {name}: the chunk at {list(offsets)} has no storage.")
            payload = _payload(info, directory, path, name, sizes)
            declared = math.prod(chunk_sizes) * (
                DTYPES[dtype.name].itemsize if dtype.name in DTYPES else 0
            )
            if payload.length < declared:
                # Checked before anything is allocated for the tensor.
                raise _fail(
                    directory / payload.file,
                    f"tensor {name}: the chunk at {list(offsets)} declares {declared} bytes, "
                    f"but its payload holds {payload.length}; the metadata is damaged.",
                )
            chunks.append(Chunk(offsets, chunk_sizes, payload))
        _check_tiling(name, shape, chunks, path)
        entries[name] = Entry(name, tree, dtype.name, shape, tuple(chunks))
    version = metadata.get("version")
    return Metadata(entries, version if type(version) is str else None)


# --- the reader ----------------------------------------------------------------------------


def _in_subtree(name: str, key: str) -> bool:
    return name == key or name.startswith(key + ".")


class DcpReader(ReaderBase):
    """Reads one subtree of a DCP directory, tensor by tensor, assembled from its chunks.

    Attributes:
        path: the ``.metadata`` file.
        directory: the checkpoint directory.
        format: ``"dcp"``.
        key: the subtree read (its names are stripped of ``key + "."``), or None for the
            top-level tensors outside ``NON_MODEL_SUBTREES``.
        selection: in words, which subtree was taken.
        entries: every entry of the checkpoint, by its full name.
        extras: the bytes entries inside the subtree, by full name (never unpickled).

    Args:
        path: the checkpoint directory or its ``.metadata`` file.
        key: the subtree to read, e.g. ``"optimizer"`` or ``"model"``; a dotted prefix
            such as ``"optimizer.state"`` works too. By default ``model``, or the
            top-level model entries (see the module docstring).

    Raises:
        CheckpointError: the metadata is refused or damaged (see :func:`read_metadata`),
            ``key`` holds no tensors, or a tensor of the subtree has a dtype polyak
            does not support.
    """

    format = "dcp"

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        path = Path(path)
        self.path = path / METADATA_NAME if path.is_dir() else path
        self.directory = self.path.parent
        metadata = read_metadata(self.path)
        self.entries = metadata.entries
        self.version = metadata.version
        self.key, self.selection = self._select(key)
        self._tensors: dict[str, Entry] = {}
        self.extras: dict[str, Entry] = {}
        for name, entry in self.entries.items():
            if not self.selects(name):
                continue
            if not entry.is_tensor:
                self.extras[name] = entry
                continue
            if entry.dtype not in DTYPES:
                raise _fail(
                    self.path,
                    f"tensor {name} has dtype {entry.dtype}, which polyak does not average "
                    f"(supported: {', '.join(DTYPES)}). Select another subtree with --key.",
                )
            self._tensors[self.short_name(name)] = entry
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray]] = {}
        self._safetensors_headers: dict[tuple[str, int], tuple[int, dict]] = {}

    # -- selection --

    def subtrees(self) -> dict[str, dict[str, int]]:
        """Per top-level subtree: its tensors, their bytes, and its bytes entries."""
        found: dict[str, dict[str, int]] = {}
        for entry in self.entries.values():
            top = self._top(entry.name)
            counts = found.setdefault(top, {"tensors": 0, "bytes": 0, "byte_entries": 0})
            if entry.is_tensor:
                counts["tensors"] += 1
                counts["bytes"] += entry.nbytes
            else:
                counts["byte_entries"] += 1
        return found

    def _top(self, name: str) -> str:
        # From the name, not the planner's path: Megatron's keys are flat dotted names
        # ("optimizer.state.exp_avg.decoder...") that the planner keeps as one key.
        return _TOP.split(name, maxsplit=1)[0]

    def selects(self, name: str) -> bool:
        """Whether the entry of this full name belongs to the subtree read."""
        if self.key is not None:
            return _in_subtree(name, self.key)
        return self._top(name) not in NON_MODEL_SUBTREES

    def short_name(self, name: str) -> str:
        """The name of a selected entry as the reader lists it (``key + "."`` stripped)."""
        return name if self.key is None or name == self.key else name[len(self.key) + 1 :]

    def full_name(self, short: str) -> str:
        """The entry's name in the checkpoint of a name the reader lists."""
        return short if self.key is None else f"{self.key}.{short}"

    def _select(self, key: str | None) -> tuple[str | None, str]:
        subtrees = self.subtrees()
        listed = ", ".join(
            f"{name} ({counts['tensors']} tensors)" for name, counts in subtrees.items()
        )
        if key is not None:
            if not any(e.is_tensor and _in_subtree(n, key) for n, e in self.entries.items()):
                raise _fail(
                    self.path,
                    f"has no tensors under {key!r}. Its subtrees are: {listed}. Pass one of "
                    "them as key=... (CLI --key).",
                )
            return key, f"subtree {key!r} (as asked)"
        if any(e.is_tensor and _in_subtree(n, "model") for n, e in self.entries.items()):
            return "model", "subtree 'model' (the model's weights)"
        left_out = sorted(name for name in subtrees if name in NON_MODEL_SUBTREES)
        kept = [n for n, e in self.entries.items() if e.is_tensor and self._top(n) not in left_out]
        if not kept:
            raise _fail(
                self.path,
                f"found no model weights: its subtrees are {listed}, and polyak averages "
                "optimizer state only when asked. Pass the subtree to average as key=... "
                "(CLI --key).",
            )
        without = f", without {', '.join(left_out)}" if left_out else ""
        return None, f"the top-level model entries{without}"

    # -- reading --

    def names(self) -> list[str]:
        return list(self._tensors)

    def entry(self, name: str) -> Entry:
        try:
            return self._tensors[name]
        except KeyError:
            raise _fail(
                self.path, f"has no tensor {name!r} ({len(self._tensors)} tensors, see names())."
            ) from None

    def info(self, name: str) -> TensorInfo:
        entry = self.entry(name)
        return TensorInfo(entry.shape, entry.dtype)  # type: ignore[arg-type]

    def world_size(self) -> int:
        """How many ranks saved the checkpoint (its payload files' rank numbers)."""
        ranks = set()
        for entry in self.entries.values():
            for payload in [chunk.payload for chunk in entry.chunks] + [entry.payload]:
                if payload is not None:
                    match = _RANK_FILE.fullmatch(payload.file)
                    ranks.add(match.group(1) if match else payload.file)
        return len(ranks)

    def file_buffer(self, file: str) -> np.ndarray:
        """The bytes of one payload file, a read-only memory map."""
        if file not in self._maps:
            with open(self.directory / file, "rb") as handle:
                if handle.seek(0, io.SEEK_END) == 0:
                    self._maps[file] = (None, np.zeros(0, np.uint8))  # type: ignore[assignment]
                else:
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                    self._maps[file] = (mapped, np.frombuffer(mapped, np.uint8))
        return self._maps[file][1]

    def payload_bytes(self, payload: Payload) -> np.ndarray:
        """The raw bytes of one payload (a view of the memory map)."""
        buffer = self.file_buffer(payload.file)
        return buffer[payload.offset : payload.offset + payload.length]

    def chunk_array(self, entry: Entry, chunk: Chunk) -> np.ndarray:
        """One chunk's data, read-only, shaped as the chunk."""
        where = self.directory / chunk.payload.file
        data = self.payload_bytes(chunk.payload)
        if data[:4].tobytes() == _ZIP_MAGIC:
            try:
                stored = torchzip.load_buffer(data)
            except torchzip.NotFastPath as reason:
                raise _fail(
                    where,
                    f"tensor {entry.name}: the chunk at {list(chunk.offsets)} cannot be read "
                    f"({reason}).",
                ) from None
            if type(stored) is not torchzip.StoredTensor:
                raise _fail(where, f"tensor {entry.name}: the chunk's payload is not a tensor.")
            array = stored.numpy()
            got_dtype = stored.dtype
        else:
            array = self._safetensors_chunk(entry, chunk, where)
            got_dtype = str(entry.dtype)
        if got_dtype != entry.dtype or tuple(array.shape) != chunk.sizes:
            raise _fail(
                where,
                f"tensor {entry.name}: the chunk at {list(chunk.offsets)} holds "
                f"{list(array.shape)} {got_dtype}; the metadata says {list(chunk.sizes)} "
                f"{entry.dtype}.",
            )
        return array

    def _safetensors_chunk(self, entry: Entry, chunk: Chunk, where: Path) -> np.ndarray:
        buffer = self.file_buffer(chunk.payload.file)
        start = chunk.payload.offset
        cached = self._safetensors_headers.get((chunk.payload.file, start))
        if cached is None:
            try:
                (length,) = struct.unpack("<Q", buffer[start : start + 8].tobytes())
                if start + 8 + length > buffer.size:
                    raise ValueError("the header reaches beyond the file")
                header = json.loads(buffer[start + 8 : start + 8 + length].tobytes())
                if type(header) is not dict:
                    raise ValueError("the header is not a JSON object")
            except (struct.error, ValueError) as error:
                raise _fail(
                    where,
                    f"tensor {entry.name}: the payload at byte {start} is neither a torch.save "
                    f"zip nor a safetensors blob ({error}).",
                ) from None
            cached = (start + 8 + length, header)
            self._safetensors_headers[(chunk.payload.file, start)] = cached
        data_start, header = cached
        described = header.get(entry.name)
        sharding = header.get("__metadata__", {}).get("DCP_SHARDING_INFO")
        try:
            saved = json.loads(sharding)[entry.name]["saved_offsets"] if sharding else None
        except (ValueError, KeyError, TypeError):
            saved = None
        if type(described) is not dict or (saved is not None and tuple(saved) != chunk.offsets):
            raise _fail(
                where,
                f"tensor {entry.name}: the safetensors blob at byte {start} holds no chunk at "
                f"{list(chunk.offsets)}.",
            )
        dtype = _SAFETENSORS_DTYPES.get(described.get("dtype"))
        begin, end = described.get("data_offsets", (0, -1))
        shape = tuple(described.get("shape", ()))
        if dtype is None or not 0 <= begin <= end or data_start + end > buffer.size:
            raise _fail(where, f"tensor {entry.name}: its safetensors entry is malformed.")
        numpy_dtype = DTYPES[dtype]
        if (end - begin) != math.prod(shape) * numpy_dtype.itemsize:
            raise _fail(where, f"tensor {entry.name}: its safetensors entry has the wrong size.")
        if dtype != entry.dtype:
            raise _fail(
                where, f"tensor {entry.name}: stored as {dtype}; the metadata says {entry.dtype}."
            )
        array = buffer[data_start + begin : data_start + end].view(numpy_dtype).reshape(shape)
        return array

    def read_entry(self, entry: Entry) -> np.ndarray:
        """A whole tensor entry (of any subtree), assembled from its chunks by their offsets."""
        if len(entry.chunks) == 1:
            return self.chunk_array(entry, entry.chunks[0])  # covers the tensor (checked)
        whole = np.empty(entry.shape, DTYPES[str(entry.dtype)])
        for chunk in entry.chunks:
            whole[chunk.slices] = self.chunk_array(entry, chunk)
        whole.flags.writeable = False
        return whole

    def read(self, name: str) -> np.ndarray:
        return self.read_entry(self.entry(name))

    def read_flat(self, name: str) -> np.ndarray | FlatChunks:
        """The tensor flattened, for slicing ``[start:stop]`` without assembling it whole.

        A tensor stored as one chunk is a flat view of its payload; otherwise a
        :class:`FlatChunks` over its chunks' payload views.
        """
        entry = self.entry(name)
        if len(entry.chunks) == 1:
            return self.chunk_array(entry, entry.chunks[0]).reshape(-1)
        parts = [(chunk, self.chunk_array(entry, chunk)) for chunk in entry.chunks]
        return FlatChunks(entry, parts)

    def close(self) -> None:
        maps, self._maps = self._maps, {}
        for mapped, _ in maps.values():
            if mapped is not None:
                try:
                    mapped.close()
                except BufferError:  # an array still views it; it closes when collected
                    pass


class FlatChunks:
    """A chunked tensor seen flat: ``[start:stop]`` gives that range as an array.

    The range's rows (first dimension) are gathered from the chunks that hold them into
    a buffer reused from call to call, or, when one chunk holds them whole (FSDP's
    row shards), returned as a view of its payload. So slicing a tensor chunk by chunk
    never holds more than a few rows of it. A slice is valid until the next one.
    """

    def __init__(self, entry: Entry, parts: list[tuple[Chunk, np.ndarray]]) -> None:
        self.shape = entry.shape
        self.dtype = DTYPES[str(entry.dtype)]
        self.size = math.prod(self.shape)
        self._row = math.prod(self.shape[1:])
        self._parts = sorted(parts, key=lambda part: part[0].offsets)
        self._buffer = np.empty(0, self.dtype)

    def reshape(self, *shape: object) -> FlatChunks:
        if shape not in ((-1,), ((-1,),)):
            raise ValueError("a FlatChunks is only ever flat.")
        return self

    def __len__(self) -> int:
        return self.size

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[0 : self.size].copy()
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def views(self, start: int, stop: int) -> list[np.ndarray]:
        """The chunks' rows that hold ``[start:stop]``, as views: nothing is gathered.

        What slicing that range will read (whole rows of each chunk), for
        :class:`polyak.formats.prefetch.Prefetcher`.
        """
        if stop <= start:
            return []
        first, last = start // self._row, -(-stop // self._row)  # rows [first, last)
        views = []
        for chunk, array in self._parts:
            low, high = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            top, bottom = max(first, low), min(last, high)
            if top < bottom:
                views.append(array[top - low : bottom - low])
        return views

    def __getitem__(self, key: slice) -> np.ndarray:
        if type(key) is not slice or key.step not in (None, 1):
            raise TypeError("a FlatChunks is sliced [start:stop] only.")
        start, stop, _ = key.indices(self.size)
        if stop <= start:
            return np.empty(0, self.dtype)
        first, last = start // self._row, -(-stop // self._row)  # rows [first, last)
        for chunk, array in self._parts:
            whole_rows = chunk.sizes[1:] == self.shape[1:]
            low = chunk.offsets[0]
            if whole_rows and low <= first and last <= low + chunk.sizes[0]:
                begin = start - low * self._row
                return array.reshape(-1)[begin : begin + stop - start]
        needed = (last - first) * self._row
        if self._buffer.size < needed:
            self._buffer = np.empty(needed, self.dtype)
        rows = self._buffer[:needed].reshape(last - first, *self.shape[1:])
        for chunk, array in self._parts:
            low, high = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            top, bottom = max(first, low), min(last, high)
            if top < bottom:
                target = (slice(top - first, bottom - first), *chunk.slices[1:])
                rows[target] = array[top - low : bottom - low]
        begin = start - first * self._row
        return self._buffer[begin : begin + stop - start]


# --- writing -------------------------------------------------------------------------------


class _Object:
    """An object of a torch class in the output pickle: NEWOBJ, then BUILD with ``state``."""

    __slots__ = ("module", "name", "state")

    def __init__(self, module: str, name: str, state: Any) -> None:
        self.module, self.name, self.state = module, name, state


class _Call:
    """``module.name(*args)`` in the output pickle (REDUCE)."""

    __slots__ = ("args", "module", "name")

    def __init__(self, module: str, name: str, args: tuple) -> None:
        self.module, self.name, self.args = module, name, args


class _Reference:
    """A global (a dtype) in the output pickle."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class _MetadataPickler(pickle._Pickler):  # type: ignore[name-defined]
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _global(self, module: str, name: str) -> None:
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def save_object(self, obj: _Object) -> None:
        self._global(obj.module, obj.name)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def save_call(self, obj: _Call) -> None:
        self._global(obj.module, obj.name)
        self.save(obj.args)
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def save_reference(self, obj: _Reference) -> None:
        self._global(obj.module, obj.name)
        self.memoize(obj)

    dispatch[_Object] = save_object
    dispatch[_Call] = save_call
    dispatch[_Reference] = save_reference


def _torch_size(values: tuple[int, ...]) -> _Call:
    return _Call("torch", "Size", (tuple(values),))


def _tensor_metadata(dtype: str, shape: tuple[int, ...], chunks: list[_Object]) -> _Object:
    properties = _Object(
        _METADATA_MODULE,
        "TensorProperties",
        (
            _Reference("torch", dtype),
            _Call("torch.serialization", "_get_layout", ("torch.strided",)),
            False,
            _Call(_METADATA_MODULE, "_MEM_FORMAT_ENCODING", (0,)),
            False,
        ),
    )
    state = {"properties": properties, "size": _torch_size(shape), "chunks": chunks}
    return _Object(_METADATA_MODULE, "TensorStorageMetadata", state)


def _chunk_metadata(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> _Object:
    state = {"offsets": _torch_size(offsets), "sizes": _torch_size(sizes)}
    return _Object(_METADATA_MODULE, "ChunkStorageMetadata", state)


def _index(name: str, offsets: tuple[int, ...] | None) -> _Object:
    state = {
        "fqn": name,
        "offset": None if offsets is None else _torch_size(offsets),
        "index": None if offsets is None else 0,
    }
    return _Object(_METADATA_MODULE, "MetadataIndex", state)


def _storage_info(file: str, offset: int, length: int) -> _Object:
    state = {
        "relative_path": file,
        "offset": offset,
        "length": length,
        "transform_descriptors": None,
    }
    return _Object(_FILESYSTEM_MODULE, "_StorageInfo", state)


def rank_file(rank: int) -> str:
    """The payload file process ``rank`` writes: ``__0_0.distcp`` as one process writes."""
    return f"__{rank}_0.distcp"


@dataclass(frozen=True)
class _Written:
    """One entry as written into a payload file: plain data, gathered for ``.metadata``.

    A tensor has ``dtype``, ``shape`` and its chunks as ``(offsets, sizes, start,
    length)``; a bytes entry has ``dtype`` None and one chunk ``((), (), start, length)``.
    """

    name: str
    tree: tuple
    file: str
    dtype: str | None
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], int, int], ...]


class _Output:
    """One ``.distcp`` file being written, and what it holds."""

    def __init__(self, file: BinaryIO, name: str) -> None:
        self.file = file
        self.name = name
        self.written: list[_Written] = []

    def _payload(self, write: Any) -> tuple[int, int]:
        start = self.file.tell()
        write()
        return start, self.file.tell() - start

    def tensor(self, name: str, tree: tuple, info: TensorInfo, array: Any) -> None:
        """One whole tensor as one chunk, streamed into a torch.save zip payload."""
        zeros = (0,) * len(info.shape)
        self.chunk(name, tree, info, [(zeros, info.shape, array)])

    def chunk(self, name: str, tree: tuple, info: TensorInfo, parts: list) -> None:
        """A tensor saved as ``parts``: ``(offsets, sizes, array)`` each."""
        chunks = []
        for offsets, sizes, array in parts:
            stand_in = torchzip.NewTensor(name, TensorInfo(tuple(sizes), info.dtype))
            start, length = self._payload(
                lambda s=stand_in, a=array: torchzip.write(self.file, s, [s], iter([(name, a)]))
            )
            chunks.append((tuple(offsets), tuple(sizes), start, length))
        self.written.append(
            _Written(name, tree, self.name, info.dtype, tuple(info.shape), tuple(chunks))
        )

    def raw(self, name: str, tree: tuple, data: np.ndarray) -> None:
        """A bytes entry, copied as it is."""

        def copy() -> None:
            for begin in range(0, data.size, _COPY_BYTES):
                self.file.write(data[begin : begin + _COPY_BYTES].data)

        start, length = self._payload(copy)
        self.written.append(_Written(name, tree, self.name, None, (), (((), (), start, length),)))


def _metadata(written: Iterable[_Written], version: str | None) -> bytes:
    """The ``.metadata`` pickle of everything written, in the order given."""
    tensors: dict[str, _Object] = {}
    storage: dict[_Object, _Object] = {}
    planner: dict[str, tuple] = {}
    for entry in written:
        if entry.dtype is None:
            (_, _, start, length) = entry.chunks[0]
            tensors[entry.name] = _Object(_METADATA_MODULE, "BytesStorageMetadata", {})
            storage[_index(entry.name, None)] = _storage_info(entry.file, start, length)
        else:
            chunks = []
            for offsets, sizes, start, length in entry.chunks:
                chunks.append(_chunk_metadata(offsets, sizes))
                storage[_index(entry.name, offsets)] = _storage_info(entry.file, start, length)
            tensors[entry.name] = _tensor_metadata(entry.dtype, entry.shape, chunks)
        planner[entry.name] = entry.tree
    state = {
        "state_dict_metadata": tensors,
        "planner_data": planner,
        "storage_data": storage,
        "storage_meta": None,
        "version": version or "1.0.0",
    }
    buffer = io.BytesIO()
    _MetadataPickler(buffer, protocol=2).dump(_Object(_METADATA_MODULE, "Metadata", state))
    return buffer.getvalue()


def write_dcp(
    path: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: CheckpointReader | None,
    *,
    keep_other: bool = True,
    members: int = 1,
    group: ProcessGroup | None = None,
) -> list[str]:
    """Write a DCP directory that ``torch.distributed.checkpoint.load`` reads.

    The averaged tensors go under the template's subtree (``model.`` put back), each
    one chunk of a ``torch.save`` zip payload in ``__0_0.distcp`` (from one process),
    streamed; torch reslices them into any number of ranks on load. The template's bytes entries of
    that subtree are copied byte for byte. With ``keep_other`` every other entry of
    the template (optimizer state, step, learning-rate schedule...) is copied too, so
    training resumes from the average with the newest member's optimizer state;
    without it the output holds the subtree alone.

    With a ``group`` of P processes (torchrun), the entries are split into P
    contiguous runs of about equal work (:func:`split_by_cost`: an averaged tensor
    costs its bytes once per member and once written, a copied entry its bytes read
    and written); process p averages or copies its run alone into ``__p_0.distcp``
    (the others' tensors are never computed there) and fsyncs it; process 0 gathers
    what each wrote and writes ``.metadata``. The payloads are those one process
    writes, in the same order, only spread over P files, so ``dcp.load`` and polyak
    read the same state. If any process fails, every process raises.

    Args:
        path: the directory to write into (created empty by the caller; under
            torchrun, one directory every process sees).
        tensors: ``(name, array)`` pairs, best a ``PlannedTensors`` (streamed).
        template: the newest member's :class:`DcpReader`.
        keep_other: copy the entries outside the averaged subtree.
        members: how many checkpoints are averaged (weighs the work split).
        group: the processes writing together, or None for this one alone.

    Returns:
        The names of the files written, ``.metadata`` first: ``__0_0.distcp`` from
        one process, and one ``__p_0.distcp`` per process that holds entries.

    Raises:
        OutputError: the template is not a DCP checkpoint, or the file cannot be written.
        DistributedError: another process of the group failed.
    """
    path = Path(path)
    if not isinstance(template, DcpReader):
        raise OutputError(
            f"output {path}: a DCP directory is written from DCP inputs only (it keeps their "
            "state dict's structure); the inputs are not. Write safetensors instead."
        )
    if not isinstance(tensors, PlannedTensors):
        tensors = PlannedTensors.from_arrays(
            (name, np.array(array, copy=True)) for name, array in tensors
        )
    rank, size = (0, 1) if group is None else (group.rank, group.size)
    averaged = {template.full_name(name) for name, _ in tensors.infos}
    copied = [
        entry
        for full, entry in template.entries.items()
        if full not in averaged and (keep_other or template.selects(full))
    ]
    for entry in copied:
        if entry.is_tensor and entry.dtype not in DTYPES:
            raise OutputError(
                f"output {path}: entry {entry.name} of {template.path} has dtype "
                f"{entry.dtype}, which polyak cannot copy; write without the other entries "
                "(--drop-optimizer)."
            )
    costs = [info.nbytes * (members + 1) for _, info in tensors.infos]
    costs += [2 * (e.nbytes if e.is_tensor else e.payload.length) for e in copied]  # type: ignore[union-attr]
    owners = split_by_cost(costs, size)
    files = [rank_file(owner) for owner in sorted(set(owners))]
    error: BaseException | None = None
    written: list[_Written] = []
    try:
        if rank in owners:
            written = _write_part(path, tensors, template, copied, owners, rank)
    except BaseException as failure:  # every process learns of it below
        error = failure
    if group is None:
        if error is not None:
            raise error
        parts = [written]
    else:
        group.check(error)
        parts = group.gather(written)
        if not group.is_main:
            return [METADATA_NAME, *files]
    try:
        metadata = _metadata((entry for part in parts for entry in part), template.version)
        (path / METADATA_NAME).write_bytes(metadata)
    except OSError as failure:
        reason = failure.strerror or str(failure)
        raise OutputError(f"output {path}: cannot be written ({reason}).") from failure
    return [METADATA_NAME, *files]


def _write_part(
    path: Path,
    tensors: PlannedTensors,
    template: DcpReader,
    copied: list[Entry],
    owners: list[int],
    rank: int,
) -> list[_Written]:
    """Write this process's run of the entries into its ``.distcp`` file, fsynced."""
    infos = dict(tensors.infos)
    name = rank_file(rank)
    count = len(tensors.infos)
    try:
        with open(path / name, "wb") as file:
            output = _Output(file, name)
            for number, (short, array) in enumerate(tensors):
                if owners[number] != rank:
                    continue  # another process's: a StreamedTensor never computed here
                full = template.full_name(short)
                entry = template.entries.get(full)
                tree = entry.path if entry is not None else tuple(full.split("."))
                output.tensor(full, tree, infos[short], array)
            for number, entry in enumerate(copied, start=count):
                if owners[number] != rank:
                    continue
                if not entry.is_tensor:
                    output.raw(entry.name, entry.path, template.payload_bytes(entry.payload))  # type: ignore[arg-type]
                    continue
                info = TensorInfo(entry.shape, str(entry.dtype))
                parts = [(c.offsets, c.sizes, template.chunk_array(entry, c)) for c in entry.chunks]
                output.chunk(entry.name, entry.path, info, parts)
            file.flush()
            os.fsync(file.fileno())
    except OutputError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"output {path}: cannot be written ({reason}).") from error
    return output.written
