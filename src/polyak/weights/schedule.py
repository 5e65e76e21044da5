"""Online averaging schedules: when to update a running average of weights, and by how much.

numpy only, public as :mod:`polyak.online` too; the steps and formulas: :class:`AveragingSchedule`.

Example:
    >>> from polyak.online import AveragingSchedule
    >>> schedule = AveragingSchedule(half_life=2000, update_every=10)
    >>> schedule.should_update(10), schedule.should_update(15)
    (True, False)
    >>> round(schedule.decay_at(step=20, updates=1, elapsed=10), 6)
    0.99654
    >>> AveragingSchedule("polyak").weights([1, 2, 3, 4]).tolist()
    [0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from polyak.checks import whole_number
from polyak.errors import ArgumentError, SchemeError
from polyak.weights.profiles import gamma_of, power_beta

__all__ = [
    "BUFFER_POLICIES",
    "MODES",
    "AveragingProgress",
    "AveragingSchedule",
    "AveragingState",
    "advance",
    "check_buffer_policy",
    "whole_or_none",
]

#: The averaging modes, and what each takes.
MODES = {
    "polyak": "no parameter (equal weights)",
    "ema": "decay=R (per step, 0 < R < 1) or half_life=H (steps, > 0)",
    "power": "sigma_rel=S (0 < S < 0.2887)",
}
#: What the adapters do with floating buffers (BatchNorm statistics, Keras'
#: non-trainable variables): average them too, or copy the raw model's.
BUFFER_POLICIES = ("average", "copy")


def _scheme_whole(value: object, name: str, minimum: int) -> int:
    """``value`` checked by :func:`polyak.checks.whole_number`, refused as a SchemeError.

    A schedule's counts are part of its scheme: callers catch ``SchemeError`` for a bad
    schedule (it is an ``ArgumentError`` too, with ``parameter`` set to ``name``).
    """
    try:
        return whole_number(value, name, minimum=minimum)
    except ArgumentError as error:
        raise SchemeError(str(error), parameter=name) from None


def whole_or_none(value: object, what: str) -> int | None:
    """A step or epoch as an int >= 0 (numpy and 0-d integer tensors too), or None.

    The rule of :func:`polyak.checks.whole_number` with ``minimum=0, or_none=True``.

    Raises:
        ArgumentError: ``value`` is neither None nor a whole number >= 0 (a ValueError).
    """
    return whole_number(value, what, minimum=0, or_none=True)


def check_buffer_policy(buffers: object, floating: str) -> None:
    """Refuse a ``buffers`` argument that is not one of :data:`BUFFER_POLICIES`.

    Args:
        buffers: the argument received.
        floating: what the framework's floating buffers are called, for the message.

    Raises:
        ValueError: naming the policies and what each does.
    """
    if buffers not in BUFFER_POLICIES:
        raise ValueError(
            f"buffers must be one of {', '.join(map(repr, BUFFER_POLICIES))} ({floating} "
            f"averaged, or taken from the raw model); received {buffers!r}."
        )


def _real(value: object) -> float | None:
    """``value`` as a finite float, or None if it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class AveragingSchedule:
    """When to update a running average of weights, and the decay of each update.

    The framework adapters (``polyak.torch.OnlineAverage``, ``polyak.keras.OnlineAverage``)
    keep, during training, one running average ``a`` of the weights ``theta`` and update it
    in place at chosen steps:

        a <- decay * a + (1 - decay) * theta.

    This module decides which steps are update steps and the ``decay`` of each update; it
    knows no framework and holds no tensors.

    Steps. ``step`` counts the training (optimizer) steps completed: the weights after the
    first step are those of step 1. Averaging starts after ``start_step``; the update
    steps are ``start_step + update_every * j`` for ``j = 1, 2, ...``, so the weights of
    step ``start_step`` itself are not averaged, and with the defaults (0 and 1) every step
    from the first is. The first update copies the weights (decay 0 in every mode); until
    then the model is its own average.

    Modes, for the ``n``-th update (``n = 1, 2, ...``) at step ``s_n``, ``d_n = s_n - s_(n-1)``
    steps after the previous update:

    - ``polyak``: the running mean of the weights at the update steps, equal weights:
      ``decay = (n - 1) / n``; after ``N`` updates every member weighs ``1 / N``.
    - ``ema``: an exponential moving average whose time scale is in steps, whatever
      ``update_every``: ``decay = r ** d_n``, ``r`` the decay per step, given directly
      (``decay=0.9999``) or as a half-life ``h`` in steps, ``r = 0.5 ** (1 / h)``, so
      ``decay = 0.5 ** (d_n / h)`` (``0.5 ** (update_every / h)`` between regular updates).
      The weights of a step weigh half as much ``h`` steps later, with ``update_every`` 1
      or 10 alike: an update that stands for the ``k`` steps since the previous one gets
      ``(1 - r ** k) r ** (T - s_n)`` at step ``T``, exactly the total weight that an
      every-step EMA gives those ``k`` steps. (Averaging every ``k`` steps with the decay
      of one step, as some tools do, stretches the time scale ``k`` times.)
    - ``power``: the power-function EMA of Karras et al. (2024) of relative width
      ``sigma_rel``, exponent ``g = polyak.weights.profiles.gamma_of(sigma_rel)``:
      ``decay = polyak.weights.profiles.power_beta(g, t, d_n) = (1 - d_n / t) ** (g + 1)`` with
      ``t = s_n - start_step``. After ``T`` unit steps from ``start_step = 0`` the weights
      of step ``tau`` weigh ``(tau ** (g + 1) - (tau - 1) ** (g + 1)) / T ** (g + 1)``: the
      profile ``(g + 1) tau^g / T^(g + 1)`` integrated over each step, its width growing
      with training (``sigma_rel * T``). Such EMAs, saved at a few steps, can be combined
      into the EMA of any other width afterwards (``polyak posthoc``).

    Every mode thus holds a weighted average of the weights at the update steps, the
    weights summing to 1; :meth:`AveragingSchedule.weights` gives them.

    Args:
        mode: ``"polyak"``, ``"ema"`` or ``"power"``; by default inferred from the
            parameters: ``decay`` or ``half_life`` -> ema, ``sigma_rel`` -> power,
            none -> polyak.
        decay: ema: the decay per training step, ``0 < decay < 1``
            (an update ``d`` steps after the previous one uses ``decay ** d``).
        half_life: ema: the number of steps after which a weight counts half as much.
        sigma_rel: power: the profile's width relative to the training length.
        start_step: averaging starts after this step (its weights are not averaged).
        update_every: update every this many steps after ``start_step``.

    Raises:
        SchemeError: an unknown mode, a parameter the mode does not take, a missing
            or out-of-range parameter.

    Example:
        >>> AveragingSchedule(decay=0.999).describe()
        'EMA, decay 0.999 per step (half-life 692.8 steps), updated every step after step 0'
    """

    mode: str | None = None
    decay: float | None = None
    half_life: float | None = None
    sigma_rel: float | None = None
    start_step: int = 0
    update_every: int = 1
    gamma: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = {
            name: value
            for name, value in (
                ("decay", self.decay),
                ("half_life", self.half_life),
                ("sigma_rel", self.sigma_rel),
            )
            if value is not None
        }
        mode = self.mode
        if mode is None:
            mode = "power" if "sigma_rel" in given else "ema" if given else "polyak"
        if mode not in MODES:
            raise SchemeError(
                f"mode must be one of {', '.join(map(repr, MODES))}; received {mode!r}."
            )
        takes = {"polyak": set(), "ema": {"decay", "half_life"}, "power": {"sigma_rel"}}[mode]
        extra = sorted(set(given) - takes)
        if extra:
            raise SchemeError(
                f"mode {mode!r} takes {MODES[mode]}; received {', '.join(extra)}="
                f"{', '.join(repr(given[name]) for name in extra)}. Drop it, or choose the "
                "mode that takes it."
            )
        if mode == "ema":
            if len(given) != 1:
                raise SchemeError(
                    "mode 'ema' takes decay=R (per step) or half_life=H (in steps), exactly "
                    f"one of them; received {given or 'neither'}."
                )
            if self.decay is not None:
                decay = _real(self.decay)
                if decay is None or not 0 < decay < 1:
                    raise SchemeError(
                        f"decay must be a number with 0 < decay < 1 (per step; 0.999 to "
                        f"0.9999 are usual); received {self.decay!r}."
                    )
                object.__setattr__(self, "decay", decay)
            else:
                half_life = _real(self.half_life)
                if half_life is None or half_life <= 0:
                    raise SchemeError(
                        f"half_life must be a finite number of steps > 0; received "
                        f"{self.half_life!r}."
                    )
                object.__setattr__(self, "half_life", half_life)
        if mode == "power":
            if self.sigma_rel is None:
                raise SchemeError(
                    "mode 'power' needs sigma_rel=S, the profile's width relative to the "
                    "training length (0.05 to 0.2 are usual); received none."
                )
            object.__setattr__(self, "gamma", gamma_of(self.sigma_rel))
            object.__setattr__(self, "sigma_rel", float(self.sigma_rel))
        object.__setattr__(self, "mode", mode)
        start_step = _scheme_whole(self.start_step, "start_step", 0)
        update_every = _scheme_whole(self.update_every, "update_every", 1)
        object.__setattr__(self, "start_step", start_step)
        object.__setattr__(self, "update_every", update_every)

    # ------------------------------------------------------------ the schedule

    @property
    def decay_per_step(self) -> float | None:
        """ema: the decay per training step ``r`` (from ``decay`` or ``half_life``)."""
        if self.mode != "ema":
            return None
        if self.decay is not None:
            return self.decay
        return 0.5 ** (1.0 / self.half_life)

    def updates_until(self, step: int) -> int:
        """How many update steps there are up to ``step`` (included)."""
        return max(0, (int(step) - self.start_step) // self.update_every)

    def should_update(self, step: int, previous_step: int | None = None) -> bool:
        """Whether the steps after ``previous_step`` up to ``step`` include an update step.

        Args:
            step: the training steps completed now.
            previous_step: the step of the previous call; by default ``step - 1``,
                i.e. whether ``step`` itself is an update step. Give it when steps
                arrive in jumps (several batches per call), so that none is missed.

        Example:
            >>> schedule = AveragingSchedule(start_step=100, update_every=10)
            >>> [s for s in range(95, 131) if schedule.should_update(s)]
            [110, 120, 130]
            >>> schedule.should_update(112, previous_step=108)
            True
        """
        previous = int(step) - 1 if previous_step is None else int(previous_step)
        return self.updates_until(step) > self.updates_until(previous)

    def decay_at(self, step: int, updates: int, elapsed: int) -> float:
        """The decay of an update at ``step``.

        Args:
            step: the update's step.
            updates: the number of updates made before this one (0: this is the first).
            elapsed: the steps since the previous update (ignored for the first).

        Returns:
            ``decay`` in ``[0, 1)``: ``a <- decay * a + (1 - decay) * theta``; 0 for the
            first update, which copies the weights.

        Raises:
            SchemeError: ``elapsed`` < 1, or (power) the step not after ``start_step``.
        """
        if updates == 0:
            return 0.0
        if self.mode == "polyak":
            return updates / (updates + 1)
        if elapsed < 1:
            raise SchemeError(
                f"an update needs at least one step since the previous one; received "
                f"elapsed={elapsed} at step {step}."
            )
        if self.mode == "ema":
            if self.decay is not None:
                return self.decay**elapsed
            return 0.5 ** (elapsed / self.half_life)
        return power_beta(self.gamma, step - self.start_step, elapsed)

    def weights(self, update_steps: Sequence[int]) -> np.ndarray:
        """The weight of each update step's weights in the average after the last of them.

        ``w_n = (1 - decay_n) * prod_{m > n} decay_m`` in float64, summing to 1.

        Args:
            update_steps: the steps of the updates, strictly increasing.

        Returns:
            One weight per update step, in the same order.

        Example:
            >>> AveragingSchedule(half_life=1).weights([1, 2, 3]).tolist()
            [0.25, 0.25, 0.5]
        """
        steps = [int(step) for step in update_steps]
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise SchemeError(f"update steps must increase strictly; received {steps}.")
        weights = np.zeros(len(steps))
        for n, step in enumerate(steps):
            elapsed = step - steps[n - 1] if n else step - self.start_step
            decay = self.decay_at(step, n, elapsed)
            weights *= decay
            weights[n] = 1.0 - decay
        return weights

    # ------------------------------------------------------------ description, state

    def describe(self) -> str:
        """One line for logs: the mode, its parameters and the update steps."""
        every = "every step" if self.update_every == 1 else f"every {self.update_every} steps"
        when = f"updated {every} after step {self.start_step}"
        if self.mode == "polyak":
            return f"Polyak running mean (equal weights), {when}"
        if self.mode == "power":
            return f"power EMA, sigma_rel {self.sigma_rel:g} (gamma {self.gamma:.4g}), {when}"
        rate = self.decay_per_step
        half_life = math.log(0.5) / math.log(rate)
        if self.decay is not None:
            what = f"decay {self.decay:g} per step (half-life {half_life:.1f} steps)"
        else:
            what = f"half-life {self.half_life:g} steps (decay {rate:.6g} per step)"
        if self.update_every > 1:
            what += f", {rate**self.update_every:.6g} per update"
        return f"EMA, {what}, {when}"

    def to_dict(self) -> dict[str, Any]:
        """The schedule as JSON-ready values (saved with an average's state)."""
        return {
            "mode": self.mode,
            "decay": self.decay,
            "half_life": self.half_life,
            "sigma_rel": self.sigma_rel,
            "start_step": self.start_step,
            "update_every": self.update_every,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AveragingSchedule:
        """The schedule :meth:`to_dict` described."""
        names = ("mode", "decay", "half_life", "sigma_rel", "start_step", "update_every")
        if not isinstance(values, Mapping) or set(values) != set(names):
            raise SchemeError(
                f"an averaging schedule is saved as a mapping with the keys {list(names)}; "
                f"received {values!r}."
            )
        return cls(**{name: values[name] for name in names})

    def starting_at(self, start_step: int) -> AveragingSchedule:
        """The same schedule with averaging starting after ``start_step``."""
        return replace(self, start_step=start_step)


@dataclass(frozen=True)
class AveragingState:
    """Where a running average stands, as an immutable record: the steps seen, the updates made.

    :func:`advance` takes one and returns the next; nothing changes it in place (the
    shape optax gives its states). The framework averages keep the state beside their
    tensors and save it with them (:meth:`AveragingProgress.to_dict`).

    Attributes:
        last_step: the last step :func:`advance` was given, or None.
        updates: the updates made so far.
        last_update_step: the step of the last update, or None.
    """

    last_step: int | None = None
    updates: int = 0
    last_update_step: int | None = None

    def next_step(self) -> int:
        """The step after the last one seen (1 when none was)."""
        return 1 if self.last_step is None else self.last_step + 1


def advance(
    schedule: AveragingSchedule, state: AveragingState, step: int
) -> tuple[AveragingState, float | None]:
    """The state after training reached ``step``, and the decay to update with (None: no update).

    A pure function: ``state`` is not changed, and the same arguments give the same
    result. With ``p`` the state's last step (``step - 1`` when None), ``n`` its
    updates and ``u`` its last update step (``start_step`` when None), ``step`` is an
    update when an update step ``start_step + update_every * j`` (``j >= 1``) lies in
    ``(p, step]``; then, with ``d = step - u``, the decay is
    :meth:`AveragingSchedule.decay_at` ``(step, n, d)``:

    - the first update (``n = 0``): ``0``, the average copies the weights;
    - ``polyak``: ``n / (n + 1)``;
    - ``ema``: ``r ** d``, ``r`` the decay per step;
    - ``power``: ``(1 - d / t) ** (gamma + 1)``, ``t = step - start_step``;

    and the new state has ``updates = n + 1`` and ``last_update_step = step``. The
    average then moves as ``a <- decay * a + (1 - decay) * theta``. A step equal to the
    last one (several batches per optimizer step) is no new step: no update.

    Args:
        schedule: the averaging schedule.
        state: where the average stands.
        step: the training steps completed now.

    Returns:
        ``(new_state, decay)``, ``decay`` None when ``step`` is not an update.

    Raises:
        ArgumentError: ``step`` is not a whole number >= 0 (a ValueError).
        ValueError: ``step`` is below the state's last step.

    Example:
        >>> schedule = AveragingSchedule("polyak", update_every=2)
        >>> state = AveragingState()
        >>> for step in (1, 2, 3, 4):
        ...     state, decay = advance(schedule, state, step)
        ...     print(step, decay)
        1 None
        2 0.0
        3 None
        4 0.5
        >>> state
        AveragingState(last_step=4, updates=2, last_update_step=4)
    """
    step = whole_number(step, "step")
    previous = state.last_step
    if previous is not None and step < previous:
        raise ValueError(
            f"steps must not decrease; received step {step} after step {previous}. Pass "
            "the global step count (optimizer steps taken), and after resuming load the "
            "average's saved state before training on."
        )
    if not schedule.should_update(step, previous):
        return replace(state, last_step=step), None
    since = state.last_update_step
    elapsed = step - (schedule.start_step if since is None else since)
    decay = schedule.decay_at(step, state.updates, elapsed)
    return AveragingState(step, state.updates + 1, step), decay


@dataclass
class AveragingProgress:
    """A schedule and its :class:`AveragingState` in one object that advances in place.

    A convenience over :func:`advance` for a caller that keeps one object (the
    framework averages keep the schedule and the immutable state instead), and the
    saved form of both: :meth:`to_dict` is what an average saves, :meth:`from_dict`
    reads it back.

    Attributes:
        schedule: the averaging schedule.
        last_step: the last step :meth:`advance` was given, or None.
        updates: the updates made so far.
        last_update_step: the step of the last update, or None.

    Example:
        >>> progress = AveragingProgress(AveragingSchedule("polyak", update_every=2))
        >>> [progress.advance(step) for step in range(1, 7)]
        [None, 0.0, None, 0.5, None, 0.6666666666666666]
    """

    schedule: AveragingSchedule
    last_step: int | None = None
    updates: int = 0
    last_update_step: int | None = None

    @classmethod
    def of(cls, schedule: AveragingSchedule, state: AveragingState) -> AveragingProgress:
        """The progress of ``schedule`` standing at ``state``."""
        return cls(schedule, state.last_step, state.updates, state.last_update_step)

    @property
    def state(self) -> AveragingState:
        """Where the average stands, as the immutable record :func:`advance` takes."""
        return AveragingState(self.last_step, self.updates, self.last_update_step)

    def next_step(self) -> int:
        """The step after the last one seen (1 when none was)."""
        return self.state.next_step()

    def advance(self, step: int) -> float | None:
        """Record that training reached ``step``; the decay to update with, or None.

        :func:`advance`, keeping the new state in this object.

        Raises:
            ValueError: ``step`` is not a whole number >= 0 or is below the last step.
        """
        state, decay = advance(self.schedule, self.state, step)
        self.last_step, self.updates, self.last_update_step = (
            state.last_step,
            state.updates,
            state.last_update_step,
        )
        return decay

    def to_dict(self) -> dict[str, Any]:
        """The counters and the schedule as JSON-ready values."""
        return {
            "schedule": self.schedule.to_dict(),
            "last_step": self.last_step,
            "updates": self.updates,
            "last_update_step": self.last_update_step,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AveragingProgress:
        """The progress :meth:`to_dict` described."""
        names = {"schedule", "last_step", "updates", "last_update_step"}
        if not isinstance(values, Mapping) or set(values) != names:
            raise SchemeError(
                f"an average's progress is saved as a mapping with the keys {sorted(names)}; "
                f"received {values!r}."
            )
        last_step, last_update = values["last_step"], values["last_update_step"]
        return cls(
            AveragingSchedule.from_dict(values["schedule"]),
            None if last_step is None else _scheme_whole(last_step, "last_step", 0),
            _scheme_whole(values["updates"], "updates", 0),
            None if last_update is None else _scheme_whole(last_update, "last_update_step", 0),
        )
