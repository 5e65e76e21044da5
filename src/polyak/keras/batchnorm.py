"""Recomputing BatchNormalization moving statistics after averaging (Keras 3).

How the pass works, its formulas and the layers it leaves alone: :func:`recalibrate_batchnorm`.

Example:
    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization()]
    ... )
    >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    >>> model = recalibrate_batchnorm(model, x, batch_size=16)
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from polyak.checks import as_whole_number
from polyak.errors import DataError, require

keras = require("keras", "keras", "polyak.keras")

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]

_DATA_RULE = (
    "data must be an array x, a tuple (x, y) or (x, y, sample_weight), or an iterable of "
    "batches, each an array, a dict of named inputs, or a tuple or list whose first "
    "element is the input"
)
# Statistics restored after the pass: renorm's training-time state.
_RENORM_STATE = ("renorm_mean", "renorm_stddev")


def batchnorm_layers(model: Any) -> list[Any]:
    """The ``BatchNormalization`` layers of ``model`` that :func:`recalibrate_batchnorm` recomputes.

    Every ``keras.layers.BatchNormalization`` in ``model`` (the model itself included,
    and layers nested in sub-models and custom layers), each once, that is trainable:
    a frozen one runs in inference mode even in training and keeps its statistics.

    Example:
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        >>> [layer.name for layer in batchnorm_layers(model)]  # doctest: +SKIP
        ['batch_normalization']
    """
    # _flatten_layers is Keras 3's own recursive, de-duplicated walk over sublayers;
    # Model.layers lists only the top level.
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def _is_array(value: Any) -> bool:
    return (
        hasattr(value, "shape")
        and hasattr(value, "__getitem__")
        and not isinstance(value, (str, bytes, tuple, list, Mapping))
    )


def _is_input(value: Any) -> bool:
    """An array, or a dict of named arrays (a multi-input model's x)."""
    if _is_array(value):
        return True
    return isinstance(value, Mapping) and bool(value) and all(map(_is_array, value.values()))


def _length(x: Any) -> int:
    array = next(iter(x.values())) if isinstance(x, Mapping) else x
    return int(array.shape[0]) if len(array.shape) else 0


def _slice(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, Mapping):
        return {name: array[start:stop] for name, array in x.items()}
    return x[start:stop]


def _split(x: Any, batch_size: int) -> Iterator[Any]:
    """``x`` cut into ceil(n / batch_size) batches whose sizes differ by at most one.

    Each batch counts once in the average, so a short last batch (one sample: zero
    variance) would count as much as a full one; near-equal sizes avoid that.
    """
    count = _length(x)
    if count == 0:
        raise DataError(
            f"recalibrate_batchnorm: {_DATA_RULE}. Received: x with no samples. Pass the "
            "training data."
        )
    parts = math.ceil(count / batch_size)
    size, extra = divmod(count, parts)
    start = 0
    for part in range(parts):
        stop = start + size + (1 if part < extra else 0)
        yield _slice(x, start, stop)
        start = stop


def _model_input(batch: Any, index: int) -> Any:
    if _is_input(batch):
        return batch
    if isinstance(batch, (tuple, list)) and batch and _is_input(batch[0]):
        return batch[0]
    kind = f"a {type(batch).__name__}"
    if isinstance(batch, (tuple, list)):
        first = type(batch[0]).__name__ if batch else "nothing"
        kind += f" whose first element is {first}"
    raise DataError(
        f"recalibrate_batchnorm: {_DATA_RULE}. Received: batch {index} is {kind}. Convert "
        "the batches to arrays or (x, y) tuples."
    )


def _model_inputs(data: Any, batch_size: int) -> Iterator[Any]:
    if _is_input(data):
        return _split(data, batch_size)
    if isinstance(data, tuple):
        if 1 <= len(data) <= 3 and _is_input(data[0]):
            return _split(data[0], batch_size)
        first = type(data[0]).__name__ if data else "nothing"
        raise DataError(
            f"recalibrate_batchnorm: {_DATA_RULE}. Received: a tuple of {len(data)} whose "
            f"first element is {first}. Pass (x, y) with x an array, or a list of batches."
        )
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise DataError(
            f"recalibrate_batchnorm: {_DATA_RULE}. Received: {type(data).__name__}. Pass "
            "the training inputs as an array, or an iterable of batches."
        )
    return (_model_input(batch, index) for index, batch in enumerate(data, start=1))


def _check_arguments(model: Any, batch_size: Any, max_batches: Any) -> tuple[int, int | None]:
    """``batch_size`` and ``max_batches`` as ints, after checking all three arguments.

    The counts follow :func:`polyak.checks.as_whole_number` (numpy integers too, not
    bools); the message keeps Keras' "Received:" wording and says what each count means.
    """
    if not isinstance(model, keras.layers.Layer):
        raise DataError(
            "recalibrate_batchnorm: model must be a Keras model or layer. Received: "
            f"{type(model).__name__}. For PyTorch modules use polyak.torch.batchnorm."
        )
    counts = []
    for name, value, meaning in (
        ("batch_size", batch_size, "samples per batch when data is an array"),
        ("max_batches", max_batches, "the most batches to use, or None for all"),
    ):
        number = as_whole_number(value, 1)
        if number is None and not (value is None and name == "max_batches"):
            raise DataError(
                f"recalibrate_batchnorm: {name} must be a positive integer ({meaning}). "
                f"Received: {value!r}."
            )
        counts.append(number)
    return counts[0], counts[1]


def _numpy(variable: Any) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(variable), copy=True)


def _statistics(layer: Any) -> dict[str, np.ndarray]:
    """The layer's statistic variables by attribute name, as numpy copies."""
    names = ["moving_mean", "moving_variance"]
    if layer.renorm:
        names += ["moving_stddev", *_RENORM_STATE]
    return {name: _numpy(getattr(layer, name)) for name in names}


def _make_finite(layer: Any) -> None:
    """Replace NaN and infinity in the moving statistics by Keras' initial 0 and 1.

    The first update (momentum 0) computes ``0 * old + batch``, and ``0 * inf`` is NaN.
    """
    for name, initial in (("moving_mean", 0.0), ("moving_variance", 1.0), ("moving_stddev", 1.0)):
        variable = getattr(layer, name, None)
        if variable is None:
            continue
        values = _numpy(variable)
        if not np.all(np.isfinite(values)):
            variable.assign(np.where(np.isfinite(values), values, initial).astype(values.dtype))


def _restore(layer: Any, values: Mapping[str, np.ndarray]) -> None:
    for name, value in values.items():
        getattr(layer, name).assign(value)


class _CountingCall:
    """Stands in for a layer's ``call`` during the pass: sets its momentum per call.

    Before the layer's k-th call in training mode, ``momentum = (k - 1) / k``, so the
    moving statistics are the mean over the calls: exact also for a layer called
    several times per forward (shared) or only in some batches (a branch). Keras
    looks ``call`` up on the layer at each call, so an instance attribute takes over.
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.own = "call" in vars(layer)
        self.original = layer.call
        self.installed = False
        self.calls = 0

    def install(self) -> None:
        self.layer.call = self
        self.installed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # BatchNormalization.call(inputs, training=None, mask=None); Keras passes the
        # resolved training flag as a keyword, a caller may pass it positionally.
        training = kwargs["training"] if "training" in kwargs else (args[1:2] or [None])[0]
        if training and self.layer.trainable:
            self.calls += 1
            self.layer.momentum = (self.calls - 1) / self.calls
        return self.original(*args, **kwargs)

    def remove(self) -> None:
        if not self.installed:
            return
        if self.own:
            self.layer.call = self.original
        else:
            del self.layer.call
        self.installed = False


def recalibrate_batchnorm(
    model: Any, data: Any, batch_size: int = 32, max_batches: int | None = None
) -> Any:
    """Recompute the moving statistics of every BatchNormalization layer of ``model``.

    Averaging checkpoints averages the weights and, separately, each
    ``BatchNormalization`` layer's ``moving_mean`` and ``moving_variance``; the averaged
    statistics are not those of the activations the averaged weights produce.
    :func:`recalibrate_batchnorm` measures them again with one pass over training data.

    How: Keras updates ``moving = momentum * moving + (1 - momentum) * batch_statistic``
    when a trainable layer is called with ``training=True``, reading ``self.momentum`` at
    each call (eagerly, on every backend: the model is called directly, not through a
    compiled train step). During the pass each layer's ``call`` is wrapped to count its
    calls in training mode and set ``momentum = (k - 1) / k`` before the k-th, which makes
    the moving statistic the running mean of the batch statistics. So over the K calls of
    the pass (K batches, or more for a layer called several times per forward), for each
    channel::

        moving_mean     = (1 / K) * sum_k mean_k
        moving_variance = (1 / K) * sum_k var_k,   var_k = sum_i (a_i - mean_k)^2 / n_k

    with ``a_i`` the n_k values entering the layer for that channel in batch k (every axis
    but the layer's ``axis``, masked positions left out). ``var_k`` is Keras' biased batch
    variance (divisor n_k), which is also what the layer normalizes with in training;
    PyTorch's running variance uses n_k - 1 instead. Each batch counts once whatever its
    size; arrays are therefore cut into batches of near-equal size (see ``batch_size``).
    Layers built with ``renorm=True`` track a moving standard deviation: for them
    ``moving_stddev = (1 / K) * sum_k sqrt(var_k + epsilon)`` and ``moving_variance =
    max(moving_stddev**2 - epsilon, 0)``, as the layer itself defines them; their
    ``renorm_mean`` and ``renorm_stddev`` are put back as they were after the pass.

    The first call (momentum 0) overwrites the old statistics, which amounts to a reset;
    the old values stay in place until then, so that layers the model calls in inference
    mode during the pass still normalize with their own statistics. Those layers, and any
    other that no batch reaches in training mode, keep their statistics, with a warning:
    for example a backbone that a subclassed model's ``call`` runs as ``self.base(x,
    training=False)``. (In a functional model, Keras 3 passes the outer ``training=True``
    to every layer, overriding a ``training=False`` given when the graph was built, in
    training as in this pass.)
    A ``BatchNormalization`` layer with ``trainable=False`` (or inside a frozen model)
    runs in inference mode in Keras even in training and is left alone, without warning.

    The pass calls ``model(x, training=True)``, so dropout is active as during training;
    afterwards the model is used as usual, ``training=False`` normalizing with the new
    statistics.

    For each layer :func:`batchnorm_layers` lists, over its K calls in the pass (one
    per batch, unless the model calls it more than once)::

        moving_mean = (1 / K) * sum_k mean_k,  moving_variance = (1 / K) * sum_k var_k

    with ``mean_k`` and ``var_k`` the per-channel mean and biased variance (divisor
    n_k) of the values entering the layer when ``model(x, training=True)`` runs on a
    batch (see above for renorm layers). Each layer's ``momentum`` is put
    back afterwards, also when the forward raises; then the statistics are also put
    back as they were. A layer that no batch reached in training mode (a sub-model
    that a subclassed model calls with ``training=False``, a branch not taken) keeps
    its previous statistics, with a warning.

    Args:
        model: a Keras 3 model (or layer), changed in place; usually one holding
            averaged weights.
        data: the training inputs: an array ``x`` (or a dict of named arrays), a tuple
            ``(x, y)`` or ``(x, y, sample_weight)`` (only x is used), or any other
            iterable of batches (a list, a generator, a ``keras.utils.PyDataset``, a
            ``tf.data.Dataset``, a torch ``DataLoader``), each an array, a dict of named
            arrays, or a tuple or list whose first element is the input.
        batch_size: for array data, the largest batch: x is cut into
            ceil(n / batch_size) batches whose sizes differ by at most one. Ignored for
            an iterable of batches, which are used as they come.
        max_batches: use at most this many batches (all by default).

    Returns:
        ``model``, recalibrated. A model without trainable BatchNormalization layers is
        returned unchanged without reading ``data`` (check with
        :func:`batchnorm_layers` to tell the two apart).

    Raises:
        DataError: ``model`` is not a Keras model or layer; ``data`` holds no samples
            or batches or is of an unsupported type; a batch is of an unsupported type;
            or ``batch_size`` or ``max_batches`` is not a positive integer.

    Example:
        >>> from polyak.keras import load_averaged_model
        >>> model = load_averaged_model("snapshots/", "equal", model=model)  # doctest: +SKIP
        >>> recalibrate_batchnorm(model, x_train, batch_size=64)  # doctest: +SKIP
    """
    batch_size, max_batches = _check_arguments(model, batch_size, max_batches)
    layers = batchnorm_layers(model)
    if not layers:
        return model
    inputs = _model_inputs(data, batch_size)
    if max_batches is not None:
        inputs = itertools.islice(inputs, max_batches)
    try:
        first = next(inputs)
    except StopIteration:
        raise DataError(
            f"recalibrate_batchnorm: {_DATA_RULE}. Received: an empty "
            f"{type(data).__name__}. Pass at least one batch of training data."
        ) from None

    momenta = {layer: layer.momentum for layer in layers}
    saved = {layer: _statistics(layer) for layer in layers if layer.built}
    counters = {layer: _CountingCall(layer) for layer in layers}
    completed = False
    try:
        for layer in saved:
            _make_finite(layer)
        for counter in counters.values():
            counter.install()
        for x in itertools.chain([first], inputs):
            model(x, training=True)
        completed = True
    finally:
        unreached = []
        for layer, counter in counters.items():
            counter.remove()
            layer.momentum = momenta[layer]
            reached = completed and counter.calls > 0
            if not reached:
                unreached.append(layer)
            if layer in saved and not reached:
                _restore(layer, saved[layer])
            elif layer in saved and layer.renorm:
                _restore(layer, {name: saved[layer][name] for name in _RENORM_STATE})
    if unreached:
        listed = ", ".join(layer.name for layer in unreached)
        warnings.warn(
            f"recalibrate_batchnorm: no batch reached BatchNormalization layer(s) {listed} in "
            "training mode; they keep their previous moving statistics. Check that the model "
            "calls them with the training flag it receives.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
