"""Finding checkpoints and putting them in order, newest first.

Order comes from the numbers in the names (natural sort), never from glob or
directory order: ``model_9.h5`` comes before ``model_10.h5``. Every integer in the
name counts, left to right, so ``epoch=3-step=1200.ckpt`` sorts as (3, 1200) and
``checkpoint_3_1500.pt`` as (3, 1500). Two checkpoints with the same numbers are an
ambiguity polyak refuses to guess about, and so is a name with no number at all
when there is more than one checkpoint.

What counts as a checkpoint:
- a file with a known suffix (see ``polyak.formats``);
- a directory holding a model file (``checkpoint-500/model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin``); the other files beside it
  (optimizer, scheduler) are ignored;
- inside a directory given on the command line: every such file and directory.
  Copies of another snapshot are not steps of their own, so directory scans and
  globs skip them: Lightning's ``last.ckpt``, timm's ``last.pth.tar`` and
  ``model_best.pth.tar``, fairseq's ``checkpoint_last.pt`` and
  ``checkpoint_best.pt``. Name one explicitly to use it.
- inside a snapshot directory, one holding a ``polyak-manifest.json`` written by
  ``polyak.snapshots``: exactly the files the manifest lists, not a scan, so files
  a crash left behind are ignored. A listed file that is missing is an error.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from polyak.errors import CheckpointError, DiscoveryError, PolyakNote
from polyak.formats import directory_model_file, format_from_name
from polyak.formats.marks import is_polyak_output
from polyak.snapshots import MANIFEST_NAME, Snapshot, read_manifest

__all__ = ["Checkpoint", "find_checkpoints", "order_key"]

_INTEGER = re.compile(r"\d+")
_NAMED = re.compile(r"(epoch|step)[=_-]?(\d+)", re.IGNORECASE)
# Lightning appends -v1, -v2 when a file name is taken: the same step saved again.
_VERSION_SUFFIX = re.compile(r"-v\d+$")
_SHARD = re.compile(r"-\d+-of-\d+$")
# Copies of another snapshot (Lightning, timm, fairseq), not steps of their own.
_SKIPPED_IN_SCANS = {
    "last.ckpt",
    "last.pth.tar",
    "model_best.pth.tar",
    "checkpoint_last.pt",
    "checkpoint_best.pt",
}
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint found on disk.

    Attributes:
        path: the file, or the directory (``checkpoint-500/``), as found.
        key: the integers of its name, the sort key.
        step: the training step its snapshot manifest records; else the ``step``
            number of its name, or else its last number.
        epoch: the epoch its snapshot manifest records; else the ``epoch`` number of
            its name, if it has one.
    """

    path: Path
    key: tuple[int, ...] = field(compare=False)
    step: int | None = field(compare=False, default=None)
    epoch: int | None = field(compare=False, default=None)

    @property
    def name(self) -> str:
        return self.path.name


def _stem(path: Path) -> str:
    if path.is_dir():
        return path.name
    fmt = format_from_name(path.name)
    if fmt is None:
        return path.stem
    suffix = max((s for s in fmt.suffixes if path.name.lower().endswith(s)), key=len)
    return path.name[: -len(suffix)]


def order_key(path: Path) -> Checkpoint:
    """Read the order of a checkpoint from its name.

    Example:
        >>> order_key(Path("epoch=3-step=1200.ckpt")).key
        (3, 1200)
    """
    stem = _VERSION_SUFFIX.sub("", _stem(path))
    numbers = tuple(int(text) for text in _INTEGER.findall(stem))
    named = {label.lower(): int(value) for label, value in _NAMED.findall(stem)}
    step = named.get("step", numbers[-1] if numbers else None)
    return Checkpoint(path=path, key=numbers, step=step, epoch=named.get("epoch"))


def _is_checkpoint_file(path: Path) -> bool:
    fmt = format_from_name(path.name)
    return fmt is not None and fmt.name != "sharded-safetensors"


def _with_recorded_numbers(
    checkpoint: Checkpoint, manifests: dict[Path, dict[str, Snapshot]]
) -> Checkpoint:
    """The checkpoint with the step and epoch its snapshot manifest records, if any.

    A snapshot's name carries one number (its epoch, or its step); the manifest has
    both. The order still comes from the names.
    """
    directory = checkpoint.path.parent
    if directory not in manifests:
        try:
            listed = read_manifest(directory) or []
        except CheckpointError:  # a damaged manifest is reported when its directory is scanned
            listed = []
        manifests[directory] = {snapshot.name: snapshot for snapshot in listed}
    snapshot = manifests[directory].get(checkpoint.name)
    if snapshot is None:
        return checkpoint
    return dataclasses.replace(
        checkpoint,
        step=checkpoint.step if snapshot.step is None else snapshot.step,
        epoch=checkpoint.epoch if snapshot.epoch is None else snapshot.epoch,
    )


def _manifest_members(directory: Path) -> list[Path]:
    snapshots = read_manifest(directory) or []
    manifest = directory / MANIFEST_NAME
    missing = [snapshot.name for snapshot in snapshots if not snapshot.path.exists()]
    if missing:
        raise DiscoveryError(
            f"directory {directory}: {manifest.name} lists {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} missing. Restore the file(s), or pass "
            "the remaining files explicitly."
        )
    if not snapshots:
        raise DiscoveryError(
            f"directory {directory}: {manifest.name} lists no snapshots yet (training has "
            "not saved any)."
        )
    return [snapshot.path for snapshot in snapshots]


def _scan_directory(directory: Path) -> list[Path]:
    if (directory / MANIFEST_NAME).is_file():
        return _manifest_members(directory)
    if directory_model_file(directory) is not None:
        return [directory]
    found = []
    for child in sorted(directory.iterdir()):
        if child.name.startswith(".") or child.name in _SKIPPED_IN_SCANS:
            continue
        if child.is_dir():
            if directory_model_file(child) is not None:
                found.append(child)
        elif _is_checkpoint_file(child):
            found.append(child)
    found = _without_outputs(found)
    if not found:
        raise DiscoveryError(
            f"directory {directory}: no checkpoints found (files with a known suffix, or "
            "subdirectories holding model.safetensors or pytorch_model.bin)."
        )
    return found


def _without_outputs(paths: list[Path]) -> list[Path]:
    """``paths`` less the outputs polyak marked (see ``polyak.formats.marks``), each noted.

    Only scans and globs skip them: an average written into the run folder is not the
    newest snapshot. A marked file named on its own is used.
    """
    kept = []
    for path in paths:
        if is_polyak_output(path):
            warnings.warn(
                f"skipped {path}: polyak wrote it (an average, not a snapshot); name it on its "
                "own to use it as a member.",
                PolyakNote,
                stacklevel=2,
            )
        else:
            kept.append(path)
    return kept


def _expand(entry: str | Path) -> list[Path]:
    path = Path(entry)
    if path.exists():
        return _scan_directory(path) if path.is_dir() else [path]
    if _GLOB_CHARACTERS & set(str(entry)):
        matches = sorted(Path(match) for match in glob.glob(str(entry)))
        if not matches:
            raise DiscoveryError(f"pattern {entry}: no files match.")
        expanded: list[Path] = []
        for match in matches:
            if match.is_dir():
                if directory_model_file(match) is not None:
                    expanded.append(match)
            elif _is_checkpoint_file(match) and match.name not in _SKIPPED_IN_SCANS:
                expanded.append(match)
        expanded = _without_outputs(expanded)
        if not expanded:
            shown = ", ".join(match.name for match in matches[:3])
            raise DiscoveryError(
                f"pattern {entry}: matches {len(matches)} path(s) ({shown}), none of them a "
                "checkpoint (a file with a known suffix or a directory holding a model file)."
            )
        return expanded
    raise DiscoveryError(f"checkpoint {entry}: no such file or directory.")


def find_checkpoints(
    paths: str | Path | Iterable[str | Path],
    *,
    last: int | None = None,
) -> list[Checkpoint]:
    """Find checkpoints in files, globs and directories, ordered newest first.

    Args:
        paths: files, directories, or glob patterns such as ``"run/model_*.h5"``.
        last: keep only the ``last`` newest checkpoints.

    Returns:
        Checkpoints, newest first (the order the weighting schemes expect).

    Raises:
        DiscoveryError: nothing found, a name without a number among several, two
            checkpoints with the same numbers, a file a snapshot manifest lists is
            missing, or ``last`` < 1.
        CheckpointError: a snapshot directory's manifest is damaged.

    Example:
        >>> [c.name for c in find_checkpoints("run/")]  # doctest: +SKIP
        ['model_499.h5', 'model_498.h5', ...]
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if last is not None and (not isinstance(last, int) or last < 1):
        raise DiscoveryError(f"last must be a whole number >= 1; received {last!r}.")
    unique: dict[Path, Path] = {}
    for entry in paths:
        for path in _expand(entry):
            unique.setdefault(path.resolve(), path)
    if not unique:
        raise DiscoveryError("no checkpoints given.")
    manifests: dict[Path, dict[str, Snapshot]] = {}
    checkpoints = [_with_recorded_numbers(order_key(path), manifests) for path in unique.values()]
    for checkpoint in checkpoints:
        if _SHARD.search(_stem(checkpoint.path)):
            raise DiscoveryError(
                f"checkpoint {checkpoint.path}: looks like one shard of a sharded checkpoint; "
                "pass the directory that holds it and its model.safetensors.index.json."
            )
    if len(checkpoints) > 1:
        for checkpoint in checkpoints:
            if not checkpoint.key:
                raise DiscoveryError(
                    f"checkpoint {checkpoint.path}: its name has no step or epoch number, so its "
                    "place among the others is unknown. Rename it (e.g. model_500.h5) or leave "
                    "it out."
                )
    checkpoints.sort(key=lambda c: c.key, reverse=True)
    for newer, older in itertools.pairwise(checkpoints):
        if newer.key == older.key:
            raise DiscoveryError(
                f"checkpoints {older.path} and {newer.path} have the same step numbers "
                f"{newer.key}; their order is ambiguous. Pass only one of them."
            )
    return checkpoints[:last] if last is not None else checkpoints
