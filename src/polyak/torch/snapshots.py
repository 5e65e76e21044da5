"""``SnapshotSaver``: save a PyTorch model's state dict from a plain training loop.

File names, what is written, post-hoc EMA profiles and resuming: :class:`SnapshotSaver`.

Example:
    >>> from polyak.torch.snapshots import SnapshotSaver
    >>> saver = SnapshotSaver("run/", keep=10, posthoc=(0.05, 0.10))  # doctest: +SKIP
    >>> for step in range(1, 10_001):  # doctest: +SKIP
    ...     train_one_step()
    ...     saver.track(model, step)  # updates the EMA profiles
    ...     if step % 500 == 0:
    ...         saver.save(model, step=step, logs={"loss": loss.item()})
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyak.checks import as_whole_number
from polyak.errors import require
from polyak.posthoc import DEFAULT_PROFILE_KEEP, profile_directory, profile_steps
from polyak.snapshots import Snapshot, SnapshotDirectory, SnapshotOptions, SnapshotSettings
from polyak.torch.online import OnlineAverage
from polyak.torch.saving import (
    SUFFIXES,
    _check_entries,
    _check_format,
    _state_dict,
    _write,
    check_state_dict,
    save_state_dict,
)
from polyak.weights.schedule import AveragingProgress, whole_or_none
from polyak.weights.schemes import format_number

torch = require("torch", "torch", "polyak.torch")

__all__ = [
    "SUFFIXES",
    "PosthocProfiles",
    "SnapshotSaver",
    "check_state_dict",
    "save_state_dict",
    "snapshot_name",
]


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
    step, epoch = whole_or_none(step, "step"), whole_or_none(epoch, "epoch")
    if step is not None:
        return f"{prefix}_step{step:08d}{suffix}"
    if epoch is not None:
        return f"{prefix}_{epoch:04d}{suffix}"
    raise ValueError(
        "a snapshot is named by its step or its epoch; received step=None and epoch=None. "
        "Pass step=... (or epoch=...)."
    )


#: What :meth:`PosthocProfiles.state_dict` says it is, and its layout's version.
PROFILES_STATE_FORMAT = "polyak-posthoc-profiles"
PROFILES_STATE_VERSION = 1


class PosthocProfiles:
    """The power-function EMA profiles a snapshot helper tracks, and their snapshot directories.

    One :class:`polyak.torch.OnlineAverage` per width (``mode="power"``, from step 0:
    its time ``t`` is the global step, 1 after the first optimizer step), bound to the
    model at the first :meth:`bind`. :meth:`commit` writes the EMA of every width at
    the current step into ``profile_directory(directory, sigma_rel)``. Used by
    :class:`SnapshotSaver` and ``polyak.lightning.SnapshotCallback``; see
    :mod:`polyak.posthoc` for the formulas.

    Args:
        directory: the raw snapshot directory; the profiles live under its ``posthoc/``.
        widths: the ``sigma_rel`` of each profile.
        keep: how many EMA snapshots each profile directory keeps.
        format: ``"safetensors"`` or ``"pt"``.
        prefix: the start of each file name (``{prefix}_step{step:08d}{suffix}``).
        owner: the helper's name, for messages.
    """

    def __init__(
        self,
        directory: Path,
        widths: tuple[float, ...],
        keep: int,
        format: str,
        prefix: str,
        owner: str,
    ) -> None:
        self.directory = Path(directory)
        self.widths = tuple(widths)
        self.keep = keep
        self.format = format
        self.prefix = prefix
        self.owner = owner
        self.model: torch.nn.Module | None = None
        self.averages: dict[float, Any] = {}
        self.saved_step: int | None = None
        self._directories: dict[float, SnapshotDirectory] = {}
        self._pending: dict[str, Any] | None = None

    @classmethod
    def for_options(cls, options: SnapshotOptions, owner: str) -> PosthocProfiles:
        """The profiles a snapshot helper built from ``options`` tracks (none without posthoc)."""
        return cls(
            options.directory,
            options.posthoc,
            options.posthoc_keep,
            options.format,
            options.prefix,
            owner,
        )

    @property
    def last_step(self) -> int | None:
        """The last step the profiles were updated with (or saved at, before binding)."""
        if self.averages:
            return next(iter(self.averages.values())).last_step
        if self._pending is not None:
            first = next(iter(self._pending["profiles"].values()))
            return first["progress"]["last_step"]
        return None

    @property
    def is_loaded(self) -> bool:
        """Whether a loaded state waits for :meth:`bind`."""
        return self._pending is not None

    def bind(self, model: torch.nn.Module, steps_done: int) -> None:
        """Build the profiles' averages for ``model`` (once), from a loaded state if any.

        Args:
            model: the module being trained.
            steps_done: the optimizer steps taken before tracking starts (0 for a new
                run), to warn when a run resumed without the profiles' state.

        Raises:
            ValueError: no state was loaded, but the profile directories already hold
                EMA snapshots (of an earlier run, which reconstruction would mix in);
                or a loaded state does not fit the model.
        """
        if self.model is model:
            return
        if self.model is not None:
            raise ValueError(
                f"{self.owner} tracks the EMA profiles of one model; received another "
                f"{type(model).__name__} than the one tracked so far. Use one helper per model."
            )
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"tracking EMA profiles needs the torch.nn.Module being trained; received "
                f"{type(model).__name__}."
            )
        averages = {
            width: OnlineAverage(model, mode="power", sigma_rel=width) for width in self.widths
        }
        pending = self._pending
        if pending is not None:
            for width, average in averages.items():
                average.load_state_dict(pending["profiles"][_width_key(width)])
            self.saved_step = pending["saved_step"]
            self._pending = None
        else:
            self._refuse_earlier_snapshots()
            if steps_done > 0:
                warnings.warn(
                    f"{self.owner}: the EMA profiles start after step {steps_done} without a "
                    "saved state, so the steps before it count as the weights of that step; "
                    "post-hoc reconstruction is then approximate. To resume a run, load the "
                    "profiles' state saved with its checkpoint.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self.model, self.averages = model, averages

    def _refuse_earlier_snapshots(self) -> None:
        for width in self.widths:
            steps = profile_steps(self.directory, width)
            if steps:
                raise ValueError(
                    f"{profile_directory(self.directory, width)} already holds {len(steps)} EMA "
                    f"snapshot(s) (steps {steps[0]} to {steps[-1]}), and this run tracks its "
                    "profiles afresh: post-hoc reconstruction would mix the two runs. To resume "
                    f"that run, load the {self.owner}'s saved state first; otherwise save into "
                    f"a new directory, or delete {self.directory / 'posthoc'}."
                )

    def update(self, step: int) -> None:
        """Update every profile for ``step`` (a step equal to the last one is no update)."""
        for average in self.averages.values():
            average.update(step)

    def commit(self, step: int, epoch: int | None = None) -> list[Snapshot]:
        """Commit the EMA of every profile at ``step``, once per step.

        Returns:
            The snapshots committed (none at step 0, or when already saved at ``step``).

        Raises:
            ValueError: the profiles were last updated at another step.
        """
        if step < 1 or step == self.saved_step:
            return []
        if not self.averages or self.last_step != step:
            last = self.last_step
            raise ValueError(
                f"{self.owner} saves the EMA profiles at the snapshot's step, so they must be "
                f"updated at every step up to it; received a save at step {step}, but the "
                + (
                    "profiles have not been updated yet"
                    if last is None
                    else f"profiles were last updated at step {last}"
                )
                + f". Call track(model, step) after each optimizer step, step {step} included, "
                "before save()."
            )
        committed = []
        name = snapshot_name(self.prefix, self.format, step=step)
        for width, average in self.averages.items():
            directory = self._directories.get(width)
            if directory is None:
                directory = SnapshotDirectory(profile_directory(self.directory, width), self.keep)
                self._directories[width] = directory
            state = average.averaged_state_dict()

            def write(path: Path, state: Mapping[str, Any] = state) -> None:
                _write(state, path, self.format)

            committed.append(directory.commit(write, name, epoch=epoch, step=step))
        self.saved_step = step
        return committed

    def state_dict(self) -> dict[str, Any]:
        """The profiles' averages and counters (tensors and plain values), to save and resume."""
        if self._pending is not None:
            return self._pending
        return {
            "format": PROFILES_STATE_FORMAT,
            "version": PROFILES_STATE_VERSION,
            "saved_step": self.saved_step,
            "profiles": {
                _width_key(width): average.state_dict() for width, average in self.averages.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the profiles :meth:`state_dict` saved; applied at :meth:`bind` if unbound.

        Raises:
            ValueError: not such a state, or saved with other widths.
        """
        if not isinstance(state, Mapping) or state.get("format") != PROFILES_STATE_FORMAT:
            raise ValueError(
                f"expected the EMA profiles' state saved by {self.owner}.state_dict() (format "
                f"{PROFILES_STATE_FORMAT!r}); received {type(state).__name__} with format "
                f"{state.get('format') if isinstance(state, Mapping) else None!r}."
            )
        if state.get("version") != PROFILES_STATE_VERSION:
            raise ValueError(
                f"this polyak reads EMA profile states of version {PROFILES_STATE_VERSION}; "
                f"received version {state.get('version')!r}. Use the polyak that saved it."
            )
        profiles = state.get("profiles")
        saved = sorted(profiles) if isinstance(profiles, Mapping) else profiles
        if not profiles:  # saved before the first update: nothing to continue
            self._pending = None
            return
        if saved != sorted(_width_key(width) for width in self.widths):
            raise ValueError(
                f"the EMA profiles' state holds the widths {saved}; this {self.owner} tracks "
                f"posthoc={self.widths}. Build it with the widths it was saved with."
            )
        for key, profile in profiles.items():
            progress = profile.get("progress") if isinstance(profile, Mapping) else None
            schedule = AveragingProgress.from_dict(progress).schedule  # SchemeError if malformed
            if schedule.mode != "power" or _width_key(schedule.sigma_rel) != key:
                raise ValueError(
                    f"the EMA profiles' state holds, under {key!r}, an average of "
                    f"{schedule.describe()}; expected the power EMA of sigma_rel {key}."
                )
        saved_step = state.get("saved_step")
        if saved_step is not None and as_whole_number(saved_step) is None:
            raise ValueError(
                f"the EMA profiles' state has a saved_step that is not a whole number or None; "
                f"received {saved_step!r}."
            )
        state = dict(state)
        if self.averages:
            for width, average in self.averages.items():
                average.load_state_dict(state["profiles"][_width_key(width)])
            self.saved_step = state.get("saved_step")
        else:
            self._pending = state


def _width_key(width: float) -> str:
    return format_number(width)


class SnapshotSaver(SnapshotSettings):
    """Save snapshots of a PyTorch model from a training loop into a snapshot directory.

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

    Post-hoc EMA (``posthoc=(0.05, 0.10)``): the saver also keeps one power-function EMA
    per width (``polyak.torch.OnlineAverage(mode="power", sigma_rel=...)``: float32,
    floating buffers averaged, integer buffers the raw model's), which
    :meth:`SnapshotSaver.track` updates after every optimizer step, and every
    :meth:`SnapshotSaver.save` (by step) also commits the EMA of each width, at the same
    step, into ``DIR/posthoc/sigma-0.05/`` (:func:`polyak.posthoc.profile_directory`),
    each a snapshot directory of its own keeping its newest ``posthoc_keep`` snapshots;
    with ``posthoc_every=N``, :meth:`SnapshotSaver.track` also commits them every ``N``
    steps. ``polyak posthoc DIR --sigma-rel 0.08`` then reconstructs the EMA of any width
    (formulas: :mod:`polyak.posthoc`). The profile snapshots hold the model's dtypes, so
    that the sweep can combine them with the raw snapshots. To resume, save
    :meth:`SnapshotSaver.state_dict` with your checkpoint and give it to
    :meth:`SnapshotSaver.load_state_dict` before the first ``track``.

    Each :meth:`save` commits one file atomically and keeps the ``keep`` most recent
    (by order of saving); the manifest records epoch, step, logs and SHA-256.
    File naming and what is written: see above. One saver writes a
    directory at a time.

    With ``posthoc=(0.05, 0.10)`` it also tracks those power-function EMA profiles for
    post-hoc EMA (see above): call :meth:`track` after every optimizer
    step; each :meth:`save` then needs a ``step`` and commits the profiles' EMAs at it
    too, into ``directory/posthoc/sigma-WIDTH/``.

    Args:
        directory: the snapshot directory; created if needed. Opening it completes or
            undoes a save a crash interrupted.
        keep: how many snapshots to keep.
        format: ``"safetensors"`` (default) or ``"pt"`` (``torch.save``).
        prefix: the start of each file name.
        posthoc: the widths (``sigma_rel``) of the EMA profiles to track, e.g.
            ``(0.05, 0.10)``; ``()`` (default) tracks none, at no cost.
        posthoc_keep: how many EMA snapshots each profile keeps (the newest); spread
            over training, they are what the reconstruction combines. Each is a copy
            of the model: ``len(posthoc) * posthoc_keep`` files at most.
        posthoc_every: also commit the profiles every this many steps, from
            :meth:`track` (None: with each :meth:`save` only).

    Attributes:
        directory: the snapshot directory.
        keep: how many snapshots are kept.
        format: the file format.
        prefix: the start of each file name.
        posthoc: the widths of the tracked profiles.
        posthoc_keep: how many EMA snapshots each profile keeps.
        posthoc_every: the steps between the commits :meth:`track` makes, or None.

    Raises:
        ValueError: an argument is out of range (SchemeError, a ValueError, for a width).
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
        *,
        posthoc: tuple[float, ...] | list[float] = (),
        posthoc_keep: int = DEFAULT_PROFILE_KEEP,
        posthoc_every: int | None = None,
    ) -> None:
        # Saves come when the loop calls save(): the record's epoch schedule stays unused.
        self.options = options = SnapshotOptions(
            directory=directory,
            formats=SUFFIXES,
            format=format,
            keep=keep,
            prefix=prefix,
            posthoc=posthoc,
            posthoc_keep=posthoc_keep,
            posthoc_every=posthoc_every,
        )
        suffix = re.escape(options.suffix)
        self._by_step = re.compile(rf"{re.escape(prefix)}_step\d+{suffix}")
        self._by_epoch = re.compile(rf"{re.escape(prefix)}_\d+{suffix}")
        self._snapshots = SnapshotDirectory(self.directory, self.keep)
        self._profiles = PosthocProfiles.for_options(options, "SnapshotSaver")

    def snapshots(self) -> list[Snapshot]:
        """The committed snapshots, oldest first, as the manifest lists them."""
        return self._snapshots.snapshots()

    def track(self, model: torch.nn.Module, step: int) -> None:
        """Update the EMA profiles after an optimizer step; call it after every one.

        Each profile ``a`` of exponent ``gamma`` moves as
        ``a <- beta a + (1 - beta) theta``, ``beta = (1 - delta / step)^(gamma + 1)``,
        ``delta`` the steps since the previous call (1 when called every step; the
        first call copies the weights). With ``posthoc_every=N`` it also commits the
        profiles every ``N`` steps. Without ``posthoc`` it does nothing.

        Args:
            model: the module being trained (the same one every call).
            step: the optimizer steps taken so far, 1 after the first (a step equal to
                the previous call's does not update again).

        Raises:
            ValueError: ``step`` is not a whole number >= 1 or decreases, ``model`` is
                not the module tracked so far, or (at the first call, without a loaded
                state) the profile directories already hold snapshots of another run.

        Example:
            >>> saver = SnapshotSaver("run/", posthoc=(0.05, 0.10))  # doctest: +SKIP
            >>> for step in range(1, 1001):  # doctest: +SKIP
            ...     train_one_step(model)
            ...     saver.track(model, step)
            ...     if step % 100 == 0:
            ...         saver.save(model, step=step)
        """
        if not self.posthoc:
            return
        number = as_whole_number(step, 1)
        if number is None:
            raise ValueError(
                f"step must be a whole number >= 1, the optimizer steps taken (1 after the "
                f"first); received {step!r}."
            )
        previous = self._profiles.last_step
        self._profiles.bind(model, number - 1)
        self._profiles.update(number)
        every = self.posthoc_every
        if every is not None and number // every > (previous or 0) // every:
            self._profiles.commit(number)

    def state_dict(self) -> dict[str, Any]:
        """The EMA profiles' state, to save with your checkpoint and resume the run.

        Returns:
            ``{"format": "polyak-posthoc-profiles", "version": 1, "saved_step": ...,
            "profiles": {"0.05": OnlineAverage state, ...}}``: plain values and
            tensors, which ``torch.save`` and ``torch.load(weights_only=True)`` handle
            (empty profiles without ``posthoc`` or before the first :meth:`track`).

        Example:
            >>> torch.save({"model": model.state_dict(), "saver": saver.state_dict()},
            ...            "checkpoint.pt")  # doctest: +SKIP
        """
        return self._profiles.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the EMA profiles saved by :meth:`state_dict`; call it before :meth:`track`.

        Build the saver with the same arguments, load the model's raw weights, then
        this: the profiles go on from the saved step as if never interrupted.

        Raises:
            ValueError: not such a state, or saved with other widths; at the next
                :meth:`track`, its tensors do not match the model's.
        """
        self._profiles.load_state_dict(state)

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

        With ``posthoc``, the EMA of every tracked profile at ``step`` is committed
        too (once per step), after the raw snapshot.

        Returns:
            The committed snapshot, as listed in the manifest.

        Raises:
            ValueError: neither step nor epoch is given, one is not a whole number
                >= 0, the state dict cannot be saved in this format, or the save would
                mix file names by step and by epoch in the directory; with
                ``posthoc``: no ``step``, or the profiles were not tracked up to it.
            OutputError: the snapshot or the manifest cannot be written.

        Example:
            >>> saver.save(model, step=500, logs={"loss": 0.31}).name  # doctest: +SKIP
            'model_step00000500.safetensors'
        """
        step = whole_or_none(step, "step")
        epoch = whole_or_none(epoch, "epoch")
        if logs is not None and not isinstance(logs, Mapping):
            raise ValueError(
                f"logs must be a mapping of names to numbers or None; received "
                f"{type(logs).__name__}."
            )
        profiles = self._profiles
        if self.posthoc:
            if step is None:
                raise ValueError(
                    f"SnapshotSaver(posthoc={self.posthoc}) saves the EMA profiles by step, so "
                    f"save() needs step=...; received step=None and epoch={epoch!r}."
                )
            if profiles.is_loaded and isinstance(model, torch.nn.Module):
                profiles.bind(model, step)  # a loaded state, saved again before any track()
            if step >= 1 and step != profiles.last_step:
                profiles.commit(step)  # raises, naming the rule, before anything is written
        name = snapshot_name(self.prefix, self.format, step=step, epoch=epoch)
        self._check_naming(name, by_step=step is not None, epoch=epoch)
        state = _state_dict(model)
        _check_entries(state, self.format)

        def write(path: Path) -> None:
            _write(state, path, self.format)

        snapshot = self._snapshots.commit(write, name, epoch=epoch, step=step, logs=logs)
        if self.posthoc:
            profiles.commit(step, epoch)
        return snapshot

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
