"""Lightning itself for the Lightning adapter: its import, and what both callbacks ask of a Trainer.

Imported first by each module of the adapter: a missing Lightning names the extra to install.

Every module of :mod:`polyak.lightning` imports it before torch's adapter, so that a
missing Lightning or torch is one ``MissingDependencyError`` naming the ``lightning`` extra.

Lightning is imported as ``lightning.pytorch``; where only the older
``pytorch_lightning`` package is installed, that is used instead.
"""

from __future__ import annotations

import importlib
from typing import Any

from polyak.errors import require

__all__ = ["SHARDED_STRATEGIES", "pl", "sharded_strategy", "torch"]


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

#: Strategies under which a process does not hold the whole model (rank 0's
#: ``pl_module.state_dict()`` is a shard), which both callbacks refuse.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def sharded_strategy(trainer: Any) -> str | None:
    """The name of ``trainer``'s strategy if it shards the model, else None."""
    name = type(trainer.strategy).__name__
    return name if name in SHARDED_STRATEGIES else None
