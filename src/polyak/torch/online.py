"""``OnlineAverage``: a running average of a PyTorch model's weights, kept while it trains.

Policy (what is averaged, in what precision) and resuming: :class:`OnlineAverage`.

Example:
    >>> import torch
    >>> from polyak.torch import OnlineAverage
    >>> model = torch.nn.Linear(2, 1)
    >>> average = OnlineAverage(model, half_life=100)
    >>> for step in range(1, 301):  # doctest: +SKIP
    ...     train_one_step(model)
    ...     average.update(step)
    >>> with average.swapped():  # doctest: +SKIP
    ...     evaluate(model)
    >>> checkpoint = {"model": model.state_dict(), "average": average.state_dict()}
    >>> torch.save(checkpoint, "checkpoint.pt")  # doctest: +SKIP
    >>> average.export("averaged.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyak.errors import OutputError, require
from polyak.files import atomic_output
from polyak.online import SwappableAverage
from polyak.torch.saving import save_state_dict
from polyak.weights.schedule import (
    BUFFER_POLICIES,
    AveragingProgress,
    AveragingSchedule,
    AveragingState,
    advance,
    check_buffer_policy,
)

torch = require("torch", "torch", "polyak.torch")

__all__ = ["BUFFER_POLICIES", "EXPORT_FORMATS", "STATE_KEY", "OnlineAverage"]

#: The key under which to save an average's state in a checkpoint dict.
STATE_KEY = "polyak_online_average"
#: What :meth:`OnlineAverage.state_dict` says it is, and its layout's version.
STATE_FORMAT = "polyak-online-average"
STATE_VERSION = 1
#: What to do with floating buffers.
#: The file suffixes :meth:`OnlineAverage.export` writes, and the format of each.
EXPORT_FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}
_MAX_LISTED = 5


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.complex128 if dtype == torch.complex128 else torch.complex64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _listed(names: list[str]) -> str:
    shown = ", ".join(map(repr, names[:_MAX_LISTED]))
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


@dataclass
class _Entry:
    """One averaged tensor: its state-dict names (several if tied), where it lives, its average."""

    names: tuple[str, ...]
    module: torch.nn.Module
    attribute: str
    average: torch.Tensor

    def current(self) -> torch.Tensor:
        return getattr(self.module, self.attribute)


class OnlineAverage(SwappableAverage):
    """A running average of a model's weights, updated in place during training.

    Call :meth:`update` after each optimizer step; evaluate with the averaged weights
    inside :meth:`swapped`. The schedules (Polyak running mean, EMA by decay or
    half-life, power-function EMA) and their formulas are those of
    :class:`polyak.online.AveragingSchedule`: the average is
    ``a <- decay * a + (1 - decay) * theta`` at the update steps
    ``start_step + update_every * j``, the first update copying the weights.

    What is averaged, and how (the numeric policy):

    - Floating parameters, and floating buffers by default (``buffers="average"``):
      BatchNorm's running mean and variance are averaged with the same weights as the
      parameters, so the averaged model is, tensor for tensor, the weighted average of
      the model's states at the update steps, which is what ``polyak.average`` computes
      from snapshots (it averages every float tensor); timm's ``ModelEmaV3`` and torch's
      ``AveragedModel(use_buffers=True)`` EMA recipe do the same. Neither these nor the
      raw model's statistics are exact for averaged weights (the raw ones follow the last
      few batches of the raw weights); :func:`polyak.torch.recalibrate_batchnorm`
      recomputes them. ``buffers="copy"`` leaves floating buffers out: the averaged model
      then uses the raw model's (``AveragedModel``'s default, and Keras' ``use_ema``).
    - Integer and bool buffers (``num_batches_tracked``) are never averaged: the averaged
      model uses the raw model's. So do non-tensor and tensor extra state.
    - The average of each tensor lives on the tensor's device in float32 (float64 for
      float64 tensors, complex64/complex128 for complex ones), whatever the model's dtype:
      an fp16 or bf16 model's average moves by ``(1 - decay) * (theta - a)`` however small,
      where a bf16 average with a decay of 0.9999 would round every update away. Updates
      are in place (``lerp_``; ``sub_``, ``mul_``, ``add_`` for a lower-precision model),
      with no allocation per step. Swapping in rounds the average to the model's dtype (to
      nearest); swapping out restores the raw tensors bit for bit.
    - Tied weights (one parameter under two names) are averaged once.

    The model's tensors are looked up by name on every update, so moving the model to
    another device (``model.to``) after building the average is fine: the average
    follows at the next update.

    Saving and resuming: the model's ``state_dict()`` always holds the raw weights (never
    save while swapped in), and :meth:`OnlineAverage.state_dict` holds the average and
    its counters; save both, under explicit keys (:data:`STATE_KEY` for the average's),
    and after loading the model call :meth:`OnlineAverage.load_state_dict` on a new
    average built with the same arguments; training then continues exactly where it
    stopped. :meth:`OnlineAverage.export` writes the averaged model as a normal model
    file.

    ``polyak.lightning.OnlineAverageCallback`` wraps it for Lightning: built when ``fit``
    starts (a state Lightning restored from a checkpoint before that is applied then),
    ``update(trainer.global_step)`` in ``on_train_batch_end``, ``swap_in()``/``swap_out()``
    around validation, test and predict (with :meth:`OnlineAverage.raw_tensors` put into
    the module's ``state_dict()`` meanwhile, so that checkpoints hold the raw weights), and
    its ``state_dict()`` as the callback's state in the ``.ckpt``.

    Swapping it into the model (:meth:`swap_in`, :meth:`swap_out`, :meth:`swapped`)
    follows :class:`polyak.online.SwappableAverage`.

    Args:
        model: the ``torch.nn.Module`` being trained.
        mode: ``"polyak"`` (running mean, equal weights), ``"ema"`` or ``"power"``;
            by default inferred: ``decay``/``half_life`` -> ema, ``sigma_rel`` ->
            power, none -> polyak. Formulas: :class:`polyak.online.AveragingSchedule`.
        decay: ema: the decay per step (an update after ``d`` steps uses ``decay**d``).
        half_life: ema: the steps after which a weight counts half; the same time
            scale whatever ``update_every``.
        sigma_rel: power: the width of the power-function EMA profile.
        start_step: averaging starts after this step.
        update_every: update every this many steps.
        buffers: ``"average"`` (default) to average floating buffers (BatchNorm
            statistics) too, ``"copy"`` to use the raw model's. Integer and bool
            buffers are always the raw model's.

    Attributes:
        model: the model.
        schedule: the :class:`polyak.online.AveragingSchedule`.
        buffers: the floating-buffer policy.

    Raises:
        SchemeError: the mode and its parameters do not fit (see
            :class:`polyak.online.AveragingSchedule`).
        ValueError: ``model`` is not a module or has no floating tensors, or
            ``buffers`` is unknown.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4))
        >>> average = OnlineAverage(model, mode="power", sigma_rel=0.1)
        >>> average.averaged_names
        ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var']
        >>> average.update(1), average.updates
        (True, 1)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode: str | None = None,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        sigma_rel: float | None = None,
        start_step: int = 0,
        update_every: int = 1,
        buffers: str = "average",
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"model must be a torch.nn.Module; received {type(model).__name__}. Pass the "
                "module being trained."
            )
        check_buffer_policy(buffers, "floating buffers")
        self.schedule = AveragingSchedule(
            mode,
            decay=decay,
            half_life=half_life,
            sigma_rel=sigma_rel,
            start_step=start_step,
            update_every=update_every,
        )
        self.model = model
        self.buffers = buffers
        self._state = AveragingState()
        self._entries = self._find_entries()

    def _find_entries(self) -> list[_Entry]:
        entries: dict[int, _Entry] = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            if not isinstance(value, torch.Tensor):
                continue
            path, _, attribute = name.rpartition(".")
            try:
                module = self.model.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"state dict entry {name!r} names no submodule of the model (a state-dict "
                    "hook renames it); OnlineAverage finds each tensor by its state-dict name. "
                    "Pass the module whose state_dict() names its own tensors."
                ) from None
            is_parameter = attribute in dict(module.named_parameters(recurse=False))
            is_buffer = attribute in dict(module.named_buffers(recurse=False))
            if not (is_parameter or is_buffer):
                continue  # a tensor returned by get_extra_state(): the raw model's
            if not (value.is_floating_point() or value.is_complex()):
                continue  # integer and bool buffers: the raw model's, never averaged
            if is_buffer and self.buffers == "copy":
                continue
            entry = entries.get(id(value))
            if entry is not None:
                entry.names += (name,)
                continue
            average = torch.empty_like(value, dtype=_accumulator_dtype(value.dtype))
            with torch.no_grad():
                average.copy_(value)
            entries[id(value)] = _Entry((name,), module, attribute, average)
        if not entries:
            raise ValueError(
                "the model has no floating parameters or buffers to average; received "
                f"{type(self.model).__name__} with state dict entries "
                f"{_listed(list(self.model.state_dict()))}."
            )
        return list(entries.values())

    # ------------------------------------------------------------ state

    @property
    def updates(self) -> int:
        """The updates made so far (0: the average has not started)."""
        return self._state.updates

    @property
    def last_step(self) -> int | None:
        """The last step :meth:`update` was given, or None."""
        return self._state.last_step

    @property
    def averaged_names(self) -> list[str]:
        """The state-dict names of the averaged tensors, in state-dict order."""
        return [name for entry in self._entries for name in entry.names]

    def __repr__(self) -> str:
        return (
            f"OnlineAverage({self.schedule.describe()}; {self.updates} updates, "
            f"{len(self._entries)} tensors)"
        )

    # ------------------------------------------------------------ updating

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Update the average if ``step`` is an update step; call after each optimizer step.

        ``a <- decay * a + (1 - decay) * theta`` in the average's precision, in place;
        the first update copies the weights.

        Args:
            step: the optimizer steps taken so far (1 after the first); by default the
                previous call's step plus one. A step equal to the previous one (several
                batches per optimizer step) does not update again.

        Returns:
            Whether the average was updated.

        Raises:
            ValueError: ``step`` decreases, or a tensor changed shape.
            RuntimeError: the averaged weights are swapped in.
        """
        if self.is_swapped:
            raise RuntimeError(
                "update() while the averaged weights are swapped in would average them into "
                "themselves; update after the swapped() block (or swap_out()) ends."
            )
        step = self._state.next_step() if step is None else step
        self._state, decay = advance(self.schedule, self._state, step)
        if decay is None:
            return False
        for entry in self._entries:
            current = entry.current()
            average = entry.average
            if average.shape != current.shape:
                raise ValueError(
                    f"tensor {entry.names[0]!r} has shape {tuple(current.shape)} now; the "
                    f"average has {tuple(average.shape)}. Build a new OnlineAverage after "
                    "changing the model."
                )
            if average.device != current.device:
                # The model moved (model.to(device)); the average follows it once.
                average = entry.average = average.to(current.device)
            if decay == 0.0:
                average.copy_(current)
            elif average.dtype == current.dtype:
                average.lerp_(current, 1.0 - decay)
            else:
                # lerp_ needs one dtype. theta + decay * (a - theta), in place, reading the
                # bf16/fp16 tensor as it is: one rounding at the size of a, and a == theta
                # stays exactly theta.
                average.sub_(current).mul_(decay).add_(current)
        return True

    # ------------------------------------------------------------ swapping

    def _swap_model(self, action: str) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def _put_average_in(self) -> list[torch.Tensor]:
        # Each average rounded to its tensor's dtype (to nearest) by copy_.
        backup = []
        if self.updates:
            for entry in self._entries:
                current = entry.current()
                backup.append(current.detach().clone())
                current.copy_(entry.average)
        return backup

    @torch.no_grad()
    def _put_raw_back(self, backup: list[torch.Tensor]) -> None:
        # The backup is empty when swapped in before any update.
        for entry, raw in zip(self._entries, backup, strict=False):
            entry.current().copy_(raw)

    # ------------------------------------------------------------ the averaged model

    def raw_tensors(self) -> dict[str, torch.Tensor]:
        """The raw values of the averaged tensors, by state-dict name (tied ones under each).

        While the average is swapped in, the copies of the raw tensors it keeps (do not
        modify them); otherwise the model's own tensors, detached. A state-dict hook can
        put them in place of the averaged ones, so that a checkpoint saved while the
        average is swapped in still holds the raw weights (the Lightning callback does).

        Example:
            >>> average = OnlineAverage(torch.nn.Linear(2, 1))
            >>> sorted(average.raw_tensors())
            ['bias', 'weight']
        """
        if self._backup:
            pairs = zip(self._entries, self._backup, strict=True)
            return {name: raw for entry, raw in pairs for name in entry.names}
        return {name: entry.current().detach() for entry in self._entries for name in entry.names}

    @torch.no_grad()
    def averaged_state_dict(self) -> OrderedDict[str, Any]:
        """A copy of the model's state dict with the averaged tensors in it.

        Averaged tensors are rounded to their dtype; integer buffers (and floating
        ones with ``buffers="copy"``) are copies of the raw model's. Before the first
        update, a copy of the raw state dict. It loads with
        ``load_state_dict(strict=True)``.
        """
        state = self.model.state_dict()
        averaged: dict[str, torch.Tensor] = {}
        if self.updates:
            for entry in self._entries:
                current = entry.current()
                tensor = entry.average.to(device=current.device, dtype=current.dtype, copy=True)
                averaged.update(dict.fromkeys(entry.names, tensor))
        result: OrderedDict[str, Any] = OrderedDict()
        for name, value in state.items():
            if name in averaged:
                result[name] = averaged[name]
            else:
                result[name] = value.clone() if isinstance(value, torch.Tensor) else value
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            result._metadata = metadata  # type: ignore[attr-defined]
        return result

    def export(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the averaged model as a normal model file, atomically.

        The file holds :meth:`averaged_state_dict`: safetensors for ``.safetensors``,
        ``torch.save`` for ``.pt``/``.pth`` (see :func:`polyak.torch.save_state_dict`),
        and loads into the same architecture with ``load_state_dict(strict=True)``.

        Args:
            path: the file to write; its suffix picks the format.
            overwrite: replace an existing file.

        Returns:
            The path written.

        Raises:
            ValueError: an unknown suffix, or no update yet.
            OutputError: the file exists (without ``overwrite``) or cannot be written.
        """
        path = Path(path)
        format = EXPORT_FORMATS.get(path.suffix)
        if format is None:
            raise ValueError(
                f"export writes {', '.join(EXPORT_FORMATS)} files, chosen by suffix; received "
                f"{str(path)!r}."
            )
        if not self.updates:
            raise ValueError(
                f"the average has not started: no update step yet ({self.schedule.describe()}; "
                f"last step seen: {self.last_step}). Export after the first update step."
            )
        if path.exists() and not overwrite:
            raise OutputError(f"output {path}: exists; pass overwrite=True to replace it.")
        state = self.averaged_state_dict()
        with atomic_output(path, overwrite=overwrite) as temporary:
            save_state_dict(state, temporary, format)
        return path

    # ------------------------------------------------------------ saving and resuming

    def state_dict(self) -> dict[str, Any]:
        """The average and its counters, to save beside the model's state dict.

        Returns:
            ``{"format": "polyak-online-average", "version": 1, "buffers": ...,
            "progress": {"schedule": {...}, "last_step": ..., "updates": ...,
            "last_update_step": ...}, "average": {name: tensor}}``: plain values and
            the average's own tensors (not copies, as ``Module.state_dict()``), which
            ``torch.save`` and ``torch.load(weights_only=True)`` handle. Save it under
            an explicit key, e.g. :data:`STATE_KEY`.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "buffers": self.buffers,
            "progress": AveragingProgress.of(self.schedule, self._state).to_dict(),
            "average": {name: entry.average for entry in self._entries for name in entry.names},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the average and its counters saved by :meth:`state_dict`.

        Build the average with the same arguments, for the same model (its raw
        weights loaded), then call this; :meth:`update` continues from the saved step.

        Raises:
            ValueError: ``state`` is not such a state, was saved with another schedule
                or buffer policy, or its tensors do not match the model's.
            RuntimeError: the averaged weights are swapped in.
        """
        if self.is_swapped:
            raise RuntimeError("load_state_dict() while swapped in; call swap_out() first.")
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                "expected the state of an OnlineAverage (a mapping with format "
                f"{STATE_FORMAT!r}, from OnlineAverage.state_dict()); received "
                f"{type(state).__name__} with format "
                f"{state.get('format') if isinstance(state, Mapping) else None!r}."
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"this polyak reads OnlineAverage states of version {STATE_VERSION}; received "
                f"version {state.get('version')!r}. Use the polyak that saved it."
            )
        progress = AveragingProgress.from_dict(state.get("progress"))
        if progress.schedule != self.schedule or state.get("buffers") != self.buffers:
            raise ValueError(
                f"the state was saved by an average with {progress.schedule} and "
                f"buffers={state.get('buffers')!r}; this one has {self.schedule} and "
                f"buffers={self.buffers!r}. Build the average with the arguments it was saved "
                "with."
            )
        tensors = state.get("average")
        if not isinstance(tensors, Mapping):
            raise ValueError(
                f"the state's 'average' must map names to tensors; received "
                f"{type(tensors).__name__}."
            )
        expected = self.averaged_names
        missing = [name for name in expected if name not in tensors]
        unexpected = [name for name in tensors if name not in set(expected)]
        if missing or unexpected:
            raise ValueError(
                "the saved average does not match the model's tensors: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {_listed(missing)}" if missing else "",
                        f"unexpected {_listed(unexpected)}" if unexpected else "",
                    )
                    if part
                )
                + ". Load it into the model it was saved with."
            )
        for entry in self._entries:
            saved = tensors[entry.names[0]]
            if not isinstance(saved, torch.Tensor) or saved.shape != entry.average.shape:
                shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else None
                raise ValueError(
                    f"saved average {entry.names[0]!r} has shape {shape}; the model's tensor "
                    f"has {tuple(entry.average.shape)}. Load it into the model it was saved "
                    "with."
                )
        for entry in self._entries:
            entry.average.copy_(tensors[entry.names[0]])
        self._state = progress.state
