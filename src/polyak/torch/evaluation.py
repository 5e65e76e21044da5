"""Evaluating PyTorch checkpoints: one reused module, data or a user function, a sweep.

One reused module, how candidates are scored and recalibrated: :class:`TorchEvaluator`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    import_callable,
    resolve_metric,
    sweep_metric,
    with_recalibrated,
)
from polyak.discovery import find_checkpoints
from polyak.engine import closing_all, open_members
from polyak.errors import CheckpointError, DataError, require
from polyak.formats.base import DTYPES, dtype_name
from polyak.sweep import SweepResult, run_sweep
from polyak.torch.batchnorm import recalibrate_batchnorm
from polyak.weights.schemes import Scheme, parse_schemes

torch = require("torch", "torch", "polyak.torch")

__all__ = [
    "TorchEvaluator",
    "default_device",
    "load_tensors",
    "module_tensors",
    "resolve_module",
    "sweep",
]

_MAX_LISTED_NAMES = 5
Recalibrate = Dataset | tuple | str | Path | Callable[[Any], None]


def default_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_module(model: Any) -> Any:
    """The ``nn.Module`` to evaluate checkpoints with.

    Args:
        model: an ``nn.Module``, a callable returning one, or a factory
            ``"module:function"`` importable from the working directory.

    Raises:
        DataError: the spec cannot be imported or does not give an ``nn.Module``.
    """
    if isinstance(model, torch.nn.Module):
        return model
    if model is None:
        raise DataError(
            "PyTorch checkpoints hold weights only: give the architecture with --model "
            "module:function (a function returning the nn.Module)."
        )
    factory = import_callable(model, "model") if isinstance(model, str) else model
    if not callable(factory):
        raise DataError(f"model {model!r}: expected an nn.Module, a callable or 'module:function'.")
    built = factory()
    if not isinstance(built, torch.nn.Module):
        raise DataError(
            f"model {model}: the factory returned {type(built).__name__}, not a torch.nn.Module."
        )
    return built


def _as_torch(array: np.ndarray) -> Any:
    """A torch tensor sharing the array's memory where torch allows it (bfloat16 too)."""
    with warnings.catch_warnings():
        # Memory-mapped, read-only arrays: load_state_dict only reads them.
        warnings.simplefilter("ignore", UserWarning)
        if dtype_name(array.dtype) == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(array))


def _to_numpy(tensor: Any) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(DTYPES["bfloat16"])
    return tensor.numpy()


def load_tensors(
    module: Any, tensors: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> None:
    """Load numpy tensors into a module's parameters and buffers, all of them.

    Raises:
        CheckpointError: names the module lacks or the tensors lack (``_extra_state``
            aside), or shapes that differ, listing the first few.
    """
    state = {name: _as_torch(array) for name, array in tensors.items()}
    try:
        outcome = module.load_state_dict(state, strict=False)
    except RuntimeError as error:
        reason = str(error).replace("\n", " ").replace("\t", "")
        raise CheckpointError(f"{source}: does not fit the model ({reason[:400]}).") from None
    missing = [name for name in outcome.missing_keys if not name.endswith("_extra_state")]
    unexpected = list(outcome.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model's {', '.join(missing[:_MAX_LISTED_NAMES])} are missing")
        if unexpected:
            parts.append(f"{', '.join(unexpected[:_MAX_LISTED_NAMES])} are not in the model")
        raise CheckpointError(
            f"{source}: does not fit the model: {'; '.join(parts)} "
            f"({len(missing)} missing, {len(unexpected)} unexpected). Give the architecture "
            "the checkpoints were saved from."
        )


def module_tensors(module: Any, names: Sequence[str], like: Mapping[str, np.ndarray]) -> dict:
    """The module's current values of ``names``, as numpy in the dtypes of ``like``."""
    state = module.state_dict()
    return {name: _to_numpy(state[name]).astype(like[name].dtype, copy=False) for name in names}


class TorchEvaluator:
    """``evaluate(tensors)`` on one reused ``nn.Module``: data and a metric, or a function.

    One ``nn.Module`` serves every candidate of a sweep: each candidate's tensors are
    loaded with ``load_state_dict`` (every parameter and buffer must be given: missing
    or unexpected names are an error, except ``_extra_state`` entries, which are not
    tensors), then the module is scored. No module is built per candidate.

    Scoring, either:

    - on data (``x``, ``y`` from ``.npz`` or memory): the module in eval mode predicts
      ``module(x_batch)`` under ``torch.no_grad()``; ``accuracy`` takes the argmax of the
      outputs (logits or probabilities alike); ``loss`` is the cross-entropy of the
      outputs taken as logits (``y`` as class indices or one-hot; binary cross-entropy
      for one output); lower is better. Floating ``x`` is cast to the module's
      floating dtype;
    - or with the user's ``evaluate(module)``, returning a float or
      ``{"test": ..., "validation": ...}``.

    BatchNorm recalibration (``recalibrate``): each candidate is also scored after
    :func:`polyak.torch.batchnorm.recalibrate_batchnorm` on the given data (its ``x`` in
    batches) or after the user's ``recalibrate(module)``; the sweep reports both numbers.

    The module runs on ``device``: by default CUDA when torch sees a GPU, else the CPU.

    Args:
        module: the model, moved to ``device`` once.
        test: test data (with ``metric``), or None with ``evaluate``.
        validation: validation data, optional.
        metric: ``"accuracy"``, ``"loss"``, ``(y_true, y_pred) -> float`` or
            ``"module:function"``.
        evaluate: instead of data, ``evaluate(module)`` returning a float or
            ``{"test": ..., "validation": ...}``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: a GPU if there is one.
        batch_size: examples per forward pass.
        recalibrate: also score each candidate after BatchNorm recalibration on this
            data (its ``x``) or by this callable ``recalibrate(module)``.
    """

    def __init__(
        self,
        module: Any,
        *,
        test: Dataset | None = None,
        validation: Dataset | None = None,
        metric: str | Callable = "accuracy",
        evaluate: Callable[[Any], Any] | None = None,
        device: str | None = None,
        batch_size: int = 256,
        recalibrate: Recalibrate | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1; received {batch_size}.")
        self.device = torch.device(device or default_device())
        self.module = module.to(self.device)
        self.evaluate = evaluate
        self.splits = (
            {"test": test} if validation is None else {"test": test, "validation": validation}
        )
        self.metric, self._function, self.higher_is_better = resolve_metric(metric)
        self.batch_size = batch_size
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

    def _recalibration(self, recalibrate: Recalibrate | None) -> Callable[[Any], None] | None:
        if recalibrate is None:
            return None
        if callable(recalibrate) and not isinstance(recalibrate, (Dataset, tuple)):
            return recalibrate
        data = as_dataset(recalibrate, "recalibration")
        return lambda module: recalibrate_batchnorm(module, self._batches(data.x))

    def _inputs(self, x: np.ndarray) -> Any:
        tensor = torch.from_numpy(np.ascontiguousarray(x))
        if tensor.is_floating_point():
            floating = [p for p in self.module.parameters() if p.is_floating_point()]
            if floating:
                tensor = tensor.to(floating[0].dtype)
        return tensor.to(self.device)

    def _batches(self, x: np.ndarray) -> Iterator[Any]:
        for start in range(0, len(x), self.batch_size):
            yield self._inputs(x[start : start + self.batch_size])

    def predict(self, data: Dataset) -> np.ndarray:
        """The module's outputs on ``data.x``, in eval mode, as numpy.

        In a torchrun group (:meth:`use_group`), each process predicts on its share
        and the outputs are gathered: every process gets them all.
        """
        shared = self.group is not None and len(data.x) >= self.group.size
        x = data.x[self.group.share(len(data.x))] if shared else data.x
        was_training = self.module.training
        self.module.eval()
        outputs = []
        try:
            with torch.no_grad():
                for batch in self._batches(x):
                    output = self.module(batch)
                    if not isinstance(output, torch.Tensor):
                        raise DataError(
                            f"data {data.name}: the model returns {type(output).__name__}, not "
                            "a tensor; score it with your own --eval module:function."
                        )
                    outputs.append(_to_numpy(output.float()))
        except DataError:
            raise
        except Exception as error:  # torch raises many types for inputs a model cannot take
            raise DataError(
                f"data {data.name}: the model cannot predict on it ({str(error).splitlines()[0]})."
            ) from None
        finally:
            self.module.train(was_training)
        predictions = np.concatenate(outputs)
        return self.group.concatenate(predictions) if shared else predictions

    def _losses(self, y: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Each example's cross-entropy (float64), the outputs taken as logits."""
        functional = torch.nn.functional
        logits = torch.from_numpy(outputs).double()
        if logits.ndim == 1 or logits.shape[-1] == 1:
            target = torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(logits.shape))
            losses = functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            if y.ndim > 1 and y.shape[-1] > 1:
                target = torch.from_numpy(np.asarray(y, dtype=np.float64))
            else:
                target = torch.from_numpy(np.asarray(y).reshape(-1).astype(np.int64))
            losses = functional.cross_entropy(logits, target, reduction="none")
        return losses.numpy().reshape(len(outputs), -1).mean(axis=1)

    def _scores(self) -> float | dict[str, Any]:
        if self.evaluate is not None:
            return self.evaluate(self.module)
        scores: dict[str, Any] = {}
        for split, data in self.splits.items():
            outputs = self.predict(data)
            outcomes = None
            if self._function is None or self._function is accuracy:
                check_labels(data, outputs)
            if self._function is None:
                outcomes = self._losses(data.y, outputs)
                scores[split] = float(np.mean(outcomes))
            else:
                scores[split] = float(self._function(data.y, outputs))
                if self._function is accuracy:
                    outcomes = correct(data.y, outputs)
            if split == "test" and outcomes is not None:
                scores["outcomes"] = outcomes
        return scores

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> float | dict[str, Any]:
        load_tensors(self.module, tensors)
        self.evaluations += 1
        plain = self._scores()
        if self._recalibrate is None:
            return plain
        self._recalibrate(self.module)
        return with_recalibrated(plain, self._scores())

    def recalibrated_tensors(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``tensors`` with the BatchNorm statistics recalibrated, for writing the best out."""
        if self._recalibrate is None:
            return dict(tensors)
        load_tensors(self.module, tensors)
        self._recalibrate(self.module)
        return module_tensors(self.module, list(tensors), tensors)


def sweep(
    paths: str | Path | Sequence[str | Path],
    test_data: Dataset | tuple | str | Path | None = None,
    validation_data: Dataset | tuple | str | Path | None = None,
    *,
    model: Any,
    evaluate: Callable[[Any], float | Mapping[str, float]] | None = None,
    schemes: str | Sequence[str | Scheme] = "equal,linear,exp:2",
    last: int | None = None,
    metric: str | Callable = "accuracy",
    higher_is_better: bool | None = None,
    device: str | None = None,
    batch_size: int = 256,
    key: str | None = None,
    recalibrate: Recalibrate | None = None,
    posthoc: Sequence[float] = (),
    posthoc_directory: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Sweep PyTorch checkpoints: every member and every (scheme, n) average, evaluated.

    Each checkpoint is read once (twice with ``greedy``); one module is reused for
    every candidate, and a module the caller passed gets its state (and device) back
    at the end. Give either data (``test_data``, optionally
    ``validation_data``, and a ``metric``) or your own ``evaluate(module)``.

    Args:
        paths: ``.pt``/``.pth``/``.bin``/``.ckpt``, safetensors (single or sharded,
            Hugging Face ``checkpoint-N/`` directories) or ``.npz`` checkpoints.
        test_data: ``(x, y)``, a Dataset or an ``.npz`` path.
        validation_data: the same; when given, the best candidate is chosen on it.
        model: the architecture: an ``nn.Module``, a callable returning one, or
            ``"module:function"``.
        evaluate: instead of data, ``evaluate(module) -> float`` or
            ``-> {"test": float, "validation": float}``, called with the module
            holding each candidate's weights.
            It may add ``"outcomes"``: each test example's outcome (bool correct or
            not, or its loss), for the report's interval (see :mod:`polyak.sweep`).
        schemes: e.g. ``"equal,linear,exp:2"``, ``"exp:0.5,1,2,4,8"``, ``"greedy"``.
        last: sweep the ``last`` newest checkpoints only.
        metric: with data: ``"accuracy"``, ``"loss"``, ``(y_true, y_pred) -> float`` or
            ``"module:function"``; with ``evaluate``: the name for the report.
        higher_is_better: the metric's direction (default: True, False for loss).
        device: where the module runs; default a GPU if torch sees one.
        batch_size: examples per forward pass (and per recalibration batch).
        key: for checkpoint dicts, the entry holding the weights.
        recalibrate: also score every candidate after BatchNorm recalibration on
            this data (``.npz``, ``(x, y)`` or Dataset) or by ``recalibrate(module)``.
        posthoc: widths of post-hoc EMA candidates (``posthoc:SIGMA_REL``), from the
            EMA profiles tracked in ``posthoc_directory`` (default: the newest
            checkpoint's directory); see :mod:`polyak.posthoc`.

    Example:
        >>> from polyak.torch import sweep
        >>> result = sweep("run/", "test.npz", "val.npz", model="net:build")  # doctest: +SKIP
    """
    check_data_or_evaluate(test_data, validation_data, evaluate)
    members = find_checkpoints(paths, last=last)
    parsed = parse_schemes(schemes if isinstance(schemes, str) else [str(s) for s in schemes])
    test = None if test_data is None else as_dataset(test_data, "test")
    validation = None if validation_data is None else as_dataset(validation_data, "validation")
    module = resolve_module(model)
    # A module the caller gave gets its own state back afterwards.
    original = (
        {name: value.detach().clone() for name, value in module.state_dict().items()}
        if module is model
        else None
    )
    device_before = next((p.device for p in module.parameters()), None)
    evaluator = TorchEvaluator(
        module,
        test=test,
        validation=validation,
        metric=metric if evaluate is None else "accuracy",
        evaluate=evaluate,
        device=device,
        batch_size=batch_size,
        recalibrate=recalibrate,
    )
    name, direction = sweep_metric(evaluator, evaluate, metric, higher_is_better)
    try:
        with closing_all(open_members(members, key)) as readers:
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
            module.load_state_dict(original)
            if device_before is not None:
                module.to(device_before)
