"""The streaming averaging engine: one pass, tensor by tensor, buffers reused.

It takes open readers and weights and yields the averaged tensors; it writes nothing.

Its numeric policy, memory and speed are in :func:`average_readers`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from polyak.discovery import Checkpoint
from polyak.errors import (
    IncompatibleCheckpointsError,
    NonFiniteError,
    SchemeError,
)
from polyak.formats import open_checkpoint
from polyak.formats.base import (
    CheckpointReader,
    PlannedTensors,
    StreamedTensor,
    TensorInfo,
    is_floating,
    numpy_dtype,
)
from polyak.formats.prefetch import Prefetcher
from polyak.weights.schemes import normalize

if TYPE_CHECKING:
    from threadpoolctl import ThreadpoolController

__all__ = [
    "INTEGER_POLICIES",
    "average_readers",
    "check_compatible",
    "closing_all",
    "open_members",
]

INTEGER_POLICIES = ("newest", "require-equal")


# The scratch block of one chunk of every member: small enough to stay in cache.
BLOCK_BYTES = 4 << 20


# Elements per chunk, at most and at least (many members make the chunk short).
CHUNK_ELEMENTS = 1 << 18


MIN_CHUNK_ELEMENTS = 1 << 12


_MAX_LISTED_DIFFERENCES = 5


# The prefetcher is handed the next chunks' pages this many chunks at a time (a few
# blocks' worth, about 16 MiB), and keeps one to two such groups ahead of the engine.
LOOKAHEAD_CHUNKS = 4


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
    """threadpoolctl's view of the loaded BLAS libraries, inspected once (imported here,
    when a first average is computed, not by every command at start-up)."""
    from threadpoolctl import ThreadpoolController

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
    prefetcher: Prefetcher,
    tensor: int,
) -> StreamedTensor:
    """The weighted mean of one floating tensor, computed chunk by chunk as it is written.

    Per chunk: the differences ``x_i - x_1`` of the other members go into a
    cache-resident block, one matrix-vector product (BLAS gemv) weighs and sums them,
    and ``x_1`` is added back. Each member's data is read once, from its memory map,
    whose pages for the next ``LOOKAHEAD_CHUNKS`` chunks the ``prefetcher`` brings in
    meanwhile (its positions: ``(tensor, chunk)``, ``tensor`` this one's place in the
    plan).
    """
    accumulate = _accumulator_dtype(info.dtype)
    rest = np.ascontiguousarray(weights[1:], dtype=accumulate)
    own_dtype = numpy_dtype(info.dtype) == accumulate

    def chunks() -> Iterator[np.ndarray]:
        sources = [_flat(reader, name) for reader in readers]
        block = scratch.block(accumulate)
        output = None if own_dtype else scratch.output(info.dtype, block.chunk)
        starts = range(0, info.size, block.chunk)

        def ahead(first: int) -> None:  # the LOOKAHEAD_CHUNKS chunks from ``first`` on
            last = min(first + LOOKAHEAD_CHUNKS, len(starts)) - 1
            views = [
                view
                for start in starts[first : last + 1]
                for source in sources
                for view in _views(source, start, min(start + block.chunk, info.size))
            ]
            if views:
                prefetcher.ahead((tensor, last), views)

        ahead(1)
        for index, start in enumerate(starts):
            prefetcher.reached((tensor, index))
            if index % LOOKAHEAD_CHUNKS == 1 or LOOKAHEAD_CHUNKS == 1:
                ahead(index + LOOKAHEAD_CHUNKS)  # so 1 to 2 groups ahead
            stop = min(start + block.chunk, info.size)
            length = stop - start
            base = sources[0][start:stop]
            if not (own_dtype and base.flags.aligned):
                base = _staged(base, block.base[:length])
            summed = block.summed[:length]
            # NaN and infinity are checked below (or allowed): numpy's warnings about
            # them would only add lines to the one-line error on stderr.
            with np.errstate(invalid="ignore", over="ignore"):
                if len(sources) > 1:
                    differences = block.differences[: len(sources) - 1, :length]
                    for row, source in enumerate(sources[1:]):
                        part = source[start:stop]
                        if part.dtype == accumulate and not part.flags.aligned:
                            part = _staged(part, differences[row])
                        np.subtract(part, base, out=differences[row], dtype=accumulate)
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


def _staged(part: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``part`` copied into the scratch ``row`` (converted to its dtype); returns the row.

    A member's data that does not start on a multiple of its item size (DCP stores a
    rank's chunks at whatever offset the file had reached) is copied once, as bytes, into
    the aligned scratch: numpy computes on misaligned arrays through small buffered
    copies instead, which made the engine's pass over the DCP benchmark's inputs about
    20% slower (0.25 s against 0.21 s, medians of 6). The arithmetic after the copy is
    the same, so the result is too, bit for bit.
    """
    np.copyto(row, part, casting="unsafe")
    return row


def _views(source: np.ndarray, start: int, stop: int) -> list[np.ndarray]:
    """The memory that reading ``source[start:stop]`` touches, as views, none gathered."""
    views = getattr(source, "views", None)  # a chunked DCP source
    return views(start, stop) if views is not None else [source[start:stop]]


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
                "Leave this checkpoint out, or pass allow_nonfinite=True to average it anyway."
            )


def _carry_integer(name: str, readers: Sequence[CheckpointReader], integers: str) -> np.ndarray:
    newest = readers[0].read(name)
    if integers == "require-equal":
        for reader in readers[1:]:
            if not np.array_equal(reader.read(name), newest):
                raise IncompatibleCheckpointsError(
                    f"checkpoint {reader.path}: integer tensor {name} differs from the newest "
                    f"member {readers[0].path.name}, and integers='require-equal' forbids "
                    "that. Pass integers='newest' to take the newest member's values."
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
    byte is read once (a chunk stored at a misaligned address is first copied into the
    block, where numpy computes at full speed). Meanwhile a second thread maps the
    pages of the next chunks (:class:`~polyak.formats.prefetch.Prefetcher`). Formats
    that need whole tensors (npz, Keras, and ``torch.save`` for a template only torch
    could load) collect each one as it is written. The streaming writers hand the
    chunks to a third thread that writes them to disk
    (:class:`~polyak.formats.background.BackgroundWriter`) while the next are computed.

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
        with _blas_controller().limit(limits=1, user_api="blas"), Prefetcher() as prefetcher:
            for tensor, (name, info) in enumerate(plan):
                if is_floating(info.dtype):
                    array = _average_floating(
                        name, info, readers, normalized, scratch, allow_nonfinite,
                        prefetcher, tensor,
                    )  # fmt: skip
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
