"""safetensors, single files and sharded directories.

Reading parses the header with polyak's own validating parser and memory-maps the
file once: every tensor is a read-only numpy view of the page cache, no copy. The
safetensors package's ``safe_open(framework="numpy")`` copies each tensor into fresh
memory, which on large models costs more than the arithmetic (see bench/), and its
writer ``save_file`` needs every tensor in memory at once; polyak's writer streams:
header first, then each tensor as it is computed. Files are checked against the
safetensors package in the tests, both ways.

Layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data; offsets are relative to the data start.

Sharded checkpoints (Hugging Face): ``model.safetensors.index.json`` holds
``{"metadata": {...}, "weight_map": {tensor name: shard file name}}`` with the shards
in the same directory.

Writing a checkpoint directory in Hugging Face's layout: :func:`write_sharded_safetensors`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from polyak.checks import parse_size  # re-exported: its home was here
from polyak.distributed import split_by_cost
from polyak.errors import CheckpointError
from polyak.formats.background import BackgroundWriter
from polyak.formats.base import DTYPES, PlannedTensors, ReaderBase, StreamedTensor, TensorInfo
from polyak.formats.limits import shape_refusal
from polyak.formats.marks import MARK_KEY, MARK_VALUE

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "SafetensorsReader",
    "ShardedParts",
    "ShardedSafetensorsReader",
    "append_file",
    "parse_size",
    "plan_shards",
    "shard_names",
    "write_safetensors",
    "write_sharded_safetensors",
]

# safetensors dtype codes and polyak's canonical names.
_CODES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_CODE_OF = {name: code for code, name in _CODES.items()}
# The reference implementation refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
_METADATA = "__metadata__"

# The file names of a checkpoint directory, as Hugging Face writes them.
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = "model-{number:05d}-of-{count:05d}.safetensors"


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate tensor name '{key}'")
        seen[key] = value
    return seen


def parse_header(path: Path, header_bytes: bytes, data_size: int) -> tuple[dict, dict]:
    """Validate a safetensors header and return ``(entries, metadata)``.

    ``entries`` maps each tensor name to ``(TensorInfo, begin, end)`` with byte offsets
    relative to the data start. Every rule of the format is checked: JSON object,
    known dtypes, non-negative integer shapes, offsets inside the data, sizes equal to
    shape times item size, no overlaps, no duplicate names.
    """
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {path}: safetensors header is not UTF-8.") from None
    except RecursionError:
        raise CheckpointError(
            f"checkpoint {path}: safetensors header is invalid: JSON nested too deeply."
        ) from None
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint {path}: safetensors header is invalid: {error}."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint {path}: safetensors header is not a JSON object.")
    metadata = header.pop(_METADATA, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"checkpoint {path}: __metadata__ must map strings to strings.")
    entries: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        where = f"checkpoint {path}: tensor {name}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object.")
        code = entry.get("dtype")
        if not isinstance(code, str) or code not in _CODES:
            known = ", ".join(_CODES)
            raise CheckpointError(f"{where}: dtype {code!r} is not supported (known: {known}).")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of integers >= 0.")
        refusal = shape_refusal(shape)
        if refusal is not None:
            raise CheckpointError(f"{where}: {refusal}; the file is corrupt or crafted.")
        offsets = entry.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end].")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] fall outside the {data_size} bytes "
                "of data; the file is truncated or corrupt."
            )
        info = TensorInfo(tuple(shape), _CODES[code])
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{where}: shape {tuple(shape)} of {info.dtype} needs {info.nbytes} bytes; "
                f"data_offsets give {end - begin}."
            )
        entries[name] = (info, begin, end)
    previous_end, previous_name = 0, None
    for name, (info, begin, end) in sorted(entries.items(), key=lambda item: item[1][1:]):
        if begin < previous_end and info.nbytes:
            raise CheckpointError(
                f"checkpoint {path}: tensors {previous_name} and {name} overlap in the data."
            )
        if info.nbytes:
            previous_end, previous_name = end, name
    return entries, metadata


class SafetensorsReader(ReaderBase):
    """A memory-mapped safetensors file; ``read`` returns read-only views, no copy.

    Example:
        >>> with SafetensorsReader(Path("model.safetensors")) as reader:  # doctest: +SKIP
        ...     kernel = reader.read("dense.weight")
    """

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size < 8:
                    raise CheckpointError(
                        f"checkpoint {self.path}: {size} bytes is too small for a safetensors "
                        "file (at least 8)."
                    )
                header_size = int.from_bytes(file.read(8), "little")
                if header_size > MAX_HEADER_BYTES or header_size > size - 8:
                    raise CheckpointError(
                        f"checkpoint {self.path}: safetensors header length {header_size} is "
                        f"larger than the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte "
                        "limit; the file is truncated or not safetensors."
                    )
                header_bytes = file.read(header_size)
                self._data_start = 8 + header_size
                self._entries, self.metadata = parse_header(
                    self.path, header_bytes, size - self._data_start
                )
                if size > 0:
                    self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise CheckpointError(f"checkpoint {self.path}: cannot be read ({error}).") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entry(name)[0]

    def read(self, name: str) -> np.ndarray:
        info, begin, _ = self._entry(name)
        if self._map is None:
            raise CheckpointError(f"checkpoint {self.path}: the reader is closed.")
        array = np.frombuffer(
            self._map, dtype=DTYPES[info.dtype], count=info.size, offset=self._data_start + begin
        )
        return array.reshape(info.shape)

    def _entry(self, name: str) -> tuple[TensorInfo, int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path}: no tensor named {name}.") from None

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # Arrays handed out still view the map; it closes when they are gone.
                pass
            self._map = None


def _shard_path(index_path: Path, shard: object, tensor: str) -> Path:
    if (
        not isinstance(shard, str)
        or not shard
        or Path(shard).name != shard
        or shard in {".", ".."}
        or "\x00" in shard
    ):
        raise CheckpointError(
            f"checkpoint {index_path}: tensor {tensor} points to shard {shard!r}; shards must be "
            "plain file names in the index's own directory."
        )
    return index_path.parent / shard


class ShardedSafetensorsReader(ReaderBase):
    """A sharded safetensors checkpoint, read through its ``*.safetensors.index.json``.

    ``path`` is the index file. Shards are opened on first use and stay open.

    Attributes:
        metadata: the index's ``metadata`` (e.g. ``{"total_size": 1234}``).
        shard_metadata: the ``__metadata__`` of the first shard (e.g. ``{"format": "pt"}``).
    """

    format = "sharded-safetensors"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as error:
            raise CheckpointError(f"checkpoint {self.path}: cannot be read ({error}).") from None
        if size > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"checkpoint {self.path}: the shard index is {size} bytes, above the limit "
                f"of {MAX_HEADER_BYTES} (an index lists tensor names, a few MB at most); "
                "the file is damaged or not a shard index."
            )
        try:
            index = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
            raise CheckpointError(
                f"checkpoint {self.path}: the shard index cannot be read as JSON ({error})."
            ) from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"checkpoint {self.path}: the shard index has no 'weight_map' of tensor names "
                "to shard files."
            )
        self.metadata = index.get("metadata") or {}
        self._shard_of = {
            name: _shard_path(self.path, shard, name) for name, shard in weight_map.items()
        }
        for shard in dict.fromkeys(self._shard_of.values()):
            try:
                present = shard.is_file()
            except OSError as error:  # e.g. a name too long for the file system
                raise CheckpointError(
                    f"checkpoint {self.path}: shard {shard.name!r} named in the index cannot "
                    f"be opened ({error.strerror})."
                ) from None
            if not present:
                raise CheckpointError(
                    f"checkpoint {self.path}: shard {shard.name} named in the index is missing."
                )
        self._shards: dict[Path, SafetensorsReader] = {}
        self._names: list[str] = []
        for shard in dict.fromkeys(self._shard_of.values()):
            reader = self._open(shard)
            for name in reader.names():
                if self._shard_of.get(name) != shard:
                    raise CheckpointError(
                        f"checkpoint {self.path}: tensor {name} is in shard {shard.name} but the "
                        "index does not map it there."
                    )
                self._names.append(name)
        missing = set(self._shard_of) - set(self._names)
        if missing:
            first = sorted(missing)[0]
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {first} is in the index but not in shard "
                f"{self._shard_of[first].name}."
            )
        # The shards' own ``__metadata__`` (the first shard's), which a written copy keeps.
        self.shard_metadata: dict[str, str] = dict(self._open(self.shard_files[0]).metadata)

    @property
    def shard_files(self) -> list[Path]:
        """The shard files, in the order of the index."""
        return list(dict.fromkeys(self._shard_of.values()))

    def shard_of(self, name: str) -> Path:
        """The shard file holding a tensor."""
        return self._shard_of[name]

    def _open(self, shard: Path) -> SafetensorsReader:
        reader = self._shards.get(shard)
        if reader is None:
            reader = self._shards[shard] = SafetensorsReader(shard)
        return reader

    def names(self) -> list[str]:
        return list(self._names)

    def _reader(self, name: str) -> SafetensorsReader:
        shard = self._shard_of.get(name)
        if shard is None:
            raise CheckpointError(f"checkpoint {self.path}: no tensor named {name}.")
        return self._open(shard)

    def info(self, name: str) -> TensorInfo:
        return self._reader(name).info(name)

    def read(self, name: str) -> np.ndarray:
        return self._reader(name).read(name)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()
        self._shards.clear()


def _header_bytes(infos: list[tuple[str, TensorInfo]], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header[_METADATA] = metadata
    offset = 0
    for name, info in infos:
        header[name] = {
            "dtype": _CODE_OF[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _string_metadata(template: object | None) -> dict[str, str]:
    """The ``__metadata__`` to write: a safetensors template's (or its shards'), and
    polyak's mark (see :mod:`polyak.formats.marks`)."""
    metadata = getattr(template, "shard_metadata", None)
    if metadata is None:
        metadata = getattr(template, "metadata", None)
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        metadata = {}
    return {**metadata, MARK_KEY: MARK_VALUE}


def _write_tensors(
    file,
    infos: list[tuple[str, TensorInfo]],
    arrays: Iterator[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None,
) -> None:
    """Write one safetensors file: the header of ``infos``, then their arrays, in order."""
    file.write(_header_bytes(infos, metadata))
    _write_arrays(file, infos, arrays)


def _write_arrays(
    file, infos: list[tuple[str, TensorInfo]], arrays: Iterator[tuple[str, np.ndarray]]
) -> None:
    """Write the data of the planned ``infos``, taking their arrays from ``arrays``."""
    for planned_name, info in infos:
        try:
            name, array = next(arrays)
        except StopIteration:
            raise ValueError(f"tensor {planned_name}: was planned but never given.") from None
        if name != planned_name or tuple(array.shape) != info.shape:
            raise ValueError(f"tensor {name}: does not match the planned {planned_name}.")
        if isinstance(array, StreamedTensor):
            # Chunk by chunk as the engine computes them: no whole tensor in memory.
            written = 0
            for chunk in array.chunks():
                file.write(
                    np.ascontiguousarray(chunk, dtype=DTYPES[info.dtype]).view(np.uint8).data
                )
                written += chunk.size
            if written != info.size:
                raise ValueError(
                    f"tensor {name}: {written} values were streamed; planned {info.size}."
                )
            continue
        data = np.ascontiguousarray(array, dtype=DTYPES[info.dtype])
        file.write(data.reshape(-1).view(np.uint8).data)


def _finish(arrays: Iterator[tuple[str, np.ndarray]]) -> None:
    """Refuse tensors beyond the plan (and let a lazy producer run to its end)."""
    extra = next(arrays, None)
    if extra is not None:
        raise ValueError(f"tensor {extra[0]}: was given but not planned.")


def write_safetensors(
    path: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: object | None = None,
) -> None:
    """Write tensors to a safetensors file, header first, data streamed after it.

    The template's ``__metadata__`` (e.g. ``{"format": "pt"}``) is kept when the
    template is a safetensors file or a sharded checkpoint (its shards' metadata).
    """
    planned = (
        tensors if isinstance(tensors, PlannedTensors) else PlannedTensors.from_arrays(tensors)
    )
    arrays = iter(planned)
    with BackgroundWriter(path) as file:
        _write_tensors(file, planned.infos, arrays, _string_metadata(template))
    _finish(arrays)


def plan_shards(
    infos: list[tuple[str, TensorInfo]],
    max_shard_size: int | None = None,
    shard_key: Callable[[str], object] | None = None,
) -> list[list[tuple[str, TensorInfo]]]:
    """Split planned tensors into shards, keeping their order.

    With ``max_shard_size``, a new shard starts when the next tensor would take the
    current one above ``max_shard_size`` bytes of data; a tensor larger than the limit
    gets a shard of its own (as in huggingface_hub, whose oversized tensors also go
    alone; polyak keeps the order instead of moving them first). Otherwise, with
    ``shard_key`` (e.g. the shard each tensor was read from), a new shard starts
    wherever the key changes, which reproduces an input's layout. With neither,
    everything is one shard.

    Args:
        infos: ``(name, info)`` of every tensor, in output order.
        max_shard_size: the most bytes of tensor data per shard, or None.
        shard_key: a function of the tensor name, or None.

    Returns:
        The shards, each a list of ``(name, info)``; never an empty shard.

    Example:
        >>> info = TensorInfo((250,), "float32")  # 1000 bytes
        >>> [len(s) for s in plan_shards([("a", info), ("b", info), ("c", info)], 2000)]
        [2, 1]
    """
    shards: list[list[tuple[str, TensorInfo]]] = []
    size = 0
    previous_key: object = None
    for name, info in infos:
        key = shard_key(name) if shard_key is not None else None
        if not shards:
            start = True
        elif max_shard_size is not None:
            start = size + info.nbytes > max_shard_size
        else:
            start = key != previous_key
        if start:
            shards.append([])
            size = 0
        shards[-1].append((name, info))
        size += info.nbytes
        previous_key = key
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards: ``model.safetensors`` alone, else numbered ones.

    Example:
        >>> shard_names(2)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    if count == 1:
        return [SINGLE_NAME]
    return [_SHARD_NAME.format(number=number, count=count) for number in range(1, count + 1)]


def _template_layout(template: object | None, names: list[str]) -> Callable[[str], object] | None:
    """The template's tensor-to-shard map, if it is sharded and holds every name."""
    shard_of = getattr(template, "shard_of", None)
    if not callable(shard_of):
        return None
    known = set(template.names())
    return shard_of if all(name in known for name in names) else None


def write_sharded_safetensors(
    directory: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: object | None = None,
    *,
    max_shard_size: int | str | None = None,
) -> list[str]:
    """Write tensors as a safetensors checkpoint directory, shard after shard, streamed.

    The directory follows the layout of ``huggingface_hub.save_torch_state_dict`` and
    ``transformers``' ``save_pretrained``: shards ``model-00001-of-0000K.safetensors`` ...
    ``model-0000K-of-0000K.safetensors`` (five digits) and ``model.safetensors.index.json``
    holding ``{"metadata": {"total_size": bytes of tensor data}, "weight_map": {name:
    shard}}`` (with a sharded template, its index's other metadata kept and
    ``total_parameters`` recounted), or one ``model.safetensors`` and no index when there
    is a single shard. Every shard keeps the template's ``__metadata__``
    (``{"format": "pt"}`` in files from transformers). Which tensors go in which shard
    is decided from the planned names, shapes and dtypes before any data is computed
    (:func:`plan_shards`), so the shards are streamed one after the other, one tensor at
    a time.

    Shards: with ``max_shard_size``, at most that many bytes of tensor data each (see
    :func:`plan_shards`); otherwise, when the template is a sharded checkpoint, the
    same tensors in the same shards as the template (the newest member); otherwise
    one shard. One shard is written as ``model.safetensors`` without an index; more
    as ``model-0000i-of-0000K.safetensors`` and ``model.safetensors.index.json``,
    written last. Every shard keeps the template's ``__metadata__``.

    Several processes writing one directory together (torchrun): :class:`ShardedParts`.

    Args:
        directory: an existing, empty directory (the caller renames it into place,
            see :func:`polyak.files.atomic_directory`).
        tensors: ``(name, array)`` pairs in output order, best a ``PlannedTensors``;
            each array is written at once and not kept.
        template: the reader whose shard layout and ``__metadata__`` are copied.
        max_shard_size: bytes per shard, or a size string such as ``"2GB"``.

    Returns:
        The names of every file of the checkpoint, the index last.

    Example:
        >>> write_sharded_safetensors(Path("out"), {"w": w, "b": b}.items(),  # doctest: +SKIP
        ...                           max_shard_size="2GB")
        ['model.safetensors']
    """
    planned = (
        tensors if isinstance(tensors, PlannedTensors) else PlannedTensors.from_arrays(tensors)
    )
    parts = ShardedParts(planned.infos, template, max_shard_size=max_shard_size)
    parts.write(directory, planned, 0)
    parts.write_index(directory)
    return parts.files


@dataclass(frozen=True)
class _Piece:
    """A run of one shard's tensors that one process writes: the shard's first run
    into the shard file itself, header first; any later run into a file of its own."""

    shard: int
    process: int
    tensors: list[tuple[str, TensorInfo]]
    file: str
    first: bool

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors)


class ShardedParts:
    """A checkpoint directory (or one safetensors file) that ``processes`` processes
    write together, each its share.

    Every process builds the same plan from the planned tensors: the shards of
    :func:`write_sharded_safetensors`, and the tensors cut into one contiguous run
    per process of about equal bytes (:func:`polyak.distributed.split_by_cost`),
    across shard boundaries. A shard whose tensors fall in several runs is cut into
    pieces, one per process. No two processes ever write one file:

    1. :meth:`write`: process p averages its run alone (the others' tensors are never
       computed there) and streams it, in output order, into the shard files its run
       starts (header first) and, for a shard begun by an earlier process, into a
       piece file ``<shard>.from-<p>`` of its own.
    2. Once every process has written (the caller's barrier), :meth:`assemble`: the
       process that began a cut shard appends the later pieces to it, in order (by
       ``os.copy_file_range`` where the file system allows, else through one reused
       buffer), fsyncs it and deletes the pieces.
    3. One process writes the index (:meth:`write_index`).

    The files are those one process writes, byte for byte. With one process there
    is one piece per shard and step 2 has nothing to do. Memory per process: the
    engine's chunk buffers and one :class:`BackgroundWriter`'s, whatever the size.

    Args:
        infos: ``(name, info)`` of every tensor, in output order.
        template: as for :func:`write_sharded_safetensors`.
        max_shard_size: as for :func:`write_sharded_safetensors`.
        processes: how many processes write together.
        file_name: write one safetensors file of this name instead of a checkpoint
            directory (a single-file output, as :func:`write_safetensors` writes it);
            the pieces are written beside it.
    """

    def __init__(
        self,
        infos: list[tuple[str, TensorInfo]],
        template: object | None = None,
        *,
        max_shard_size: int | str | None = None,
        processes: int = 1,
        file_name: str | None = None,
    ) -> None:
        self.infos = infos
        self.template = template
        if file_name is not None:  # one file, as write_safetensors writes it
            self.shards = plan_shards(infos)
            self.shard_files = [file_name]
        else:
            limit = None if max_shard_size is None else parse_size(max_shard_size)
            names = [name for name, _ in infos]
            layout = None if limit is not None else _template_layout(template, names)
            self.shards = plan_shards(infos, limit, layout)
            self.shard_files = shard_names(len(self.shards))
        self.metadata = _string_metadata(template)
        self.owners = split_by_cost([info.nbytes for _, info in infos], processes)
        self.pieces: list[_Piece] = []
        number = 0
        for shard, (file_name, tensors) in enumerate(
            zip(self.shard_files, self.shards, strict=True)
        ):
            owners = self.owners[number : number + len(tensors)]
            number += len(tensors)
            start = 0
            for stop in range(1, len(tensors) + 1):
                if stop == len(tensors) or owners[stop] != owners[start]:
                    first = start == 0
                    piece_file = file_name if first else f"{file_name}.from-{owners[start]}"
                    self.pieces.append(
                        _Piece(shard, owners[start], tensors[start:stop], piece_file, first)
                    )
                    start = stop

    @property
    def files(self) -> list[str]:
        """The names of every file of the checkpoint, the index last if there is one."""
        return self.shard_files if len(self.shard_files) == 1 else [*self.shard_files, INDEX_NAME]

    def tensors_of(self, process: int) -> list[str]:
        """The names of the tensors ``process`` averages and writes."""
        return [
            name for piece in self.pieces if piece.process == process for name, _ in piece.tensors
        ]

    def write(
        self, directory: Path, tensors: Iterable[tuple[str, np.ndarray]], process: int
    ) -> list[Path]:
        """Step 1: stream ``process``'s run of ``tensors`` (all of them, in output order,
        e.g. the engine's lazy ``PlannedTensors``) into its files.

        A shard file goes to the disk as it is written (``O_DIRECT``, see
        :class:`BackgroundWriter`); a piece file through the page cache, where it is
        read back from when appended and deleted, so that on a local file system its
        bytes need not reach the disk at all (on NFS, closing it sends them to the
        server, where the appending process reads them).

        Returns:
            The shard files written (to be fsynced); not the pieces.
        """
        directory = Path(directory)
        arrays = iter(tensors)
        written = []
        for piece in self.pieces:
            if piece.process != process:
                _pass_over(piece.tensors, arrays)
                continue
            scratch = not piece.first
            with BackgroundWriter(
                directory / piece.file, direct=not scratch, sync=not scratch
            ) as file:
                if piece.first:
                    file.write(_header_bytes(self.shards[piece.shard], self.metadata))
                _write_arrays(file, piece.tensors, arrays)
            if piece.first:
                written.append(directory / piece.file)
        _finish(arrays)
        return written

    def assemble(self, directory: Path, process: int) -> list[Path]:
        """Step 2: append the later pieces of the cut shards ``process`` began; fsync them.

        Returns:
            The shard files completed here.
        """
        directory = Path(directory)
        done = []
        for shard, file_name in enumerate(self.shard_files):
            pieces = [piece for piece in self.pieces if piece.shard == shard]
            if len(pieces) < 2 or pieces[0].process != process:
                continue
            path = directory / file_name
            expected = len(_header_bytes(self.shards[shard], self.metadata)) + sum(
                piece.nbytes for piece in pieces
            )
            with open(path, "r+b") as target:
                target.seek(0, os.SEEK_END)
                for piece in pieces[1:]:
                    append_file(target, directory / piece.file, piece.nbytes)
                if target.tell() != expected:
                    raise OSError(
                        errno.EIO, f"{file_name} holds {target.tell()} bytes, not {expected}"
                    )
                target.flush()
                os.fsync(target.fileno())
            for piece in pieces[1:]:
                (directory / piece.file).unlink()
            done.append(path)
        return done

    def remove_pieces(self, directory: Path) -> None:
        """Delete every piece file that is left (after a failure: any process's)."""
        for piece in self.pieces:
            if not piece.first:
                (Path(directory) / piece.file).unlink(missing_ok=True)

    def write_index(self, directory: Path) -> None:
        """Step 3: the index, for more than one shard (one process writes it)."""
        if len(self.shard_files) == 1:
            return
        weight_map = {
            name: file_name
            for file_name, shard in zip(self.shard_files, self.shards, strict=True)
            for name, _ in shard
        }
        metadata = {**_index_metadata(self.template, self.infos), MARK_KEY: MARK_VALUE}
        index = {"metadata": metadata, "weight_map": weight_map}
        text = json.dumps(index, indent=2) + "\n"
        (Path(directory) / INDEX_NAME).write_text(text, encoding="utf-8")


# One buffer of a copy where the kernel cannot copy between the files itself.
_COPY_BYTES = 1 << 20
# copy_file_range's refusals that mean "not between these files": copy by hand then.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def append_file(target: BinaryIO, source: Path, size: int, *, kernel: bool = True) -> None:
    """Append the ``size`` bytes of the file ``source`` to ``target`` (positioned at its end).

    By ``os.copy_file_range`` (the kernel copies, or the file server on NFS 4.2, or the
    file system shares the blocks) where it works, else through one reused buffer of
    ``_COPY_BYTES``: never the whole file in memory.

    Raises:
        OSError: ``source`` is not ``size`` bytes long, or a read or write failed.
    """
    target.flush()
    with open(source, "rb") as file:
        actual = os.fstat(file.fileno()).st_size
        if actual != size:
            raise OSError(errno.EIO, f"{source.name} holds {actual} bytes, not {size}")
        copied = 0
        if kernel and hasattr(os, "copy_file_range"):
            try:
                while copied < size:
                    count = os.copy_file_range(
                        file.fileno(), target.fileno(), size - copied, copied
                    )
                    if count == 0:
                        raise OSError(errno.EIO, f"{source.name} ended early")
                    copied += count
            except OSError as error:
                if error.errno not in _NO_KERNEL_COPY or copied:
                    raise
            target.seek(0, os.SEEK_END)
        if copied < size:
            buffer = bytearray(min(_COPY_BYTES, size))
            view = memoryview(buffer)
            while copied < size:
                count = file.readinto(view[: min(len(buffer), size - copied)])
                if not count:
                    raise OSError(errno.EIO, f"{source.name} ended early")
                target.write(view[:count])
                copied += count


def _index_metadata(
    template: object | None, infos: list[tuple[str, TensorInfo]]
) -> dict[str, object]:
    """The index's ``metadata``: the template index's entries, its sizes recomputed.

    transformers writes ``total_parameters`` beside ``total_size``; both are counted
    anew for the tensors written, and any other entry is kept as the template had it.
    """
    kept = (
        getattr(template, "metadata", None)
        if isinstance(template, ShardedSafetensorsReader)
        else None
    )
    metadata = dict(kept) if isinstance(kept, dict) else {}
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(info.size for _, info in infos)
    metadata["total_size"] = sum(info.nbytes for _, info in infos)
    return metadata


def _pass_over(
    shard: list[tuple[str, TensorInfo]], arrays: Iterator[tuple[str, np.ndarray]]
) -> None:
    """Take another process's tensors from the stream without computing them."""
    for planned_name, _ in shard:
        name, _array = next(arrays)
        if name != planned_name:
            raise ValueError(f"tensor {name}: does not match the planned {planned_name}.")
