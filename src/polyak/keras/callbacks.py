"""``SnapshotCheckpoint``, under its earlier module name.

The callback lives in :mod:`polyak.keras.snapshots`, the same file name as the torch
adapter's snapshot helper (:mod:`polyak.torch.snapshots`); this name keeps old imports working.
"""

from polyak.keras.snapshots import SnapshotCheckpoint

__all__ = ["SnapshotCheckpoint"]
