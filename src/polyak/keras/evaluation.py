"""Evaluating Keras checkpoints: data, metrics, and the sweep over one reused model.

One reused model, and the metrics it is scored with: :class:`KerasEvaluator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.data import (
    Dataset,
    accuracy,
    as_dataset,
    check_data_or_evaluate,
    check_labels,
    correct,
    load_dataset,
    resolve_metric,
    sweep_metric,
    with_recalibrated,
)
from polyak.discovery import find_checkpoints
from polyak.engine import closing_all, open_members
from polyak.errors import DataError, require
from polyak.keras.batchnorm import recalibrate_batchnorm
from polyak.keras.models import KerasWeightMap, resolve_model
from polyak.sweep import SweepResult, run_sweep
from polyak.weights.schemes import Scheme, parse_schemes

keras = require("keras", "keras", "polyak.keras")

# Dataset, load_dataset, accuracy and resolve_metric live in polyak.data (no Keras
# needed); they are re-exported here for the Keras API.
__all__ = [
    "Dataset",
    "KerasEvaluator",
    "accuracy",
    "load_dataset",
    "predict",
    "resolve_metric",
    "sweep",
]


def predict(model: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Model outputs for ``x`` in batches, as numpy."""
    outputs = [
        np.asarray(keras.ops.convert_to_numpy(model(x[start : start + batch_size], training=False)))
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs)


def _loss_function(model: Any, y: np.ndarray) -> Callable:
    loss = getattr(model, "loss", None)
    if loss is not None and not isinstance(loss, (dict, list, tuple)):
        return keras.losses.get(loss)
    if y.ndim > 1 and y.shape[-1] > 1:
        return keras.losses.categorical_crossentropy
    return keras.losses.sparse_categorical_crossentropy


def _is_cross_entropy(model: Any) -> bool:
    """Whether the sweep's loss is a cross-entropy: none compiled (the default), or one named so."""
    loss = getattr(model, "loss", None)
    if loss is None:
        return True
    name = (
        loss
        if isinstance(loss, str)
        else getattr(loss, "name", None) or getattr(loss, "__name__", "")
    )
    return "crossentropy" in str(name).lower()


class KerasEvaluator:
    """``evaluate(tensors)`` on one reused Keras model: data and a metric, or a function.

    One model object serves every candidate of a sweep: its variables are assigned
    from the candidate's tensors through a :class:`~polyak.keras.models.KerasWeightMap`,
    then the model predicts in batches with ``model(x, training=False)``. No clone, no
    compile, no ``fit``/``evaluate`` machinery per candidate.

    Metrics: ``accuracy`` (argmax for several classes, threshold 0.5 for one output;
    ``y`` as class indices or one-hot), ``loss`` (the model's compiled loss, else
    categorical or sparse categorical cross-entropy from the shape of ``y``; lower is
    better), a callable ``metric(y_true, y_pred) -> float``, or ``"module:function"``.

    Args:
        model: a built Keras model.
        weight_map: maps checkpoint tensor names to the model's variables.
        test: test data (with ``metric``), or None with ``evaluate``.
        validation: validation data, optional.
        metric: ``"accuracy"``, ``"loss"``, a callable ``(y_true, y_pred) -> float``
            or ``"module:function"``.
        batch_size: examples per forward pass (and per recalibration batch).
        evaluate: instead of data, ``evaluate(model)`` returning a float or
            ``{"test": ..., "validation": ...}``.
        recalibrate: also score each candidate after BatchNorm recalibration on this
            data (its ``x``) or by this callable ``recalibrate(model)``.
    """

    def __init__(
        self,
        model: Any,
        weight_map: KerasWeightMap,
        test: Dataset | None = None,
        validation: Dataset | None = None,
        metric: str | Callable = "accuracy",
        batch_size: int = 1024,
        *,
        evaluate: Callable[[Any], Any] | None = None,
        recalibrate: Dataset | tuple | str | Path | Callable[[Any], None] | None = None,
    ) -> None:
        self.model = model
        self.weight_map = weight_map
        self.splits = (
            {"test": test} if validation is None else {"test": test, "validation": validation}
        )
        self.metric, self._function, self.higher_is_better = resolve_metric(metric)
        self.batch_size = batch_size
        self.evaluate = evaluate
        self._recalibrate = self._recalibration(recalibrate)
        self.evaluations = 0
        self.group: Any = None

    @property
    def shards_data(self) -> bool:
        """Whether a torchrun group can share out the data (on data, not ``evaluate``)."""
        return self.evaluate is None

    def use_group(self, group: Any) -> None:
        """Predict on this process's share of the data; gather the predictions."""
        self.group = group

    def _recalibration(self, recalibrate: Any) -> Callable[[Any], None] | None:
        if recalibrate is None:
            return None
        if callable(recalibrate) and not isinstance(recalibrate, (Dataset, tuple)):
            return recalibrate
        data = as_dataset(recalibrate, "recalibration")
        return lambda model: recalibrate_batchnorm(model, data.x, batch_size=self.batch_size)

    def score(self, data: Dataset) -> float:
        """The metric of the model as it is now, on ``data``."""
        return self.score_examples(data)[0]

    def score_examples(self, data: Dataset) -> tuple[float, np.ndarray | None]:
        """The metric on ``data`` and each example's outcome: correct or not for
        accuracy, its loss for ``loss``, None for a user's metric."""
        shared = self.group is not None and len(data.x) >= self.group.size
        x = data.x[self.group.share(len(data.x))] if shared else data.x
        try:
            predictions = predict(self.model, x, self.batch_size)
        except Exception as error:
            raise DataError(
                f"data {data.name}: the model cannot predict on it ({str(error).splitlines()[0]})."
            ) from None
        if shared:
            predictions = self.group.concatenate(predictions)
        # Class labels: for accuracy, and for a cross-entropy loss (a compiled loss of
        # another kind may be a regression's, whose targets are not classes).
        if self._function is accuracy or (self._function is None and _is_cross_entropy(self.model)):
            check_labels(data, predictions)
        if self._function is None:
            losses = keras.ops.convert_to_numpy(
                _loss_function(self.model, data.y)(data.y, predictions)
            )
            per_example = np.asarray(losses, dtype=np.float64).reshape(len(predictions), -1)
            return float(np.mean(losses)), per_example.mean(axis=1)
        outcomes = correct(data.y, predictions) if self._function is accuracy else None
        return float(self._function(data.y, predictions)), outcomes

    def _scores(self) -> Any:
        if self.evaluate is not None:
            return self.evaluate(self.model)
        scores: dict[str, Any] = {}
        for split, data in self.splits.items():
            scores[split], outcomes = self.score_examples(data)
            if split == "test" and outcomes is not None:
                scores["outcomes"] = outcomes
        return scores

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Any:
        self.weight_map.assign(tensors)
        self.evaluations += 1
        plain = self._scores()
        if self._recalibrate is None:
            return plain
        self._recalibrate(self.model)
        return with_recalibrated(plain, self._scores())

    def recalibrated_tensors(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``tensors`` with the BatchNorm statistics recalibrated, for writing the best out."""
        if self._recalibrate is None:
            return dict(tensors)
        self.weight_map.assign(tensors)
        self._recalibrate(self.model)
        return {**tensors, **self.weight_map.read(tensors)}


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
    recalibrate: Dataset | tuple | str | Path | Callable[[Any], None] | None = None,
    posthoc: Sequence[float] = (),
    posthoc_directory: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Sweep Keras checkpoints: every member and every (scheme, n) average, evaluated.

    Each checkpoint is read once (twice with ``greedy``); one model is reused for
    every candidate, and a model the caller passed gets its weights back at the end.
    Give either data (``test_data``, optionally
    ``validation_data``, and a ``metric``) or your own ``evaluate(model)``.

    Args:
        paths: ``.keras``, legacy ``.h5`` or ``.weights.h5`` checkpoints.
        test_data: ``(x, y)``, a :class:`Dataset` or an ``.npz`` path.
        validation_data: the same; when given, the best candidate is chosen on it.
        evaluate: instead of data, ``evaluate(model) -> float`` (a test score), or
            ``-> {"test": float, "validation": float}`` to choose on validation; it
            is called with the model holding each candidate's weights.
            It may add ``"outcomes"``: each test example's outcome (bool correct or
            not, or its loss), for the report's interval (see :mod:`polyak.sweep`).
        schemes: e.g. ``"equal,linear,exp:2"``, ``"exp:0.5,1,2,4,8"``, ``"greedy"``.
        last: sweep the ``last`` newest checkpoints only.
        model: the architecture for weights-only files (see ``resolve_model``).
        metric: with data: ``"accuracy"``, ``"loss"``, ``(y_true, y_pred) -> float``
            or ``"module:function"``; with ``evaluate``: the name for the report.
        higher_is_better: the metric's direction (default: True, False for losses).
        batch_size: examples per forward pass.
        recalibrate: also score every candidate after BatchNorm recalibration on
            this data (``.npz``, ``(x, y)`` or Dataset) or by ``recalibrate(model)``.
        posthoc: widths of post-hoc EMA candidates (``posthoc:SIGMA_REL``), from the
            EMA profiles tracked in ``posthoc_directory`` (default: the newest
            checkpoint's directory); see :mod:`polyak.posthoc`.

    Example:
        >>> result = polyak.keras.sweep("snapshots/", "test.npz", "val.npz")  # doctest: +SKIP
        >>> result = polyak.keras.sweep("snapshots/", evaluate=lambda m: score(m))  # doctest: +SKIP
    """
    check_data_or_evaluate(test_data, validation_data, evaluate)
    members = find_checkpoints(paths, last=last)
    parsed = parse_schemes(schemes if isinstance(schemes, str) else [str(s) for s in schemes])
    test = None if test_data is None else as_dataset(test_data, "test")
    validation = None if validation_data is None else as_dataset(validation_data, "validation")
    target = resolve_model(model, members[0].path)
    # A model the caller gave gets its own weights back afterwards.
    original = target.get_weights() if target is model else None
    try:
        with closing_all(open_members(members, None)) as readers:
            evaluator = KerasEvaluator(
                target,
                KerasWeightMap(target, readers[0]),
                test,
                validation,
                metric if evaluate is None else "accuracy",
                batch_size,
                evaluate=evaluate,
                recalibrate=recalibrate,
            )
            name, direction = sweep_metric(evaluator, evaluate, metric, higher_is_better)
            return run_sweep(
                readers,
                members,
                parsed,
                evaluator,
                metric=name,
                higher_is_better=direction,
                progress=progress,
                posthoc=posthoc,
                posthoc_directory=posthoc_directory,
            )
    finally:
        if original is not None:
            target.set_weights(original)
