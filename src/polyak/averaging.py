"""The streaming averaging engine: one pass, tensor by tensor, buffers reused.

Numeric policy (tested in tests/test_averaging.py):

- Floating tensors (float16, bfloat16, float32, float64) are averaged. Weights are
  computed and normalized in float64. Since they sum to 1, the average is computed
  relative to the newest member x_1::

      mean = x_1 + sum_{i=2..n} w_i (x_i - x_1)

  accumulating in float32 for 16- and 32-bit inputs and in float64 for float64
  inputs, then rounded once, to nearest, back to the tensor's own dtype. Identical
  members therefore give themselves back exactly, and before that final rounding the
  result differs from the exact weighted mean by at most
  ``(n + 2) * u * (|x_1| + sum_{i>=2} w_i |x_i - x_1|)``, with u = 2**-24 for a
  float32 accumulator (2**-53 for float64): small where members are close, as the
  last checkpoints of one run are.
- Integer and bool tensors (BatchNorm ``num_batches_tracked``, step counters) are
  never averaged: they are taken from the newest member. With
  ``integers="require-equal"`` a difference between members is an error instead.
- Members must agree on tensor names, shapes and dtypes; the differences are listed
  otherwise, never papered over by averaging fewer members.
- NaN or infinity in any member's floating tensor is refused, naming the file and
  tensor, unless ``allow_nonfinite=True``.

Memory and speed: averaged tensors are computed chunk by chunk while the writer
consumes them (:class:`~polyak.formats.base.StreamedTensor`), so a streaming format
(safetensors, and torch's zip format as :mod:`polyak.formats.torchzip` writes it)
never holds a whole tensor: the engine's scratch is one cache-sized
block (``BLOCK_BYTES``, about 4 MiB) allocated once and reused. Per chunk, the
differences ``x_i - x_1`` are computed into the block straight from the members'
memory maps, and one BLAS matrix-vector product weighs and sums them, so each input
byte is read once. Formats that need whole tensors (npz, Keras, and ``torch.save``
for a template only torch could load) collect each one as it is written. The
streaming writers hand the chunks to a second thread that writes them to disk
(:class:`~polyak.formats.background.BackgroundWriter`) while the next are computed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

from polyak.discovery import Checkpoint, find_checkpoints, within_window
from polyak.distributed import DistributedError, ProcessGroup
from polyak.distributed import current as current_group
from polyak.errors import (
    DiscoveryError,
    IncompatibleCheckpointsError,
    NonFiniteError,
    OutputError,
    PolyakError,
    SchemeError,
)
from polyak.files import (
    atomic_directory,
    atomic_output,
    check_output_path,
    companion_files,
    is_directory_output,
)
from polyak.formats import Format, format_for_output, format_of, open_checkpoint
from polyak.formats.base import (
    CheckpointReader,
    PlannedTensors,
    StreamedTensor,
    TensorInfo,
    is_floating,
    numpy_dtype,
)
from polyak.formats.safetensors import parse_size
from polyak.weights.schemes import Scheme, normalize, parse_scheme

__all__ = [
    "INTEGER_POLICIES",
    "AverageResult",
    "average",
    "average_readers",
    "average_to",
    "check_compatible",
    "companions_of",
    "open_members",
    "write_output",
    "write_output_together",
]

INTEGER_POLICIES = ("newest", "require-equal")
# The scratch block of one chunk of every member: small enough to stay in cache.
BLOCK_BYTES = 4 << 20
# Elements per chunk, at most and at least (many members make the chunk short).
CHUNK_ELEMENTS = 1 << 18
MIN_CHUNK_ELEMENTS = 1 << 12
_MAX_LISTED_DIFFERENCES = 5
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


#: Any reader with ``close()``.
Reader = TypeVar("Reader")


def check_compatible(readers: Sequence[CheckpointReader]) -> list[tuple[str, TensorInfo]]:
    """Check that members hold the same tensors; return the newest member's plan.

    Args:
        readers: the members, newest first.

    Returns:
        ``(name, info)`` of every tensor, in the newest member's order.

    Raises:
        IncompatibleCheckpointsError: listing the first differences with file names.
    """
    newest = readers[0]
    plan = [(name, newest.info(name)) for name in newest.names()]
    expected = dict(plan)
    differences: list[str] = []
    for reader in readers[1:]:
        names = reader.names()
        present = set(names)  # once per member: a set per name made this quadratic
        missing = [name for name in expected if name not in present]
        extra = [name for name in names if name not in expected]
        for name in missing:
            # Named after the member that holds the tensor, as an extra tensor is.
            differences.append(
                f"{newest.path.name} has tensor {name} that {reader.path.name} lacks"
            )
        for name in extra:
            differences.append(
                f"{reader.path.name} has tensor {name} that {newest.path.name} lacks"
            )
        for name in names:
            if name not in expected:
                continue
            info, reference = reader.info(name), expected[name]
            if info.shape != reference.shape:
                differences.append(
                    f"{reader.path.name}: tensor {name} has shape {info.shape}; "
                    f"{newest.path.name} has {reference.shape}"
                )
            elif info.dtype != reference.dtype:
                differences.append(
                    f"{reader.path.name}: tensor {name} has dtype {info.dtype}; "
                    f"{newest.path.name} has {reference.dtype}"
                )
    if differences:
        shown = "; ".join(differences[:_MAX_LISTED_DIFFERENCES])
        more = len(differences) - _MAX_LISTED_DIFFERENCES
        tail = f"; and {more} more difference(s)" if more > 0 else ""
        raise IncompatibleCheckpointsError(
            f"checkpoints cannot be averaged, they hold different tensors: {shown}{tail}."
        )
    if not plan:
        raise IncompatibleCheckpointsError(f"checkpoint {newest.path}: holds no tensors.")
    return plan


@dataclass(frozen=True)
class _Block:
    """Cache-sized scratch rows of one accumulator dtype."""

    differences: np.ndarray  # (members - 1, chunk): x_i - x_1 for i >= 2
    base: np.ndarray  # (chunk,): x_1 converted to the accumulator dtype
    summed: np.ndarray  # (chunk,): the weighted mean
    chunk: int


class _Scratch:
    """Chunk buffers allocated once per average and reused for every tensor and chunk.

    For ``n`` members: ``n - 1`` rows of member differences and two more rows per
    accumulator dtype, about ``BLOCK_BYTES`` in all, plus one output row per tensor
    dtype; whatever the model's size.
    """

    def __init__(self, members: int, plan: list[tuple[str, TensorInfo]]) -> None:
        self.members = members
        floating = [info for _, info in plan if is_floating(info.dtype)]
        self.largest = max((info.size for info in floating), default=1)
        self._blocks: dict[np.dtype, _Block] = {}
        self._outputs: dict[str, np.ndarray] = {}

    def block(self, dtype: np.dtype) -> _Block:
        """The scratch rows of an accumulator dtype, made on first use."""
        if dtype not in self._blocks:
            rows = max(1, self.members - 1)
            chunk = BLOCK_BYTES // dtype.itemsize // (rows + 2)
            chunk = max(MIN_CHUNK_ELEMENTS, min(CHUNK_ELEMENTS, chunk, self.largest))
            self._blocks[dtype] = _Block(
                np.empty((rows, chunk), dtype),
                np.empty(chunk, dtype),
                np.empty(chunk, dtype),
                chunk,
            )
        return self._blocks[dtype]

    def output(self, dtype_name: str, chunk: int) -> np.ndarray:
        """A reusable output row in a tensor's own dtype."""
        if dtype_name not in self._outputs:
            self._outputs[dtype_name] = np.empty(chunk, numpy_dtype(dtype_name))
        return self._outputs[dtype_name]


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """threadpoolctl's view of the loaded BLAS libraries, inspected once."""
    return ThreadpoolController()


def _accumulator_dtype(dtype_name: str) -> np.dtype:
    return np.dtype(np.float64 if dtype_name == "float64" else np.float32)


def _average_floating(
    name: str,
    info: TensorInfo,
    readers: Sequence[CheckpointReader],
    weights: np.ndarray,
    scratch: _Scratch,
    allow_nonfinite: bool,
) -> StreamedTensor:
    """The weighted mean of one floating tensor, computed chunk by chunk as it is written.

    Per chunk: the differences ``x_i - x_1`` of the other members go into a
    cache-resident block, one matrix-vector product (BLAS gemv) weighs and sums them,
    and ``x_1`` is added back. Each member's data is read once, from its memory map.
    """
    accumulate = _accumulator_dtype(info.dtype)
    rest = np.ascontiguousarray(weights[1:], dtype=accumulate)
    own_dtype = numpy_dtype(info.dtype) == accumulate

    def chunks() -> Iterator[np.ndarray]:
        sources = [_flat(reader, name) for reader in readers]
        block = scratch.block(accumulate)
        output = None if own_dtype else scratch.output(info.dtype, block.chunk)
        for start in range(0, info.size, block.chunk):
            stop = min(start + block.chunk, info.size)
            length = stop - start
            if own_dtype:
                base = sources[0][start:stop]
            else:
                base = block.base[:length]
                np.copyto(base, sources[0][start:stop], casting="unsafe")
            summed = block.summed[:length]
            # NaN and infinity are checked below (or allowed): numpy's warnings about
            # them would only add lines to the one-line error on stderr.
            with np.errstate(invalid="ignore", over="ignore"):
                if len(sources) > 1:
                    differences = block.differences[: len(sources) - 1, :length]
                    for row, source in enumerate(sources[1:]):
                        np.subtract(
                            source[start:stop], base, out=differences[row], dtype=accumulate
                        )
                    np.matmul(rest, differences, out=summed)
                    np.add(summed, base, out=summed)
                else:
                    np.copyto(summed, base)
                # A sum of finite values is finite (unless it overflows, checked then
                # element by element); NaN and infinity never cancel out of it.
                finite = allow_nonfinite or np.isfinite(summed.sum())
            if not finite and not np.isfinite(summed).all():
                _refuse_nonfinite_inputs(name, readers, sources, start, stop)
                # Finite inputs: a difference x_i - x_1 overflowed the accumulator
                # (members near opposite float32 extremes). This chunk again as
                # sum_i w_i x_i in float64, where no such sum of float32 values overflows.
                exact = np.zeros(length, np.float64)
                for weight, source in zip(weights, sources, strict=True):
                    exact += float(weight) * source[start:stop].astype(np.float64)
                with np.errstate(over="ignore"):
                    np.copyto(summed, exact, casting="unsafe")
                if not np.isfinite(summed).all():
                    raise NonFiniteError(
                        f"tensor {name}: the weighted average exceeds the range of "
                        f"{info.dtype}; the weights (some negative?) extrapolate too far."
                    )
            if output is None:
                yield summed
            else:
                np.copyto(output[:length], summed, casting="unsafe")
                yield output[:length]

    return StreamedTensor(info, chunks)


def _flat(reader: CheckpointReader, name: str) -> np.ndarray:
    """A tensor of a member as a flat array the engine slices chunk by chunk.

    A reader with ``read_flat`` (DCP, whose tensors are stored in chunks) gives an
    object whose slices ``[start:stop]`` are arrays assembled chunk by chunk, so no
    whole tensor is assembled in memory; any other reader's tensor is reshaped.
    """
    read_flat = getattr(reader, "read_flat", None)
    if read_flat is not None:
        return read_flat(name)
    return reader.read(name).reshape(-1)


def _refuse_nonfinite_inputs(
    name: str,
    readers: Sequence[CheckpointReader],
    sources: Sequence[np.ndarray],
    start: int,
    stop: int,
) -> None:
    """Refuse the first member whose chunk holds NaN or infinity (returns if none does)."""
    for reader, source in zip(readers, sources, strict=True):
        if not np.isfinite(source[start:stop].astype(np.float64)).all():
            raise NonFiniteError(
                f"checkpoint {reader.path}: tensor {name} holds NaN or infinite values. "
                "Leave this checkpoint out, or pass --allow-nonfinite to average it anyway."
            )


def _carry_integer(name: str, readers: Sequence[CheckpointReader], integers: str) -> np.ndarray:
    newest = readers[0].read(name)
    if integers == "require-equal":
        for reader in readers[1:]:
            if not np.array_equal(reader.read(name), newest):
                raise IncompatibleCheckpointsError(
                    f"checkpoint {reader.path}: integer tensor {name} differs from the newest "
                    f"member {readers[0].path.name}, and --integers require-equal forbids that. "
                    "Use --integers newest to take the newest member's values."
                )
    return newest


def average_readers(
    readers: Sequence[CheckpointReader],
    weights: Sequence[float] | np.ndarray,
    *,
    integers: str = "newest",
    allow_nonfinite: bool = False,
    progress: Callable[[int], None] | None = None,
    signed: bool = False,
) -> PlannedTensors:
    """Average open checkpoints, lazily: iterate the result to compute it tensor by tensor.

    Args:
        readers: the members, newest first.
        weights: one weight per member, newest first; normalized here.
        signed: allow negative weights (post-hoc EMA coefficients); they are then
            scaled to sum to 1, which must be clearly away from 0.
        integers: ``"newest"`` (take integer and bool tensors from the newest member)
            or ``"require-equal"`` (and refuse any difference between members).
        allow_nonfinite: average NaN and infinity instead of refusing them.
        progress: called with the number of input bytes processed after each tensor.

    Returns:
        The planned tensors; each array yielded is valid only until the next one is
        requested (the buffers are reused): copy it to keep it.
    """
    if not readers:
        raise IncompatibleCheckpointsError("no checkpoints to average.")
    if integers not in INTEGER_POLICIES:
        raise SchemeError(
            f"integers policy must be one of {', '.join(INTEGER_POLICIES)}; received {integers!r}."
        )
    normalized = _signed_normalize(weights) if signed else normalize(weights, source="weights")
    if len(normalized) != len(readers):
        raise SchemeError(
            f"weights: {len(normalized)} weights were given for {len(readers)} checkpoints."
        )
    plan = check_compatible(readers)

    def generate() -> Iterator[tuple[str, np.ndarray]]:
        scratch = _Scratch(len(readers), plan)
        # Each product is small and cache-resident: BLAS threads only fight over the
        # cores (measured 60x slower on 2 busy cores), so the engine runs BLAS on one.
        with _blas_controller().limit(limits=1, user_api="blas"):
            for name, info in plan:
                if is_floating(info.dtype):
                    array = _average_floating(
                        name, info, readers, normalized, scratch, allow_nonfinite
                    )
                    done = info.nbytes * len(readers)
                else:
                    array = _carry_integer(name, readers, integers)
                    done = info.nbytes
                yield name, array
                if progress is not None:
                    progress(done)

    return PlannedTensors(plan, generate(), aliases=_shared_aliases(readers))


def _shared_aliases(readers: Sequence[CheckpointReader]) -> dict[str, str]:
    """The tied tensors (name -> the earlier name it shares) that every member ties alike."""
    found = [getattr(reader, "aliases", None) for reader in readers]
    if not all(callable(aliases) for aliases in found):
        return {}
    shared = found[0]()
    for aliases in found[1:]:
        theirs = aliases()
        shared = {name: first for name, first in shared.items() if theirs.get(name) == first}
    return shared


def _signed_normalize(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(weights, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise SchemeError(f"weights must be finite numbers; received {values.tolist()}.")
    total = values.sum()
    if not abs(total) > 1e-6 * np.abs(values).sum():
        raise SchemeError(f"weights sum to {total}, too close to zero to be scaled to 1.")
    return values / total


def _weights_for(scheme: str | Scheme, members: list[Checkpoint]) -> tuple[Scheme, np.ndarray]:
    parsed = parse_scheme(scheme)
    return parsed, parsed.weights(len(members), positions=[member.step for member in members])


def open_members(members: Sequence[Checkpoint], key: str | None) -> list[CheckpointReader]:
    """A reader for every member, or none: on a failure, those already open are closed.

    Use it as ``with closing_all(open_members(members, key)) as readers:``.
    """
    with contextlib.ExitStack() as opened:
        readers = [opened.enter_context(open_checkpoint(m.path, key=key)) for m in members]
        opened.pop_all()  # all open: the caller's closing_all owns them now
    return readers


@contextlib.contextmanager
def closing_all(readers: list[Reader]) -> Iterator[list[Reader]]:
    """Close every reader on leaving the block, whatever happens (each one, even when one fails).

    Example:
        >>> with closing_all(open_members(members, None)) as readers:  # doctest: +SKIP
        ...     weights = dict(average_readers(readers, [0.5, 0.5]))
    """
    with contextlib.ExitStack() as stack:
        for reader in readers:
            stack.callback(reader.close)
        yield readers


def _shards_need_a_directory(out: Path, output_format: Format) -> OutputError:
    return OutputError(
        f"output {out}: --max-shard-size splits the output into safetensors shards in a "
        f"directory, but {out.name} names a single {output_format.name} file. Give a "
        f"directory instead, e.g. {out.parent / out.name.split('.')[0]}/"
    )


def write_output(
    out: Path,
    tensors: PlannedTensors,
    template: CheckpointReader,
    output_format: Format,
    *,
    max_shard_size: int | str | None = None,
    companions: Sequence[Path] = (),
    overwrite: bool = False,
    **options: object,
) -> list[Path]:
    """Write tensors atomically to ``out`` in ``output_format``, copying ``template``'s container.

    A ``sharded-safetensors`` output is a directory: its shards and index are written
    into a temporary directory that is renamed to ``out`` once complete
    (:func:`polyak.files.atomic_directory`). Every other format is one file, written
    to a temporary file and renamed (:func:`polyak.files.atomic_output`).

    Args:
        out: the output file or directory.
        tensors: the planned tensors, streamed once.
        template: the member whose container (or shard layout) the output copies.
        output_format: from :func:`polyak.formats.format_for_output`.
        max_shard_size: for an output directory, the most bytes of tensor data per
            shard (an int or a string such as ``"2GB"``); by default the template's
            shard layout, or one shard.
        companions: for an output directory, files copied into it beside the shards
            (the newest member's ``config.json`` and tokenizer files).
        **options: passed to the writer of a ``dcp`` directory (``keep_other``).
        overwrite: replace an existing ``out``; without it, an ``out`` another writer
            created meanwhile is kept and ``OutputError`` raised (create-if-absent).

    Returns:
        The files written: ``[out]``, or the shards, the index and the companions
        inside ``out`` (or the files of a DCP directory).

    Raises:
        OutputError: ``max_shard_size`` for a single-file output, or a file-system
            failure, naming ``out``; on any failure ``out`` is left as it was.
    """
    out = Path(out)
    directory = output_format.name == "sharded-safetensors"
    if max_shard_size is not None and not directory:
        raise _shards_need_a_directory(out, output_format)
    output_format.check_output(out, template)
    try:
        if directory:
            with atomic_directory(out, companions, overwrite=overwrite) as temporary:
                names = output_format.write(
                    temporary, tensors, template, max_shard_size=max_shard_size
                )
                names += _copy_companions(companions, temporary)
            return [out / name for name in names]
        if output_format.name == "dcp":
            with atomic_directory(out, overwrite=overwrite) as temporary:
                names = output_format.write(temporary, tensors, template, **options)
            return [out / name for name in names]
        with atomic_output(out, overwrite=overwrite) as temporary:
            output_format.write(temporary, tensors, template)
        return [out]
    except PolyakError:
        raise
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"output {out}: cannot be written ({reason}).") from None


def _copy_companions(companions: Sequence[Path], directory: Path) -> list[str]:
    """Copy the companion files into ``directory``; their names."""
    for source in companions:
        shutil.copyfile(source, directory / source.name)
    return [source.name for source in companions]


def _fsync_files(paths: Iterable[Path]) -> None:
    for path in paths:
        with open(path, "rb+") as file:
            os.fsync(file.fileno())


def write_output_together(
    out: Path,
    tensors: PlannedTensors,
    template: CheckpointReader,
    output_format: Format,
    group: ProcessGroup,
    *,
    max_shard_size: int | str | None = None,
    companions: Sequence[Path] = (),
    overwrite: bool = False,
    **options: object,
) -> list[Path]:
    """:func:`write_output` by every process of a torchrun group, each its share.

    An output directory: every process plans the same shards; shard ``k`` is
    averaged and written by process ``k mod P`` into one temporary directory that
    process 0 creates beside ``out`` (on storage all of them see), then process 0
    writes the index and, once every process has written and fsynced its shards,
    renames the directory into place. The files are those one process would write,
    bit for bit. A single-file output is written by process 0 alone. If any process
    fails, every process raises and ``out`` is left as it was.
    """
    out = Path(out)
    if output_format.name != "sharded-safetensors":
        error = None
        files: list[Path] = []
        if group.is_main:
            try:
                files = write_output(
                    out,
                    tensors,
                    template,
                    output_format,
                    companions=companions,
                    overwrite=overwrite,
                    **options,
                )
            except BaseException as failure:  # told to every process, then raised here
                error = failure
        group.check(error)
        return group.broadcast(files)
    with contextlib.ExitStack() as written:
        # Process 0 holds the temporary directory; leaving this block with an exception
        # (any process's failure, raised by group.check) removes it, out left as it was.
        if group.is_main:
            try:
                temporary = written.enter_context(
                    atomic_directory(out, companions, overwrite=overwrite)
                )
            except BaseException as failure:
                group.broadcast(("failed", str(failure)))
                raise
            group.broadcast(("ready", str(temporary)))
        else:
            state, value = group.broadcast(None)
            if state == "failed":
                raise DistributedError(f"process 0 of {group.size} failed: {value}")
            temporary = Path(value)
        error = None
        names: list[str] = []
        try:
            names = output_format.write(
                temporary,
                tensors,
                template,
                max_shard_size=max_shard_size,
                owned=group.owned,
                write_index=group.is_main,
            )
            mine = [name for number, name in enumerate(names) if group.owned(number)]
            _fsync_files(temporary / name for name in mine if (temporary / name).exists())
            if group.is_main:
                names += _copy_companions(companions, temporary)
        except BaseException as failure:
            error = failure
        group.check(error)
        commit = written.pop_all()  # every process wrote its shards: commit, outside
    commit_error = None
    try:
        commit.close()  # process 0: fsync and rename the directory into place
    except BaseException as failure:
        commit_error = failure
    group.check(commit_error)
    return [out / name for name in names]


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
        integers: ``"newest"`` or ``"require-equal"``; see the module's numeric policy.
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
            if type(min_members) is not int or min_members < 1:
                raise DiscoveryError(
                    f"min_members must be a whole number >= 1; received {min_members!r}."
                )
            members = find_checkpoints(paths, last=last)
            members = within_window(
                members, window_steps, tokens=window_tokens, tokens_per_step=tokens_per_step
            )
            if len(members) < min_members:
                raise DiscoveryError(
                    f"found {len(members)} checkpoint(s) ({_named(members)}), fewer than "
                    f"min_members={min_members} (CLI --min-members). Pass more checkpoints, or "
                    "a lower min_members."
                )
            parsed, weights = _weights_for(scheme, members)
            input_format = format_of(members[0].path)
            output_format = format_for_output(requested, input_format, format)
            if limit is not None and output_format.name != "sharded-safetensors":
                raise _shards_need_a_directory(out, output_format)
            if limit is None and output_format.name == "sharded-safetensors":
                limit = DCP_MAX_SHARD_SIZE if input_format.name == "dcp" else None
            beside = companions_of(members[0])
            companions = beside if output_format.name == "sharded-safetensors" else []
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
        options = {"keep_other": keep_other} if output_format.name == "dcp" else {}
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


def companions_of(newest: Checkpoint) -> list[Path]:
    """The model files a directory output copies from the newest member, if it is a
    Hugging Face model directory (see :func:`polyak.files.companion_files`); none from
    a DCP directory, whose ``.json`` files (Megatron's ``metadata.json``) describe the
    distributed save, not the model."""
    if not newest.path.is_dir() or format_of(newest.path).name == "dcp":
        return []
    return companion_files(newest.path)


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
            "weights unchanged; pass more checkpoints to average them (min_members, CLI "
            "--min-members, makes this an error)."
        )
    if beside and not companions:
        names = ", ".join(path.name for path in beside)
        notes.append(
            f"{members[0].path} holds {names}, which a single-file output cannot carry; "
            "write a directory output (a path ending with /) to get a model directory "
            "that from_pretrained loads."
        )
    return tuple(notes)
