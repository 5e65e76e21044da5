"""The sweep of the framework that wrote the checkpoints: Keras for Keras files, else PyTorch.

The choice the command line makes, for a library caller too; Keras or torch is imported
only for the framework chosen.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from polyak.errors import DataError
from polyak.formats import format_of
from polyak.sweep import SweepResult

__all__ = ["KERAS_FORMATS", "framework_of", "sweep_checkpoints"]

#: The formats Keras writes; every other format is swept with PyTorch.
KERAS_FORMATS = ("keras", "keras-h5", "keras-weights")


def framework_of(checkpoint: str | os.PathLike[str]) -> str:
    """``"keras"`` for a checkpoint in a Keras format (:data:`KERAS_FORMATS`), else ``"torch"``."""
    return "keras" if format_of(checkpoint).name in KERAS_FORMATS else "torch"


def sweep_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    test_data: Any = None,
    validation_data: Any = None,
    *,
    device: str | None = None,
    key: str | None = None,
    **options: Any,
) -> SweepResult:
    """Sweep checkpoints with the framework their format names: the newest member decides.

    Args:
        checkpoints: the members, newest first (as :func:`polyak.find_checkpoints` gives them).
        test_data: as :func:`polyak.keras.sweep` and :func:`polyak.torch.sweep` take it.
        validation_data: the same.
        device: the torch device; PyTorch checkpoints only.
        key: the state dict's entry in a ``.pt``; PyTorch checkpoints only.
        **options: the other arguments both sweeps take (``model``, ``schemes``...).

    Raises:
        DataError: ``device`` or ``key`` given for Keras checkpoints.
    """
    if framework_of(checkpoints[0]) == "keras":
        if device is not None or key is not None:
            raise DataError(
                "device and key apply to PyTorch checkpoints, not Keras ones; received "
                f"device={device!r}, key={key!r}."
            )
        from polyak.keras.evaluation import sweep  # imports keras

        return sweep(checkpoints, test_data, validation_data, **options)
    from polyak.torch.evaluation import sweep  # imports torch

    return sweep(checkpoints, test_data, validation_data, device=device, key=key, **options)
