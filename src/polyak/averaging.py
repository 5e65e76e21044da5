"""The entry points :func:`average` and :func:`average_to`, over the engine and the writers.

The public home of the averaging names too: the engine's (:mod:`polyak.engine`) and the
output writers' (:mod:`polyak.output`) are re-exported here, as they always were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak.checks import parse_size, whole_number
from polyak.discovery import Checkpoint, find_checkpoints, within_window
from polyak.distributed import ProcessGroup
from polyak.distributed import current as current_group
from polyak.engine import (
    INTEGER_POLICIES,
    average_readers,
    check_compatible,
    closing_all,
    open_members,
)
from polyak.errors import (
    DiscoveryError,
)
from polyak.files import (
    check_output_path,
    is_directory_output,
)
from polyak.formats import format_for_output, format_of
from polyak.formats.base import (
    is_floating,
)
from polyak.output import (
    carries_companions,
    companions_of,
    shards_need_a_directory,
    write_output,
    write_output_together,
)
from polyak.weights.schemes import Scheme, parse_scheme

__all__ = [
    "INTEGER_POLICIES",
    "AverageResult",
    "average",
    "average_readers",
    "average_to",
    "check_compatible",
    "closing_all",
    "companions_of",
    "open_members",
    "write_output",
    "write_output_together",
]

# Shards of a safetensors directory averaged from DCP inputs, whose one file per rank
# says nothing about shards: Hugging Face's save_pretrained default.
DCP_MAX_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class AverageResult:
    """What an average was made of.

    Attributes:
        members: the checkpoints averaged, newest first.
        weights: their normalized weights, newest first.
        scheme: the spec of the scheme that gave the weights.
        output: the file or directory written, or None.
        format: the output's format name, or None.
        tensors: number of tensors in the result.
        averaged: number of floating tensors averaged (the rest were carried over).
        parameters: number of elements in all tensors.
        files: the files written: ``output`` itself, or for an output directory its
            shards and index, and the companion files copied.
        copied: the newest member's non-weight model files (``config.json``,
            ``generation_config.json``, tokenizer files) copied into an output directory.
        notes: things worth telling the user that are not errors, one sentence each
            (one member averaged; companion files left behind by a single-file output).
        selection: for DCP inputs, which subtree of the state dict was averaged.
        other_entries: for a DCP output, ``"kept"`` when the newest member's other
            entries (optimizer state, step...) were copied into it, ``"dropped"`` when not.
    """

    members: list[Checkpoint]
    weights: np.ndarray
    scheme: str
    output: Path | None
    format: str | None
    tensors: int
    averaged: int
    parameters: int
    files: tuple[Path, ...] = ()
    copied: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    selection: str | None = None
    other_entries: str | None = None


def _weights_for(scheme: str | Scheme, members: list[Checkpoint]) -> tuple[Scheme, np.ndarray]:
    parsed = parse_scheme(scheme)
    return parsed, parsed.weights(len(members), positions=[member.step for member in members])


def average(
    paths: str | Path | Sequence[str | Path],
    scheme: str | Scheme = "equal",
    last: int | None = None,
    *,
    integers: str = "newest",
    allow_nonfinite: bool = False,
    key: str | None = None,
    window_steps: float | None = None,
    window_tokens: float | None = None,
    tokens_per_step: float | None = None,
) -> dict[str, np.ndarray]:
    """Average checkpoints and return the result as numpy arrays keyed by tensor name.

    Args:
        paths: checkpoint files, directories or glob patterns; ordered by the numbers
            in their names, newest first.
        scheme: a scheme or its spec: ``"equal"``, ``"linear"``, ``"exp:2"``,
            ``"custom:0.5,0.3,0.2"`` (weights newest first).
        last: average only the ``last`` newest checkpoints.
        integers: ``"newest"`` or ``"require-equal"``; see the numeric policy of
            :func:`polyak.engine.average_readers`.
        allow_nonfinite: average NaN and infinity instead of refusing them.
        key: for PyTorch checkpoint dicts, the key holding the weights; for DCP
            directories, the subtree to average.
        window_steps: average only the members at most this many steps older than
            the newest (see :func:`polyak.discovery.within_window`).
        window_tokens, tokens_per_step: the same window in tokens.

    Returns:
        ``{name: array}`` in each tensor's own dtype.

    Example:
        >>> weights = polyak.average("run/model_*.h5", scheme="exp:2", last=5)  # doctest: +SKIP
    """
    members = find_checkpoints(paths, last=last)
    members = within_window(
        members, window_steps, tokens=window_tokens, tokens_per_step=tokens_per_step
    )
    _, weights = _weights_for(scheme, members)
    with closing_all(open_members(members, key)) as readers:
        tensors = average_readers(
            readers, weights, integers=integers, allow_nonfinite=allow_nonfinite
        )
        return {name: np.array(array, copy=True) for name, array in tensors}


def average_to(
    paths: str | Path | Sequence[str | Path],
    out: str | Path,
    scheme: str | Scheme = "equal",
    last: int | None = None,
    *,
    overwrite: bool = False,
    integers: str = "newest",
    allow_nonfinite: bool = False,
    key: str | None = None,
    max_shard_size: int | str | None = None,
    min_members: int = 1,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[list[Checkpoint], np.ndarray, int], None] | None = None,
    group: ProcessGroup | None = None,
    format: str | None = None,
    keep_other: bool = True,
    window_steps: float | None = None,
    window_tokens: float | None = None,
    tokens_per_step: float | None = None,
) -> AverageResult:
    """Average checkpoints into one file or checkpoint directory, written atomically.

    The output's suffix chooses its format; by default use the inputs' suffix to keep
    their container (a ``.keras`` or legacy ``.h5`` keeps its architecture, a
    Lightning ``.ckpt`` its other entries). Optimizer state is never averaged: Keras
    containers keep the newest member's, torch checkpoint dicts drop it.

    An ``out`` that ends with ``/`` or has no suffix (``"averaged/"``) is a safetensors
    checkpoint directory in Hugging Face's layout: shards
    ``model-0000i-of-0000K.safetensors`` with ``model.safetensors.index.json``, or one
    ``model.safetensors``. Its shards are cut at ``max_shard_size`` if given, else
    exactly as the newest member's shards when it is sharded, else not at all. When the
    newest member is a model directory (``checkpoint-500/``), its non-weight model files
    (``config.json``, ``generation_config.json``, tokenizer files; see
    :func:`polyak.files.companion_files`) are copied into the output directory, so that
    ``from_pretrained`` loads it; its training state (optimizer, scheduler,
    ``trainer_state.json``) is not.

    Averaging one member is allowed (the output is that member's weights) but never
    silent: the result's ``notes`` say so, and ``min_members`` makes it an error.

    Args:
        paths, scheme, last, integers, allow_nonfinite, key, window_steps,
            window_tokens, tokens_per_step: as for :func:`average`.
        out: the file or directory to write; must not be one of the inputs, lie
            inside one, or (a directory) hold one.
        overwrite: replace ``out`` if it exists (a directory only if it holds nothing
            but a safetensors checkpoint).
        max_shard_size: for an output directory, the most bytes of tensor data per
            shard: an int or ``"500MB"``, ``"2GB"``, ``"1.5GiB"``; a tensor larger than
            that gets a shard of its own. Refused for a single-file output. From DCP
            inputs the default is ``DCP_MAX_SHARD_SIZE`` (5 GB, as ``save_pretrained``).
        progress: called with the number of input bytes processed after each tensor.
        on_start: called once with the members, their weights and the total bytes to
            process, before any tensor is read.
        group: the processes that write the output together (under torchrun; see
            :func:`write_output_together`); by default torch's initialized default
            group when there are several processes, else this process alone.
        min_members: refuse to average fewer members than this (``DiscoveryError``).
        format: ``"dcp"`` writes ``out`` as a torch.distributed.checkpoint directory
            (from DCP inputs), which ``torch.distributed.checkpoint.load`` reads into the
            same model; by default the suffix of ``out`` decides.
        keep_other: for ``format="dcp"``, copy the newest member's entries outside the
            averaged subtree (optimizer state, step...) into the output, so training
            resumes with them; False writes the averaged subtree alone.

    Returns:
        An :class:`AverageResult` describing the members, weights and output.

    Example:
        >>> polyak.average_to("run/", "averaged/", max_shard_size="2GB")  # doctest: +SKIP
    """
    group = current_group() if group is None else group
    requested, out = out, Path(out)
    with contextlib.ExitStack() as stack:
        try:
            directory = is_directory_output(requested) or format == "dcp"
            limit = None if max_shard_size is None else parse_size(max_shard_size)
            min_members = whole_number(min_members, "min_members", minimum=1)
            members = find_checkpoints(paths, last=last)
            members = within_window(
                members, window_steps, tokens=window_tokens, tokens_per_step=tokens_per_step
            )
            if len(members) < min_members:
                raise DiscoveryError(
                    f"found {len(members)} checkpoint(s) ({_named(members)}), fewer than "
                    f"min_members={min_members}; pass more checkpoints, or lower it."
                )
            parsed, weights = _weights_for(scheme, members)
            input_format = format_of(members[0].path)
            output_format = format_for_output(requested, input_format, format)
            if limit is not None and output_format.name != "sharded-safetensors":
                raise shards_need_a_directory(out, output_format)
            if limit is None and output_format.name == "sharded-safetensors":
                limit = DCP_MAX_SHARD_SIZE if input_format.name == "dcp" else None
            beside = companions_of(members[0])  # listed once: copied, or said left behind
            companions = beside if carries_companions(output_format) else []
            notes = _notes(members, beside, companions)
            check_output_path(
                out,
                [member.path for member in members],
                overwrite=overwrite,
                directory=directory,
                companions=companions,
            )
            readers = stack.enter_context(closing_all(open_members(members, key)))
            output_format.check_output(out, readers[0])
            tensors = average_readers(
                readers,
                weights,
                integers=integers,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
            )
        except BaseException as error:
            stack.close()  # the readers first, then tell the other processes
            if group is not None:
                group.check(error)  # every process learns of it, then this one raises it
            raise
        if group is not None:
            # No process writes before every process has checked the inputs and the
            # output (one that checked later would find the output already there).
            group.check(None)
        if on_start is not None:
            total = sum(
                info.nbytes * (len(readers) if is_floating(info.dtype) else 1)
                for _, info in tensors.infos
            )
            on_start(members, weights, total)
        options: dict = {}
        if output_format.name == "dcp":
            options = {"keep_other": keep_other, "members": len(readers)}
        if group is None:
            files = write_output(
                out,
                tensors,
                readers[0],
                output_format,
                max_shard_size=limit,
                companions=companions,
                overwrite=overwrite,
                **options,
            )
        else:
            files = write_output_together(
                out,
                tensors,
                readers[0],
                output_format,
                group,
                max_shard_size=limit,
                companions=companions,
                overwrite=overwrite,
                **options,
            )
        selection = getattr(readers[0], "selection", None)
    floating = [info for _, info in tensors.infos if is_floating(info.dtype)]
    return AverageResult(
        members=members,
        weights=weights,
        scheme=parsed.spec,
        output=out,
        format=output_format.name,
        tensors=len(tensors.infos),
        averaged=len(floating),
        parameters=sum(info.size for _, info in tensors.infos),
        files=tuple(files),
        copied=tuple(companions),
        notes=notes,
        selection=selection,
        other_entries=(
            None if output_format.name != "dcp" else ("kept" if keep_other else "dropped")
        ),
    )


def _named(members: list[Checkpoint]) -> str:
    shown = ", ".join(str(member.path) for member in members[:3])
    return shown + (f" and {len(members) - 3} more" if len(members) > 3 else "")


def _notes(
    members: list[Checkpoint], beside: list[Path], companions: list[Path]
) -> tuple[str, ...]:
    """What the user should hear about an average that is not an error."""
    notes = []
    if len(members) == 1:
        notes.append(
            f"only one checkpoint was found ({members[0].path}), so the output holds its "
            "weights unchanged; pass more checkpoints to average them (min_members=2 "
            "makes this an error)."
        )
    if beside and not companions:
        names = ", ".join(path.name for path in beside)
        notes.append(
            f"{members[0].path} holds {names}, which a single-file output cannot carry; "
            "write a directory output (a path ending with /) to get a model directory "
            "that from_pretrained loads."
        )
    return tuple(notes)
