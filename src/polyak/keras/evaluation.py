"""Evaluating Keras checkpoints: data, metrics, and the sweep over one reused model.

One model object serves every candidate of a sweep: its variables are assigned
from the candidate's tensors through a :class:`~polyak.keras.models.KerasWeightMap`,
then the model predicts in batches with ``model(x, training=False)``. No clone, no
compile, no ``fit``/``evaluate`` machinery per candidate.

Metrics: ``accuracy`` (argmax for several classes, threshold 0.5 for one output;
``y`` as class indices or one-hot), ``loss`` (the model's compiled loss, else
categorical or sparse categorical cross-entropy from the shape of ``y``; lower is
better), a callable ``metric(y_true, y_pred) -> float``, or ``"module:function"``.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyak.averaging import open_members
from polyak.discovery import find_checkpoints
from polyak.errors import DataError, require
from polyak.keras.models import KerasWeightMap, resolve_model
from polyak.schemes import Scheme, parse_schemes
from polyak.sweep import SweepResult, run_sweep

keras = require("keras", "keras", "polyak.keras")

__all__ = [
    "Dataset",
    "KerasEvaluator",
    "ModelCallableEvaluator",
    "load_dataset",
    "resolve_metric",
    "sweep",
]


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` and targets ``y`` (class indices or one-hot)."""

    x: np.ndarray
    y: np.ndarray
    name: str = "data"


def load_dataset(path: str | Path) -> Dataset:
    """Read ``x`` and ``y`` from an ``.npz`` file (``allow_pickle=False``).

    Raises:
        DataError: the file is missing, empty, not an ``.npz`` archive, lacks ``x``
            or ``y``, or they differ in length; the message names the file.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        reason = "the file is empty" if isinstance(error, EOFError) else str(error)
        raise DataError(f"data {path}: cannot be read as .npz ({reason}).") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"data {path}: holds a single array (a .npy file); save x and y together "
            "with numpy.savez(path, x=x, y=y)."
        )
    try:
        with loaded as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(
                    f"data {path}: needs arrays 'x' and 'y'; it holds {sorted(archive.files)}."
                )
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"data {path}: cannot be read as .npz ({error}).") from None
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"data {path}: x and y must have one row per example; one is a scalar.")
    if len(x) != len(y):
        raise DataError(f"data {path}: x has {len(x)} rows but y has {len(y)}.")
    if len(x) == 0:
        raise DataError(f"data {path}: holds no examples.")
    return Dataset(x, y, path.name)


def _as_dataset(data: Dataset | tuple | str | Path, name: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(data)
    x, y = data
    return Dataset(np.asarray(x), np.asarray(y), name)


def predict(model: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Model outputs for ``x`` in batches, as numpy."""
    outputs = [
        np.asarray(keras.ops.convert_to_numpy(model(x[start : start + batch_size], training=False)))
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions; ``y_true`` as class indices or one-hot."""
    labels = y_true.argmax(-1) if y_true.ndim > 1 and y_true.shape[-1] > 1 else y_true.reshape(-1)
    if y_pred.ndim == 1 or y_pred.shape[-1] == 1:
        predicted = (y_pred.reshape(-1) > 0.5).astype(labels.dtype)
    else:
        predicted = y_pred.argmax(-1)
    return float(np.mean(predicted == labels))


def _loss_function(model: Any, y: np.ndarray) -> Callable:
    loss = getattr(model, "loss", None)
    if loss is not None and not isinstance(loss, (dict, list, tuple)):
        return keras.losses.get(loss)
    if y.ndim > 1 and y.shape[-1] > 1:
        return keras.losses.categorical_crossentropy
    return keras.losses.sparse_categorical_crossentropy


def resolve_metric(metric: str | Callable) -> tuple[str, Callable | None, bool]:
    """``(name, function or None for loss, higher_is_better)`` of a metric spec."""
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric, True
    if metric == "accuracy":
        return "accuracy", accuracy, True
    if metric == "loss":
        return "loss", None, False
    module_name, _, function_name = metric.partition(":")
    if not function_name:
        raise DataError(
            f"metric {metric!r}: use accuracy, loss, or a function 'module:function' "
            "taking (y_true, y_pred)."
        )
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise DataError(f"metric {metric}: cannot be imported ({error}).") from None
    return function_name, function, True


class KerasEvaluator:
    """``evaluate(tensors) -> {"test": ..., "validation": ...}`` on one reused model.

    Args:
        model: a built Keras model.
        weight_map: maps checkpoint tensor names to the model's variables.
        test: test data.
        validation: validation data, optional.
        metric: ``"accuracy"``, ``"loss"``, a callable ``(y_true, y_pred) -> float``
            or ``"module:function"``.
        batch_size: examples per forward pass.
    """

    def __init__(
        self,
        model: Any,
        weight_map: KerasWeightMap,
        test: Dataset,
        validation: Dataset | None = None,
        metric: str | Callable = "accuracy",
        batch_size: int = 1024,
    ) -> None:
        self.model = model
        self.weight_map = weight_map
        self.splits = (
            {"test": test} if validation is None else {"test": test, "validation": validation}
        )
        self.metric, self._function, self.higher_is_better = resolve_metric(metric)
        self.batch_size = batch_size
        self.evaluations = 0

    def score(self, data: Dataset) -> float:
        """The metric of the model as it is now, on ``data``."""
        try:
            predictions = predict(self.model, data.x, self.batch_size)
        except Exception as error:
            raise DataError(
                f"data {data.name}: the model cannot predict on it ({str(error).splitlines()[0]})."
            ) from None
        if self._function is None:
            losses = _loss_function(self.model, data.y)(data.y, predictions)
            return float(np.mean(keras.ops.convert_to_numpy(losses)))
        return float(self._function(data.y, predictions))

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.weight_map.assign(tensors)
        self.evaluations += 1
        return {split: self.score(data) for split, data in self.splits.items()}


class ModelCallableEvaluator:
    """``evaluate(tensors)`` that loads the tensors into one model and calls ``evaluate(model)``.

    Args:
        model: a built Keras model, reused for every candidate.
        weight_map: maps checkpoint tensor names to the model's variables.
        evaluate: the user's ``evaluate(model)``, returning a float (a test score) or
            ``{"test": float, "validation": float}``.
    """

    def __init__(self, model: Any, weight_map: KerasWeightMap, evaluate: Callable) -> None:
        self.model = model
        self.weight_map = weight_map
        self.evaluate = evaluate
        self.evaluations = 0

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Any:
        self.weight_map.assign(tensors)
        self.evaluations += 1
        return self.evaluate(self.model)


def sweep(
    paths: str | Path | Sequence[str | Path],
    test_data: Dataset | tuple | str | Path | None = None,
    validation_data: Dataset | tuple | str | Path | None = None,
    *,
    evaluate: Callable[[Any], float | Mapping[str, float]] | None = None,
    schemes: str | Sequence[str | Scheme] = "equal,linear,exp:2",
    last: int | None = None,
    model: Any = None,
    metric: str | Callable = "accuracy",
    higher_is_better: bool | None = None,
    batch_size: int = 1024,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Sweep Keras checkpoints: every member and every (scheme, n) average, evaluated.

    Each checkpoint is read once; one model is reused for every candidate. Give
    either data (``test_data``, optionally ``validation_data``, and a ``metric``) or
    your own ``evaluate(model)``.

    Args:
        paths: ``.keras``, legacy ``.h5`` or ``.weights.h5`` checkpoints.
        test_data: ``(x, y)``, a :class:`Dataset` or an ``.npz`` path.
        validation_data: the same; when given, the best candidate is chosen on it.
        evaluate: instead of data, ``evaluate(model) -> float`` (a test score), or
            ``-> {"test": float, "validation": float}`` to choose on validation; it
            is called with the model holding each candidate's weights.
        schemes: e.g. ``"equal,linear,exp:2"`` or ``"exp:0.5,1,2,4,8"``.
        last: sweep the ``last`` newest checkpoints only.
        model: the architecture for weights-only files (see ``resolve_model``).
        metric: with data: ``"accuracy"``, ``"loss"``, ``(y_true, y_pred) -> float``
            or ``"module:function"``; with ``evaluate``: the name for the report.
        higher_is_better: the metric's direction (default: True, False for losses).
        batch_size: examples per forward pass.

    Example:
        >>> result = polyak.keras.sweep("snapshots/", "test.npz", "val.npz")  # doctest: +SKIP
        >>> result = polyak.keras.sweep("snapshots/", evaluate=lambda m: score(m))  # doctest: +SKIP
    """
    if (evaluate is None) == (test_data is None):
        raise DataError(
            "sweep needs either test data or evaluate(model), and not both; received "
            f"test_data={'given' if test_data is not None else None} and "
            f"evaluate={'given' if evaluate is not None else None}."
        )
    if evaluate is not None and validation_data is not None:
        raise DataError(
            "validation_data goes with test_data; with evaluate(model), return "
            '{"test": ..., "validation": ...} from it instead.'
        )
    if evaluate is not None and not callable(evaluate):
        raise DataError(f"evaluate must be a callable taking the model; received {evaluate!r}.")
    members = find_checkpoints(paths, last=last)
    parsed = parse_schemes(schemes if isinstance(schemes, str) else [str(s) for s in schemes])
    if evaluate is None:
        test = _as_dataset(test_data, "test")
        validation = None if validation_data is None else _as_dataset(validation_data, "validation")
    target = resolve_model(model, members[0].path)
    readers = open_members(members, None)
    try:
        weight_map = KerasWeightMap(target, readers[0])
        if evaluate is None:
            evaluator = KerasEvaluator(target, weight_map, test, validation, metric, batch_size)
            name, direction = evaluator.metric, evaluator.higher_is_better
        else:
            evaluator = ModelCallableEvaluator(target, weight_map, evaluate)
            name = metric if isinstance(metric, str) and metric != "accuracy" else "metric"
            direction = True
        if higher_is_better is not None:
            direction = higher_is_better
        return run_sweep(
            readers,
            members,
            parsed,
            evaluator,
            metric=name,
            higher_is_better=direction,
            progress=progress,
        )
    finally:
        for reader in readers:
            reader.close()
