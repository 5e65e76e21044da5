"""Online averaging schedules: when to update a running average of weights, and by how much.

The public name of :mod:`polyak.weights.schedule`, where the schedules and their formulas live.

Example:
    >>> from polyak.online import AveragingSchedule
    >>> AveragingSchedule("polyak").weights([1, 2, 3, 4]).tolist()
    [0.25, 0.25, 0.25, 0.25]
"""

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
    "advance",
    "check_buffer_policy",
    "whole_or_none",
]
