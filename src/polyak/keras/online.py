"""``OnlineAverage``: a Keras 3 callback keeping a running average of the weights during ``fit``.

Steps, the numeric policy, saving and resuming: :class:`OnlineAverage`.

Example:
    >>> from polyak.keras import OnlineAverage
    >>> average = OnlineAverage(half_life=500, start_epoch=5)
    >>> model.fit(x, y, validation_data=(xv, yv), epochs=20, callbacks=[average])  # doctest: +SKIP
    >>> average.save("average.npz")  # doctest: +SKIP
    >>> average.export("averaged.weights.h5")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from polyak.errors import OutputError, require
from polyak.files import atomic_output
from polyak.keras.saving import save_model_file
from polyak.keras.steps import StepCounter, optimizer_steps
from polyak.online import SwappableAverage
from polyak.weights.schedule import (
    BUFFER_POLICIES,
    AveragingProgress,
    AveragingSchedule,
    AveragingState,
    advance,
    check_buffer_policy,
    whole_or_none,
)

keras = require("keras", "keras", "polyak.keras")
ops = keras.ops

__all__ = ["BUFFER_POLICIES", "EXPORT_SUFFIXES", "OnlineAverage"]

#: The record saved with the average, and its layout's version.
STATE_FORMAT = "polyak-online-average"
STATE_VERSION = 1
_RECORD = "__polyak_online__"
_AVERAGE_PREFIX = "average/"
#: What to do with non-trainable floating variables.
#: The suffixes :meth:`OnlineAverage.export` writes.
EXPORT_SUFFIXES = (".weights.h5", ".keras")
_MAX_LISTED = 5


def _listed(names: list[str]) -> str:
    shown = ", ".join(map(repr, names[:_MAX_LISTED]))
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


class OnlineAverage(SwappableAverage, keras.callbacks.Callback):
    """Keep a running average of the weights during ``fit``; evaluate with it swapped in.

    The callback updates the average after training batches and swaps it into the model
    for every evaluation it is a callback of: the validation that ``fit`` runs after each
    epoch (Keras runs it through ``evaluate`` with the same callbacks, so ``val_*``
    metrics, and EarlyStopping or ModelCheckpoint monitoring them, see the averaged
    model), ``model.evaluate(..., callbacks=[average])`` and ``model.predict(...,
    callbacks=[average])``. The raw weights go back into the model when the evaluation
    or prediction ends: training always continues from them, and the model
    holds them when ``fit`` returns, so saving it and training on resumes the run. (Keras'
    ``use_ema=True`` instead overwrites the weights with the average at the end of
    ``fit``.) The schedules and their formulas: :class:`polyak.online.AveragingSchedule`.

    Steps are the optimizer's steps counted across epochs and ``fit`` calls, starting from
    its iteration count (as :class:`polyak.keras.SnapshotCheckpoint` counts them): training
    batches, or with ``gradient_accumulation_steps=k`` every ``k``-th batch, the one that
    changes the weights (see :mod:`polyak.keras.steps`); ``start_epoch=E`` starts
    averaging with Keras' 0-based epoch ``E``, i.e. after the steps taken before it.

    Numeric policy, as in :class:`polyak.torch.OnlineAverage`:

    - trainable floating variables are averaged; non-trainable floating variables
      (BatchNormalization's moving mean and variance) too by default
      (``buffers="average"``, what ``polyak.average`` of snapshots does), or left to the
      raw model with ``buffers="copy"`` (what Keras' ``use_ema`` does);
    - integer and bool variables, and anything not in ``model.weights`` (random seed
      state, metrics, the optimizer), are never averaged: the averaged model uses the raw
      model's;
    - the average is kept in float32 (float64 for float64 variables) whatever the
      variables' dtype (``bfloat16``, ``float16``), and rounded to their dtype when
      swapped in; swapping out restores the raw values exactly.

    It uses ``keras.ops`` and ``Variable.assign`` only, so it runs on every backend.
    (On JAX, reading the weights mid-epoch makes Keras sync its state to the variables:
    the callback does so on update steps only; ``update_every`` makes that rarer.)

    Saving and resuming: :meth:`OnlineAverage.save` writes the average and its counters
    to an ``.npz`` file (arrays ``average/I/NAME``, ``I`` the variable's index in
    ``model.weights`` and ``NAME`` its name, and a JSON record ``__polyak_online__``);
    save the model as usual (it holds the raw weights). To resume, load the model,
    build the callback with the same arguments, :meth:`OnlineAverage.load` the file and
    ``fit`` on. :meth:`OnlineAverage.export` writes the averaged model as a
    ``.weights.h5`` or ``.keras`` file.

    Swapping it into the model by hand (:meth:`swap_in`, :meth:`swap_out`,
    :meth:`swapped`, for ``predict`` or an evaluation of your own) follows
    :class:`polyak.online.SwappableAverage`; ``fit``'s validation and
    ``evaluate(..., callbacks=[average])`` swap by themselves.

    Args:
        mode: ``"polyak"`` (running mean, equal weights), ``"ema"`` or ``"power"``;
            by default inferred: ``decay``/``half_life`` -> ema, ``sigma_rel`` ->
            power, none -> polyak. Formulas: :class:`polyak.online.AveragingSchedule`.
        decay: ema: the decay per step (an update after ``d`` steps uses ``decay**d``).
        half_life: ema: the steps after which a weight counts half; the same time
            scale whatever ``update_every``.
        sigma_rel: power: the width of the power-function EMA profile.
        start_epoch: start averaging with this (0-based) epoch.
        start_step: start averaging after this many (optimizer) steps; give
            ``start_epoch`` or ``start_step``, not both (default: from the start).
        update_every: update every this many steps.
        buffers: ``"average"`` (default) to average non-trainable floating variables
            (BatchNormalization statistics) too, ``"copy"`` to use the raw model's.

    Attributes:
        schedule: the :class:`polyak.online.AveragingSchedule` (with ``start_epoch``,
            its ``start_step`` is known once that epoch begins).
        start_epoch: the epoch averaging starts with, or None.
        buffers: the non-trainable floating variables' policy.

    Raises:
        SchemeError: the mode and its parameters do not fit.
        ValueError: another argument is out of range.

    Example:
        >>> average = OnlineAverage(mode="polyak", start_epoch=400)
        >>> model.fit(x, y, epochs=500, callbacks=[average])  # doctest: +SKIP
        >>> average.export("averaged.keras")  # doctest: +SKIP
    """

    def __init__(
        self,
        mode: str | None = None,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        sigma_rel: float | None = None,
        start_epoch: int | None = None,
        start_step: int | None = None,
        update_every: int = 1,
        buffers: str = "average",
    ) -> None:
        super().__init__()
        start_epoch = whole_or_none(start_epoch, "start_epoch")
        start_step = whole_or_none(start_step, "start_step")
        if start_epoch is not None and start_step is not None:
            raise ValueError(
                f"give start_epoch or start_step, not both; received start_epoch={start_epoch} "
                f"and start_step={start_step}."
            )
        check_buffer_policy(buffers, "non-trainable floating variables")
        self._template = AveragingSchedule(
            mode,
            decay=decay,
            half_life=half_life,
            sigma_rel=sigma_rel,
            start_step=start_step or 0,
            update_every=update_every,
        )
        self.start_epoch = start_epoch
        self.buffers = buffers
        self._reset()
        self._bound: Any = None
        self._variables: list[Any] = []
        self._names: list[str] = []
        self._dtypes: list[str] = []
        self._pending: dict[str, Any] | None = None

    def _reset(self) -> None:
        """Forget the average: no updates, steps from 0, the start not yet reached."""
        self._schedule = self._template
        self._state = AveragingState()
        self._started = self.start_epoch is None
        self._step = 0
        self._counter = StepCounter()
        self._averages: list[Any] = []
        self._backup: list[Any] | None = None
        self._swapped_by_hook = False

    # ------------------------------------------------------------ state

    @property
    def schedule(self) -> AveragingSchedule:
        """The averaging schedule (with ``start_epoch``: its step once that epoch began)."""
        return self._schedule

    @property
    def updates(self) -> int:
        """The updates made so far (0: the average has not started)."""
        return self._state.updates

    @property
    def step(self) -> int:
        """The training steps counted so far."""
        return self._step

    @property
    def averaged_names(self) -> list[str]:
        """The paths of the averaged variables (known once bound to a model by ``fit``)."""
        return [variable.path for variable in self._variables]

    def _bind(self, model: Any) -> None:
        """Choose the variables to average in ``model``; start the average afresh."""
        variables, names, dtypes = [], [], []
        for index, variable in enumerate(model.weights):
            if not keras.backend.is_float_dtype(variable.dtype):
                continue  # integer and bool variables: the raw model's
            if not variable.trainable and self.buffers == "copy":
                continue
            variables.append(variable)
            # Paths change when a model is loaded or built in another order (layer names
            # are numbered per process); the place in model.weights does not.
            names.append(f"{index}/{variable.name}")
            dtypes.append("float64" if variable.dtype == "float64" else "float32")
        if not variables:
            raise ValueError(
                f"the model has no floating weights to average; received {model.name!r} with "
                f"{len(model.weights)} weights (is it built?)."
            )
        self._bound = model
        self._variables, self._names, self._dtypes = variables, names, dtypes
        self._reset()
        self._step = optimizer_steps(model) or 0

    def _ensure_bound(self, model: Any, *, rebind: bool) -> bool:
        """Bind to ``model`` if needed; whether the average is ``model``'s.

        A state from :meth:`load` is applied to ``model``. Bound to another model, the
        average starts afresh for ``model`` if ``rebind`` (a new ``fit``), else it is
        left alone (an evaluation of another model).
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._bind(model)
            self._restore(pending, model)
        elif self._bound is None or (rebind and self._bound is not model):
            self._bind(model)
        return self._bound is model

    def _bound_model(self, action: str) -> Any:
        model = self.model
        if model is None:
            raise ValueError(
                f"{action} needs the model: use the callback in fit() (or call "
                "set_model(model)) first."
            )
        if not self._ensure_bound(model, rebind=False):
            raise ValueError(
                f"{action}: the callback's model ({model.name!r}) is not the model it "
                f"averages ({self._bound.name!r}); call set_model() with that one."
            )
        return model

    # ------------------------------------------------------------ callback hooks

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        if self.is_swapped:
            # A previous fit stopped by an error during validation left them in.
            self.swap_out()
        self._ensure_bound(model, rebind=True)
        self._counter.start(model, self._step)
        if self._started and self._state.last_step is None:
            self._state = replace(self._state, last_step=self._step)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._counter.new_epoch()
        if not self._started and epoch >= self.start_epoch:
            if epoch > self.start_epoch:
                warnings.warn(
                    f"OnlineAverage: start_epoch={self.start_epoch}, but the first epoch seen "
                    f"is {epoch}; averaging starts now, after step {self._step}. To resume a "
                    "run, load() the average's saved state before fit().",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._schedule = self._template.starting_at(self._step)
            self._state = AveragingState(last_step=self._step)
            self._started = True

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        # With gradient accumulation, several batches make one step: the average is
        # updated on the batches that change the weights (advance() skips repeated steps).
        self._step = self._counter.after_batch(
            batch, self.model if self._counter.skips_steps else None
        )
        if not self._started:
            return
        self._state, decay = advance(self._schedule, self._state, self._step)
        if decay is not None:
            self._update(decay)

    def on_test_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        model = self.model
        if self.is_swapped or not self._ensure_bound(model, rebind=False):
            return  # inside swapped() (the averaged weights are in), or another model
        self.swap_in()
        self._swapped_by_hook = True

    def on_test_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._swapped_by_hook:
            self._swapped_by_hook = False
            self.swap_out()

    # predict(..., callbacks=[average]) swaps in and back out as evaluate() does.
    on_predict_begin = on_test_begin
    on_predict_end = on_test_end

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.is_swapped:
            self._swapped_by_hook = False
            self.swap_out()

    # ------------------------------------------------------------ averaging, swapping

    def _update(self, decay: float) -> None:
        self.model  # noqa: B018  (on JAX, reading the model syncs its state into the variables)
        weight = 1.0 - decay
        first = decay == 0.0 or not self._averages
        averages = []
        for index, variable in enumerate(self._variables):
            value = ops.cast(ops.stop_gradient(variable.value), self._dtypes[index])
            if first:
                averages.append(ops.copy(value))
            else:
                average = self._averages[index]
                averages.append(
                    ops.add(average, ops.multiply(ops.subtract(value, average), weight))
                )
        self._averages = averages

    def _swap_model(self, action: str) -> Any:
        return self._bound_model(action)

    def _put_average_in(self) -> list[Any]:
        backup = []
        if self._averages:
            self.model  # noqa: B018  (JAX: sync the model's state first)
            for variable, average in zip(self._variables, self._averages, strict=True):
                backup.append(ops.copy(ops.stop_gradient(variable.value)))
                # A copy, never the average itself: on JAX, compiled steps donate (free)
                # the buffers the variables hold, and the average must outlive them.
                variable.assign(ops.copy(ops.cast(average, variable.dtype)))
        return backup

    def _put_raw_back(self, backup: list[Any]) -> None:
        # The backup is empty when swapped in before any update.
        for variable, raw in zip(self._variables, backup, strict=False):
            variable.assign(raw)

    # ------------------------------------------------------------ files

    def export(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the averaged model as a normal Keras file, atomically.

        ``.weights.h5``: ``model.save_weights``; ``.keras``: ``model.save`` (the
        architecture, and the optimizer's state as it is). Written with the average
        swapped in, then swapped back.

        Args:
            path: the file to write; its suffix picks the format.
            overwrite: replace an existing file.

        Returns:
            The path written.

        Raises:
            ValueError: an unknown suffix, no model, or no update yet.
            OutputError: the file exists (without ``overwrite``) or cannot be written.
        """
        path = Path(path)
        if not path.name.endswith(EXPORT_SUFFIXES):
            raise ValueError(
                f"export writes {' or '.join(EXPORT_SUFFIXES)} files, chosen by suffix; "
                f"received {str(path)!r}."
            )
        model = self._bound_model("export()")
        if not self.updates:
            raise ValueError(
                f"the average has not started: no update step yet ({self.schedule.describe()}"
                f"{'' if self._started else f', from epoch {self.start_epoch}'}; step "
                f"{self._step}). Export after the first update step."
            )
        if path.exists() and not overwrite:
            raise OutputError(f"output {path}: exists; pass overwrite=True to replace it.")
        # Keras serializes into memory and polyak writes the bytes (a full disk is an
        # OutputError, not a crash in HDF5), renamed into place create-if-absent.
        format = "keras" if path.name.endswith(".keras") else "weights.h5"
        try:
            with atomic_output(path, overwrite=overwrite) as temporary, self.swapped():
                save_model_file(model, temporary, format)
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(f"output {path}: cannot be written ({error.strerror}).") from None
        return path

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the average and its counters to an ``.npz`` file, atomically.

        The file holds an array ``average/I/NAME`` per averaged variable, ``I`` its
        index in ``model.weights`` (the order of ``model.get_weights()``) and ``NAME``
        its name (``kernel``), in float32 (float64 for float64 variables; none before
        the first update), and ``__polyak_online__``, a JSON record of the schedule,
        the counters and those keys. Save the model beside it; it holds the raw
        weights.

        Returns:
            The path written.

        Raises:
            ValueError: the callback has not been used with a model yet.
        """
        self._bound_model("save()")
        record = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "framework": "keras",
            "buffers": self.buffers,
            "start_epoch": self.start_epoch,
            "started": self._started,
            "step": self._step,
            "progress": AveragingProgress.of(self._schedule, self._state).to_dict(),
            "names": self._names,
        }
        arrays = {_RECORD: np.array(json.dumps(record))}
        # No averages before the first update.
        for name, average in zip(self._names, self._averages, strict=False):
            arrays[_AVERAGE_PREFIX + name] = ops.convert_to_numpy(average)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(path)
        with atomic_output(path, overwrite=True) as temporary:
            temporary.write_bytes(buffer.getvalue())
        return path

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore an average saved by :meth:`save`; it takes effect when ``fit`` begins.

        Build the callback with the arguments it was saved with, load the model
        (with its optimizer, so that its step count goes on), then ``load`` and
        ``fit``: the average continues exactly as in an uninterrupted run. The file
        is checked now; its variables against the model's when ``fit`` begins.

        Raises:
            ValueError: not such a file, or saved with other arguments (now); its
                variables do not match the model's (when ``fit`` begins).
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as archive:
                record = json.loads(str(archive[_RECORD])) if _RECORD in archive else None
                arrays = {
                    key.removeprefix(_AVERAGE_PREFIX): np.array(archive[key])
                    for key in archive.files
                    if key.startswith(_AVERAGE_PREFIX)
                }
        except (OSError, ValueError) as error:
            raise ValueError(
                f"file {path}: not an OnlineAverage state saved by OnlineAverage.save() ({error})."
            ) from None
        if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
            raise ValueError(
                f"file {path}: holds no {_RECORD} record of format {STATE_FORMAT!r}; save "
                "the state with OnlineAverage.save()."
            )
        if record.get("version") != STATE_VERSION or record.get("framework") != "keras":
            raise ValueError(
                f"file {path}: an OnlineAverage state of version {record.get('version')!r} for "
                f"{record.get('framework')!r}; this callback reads version {STATE_VERSION} "
                "for 'keras'."
            )
        progress = AveragingProgress.from_dict(record["progress"])
        saved = progress.schedule
        if self.start_epoch is not None:
            # Resolved to a step when the start epoch began; the template has 0.
            saved = saved.starting_at(self._template.start_step)
        if (
            saved != self._template
            or record.get("start_epoch") != self.start_epoch
            or record.get("buffers") != self.buffers
        ):
            raise ValueError(
                f"file {path}: saved by an average with {progress.schedule}, "
                f"start_epoch={record.get('start_epoch')!r}, buffers={record.get('buffers')!r}; "
                f"this one has {self._template}, start_epoch={self.start_epoch!r}, "
                f"buffers={self.buffers!r}. Build the callback with the arguments it was saved "
                "with."
            )
        # Applied to the model fit() (or evaluate(), swapped(), save(), export()) uses next.
        self._pending = {"record": record, "progress": progress, "arrays": arrays, "path": path}

    def _restore(self, pending: Mapping[str, Any], model: Any) -> None:
        record, arrays, path = pending["record"], pending["arrays"], pending["path"]
        names = record["names"]
        if names != self._names:
            missing = [name for name in self._names if name not in names]
            unexpected = [name for name in names if name not in self._names]
            raise ValueError(
                f"file {path}: its average is of the variables {_listed(names)}; the model "
                f"averages {_listed(self._names)} (missing {_listed(missing) or 'none'}, "
                f"unexpected {_listed(unexpected) or 'none'}). Load it into the model it "
                "was saved with."
            )
        progress = pending["progress"]
        averages = []
        if progress.updates:
            variables = zip(self._names, self._variables, self._dtypes, strict=True)
            for name, variable, dtype in variables:
                array = arrays.get(name)
                if array is None or tuple(array.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"file {path}: average {name!r} has shape "
                        f"{None if array is None else tuple(array.shape)}; the variable has "
                        f"{tuple(variable.shape)}. Load it into the model it was saved with."
                    )
                averages.append(ops.convert_to_tensor(array.astype(dtype)))
        self._schedule, self._state = progress.schedule, progress.state
        self._started = bool(record["started"])
        self._step = int(record["step"])
        self._averages = averages
        iterations = optimizer_steps(model) or 0
        if iterations not in (0, self._step):
            warnings.warn(
                f"OnlineAverage: the average was saved at step {self._step}, but the model's "
                f"optimizer has taken {iterations} steps; the average's count goes on from "
                f"{self._step}. Save the model and the average at the same step.",
                RuntimeWarning,
                stacklevel=3,
            )
