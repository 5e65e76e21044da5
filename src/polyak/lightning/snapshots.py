"""``SnapshotCallback``: save the weights of a Lightning run's last epochs for averaging.

The Lightning counterpart of ``polyak.keras.SnapshotCheckpoint``: the same modes and arguments.

Example:
    >>> from polyak.lightning import SnapshotCallback
    >>> snapshots = SnapshotCallback("run/", keep=10)
    >>> trainer = Trainer(max_epochs=500, callbacks=[snapshots])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from polyak.checks import as_whole_number
from polyak.lightning.framework import pl, sharded_strategy, torch
from polyak.posthoc import DEFAULT_PROFILE_KEEP
from polyak.snapshots import ScheduledSnapshotSettings, Snapshot, SnapshotDirectory, SnapshotOptions
from polyak.torch.snapshots import (
    SUFFIXES,
    PosthocProfiles,
    check_state_dict,
    save_state_dict,
    snapshot_name,
)

__all__ = ["SnapshotCallback"]


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


class SnapshotCallback(ScheduledSnapshotSettings, pl.Callback):
    """Save snapshots of a LightningModule during ``fit`` into a crash-safe snapshot directory.

    File names carry the numbers polyak orders checkpoints by:

    | mode                        | file name                               |
    |-----------------------------|-----------------------------------------|
    | epochs (default, rolling)   | ``{prefix}_{epoch:04d}.safetensors``    |
    | ``format="pt"``             | ``{prefix}_{epoch:04d}.pt``             |
    | ``every_steps=N``           | ``{prefix}_step{step:08d}{suffix}``     |

    ``epoch`` is Lightning's 0-based ``trainer.current_epoch``, so ``max_epochs=500``
    with ``keep=10`` gives ``model_0490`` to ``model_0499``.

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

    Each snapshot is ``pl_module.state_dict()`` (safetensors by default; what is
    written: :mod:`polyak.torch.snapshots`), committed through
    :class:`polyak.snapshots.SnapshotDirectory`: atomically, with a manifest recording
    the epoch, the step (``trainer.global_step``), the numbers in
    ``trainer.callback_metrics`` and a SHA-256. Epoch snapshots are taken at the end of
    each training epoch, after that epoch's validation, so the logs hold the epoch's
    validation metrics too. Only global rank 0 writes; the other ranks do nothing.

    Post-hoc EMA: with ``posthoc=(0.05, 0.10)`` the callback also keeps one
    power-function EMA per width (:class:`polyak.torch.OnlineAverage` in power mode,
    its time the global step), updated after every optimizer step, and commits the
    EMA of each width into ``directory/posthoc/sigma-WIDTH/`` at the end of every
    training epoch (or every ``posthoc_every`` optimizer steps instead) and with every
    raw snapshot, keeping the newest ``posthoc_keep``; ``polyak posthoc`` then
    reconstructs the EMA of any width. The profiles' state is the callback's
    :meth:`state_dict`, which Lightning saves in its ``.ckpt`` checkpoints (under
    :attr:`state_key`, which names the directory): ``fit(ckpt_path=...)`` resumes them
    exactly. A new run into a directory whose profiles hold snapshots, without that
    state, is refused rather than mixed in.

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
        posthoc: the widths (``sigma_rel``) of the EMA profiles to track, e.g.
            ``(0.05, 0.10)``; ``()`` (default) tracks none, at no cost.
        posthoc_keep: how many EMA snapshots each profile keeps (the newest).
        posthoc_every: commit the profiles every this many optimizer steps instead of
            at every epoch end (they are also committed with every raw snapshot).

    Attributes:
        directory: the snapshot directory.
        saved: the snapshots committed during the last ``fit``, oldest first.
        posthoc: the widths of the tracked profiles.

    Raises:
        ValueError: an argument is out of range (when constructed); at the start of
            ``fit``: no epoch count in the default mode, a sharded strategy, or a
            state dict that cannot be saved in ``format``; at the start of training,
            profile snapshots in the directory without the state to continue them.

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
        *,
        posthoc: tuple[float, ...] | list[float] = (),
        posthoc_keep: int = DEFAULT_PROFILE_KEEP,
        posthoc_every: int | None = None,
    ) -> None:
        super().__init__()
        self.options = options = SnapshotOptions(
            directory=directory,
            formats=SUFFIXES,
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
        self.saved: list[Snapshot] = []
        self._snapshots: SnapshotDirectory | None = None
        self._step = 0
        self._last_epoch: int | None = None
        self._profiles = PosthocProfiles.for_options(options, "SnapshotCallback")
        self._tracking = False

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: it names the directory."""
        return self._generate_state_key(directory=str(self.directory), prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        """The tracked EMA profiles' state (empty without ``posthoc``), for the checkpoint."""
        return self._profiles.state_dict() if self.posthoc else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the EMA profiles from a checkpoint; they go on when training starts.

        Raises:
            ValueError: the state is not of tracked profiles, or of other widths.
        """
        self._profiles.load_state_dict(state_dict)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After configure_model() has built the model, before any training; on every rank,
        # so that all of them stop together on a bad set-up.
        strategy = sharded_strategy(trainer)
        if strategy is not None:
            raise ValueError(
                "SnapshotCallback saves pl_module.state_dict() on global rank 0 alone, which "
                "holds the whole model only under strategies that do not shard it; received "
                f"strategy {strategy}. Save full checkpoints with ModelCheckpoint instead "
                "(polyak averages Lightning .ckpt files)."
            )
        epochs = trainer.max_epochs
        if self.schedule.needs_epoch_count and as_whole_number(epochs) is None:
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
        writes = trainer.is_global_zero and not trainer.fast_dev_run
        if writes:
            self._snapshots = SnapshotDirectory(self.directory, self.keep)
        # Only the rank that writes tracks the profiles (the weights are the same on all).
        self._tracking = bool(self.posthoc) and writes
        if self._tracking:
            self._profiles.bind(pl_module, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        previous, self._step = self._step, step
        if self._tracking:
            self._profiles.update(step)
        # With gradient accumulation several batches share one step: save it once.
        saved = self.schedule.saves_step(previous, step)
        if saved:
            name = snapshot_name(self.prefix, self.format, step=step)
            self._save(trainer, pl_module, name, epoch=trainer.current_epoch, step=step)
        every = self.posthoc_every
        if self._tracking and (saved or (every is not None and step // every > previous // every)):
            self._profiles.commit(step, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = trainer.current_epoch
        self._last_epoch = epoch
        saved = self.schedule.saves_epoch(epoch, trainer.max_epochs)
        if saved:
            name = snapshot_name(self.prefix, self.format, epoch=epoch)
            self._save(trainer, pl_module, name, epoch=epoch, step=trainer.global_step)
        step = trainer.global_step
        # The profiles hold this step (on_train_batch_end updated them) unless the epoch
        # ran no batch, as after a resume at its end: then there is nothing new to save.
        if self._tracking and (saved or self.posthoc_every is None):
            if self._profiles.last_step == step:
                self._profiles.commit(step, epoch)

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
