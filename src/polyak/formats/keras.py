"""Keras checkpoints: ``.weights.h5``, ``.keras`` and legacy full-model ``.h5``.

Three containers, one HDF5 layout per family, read with h5py alone (this module
never imports keras):

| format        | written by                | tensor names (full HDF5 dataset paths)          |
|---------------|---------------------------|-------------------------------------------------|
| keras-weights | ``model.save_weights``    | ``layers/dense/vars/0``, ``vars/0``             |
| keras         | ``model.save("m.keras")`` | the same, in the member ``model.weights.h5``    |
| keras-h5      | ``model.save("m.h5")``    | ``model_weights/dense/sequential/dense/kernel`` |

A tensor name is the full path of its dataset inside the HDF5 file, so names are
the same in every member saved from the same architecture. ``names()`` lists the
model's tensors only: everything except the top-level ``optimizer`` group of a
weights file, and only what lies under ``model_weights`` in a legacy file.
Names come in natural order (``vars/2`` before ``vars/10``), stable from file to
file.

Only hard links are followed. A soft or external link anywhere in the file is
refused, so that a checkpoint cannot make polyak read data from elsewhere in the
file or from another file; so is a dataset whose data lives in another file (HDF5
external storage, virtual datasets). A tensor must hold its data in the file: one
that declares a shape larger than the bytes it stores (a huge shape over an
unallocated dataset) is refused from its header, before anything is allocated. A
``.keras`` zip whose member names are absolute or contain ``..`` is refused too, and
its ``model.weights.h5`` is read in place when stored uncompressed (Keras stores it
so), or extracted to a temporary file when compressed, up to ``MAX_WEIGHTS_BYTES``.
A member that inflates more than ``MAX_COMPRESSION_RATIO`` times (a zip bomb) is
refused without inflating it.

Writing needs the architecture, so a Keras file is written from a template that
is a reader of the same format (the newest member): its file is copied and each
model dataset is overwritten in place with the averaged values. The optimizer
state is not averaged: it is taken from the newest member so the file still
loads with ``compile=True``. Outputs are written to a temporary file beside them
and renamed into place only once complete.

Example:
    >>> from polyak.formats.keras import KerasWeightsReader, write_keras_weights
    >>> with KerasWeightsReader("model_499.weights.h5") as reader:  # doctest: +SKIP
    ...     halved = ((name, reader.read(name) / 2) for name in reader.names())
    ...     write_keras_weights("halved.weights.h5", halved, template=reader)
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, TypeVar

import h5py
import numpy as np

from polyak.errors import CheckpointError, OutputError, PolyakError
from polyak.formats.base import CheckpointReader, ReaderBase, TensorInfo, dtype_name
from polyak.formats.limits import inflation_refusal
from polyak.formats.marks import MARK_KEY, MARK_VALUE, ZIP_COMMENT

__all__ = [
    "MAX_COMPRESSION_RATIO",
    "MAX_WEIGHTS_BYTES",
    "WEIGHTS_MEMBER",
    "KerasArchiveReader",
    "KerasLegacyH5Reader",
    "KerasWeightsReader",
    "write_keras_archive",
    "write_keras_legacy_h5",
    "write_keras_weights",
]

# The member of a .keras zip that holds the weights (Keras 3 saving_lib).
WEIGHTS_MEMBER = "model.weights.h5"

# Largest uncompressed size a .keras zip may declare for its weights member: a guard
# against zip bombs filling the disk when a compressed member is extracted.
MAX_WEIGHTS_BYTES = 64 * 2**30

# Largest ratio of uncompressed to compressed size of a .keras member above
# ``_RATIO_EXEMPT_BYTES`` (Apache POI's zip-bomb guard uses the same 100). Keras stores
# the weights uncompressed and deflates JSON about 10-fold; a higher ratio is a bomb.
MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = 2**20

# Largest ratio of a tensor's declared bytes to the bytes a compressed (filtered) HDF5
# dataset stores: deflate cannot exceed about 1032 (Keras never compresses datasets).
_MAX_HDF5_FILTER_RATIO = 1100

_LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"
_LOCAL_HEADER_SIZE = 30
_HDF5_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError)
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error)
_SHOWN = 5


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Keras numbers its variables vars/0, vars/1, ...: vars/10 comes after vars/9.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(f"'{name}'" for name in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{shown}{more}"


class _ZipMemberView(io.RawIOBase):
    """A read-only, seekable view of the bytes ``[start, start + size)`` of a file.

    Lets h5py open a zip member stored uncompressed in place, without extracting it.
    """

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # closed in close()
        self._start = start
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._position))
        if count == 0:
            return 0
        self._file.seek(self._start + self._position)
        read = self._file.readinto(view[:count]) or 0
        self._position += read
        return read

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _KerasHdf5Reader(ReaderBase):
    """Shared reading of a Keras HDF5 weights layout: walk, names, info, read."""

    format: str

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._names: list[str] = []
        self._name_set: frozenset[str] = frozenset()

    # -- opening ---------------------------------------------------------------------------

    def _open_hdf5(self, source: str | Path | BinaryIO, where: str) -> None:
        """Open the HDF5 file (a path or a file object), check its layout and index it."""
        try:
            self._file = h5py.File(source, "r")
        except _HDF5_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: {where} is not a readable HDF5 file "
                f"({_describe(error)}). A {self.format} checkpoint is an HDF5 file written by "
                "Keras; the file may be truncated or of another format. Save it again with Keras."
            ) from error
        try:
            self._check_layout(self._file)
            names = self._walk(self._file)
        except PolyakError:
            self.close()
            raise
        except _HDF5_ERRORS as error:
            self.close()
            raise CheckpointError(
                f"checkpoint {self.path}: the HDF5 structure of {where} cannot be read "
                f"({_describe(error)}); the file is probably corrupt. Save it again with Keras."
            ) from error
        self._names = names
        self._name_set = frozenset(names)

    def _check_layout(self, file: h5py.File) -> None:
        """Raise CheckpointError if the file's top level is not this format's.

        The Keras 3 layout (weights files and .keras archives) is checked here; the
        legacy reader overrides it.
        """
        if "model_weights" in file and "layers" not in file:
            raise CheckpointError(
                f"checkpoint {self.path}: a {self.format} checkpoint holds Keras 3 weights "
                "groups ('layers', 'vars'); this one has 'model_weights', the layout of a legacy "
                "full-model HDF5 from model.save('m.h5'). Rename such a file to end in '.h5'."
            )

    def _is_model_tensor(self, name: str) -> bool:
        """Whether the dataset at this full path is a model tensor (not optimizer state)."""
        return name.split("/", 1)[0] != "optimizer"

    def _walk(self, file: h5py.File) -> list[str]:
        # Pre-order walk in natural order, following hard links only. A group or a
        # dataset reached twice (hard links can alias and even loop) is refused too.
        names: list[str] = []
        root = file["/"]
        seen = {root.id}
        stack: list[tuple[str, h5py.Group | h5py.Dataset]] = []

        def push_children(prefix: str, group: h5py.Group) -> None:
            children = []
            for key in sorted(group.keys(), key=_natural_key):
                full = f"{prefix}{key}"
                link = group.get(key, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise CheckpointError(self._link_message(full, link))
                obj = group[key]
                if obj.id in seen:
                    raise CheckpointError(
                        f"checkpoint {self.path}: '{full}' is a second hard link to an object "
                        "already met in the file; polyak reads each tensor from one path only "
                        "and refuses aliased or looping links. Keras never writes them: save "
                        "the model again with Keras."
                    )
                seen.add(obj.id)
                children.append((full, obj))
            stack.extend(reversed(children))

        push_children("", root)
        while stack:
            full, obj = stack.pop()
            if isinstance(obj, h5py.Group):
                push_children(f"{full}/", obj)
            elif isinstance(obj, h5py.Dataset):
                self._check_storage_is_inside(full, obj)
                if self._is_model_tensor(full):
                    names.append(full)
        return names

    def _check_storage_is_inside(self, name: str, dataset: h5py.Dataset) -> None:
        # External storage and virtual datasets read their data from other files, as
        # links do: refused for the same reason, anywhere in the file.
        if dataset.is_virtual:
            sources = sorted({source.file_name for source in dataset.virtual_sources()})
            where = f"a virtual dataset mapping {_listing(sources)}"
        elif dataset.external:
            files = [os.fsdecode(entry[0]) for entry in dataset.external]
            where = f"HDF5 external storage in {_listing(files)}"
        else:
            return
        kind = "tensor" if self._is_model_tensor(name) else "dataset"
        raise CheckpointError(
            f"checkpoint {self.path}: {kind} '{name}' keeps its data in another file "
            f"({where}); polyak reads data only from the checkpoint itself. Keras never "
            "writes such datasets: save the model again with Keras."
        )

    def _link_message(self, name: str, link: object) -> str:
        if isinstance(link, h5py.SoftLink):
            kind, target = "a soft link", f"to '{link.path}'"
        elif isinstance(link, h5py.ExternalLink):
            kind, target = "an external link", f"to '{link.path}' in file '{link.filename}'"
        else:
            kind, target = "a link of an unsupported kind", f"({type(link).__name__})"
        return (
            f"checkpoint {self.path}: '{name}' is {kind} {target}; polyak follows only hard "
            "links, so that a checkpoint cannot make it read data from elsewhere. Keras never "
            "writes such links: save the model again with Keras."
        )

    # -- the reader interface --------------------------------------------------------------

    def names(self) -> list[str]:
        """The model's tensor names (full HDF5 dataset paths), optimizer state excluded."""
        return list(self._names)

    def _dataset(self, name: str) -> h5py.Dataset:
        if name not in self._name_set:
            raise CheckpointError(
                f"checkpoint {self.path}: no model tensor named '{name}'. It has "
                f"{len(self._names)} tensors, e.g. {_listing(self._names)}. Use one of "
                "names() (optimizer state is not listed)."
            )
        if self._file is None or not self._file.id.valid:
            raise CheckpointError(
                f"checkpoint {self.path}: the reader is closed; tensor '{name}' cannot be "
                "read. Open the checkpoint again."
            )
        try:
            return self._file[name]
        except _HDF5_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}' cannot be opened ({_describe(error)}); "
                "the file is probably corrupt. Save it again with Keras."
            ) from error

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor, from the dataset's header (no data read).

        Raises:
            CheckpointError: unknown name, or a dtype polyak does not support.
        """
        dataset = self._dataset(name)
        try:
            shape = dataset.shape
        except _HDF5_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}': its shape cannot be read "
                f"({_describe(error)}); the file is probably corrupt. Save it again with Keras."
            ) from error
        if shape is None:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}' is an empty (null dataspace) HDF5 "
                "dataset, not an array. Keras never writes one: save the model again with Keras."
            )
        try:
            stored_type = dataset.dtype
        except _HDF5_ERRORS as error:
            # An HDF5 type numpy has no equivalent for (e.g. a float of odd precision).
            stored_type, dtype = f"that numpy cannot represent ({_describe(error)})", None
        else:
            try:
                dtype = dtype_name(stored_type)
            except (TypeError, ValueError):
                dtype = None
        if dtype is None:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}' has dtype {stored_type}, which "
                "polyak does not support. Supported: float64, float32, float16, bfloat16, "
                "signed and unsigned integers, bool."
            )
        info = TensorInfo(shape=tuple(int(n) for n in shape), dtype=dtype)
        self._check_stored_bytes(name, dataset, info)
        return info

    def _check_stored_bytes(self, name: str, dataset: h5py.Dataset, info: TensorInfo) -> None:
        """Refuse a tensor that declares more bytes than the file stores for it.

        Reading such a tensor would allocate its declared size (terabytes, for a crafted
        shape over an unallocated dataset) before failing or returning fill values.
        """
        if info.nbytes == 0:
            return
        try:
            stored = dataset.id.get_storage_size()
            filtered = dataset.id.get_create_plist().get_nfilters() > 0
        except _HDF5_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}': its storage cannot be read "
                f"({_describe(error)}); the file is probably corrupt. Save it again with Keras."
            ) from error
        enough = stored * _MAX_HDF5_FILTER_RATIO if filtered else stored
        if enough < info.nbytes:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}' declares shape {info.shape} of "
                f"{info.dtype} ({info.nbytes} bytes) but the file holds {stored} bytes of it; "
                "Keras writes every tensor in full, so the file is damaged or crafted. Save "
                "the model again with Keras."
            )

    def read(self, name: str) -> np.ndarray:
        """The data of one tensor as a numpy array in native byte order (0-d for scalars)."""
        self.info(name)  # refuses unsupported dtypes before reading
        dataset = self._dataset(name)
        try:
            array = np.asarray(dataset[()])
        except _HDF5_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor '{name}' cannot be read ({_describe(error)}); "
                "the file is probably corrupt. Save it again with Keras."
            ) from error
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return array

    def close(self) -> None:
        """Close the HDF5 file."""
        if self._file is not None:
            with contextlib.suppress(*_HDF5_ERRORS):
                self._file.close()
            self._file = None


class KerasWeightsReader(_KerasHdf5Reader):
    """Reads a Keras 3 ``model.save_weights("m.weights.h5")`` file.

    Names are dataset paths such as ``layers/dense/vars/0`` (nested layers:
    ``layers/outer/layers/inner/vars/0``; model-level variables: ``vars/0``). The
    top-level ``optimizer`` group is not listed.

    Args:
        path: the ``.weights.h5`` file.

    Raises:
        CheckpointError: the file is not HDF5, is truncated, is a legacy full-model file,
            or holds soft or external links.
    """

    format = "keras-weights"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._open_hdf5(self.path, "the file")


class KerasLegacyH5Reader(_KerasHdf5Reader):
    """Reads a legacy Keras full-model HDF5 from ``model.save("m.h5")``.

    Names are dataset paths under ``model_weights``, such as
    ``model_weights/dense/sequential/dense/kernel``: they end with the variable's
    path. ``optimizer_weights`` is not listed.

    Args:
        path: the ``.h5`` or ``.hdf5`` file.

    Raises:
        CheckpointError: the file is not HDF5, is truncated, has no ``model_weights``
            group, or holds soft or external links.
    """

    format = "keras-h5"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._open_hdf5(self.path, "the file")

    def _check_layout(self, file: h5py.File) -> None:
        if "model_weights" not in file.keys():
            found = _listing(sorted(file.keys(), key=_natural_key)) or "nothing"
            raise CheckpointError(
                f"checkpoint {self.path}: a legacy Keras .h5 file holds its weights in a "
                f"'model_weights' group; this one has none (top level: {found}). Save full "
                "models with model.save('m.h5') or model.save('m.keras'), and name Keras 3 "
                "save_weights files '*.weights.h5'."
            )

    def _is_model_tensor(self, name: str) -> bool:
        return name.startswith("model_weights/")


def _is_unsafe_member_name(name: str) -> bool:
    parts = re.split(r"[\\/]", name)
    return (
        name.startswith(("/", "\\"))
        or ".." in parts
        or re.match(r"^[A-Za-z]:", name) is not None
        or "\x00" in name
    )


class KerasArchiveReader(_KerasHdf5Reader):
    """Reads a Keras 3 ``model.save("m.keras")`` zip through its ``model.weights.h5``.

    Names are those of the weights member, as for ``KerasWeightsReader``
    (``layers/dense/vars/0``). A member stored uncompressed is opened in place;
    a compressed one is extracted to a temporary file, deleted on ``close()``.

    Args:
        path: the ``.keras`` file.
        max_weights_bytes: largest uncompressed size the weights member may declare;
            defaults to ``MAX_WEIGHTS_BYTES``.

    Attributes:
        zip_path: the zip file (same as ``path``).
        weights_info: the ``ZipInfo`` of ``model.weights.h5``.
        member_names: every member of the zip, in order.

    Raises:
        CheckpointError: not a zip, no ``model.weights.h5``, an unsafe member name
            (absolute or with ``..``), a weights member larger than the limit, or
            weights that are not a readable Keras HDF5.
    """

    format = "keras"

    def __init__(self, path: str | Path, max_weights_bytes: int | None = None) -> None:
        super().__init__(path)
        self.zip_path = self.path
        self._view: _ZipMemberView | None = None
        self._extracted: Path | None = None
        self._weights_start: int | None = None
        limit = MAX_WEIGHTS_BYTES if max_weights_bytes is None else max_weights_bytes
        try:
            self.weights_info, self.member_names = self._inspect_zip(limit)
            if self.weights_info.compress_type == zipfile.ZIP_STORED:
                self._weights_start = self._stored_data_offset(self.weights_info)
                self._view = _ZipMemberView(
                    self.path, self._weights_start, self.weights_info.file_size
                )
                self._open_hdf5(self._view, f"its member '{WEIGHTS_MEMBER}'")
            else:
                self._extracted = self._extract_weights()
                self._open_hdf5(self._extracted, f"its member '{WEIGHTS_MEMBER}'")
        except BaseException:
            self.close()
            raise

    def _inspect_zip(self, limit: int) -> tuple[zipfile.ZipInfo, list[str]]:
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = archive.infolist()
        except _ZIP_ERRORS as error:
            raise CheckpointError(
                f"checkpoint {self.path}: a .keras file is a zip archive written by "
                f"model.save(); this one cannot be read as a zip ({_describe(error)}). The file "
                "may be truncated or of another format: save the model again."
            ) from error
        names = [info.filename for info in infos]
        for name in names:
            if _is_unsafe_member_name(name):
                raise CheckpointError(
                    f"checkpoint {self.path}: zip member '{name}' has an absolute path or "
                    "'..' in it; polyak refuses such archives (path traversal). Keras never "
                    "writes them: save the model again with model.save()."
                )
        for member in infos:
            # A stricter rule for .keras, whose large members are never compressed...
            if (
                member.file_size > _RATIO_EXEMPT_BYTES
                and member.file_size > MAX_COMPRESSION_RATIO * member.compress_size
            ):
                raise CheckpointError(
                    f"checkpoint {self.path}: member '{member.filename}' inflates from "
                    f"{member.compress_size} to {member.file_size} bytes, more than "
                    f"{MAX_COMPRESSION_RATIO} times (a guard against zip bombs). Keras stores "
                    "its weights uncompressed: save the model again with model.save()."
                )
            # ...and below its exemption, the rule of every format (formats/limits.py).
            lying = inflation_refusal(member.file_size, member.compress_size)
            if lying is not None:
                raise CheckpointError(
                    f"checkpoint {self.path}: member '{member.filename}' {lying} (a zip bomb "
                    "or a damaged archive). Save the model again with model.save()."
                )
        duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
        if duplicates:
            raise CheckpointError(
                f"checkpoint {self.path}: zip members {_listing(duplicates)} appear more than "
                "once, so which one Keras would load is ambiguous. Save the model again."
            )
        weights = [info for info in infos if info.filename == WEIGHTS_MEMBER]
        if not weights:
            raise CheckpointError(
                f"checkpoint {self.path}: a .keras archive holds its weights in the member "
                f"'{WEIGHTS_MEMBER}'; this one has none (members: {_listing(names) or 'none'}). "
                "Save the model with model.save('m.keras') (sharded weights are not supported)."
            )
        info = weights[0]
        if info.flag_bits & 0x1:
            raise CheckpointError(
                f"checkpoint {self.path}: member '{WEIGHTS_MEMBER}' is encrypted; polyak "
                "reads only unencrypted archives as Keras writes them."
            )
        if info.file_size > limit:
            raise CheckpointError(
                f"checkpoint {self.path}: member '{WEIGHTS_MEMBER}' declares "
                f"{info.file_size} bytes uncompressed, above the limit of {limit} bytes "
                "(a guard against zip bombs). If the file is genuine, pass a larger "
                "max_weights_bytes or raise polyak.formats.keras.MAX_WEIGHTS_BYTES."
            )
        return info, names

    def _stored_data_offset(self, info: zipfile.ZipInfo) -> int:
        # The local header repeats the name and has its own extra field, whose length may
        # differ from the central directory's: read both lengths from the local header.
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as file:
                file.seek(info.header_offset)
                header = file.read(_LOCAL_HEADER_SIZE)
        except OSError as error:
            raise CheckpointError(
                f"checkpoint {self.path}: cannot be read ({_describe(error)})."
            ) from error
        if len(header) < _LOCAL_HEADER_SIZE or header[:4] != _LOCAL_HEADER_SIGNATURE:
            raise CheckpointError(
                f"checkpoint {self.path}: the local header of member '{WEIGHTS_MEMBER}' is "
                "missing or damaged; the zip is corrupt. Save the model again."
            )
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + _LOCAL_HEADER_SIZE + name_length + extra_length
        if info.compress_size != info.file_size or start + info.file_size > file_size:
            raise CheckpointError(
                f"checkpoint {self.path}: member '{WEIGHTS_MEMBER}' declares "
                f"{info.file_size} bytes at offset {start}, beyond the end of the "
                f"{file_size}-byte file; the zip is truncated or corrupt. Save the model again."
            )
        return start

    def _extract_weights(self) -> Path:
        handle, name = tempfile.mkstemp(prefix="polyak-", suffix=".weights.h5")
        target = Path(name)
        try:
            with (
                os.fdopen(handle, "wb") as file,
                zipfile.ZipFile(self.path) as archive,
                archive.open(self.weights_info) as member,
            ):
                shutil.copyfileobj(member, file, 2**20)
        except _ZIP_ERRORS as error:
            target.unlink(missing_ok=True)
            raise CheckpointError(
                f"checkpoint {self.path}: member '{WEIGHTS_MEMBER}' cannot be extracted "
                f"({_describe(error)}); the zip is corrupt or uses an unsupported compression. "
                "Save the model again."
            ) from error
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return target

    def open_weights_bytes(self) -> BinaryIO:
        """A fresh binary file object over the uncompressed bytes of ``model.weights.h5``."""
        if self._extracted is not None:
            return open(self._extracted, "rb")  # the caller closes it
        if self._weights_start is None:
            raise CheckpointError(f"checkpoint {self.path}: the reader is closed.")
        return io.BufferedReader(
            _ZipMemberView(self.path, self._weights_start, self.weights_info.file_size)
        )

    def close(self) -> None:
        """Close the weights HDF5, the zip view, and delete any extracted copy."""
        super().close()
        if self._view is not None:
            self._view.close()
            self._view = None
        if self._extracted is not None:
            with contextlib.suppress(OSError):
                self._extracted.unlink()
            self._extracted = None
        self._weights_start = None


# -- writers -------------------------------------------------------------------------------

_Reader = TypeVar("_Reader", bound=_KerasHdf5Reader)


def _require_template(path: Path, template: object, kind: type[_Reader]) -> _Reader:
    if not isinstance(template, kind):
        received = getattr(template, "format", None) or type(template).__name__
        raise OutputError(
            f"output {path}: a {kind.format} file copies the architecture and optimizer state "
            f"of a template, so it can only be written from Keras inputs of the same format "
            f"({kind.format}); the template is {received}. Average {kind.format} checkpoints, "
            "or write .safetensors, .npz or .pt instead."
        )
    return template


def _write_replacing(path: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(path)``, turning file-system failures into ``OutputError``.

    ``path`` is already a temporary file of the caller's (``polyak.files.atomic_output``
    renames it into place on success and removes it on failure), so nothing here renames.
    """
    try:
        build(path)
    except PolyakError:
        raise
    except OSError as error:
        reason = error.strerror or _describe(error)
        raise OutputError(f"output {path}: cannot be written ({reason}).") from error


def _overwrite_datasets(
    hdf5_path: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: _KerasHdf5Reader,
    output: Path,
) -> None:
    """Overwrite every model dataset of ``hdf5_path`` (a copy of the template) in place."""
    expected = template.names()
    expected_set = frozenset(expected)
    written: set[str] = set()
    with h5py.File(hdf5_path, "r+") as file:
        for name, array in tensors:
            if name not in expected_set:
                raise OutputError(
                    f"output {output}: tensor '{name}' is not a model tensor of the template "
                    f"{template.path}; a {template.format} file holds exactly its template's "
                    f"tensors, e.g. {_listing(expected)}."
                )
            if name in written:
                raise OutputError(
                    f"output {output}: tensor '{name}' was given twice; each tensor of the "
                    "template is written exactly once."
                )
            dataset = file[name]
            array = np.asarray(array)
            if array.shape != dataset.shape:
                raise OutputError(
                    f"output {output}: tensor '{name}' has shape {array.shape}; the template "
                    f"{template.path} has {dataset.shape}. The members must share the "
                    "template's architecture."
                )
            if array.dtype.newbyteorder("=") != dataset.dtype.newbyteorder("="):
                raise OutputError(
                    f"output {output}: tensor '{name}' has dtype {array.dtype}; the template "
                    f"{template.path} has {dataset.dtype}. Give each tensor its template dtype."
                )
            # Written at once: the engine may reuse the array's buffer for the next tensor.
            dataset[()] = array
            written.add(name)
        file.attrs[MARK_KEY] = MARK_VALUE  # polyak's mark: Keras ignores it
    missing = [name for name in expected if name not in written]
    if missing:
        raise OutputError(
            f"output {output}: {len(missing)} tensor(s) of the template {template.path} were "
            f"not given: {_listing(missing)}. Every model tensor must be written."
        )


def _write_hdf5_copy(
    path: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: _KerasHdf5Reader,
) -> None:
    path = Path(path)

    def build(temporary: Path) -> None:
        shutil.copyfile(template.path, temporary)
        _overwrite_datasets(temporary, tensors, template, path)

    _write_replacing(path, build)


def write_keras_weights(
    path: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: CheckpointReader | None,
) -> None:
    """Write a ``.weights.h5`` file: the template's weights file with its model tensors replaced.

    The template is a ``.weights.h5`` file, or a ``.keras`` archive, whose
    ``model.weights.h5`` member is the file ``model.save_weights`` writes for the same
    model; either is copied and its model tensors overwritten. The optimizer state is
    copied from the template, not averaged.

    Args:
        path: the output ``.weights.h5`` file.
        tensors: ``(name, array)`` pairs, one for each of ``template.names()``.
        template: a ``KerasWeightsReader`` or a ``KerasArchiveReader`` (the newest member).

    Raises:
        OutputError: the template is neither, or a tensor is unknown, repeated, missing,
            or of the wrong shape or dtype.
    """
    path = Path(path)
    if not isinstance(template, KerasArchiveReader):
        _write_hdf5_copy(path, tensors, _require_template(path, template, KerasWeightsReader))
        return

    def build(temporary: Path) -> None:
        with open(temporary, "wb") as file, template.open_weights_bytes() as source:
            shutil.copyfileobj(source, file, 2**20)
        _overwrite_datasets(temporary, tensors, template, path)

    _write_replacing(path, build)


def write_keras_legacy_h5(
    path: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: CheckpointReader | None,
) -> None:
    """Write a legacy full-model ``.h5``: the template's file with its model tensors replaced.

    The model config, training config and optimizer weights are copied from the template.

    Args:
        path: the output ``.h5`` file.
        tensors: ``(name, array)`` pairs, one for each of ``template.names()``.
        template: a ``KerasLegacyH5Reader`` (the newest member).

    Raises:
        OutputError: the template is not a ``KerasLegacyH5Reader``, or a tensor is unknown,
            repeated, missing, or of the wrong shape or dtype.
    """
    path = Path(path)
    _write_hdf5_copy(path, tensors, _require_template(path, template, KerasLegacyH5Reader))


def _copy_member(
    target: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    source: BinaryIO,
    compress_type: int,
    size: int,
) -> None:
    entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    entry.compress_type = compress_type
    entry.external_attr = info.external_attr
    entry.comment = info.comment
    if info.is_dir():
        target.writestr(entry, b"")
        return
    with target.open(entry, "w", force_zip64=size > zipfile.ZIP64_LIMIT) as output:
        shutil.copyfileobj(source, output, 2**20)


def write_keras_archive(
    path: str | Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: CheckpointReader | None,
) -> None:
    """Write a ``.keras`` zip: the template's members, with ``model.weights.h5`` replaced.

    Every other member (``config.json``, ``metadata.json``, assets) is copied with its
    content unchanged, in the same order and with the same compression; the weights
    member is stored uncompressed, as Keras does. The optimizer state inside the
    weights is copied from the template, not averaged.

    Args:
        path: the output ``.keras`` file.
        tensors: ``(name, array)`` pairs, one for each of ``template.names()``.
        template: a ``KerasArchiveReader`` (the newest member).

    Raises:
        OutputError: the template is not a ``KerasArchiveReader``, or a tensor is unknown,
            repeated, missing, or of the wrong shape or dtype.
    """
    path = Path(path)
    archive_template = _require_template(path, template, KerasArchiveReader)

    def build(temporary: Path) -> None:
        # Named after the output's temporary (.NAME.polyak-tmp-PID-...), so files.py
        # cleans it up after a kill as it does the temporary itself.
        hidden = path.name if path.name.startswith(".") else f".{path.name}"
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{hidden}.", suffix=".weights.h5")
        weights = Path(name)
        try:
            with os.fdopen(handle, "wb") as file, archive_template.open_weights_bytes() as source:
                shutil.copyfileobj(source, file, 2**20)
            _overwrite_datasets(weights, tensors, archive_template, path)
            with (
                zipfile.ZipFile(archive_template.zip_path) as archive,
                zipfile.ZipFile(temporary, "w") as output,
            ):
                output.comment = ZIP_COMMENT  # polyak's mark: Keras ignores it
                for info in archive.infolist():
                    if info.filename == WEIGHTS_MEMBER:
                        with open(weights, "rb") as source:
                            size = weights.stat().st_size
                            _copy_member(output, info, source, zipfile.ZIP_STORED, size)
                    else:
                        with archive.open(info) as source:
                            _copy_member(output, info, source, info.compress_type, info.file_size)
        except _ZIP_ERRORS as error:
            if isinstance(error, PolyakError):
                raise
            reason = getattr(error, "strerror", None) or _describe(error)
            raise OutputError(f"output {path}: cannot be written ({reason}).") from error
        finally:
            weights.unlink(missing_ok=True)

    _write_replacing(path, build)
