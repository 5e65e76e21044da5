"""Counting optimizer steps in Keras callbacks, which see training batches.

How gradient accumulation is counted: :class:`StepCounter`.
"""

from __future__ import annotations

from typing import Any

from polyak.errors import require

keras = require("keras", "keras", "polyak.keras")

__all__ = ["StepCounter"]


def _accumulation(model: Any) -> int:
    """The optimizer's ``gradient_accumulation_steps`` (1 without accumulation)."""
    optimizer = getattr(model, "optimizer", None)
    # A LossScaleOptimizer (mixed_float16) accumulates in its inner optimizer.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return int(getattr(optimizer, "gradient_accumulation_steps", None) or 1)


def optimizer_steps(model: Any) -> int | None:
    """The optimizer's step count (``iterations``), or None without an optimizer."""
    iterations = getattr(getattr(model, "optimizer", None), "iterations", None)
    if iterations is None:
        return None
    try:
        return int(keras.ops.convert_to_numpy(getattr(iterations, "value", iterations)))
    except (TypeError, ValueError):
        return None


def _batches_taken(model: Any, step: int, accumulation: int) -> int:
    """The batches behind ``step`` accumulating steps, those of an unfinished step included.

    Keras counts batches in the optimizer's private ``_iterations`` (``iterations`` is it
    floor-divided by ``accumulation``); it is used only where it agrees with ``step``.
    """
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    counted = getattr(optimizer, "_iterations", None)
    try:
        batches = int(keras.ops.convert_to_numpy(getattr(counted, "value", counted)))
    except (TypeError, ValueError):
        return step * accumulation
    return batches if batches // accumulation == step else step * accumulation


class StepCounter:
    """Optimizer steps from the batch indices Keras passes to ``on_train_batch_end``.

    The callbacks count steps as the optimizer does (``optimizer.iterations``), so that
    their counts and the optimizer's agree on resuming. Without gradient accumulation a
    step is a training batch. With ``gradient_accumulation_steps=k`` the optimizer changes
    the weights on every ``k``-th batch only, and ``iterations`` counts those updates:
    batches ``1 .. k`` are step 0 until the ``k``-th, which makes step 1, and so on. (Keras'
    own ``use_ema`` updates its average after every batch instead: it averages unchanged
    weights ``k`` times, its momentum applying ``k`` times per optimizer step.)

    A ``LossScaleOptimizer`` (``mixed_float16``) skips the steps whose scaled gradients
    overflow: the weights stay as they were and ``iterations`` does not move. Batches do
    not tell those apart, so with such an optimizer (:attr:`skips_steps`) the count is
    read from ``iterations`` after each batch instead, and a skipped step repeats the
    step before it (the callbacks ignore a repeated step: no second update or snapshot).

    Call :meth:`start` in ``on_train_begin`` (with the steps taken so far), :meth:`new_epoch`
    in ``on_epoch_begin`` and :meth:`after_batch` in ``on_train_batch_end``. A model
    saved mid-accumulation resumes with the batches it had accumulated counted.
    """

    def __init__(self) -> None:
        self.accumulation = 1
        self.batches = 0
        self.skips_steps = False
        self._epoch_start = 0

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.batches // self.accumulation

    def start(self, model: Any, step: int) -> None:
        """Go on from ``step`` optimizer steps with ``model``'s optimizer.

        At the step this counter is at (another ``fit`` of the same run), the batches
        since the last update still count.
        """
        accumulation = _accumulation(model)
        self.skips_steps = hasattr(getattr(model, "optimizer", None), "inner_optimizer")
        if step != self.step or accumulation != self.accumulation:
            self.accumulation, self.batches = accumulation, step * accumulation
            if accumulation > 1:
                self.batches = _batches_taken(model, step, accumulation)
        self._epoch_start = self.batches

    def new_epoch(self) -> None:
        self._epoch_start = self.batches

    def after_batch(self, batch: int, model: Any = None) -> int:
        """The step after batch ``batch`` of this epoch (Keras passes the index of the last
        batch run, also with ``steps_per_execution > 1``).

        Where :attr:`skips_steps`, give the callback's ``model`` (read after the batch, so
        that on JAX its variables hold the batch's state): the step is its optimizer's.
        """
        self.batches = self._epoch_start + batch + 1
        taken = optimizer_steps(model) if self.skips_steps and model is not None else None
        if taken is not None:
            self.batches = taken * self.accumulation + self.batches % self.accumulation
        return self.step
