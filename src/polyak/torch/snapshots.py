"""``SnapshotSaver``: save a PyTorch model's state dict from a plain training loop.

Each snapshot is committed through :class:`polyak.snapshots.SnapshotDirectory`:
atomically, listed in ``polyak-manifest.json`` with its epoch, step, logs and SHA-256,
the newest ``keep`` kept and an old one deleted only after a newer one is committed.
``polyak.find_checkpoints`` then reads the directory as exactly the files listed.
The Lightning callback (``polyak.lightning.SnapshotCallback``) saves the same way.

File names carry the number polyak orders checkpoints by, the same scheme as the
Keras callback's:

| ``save(...)`` is given      | file name                                      |
|-----------------------------|------------------------------------------------|
| ``step`` (``epoch`` or not) | ``{prefix}_step{step:08d}.safetensors``        |
| ``epoch`` only              | ``{prefix}_{epoch:04d}.safetensors``           |
| ``format="pt"``             | the same names ending in ``.pt``               |

A directory's snapshots are all named by step or all by epoch: a save that would
mix the two (``model_step00001000`` beside ``model_0003``, ordered by 1000 and 3) is
refused. Saving a name again (a resumed run) replaces that snapshot.

What is written, so that the average loads with ``load_state_dict(strict=True)``:

- every entry of ``model.state_dict()``, integer buffers (BatchNorm's
  ``num_batches_tracked``) included, detached and moved to the CPU;
- ``format="safetensors"`` (default): tensors made contiguous, and a tensor whose
  memory another entry already uses (tied weights, such as an embedding shared with
  the output layer) is written as a separate copy, since safetensors stores no
  sharing; ``load_state_dict`` copies both names into the one shared parameter.
  safetensors holds tensors only: a non-tensor entry (a module's ``_extra_state``
  that is not a tensor) is refused, naming the entry, before anything is written;
  use ``format="pt"`` for such models.
- ``format="pt"``: ``torch.save`` of the state dict, its ``_metadata`` (module
  versions) and non-tensor entries included. polyak reads ``.pt`` files with
  ``torch.load(weights_only=True)`` only, so a non-tensor entry that such a load
  would refuse (an arbitrary Python object) is refused when saving, not found out
  when averaging.

Example:
    >>> from polyak.torch.snapshots import SnapshotSaver
    >>> saver = SnapshotSaver("run/", keep=10)  # doctest: +SKIP
    >>> for step in range(1, 10_001):  # doctest: +SKIP
    ...     train_one_step()
    ...     if step % 500 == 0:
    ...         saver.save(model, step=step, logs={"loss": loss.item()})
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import operator
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyak.errors import require
from polyak.snapshots import (
    Snapshot,
    SnapshotDirectory,
    check_snapshot_arguments,
)

torch = require("torch", "torch", "polyak.torch")

__all__ = [
    "SUFFIXES",
    "SnapshotSaver",
    "check_state_dict",
    "save_state_dict",
    "snapshot_name",
]

# format argument -> file suffix.
SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}

_MAX_REASON = 160
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _check_format(format: object) -> None:
    if format not in SUFFIXES:
        raise ValueError(
            f"format must be one of {', '.join(map(repr, SUFFIXES))}; received {format!r}."
        )


def snapshot_name(
    prefix: str, format: str, *, step: int | None = None, epoch: int | None = None
) -> str:
    """The file name of a snapshot: by step when there is one, else by epoch.

    Args:
        prefix: the start of the name, e.g. ``"model"``.
        format: ``"safetensors"`` or ``"pt"``; picks the suffix.
        step: the training step; names the file when given.
        epoch: the epoch; names the file when ``step`` is None.

    Returns:
        ``{prefix}_step{step:08d}{suffix}`` or ``{prefix}_{epoch:04d}{suffix}``.

    Raises:
        ValueError: neither ``step`` nor ``epoch`` is given, one is not a whole number
            >= 0, or ``format`` is unknown.

    Example:
        >>> snapshot_name("model", "safetensors", step=1234)
        'model_step00001234.safetensors'
        >>> snapshot_name("model", "pt", epoch=7)
        'model_0007.pt'
    """
    _check_format(format)
    suffix = SUFFIXES[format]
    step, epoch = _index(step, "step"), _index(epoch, "epoch")
    if step is not None:
        return f"{prefix}_step{step:08d}{suffix}"
    if epoch is not None:
        return f"{prefix}_{epoch:04d}{suffix}"
    raise ValueError(
        "a snapshot is named by its step or its epoch; received step=None and epoch=None. "
        "Pass step=... (or epoch=...)."
    )


def _state_dict(model: object) -> Mapping[str, Any]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise ValueError(
        "model must be a torch.nn.Module or a state dict (a mapping of names to tensors); "
        f"received {type(model).__name__}."
    )


def _load_refusal(error: BaseException) -> str:
    """Why torch.load(weights_only=True) (or torch.save) failed, in a few words."""
    text = _ANSI_ESCAPE.sub("", str(error))
    refused = list(dict.fromkeys(_REFUSED_GLOBAL.findall(text)))
    if refused:
        return f"it refuses {', '.join(refused)}"
    text = " ".join(text.split("\n", 1)[0].split()) or type(error).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _check_entries(state: Mapping[str, Any], format: str) -> None:
    """Refuse what cannot be saved in ``format`` and read back by polyak, naming the entry."""
    extras = {}
    tensors = 0
    for name, value in state.items():
        if not isinstance(name, str):
            raise ValueError(
                f"state dict keys must be strings; received the key {name!r} of type "
                f"{type(name).__name__}."
            )
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise ValueError(
                    f"state dict entry {name!r} is a sparse tensor ({value.layout}); polyak "
                    "saves and averages dense tensors only. Store it dense (tensor.to_dense())."
                )
            tensors += 1
        elif format == "safetensors":
            raise ValueError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor, and "
                "safetensors files hold tensors only. Save with format='pt' (torch.save, "
                "which keeps such entries), or have the module's get_extra_state() return a "
                "tensor."
            )
        else:
            extras[name] = value
    if tensors == 0:
        raise ValueError(
            f"the state dict holds no tensors ({len(state)} entries); there is nothing to "
            "average. Pass the model or model.state_dict()."
        )
    if extras:
        # polyak reads .pt snapshots with weights_only=True; find out now, not when averaging.
        entries = f"entr{'y' if len(extras) == 1 else 'ies'} {', '.join(map(repr, extras))}"
        fix = (
            "Have get_extra_state() return tensors, numbers, strings, or lists and dicts of "
            "them, or leave the entries out of the state dict."
        )
        buffer = io.BytesIO()
        try:
            torch.save(extras, buffer)
        except Exception as error:
            raise ValueError(
                f"state dict {entries}: not tensors, and torch.save cannot save them "
                f"({_load_refusal(error)}). {fix}"
            ) from None
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as error:
            raise ValueError(
                f"state dict {entries}: not tensors, and polyak reads .pt snapshots with "
                "torch.load(weights_only=True), which cannot load them back "
                f"({_load_refusal(error)}). {fix}"
            ) from None


def check_state_dict(
    model: torch.nn.Module | Mapping[str, Any], format: str = "safetensors"
) -> None:
    """Check, without copying the model's tensors, that its state dict can be saved in ``format``.

    Args:
        model: a ``torch.nn.Module`` or its state dict.
        format: ``"safetensors"`` or ``"pt"``.

    Raises:
        ValueError: ``model`` is neither a module nor a mapping, a key is not a string,
            there are no tensors, a tensor is sparse, or a non-tensor entry cannot be
            saved in ``format`` (see the module docstring); the message names the entry.

    Example:
        >>> check_state_dict(torch.nn.Linear(2, 3))
    """
    _check_format(format)
    _check_entries(_state_dict(model), format)


def _tensors_to_write(state: Mapping[str, Any], format: str) -> dict[str, Any]:
    """The entries as written: tensors detached on the CPU; for safetensors, unshared."""
    written: dict[str, Any] = OrderedDict()
    seen_storage: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            written[name] = value
            continue
        tensor = value.detach().to("cpu")
        if format == "safetensors":
            tensor = tensor.contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            # Tied weights share memory; safetensors refuses that, so write a copy.
            if pointer in seen_storage:
                tensor = tensor.clone()
            seen_storage.add(pointer)
        written[name] = tensor
    metadata = getattr(state, "_metadata", None)
    if format == "pt" and metadata is not None:
        # Module versions, which load_state_dict passes to _load_from_state_dict.
        written._metadata = metadata  # type: ignore[attr-defined]
    return written


def save_state_dict(
    model: torch.nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    format: str = "safetensors",
) -> None:
    """Write a model's complete state dict to one file, as a snapshot is written.

    Not atomic by itself: :class:`SnapshotSaver` calls it on a temporary file.

    Args:
        model: a ``torch.nn.Module`` or its state dict.
        path: the file to write.
        format: ``"safetensors"`` (``safetensors.torch.save_file``, metadata
            ``{"format": "pt"}``) or ``"pt"`` (``torch.save``).

    Raises:
        ValueError: the state dict cannot be saved in ``format``; see
            :func:`check_state_dict`.

    Example:
        >>> save_state_dict(model, "model.safetensors")  # doctest: +SKIP
        >>> state = safetensors.torch.load_file("model.safetensors")  # doctest: +SKIP
        >>> model.load_state_dict(state, strict=True)  # doctest: +SKIP
    """
    _check_format(format)
    state = _state_dict(model)
    _check_entries(state, format)
    _write(state, path, format)


def _write(state: Mapping[str, Any], path: str | os.PathLike[str], format: str) -> None:
    written = _tensors_to_write(state, format)
    if format == "safetensors":
        safetensors_torch = require("safetensors.torch", "torch", "saving safetensors snapshots")
        safetensors_torch.save_file(written, os.fspath(path), metadata={"format": "pt"})
    else:
        torch.save(written, os.fspath(path))


def _index(value: object, what: str) -> int | None:
    """A step or epoch as an int (numpy and 0-d integer tensors too), or None."""
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if number >= 0:
                return number
    raise ValueError(f"{what} must be a whole number >= 0 or None; received {value!r}.")


class SnapshotSaver:
    """Save snapshots of a PyTorch model from a training loop into a snapshot directory.

    Each :meth:`save` commits one file atomically and keeps the ``keep`` most recent
    (by order of saving); the manifest records epoch, step, logs and SHA-256.
    File naming and what is written: see the module docstring. One saver writes a
    directory at a time.

    Args:
        directory: the snapshot directory; created if needed. Opening it completes or
            undoes a save a crash interrupted.
        keep: how many snapshots to keep.
        format: ``"safetensors"`` (default) or ``"pt"`` (``torch.save``).
        prefix: the start of each file name.

    Attributes:
        directory: the snapshot directory.
        keep: how many snapshots are kept.
        format: the file format.
        prefix: the start of each file name.

    Raises:
        ValueError: an argument is out of range.
        OutputError: the directory cannot be created.
        CheckpointError: the directory holds a damaged manifest.

    Example:
        >>> saver = SnapshotSaver("run/", keep=3)  # doctest: +SKIP
        >>> for epoch in range(10):  # doctest: +SKIP
        ...     train_one_epoch(model)
        ...     saver.save(model, epoch=epoch, logs={"loss": loss})
        >>> [s.name for s in saver.snapshots()]  # doctest: +SKIP
        ['model_0007.safetensors', 'model_0008.safetensors', 'model_0009.safetensors']
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 10,
        format: str = "safetensors",
        prefix: str = "model",
    ) -> None:
        check_snapshot_arguments(directory, keep, format, SUFFIXES, prefix)
        self.directory = Path(directory)
        self.keep = keep
        self.format = format
        self.prefix = prefix
        suffix = re.escape(SUFFIXES[format])
        self._by_step = re.compile(rf"{re.escape(prefix)}_step\d+{suffix}")
        self._by_epoch = re.compile(rf"{re.escape(prefix)}_\d+{suffix}")
        self._snapshots = SnapshotDirectory(self.directory, keep)

    def snapshots(self) -> list[Snapshot]:
        """The committed snapshots, oldest first, as the manifest lists them."""
        return self._snapshots.snapshots()

    def save(
        self,
        model: torch.nn.Module | Mapping[str, Any],
        *,
        step: int | None = None,
        epoch: int | None = None,
        logs: Mapping[str, Any] | None = None,
    ) -> Snapshot:
        """Commit one snapshot of ``model`` and keep the ``keep`` most recent.

        Args:
            model: a ``torch.nn.Module`` or its state dict.
            step: the training step (e.g. optimizer steps taken); names the file.
            epoch: the epoch; names the file when ``step`` is not given.
            logs: numbers to record in the manifest (0-d tensors become numbers,
                other values are dropped).

        Returns:
            The committed snapshot, as listed in the manifest.

        Raises:
            ValueError: neither step nor epoch is given, one is not a whole number
                >= 0, the state dict cannot be saved in this format, or the save would
                mix file names by step and by epoch in the directory.
            OutputError: the snapshot or the manifest cannot be written.

        Example:
            >>> saver.save(model, step=500, logs={"loss": 0.31}).name  # doctest: +SKIP
            'model_step00000500.safetensors'
        """
        step = _index(step, "step")
        epoch = _index(epoch, "epoch")
        if logs is not None and not isinstance(logs, Mapping):
            raise ValueError(
                f"logs must be a mapping of names to numbers or None; received "
                f"{type(logs).__name__}."
            )
        name = snapshot_name(self.prefix, self.format, step=step, epoch=epoch)
        self._check_naming(name, by_step=step is not None, epoch=epoch)
        state = _state_dict(model)
        _check_entries(state, self.format)

        def write(path: Path) -> None:
            _write(state, path, self.format)

        return self._snapshots.commit(write, name, epoch=epoch, step=step, logs=logs)

    def _check_naming(self, name: str, *, by_step: bool, epoch: int | None) -> None:
        other = self._by_epoch if by_step else self._by_step
        clash = next((s.name for s in self.snapshots() if other.fullmatch(s.name)), None)
        if clash is None:
            return
        if by_step:
            given = "a step"
            fix = "Give only epoch=... to every save, "
        else:
            given = f"only epoch={epoch}"
            fix = "Pass step=... to every save, "
        raise ValueError(
            f"{self.directory} holds snapshots named by {'epoch' if by_step else 'step'} "
            f"({clash}); this save gives {given}, so {name} would be ordered among them by "
            f"a different count. {fix}or save into another directory."
        )
