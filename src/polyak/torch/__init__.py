"""PyTorch adapter: snapshots, online averaging, the sweep's evaluator, BatchNorm recalibration.

Its modules have the Keras and Lightning adapters' file names (``snapshots``, ``online``).

torch is imported by this package and ``polyak.lightning``, and only where a file or a run
needs it by ``polyak.formats.torch`` (checkpoints only torch can read or write) and
``polyak.distributed`` (under torchrun); never by ``import polyak``. The helpers here are
plain objects a training loop calls (``SnapshotSaver.save``, ``OnlineAverage.update``),
where Keras and Lightning take callbacks: see :mod:`polyak.lightning` for the names.

Example:
    >>> from polyak.torch import SnapshotSaver
    >>> saver = SnapshotSaver("snapshots/", keep=10)  # doctest: +SKIP
    >>> saver.save(model, step=step)  # doctest: +SKIP
"""

from polyak.errors import require

require("torch", "torch", "polyak.torch")

from polyak.torch.batchnorm import batchnorm_layers, recalibrate_batchnorm  # noqa: E402
from polyak.torch.evaluation import (  # noqa: E402
    TorchEvaluator,
    load_tensors,
    resolve_module,
    sweep,
)
from polyak.torch.online import OnlineAverage  # noqa: E402
from polyak.torch.snapshots import SnapshotSaver, save_state_dict  # noqa: E402

__all__ = [
    "OnlineAverage",
    "SnapshotSaver",
    "TorchEvaluator",
    "batchnorm_layers",
    "load_tensors",
    "recalibrate_batchnorm",
    "resolve_module",
    "save_state_dict",
    "sweep",
]
