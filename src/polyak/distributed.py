"""Running under torchrun: the process group polyak uses, and nothing of its own.

``torchrun --nproc_per_node=P -m polyak average|sweep ...`` starts P processes with
torch's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...). The command line
initializes torch's default process group from it (:func:`init_from_environment`):
gloo on CPUs, and gloo for CPU tensors with nccl for CUDA tensors when torch sees a
GPU. A plain ``polyak`` call has no such environment and never imports torch here.

The engine and the sweep take a :class:`ProcessGroup` (``group=``); by default
:func:`current` gives the initialized default group when there are several
processes, else None, and they run as one process. Collectives carry small Python
objects (plans, scores, error messages) except where noted.

Example:
    >>> from polyak.distributed import current
    >>> current() is None  # a plain process  # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from polyak.errors import PolyakError, require

__all__ = [
    "DistributedError",
    "ProcessGroup",
    "checked_together",
    "current",
    "init_from_environment",
    "launched_by_torchrun",
    "shut_down",
    "split_by_cost",
]


class DistributedError(PolyakError, RuntimeError):
    """Another process of the group failed; its message says which and why."""


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or alike) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_environment() -> ProcessGroup | None:
    """Initialize torch's default process group from torchrun's environment, once.

    Returns:
        The group, or None in a plain process (no torch import then).
    """
    if not launched_by_torchrun():
        return None
    torch = require("torch", "torch", "running under torchrun")
    distributed = torch.distributed
    if not distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        distributed.init_process_group(backend=backend)
    return current()


def shut_down(*, clean: bool) -> None:
    """Leave torch's default process group before the process exits.

    Without this, gloo's threads outlive the interpreter's shutdown and the process
    can abort ("terminate called without an active exception").

    Args:
        clean: the command finished normally in this process: wait for the others
            first (a failed process may have left them mid-collective: do not wait).
    """
    try:
        import torch.distributed as distributed
    except ImportError:  # pragma: no cover - a group implies torch
        return
    if not distributed.is_available() or not distributed.is_initialized():
        return
    try:
        if clean:
            distributed.barrier()
    finally:
        distributed.destroy_process_group()


@contextlib.contextmanager
def checked_together(group: ProcessGroup | None) -> Iterator[None]:
    """Run a block of checks on every process of ``group``; go on only if all passed.

    An error in the block on any process is told to every process, and each raises
    it: the processes refuse together, none waits for another. Without a group (a
    plain process) the block just runs.

    Example:
        >>> with checked_together(current()):  # doctest: +SKIP
        ...     members = find_checkpoints(paths)
    """
    try:
        yield
    except BaseException as error:
        if group is not None:
            group.check(error)  # every process learns of it, then this one raises it
        raise
    if group is not None:
        group.check(None)


def current() -> ProcessGroup | None:
    """The default process group when torch's is initialized with several processes."""
    if not launched_by_torchrun():
        return None
    try:
        import torch.distributed as distributed
    except ImportError:  # pragma: no cover - torchrun implies torch
        return None
    if not distributed.is_available() or not distributed.is_initialized():
        return None
    if distributed.get_world_size() < 2:
        return None
    return ProcessGroup()


class ProcessGroup:
    """torch's default process group, as the few collectives polyak needs."""

    def __init__(self) -> None:
        import torch.distributed as distributed

        self._distributed = distributed
        self.rank: int = distributed.get_rank()
        self.size: int = distributed.get_world_size()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that commits outputs and writes reports."""
        return self.rank == 0

    def barrier(self) -> None:
        self._distributed.barrier()

    def broadcast(self, value: Any, source: int = 0) -> Any:
        """``value`` of rank ``source``, on every rank (a picklable object)."""
        box = [value if self.rank == source else None]
        self._distributed.broadcast_object_list(box, src=source)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, by rank, on every rank."""
        values: list[Any] = [None] * self.size
        self._distributed.all_gather_object(values, value)
        return values

    def check(self, error: BaseException | None) -> None:
        """Agree on failure: if any rank failed, every rank raises.

        Args:
            error: this rank's failure, or None.

        Raises:
            the rank's own ``error``, or :class:`DistributedError` naming the first
            other rank that failed and its message.
        """
        failures = self.gather(None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        for rank, failure in enumerate(failures):
            if failure is not None:
                _kind, message = failure
                raise DistributedError(f"process {rank} of {self.size} failed: {message}")

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (sizes differ by at most 1)."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def concatenate(self, part: Any) -> Any:
        """Every rank's numpy ``part``, concatenated by rank (the whole, on every rank)."""
        import numpy as np

        return np.concatenate(self.gather(part))

    def owned(self, index: int) -> bool:
        """Whether work item ``index`` is this rank's (round robin)."""
        return index % self.size == self.rank


def split_by_cost(costs: list[int], parts: int) -> list[int]:
    """Which of ``parts`` processes takes each item: contiguous runs of about equal cost.

    Item ``i`` goes to the process whose share ``[p, p + 1) * total / parts`` holds the
    middle of the item's cost, so the runs keep the items' order, an item is never
    split, and each process's cost is within one item of ``total / parts``.

    Example:
        >>> split_by_cost([1, 1, 1, 1, 4], 2)
        [0, 0, 0, 0, 1]
    """
    total = sum(costs)
    owners, before = [], 0
    for cost in costs:
        middle = before + cost / 2
        owners.append(min(parts - 1, int(middle * parts / total)) if total else 0)
        before += cost
    return owners
