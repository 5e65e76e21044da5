"""Sweeping checkpoint files: Keras or PyTorch picked by their format, the outputs written.

Keras checkpoints are swept with Keras, every other format with PyTorch; Keras or torch
is imported only for the framework chosen. :func:`sweep_files` is ``polyak sweep``
without its printing, torchrun included.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyak.checks import whole_number
from polyak.data import import_callable, load_dataset
from polyak.discovery import find_checkpoints
from polyak.distributed import checked_together
from polyak.distributed import current as current_group
from polyak.errors import ArgumentError, DataError
from polyak.files import check_outputs, is_directory_output
from polyak.formats import format_of
from polyak.report import write_json, write_plot
from polyak.sweep import SweepResult, write_best

__all__ = ["KERAS_FORMATS", "SweepOptions", "framework_of", "sweep_checkpoints", "sweep_files"]

#: The formats Keras writes; every other format is swept with PyTorch.
KERAS_FORMATS = ("keras", "keras-h5", "keras-weights")


def framework_of(checkpoint: str | os.PathLike[str]) -> str:
    """``"keras"`` for a checkpoint in a Keras format (:data:`KERAS_FORMATS`), else ``"torch"``."""
    return "keras" if format_of(checkpoint).name in KERAS_FORMATS else "torch"


def sweep_checkpoints(
    checkpoints: Sequence[str | os.PathLike[str]],
    test_data: Any = None,
    validation_data: Any = None,
    *,
    device: str | None = None,
    key: str | None = None,
    **options: Any,
) -> SweepResult:
    """Sweep checkpoints with the framework their format names: the newest member decides.

    Args:
        checkpoints: the members, newest first (as :func:`polyak.find_checkpoints` gives them).
        test_data: as :func:`polyak.keras.sweep` and :func:`polyak.torch.sweep` take it.
        validation_data: the same.
        device: the torch device; PyTorch checkpoints only.
        key: the state dict's entry in a ``.pt``; PyTorch checkpoints only.
        **options: the other arguments both sweeps take (``model``, ``schemes``...).

    Raises:
        DataError: ``device`` or ``key`` given for Keras checkpoints.
    """
    if framework_of(checkpoints[0]) == "keras":
        if device is not None or key is not None:
            raise DataError(
                "device and key apply to PyTorch checkpoints, not Keras ones; received "
                f"device={device!r}, key={key!r}."
            )
        from polyak.keras.evaluation import sweep  # imports keras

        return sweep(checkpoints, test_data, validation_data, **options)
    from polyak.torch.evaluation import sweep  # imports torch

    return sweep(checkpoints, test_data, validation_data, device=device, key=key, **options)


@dataclass(frozen=True)
class SweepOptions:
    """What a sweep of checkpoint files is given: the members, how to score them, what to write.

    ``polyak sweep`` fills one from its flags; :func:`sweep_files` checks and runs it.

    Attributes:
        paths: checkpoint files, directories or globs.
        test_data: an ``.npz`` with arrays ``x`` and ``y`` to score on; or give ``evaluate``.
        validation_data: an ``.npz`` (``x``, ``y``) to choose the best on, with ``test_data``.
        evaluate: instead of data, ``"module:function"`` taking the model and returning
            the test score, or ``{"test": ..., "validation": ...}``.
        schemes: the schemes, e.g. ``"equal,linear,exp:0.5,1,2,greedy"``.
        last: sweep only the ``last`` newest checkpoints.
        model: the architecture, ``"module:function"`` returning the model (PyTorch: an
            ``nn.Module``); Keras also takes a ``.keras``/``.h5`` file.
        metric: ``"accuracy"``, ``"loss"`` or ``"module:function"`` of ``(y_true, y_pred)``.
        higher_is_better: whether larger metric values are better; None: from the
            metric (lower for ``"loss"``).
        recalibrate: an ``.npz`` of training inputs ``x``: each candidate is also scored
            after its BatchNorm statistics are recomputed on them.
        posthoc: widths (``sigma_rel``) of post-hoc EMA candidates.
        posthoc_directory: where their EMA profiles are (default: beside the newest member).
        device: the torch device; PyTorch checkpoints only.
        key: the state dict's entry in a ``.pt``; PyTorch checkpoints only.
        batch_size: examples per forward pass.
        json_path: write the JSON report here.
        plot_path: write the PNG plot here.
        out_model: write the best candidate's model here (:func:`polyak.sweep.write_best`).
        overwrite: replace those outputs if they exist.
    """

    paths: Sequence[str | os.PathLike[str]]
    test_data: str | os.PathLike[str] | None = None
    validation_data: str | os.PathLike[str] | None = None
    evaluate: str | None = None
    schemes: str = "equal,linear,exp:2"
    last: int | None = None
    model: str | None = None
    metric: str = "accuracy"
    higher_is_better: bool | None = None
    recalibrate: str | os.PathLike[str] | None = None
    posthoc: Sequence[float] = ()
    posthoc_directory: str | os.PathLike[str] | None = None
    device: str | None = None
    key: str | None = None
    batch_size: int = 256
    json_path: str | os.PathLike[str] | None = None
    plot_path: str | os.PathLike[str] | None = None
    out_model: str | None = None
    overwrite: bool = False

    def check(self) -> None:
        """Refuse options that do not go together.

        Raises:
            ArgumentError: neither or both of ``test_data`` and ``evaluate``;
                ``validation_data`` with ``evaluate``; ``batch_size`` not a whole number >= 1.
        """
        if (self.test_data is None) == (self.evaluate is None):
            raise ArgumentError(
                "give test data with test_data, or an evaluation function with evaluate.",
                parameter="test_data",
                others=("evaluate",),
            )
        if self.evaluate is not None and self.validation_data is not None:
            raise ArgumentError(
                "validation_data goes with test_data; with evaluate, return "
                "{'test': ..., 'validation': ...} from the function instead.",
                parameter="validation_data",
                others=("test_data", "evaluate"),
            )
        whole_number(self.batch_size, "batch_size", minimum=1)


def sweep_files(
    options: SweepOptions, progress: Callable[[str], None] | None = None
) -> SweepResult:
    """Sweep checkpoint files as ``options`` say, and write the reports and model they ask for.

    The inputs and outputs are checked before any data is read: no output may be an
    input or another output. Under torchrun every process runs this with the same
    options: they refuse bad input together, share the candidates out (see
    :func:`polyak.sweep.run_sweep`), and return the same result; process 0 alone writes
    the files, and every process returns once they are written.

    Args:
        options: the sweep's options.
        progress: called with a short message as the sweep goes on.

    Returns:
        The :class:`polyak.sweep.SweepResult`.

    Raises:
        ArgumentError: options that do not go together (:meth:`SweepOptions.check`).
        OutputError: an output that is an input, another output, or exists without
            ``overwrite``.
        DataError, DiscoveryError, CheckpointError: unusable data or checkpoints.
    """
    group = current_group()
    with checked_together(group):  # under torchrun, every process refuses together
        reports = (options.json_path, options.plot_path)
        outputs = [(Path(p), False) for p in reports if p is not None]
        if options.out_model is not None:
            outputs.append((Path(options.out_model), is_directory_output(options.out_model)))
        read = [
            Path(p)
            for p in (
                options.test_data,
                options.validation_data,
                options.recalibrate,
                options.posthoc_directory,
            )
            if p is not None
        ]
        if options.model is not None and Path(options.model).exists():
            read.append(Path(options.model))
        check_outputs(outputs, read, overwrite=options.overwrite)  # before any data is read
        options.check()
        test = load_dataset(options.test_data) if options.test_data is not None else None
        validation = (
            load_dataset(options.validation_data) if options.validation_data is not None else None
        )
        calibration = load_dataset(options.recalibrate) if options.recalibrate is not None else None
        evaluate = (
            import_callable(options.evaluate, "evaluate") if options.evaluate is not None else None
        )
        members = find_checkpoints(options.paths, last=options.last)
        # Every output against every input: a report naming a member would replace it.
        check_outputs(outputs, [*read, *(m.path for m in members)], overwrite=options.overwrite)
    result = sweep_checkpoints(
        [member.path for member in members],
        test,
        validation,
        device=options.device,
        key=options.key,
        evaluate=evaluate,
        schemes=options.schemes,
        model=options.model,
        metric=options.metric,
        higher_is_better=options.higher_is_better,
        batch_size=options.batch_size,
        recalibrate=calibration,
        posthoc=tuple(options.posthoc),
        posthoc_directory=options.posthoc_directory,
        progress=progress,
    )
    # Under torchrun every process has the same result; process 0 writes the files.
    if group is None or group.is_main:
        if options.out_model is not None:
            write_best(result, options.out_model, overwrite=options.overwrite)
        if options.json_path is not None:
            write_json(result, options.json_path, overwrite=options.overwrite)
        if options.plot_path is not None:
            write_plot(result, options.plot_path, overwrite=options.overwrite)
    if group is not None:
        group.barrier()
    return result
