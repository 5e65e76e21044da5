"""``SnapshotCheckpoint``: save the weights of the last epochs for averaging afterwards.

File names, post-hoc EMA profiles and resuming: :class:`SnapshotCheckpoint`.

Example:
    >>> from polyak.keras import SnapshotCheckpoint
    >>> snapshots = SnapshotCheckpoint("run/", keep=10)
    >>> model.fit(x, y, epochs=500, callbacks=[snapshots])  # doctest: +SKIP
    >>> weights = polyak.average("run/", scheme="exp:2")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polyak.checks import as_whole_number
from polyak.errors import OutputError, require
from polyak.keras.saving import save_model_file
from polyak.keras.steps import StepCounter, optimizer_steps
from polyak.posthoc import DEFAULT_PROFILE_KEEP, PROFILES_DIRECTORY, profile_directory
from polyak.snapshots import (
    ScheduledSnapshotSettings,
    Snapshot,
    SnapshotDirectory,
    SnapshotOptions,
    read_manifest,
)
from polyak.weights.schedule import AveragingSchedule, AveragingState, advance

keras = require("keras", "keras", "polyak.keras")
ops = keras.ops

__all__ = ["SnapshotCheckpoint"]

# format argument -> file suffix (Keras insists on these suffixes when saving).
_SUFFIXES = {"weights.h5": ".weights.h5", "keras": ".keras"}


def _save(model: Any, path: Path, format: str) -> None:
    """Save a snapshot with HDF5 writing only into memory (see polyak.keras.saving)."""
    try:
        save_model_file(model, path, format)
    except OSError as error:
        # path is the snapshot's temporary, in a workspace inside the snapshot directory.
        final = path.parent.parent / path.name
        raise OutputError(
            f"snapshot {final}: cannot be written ({error.strerror or error}); the earlier "
            "snapshots are intact."
        ) from None


class _Profiles:
    """The power-function EMA profiles the callback tracks, and their snapshot directories."""

    def __init__(
        self, directory: Path, widths: tuple[float, ...], keep: int, format: str, prefix: str
    ) -> None:
        self.directory = directory
        self.widths = widths
        self.keep = keep
        self.format = format
        self.prefix = prefix
        self.model: Any = None
        self.variables: list[Any] = []
        self.dtypes: list[str] = []
        self.schedules = {width: AveragingSchedule(sigma_rel=width) for width in widths}
        self.states: dict[float, AveragingState] = {}
        self.averages: dict[float, list[Any]] = {}
        self.saved_step: int | None = None
        self._directories: dict[float, SnapshotDirectory] = {}

    @property
    def last_step(self) -> int | None:
        return next(iter(self.states.values())).last_step if self.states else None

    def start(self, model: Any, step: int) -> None:
        """Go on in memory, resume from the profile snapshots at ``step``, or start afresh."""
        if model is self.model and self.last_step == step:
            return
        variables = [v for v in model.weights if keras.backend.is_float_dtype(v.dtype)]
        if not variables:
            raise ValueError(
                f"posthoc: the model has no floating weights to average; received {model.name!r} "
                f"with {len(model.weights)} weights (is it built?)."
            )
        listed = {
            width: read_manifest(profile_directory(self.directory, width)) or []
            for width in self.widths
        }
        found = {
            width: next((s.path for s in snapshots if s.step == step), None)
            for width, snapshots in listed.items()
        }
        missing = [width for width, path in found.items() if path is None]
        if any(listed.values()) and (step == 0 or missing):
            width = missing[0] if missing else self.widths[0]
            steps = [s.step for s in listed[width]]
            shown = ", ".join(map(str, steps[-5:])) if steps else "none"
            raise ValueError(
                f"SnapshotCheckpoint: {profile_directory(self.directory, width)} holds EMA "
                f"snapshots (of steps {shown}), but none of step {step}, where this run "
                + ("starts afresh" if step == 0 else "resumes (the optimizer's iterations)")
                + ": post-hoc reconstruction would mix two runs. Resume from a model saved at "
                "a step the profiles were saved at (an epoch end, by default), or save into a "
                f"new directory, or delete {self.directory / PROFILES_DIRECTORY}."
            )
        self.model, self.variables = model, variables
        self.dtypes = ["float64" if v.dtype == "float64" else "float32" for v in variables]
        self.averages, self.saved_step = {}, None
        self.states = {width: AveragingState(last_step=step) for width in self.widths}
        if any(listed.values()):
            self._restore(found, step)
        elif step > 0:
            warnings.warn(
                f"SnapshotCheckpoint: the EMA profiles start after step {step}, with no "
                "snapshots to continue from, so the steps before it count as the weights "
                "of that step; post-hoc reconstruction is then approximate.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _restore(self, paths: Mapping[float, Path], step: int) -> None:
        """Read the EMA of each profile from its snapshot at ``step``; the model is kept."""
        model = self.model
        # load_weights also loads the optimizer's variables the file holds: keep them too.
        optimizer = getattr(model, "optimizer", None)
        kept = [*model.weights, *(getattr(optimizer, "variables", None) or [])]
        backup = [ops.copy(variable.value) for variable in kept]
        try:
            for width, path in paths.items():
                with warnings.catch_warnings():
                    # An optimizer not built yet skips the file's optimizer variables.
                    warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
                    model.load_weights(str(path))
                self.averages[width] = [
                    ops.cast(ops.copy(variable.value), dtype)
                    for variable, dtype in zip(self.variables, self.dtypes, strict=True)
                ]
                # Only whether there was an update matters to the power schedule.
                self.states[width] = AveragingState(step, updates=1, last_update_step=step)
        finally:
            for variable, value in zip(kept, backup, strict=True):
                variable.assign(value)
        self.saved_step = step

    def update(self, step: int) -> None:
        """Update every profile for ``step``: ``a <- beta a + (1 - beta) theta``."""
        values = None
        for width, state in self.states.items():
            self.states[width], decay = advance(self.schedules[width], state, step)
            if decay is None:
                continue
            if values is None:
                values = [
                    ops.cast(ops.stop_gradient(variable.value), dtype)
                    for variable, dtype in zip(self.variables, self.dtypes, strict=True)
                ]
            averages = self.averages.get(width)
            if decay == 0.0 or averages is None:
                self.averages[width] = [ops.copy(value) for value in values]
            else:
                weight = 1.0 - decay
                self.averages[width] = [
                    ops.add(average, ops.multiply(ops.subtract(value, average), weight))
                    for average, value in zip(averages, values, strict=True)
                ]

    def commit(self, step: int, epoch: int, suffix: str) -> list[Snapshot]:
        """Commit the EMA of every profile at ``step`` (once a step; none before an update)."""
        if step < 1 or step == self.saved_step or self.last_step != step or not self.averages:
            return []
        model = self.model
        name = f"{self.prefix}_step{step:08d}{suffix}"
        raw = [ops.copy(ops.stop_gradient(variable.value)) for variable in self.variables]
        committed = []
        try:
            for width, averages in self.averages.items():
                for variable, average in zip(self.variables, averages, strict=True):
                    # A copy: on JAX, compiled steps donate the buffers variables hold.
                    variable.assign(ops.copy(ops.cast(average, variable.dtype)))
                directory = self._directories.get(width)
                if directory is None:
                    directory = SnapshotDirectory(
                        profile_directory(self.directory, width), self.keep
                    )
                    self._directories[width] = directory

                def write(path: Path) -> None:
                    _save(model, path, self.format)

                committed.append(directory.commit(write, name, epoch=epoch, step=step))
        finally:
            for variable, value in zip(self.variables, raw, strict=True):
                variable.assign(value)
        self.saved_step = step
        return committed


class SnapshotCheckpoint(ScheduledSnapshotSettings, keras.callbacks.Callback):
    """Save snapshots of the model during ``fit`` into a crash-safe snapshot directory.

    The callback has Keras serialize the model into memory (its ``.keras`` writer, given a
    ``BytesIO``; for ``.weights.h5`` the archive's ``model.weights.h5``, the same file
    ``model.save_weights`` writes) and writes the bytes itself, committing each file
    through :class:`polyak.snapshots.SnapshotDirectory`: atomically, with a manifest
    recording epoch, step, logs and checksum, and keeping the newest ``keep``. HDF5 never
    writes to the disk, so a full disk, a read-only folder or a quota is an ``OutputError``
    (an ``OSError``) the training script can catch, with every earlier snapshot intact;
    HDF5 crashed the process (SIGSEGV) when a write failed as it closed a file. The cost is
    the snapshot's bytes held in memory twice while saving. Only Keras' saving is used, so
    it works on every backend.

    File names carry the numbers polyak orders checkpoints by:

    | mode                        | file name                           |
    |-----------------------------|-------------------------------------|
    | epochs (default)            | ``{prefix}_{epoch:04d}.weights.h5`` |
    | ``format="keras"``          | ``{prefix}_{epoch:04d}.keras``      |
    | ``every_steps=N``           | ``{prefix}_step{step:08d}{suffix}`` |

    ``epoch`` is Keras' 0-based epoch index, so 500 epochs with ``keep=10`` give
    ``model_0490`` to ``model_0499``, the classic experiment's snapshots.

    Post-hoc EMA (``posthoc=(0.05, 0.10)``): the callback also keeps one power-function
    EMA per width (:mod:`polyak.posthoc`; float32, float64 for float64 weights, of every
    floating weight, BatchNormalization statistics included; integer variables stay the
    raw model's), updated after every optimizer step (every training batch; with
    ``gradient_accumulation_steps=k``, every ``k``-th, see :mod:`polyak.keras.steps`) with
    the step count above as the profile's time, and commits the EMA of each width, as a
    file of the same ``format`` named ``{prefix}_step{step:08d}{suffix}``, into
    ``DIR/posthoc/sigma-WIDTH/`` at every epoch end (or every ``posthoc_every`` steps
    instead) and with every raw snapshot, keeping the newest ``posthoc_keep``.
    ``polyak posthoc DIR --sigma-rel ...`` then reconstructs the EMA of any width.

    Resuming: the profile snapshots are the profiles' state. When ``fit`` begins after
    ``S`` steps (the optimizer's iteration count, as in a model loaded with its optimizer)
    the callback continues the profiles from their snapshots at step ``S``, exactly for
    float32 weights, so resume from a model saved at a step the profiles were saved at
    (an epoch end, by default). If the profiles hold snapshots but none at ``S``, or a new
    run (``S = 0``) finds snapshots, it refuses to mix runs; if they hold none at all, the
    profiles start at ``S`` with a warning.

    Two epoch modes:

    - ``rolling=False`` (default): save the last ``keep`` epochs of the run, every
      ``every_epochs``-th counting back from the final epoch (always saved). It
      needs the number of epochs ``fit`` was given, and saves nothing before the
      last ``keep * every_epochs`` epochs: if training stops early (EarlyStopping,
      ``model.stop_training``), there may be no snapshots at all; a warning says so.
    - ``rolling=True``: save every ``every_epochs`` epochs and keep the ``keep`` most
      recent. Use this with EarlyStopping.

    With ``every_steps=N`` the callback saves every N optimizer steps instead
    (training batches, or every ``k``-th with ``gradient_accumulation_steps=k``;
    counted across epochs and ``fit`` calls, starting from the optimizer's
    iteration count), keeping the ``keep`` most recent; epochs play no part.

    Args:
        directory: the snapshot directory; created if needed.
        keep: how many snapshots to keep.
        rolling: keep the most recent snapshots instead of the run's last epochs.
        every_epochs: save every this many epochs.
        every_steps: save every this many optimizer steps instead of by epoch.
        format: ``"weights.h5"`` (``model.save_weights``) or ``"keras"``
            (``model.save``, the whole model).
        prefix: the start of each file name.
        posthoc: the widths (``sigma_rel``) of the power-function EMA profiles to
            track for post-hoc EMA, e.g. ``(0.05, 0.10)``; ``()`` (default) tracks none,
            at no cost. See above.
        posthoc_keep: how many EMA snapshots each profile keeps (the newest).
        posthoc_every: commit the profiles every this many steps instead of at every
            epoch end (they are also committed with every raw snapshot).

    Attributes:
        directory: the snapshot directory.
        saved: the snapshots committed during the last ``fit``, oldest first.
        posthoc: the widths of the tracked profiles.

    Raises:
        ValueError: an argument is out of range, or ``fit`` gives no epoch count in
            the default mode; with ``posthoc``, when ``fit`` begins, profile snapshots
            that this run cannot continue (see above).

    Example:
        >>> checkpoint = SnapshotCheckpoint("run/", keep=10)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=500, callbacks=[checkpoint])  # doctest: +SKIP
        >>> [s.name for s in checkpoint.saved][-1]  # doctest: +SKIP
        'model_0499.weights.h5'
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 10,
        rolling: bool = False,
        every_epochs: int = 1,
        every_steps: int | None = None,
        format: str = "weights.h5",
        prefix: str = "model",
        *,
        posthoc: tuple[float, ...] | list[float] = (),
        posthoc_keep: int = DEFAULT_PROFILE_KEEP,
        posthoc_every: int | None = None,
    ) -> None:
        super().__init__()
        self.options = options = SnapshotOptions(
            directory=directory,
            formats=_SUFFIXES,
            format=format,
            keep=keep,
            prefix=prefix,
            rolling=rolling,
            every_epochs=every_epochs,
            every_steps=every_steps,
            posthoc=posthoc,
            posthoc_keep=posthoc_keep,
            posthoc_every=posthoc_every,
        )
        self._profiles = _Profiles(
            options.directory, options.posthoc, options.posthoc_keep, options.format, options.prefix
        )
        self.saved: list[Snapshot] = []
        self._snapshots: SnapshotDirectory | None = None
        self._epochs: int | None = None
        self._epoch = 0
        self._step = 0
        self._counter = StepCounter()
        self._last_epoch: int | None = None

    @property
    def _suffix(self) -> str:
        return self.options.suffix

    def _starting_step(self) -> int:
        """Training steps already taken: the optimizer's count, else this callback's."""
        steps = optimizer_steps(self.model)
        return self._step if steps is None else steps

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        epochs = (self.params or {}).get("epochs")
        if self.schedule.needs_epoch_count and as_whole_number(epochs) is None:
            raise ValueError(
                "SnapshotCheckpoint saves the last epochs of the run, so it needs the number "
                f"of epochs fit() was given; received params epochs={epochs!r}. Pass "
                "rolling=True to keep the most recent epochs instead."
            )
        self._epochs = epochs
        self._snapshots = SnapshotDirectory(self.directory, self.keep)
        self.saved = []
        self._step = self._starting_step()
        self._counter.start(self.model, self._step)
        self._last_epoch = None
        if self.posthoc:
            self._profiles.start(self.model, self._step)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._counter.new_epoch()

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # With gradient accumulation, several batches make one step; the step that ends
        # them is the one that saves, and the profiles skip repeated steps.
        step = self._counter.after_batch(batch, self.model if self._counter.skips_steps else None)
        previous, self._step = self._step, step
        if self.posthoc:
            self.model  # noqa: B018  (on JAX, reading the model syncs its state to the variables)
            self._profiles.update(step)
        saved = self.schedule.saves_step(previous, step)
        if saved:
            name = f"{self.prefix}_step{step:08d}{self._suffix}"
            self._save(name, epoch=self._epoch, step=step, logs=logs)
        every = self.posthoc_every
        if self.posthoc and (saved or (every is not None and step // every > previous // every)):
            self._profiles.commit(step, self._epoch, self._suffix)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._last_epoch = epoch
        saved = self.schedule.saves_epoch(epoch, self._epochs)
        if saved:
            name = f"{self.prefix}_{epoch:04d}{self._suffix}"
            self._save(name, epoch=epoch, step=self._step, logs=logs)
        if self.posthoc and (saved or self.posthoc_every is None):
            self._profiles.commit(self._step, epoch, self._suffix)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.schedule.stopped_early(self._last_epoch, self._epochs):
            warnings.warn(
                f"SnapshotCheckpoint: training stopped after epoch {self._last_epoch}, before "
                f"the last epoch {self._epochs - 1}, so {len(self.saved)} snapshot(s) of the "
                f"{self.keep} planned were saved in {self.directory}. With EarlyStopping, use "
                "SnapshotCheckpoint(..., rolling=True), which keeps the most recent epochs.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _save(self, name: str, *, epoch: int, step: int, logs: Mapping[str, Any] | None) -> None:
        model = self.model

        def write(path: Path) -> None:
            _save(model, path, self.format)

        if self._snapshots is None:  # called outside fit
            self._snapshots = SnapshotDirectory(self.directory, self.keep)
        snapshot = self._snapshots.commit(write, name, epoch=epoch, step=step, logs=logs)
        self.saved.append(snapshot)
