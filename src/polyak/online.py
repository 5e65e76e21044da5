"""Online averaging without a framework: the schedules, and the swap both framework averages make.

The public name of :mod:`polyak.weights.schedule`, and :class:`SwappableAverage`.

Example:
    >>> from polyak.online import AveragingSchedule
    >>> AveragingSchedule("polyak").weights([1, 2, 3, 4]).tolist()
    [0.25, 0.25, 0.25, 0.25]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from polyak.weights.schedule import (
    BUFFER_POLICIES,
    MODES,
    AveragingProgress,
    AveragingSchedule,
    AveragingState,
    advance,
    check_buffer_policy,
    whole_or_none,
)

__all__ = [
    "BUFFER_POLICIES",
    "MODES",
    "AveragingProgress",
    "AveragingSchedule",
    "AveragingState",
    "SwappableAverage",
    "advance",
    "check_buffer_policy",
    "whole_or_none",
]


class SwappableAverage:
    """Swapping a running average into its model and the raw weights back, for any framework.

    ``polyak.torch.OnlineAverage`` and ``polyak.keras.OnlineAverage`` both keep, while
    the average is swapped in, a backup of the raw values (empty before the first
    update, when the model is its own average), refuse to swap twice or to swap out
    what is not in, and offer :meth:`swapped`. They differ only in how a tensor is
    copied and assigned, which each gives as three methods:

    - ``_swap_model(action)``: the model the average belongs to (or raise, naming
      ``action``);
    - ``_put_average_in()``: put the averages into the model and return the backup of
      the raw values it replaced;
    - ``_put_raw_back(backup)``: assign the backup's raw values again, exactly.
    """

    _backup: list[Any] | None = None

    @property
    def is_swapped(self) -> bool:
        """Whether the averaged weights are in the model now."""
        return self._backup is not None

    def swap_in(self) -> None:
        """Put the averaged weights into the model, keeping a copy of the raw ones.

        Each average is rounded to its tensor's dtype. Before the first update the
        model is its own average and nothing changes. Prefer :meth:`swapped`, which
        also swaps back on an error.

        Raises:
            RuntimeError: they are already swapped in.
        """
        if self.is_swapped:
            raise RuntimeError(
                "the averaged weights are already swapped in; call swap_out() first."
            )
        self._backup = self._put_average_in()

    def swap_out(self) -> None:
        """Put the raw weights back into the model, bit for bit.

        Raises:
            RuntimeError: the averaged weights are not swapped in.
        """
        if self._backup is None:
            raise RuntimeError(
                "the averaged weights are not swapped in; swap_out() follows swap_in()."
            )
        self._put_raw_back(self._backup)
        self._backup = None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[Any]:
        """The model with the averaged weights in it, the raw ones back on exit (also on error).

        Inside an enclosing ``swapped()`` block, does nothing (the outer block swaps back).

        Example:
            >>> with average.swapped() as averaged_model:  # doctest: +SKIP
            ...     accuracy = evaluate(averaged_model)
        """
        model = self._swap_model("swapped()")
        if self.is_swapped:
            yield model
            return
        self.swap_in()
        try:
            yield model
        finally:
            self.swap_out()

    def _swap_model(self, action: str) -> Any:
        raise NotImplementedError

    def _put_average_in(self) -> list[Any]:
        raise NotImplementedError

    def _put_raw_back(self, backup: list[Any]) -> None:
        raise NotImplementedError
