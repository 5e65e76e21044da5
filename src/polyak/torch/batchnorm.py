"""Recomputing BatchNorm running statistics after averaging (PyTorch).

The formulas, and why not ``torch.optim.swa_utils.update_bn``: :func:`recalibrate_batchnorm`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> loader = torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=16)
    >>> model = recalibrate_batchnorm(model, loader)
    >>> int(model[1].num_batches_tracked)
    4
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from polyak.checks import as_whole_number
from polyak.errors import DataError, require

torch = require("torch", "torch", "polyak.torch")

__all__ = ["batchnorm_layers", "recalibrate_batchnorm"]

_BATCH_RULE = (
    "without forward=, each batch must be a tensor, a tuple or list whose first element is "
    "the model's input, or a dict of keyword arguments for the model"
)


def batchnorm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers of ``model`` that :func:`recalibrate_batchnorm` recomputes.

    These are the ``torch.nn.modules.batchnorm._BatchNorm`` modules (BatchNorm1d/2d/3d,
    SyncBatchNorm and their lazy forms) that track running statistics, in
    ``model.modules()`` order. Layers built with ``track_running_stats=False`` always
    normalize with batch statistics and have nothing to recompute.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        >>> batchnorm_layers(model) == [model[1]]
        True
    """
    return [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    ]


def _default_device(model: torch.nn.Module) -> torch.device | None:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _to_device(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor in it (inside tuples, lists and dicts too) on ``device``."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_to_device(item, device) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(item, device) for item in value)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _call_model(model: torch.nn.Module, batch: Any, index: int, device: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(_to_device(batch, device))
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError(
                f"recalibrate_batchnorm: {_BATCH_RULE}. Received: batch {index} is an empty "
                f"{type(batch).__name__}. Pass batches that hold the input first."
            )
        model(_to_device(batch[0], device))
    elif isinstance(batch, Mapping):
        model(**_to_device(dict(batch), device))
    else:
        raise DataError(
            f"recalibrate_batchnorm: {_BATCH_RULE}. Received: batch {index} is a "
            f"{type(batch).__module__}.{type(batch).__qualname__}. Convert the batches, or "
            "pass forward=lambda model, batch: model(...) to feed them yourself."
        )


def _check_arguments(model: Any, batches: Any, max_batches: Any) -> int | None:
    """``max_batches`` as an int or None, after checking all three arguments.

    ``max_batches`` follows :func:`polyak.checks.as_whole_number` (numpy integers and
    0-d integer tensors too, not bools), refused in the module's "Received:" wording.
    """
    if not isinstance(model, torch.nn.Module):
        raise DataError(
            "recalibrate_batchnorm: model must be a torch.nn.Module. Received: "
            f"{type(model).__name__}. For Keras models use polyak.keras.batchnorm."
        )
    if isinstance(batches, torch.Tensor):
        raise DataError(
            "recalibrate_batchnorm: batches must be an iterable of batches. Received: one "
            f"tensor of shape {tuple(batches.shape)}, which would be iterated row by row. "
            "Pass a DataLoader, x.split(batch_size), or [x] for a single batch."
        )
    if not isinstance(batches, Iterable):
        raise DataError(
            "recalibrate_batchnorm: batches must be an iterable of batches (a DataLoader, a "
            f"list of tensors). Received: {type(batches).__name__}."
        )
    if max_batches is None:
        return None
    number = as_whole_number(max_batches, 1)
    if number is None:
        raise DataError(
            "recalibrate_batchnorm: max_batches must be a positive integer or None (all "
            f"batches). Received: {max_batches!r}."
        )
    return number


def recalibrate_batchnorm(
    model: torch.nn.Module,
    batches: Iterable[Any],
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> torch.nn.Module:
    """Recompute the running statistics of every BatchNorm layer of ``model`` from data.

    Averaging checkpoints averages the weights and, separately, each BatchNorm layer's
    ``running_mean`` and ``running_var``; the averaged statistics are not those of the
    activations the averaged weights produce. :func:`recalibrate_batchnorm` measures them
    again with one pass over training data, as SWA does (Izmailov et al., 2018).

    What results, for each BatchNorm layer that tracks running statistics, over the K
    batches of the pass (torch's cumulative average, ``momentum=None``)::

        running_mean = (1 / K) * sum_k mean_k
        running_var  = (1 / K) * sum_k var_k,   var_k = sum_i (a_i - mean_k)^2 / (n_k - 1)

    where ``a_i`` are the n_k activations entering the layer for one channel in batch k
    (n_k = batch size times the spatial positions), so ``var_k`` is torch's unbiased batch
    variance. Each batch counts once whatever its size: give batches of equal size (a
    ``DataLoader`` with ``drop_last=True``) for a sample-weighted result. The pass runs in
    train mode, so each layer normalizes with its batch's statistics and dropout is active,
    as during training; ``num_batches_tracked`` ends as the number of calls the layer saw.
    In eval mode afterwards the layers normalize with these statistics.

    Why not ``torch.optim.swa_utils.update_bn``, which does the same pass: it takes only
    tensors or tuples (no dict batches, no custom forward, no limit on the number of
    batches); it restores ``model.train(was_training)``, which overwrites the training flag
    of submodules that differed from the root (frozen BatchNorm layers in eval mode); it
    restores neither momentum nor training flags when the forward raises; and it fails on
    a lazy BatchNorm layer that is not yet initialized. This module does the same pass
    with those handled, and leaves the statistics as they were when the pass fails.

    Resets the running statistics of each layer :func:`batchnorm_layers` lists and runs
    ``model`` on ``batches`` in train mode under ``torch.no_grad()`` with
    ``momentum=None``, so that over the K batches of the pass::

        running_mean = (1 / K) * sum_k mean_k,  running_var = (1 / K) * sum_k var_k

    with ``mean_k`` and ``var_k`` the per-channel mean and unbiased variance (divisor
    n_k - 1) of the activations entering the layer in batch k. Afterwards every
    module's ``training`` flag and every layer's ``momentum`` are as before, also when
    the forward raises; then the running statistics are also put back as they were.
    A layer that the pass never reached keeps its previous statistics, with a warning.

    Args:
        model: the model, changed in place; usually one holding averaged weights.
        batches: an iterable of batches, e.g. a ``DataLoader`` over training data. A
            batch is a tensor (``model(batch)``), a tuple or list whose first element
            is the input (``model(batch[0])``; labels are ignored), or a dict
            (``model(**batch)``); any batch when ``forward`` is given.
        forward: ``forward(model, batch)`` runs the model on one batch, for batches
            of any other shape; its result is ignored.
        max_batches: use at most this many batches (all by default).
        device: where every tensor in a batch (inside tuples, lists and dicts too) is
            moved before the forward; by default the device of the model's first
            parameter (or buffer).

    Returns:
        ``model``, recalibrated. A model without BatchNorm layers that track running
        statistics is returned unchanged without reading ``batches`` (check with
        :func:`batchnorm_layers` to tell the two apart).

    Raises:
        DataError: ``model`` is not a ``torch.nn.Module``; ``batches`` is one tensor,
            not iterable, or holds no batches; ``max_batches`` is not a positive
            integer; or a batch is of a type that cannot be fed to the model.

    Example:
        >>> import polyak
        >>> model.load_state_dict(  # doctest: +SKIP
        ...     {k: torch.from_numpy(v) for k, v in polyak.average("run/*.pt").items()}
        ... )
        >>> recalibrate_batchnorm(model, train_loader, max_batches=100)  # doctest: +SKIP
    """
    max_batches = _check_arguments(model, batches, max_batches)
    layers = batchnorm_layers(model)
    if not layers:
        return model
    target = torch.device(device) if device is not None else _default_device(model)

    iterator = iter(batches)
    if max_batches is not None:
        iterator = itertools.islice(iterator, max_batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError(
            "recalibrate_batchnorm: batches must hold at least one batch. Received: an empty "
            f"{type(batches).__name__}. Pass the training data, e.g. a DataLoader over it."
        ) from None

    flags = {module: module.training for module in model.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    saved = {
        layer: {
            name: getattr(layer, name).clone()
            for name in ("running_mean", "running_var", "num_batches_tracked")
            if not torch.nn.parameter.is_lazy(getattr(layer, name))
        }
        for layer in layers
    }
    completed = False
    try:
        with torch.no_grad():
            for layer in layers:
                layer.momentum = None
                # An uninitialized lazy layer resets itself when its first input arrives.
                if not torch.nn.parameter.is_lazy(layer.running_mean):
                    layer.reset_running_stats()
            model.train()
            for index, batch in enumerate(itertools.chain([first], iterator), start=1):
                if forward is not None:
                    forward(model, _to_device(batch, target))
                else:
                    _call_model(model, batch, index, target)
        completed = True
    finally:
        for module, training in flags.items():
            module.training = training
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        unreached = [
            layer
            for layer in layers
            if not completed
            or (
                not torch.nn.parameter.is_lazy(layer.num_batches_tracked)
                and int(layer.num_batches_tracked) == 0
            )
        ]
        with torch.no_grad():
            for layer in unreached:
                for name, value in saved[layer].items():
                    getattr(layer, name).copy_(value)
    if unreached:
        names = {layer: name for name, layer in model.named_modules()}
        listed = ", ".join(names.get(layer) or type(layer).__name__ for layer in unreached)
        warnings.warn(
            f"recalibrate_batchnorm: no batch reached BatchNorm layer(s) {listed}; they keep "
            "their previous running statistics. Check that forward runs every branch.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
