"""Writing an average's result atomically: one file, a shard directory, or a torchrun
group's share of either.

Nothing is visible at the output's path until the whole output is written and fsynced
(:func:`polyak.files.atomic_output`, :func:`polyak.files.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from polyak.discovery import Checkpoint
from polyak.distributed import DistributedError, ProcessGroup
from polyak.errors import ArgumentError, OutputError, PolyakError
from polyak.files import atomic_directory, atomic_output, companion_files
from polyak.formats import Format, format_of
from polyak.formats.base import (
    CheckpointReader,
    PlannedTensors,
)
from polyak.formats.safetensors import ShardedParts

__all__ = [
    "carries_companions",
    "companions_of",
    "companions_to_copy",
    "write_output",
    "write_output_together",
]


def shards_need_a_directory(out: Path, output_format: Format) -> ArgumentError:
    """The refusal of ``max_shard_size`` for an output that is one file."""
    return ArgumentError(
        f"output {out}: max_shard_size splits the output into safetensors shards in a "
        f"directory, but {out.name} names a single {output_format.name} file. Give a "
        f"directory instead, e.g. {out.parent / out.name.split('.')[0]}/",
        parameter="max_shard_size",
    )


def companions_of(newest: Checkpoint) -> list[Path]:
    """The model files a directory output copies from the newest member, if it is a
    Hugging Face model directory (see :func:`polyak.files.companion_files`); none from
    a DCP directory, whose ``.json`` files (Megatron's ``metadata.json``) describe the
    distributed save, not the model."""
    if not newest.path.is_dir() or format_of(newest.path).name == "dcp":
        return []
    return companion_files(newest.path)


def carries_companions(output_format: Format) -> bool:
    """A safetensors directory output is the one output that can carry companion files."""
    return output_format.name == "sharded-safetensors"


def companions_to_copy(newest: Checkpoint, output_format: Format) -> list[Path]:
    """The files :func:`write_output` copies beside the weights: the newest member's
    companions (:func:`companions_of`) where the output :func:`carries_companions`;
    none for any other."""
    return companions_of(newest) if carries_companions(output_format) else []


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
        ArgumentError: ``max_shard_size`` for a single-file output.
        OutputError: a file-system failure, naming ``out``; on any failure ``out`` is
            left as it was.
    """
    out = Path(out)
    directory = output_format.name == "sharded-safetensors"
    if max_shard_size is not None and not directory:
        raise shards_need_a_directory(out, output_format)
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
        raise _cannot_write(out, error) from None


def _cannot_write(out: Path, error: OSError) -> PolyakError:
    """An ``OSError`` of writing ``out`` as the one-line error that names it."""
    if isinstance(error, PolyakError):
        return error
    return OutputError(f"output {out}: cannot be written ({error.strerror or error}).")


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

    An output directory: every process plans the same shards and the same split of
    the tensors into P contiguous runs of about equal bytes, across shard boundaries;
    process p averages its run alone into its own files, inside one temporary
    directory that process 0 creates beside ``out`` (on storage all of them see), and
    fsyncs its shard files; once all have, each shard cut between processes is put together by
    the process that began it, and process 0 writes the index and renames the
    directory into place (:class:`polyak.formats.safetensors.ShardedParts`; no two
    processes ever write one file). The files are those one process would write, bit
    for bit. A DCP directory: process p writes its share of the entries into
    ``__p_0.distcp`` and process 0 the ``.metadata`` (see
    :func:`polyak.formats.dcp.write_dcp`). A single ``.safetensors`` file is split
    the same way, as a directory of one shard whose pieces lie beside the temporary
    file; any other single-file output is written by process 0 alone. If any process
    fails, every process raises, and once process 0 has removed what was written
    ``out`` is left as it was.
    """
    out = Path(out)
    single = output_format.name == "safetensors"
    if max_shard_size is not None and single:
        raise shards_need_a_directory(out, output_format)
    if output_format.name not in ("sharded-safetensors", "dcp", "safetensors"):
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
    try:
        with contextlib.ExitStack() as written:
            # Process 0 holds the temporary file or directory; leaving this block with an
            # exception (any process's failure, raised by group.check) removes it, out left
            # as it was.
            if single:
                temporary = _shared_temporary(
                    written, group, atomic_output(out, overwrite=overwrite)
                )
            else:
                made = atomic_directory(out, companions, overwrite=overwrite)
                temporary = _shared_temporary(written, group, made)
            directory = temporary.parent if single else temporary
            error = None
            names: list[str] = []
            parts = None
            try:
                if output_format.name == "dcp":  # each process its part, fsynced; see write_dcp
                    names = output_format.write(
                        temporary, tensors, template, group=group, **options
                    )
                else:  # each process its run of tensors, in its own files; see ShardedParts
                    parts = ShardedParts(
                        tensors.infos,
                        template,
                        max_shard_size=max_shard_size,
                        processes=group.size,
                        file_name=temporary.name if single else None,
                    )
                    if single and group.is_main:  # pieces beside out: removed on a failure
                        written.callback(parts.remove_pieces, directory)
                    _fsync_files(parts.write(directory, tensors, group.rank))
                    names = list(parts.files)
            except OSError as failure:
                error = _cannot_write(out, failure)
            except BaseException as failure:
                error = failure
            group.check(error)
            try:  # every process has written its files: the cut shards are put together
                if parts is not None:
                    parts.assemble(directory, group.rank)
                    if group.is_main and not single:
                        parts.write_index(directory)
                if group.is_main and not single:
                    names += _copy_companions(companions, temporary)
            except OSError as failure:
                error = _cannot_write(out, failure)
            except BaseException as failure:
                error = failure
            group.check(error)
            commit = written.pop_all()  # every process wrote its files: commit, outside
    except BaseException:
        # Every process raises here together (each exception above is raised at a
        # collective), and process 0 has removed the temporary files on leaving the
        # block: wait for it, so that no process exits first (torchrun then stops the
        # others) while something is left.
        with contextlib.suppress(Exception):
            group.barrier()
        raise
    commit_error = None
    try:
        commit.close()  # process 0: fsync and rename into place
    except BaseException as failure:
        commit_error = failure
    group.check(commit_error)
    return [out] if single else [out / name for name in names]


def _shared_temporary(
    stack: contextlib.ExitStack,
    group: ProcessGroup,
    make: contextlib.AbstractContextManager[Path],
) -> Path:
    """The temporary path of ``make`` (an atomic output), entered on process 0 and told
    to every process; a failure to make it is raised on every process."""
    if group.is_main:
        try:
            temporary = stack.enter_context(make)
        except BaseException as failure:
            group.broadcast(("failed", str(failure)))
            raise
        group.broadcast(("ready", str(temporary)))
        return temporary
    state, value = group.broadcast(None)
    if state == "failed":
        raise DistributedError(f"process 0 of {group.size} failed: {value}")
    return Path(value)
