"""Finding checkpoints and putting them in order, newest first.

Order comes from the numbers in the names (natural sort), never from glob or
directory order: ``model_9.h5`` comes before ``model_10.h5``. Every integer in the
name counts, left to right, so ``epoch=3-step=1200.ckpt`` sorts as (3, 1200) and
``checkpoint_3_1500.pt`` as (3, 1500). Two checkpoints with the same numbers are an
ambiguity polyak refuses to guess about, and so is a name with no number at all
when there is more than one checkpoint.

What counts as a checkpoint, and which members go together: :func:`find_checkpoints`.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from polyak.checks import whole_number
from polyak.errors import CheckpointError, DiscoveryError, PolyakNote
from polyak.formats import directory_model_file, format_from_name, format_of
from polyak.formats.marks import is_polyak_output
from polyak.snapshots import MANIFEST_NAME, Snapshot, read_manifest

__all__ = ["Checkpoint", "find_checkpoints", "order_key", "within_window"]

_INTEGER = re.compile(r"\d+")
_NAMED = re.compile(r"(epoch|step)[=_-]?(\d+)", re.IGNORECASE)
# Lightning appends -v1, -v2 when a file name is taken: the same step saved again.
_VERSION_SUFFIX = re.compile(r"-v\d+$")
_SHARD = re.compile(r"-\d+-of-\d+$")
# The Hugging Face Trainer names its checkpoint directories by global step.
_TRAINER_STEP = re.compile(r"checkpoint-\d+")
# Copies of another snapshot (Lightning, timm, fairseq), not steps of their own.
_SKIPPED_IN_SCANS = {
    "last.ckpt": "Lightning's copy of the newest checkpoint",
    "last.pth.tar": "timm's copy of the newest checkpoint",
    "model_best.pth.tar": "timm's copy of the best checkpoint",
    "checkpoint_last.pt": "fairseq's copy of the newest checkpoint",
    "checkpoint_best.pt": "fairseq's copy of the best checkpoint",
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
        step_is_known: whether ``step`` is known to count steps (from the manifest, a
            ``step`` label in the name, or a Hugging Face ``checkpoint-N`` directory),
            rather than being the name's last number, which may count epochs.
    """

    path: Path
    key: tuple[int, ...] = field(compare=False)
    step: int | None = field(compare=False, default=None)
    epoch: int | None = field(compare=False, default=None)
    step_is_known: bool = field(compare=False, default=False)

    @property
    def name(self) -> str:
        return self.path.name

    def position(self) -> str:
        """Where the checkpoint lies in training, labelled with what is known of it.

        ``step 1200, epoch 3`` where the manifest or the name says which number is which
        (``epoch=3-step=1200.ckpt``; Hugging Face's ``checkpoint-N/`` is a step), else
        the number of the name that orders it: ``499 (name)``.

        Example:
            >>> order_key(Path("epoch=3-step=1200.ckpt")).position()
            'step 1200, epoch 3'
        """
        parts = []
        if self.step_is_known and self.step is not None:
            parts.append(f"step {self.step}")
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if parts:
            return ", ".join(parts)
        return "-" if self.step is None else f"{self.step} (name)"


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
    known = "step" in named or bool(_TRAINER_STEP.fullmatch(stem) and path.is_dir())
    return Checkpoint(
        path=path, key=numbers, step=step, epoch=named.get("epoch"), step_is_known=known
    )


def _is_checkpoint_file(path: Path) -> bool:
    fmt = format_from_name(path.name)
    return fmt is not None and fmt.name not in ("sharded-safetensors", "dcp")


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
        step_is_known=checkpoint.step_is_known or snapshot.step is not None,
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


def _checkpoint_subdirectories(directory: Path) -> list[Path]:
    return [
        child
        for child in sorted(directory.iterdir())
        if child.is_dir()
        and not child.name.startswith(".")
        and directory_model_file(child) is not None
    ]


def _ambiguous_directory(directory: Path, model_file: Path, children: list[Path]) -> DiscoveryError:
    """Both readings of a checkpoint directory that also holds checkpoint directories."""
    names = [child.name for child in sorted(children, key=lambda child: order_key(child).key)]
    shown = ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}"
    prefix = os.path.commonprefix(names).rstrip("0123456789")  # noqa: RUF071 (a name prefix)
    subdirectories = directory / f"{prefix}*" if prefix else directory / "*"
    return DiscoveryError(
        f"directory {directory}: is a checkpoint itself ({model_file.name}) and also holds "
        f"{len(names)} checkpoint subdirectories ({shown}), so which is meant is ambiguous. "
        f"To average the subdirectories, pass '{subdirectories}'; to use the checkpoint "
        f"{directory} holds itself, pass {model_file}."
    )


def _scan_directory(directory: Path) -> list[Path]:
    if (directory / MANIFEST_NAME).is_file():
        return _manifest_members(directory)
    model_file = directory_model_file(directory)
    if model_file is not None:
        children = _checkpoint_subdirectories(directory)
        if children:
            raise _ambiguous_directory(directory, model_file, children)
        return [directory]
    found = []
    for child in sorted(directory.iterdir()):
        if child.name.startswith(".") or child.name.lower() in _SKIPPED_IN_SCANS:
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
            elif _is_checkpoint_file(match) and match.name.lower() not in _SKIPPED_IN_SCANS:
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


def _copies_beside(name: str) -> str:
    """The copy names of the framework that writes ``name``, e.g. timm's two."""
    framework = _SKIPPED_IN_SCANS[name.lower()].split("'", 1)[0]
    same = [copy for copy, what in _SKIPPED_IN_SCANS.items() if what.startswith(framework)]
    return " and ".join(same)


def _layout(path: Path) -> str:
    """A checkpoint's layout: a model directory (``checkpoint-N/``, whatever weights file
    it holds), or the format of a file."""
    return "model directory" if path.is_dir() else format_of(path).name


def _check_one_layout(checkpoints: list[Checkpoint]) -> None:
    """Refuse members of several layouts: one run is snapshotted in one layout."""
    if len(checkpoints) < 2:
        return
    by_layout: dict[str, Checkpoint] = {}
    for checkpoint in checkpoints:
        by_layout.setdefault(_layout(checkpoint.path), checkpoint)
    if len(by_layout) > 1:
        shown = ", ".join(f"{c.path} ({name})" for name, c in by_layout.items())
        raise DiscoveryError(
            f"checkpoints of {len(by_layout)} layouts were given: {shown}. Members must be "
            "snapshots of one run in one layout, so that each step counts once and the order "
            "is by step; pass the files of one format only (e.g. run/*.keras)."
        )


def find_checkpoints(
    paths: str | Path | Iterable[str | Path],
    *,
    last: int | None = None,
) -> list[Checkpoint]:
    """Find checkpoints in files, globs and directories, ordered newest first.

    What counts as a checkpoint:
    - a file with a known suffix (see ``polyak.formats``);
    - a directory holding a model file (``checkpoint-500/model.safetensors``, a sharded
      ``model.safetensors.index.json``, ``pytorch_model.bin``); the other files beside it
      (optimizer, scheduler) are ignored;
    - a ``torch.distributed.checkpoint`` directory, one holding a ``.metadata`` (torchtitan's
      ``step-N/``, Megatron's ``iter_XXXXXXX/``, Lightning's sharded ``epoch=E-step=S.ckpt/``),
      or a Hugging Face ``checkpoint-N/`` holding one as ``pytorch_model_fsdp_0/`` (accelerate
      FSDP). torch writes ``.metadata`` last, so a step still being saved is not found yet;
    - inside a directory given on the command line: every such file and directory.
      Copies of another snapshot are not steps of their own, so directory scans and
      globs skip them: Lightning's ``last.ckpt``, timm's ``last.pth.tar`` and
      ``model_best.pth.tar``, fairseq's ``checkpoint_last.pt`` and
      ``checkpoint_best.pt``. Name one alone to use it; named among others (a glob the
      shell expanded), it is refused with a message that says what it is a copy of.
    - a directory that is a checkpoint itself and also holds checkpoint subdirectories
      (``trainer.save_model(out)`` beside ``out/checkpoint-N/``) is ambiguous and refused,
      with the command for each reading.
    - inside a snapshot directory, one holding a ``polyak-manifest.json`` written by
      ``polyak.snapshots``: exactly the files the manifest lists, not a scan, so files
      a crash left behind are ignored. A listed file that is missing is an error.

    All members must have one layout (snapshots of one run): files of one format, or model
    directories. ``.keras`` files and ``.weights.h5`` files of the same run are not mixed,
    since they would count a step twice or order members out of step.

    Args:
        paths: files, directories, or glob patterns such as ``"run/model_*.h5"``.
        last: keep only the ``last`` newest checkpoints.

    Returns:
        Checkpoints, newest first (the order the weighting schemes expect).

    Raises:
        DiscoveryError: nothing found, a name without a number among several, two
            checkpoints with the same numbers, or a file a snapshot manifest lists is
            missing.
        ArgumentError: ``last`` is not a whole number >= 1.
        CheckpointError: a snapshot directory's manifest is damaged.

    Example:
        >>> [c.name for c in find_checkpoints("run/")]  # doctest: +SKIP
        ['model_499.h5', 'model_498.h5', ...]
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if last is not None:
        last = whole_number(last, "last", minimum=1)
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
            copy_of = _SKIPPED_IN_SCANS.get(checkpoint.name.lower())
            if copy_of is not None:
                raise DiscoveryError(
                    f"checkpoint {checkpoint.path}: {checkpoint.name} is {copy_of}, not a step "
                    "of its own, and would count that step twice. Leave it out (pass the "
                    f"directory {checkpoint.path.parent}/, whose scan skips "
                    f"{_copies_beside(checkpoint.name)}), or pass it alone."
                )
            if not checkpoint.key:
                raise DiscoveryError(
                    f"checkpoint {checkpoint.path}: its name has no step or epoch number, so its "
                    "place among the others is unknown. Rename it (e.g. model_500.h5) or leave "
                    "it out."
                )
    _check_one_layout(checkpoints)
    checkpoints.sort(key=lambda c: c.key, reverse=True)
    for newer, older in itertools.pairwise(checkpoints):
        if newer.key == older.key:
            raise DiscoveryError(
                f"checkpoints {older.path} and {newer.path} have the same step numbers "
                f"{newer.key}; their order is ambiguous. Pass only one of them."
            )
    return checkpoints[:last] if last is not None else checkpoints


def within_window(
    checkpoints: list[Checkpoint],
    steps: float | None = None,
    *,
    tokens: float | None = None,
    tokens_per_step: float | None = None,
) -> list[Checkpoint]:
    """The checkpoints (newest first) at most ``steps`` steps older than the newest.

    A member at step s is kept when s_newest - s <= steps. A window in tokens is
    ``tokens / tokens_per_step`` steps (a constant batch of tokens per step).

    Args:
        checkpoints: as :func:`find_checkpoints` returns them, newest first.
        steps: the window's width in steps, or None.
        tokens: the window's width in tokens, or None (needs ``tokens_per_step``).
        tokens_per_step: tokens a training step consumes (global batch x sequence).

    Raises:
        DiscoveryError: both or neither widths where one is needed, a width that is
            not a positive number, or a checkpoint without a step number.

    Example:
        >>> run = [order_key(Path(f"step-{s}")) for s in (1000, 900, 800, 600)]
        >>> [c.step for c in within_window(run, 200)]
        [1000, 900, 800]
    """
    if steps is None and tokens is None:
        return checkpoints
    if steps is not None and tokens is not None:
        raise DiscoveryError("give a window in steps or in tokens, not both.")
    if tokens is not None:
        if tokens_per_step is None or not tokens_per_step > 0:
            raise DiscoveryError(
                f"a window of {tokens:g} tokens needs the tokens per step (global batch size "
                f"x sequence length) as a number > 0; received {tokens_per_step!r}."
            )
        steps = tokens / tokens_per_step
    if not (isinstance(steps, (int, float)) and steps >= 0 and steps == steps):
        raise DiscoveryError(f"a window must be a number of steps >= 0; received {steps!r}.")
    for checkpoint in checkpoints:
        if checkpoint.step is None:
            raise DiscoveryError(
                f"checkpoint {checkpoint.path}: its name has no step number, so whether it "
                "lies inside the window is unknown. Name checkpoints with their steps."
            )
    newest = checkpoints[0].step
    return [c for c in checkpoints if newest - c.step <= steps]  # type: ignore[operator]
