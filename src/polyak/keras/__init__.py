"""Keras 3 adapter: the snapshot callback, model helpers, the sweep, BatchNorm recalibration.

Importing it picks Keras' backend if the user has not (torch without TensorFlow): see below.

Its modules have the torch adapter's file names (``snapshots``, ``online``,
``evaluation``, ``batchnorm``), so knowing one adapter means knowing the other; the
class names follow each framework's habit (here ``SnapshotCheckpoint`` is a Keras
callback, as ``ModelCheckpoint`` is, given to ``fit``). The backend is chosen before
Keras is imported, by :func:`polyak.keras_backend.choose_keras_backend`.

Example:
    >>> from polyak.keras import SnapshotCheckpoint
    >>> model.fit(x, y, epochs=500, callbacks=[SnapshotCheckpoint("run/")])  # doctest: +SKIP
"""

from polyak.keras_backend import choose_keras_backend

choose_keras_backend()

from polyak.errors import require  # noqa: E402

require("keras", "keras", "polyak.keras")

from polyak.keras.batchnorm import batchnorm_layers, recalibrate_batchnorm  # noqa: E402
from polyak.keras.evaluation import (  # noqa: E402
    Dataset,
    KerasEvaluator,
    load_dataset,
    sweep,
)
from polyak.keras.models import (  # noqa: E402
    KerasWeightMap,
    average_models,
    load_averaged_model,
    resolve_model,
)
from polyak.keras.online import OnlineAverage  # noqa: E402
from polyak.keras.snapshots import SnapshotCheckpoint  # noqa: E402

__all__ = [
    "Dataset",
    "KerasEvaluator",
    "KerasWeightMap",
    "OnlineAverage",
    "SnapshotCheckpoint",
    "average_models",
    "batchnorm_layers",
    "load_averaged_model",
    "load_dataset",
    "recalibrate_batchnorm",
    "resolve_model",
    "sweep",
]
