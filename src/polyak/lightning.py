"""``SnapshotCallback``: save the weights of a Lightning run's last epochs for averaging.

The Lightning counterpart of the Keras callback ``polyak.keras.SnapshotCheckpoint``,
with the same modes and arguments. It saves ``pl_module.state_dict()`` (safetensors by
default, see :mod:`polyak.torch.snapshots` for what is written) and commits each file
through :class:`polyak.snapshots.SnapshotDirectory`: atomically, with a manifest
recording epoch, step (``trainer.global_step``), the numbers in
``trainer.callback_metrics`` and a SHA-256, keeping the newest ``keep``. Only global
rank 0 writes; the other ranks do nothing.

File names carry the numbers polyak orders checkpoints by:

| mode                        | file name                               |
|-----------------------------|-----------------------------------------|
| epochs (default, rolling)   | ``{prefix}_{epoch:04d}.safetensors``    |
| ``format="pt"``             | ``{prefix}_{epoch:04d}.pt``             |
| ``every_steps=N``           | ``{prefix}_step{step:08d}{suffix}``     |

``epoch`` is Lightning's 0-based ``trainer.current_epoch``, so ``max_epochs=500``
with ``keep=10`` gives ``model_0490`` to ``model_0499``. Epoch snapshots are taken at
the end of each training epoch, after that epoch's validation, so the logs hold the
epoch's validation metrics too.

Lightning is imported as ``lightning.pytorch``; where only the older
``pytorch_lightning`` package is installed, that is used instead.

Example:
    >>> from polyak.lightning import SnapshotCallback
    >>> snapshots = SnapshotCallback("run/", keep=10)
    >>> trainer = Trainer(max_epochs=500, callbacks=[snapshots])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

from polyak.errors import require
from polyak.snapshots import Snapshot, SnapshotDirectory


def _import_lightning() -> Any:
    """``lightning.pytorch``, else ``pytorch_lightning``; else say which extra installs it."""
    for module, missing in (
        ("lightning.pytorch", {"lightning", "lightning.pytorch"}),
        ("pytorch_lightning", {"pytorch_lightning"}),
    ):
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as error:
            # Only the package itself being absent falls through; a broken install raises.
            if error.name not in missing:
                raise
    require("lightning", "lightning", "polyak.lightning")  # raises MissingDependencyError
    return importlib.import_module("lightning.pytorch")


pl = _import_lightning()
torch = require("torch", "lightning", "polyak.lightning")

from polyak.snapshots import (  # noqa: E402  (after the dependency check)
    SnapshotSchedule,
    check_snapshot_arguments,
    is_whole_number,
)
from polyak.torch.snapshots import (  # noqa: E402
    SUFFIXES,
    check_state_dict,
    save_state_dict,
    snapshot_name,
)

__all__ = ["SnapshotCallback"]

# Strategies whose pl_module.state_dict() on rank 0 is not the whole model.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def _numbers(metrics: Any) -> dict[str, float | int]:
    """The single numbers among Lightning's callback metrics (0-d tensors, floats, ints)."""
    numbers: dict[str, float | int] = {}
    for key, value in dict(metrics or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype == torch.bool:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[str(key)] = value
    return numbers


class SnapshotCallback(pl.Callback):
    """Save snapshots of a LightningModule during ``fit`` into a crash-safe snapshot directory.

    Two epoch modes, as in the Keras callback:

    - ``rolling=False`` (default): save the last ``keep`` epochs of the run, every
      ``every_epochs``-th counting back from the final epoch (always saved). It needs
      ``trainer.max_epochs`` (not -1), and saves nothing before the last
      ``keep * every_epochs`` epochs: if training stops early (EarlyStopping,
      ``max_steps``, ``max_time``), there may be no snapshots at all; a warning says so.
    - ``rolling=True``: save every ``every_epochs`` epochs and keep the ``keep`` most
      recent. Use this with EarlyStopping.

    With ``every_steps=N`` the callback saves every N optimizer steps instead
    (``trainer.global_step``, which also counts the steps of a resumed run), keeping
    the ``keep`` most recent; epochs play no part.

    Nothing is saved in a ``fast_dev_run``. Sharded strategies (FSDP, DeepSpeed,
    ModelParallel), where rank 0 does not hold the whole model, are refused.

    Args:
        directory: the snapshot directory; created if needed (on global rank 0).
        keep: how many snapshots to keep.
        rolling: keep the most recent snapshots instead of the run's last epochs.
        every_epochs: save every this many epochs.
        every_steps: save every this many optimizer steps instead of by epoch.
        format: ``"safetensors"`` (default) or ``"pt"`` (``torch.save``).
        prefix: the start of each file name.

    Attributes:
        directory: the snapshot directory.
        saved: the snapshots committed during the last ``fit``, oldest first.

    Raises:
        ValueError: an argument is out of range (when constructed); at the start of
            ``fit``: no epoch count in the default mode, a sharded strategy, or a
            state dict that cannot be saved in ``format``.

    Example:
        >>> snapshots = SnapshotCallback("run/", keep=10)  # doctest: +SKIP
        >>> Trainer(max_epochs=500, callbacks=[snapshots]).fit(model, loader)  # doctest: +SKIP
        >>> [s.name for s in snapshots.saved][-1]  # doctest: +SKIP
        'model_0499.safetensors'
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 10,
        rolling: bool = False,
        every_epochs: int = 1,
        every_steps: int | None = None,
        format: str = "safetensors",
        prefix: str = "model",
    ) -> None:
        super().__init__()
        check_snapshot_arguments(directory, keep, format, SUFFIXES, prefix)
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
        self._step = 0
        self._last_epoch: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After configure_model() has built the model, before any training; on every rank,
        # so that all of them stop together on a bad set-up.
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                "SnapshotCallback saves pl_module.state_dict() on global rank 0 alone, which "
                "holds the whole model only under strategies that do not shard it; received "
                f"strategy {strategy}. Save full checkpoints with ModelCheckpoint instead "
                "(polyak averages Lightning .ckpt files)."
            )
        epochs = trainer.max_epochs
        if self.schedule.needs_epoch_count and (not is_whole_number(epochs) or epochs < 0):
            raise ValueError(
                "SnapshotCallback saves the last epochs of the run, so it needs the number of "
                f"epochs; received trainer.max_epochs={epochs!r}. Pass Trainer(max_epochs=...), "
                "or SnapshotCallback(..., rolling=True) to keep the most recent epochs instead."
            )
        check_state_dict(pl_module, self.format)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.saved = []
        self._step = trainer.global_step
        self._last_epoch = None
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self._snapshots = SnapshotDirectory(self.directory, self.keep)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        previous, self._step = self._step, step
        # With gradient accumulation several batches share one step: save it once.
        if self.schedule.saves_step(previous, step):
            name = snapshot_name(self.prefix, self.format, step=step)
            self._save(trainer, pl_module, name, epoch=trainer.current_epoch, step=step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        self._last_epoch = epoch
        if self.schedule.saves_epoch(epoch, trainer.max_epochs):
            name = snapshot_name(self.prefix, self.format, epoch=epoch)
            self._save(trainer, pl_module, name, epoch=epoch, step=trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        epochs = trainer.max_epochs
        if (
            trainer.is_global_zero
            and not trainer.fast_dev_run
            and self.schedule.stopped_early(self._last_epoch, epochs)
        ):
            warnings.warn(
                f"SnapshotCallback: training stopped after epoch {self._last_epoch}, before the "
                f"last epoch {epochs - 1}, so {len(self.saved)} snapshot(s) of the {self.keep} "
                f"planned were saved in {self.directory}. With EarlyStopping, max_steps or "
                "max_time, use SnapshotCallback(..., rolling=True), which keeps the most "
                "recent epochs.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _save(self, trainer: Any, pl_module: Any, name: str, *, epoch: int, step: int) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        if self._snapshots is None:  # a hook called outside fit
            self._snapshots = SnapshotDirectory(self.directory, self.keep)
        state = pl_module.state_dict()
        snapshot = self._snapshots.commit(
            lambda path: save_state_dict(state, path, self.format),
            name,
            epoch=epoch,
            step=step,
            logs=_numbers(trainer.callback_metrics),
        )
        self.saved.append(snapshot)
