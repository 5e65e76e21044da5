"""``SnapshotCheckpoint``: save the weights of the last epochs for averaging afterwards.

The callback saves with Keras' own ``model.save_weights`` or ``model.save`` and
commits each file through :class:`polyak.snapshots.SnapshotDirectory`: atomically,
with a manifest recording epoch, step, logs and checksum, and keeping the newest
``keep``. It uses Keras' public API only, so it works on every backend.

File names carry the numbers polyak orders checkpoints by:

| mode                        | file name                           |
|-----------------------------|-------------------------------------|
| epochs (default)            | ``{prefix}_{epoch:04d}.weights.h5`` |
| ``format="keras"``          | ``{prefix}_{epoch:04d}.keras``      |
| ``every_steps=N``           | ``{prefix}_step{step:08d}{suffix}`` |

``epoch`` is Keras' 0-based epoch index, so 500 epochs with ``keep=10`` give
``model_0490`` to ``model_0499``, the classic experiment's snapshots.

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

from polyak.errors import require
from polyak.snapshots import (
    Snapshot,
    SnapshotDirectory,
    SnapshotSchedule,
    check_snapshot_arguments,
    is_whole_number,
)

keras = require("keras", "keras", "polyak.keras")

__all__ = ["SnapshotCheckpoint"]

# format argument -> file suffix (Keras insists on these suffixes when saving).
_SUFFIXES = {"weights.h5": ".weights.h5", "keras": ".keras"}


class SnapshotCheckpoint(keras.callbacks.Callback):
    """Save snapshots of the model during ``fit`` into a crash-safe snapshot directory.

    Two epoch modes:

    - ``rolling=False`` (default): save the last ``keep`` epochs of the run, every
      ``every_epochs``-th counting back from the final epoch (always saved). It
      needs the number of epochs ``fit`` was given, and saves nothing before the
      last ``keep * every_epochs`` epochs: if training stops early (EarlyStopping,
      ``model.stop_training``), there may be no snapshots at all; a warning says so.
    - ``rolling=True``: save every ``every_epochs`` epochs and keep the ``keep`` most
      recent. Use this with EarlyStopping.

    With ``every_steps=N`` the callback saves every N training batches instead
    (counted across epochs and ``fit`` calls, starting from the optimizer's
    iteration count), keeping the ``keep`` most recent; epochs play no part.

    Args:
        directory: the snapshot directory; created if needed.
        keep: how many snapshots to keep.
        rolling: keep the most recent snapshots instead of the run's last epochs.
        every_epochs: save every this many epochs.
        every_steps: save every this many training batches instead of by epoch.
        format: ``"weights.h5"`` (``model.save_weights``) or ``"keras"``
            (``model.save``, the whole model).
        prefix: the start of each file name.

    Attributes:
        directory: the snapshot directory.
        saved: the snapshots committed during the last ``fit``, oldest first.

    Raises:
        ValueError: an argument is out of range, or ``fit`` gives no epoch count in
            the default mode.

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
    ) -> None:
        super().__init__()
        check_snapshot_arguments(directory, keep, format, _SUFFIXES, prefix)
        self.schedule = SnapshotSchedule(keep, rolling, every_epochs, every_steps)
        self.directory = Path(directory)
        self.keep = keep
        self.rolling = rolling
        self.every_epochs = every_epochs
        self.every_steps = every_steps
        self.format = format
        self.prefix = prefix
        self.saved: list[Snapshot] = []
        self._snapshots: SnapshotDirectory | None = None
        self._epochs: int | None = None
        self._epoch = 0
        self._step = 0
        self._epoch_start_step = 0
        self._last_epoch: int | None = None

    @property
    def _suffix(self) -> str:
        return _SUFFIXES[self.format]

    def _starting_step(self) -> int:
        """Training steps already taken: the optimizer's count, else this callback's."""
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        if iterations is None:
            return self._step
        try:
            return int(keras.ops.convert_to_numpy(iterations))
        except (TypeError, ValueError):
            return self._step

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        epochs = (self.params or {}).get("epochs")
        if self.schedule.needs_epoch_count and not is_whole_number(epochs):
            raise ValueError(
                "SnapshotCheckpoint saves the last epochs of the run, so it needs the number "
                f"of epochs fit() was given; received params epochs={epochs!r}. Pass "
                "rolling=True to keep the most recent epochs instead."
            )
        self._epochs = epochs
        self._snapshots = SnapshotDirectory(self.directory, self.keep)
        self.saved = []
        self._step = self._epoch_start_step = self._starting_step()
        self._last_epoch = None

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._epoch_start_step = self._step

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # Keras passes the index of the last batch run, also with steps_per_execution > 1.
        step = self._epoch_start_step + batch + 1
        previous, self._step = self._step, step
        if self.schedule.saves_step(previous, step):
            name = f"{self.prefix}_step{step:08d}{self._suffix}"
            self._save(name, epoch=self._epoch, step=step, logs=logs)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._last_epoch = epoch
        if self.schedule.saves_epoch(epoch, self._epochs):
            name = f"{self.prefix}_{epoch:04d}{self._suffix}"
            self._save(name, epoch=epoch, step=self._step, logs=logs)

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
            if self.format == "keras":
                model.save(str(path))
            else:
                model.save_weights(str(path))

        if self._snapshots is None:  # called outside fit
            self._snapshots = SnapshotDirectory(self.directory, self.keep)
        snapshot = self._snapshots.commit(write, name, epoch=epoch, step=step, logs=logs)
        self.saved.append(snapshot)
