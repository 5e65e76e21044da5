"""``OnlineAverageCallback``: keep a running average of the weights while Lightning trains.

Lightning's wrapper of :class:`polyak.torch.OnlineAverage`, swapped in to validate and test.

Example:
    >>> from polyak.lightning import OnlineAverageCallback
    >>> average = OnlineAverageCallback(half_life=1000)
    >>> trainer = Trainer(max_epochs=500, callbacks=[average])  # doctest: +SKIP
    >>> trainer.fit(model, train_loader)  # doctest: +SKIP
    >>> average.export("online-average.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from polyak.lightning.framework import pl, sharded_strategy
from polyak.torch.online import OnlineAverage
from polyak.weights.schedule import AveragingSchedule, check_buffer_policy

__all__ = ["OnlineAverageCallback"]


class OnlineAverageCallback(pl.Callback):
    """Keep a running average of the weights while training; validate and test with it.

    Wraps :class:`polyak.torch.OnlineAverage` (schedules and formulas:
    :class:`polyak.online.AveragingSchedule`):

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
        strategy = sharded_strategy(trainer)
        if strategy is not None:
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
