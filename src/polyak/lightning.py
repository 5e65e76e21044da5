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

With ``posthoc=(0.05, 0.10)`` the callback also tracks those power-function EMA
profiles for post-hoc EMA (:mod:`polyak.posthoc`), updated after every optimizer step
and committed into ``DIR/posthoc/sigma-WIDTH/`` at every epoch end (or every
``posthoc_every`` steps) and with every raw snapshot; their state is saved in
Lightning's checkpoints, so a run resumed from a ``.ckpt`` goes on tracking them.

``OnlineAverageCallback`` keeps a running average of the weights while training
(:class:`polyak.torch.OnlineAverage`: Polyak mean, EMA or power EMA) and swaps it into
the model for validation, test and predict, the raw weights back afterwards; the
model trains on, and checkpoints hold, the raw weights, and the average is saved in
the checkpoint to resume.

Lightning is imported as ``lightning.pytorch``; where only the older
``pytorch_lightning`` package is installed, that is used instead.

Example:
    >>> from polyak.lightning import OnlineAverageCallback, SnapshotCallback
    >>> snapshots = SnapshotCallback("run/", keep=10)
    >>> average = OnlineAverageCallback(half_life=1000)
    >>> trainer = Trainer(max_epochs=500, callbacks=[snapshots, average])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> polyak.average_to("run/", "averaged.safetensors", scheme="exp:2")  # doctest: +SKIP
    >>> average.export("online-average.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from polyak.checks import as_whole_number
from polyak.errors import require
from polyak.posthoc import DEFAULT_PROFILE_KEEP
from polyak.snapshots import Snapshot, SnapshotDirectory, SnapshotOptions
from polyak.weights.schedule import AveragingSchedule, check_buffer_policy


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

from polyak.torch.online import OnlineAverage  # noqa: E402
from polyak.torch.snapshots import (  # noqa: E402
    SUFFIXES,
    PosthocProfiles,
    check_state_dict,
    save_state_dict,
    snapshot_name,
)

__all__ = ["OnlineAverageCallback", "SnapshotCallback"]

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
        self.schedule = options.schedule
        self.directory = options.directory
        self.keep = options.keep
        self.rolling = options.rolling
        self.every_epochs = options.every_epochs
        self.every_steps = options.every_steps
        self.format = options.format
        self.prefix = options.prefix
        self.posthoc = options.posthoc
        self.posthoc_keep = options.posthoc_keep
        self.posthoc_every = options.posthoc_every
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
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
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


class OnlineAverageCallback(pl.Callback):
    """Keep a running average of the weights while training; validate and test with it.

    Wraps :class:`polyak.torch.OnlineAverage` (schedules and formulas:
    :mod:`polyak.online`):

    - built when ``fit`` starts (after ``configure_model`` and after a checkpoint's
      callback state was read), for the LightningModule;
    - updated in ``on_train_batch_end`` with ``trainer.global_step``, the optimizer
      steps taken: with gradient accumulation the batches of one step update once,
      and ``update_every``/``start_step`` count optimizer steps;
    - swapped into the model from ``on_validation_start`` to ``on_validation_end`` (so
      the metrics logged in validation, and EarlyStopping or ModelCheckpoint monitoring
      them, are the averaged model's), and likewise for test and predict; the raw
      weights go back afterwards, bit for bit, also when validation raises
      (``on_exception``). Training always continues from the raw weights.
    - Checkpoints hold the raw weights: while the average is swapped in, a state-dict
      hook on the module puts the raw tensors in ``state_dict()``, so a checkpoint
      saved during validation (ModelCheckpoint at validation end, weights-only or not,
      or ``trainer.save_checkpoint`` from a hook) holds the weights training goes on
      from. The average and its counters are this callback's :meth:`state_dict`, which
      Lightning saves in the ``.ckpt`` under :attr:`state_key`: ``fit(ckpt_path=...)``
      resumes the raw weights and the average exactly where they stopped.
      ``validate``/``test``/``predict`` with ``ckpt_path=...`` use the saved average.

    Before the first update step the model is its own average. Only one process's
    state is saved, as for any callback; under DDP every rank keeps the same average.
    Sharded strategies (FSDP, DeepSpeed, ModelParallel) are refused.

    Args:
        mode: ``"polyak"`` (running mean), ``"ema"`` or ``"power"``; by default
            inferred: ``decay``/``half_life`` -> ema, ``sigma_rel`` -> power, none ->
            polyak.
        decay: ema: the decay per optimizer step.
        half_life: ema: the optimizer steps after which a weight counts half.
        sigma_rel: power: the width of the power-function EMA profile.
        start_step: averaging starts after this optimizer step.
        update_every: update every this many optimizer steps.
        buffers: ``"average"`` (default) to average floating buffers (BatchNorm
            statistics) too, ``"copy"`` to use the raw model's.

    Attributes:
        schedule: the :class:`polyak.online.AveragingSchedule`.
        buffers: the floating-buffer policy.
        average: the :class:`polyak.torch.OnlineAverage`, once ``fit`` (or validate,
            test, predict) started; None before.

    Raises:
        SchemeError: the mode and its parameters do not fit.
        ValueError: ``buffers`` is unknown; when ``fit`` starts, a sharded strategy.

    Example:
        >>> average = OnlineAverageCallback(half_life=500)
        >>> trainer = Trainer(max_epochs=20, callbacks=[average])  # doctest: +SKIP
        >>> trainer.fit(module, train_loader, val_loader)  # doctest: +SKIP
        >>> average.export("averaged.safetensors")  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str | None = None,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        sigma_rel: float | None = None,
        start_step: int = 0,
        update_every: int = 1,
        buffers: str = "average",
    ) -> None:
        super().__init__()
        check_buffer_policy(buffers, "floating buffers")
        self.schedule = AveragingSchedule(
            mode,
            decay=decay,
            half_life=half_life,
            sigma_rel=sigma_rel,
            start_step=start_step,
            update_every=update_every,
        )
        self.buffers = buffers
        self.average: OnlineAverage | None = None
        self._pending: Mapping[str, Any] | None = None
        self._hook: Any = None

    def __repr__(self) -> str:
        return f"OnlineAverageCallback({self.schedule.describe()})"

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: it names the schedule."""
        return self._generate_state_key(**self.schedule.to_dict(), buffers=self.buffers)

    @property
    def is_swapped(self) -> bool:
        """Whether the averaged weights are in the model now."""
        return self.average is not None and self.average.is_swapped

    # ------------------------------------------------------------ binding

    def _bind(self, trainer: Any, pl_module: Any) -> OnlineAverage:
        """The average of ``pl_module``: built on first use, with a loaded state applied."""
        strategy = type(trainer.strategy).__name__
        if strategy in _SHARDED_STRATEGIES:
            raise ValueError(
                "OnlineAverageCallback averages the whole model in each process, which holds "
                f"it only under strategies that do not shard it; received strategy {strategy}."
            )
        average = self.average
        if average is None or average.model is not pl_module:
            schedule = self.schedule
            average = OnlineAverage(
                pl_module,
                schedule.mode,
                decay=schedule.decay,
                half_life=schedule.half_life,
                sigma_rel=schedule.sigma_rel,
                start_step=schedule.start_step,
                update_every=schedule.update_every,
                buffers=self.buffers,
            )
            if self._pending is not None:
                average.load_state_dict(self._pending)
                self._pending = None
            self.average = average
        return average

    # ------------------------------------------------------------ training

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, OnlineAverageCallback)]
        if len(others) > 1:
            raise ValueError(
                "one OnlineAverageCallback per Trainer: each swaps its average into the model "
                f"for validation; received {len(others)} ({', '.join(map(repr, others))}). To "
                "compare widths of power EMA, track them with SnapshotCallback(posthoc=...) and "
                "reconstruct any width afterwards with polyak posthoc."
            )
        self._swap_out()  # a previous run stopped inside validation by a hook's error
        average = self._bind(trainer, pl_module)
        step = trainer.global_step
        if step > 0 and average.last_step is None:
            warnings.warn(
                f"OnlineAverageCallback: training resumes at step {step} without the average's "
                "state (the checkpoint holds none for this callback's state_key), so the "
                f"average starts now: {self.schedule.describe()}.",
                RuntimeWarning,
                stacklevel=2,
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._bind(trainer, pl_module).update(trainer.global_step)

    # ------------------------------------------------------------ evaluation

    def _swap_in(self, trainer: Any, pl_module: Any) -> None:
        average = self._bind(trainer, pl_module)
        if average.is_swapped:
            return
        average.swap_in()
        raw = average.raw_tensors()

        def keep_raw(module: Any, state: dict, prefix: str, metadata: Any) -> None:
            for name, tensor in raw.items():
                if prefix + name in state:
                    state[prefix + name] = tensor

        register = getattr(pl_module, "register_state_dict_post_hook", None)
        if register is None:  # torch < 2.1's private form of the same hook
            register = pl_module._register_state_dict_hook
        self._hook = register(keep_raw)

    def _swap_out(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.average is not None and self.average.is_swapped:
            self.average.swap_out()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._swap_in(trainer, pl_module)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._swap_out()

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The average and its counters (see :meth:`polyak.torch.OnlineAverage.state_dict`)."""
        if self.average is not None:
            return self.average.state_dict()
        return dict(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the average from a checkpoint (applied when the average is built).

        Raises:
            ValueError: the state is not an average's, or was saved with another
                schedule or for another model.
        """
        if self.average is not None:
            self._swap_out()
            self.average.load_state_dict(state_dict)
        else:
            self._pending = state_dict

    # ------------------------------------------------------------ the averaged model

    @contextlib.contextmanager
    def swapped(self) -> Iterator[Any]:
        """The module with the averaged weights in it, the raw ones back on exit.

        Raises:
            ValueError: no model yet (use the callback in ``fit`` first).
        """
        with self._require_average("swapped()").swapped() as module:
            yield module

    def export(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the averaged model as a normal model file (see ``OnlineAverage.export``).

        ``.safetensors`` or ``.pt``/``.pth``; it loads into the LightningModule's
        architecture with ``load_state_dict(strict=True)``.

        Raises:
            ValueError: no model yet, no update yet, or an unknown suffix.
            OutputError: the file exists (without ``overwrite``) or cannot be written.
        """
        return self._require_average("export()").export(path, overwrite=overwrite)

    def _require_average(self, action: str) -> OnlineAverage:
        if self.average is None:
            raise ValueError(
                f"{action} needs the average, which the callback builds when trainer.fit() "
                "(or validate, test, predict) starts; use the callback in a Trainer first."
            )
        return self.average
