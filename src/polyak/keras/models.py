"""Keras models and polyak's tensors: averaging models, loading averages, weight maps.

How a checkpoint's tensor names meet a model's variables: :class:`KerasWeightMap`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polyak.averaging import average, average_readers
from polyak.data import import_callable
from polyak.discovery import find_checkpoints
from polyak.errors import CheckpointError, DataError, require
from polyak.formats import format_of, open_checkpoint
from polyak.formats.base import (
    ArrayReader,
    CheckpointReader,
    PlannedTensors,
    TensorInfo,
    numpy_dtype,
)
from polyak.weights.schemes import Scheme, parse_scheme

keras = require("keras", "keras", "polyak.keras")

__all__ = [
    "FULL_MODEL_FORMATS",
    "KerasWeightMap",
    "average_models",
    "load_averaged_model",
    "resolve_model",
]

# Formats that carry the architecture, so that the model can come from the checkpoint.
FULL_MODEL_FORMATS = ("keras", "keras-h5")
_PROBE_SUFFIX = {"keras": ".keras", "keras-h5": ".h5", "keras-weights": ".weights.h5"}
# Small integers are exact in every float dtype down to bfloat16 (8 bits of precision).
_PROBE_BASE = 128


def average_models(models: Sequence[Any], weights: str | Scheme | Sequence[float] = "equal") -> Any:
    """A new model whose weights are the weighted average of ``models``' weights.

    The in-memory form of the workflow, with the numeric policy of
    ``polyak.engine`` (float weights averaged, integer ones from the newest).

    Args:
        models: Keras models of one architecture, newest first.
        weights: a scheme or spec (``"linear"``, ``"exp:2"``) or explicit weights,
            newest first.

    Returns:
        A clone of ``models[0]`` holding the averaged weights (not compiled).
    """
    if not models:
        raise DataError("average_models needs at least one model.")
    if isinstance(weights, (str, Scheme)):
        member_weights = parse_scheme(weights).weights(len(models))
    else:
        member_weights = np.asarray(weights, dtype=np.float64)
    readers = [
        ArrayReader(
            f"model {index} ({model.name})",
            {str(i): np.asarray(w) for i, w in enumerate(model.get_weights())},
        )
        for index, model in enumerate(models)
    ]
    # The engine reuses its output buffer for every tensor: copy each one out.
    averaged = {
        name: np.array(array, copy=True) for name, array in average_readers(readers, member_weights)
    }
    result = keras.models.clone_model(models[0])
    result.set_weights([np.array(averaged[str(i)]) for i in range(len(averaged))])
    return result


def _load_model_file(path: Path) -> Any:
    try:
        return keras.models.load_model(path)
    except Exception as error:  # Keras raises many types for a file it cannot rebuild
        raise CheckpointError(
            f"checkpoint {path}: Keras cannot load the model ({error})."
        ) from None


def resolve_model(model: Any, checkpoint: str | Path) -> Any:
    """The Keras model to evaluate checkpoints with.

    Args:
        model: None (take the architecture from a ``.keras`` or legacy ``.h5``
            checkpoint), a ``keras.Model``, a callable returning one, a model file
            path, or a factory ``"module:function"``.
        checkpoint: a member, used when ``model`` is None.
    """
    if model is None:
        fmt = format_of(checkpoint)
        if fmt.name not in FULL_MODEL_FORMATS:
            raise DataError(
                f"checkpoint {checkpoint}: a {fmt.name} file holds weights only; give the "
                "architecture with --model (a .keras file or a factory module:function)."
            )
        return _load_model_file(Path(checkpoint))
    if isinstance(model, keras.Model):
        return model
    if isinstance(model, (str, Path)) and Path(model).suffix in {".keras", ".h5"}:
        if not Path(model).is_file():
            raise DataError(f"model {model}: no such file.")
        return _load_model_file(Path(model))
    if isinstance(model, str) and ":" not in model:
        raise DataError(
            f"model {model!r}: give a model file (.keras, .h5) or a factory 'module:function'."
        )
    factory = import_callable(model, "model") if isinstance(model, str) else model
    if not callable(factory):
        raise DataError(f"model {model!r}: expected a keras.Model, a callable, or a file.")
    built = factory()
    if not isinstance(built, keras.Model):
        raise DataError(
            f"model {model}: the factory returned {type(built).__name__}, not a keras.Model."
        )
    return built


def _marker(info: TensorInfo, index: int | None, power: int) -> np.ndarray:
    """Tensor ``index``'s digit ``power`` in base 128, plus one, as a constant tensor."""
    if index is None:  # bool tensors carry no marker
        return np.zeros(info.shape, numpy_dtype(info.dtype))
    digit = (index // _PROBE_BASE**power) % _PROBE_BASE + 1
    return np.full(info.shape, digit, numpy_dtype(info.dtype))


class KerasWeightMap:
    """Which model variable each tensor of a Keras checkpoint loads into.

    A checkpoint names its tensors by their place in the file (``layers/dense/vars/0``,
    ``model_weights/dense/sequential/dense/kernel``); a model holds variables. A
    :class:`KerasWeightMap` links the two once, through Keras' own ``load_weights``: it
    writes probe files of the checkpoint's format whose tensors carry their own index as
    values, loads them into the model, and reads back which variable received which
    tensor. Every later candidate is then assigned variable by variable, without files,
    clones or compiles.

    Args:
        model: the model (built: it must have its variables).
        template: a reader of one member (``.weights.h5``, ``.keras`` or legacy ``.h5``).

    Raises:
        CheckpointError: the model and the checkpoint do not match one to one.
    """

    def __init__(self, model: Any, template: CheckpointReader) -> None:
        self.model = model
        self.template_path = template.path
        fmt = format_of(template.path)
        if fmt.name not in _PROBE_SUFFIX:
            raise DataError(
                f"checkpoint {template.path}: Keras models are evaluated from Keras checkpoints "
                f"(.keras, .h5, .weights.h5); this one is {fmt.name}."
            )
        plan = [(name, template.info(name)) for name in template.names()]
        probed = [(name, info) for name, info in plan if info.dtype != "bool"]
        probe_index = {name: k for k, (name, _) in enumerate(probed)}
        variables = [v for v in model.weights]
        original = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
        passes = max(1, math.ceil(math.log(len(probed) + 1, _PROBE_BASE)))
        indices = [0] * len(variables)
        readable = [True] * len(variables)
        try:
            with tempfile.TemporaryDirectory(prefix="polyak-probe-") as directory:
                for power in range(passes):
                    probe = Path(directory) / f"probe{power}{_PROBE_SUFFIX[fmt.name]}"
                    markers = [
                        (name, _marker(info, probe_index.get(name), power)) for name, info in plan
                    ]
                    fmt.write(probe, PlannedTensors(plan, markers), template)
                    try:
                        model.load_weights(probe)
                    except Exception as error:
                        raise CheckpointError(
                            f"checkpoint {template.path}: does not fit the model "
                            f"({str(error).splitlines()[0]})."
                        ) from None
                    for position, variable in enumerate(variables):
                        value = np.asarray(keras.ops.convert_to_numpy(variable)).reshape(-1)
                        if value.size == 0 or not np.all(value == value[0]):
                            readable[position] = False
                            continue
                        digit = round(float(value[0])) - 1
                        if not 0 <= digit < _PROBE_BASE:
                            readable[position] = False
                            continue
                        indices[position] += digit * _PROBE_BASE**power
        finally:
            for variable, value in zip(variables, original, strict=True):
                variable.assign(value)
        self.pairs: list[tuple[Any, str]] = []
        mapped: dict[str, Any] = {}
        for position, variable in enumerate(variables):
            if not readable[position] or indices[position] >= len(probed):
                continue
            name, info = probed[indices[position]]
            if tuple(variable.shape) != info.shape or name in mapped:
                continue
            mapped[name] = variable
            self.pairs.append((variable, name))
        missing = [name for name, _ in probed if name not in mapped]
        if missing:
            raise CheckpointError(
                f"checkpoint {template.path}: tensor {missing[0]} loads into no variable of the "
                f"model ({len(missing)} such tensor(s)); the model's architecture differs."
            )
        unmapped = [
            v.path for v in model.trainable_weights if all(v is not p for p, _ in self.pairs)
        ]
        if unmapped:
            raise CheckpointError(
                f"checkpoint {template.path}: holds no value for the model's variable "
                f"{unmapped[0]}; the model's architecture differs."
            )

    def assign(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Load tensors (by checkpoint name) into the model's variables."""
        for variable, name in self.pairs:
            variable.assign(tensors[name])

    def read(self, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The variables' current values by checkpoint name, in the dtypes of ``like``."""
        return {
            name: np.asarray(keras.ops.convert_to_numpy(variable)).astype(
                like[name].dtype, copy=False
            )
            for variable, name in self.pairs
        }


def load_averaged_model(
    paths: str | Path | Sequence[str | Path],
    scheme: str | Scheme = "equal",
    last: int | None = None,
    *,
    model: Any = None,
) -> Any:
    """Average Keras checkpoints and return the model holding the average.

    Args:
        paths: ``.keras``, legacy ``.h5`` or ``.weights.h5`` checkpoints (files,
            directories or globs), ordered newest first by name.
        scheme: ``"equal"``, ``"linear"``, ``"exp:2"``, ``"custom:..."`` or a Scheme.
        last: average only the ``last`` newest.
        model: for ``.weights.h5`` files, the architecture: a ``keras.Model``, a
            callable returning one, a model file, or ``"module:function"``; for full
            models it defaults to the newest checkpoint's own architecture.

    Example:
        >>> averaged = load_averaged_model("snapshots/", "exp:2")  # doctest: +SKIP
    """
    members = find_checkpoints(paths, last=last)
    target = resolve_model(model, members[0].path)
    tensors = average([m.path for m in members], scheme=scheme)
    with open_checkpoint(members[0].path) as template:
        KerasWeightMap(target, template).assign(tensors)
    return target
