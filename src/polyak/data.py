"""Evaluation data and metrics, framework-free: ``.npz`` datasets, accuracy, user functions.

Both framework adapters (``polyak.keras``, ``polyak.torch``) evaluate candidates on
a :class:`Dataset` with a metric resolved here; only the forward pass and the loss
are theirs.

- Data: an ``.npz`` file with arrays ``x`` and ``y`` (``y`` as class indices or
  one-hot), read with ``allow_pickle=False``; or ``(x, y)`` in memory.
- Metrics: ``accuracy`` (argmax for several outputs, threshold 0.5 for one),
  ``loss`` (each framework's cross-entropy; lower is better), a callable
  ``metric(y_true, y_pred) -> float`` or ``"module:function"`` naming one.
- Per-example outcomes on test, for the sweep's uncertainty
  (:mod:`polyak.significance`): correct or not for ``accuracy``
  (:func:`correct`), the loss of each example for ``loss``; none for a user's
  metric, whose per-example form polyak cannot know.

Example:
    >>> import numpy as np
    >>> from polyak.data import accuracy
    >>> accuracy(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]))
    0.6666666666666666
"""

from __future__ import annotations

import importlib
import math
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polyak.errors import DataError
from polyak.formats.limits import inflation_refusal, shape_refusal
from polyak.formats.npz import read_npy_header

__all__ = [
    "Dataset",
    "accuracy",
    "as_dataset",
    "check_data_or_evaluate",
    "correct",
    "import_callable",
    "load_dataset",
    "resolve_metric",
    "sweep_metric",
    "with_recalibrated",
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
    _check_declared_sizes(path)
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


def _check_declared_sizes(path: Path) -> None:
    """Refuse an ``x`` or ``y`` member declaring more data than it holds, before numpy
    allocates what the header declares (an 800-byte file can declare 16 TiB).

    The rule of every polyak parser (``polyak.formats.limits``): a compressed member
    inflates at most ``MAX_INFLATION``-fold, and the ``.npy`` header's shape times
    item size fits in what the member holds.
    """
    try:
        if not zipfile.is_zipfile(path):
            return  # np.load reports what it is
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                if name not in ("x", "y"):
                    continue
                where = f"data {path}: array {name}"
                stored = member.compress_type == zipfile.ZIP_STORED
                refusal = inflation_refusal(member.file_size, member.compress_size)
                if member.compress_size > size or (
                    member.file_size != member.compress_size if stored else refusal
                ):
                    raise DataError(
                        f"{where}: its zip entry declares {member.file_size} bytes from "
                        f"{member.compress_size} stored in a {size}-byte file; the file is "
                        "corrupt or crafted. Save it again with numpy.savez."
                    )
                with archive.open(member) as file:
                    shape, dtype, header_size = read_npy_header(file)
                held = member.file_size - header_size
                refusal = shape_refusal(shape)
                declared = math.prod(shape) * dtype.itemsize
                if refusal is not None or declared > held:
                    raise DataError(
                        f"{where}: declares shape {shape} of {dtype} ({declared} bytes) but "
                        f"holds {max(held, 0)}; the file is truncated or crafted. Save it again "
                        "with numpy.savez."
                    )
    except DataError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, zipfile.BadZipFile) as error:
        raise DataError(f"data {path}: cannot be read as .npz ({error}).") from None


def as_dataset(data: Dataset | tuple | str | Path, name: str) -> Dataset:
    """A :class:`Dataset` from a Dataset, an ``.npz`` path or an ``(x, y)`` pair."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(data)
    try:
        x, y = data
    except (TypeError, ValueError):
        raise DataError(
            f"{name} data must be an .npz path, a Dataset or a pair (x, y); "
            f"received {type(data).__name__}."
        ) from None
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"{name} data: x and y must hold the same number of examples, at least one; "
            f"received shapes {x.shape} and {y.shape}."
        )
    return Dataset(x, y, name)


def correct(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Whether each prediction is right, as a bool array; the rule of :func:`accuracy`."""
    labels = y_true.argmax(-1) if y_true.ndim > 1 and y_true.shape[-1] > 1 else y_true.reshape(-1)
    if y_pred.ndim == 1 or y_pred.shape[-1] == 1:
        predicted = (y_pred.reshape(-1) > 0.5).astype(labels.dtype)
    else:
        predicted = y_pred.argmax(-1)
    return np.asarray(predicted == labels, dtype=bool)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of correct predictions; ``y_true`` as class indices or one-hot.

    Several outputs: the predicted class is the argmax (logits or probabilities
    alike). One output: a probability, predicted class 1 above 0.5.
    """
    return float(np.mean(correct(y_true, y_pred)))


def check_labels(data: Dataset, outputs: np.ndarray) -> None:
    """Refuse labels the model cannot output, before accuracy or loss scores them.

    With several outputs (``C`` classes), ``y`` is one-hot of width ``C`` or class
    indices ``0..C-1``; with one output, ``y`` holds 0/1 targets (probabilities for a
    loss). Otherwise every candidate would score 0 accuracy, or a loss would fail.

    Raises:
        DataError: naming the data, the labels found and the classes the model has.
    """
    y = np.asarray(data.y)
    binary = outputs.ndim == 1 or outputs.shape[-1] == 1
    classes = 2 if binary else outputs.shape[-1]
    if y.ndim > 1 and y.shape[-1] > 1:
        if binary or y.shape[-1] != classes:
            raise DataError(
                f"data {data.name}: y is one-hot of width {y.shape[-1]}, but the model outputs "
                f"{outputs.shape[-1] if outputs.ndim > 1 else 1} value(s) per example. Check "
                "that the data belongs to this model."
            )
        return
    if not np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_:
        return  # booleans are 0/1; anything else fails in the metric with its own words
    labels = y.reshape(-1)
    finite = np.isfinite(labels)
    low = float(labels.min()) if labels.size else 0.0
    high = float(labels.max()) if labels.size else 0.0
    whole = bool(np.all(labels == np.round(labels))) if finite.all() else False
    if not finite.all() or low < 0 or high > classes - 1 or (not binary and not whole):
        shown = f"{low:g} to {high:g}" if finite.all() else "non-finite values"
        raise DataError(
            f"data {data.name}: y holds labels {shown}, but the model outputs "
            + (
                "one probability (labels 0 or 1)"
                if binary
                else f"{classes} classes (0 to {classes - 1})"
            )
            + ". Check that the data belongs to this model."
        )


def import_callable(spec: str, role: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` spec names, importable from the working directory.

    Args:
        spec: e.g. ``"mymodels:build"``; ``module`` may be dotted.
        role: what it is for, in messages (``"model"``, ``"metric"``, ``"eval"``).

    Raises:
        DataError: the spec is malformed, the module cannot be imported, or it has
            no such callable.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise DataError(f"{role} {spec!r}: give a function as 'module:function'.")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DataError(f"{role} {spec}: cannot import module {module_name} ({error}).") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DataError(f"{role} {spec}: module {module_name} has no function {function_name}.")
    return function


def resolve_metric(metric: str | Callable) -> tuple[str, Callable | None, bool]:
    """``(name, function, higher_is_better)`` of a metric spec; function None means loss.

    Args:
        metric: ``"accuracy"``, ``"loss"``, a callable ``(y_true, y_pred) -> float``
            or ``"module:function"`` naming one (higher is better unless told).
    """
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric, True
    if metric == "accuracy":
        return "accuracy", accuracy, True
    if metric == "loss":
        return "loss", None, False
    if ":" not in str(metric):
        raise DataError(
            f"metric {metric!r}: use accuracy, loss, or a function 'module:function' "
            "taking (y_true, y_pred)."
        )
    function = import_callable(metric, "metric")
    return metric.partition(":")[2], function, True


def check_data_or_evaluate(test_data: object, validation_data: object, evaluate: object) -> None:
    """Refuse a sweep given both data and ``evaluate(model)``, or neither.

    Raises:
        DataError: saying which of the two to give.
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


def sweep_metric(
    evaluator: Any,
    evaluate: object,
    metric: object,
    higher_is_better: bool | None,
) -> tuple[str, bool]:
    """The metric's name and direction a framework's sweep reports.

    Args:
        evaluator: the framework's evaluator; its resolved ``metric`` and
            ``higher_is_better`` are used when the sweep evaluates data itself.
        evaluate: the user's ``evaluate(model)``, or None.
        metric: the ``metric`` argument; with ``evaluate`` a string other than
            ``"accuracy"`` names what ``evaluate`` returns ("metric" otherwise).
        higher_is_better: the caller's direction, overriding the others when given
            (with ``evaluate`` the default is higher is better).
    """
    if evaluate is None:
        name, direction = evaluator.metric, evaluator.higher_is_better
    else:
        name = metric if isinstance(metric, str) and metric != "accuracy" else "metric"
        direction = True
    return name, direction if higher_is_better is None else higher_is_better


def with_recalibrated(plain: Any, recalibrated: Any) -> dict[str, Any]:
    """Scores before and after BatchNorm recalibration, in the form the sweep reads.

    ``plain`` and ``recalibrated`` are each a float (the test score) or a mapping of
    split to score; the result is ``plain``'s splits with ``"recalibrated"`` added.
    """
    result = dict(plain) if isinstance(plain, Mapping) else {"test": float(plain)}
    result["recalibrated"] = (
        dict(recalibrated) if isinstance(recalibrated, Mapping) else {"test": recalibrated}
    )
    return result
