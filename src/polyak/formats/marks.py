"""How polyak marks the files it writes, and recognizes them, so an average never
becomes a member of the next average by accident.

Every output of :func:`polyak.output.write_output` (``polyak average``, ``sweep
--out-model``, ``posthoc``) carries a mark in the place its format keeps metadata,
where each framework's own loader ignores it:

- safetensors: ``"polyak": "average"`` in the header's ``__metadata__`` (each shard,
  and the index's ``metadata``);
- zip containers (``.pt`` written by polyak's own writer, ``.npz``, ``.keras``): the
  archive comment ``polyak:average``;
- HDF5 (``.weights.h5``, legacy ``.h5``): the root attribute ``polyak = "average"``.

Directory scans and globs (:mod:`polyak.discovery`) skip marked files with a note; a
marked file named explicitly is used. Files saved with ``torch.save`` (a template that
polyak's reader declined) carry no mark.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

__all__ = ["MARK_KEY", "MARK_VALUE", "ZIP_COMMENT", "is_polyak_output"]

MARK_KEY = "polyak"
MARK_VALUE = "average"
ZIP_COMMENT = b"polyak:average"
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_MAX_HEADER = 100_000_000  # as safetensors' reader


def _safetensors_marked(path: Path) -> bool:
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return False
        (size,) = struct.unpack("<Q", prefix)
        if size > _MAX_HEADER:
            return False
        try:
            header = json.loads(file.read(size))
        except (ValueError, RecursionError):
            return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get(MARK_KEY) == MARK_VALUE


def mark_zip_file(file: BinaryIO) -> None:
    """Put polyak's comment on a zip another library wrote (``torch.save``'s), if it has none.

    ``file`` is open for reading and writing; the end record is the last 22 bytes of a
    zip without a comment, whose comment length is then set and the comment appended.
    A file that does not end so is left as it is.
    """
    file.seek(0, 2)
    if file.tell() < _EOCD_SIZE:
        return
    file.seek(-_EOCD_SIZE, 2)
    end = file.read(_EOCD_SIZE)
    if not end.startswith(_EOCD) or end[20:22] != b"\x00\x00":
        return
    file.seek(-2, 2)
    file.write(struct.pack("<H", len(ZIP_COMMENT)) + ZIP_COMMENT)


def _zip_marked(path: Path) -> bool:
    """Whether the zip's end record carries polyak's comment (the file's last bytes)."""
    tail_size = _EOCD_SIZE + len(ZIP_COMMENT)
    with open(path, "rb") as file:
        file.seek(0, 2)
        if file.tell() < tail_size:
            return False
        file.seek(-tail_size, 2)
        tail = file.read(tail_size)
    return (
        tail.startswith(_EOCD)
        and tail[-len(ZIP_COMMENT) :] == ZIP_COMMENT
        and struct.unpack("<H", tail[20:22])[0] == len(ZIP_COMMENT)
    )


def _hdf5_marked(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            value = file.attrs.get(MARK_KEY)
    except (OSError, ValueError):
        return False
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value == MARK_VALUE


def is_polyak_output(path: Path) -> bool:
    """Whether ``path`` (a file or a checkpoint directory) is an output polyak marked.

    Unreadable or foreign files are not marked; their reader reports them.

    Example:
        >>> is_polyak_output(Path("run/model_500.safetensors"))  # doctest: +SKIP
        False
    """
    path = Path(path)
    try:
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.is_file():
                data = json.loads(index.read_text(encoding="utf-8"))
                metadata = data.get("metadata") if isinstance(data, dict) else None
                return isinstance(metadata, dict) and metadata.get(MARK_KEY) == MARK_VALUE
            single = path / "model.safetensors"
            return single.is_file() and _safetensors_marked(single)
        name = path.name.lower()
        if name.endswith(".safetensors"):
            return _safetensors_marked(path)
        if name.endswith(".h5"):
            return _hdf5_marked(path)
        with open(path, "rb") as file:
            is_zip = file.read(4) == b"PK\x03\x04"
        return is_zip and _zip_marked(path)
    except (OSError, ValueError, RecursionError):
        return False
