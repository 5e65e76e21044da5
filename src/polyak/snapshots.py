"""A directory of training snapshots that a crash cannot corrupt.

How a commit works, what it guarantees, the manifest's layout: :class:`SnapshotDirectory`.

The framework adapters commit every snapshot through it; :class:`SnapshotOptions`
checks the arguments they share, and :class:`SnapshotSchedule` says when callbacks save.

Example:
    >>> snapshots = SnapshotDirectory("run/", keep=10)  # doctest: +SKIP
    >>> snapshots.commit(model.save_weights, "model_0499.weights.h5", epoch=499)  # doctest: +SKIP
    >>> [s.path.name for s in verify("run/")]  # doctest: +SKIP
    ['model_0490.weights.h5', ..., 'model_0499.weights.h5']
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from polyak.checks import as_whole_number, whole_number
from polyak.errors import CheckpointError, OutputError
from polyak.files import _fsync_directory, atomic_output
from polyak.weights.profiles import gamma_of
from polyak.weights.schemes import format_number

__all__ = [
    "MANIFEST_NAME",
    "ScheduledSnapshotSettings",
    "Snapshot",
    "SnapshotDirectory",
    "SnapshotOptions",
    "SnapshotSchedule",
    "SnapshotSettings",
    "check_snapshot_arguments",
    "is_whole_number",
    "read_manifest",
    "verify",
]

MANIFEST_NAME = "polyak-manifest.json"
MANIFEST_FORMAT = "polyak-snapshots"
MANIFEST_VERSION = 1

_TEMPORARY_MARK = ".polyak-tmp-"
# A snapshot's temporary directory, and atomic_output's temporary file of the manifest.
_TEMPORARIES = (
    re.compile(r"^\.polyak-tmp-(\d+)-[0-9a-f]+-.+$"),
    re.compile(r"^\." + re.escape(MANIFEST_NAME) + r"\.polyak-tmp-(\d+)-[0-9a-f]+$"),
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    """One committed snapshot, as its manifest entry records it.

    Attributes:
        path: the file, inside the snapshot directory.
        epoch: the training epoch it was saved at, if known.
        step: the training step (global batch count) it was saved at, if known.
        logs: the training logs at that point (numbers and strings only).
        sha256: the hex SHA-256 of the file.
        bytes: the size of the file.
        time: when it was committed, ISO 8601 in UTC.
    """

    path: Path
    epoch: int | None = None
    step: int | None = None
    logs: dict[str, float | int | str] = field(default_factory=dict)
    sha256: str = ""
    bytes: int = 0
    time: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def _record(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "epoch": self.epoch,
            "step": self.step,
            "logs": dict(self.logs),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "time": self.time,
        }


@dataclass(frozen=True)
class _Manifest:
    snapshots: list[Snapshot]
    pending: list[Snapshot]
    evicting: list[str]


# ---------------------------------------------------------------- when to save


def is_whole_number(value: object) -> bool:
    """An ``int`` that is not a ``bool``, of any sign.

    Kept for earlier callers; polyak's own checks use :mod:`polyak.checks`, which also
    reads numpy integers and 0-d integer tensors as whole numbers.
    """
    return isinstance(value, int) and not isinstance(value, bool)


def check_snapshot_arguments(
    directory: object, keep: object, format: object, formats: Iterable[str], prefix: object
) -> None:
    """The checks every snapshot helper makes of its arguments (Keras, torch, Lightning).

    Raises:
        ValueError: naming the argument, the rule and what was received.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(f"directory must be a path; received {directory!r}.")
    whole_number(keep, "keep", minimum=1)
    formats = list(formats)
    if format not in formats:
        raise ValueError(
            f"format must be one of {', '.join(map(repr, formats))}; received {format!r}."
        )
    if (
        not isinstance(prefix, str)
        or not prefix
        or prefix.startswith(".")
        or any(separator in prefix for separator in "/\\")
    ):
        raise ValueError(
            "prefix must be a non-empty file name start without '/' or '\\' that does "
            f"not start with '.'; received {prefix!r}."
        )


@dataclass(frozen=True)
class SnapshotSchedule:
    """When a training callback saves a snapshot (the Keras and Lightning callbacks).

    - default: the last ``keep`` epochs of a run of known length, every
      ``every_epochs``-th counting back from the final epoch (always saved);
    - ``rolling=True``: every ``every_epochs`` epochs, keeping the ``keep`` most recent
      (for EarlyStopping, where the last epoch is not known);
    - ``every_steps=N``: every N training steps, keeping the ``keep`` most recent.

    Raises:
        ValueError: an argument out of range, or both ``every_steps`` and
            ``every_epochs`` given.
    """

    keep: int = 10
    rolling: bool = False
    every_epochs: int = 1
    every_steps: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", whole_number(self.keep, "keep", minimum=1))
        if not isinstance(self.rolling, bool):
            raise ValueError(f"rolling must be True or False; received {self.rolling!r}.")
        every_epochs = whole_number(self.every_epochs, "every_epochs", minimum=1)
        every_steps = whole_number(self.every_steps, "every_steps", minimum=1, or_none=True)
        object.__setattr__(self, "every_epochs", every_epochs)
        object.__setattr__(self, "every_steps", every_steps)
        if self.every_steps is not None:
            if self.every_epochs != 1:
                raise ValueError(
                    f"give every_steps or every_epochs, not both; received "
                    f"every_steps={self.every_steps!r} and every_epochs={self.every_epochs!r}."
                )

    @property
    def needs_epoch_count(self) -> bool:
        """Whether the schedule needs the run's number of epochs (the default mode)."""
        return self.every_steps is None and not self.rolling

    def saves_epoch(self, epoch: int, epochs: int | None) -> bool:
        """Whether to save at the end of 0-based ``epoch`` of a run of ``epochs``."""
        if self.every_steps is not None:
            return False
        if self.rolling:
            return (epoch + 1) % self.every_epochs == 0
        epochs = as_whole_number(epochs)
        if epochs is None:
            return False
        # Counted back from the final epoch, so that it is always saved.
        from_end = epochs - 1 - epoch
        return 0 <= from_end < self.keep * self.every_epochs and from_end % self.every_epochs == 0

    def saves_step(self, previous: int, step: int) -> bool:
        """Whether the steps from ``previous`` (excluded) to ``step`` cross a save point."""
        return self.every_steps is not None and (
            step // self.every_steps > previous // self.every_steps
        )

    def stopped_early(self, last_epoch: int | None, epochs: int | None) -> bool:
        """Whether a default-mode run ended before its final epoch (fewer snapshots)."""
        epochs = as_whole_number(epochs)
        return (
            self.needs_epoch_count
            and last_epoch is not None
            and epochs is not None
            and last_epoch < epochs - 1
        )


def check_posthoc_widths(posthoc: object) -> tuple[float, ...]:
    """The ``posthoc`` widths (``sigma_rel``) as floats, in the order given, once checked."""
    if isinstance(posthoc, (str, bytes)) or not isinstance(posthoc, (tuple, list)):
        raise ValueError(
            "posthoc takes the widths (sigma_rel) of the EMA profiles to track, as a tuple or "
            f"list such as (0.05, 0.10), or () for none; received {posthoc!r}."
        )
    widths = []
    for width in posthoc:
        gamma_of(width)  # a SchemeError (a ValueError) naming the allowed range
        widths.append(float(width))
    names = [format_number(width) for width in widths]
    if len(set(names)) != len(names):
        raise ValueError(f"posthoc widths must differ from each other; received {posthoc!r}.")
    return tuple(widths)


@dataclass(frozen=True, kw_only=True)
class SnapshotOptions:
    """The arguments the three snapshot helpers share, checked once, in one record.

    The Keras callback (``polyak.keras.SnapshotCheckpoint``), the torch helper
    (``polyak.torch.SnapshotSaver``) and the Lightning callback
    (``polyak.lightning.SnapshotCallback``) take these arguments under the same names
    and build one record from them; each keeps its own signature and defaults. The
    torch helper saves when it is told, so it leaves the epoch and step schedule at
    its defaults.

    Args:
        directory: the snapshot directory, a path.
        formats: the framework's file formats, each to its file suffix.
        format: one of ``formats``.
        keep: how many snapshots to keep, a whole number >= 1.
        prefix: the start of each file name: not empty, no ``/`` or ``\\``, not
            starting with ``.``.
        rolling: keep the most recent epochs instead of the run's last ones.
        every_epochs: save every this many epochs, a whole number >= 1.
        every_steps: save every this many steps instead, a whole number >= 1, or None.
        posthoc: the widths (``sigma_rel``) of the power-function EMA profiles to
            track, a tuple or list (empty: none).
        posthoc_keep: how many EMA snapshots each profile keeps, a whole number >= 1.
        posthoc_every: commit the profiles every this many steps, or None.

    Attributes:
        schedule: the :class:`SnapshotSchedule` of ``keep``, ``rolling``,
            ``every_epochs`` and ``every_steps``.
        suffix: the file suffix of ``format``.

    Raises:
        ValueError: the first argument that breaks its rule, named with what was
            received (an ``ArgumentError`` for a count, a ``SchemeError`` for a width).

    Example:
        >>> options = SnapshotOptions(
        ...     directory="run/", formats={"npz": ".npz"}, format="npz", posthoc=[0.05],
        ...     posthoc_keep=100,
        ... )
        >>> options.directory, options.suffix, options.posthoc, options.schedule.keep
        (PosixPath('run'), '.npz', (0.05,), 10)
    """

    directory: Path
    formats: Mapping[str, str] = field(compare=False, repr=False)
    format: str
    keep: int = 10
    prefix: str = "model"
    rolling: bool = False
    every_epochs: int = 1
    every_steps: int | None = None
    posthoc: tuple[float, ...] = ()
    posthoc_keep: int
    posthoc_every: int | None = None
    schedule: SnapshotSchedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_snapshot_arguments(self.directory, self.keep, self.format, self.formats, self.prefix)
        schedule = SnapshotSchedule(self.keep, self.rolling, self.every_epochs, self.every_steps)
        posthoc = check_posthoc_widths(self.posthoc)
        values = {
            "directory": Path(self.directory),
            "formats": dict(self.formats),
            "keep": schedule.keep,
            "every_epochs": schedule.every_epochs,
            "every_steps": schedule.every_steps,
            "posthoc": posthoc,
            "posthoc_keep": whole_number(self.posthoc_keep, "posthoc_keep", minimum=1),
            "posthoc_every": whole_number(
                self.posthoc_every, "posthoc_every", minimum=1, or_none=True
            ),
            "schedule": schedule,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def suffix(self) -> str:
        """The file suffix of :attr:`format`."""
        return self.formats[self.format]


# ---------------------------------------------------------------- reading


def _option(name: str) -> property:
    return property(
        lambda self: getattr(self.options, name),
        doc=f"``options.{name}``, checked (read-only).",
    )


class SnapshotSettings:
    """The checked arguments of a snapshot helper, read as its own attributes.

    The Keras and Lightning callbacks and the torch saver each keep their
    :class:`SnapshotOptions` as ``options``; this mixin shows its fields as
    ``helper.keep``, ``helper.directory``... so the three read alike.
    """

    options: SnapshotOptions
    directory = _option("directory")
    format = _option("format")
    keep = _option("keep")
    prefix = _option("prefix")
    posthoc = _option("posthoc")
    posthoc_keep = _option("posthoc_keep")
    posthoc_every = _option("posthoc_every")


class ScheduledSnapshotSettings(SnapshotSettings):
    """:class:`SnapshotSettings` and the schedule of a callback that saves by itself
    (Keras, Lightning), where the torch saver saves when the loop calls it."""

    rolling = _option("rolling")
    every_epochs = _option("every_epochs")
    every_steps = _option("every_steps")
    schedule = _option("schedule")


def _check_file_name(name: object) -> str | None:
    """Why ``name`` cannot be a snapshot file name in the directory, or None."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "is not a plain file name (it has a path separator or is '.' or '..')"
    if name.startswith("."):
        return "is hidden (starts with '.'), which polyak keeps for temporary files"
    if name == MANIFEST_NAME:
        return "is the manifest's own name"
    return None


# Epochs and steps fit a signed 64-bit integer (and so, closely enough, a float).
_MAX_COUNT = 2**63


def _optional_int(value: object) -> bool:
    return value is None or as_whole_number(value, 0, _MAX_COUNT - 1) is not None


def _entry(directory: Path, record: object, manifest: Path, where: str) -> Snapshot:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"manifest {manifest}: {where} {problem}. The manifest is damaged; restore it, "
            "or delete it to treat the directory as plain checkpoint files."
        )

    if not isinstance(record, dict):
        raise bad(f"is {type(record).__name__}, not an object")
    problem = _check_file_name(record.get("file"))
    if problem is not None:
        raise bad(f"has a 'file' that {problem} (received {record.get('file')!r})")
    for key in ("epoch", "step"):
        if not _optional_int(record.get(key)):
            raise bad(f"has a '{key}' that is not a whole number from 0 to 2**63 - 1, or null")
    logs = record.get("logs", {})
    if not isinstance(logs, dict) or not all(
        isinstance(value, (int, float, str)) and not isinstance(value, bool)
        for value in logs.values()
    ):
        raise bad("has 'logs' that are not an object of numbers and strings")
    sha256 = record.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise bad("has no valid 'sha256' (64 lowercase hex digits)")
    size = record.get("bytes")
    if as_whole_number(size) is None:
        raise bad("has no valid 'bytes' (a whole number >= 0)")
    time = record.get("time", "")
    if not isinstance(time, str):
        raise bad("has a 'time' that is not a string")
    return Snapshot(
        path=directory / record["file"],
        epoch=record.get("epoch"),
        step=record.get("step"),
        logs=dict(logs),
        sha256=sha256,
        bytes=size,
        time=time,
    )


def _read(directory: Path) -> _Manifest | None:
    manifest = directory / MANIFEST_NAME
    try:
        raw = manifest.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise CheckpointError(
            f"manifest {manifest}: cannot be read ({error.strerror or error})."
        ) from None

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"manifest {manifest}: {problem}. The manifest is damaged or is not a polyak "
            "snapshot manifest; restore it, or delete it to treat the directory as plain "
            "checkpoint files."
        )

    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise bad("is not valid JSON (nested too deeply)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit number
        raise bad(f"is not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise bad(f'has no "format": "{MANIFEST_FORMAT}"')
    version = data.get("version")
    if version != MANIFEST_VERSION:
        raise bad(
            f"has version {version!r}; this polyak reads version {MANIFEST_VERSION} "
            "(a newer polyak may have written it)"
        )
    sections = []
    for key in ("snapshots", "pending"):
        records = data.get(key, [])
        if not isinstance(records, list):
            raise bad(f"has a '{key}' that is not a list")
        entries = [
            _entry(directory, record, manifest, f"entry {index} of '{key}'")
            for index, record in enumerate(records)
        ]
        counts = collections.Counter(entry.name for entry in entries)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            raise bad(f"lists {', '.join(duplicates)} more than once in '{key}'")
        sections.append(entries)
    evicting = data.get("evicting", [])
    if not isinstance(evicting, list) or any(_check_file_name(name) for name in evicting):
        raise bad("has an 'evicting' that is not a list of plain file names")
    return _Manifest(snapshots=sections[0], pending=sections[1], evicting=list(evicting))


def read_manifest(directory: str | Path) -> list[Snapshot] | None:
    """The snapshots a directory's manifest lists, oldest first; None without a manifest.

    Reads the manifest only; :func:`verify` also checks the files.

    Raises:
        CheckpointError: the manifest cannot be read or parsed, naming it.
    """
    manifest = _read(Path(directory))
    return None if manifest is None else manifest.snapshots


def _digest(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """SHA-256 and size of a file; with ``sync``, fsync it too."""
    import hashlib  # here: OpenSSL's start-up cost is paid only where files are hashed

    digest = hashlib.sha256()
    size = 0
    with open(path, "rb+" if sync else "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(file.fileno())
    return digest.hexdigest(), size


def _matches(snapshot: Snapshot) -> bool:
    try:
        if not snapshot.path.is_file() or snapshot.path.stat().st_size != snapshot.bytes:
            return False
        return _digest(snapshot.path) == (snapshot.sha256, snapshot.bytes)
    except OSError:
        return False


def verify(directory: str | Path) -> list[Snapshot]:
    """Check every snapshot the manifest lists against its size and SHA-256.

    Returns:
        The snapshots, oldest first. A file caught mid-way through being committed
        again under the same name is returned with the pending entry it matches.

    Raises:
        CheckpointError: no manifest, a damaged manifest, or a listed file that is
            missing or differs from its entry; the message names the file.

    Example:
        >>> [snapshot.name for snapshot in verify("run/")]  # doctest: +SKIP
        ['model_0497.weights.h5', 'model_0498.weights.h5', 'model_0499.weights.h5']
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    manifest = _read(directory)
    if manifest is None:
        raise CheckpointError(
            f"manifest {path}: not found, so {directory} is not a polyak snapshot directory."
        )
    pending = {entry.name: entry for entry in manifest.pending}
    verified = []
    for entry in manifest.snapshots:
        if not entry.path.is_file():
            raise CheckpointError(
                f"snapshot {entry.path}: listed in {path} but missing. It was deleted or "
                "moved after it was saved."
            )
        try:
            digest, size = _digest(entry.path)
        except OSError as error:
            raise CheckpointError(
                f"snapshot {entry.path}: cannot be read ({error.strerror or error})."
            ) from None
        candidates = [entry, pending[entry.name]] if entry.name in pending else [entry]
        match = next((c for c in candidates if (c.sha256, c.bytes) == (digest, size)), None)
        if match is None:
            raise CheckpointError(
                f"snapshot {entry.path}: has {size} bytes with SHA-256 {digest}; {path} "
                f"records {entry.bytes} bytes with SHA-256 {entry.sha256}. The file was "
                "changed or damaged after it was saved."
            )
        verified.append(match)
    return verified


# ---------------------------------------------------------------- writing


def _json_value(value: object) -> float | int | str | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isfinite(number):
            return number
        return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
    # numpy 0-d arrays and 0-d tensors of any framework, without importing one.
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) == () and hasattr(value, "item"):
        try:
            item = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
        if isinstance(item, (bool, int, float, str)):
            return _json_value(item)
    return None


def _json_logs(logs: Mapping[str, Any] | None) -> dict[str, float | int | str]:
    converted = {}
    for key, value in (logs or {}).items():
        number = _json_value(value)
        if number is not None:
            converted[str(key)] = number
    return converted


def _write_manifest(
    directory: Path,
    snapshots: Iterable[Snapshot],
    *,
    pending: Iterable[Snapshot] = (),
    evicting: Iterable[str] = (),
) -> None:
    data: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "snapshots": [snapshot._record() for snapshot in snapshots],
    }
    pending = [snapshot._record() for snapshot in pending]
    evicting = list(evicting)
    if pending:
        data["pending"] = pending
    if evicting:
        data["evicting"] = evicting
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    manifest = directory / MANIFEST_NAME
    try:
        with atomic_output(manifest, overwrite=True) as temporary:
            temporary.write_bytes(text.encode("utf-8"))
    except OutputError:
        raise
    except OSError as error:
        raise OutputError(
            f"manifest {manifest}: cannot be written ({error.strerror or error})."
        ) from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, OSError):
        # Someone else's process, or a pid we cannot ask about: keep its files.
        return True
    return True


def _delete(directory: Path, names: Iterable[str]) -> list[str]:
    """Delete files by name; return the names that could not be deleted."""
    failed = []
    for name in names:
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
        except OSError:
            failed.append(name)
    _fsync_directory(directory)
    return failed


def _remove_temporary(path: Path) -> None:
    """Delete a temporary file or directory, ignoring errors (best-effort cleanup)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SnapshotDirectory:
    """Snapshots in one directory: committed atomically, the newest ``keep`` kept.

    Opening a directory creates it if needed and completes or undoes a commit a
    crash interrupted; it never deletes a file polyak did not write.

    The framework adapters (the Keras callback, the PyTorch saver and the Lightning
    callback) save every snapshot through this class. It keeps the
    newest ``keep`` snapshots and a manifest, ``polyak-manifest.json``, that lists each
    one, oldest first, with its epoch, step, training logs, size and SHA-256.
    ``polyak.find_checkpoints`` reads a directory that holds a manifest as exactly the
    files it lists, so a file left over by a crash is never averaged.

    One commit, every file fsynced and every rename followed by an fsync of the
    directory:

    1. ``write(temporary)`` saves the snapshot to ``NAME`` inside a hidden temporary
       directory beside its final name, ``.polyak-tmp-PID-RANDOM-NAME/NAME``; its size and
       SHA-256 are taken. Whatever else the save function writes beside its file (the
       safetensors library writes a ``.tmpXXXXXX`` file and renames it) stays in that
       directory, which is polyak's to delete.
    2. The manifest is rewritten with the new entry under ``"pending"``; the listed
       snapshots are unchanged.
    3. The temporary file is renamed to ``NAME``, and the temporary directory deleted.
    4. The manifest is rewritten listing the kept snapshots, the new one last, and the
       names retention evicts under ``"evicting"``.
    5. The evicted files are deleted, then the manifest is rewritten without
       ``"evicting"``.

    Guarantees, whenever the process dies: the manifest is always a complete one (it
    is replaced atomically); every file it lists is complete and matches its
    checksum; and it never lists fewer snapshots than before the interrupted commit,
    since nothing is removed before step 4 and step 4 adds the new snapshot. The one
    window that needs care is re-committing a name already listed (a resumed run):
    between steps 3 and 4 the file holds the new content, which matches the
    ``"pending"`` entry rather than the listed one; :func:`verify` accepts it.

    Opening a directory (constructing :class:`SnapshotDirectory`, which every commit
    also does first) completes or undoes an interrupted commit:

    - a pending entry whose file is on disk with its size and checksum is adopted (its
      rename happened), with the retention its commit would have applied: the oldest
      snapshots beyond ``keep`` are evicted (as in steps 4 and 5), but never so many that
      fewer are listed than before the commit; otherwise it is dropped;
    - files listed under ``"evicting"`` and not listed as snapshots are deleted;
    - temporary files and directories of processes that are no longer alive are deleted.

    No other file is ever deleted: files of the user's, or snapshots from before the
    manifest existed, stay where they are (and are ignored by ``find_checkpoints``).
    One process writes a directory at a time.

    Manifest::

        {"format": "polyak-snapshots", "version": 1,
         "snapshots": [{"file": "model_0499.weights.h5", "epoch": 499, "step": 1234,
                        "logs": {"loss": 0.3}, "sha256": "…", "bytes": 123,
                        "time": "2025-01-01T12:00:00.000Z"}]}

    Log values are stored as JSON numbers and strings only: numpy scalars and 0-d
    tensors become numbers, NaN and infinity the strings ``"nan"``, ``"inf"`` and
    ``"-inf"``; anything else is dropped.

    Args:
        directory: where the snapshots and ``polyak-manifest.json`` live.
        keep: how many snapshots to keep, the newest by order of commit.

    Raises:
        ValueError: ``keep`` is not a whole number >= 1.
        OutputError: the directory cannot be created.
        CheckpointError: the directory holds a damaged manifest.

    Example:
        >>> snapshots = SnapshotDirectory("run/", keep=3)  # doctest: +SKIP
        >>> for epoch in range(10):  # doctest: +SKIP
        ...     train_one_epoch()
        ...     snapshots.commit(save, f"model_{epoch:04d}.npz", epoch=epoch)
        >>> [s.name for s in snapshots.snapshots()]  # doctest: +SKIP
        ['model_0007.npz', 'model_0008.npz', 'model_0009.npz']
    """

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.keep = whole_number(keep, "keep", minimum=1)
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(
                f"snapshot directory {self.directory}: exists and is not a directory."
            ) from None
        except OSError as error:
            raise OutputError(
                f"snapshot directory {self.directory}: cannot be created "
                f"({error.strerror or error})."
            ) from None
        self._recover()

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST_NAME

    def snapshots(self) -> list[Snapshot]:
        """The committed snapshots, oldest first, as the manifest lists them."""
        return read_manifest(self.directory) or []

    def _recover(self) -> list[Snapshot]:
        """Complete or undo an interrupted commit; return the committed snapshots."""
        manifest = _read(self.directory)
        self._remove_dead_temporaries()
        if manifest is None:
            return []
        snapshots = list(manifest.snapshots)
        for entry in manifest.pending:
            if _matches(entry):
                snapshots = [s for s in snapshots if s.name != entry.name] + [entry]
        # An adopted commit gets its retention; a smaller keep than the directory was
        # written with evicts nothing until the next commit.
        limit = max(self.keep, len(manifest.snapshots))
        evicted = [snapshot.name for snapshot in snapshots[:-limit]]
        snapshots = snapshots[-limit:]
        listed = {snapshot.name for snapshot in snapshots}
        evicting = [name for name in [*manifest.evicting, *evicted] if name not in listed]
        if evicted:  # listed as evicting before they are deleted, as a commit does
            _write_manifest(self.directory, snapshots, evicting=evicting)
        remaining = _delete(self.directory, evicting)
        if manifest.pending or evicted or remaining != manifest.evicting:
            _write_manifest(self.directory, snapshots, evicting=remaining)
        return snapshots

    def _remove_dead_temporaries(self) -> None:
        for child in self.directory.iterdir():
            for pattern in _TEMPORARIES:
                match = pattern.match(child.name)
                if match is None:
                    continue
                pid = int(match.group(1))
                if pid != os.getpid() and not _process_alive(pid):
                    _remove_temporary(child)
                break

    def commit(
        self,
        write: Callable[[Path], object],
        file_name: str,
        epoch: int | None = None,
        step: int | None = None,
        logs: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Save one snapshot through ``write`` and add it to the manifest atomically.

        Args:
            write: saves the snapshot to the path it is given (``file_name`` in a
                hidden temporary directory beside the final file), e.g.
                ``model.save_weights``.
            file_name: the snapshot's name in the directory; put the epoch or step
                in it (``model_0499.weights.h5``): checkpoints are ordered by the
                numbers in their names. A name already listed is replaced.
            epoch: the epoch, recorded in the manifest.
            step: the step (global batch count), recorded in the manifest.
            logs: training logs; numbers and strings are recorded, the rest dropped.

        Returns:
            The committed snapshot.

        Raises:
            ValueError: ``file_name`` is not a plain, visible file name.
            OutputError: the snapshot or the manifest cannot be written.
            Whatever ``write`` raises, after its temporary directory is removed.
        """
        problem = _check_file_name(file_name)
        if problem is not None:
            raise ValueError(f"snapshot file name {file_name!r} {problem}.")
        epoch = whole_number(epoch, "epoch", maximum=_MAX_COUNT - 1, or_none=True)
        step = whole_number(step, "step", maximum=_MAX_COUNT - 1, or_none=True)
        committed = self._recover()
        final = self.directory / file_name
        workspace = self.directory / (
            f"{_TEMPORARY_MARK}{os.getpid()}-{os.urandom(4).hex()}-{file_name}"
        )
        temporary = workspace / file_name
        try:
            workspace.mkdir()
        except OSError as error:
            raise OutputError(
                f"snapshot {final}: cannot be written ({error.strerror or error})."
            ) from None
        try:
            write(temporary)
            if not temporary.is_file():
                raise OutputError(
                    f"snapshot {final}: the save function wrote no file at {temporary}."
                )
            try:
                digest, size = _digest(temporary, sync=True)
            except OSError as error:
                raise OutputError(
                    f"snapshot {final}: cannot be written ({error.strerror or error})."
                ) from None
            snapshot = Snapshot(
                path=final,
                epoch=epoch,
                step=step,
                logs=_json_logs(logs),
                sha256=digest,
                bytes=size,
                time=_now(),
            )
            _write_manifest(self.directory, committed, pending=[snapshot])
            try:
                os.replace(temporary, final)
            except OSError as error:
                raise OutputError(
                    f"snapshot {final}: cannot be written ({error.strerror or error})."
                ) from None
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        _fsync_directory(self.directory)
        kept = [s for s in committed if s.name != file_name] + [snapshot]
        evicting = [s.name for s in kept[: -self.keep]]
        kept = kept[-self.keep :]
        _write_manifest(self.directory, kept, evicting=evicting)
        if evicting:
            remaining = _delete(self.directory, evicting)
            _write_manifest(self.directory, kept, evicting=remaining)
        return snapshot
