"""Writing outputs atomically, and refusing to write over an input.

An output file is written to a temporary file in its target directory, flushed and
fsynced, then renamed over the final name: an interrupted run leaves either no file
or the previous one under that name, never a partial one. Temporary files are named
``.NAME.polyak-tmp-PID-RANDOM``; one left by a killed process is removed by the next
write to the same output.

An output directory (a safetensors checkpoint directory: shards and their index) is
written the same way as a whole, see :func:`atomic_directory`.

Which outputs are directories: a path that ends with ``/`` or has no suffix at all
(``averaged/``, ``averaged``), see :func:`is_directory_output`.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import glob
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from polyak.errors import OutputError

_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100

__all__ = [
    "CHECKPOINT_DIRECTORY_FILES",
    "atomic_directory",
    "atomic_output",
    "c_function",
    "check_output_path",
    "check_outputs",
    "companion_files",
    "is_companion_file",
    "is_directory_output",
]

_TEMP_MARK = ".polyak-tmp-"
_OLD_MARK = ".polyak-old-"
# The files of a safetensors checkpoint directory, as polyak and Hugging Face write it;
# an output directory holding anything else is never replaced.
CHECKPOINT_DIRECTORY_FILES = re.compile(
    r"model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors"
    # and of a DCP directory (--format dcp)
    r"|\.metadata|__\d+_\d+\.distcp"
)
# Files of a Hugging Face model directory that are not weights but that its loader needs:
# config.json, generation_config.json, tokenizer and processor files, chat templates,
# remote-code modules. Training state (trainer_state.json) and weight indexes are not.
_COMPANION_FILE = re.compile(r"[^.][^/]*\.(json|txt|model|jinja|tiktoken|py)")
_NOT_COMPANIONS = re.compile(r"trainer_state\.json|.*\.index\.json|polyak-.*")
_MAX_LISTED_FILES = 3


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def is_directory_output(out: str | Path) -> bool:
    """Whether ``out`` names an output directory rather than a file.

    A path that ends with a separator (``"averaged/"``) or whose name has no suffix
    (``"averaged"``) is a directory; ``"averaged.safetensors"`` is a file.

    Example:
        >>> is_directory_output("averaged/"), is_directory_output("avg.pt")
        (True, False)
    """
    text = os.fspath(out)
    if text.endswith(("/", os.sep)):
        return True
    return Path(text).suffix == ""


def is_companion_file(name: str) -> bool:
    """Whether a file name in a model directory is a non-weight file its loader needs.

    Example:
        >>> [is_companion_file(n) for n in ("config.json", "trainer_state.json", "optimizer.pt")]
        [True, False, False]
    """
    return bool(_COMPANION_FILE.fullmatch(name)) and not _NOT_COMPANIONS.fullmatch(name)


def companion_files(directory: Path) -> list[Path]:
    """The config, generation config and tokenizer files of a model directory, sorted.

    Only regular files (a link to one counts) directly inside ``directory``.
    """
    return [
        entry
        for entry in sorted(directory.iterdir())
        if is_companion_file(entry.name) and entry.is_file()
    ]


def _is_within(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it, links resolved."""
    return path.resolve().is_relative_to(directory.resolve())


def _foreign_entries(directory: Path, companions: Sequence[Path] = ()) -> list[str]:
    """Names in ``directory`` that are neither files of a safetensors checkpoint nor
    copies of ``companions`` (the same name and the same bytes: what would be copied)."""
    same_as = {source.name: source for source in companions}
    foreign = []
    for entry in sorted(directory.iterdir()):
        is_file = entry.is_file() and not entry.is_symlink()
        source = same_as.get(entry.name)
        ours = CHECKPOINT_DIRECTORY_FILES.fullmatch(entry.name) or (
            source is not None and is_file and filecmp.cmp(entry, source, shallow=False)
        )
        if not (is_file and ours):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED_FILES])
    more = len(names) - _MAX_LISTED_FILES
    return shown + (f" and {more} more" if more > 0 else "")


def check_output_path(
    out: Path,
    inputs: Iterable[Path],
    *,
    overwrite: bool,
    directory: bool | None = None,
    companions: Sequence[Path] = (),
) -> None:
    """Refuse an output that is one of the inputs (also via a link), or exists unasked.

    Args:
        out: the output file or directory.
        inputs: the checkpoints read (files, or directories such as ``checkpoint-500/``).
        overwrite: whether an existing output may be replaced.
        directory: whether ``out`` is an output directory; by default
            :func:`is_directory_output` decides.
        companions: files that will be copied into an output directory (see
            :func:`companion_files`); an existing copy of one, byte for byte, may be
            replaced like the checkpoint's own files.

    Raises:
        OutputError: naming the output and, where it is one, the input it would replace:
            the output is an input, lies inside a directory input, or (a directory)
            holds an input; it exists and ``overwrite`` is false; a file output is an
            existing directory; a directory output is a file, a symbolic link, or holds
            files other than a safetensors checkpoint's; its parent directory is missing.
    """
    out = Path(out)
    inputs = [Path(source) for source in inputs]
    if directory is None:
        directory = is_directory_output(out)
    for source in inputs:
        candidates = [source, *source.iterdir()] if source.is_dir() else [source]
        for candidate in candidates:
            if out.resolve() == candidate.resolve() or _same_file(out, candidate):
                raise OutputError(
                    f"output {out}: is the input {candidate}; polyak never overwrites an input. "
                    "Choose another output path."
                )
        if source.is_dir() and _is_within(out, source):
            raise OutputError(
                f"output {out}: lies inside the input checkpoint directory {source}; polyak "
                "never writes into an input. Choose a path outside it."
            )
    if directory:
        _check_output_directory(out, inputs, overwrite=overwrite, companions=companions)
        return
    if out.exists() and not overwrite:
        raise OutputError(f"output {out}: already exists. Pass overwrite=True to replace it.")
    if out.is_dir():
        raise OutputError(f"output {out}: is a directory; give a file name.")
    if not out.parent.is_dir():
        raise OutputError(f"output {out}: the directory {out.parent} does not exist.")


def check_outputs(
    outputs: Iterable[tuple[Path, bool]], inputs: Iterable[Path], *, overwrite: bool
) -> None:
    """:func:`check_output_path` for each of several outputs, and no two of them the same.

    Args:
        outputs: ``(path, is_directory)`` for every file or directory a command writes
            (a model, a JSON report, a plot...).
        inputs: everything the command reads: checkpoints, data files, model files.
        overwrite: whether existing outputs may be replaced.

    Raises:
        OutputError: an output is or holds an input, exists unasked, or is (or lies
            inside) another output.
    """
    inputs = [Path(source) for source in inputs]
    seen: list[Path] = []
    for out, directory in outputs:
        out = Path(out)
        check_output_path(out, inputs, overwrite=overwrite, directory=directory)
        for other in seen:
            if _is_within(out, other) or _is_within(other, out):
                raise OutputError(
                    f"output {out}: is also the output {other}; give each output its own path."
                )
        seen.append(out)


def _check_output_directory(
    out: Path, inputs: list[Path], *, overwrite: bool, companions: Sequence[Path]
) -> None:
    for source in inputs:
        if _is_within(source, out):
            raise OutputError(
                f"output {out}: holds the input {source}; polyak never overwrites an input. "
                "Choose another output directory."
            )
    if out.is_symlink():
        raise OutputError(
            f"output {out}: is a symbolic link; polyak replaces an output directory as a "
            "whole and will not replace a link. Give the real directory's path."
        )
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output {out}: is a file, but a path without a suffix (or ending with /) names "
            "an output directory. Give the file a suffix (e.g. .safetensors) or choose "
            "another path."
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"output {out}: already exists. Pass overwrite=True to replace it.")
        foreign = _foreign_entries(out, companions)
        if foreign:
            raise OutputError(
                f"output {out}: holds {_listed(foreign)}, which polyak did not write; "
                "overwrite=True replaces the whole directory, so polyak refuses to. Choose "
                "a new directory, or move those files away."
            )
    if not out.parent.is_dir():
        raise OutputError(f"output {out}: the directory {out.parent} does not exist.")


def _stale_entries(out: Path, mark: str) -> Iterator[Path]:
    """Leftovers ``.NAME{mark}PID-...`` of ``out`` whose process has exited."""
    prefix = f".{out.name}{mark}"
    for stale in out.parent.glob(glob.escape(prefix) + "*"):
        pid_text = stale.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            yield stale


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, ignoring errors (best-effort cleanup)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_stale_temporaries(out: Path) -> None:
    for stale in _stale_entries(out, _TEMP_MARK):
        _remove(stale)
    # An old output set aside by a killed replace is garbage once a new output exists;
    # until then it is the only copy of the previous output, and is kept.
    if out.exists():
        for stale in _stale_entries(out, _OLD_MARK):
            _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _naming_the_output(error: OutputError, temporary: Path, out: Path) -> OutputError:
    """The error a writer raised about ``temporary``, naming ``out`` instead.

    Writers are handed the temporary path and name it in their messages; the user asked
    for ``out`` and never sees the temporary, which is removed on failure.
    """
    message = str(error)
    renamed = message.replace(str(temporary), str(out))
    return error if renamed == message else OutputError(renamed)


def c_function(name: str, *argtypes: object) -> Callable[..., int] | None:
    """The C library's function ``name`` returning an int, or None where it has none.

    Looked up in the symbols the process has already loaded (``CDLL(None)``: Python
    itself links the C library), so nothing runs ``ldconfig`` as
    ``ctypes.util.find_library`` does. ctypes releases the GIL during the call and keeps
    ``errno`` for ``ctypes.get_errno()``.

    Args:
        name: the function, e.g. ``"renameat2"``.
        argtypes: the ctypes types of its arguments.
    """
    import ctypes  # here: only committing an output or prefetching pages needs it

    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (None: not Linux, old glibc), looked up on the first commit."""
    import ctypes

    return c_function(
        "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    )


def _rename_no_replace(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target`` unless ``target`` exists, in one step.

    Returns False where the kernel or the file system cannot do it in one step
    (no ``renameat2``, or ``RENAME_NOREPLACE`` unsupported); the caller falls back.

    Raises:
        FileExistsError: ``target`` exists (created meanwhile by another writer).
        OSError: any other failure.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(  # type: ignore[operator]
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
    )
    if result == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(target))


def _commit_file(temporary: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished temporary file to ``out``: replacing it only when ``overwrite``.

    Without ``overwrite`` the commit is create-if-absent in one step (``renameat2``
    with ``RENAME_NOREPLACE``, else a hard link then unlinking the temporary), so an
    output another writer committed meanwhile is kept, never replaced.
    """
    if overwrite:
        os.replace(temporary, out)
        return
    if _rename_no_replace(temporary, out):
        return
    try:
        os.link(temporary, out)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: the last check, then a plain rename.
        if os.path.lexists(out):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(out)) from None
        os.replace(temporary, out)
        return
    os.unlink(temporary)


def _created_meanwhile(out: Path) -> OutputError:
    return OutputError(
        f"output {out}: was created by another writer while polyak wrote its own; polyak "
        "kept that one and discarded its own. Pass overwrite=True to replace it."
    )


@contextlib.contextmanager
def atomic_output(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success fsync it and rename it to ``out``.

    On any exception the temporary file is removed and ``out`` is left as it was.
    Without ``overwrite`` the rename is create-if-absent: if ``out`` appeared while
    the temporary was written (another process's output), it is kept, and
    ``OutputError`` is raised.

    Example:
        >>> with atomic_output(Path("avg.safetensors")) as temporary:  # doctest: +SKIP
        ...     write_safetensors(temporary, tensors)
    """
    out = Path(out)
    _remove_stale_temporaries(out)
    temporary = out.parent / f".{out.name}{_TEMP_MARK}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        yield temporary
        try:
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
            _commit_file(temporary, out, overwrite=overwrite)
        except FileExistsError:
            raise _created_meanwhile(out) from None
        except OSError as error:
            raise OutputError(f"output {out}: cannot be written ({error.strerror}).") from None
        _fsync_directory(out.parent)
    except OutputError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        renamed = _naming_the_output(error, temporary, out)
        if renamed is error:
            raise
        raise renamed from error
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _commit_directory(temporary: Path, out: Path) -> None:
    """Rename the finished temporary directory to ``out`` only if ``out`` holds nothing.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel has it; else a plain rename, which
    POSIX lets replace only an empty directory (a non-empty one fails).

    Raises:
        FileExistsError: ``out`` exists and holds something.
    """
    if out.is_dir() and not any(out.iterdir()):
        with contextlib.suppress(OSError):
            out.rmdir()  # an empty directory (made by the user for the output) holds nothing
    if _rename_no_replace(temporary, out):
        return
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(out))
    try:
        os.rename(temporary, out)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(error.errno, error.strerror, os.fspath(out)) from None
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


@contextlib.contextmanager
def atomic_directory(
    out: Path, companions: Sequence[Path] = (), *, overwrite: bool = False
) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success rename it to ``out``.

    An output directory (a safetensors checkpoint directory: shards and their index) is
    written the same way as a whole: every file goes into a temporary directory
    ``.NAME.polyak-tmp-PID-RANDOM/`` beside the target, each file and the directory are
    fsynced, and the directory is renamed to ``NAME``. Replacing an existing output
    directory (``overwrite``) takes two renames, since POSIX cannot swap two
    directories in one: the old one is renamed aside to ``.NAME.polyak-old-PID-RANDOM``,
    the new one renamed in, then the old one deleted. If the second rename fails, the
    old directory is renamed back. A process killed between the two renames leaves no
    ``NAME`` at all, never a partial one, with the old output kept under its
    ``.polyak-old-`` name; the next write to ``NAME`` deletes such a leftover once a new
    ``NAME`` exists (at its start, or at its end once it has renamed its own in). polyak
    only ever replaces a directory that holds nothing but a safetensors checkpoint
    (``model.safetensors``, ``model-00001-of-0000K.safetensors`` shards,
    ``model.safetensors.index.json``); any other file in it is refused, never deleted.

    Every file in the temporary directory and the directory itself are fsynced before
    the rename. With ``overwrite``, an existing non-empty ``out`` is renamed aside,
    replaced, then deleted (above); it must hold only a safetensors
    checkpoint's files and byte-for-byte copies of ``companions``, checked again here.
    Without ``overwrite`` the rename is create-if-absent: an ``out`` that holds anything
    (another writer's output created meanwhile) is kept and ``OutputError`` raised. On
    any exception the temporary directory is removed and ``out`` is left as it was.

    Raises:
        OutputError: the directory cannot be created, written or renamed, or ``out``
            holds files polyak did not write.

    Example:
        >>> with atomic_directory(Path("averaged")) as temporary:  # doctest: +SKIP
        ...     write_sharded_safetensors(temporary, tensors, template, max_shard_size=2**30)
    """
    out = Path(out)
    _remove_stale_temporaries(out)
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    temporary = out.parent / f".{out.name}{_TEMP_MARK}{token}"
    try:
        temporary.mkdir()
    except OSError as error:
        raise OutputError(f"output {out}: cannot be written ({error.strerror}).") from None
    aside: Path | None = None
    try:
        yield temporary
        try:
            for entry in temporary.iterdir():
                _fsync_file(entry)
            _fsync_directory(temporary)
            if not overwrite:
                _commit_directory(temporary, out)
            elif out.is_dir() and any(out.iterdir()):
                foreign = _foreign_entries(out, companions)
                if foreign:
                    raise OutputError(
                        f"output {out}: holds {_listed(foreign)}, which polyak did not write; "
                        "polyak refuses to replace the directory."
                    )
                aside = out.parent / f".{out.name}{_OLD_MARK}{token}"
                os.rename(out, aside)
            if overwrite:
                try:
                    os.rename(temporary, out)
                except OSError:
                    if aside is not None:
                        os.rename(aside, out)
                        aside = None
                    raise
        except FileExistsError:
            shutil.rmtree(temporary, ignore_errors=True)
            raise _created_meanwhile(out) from None
        except OSError as error:
            if isinstance(error, OutputError):
                raise
            raise OutputError(f"output {out}: cannot be written ({error.strerror}).") from None
        _fsync_directory(out.parent)
    except OutputError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        renamed = _naming_the_output(error, temporary, out)
        if renamed is error:
            raise
        raise renamed from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    # An old output a killed replace left set aside is garbage now that a new one is in.
    _remove_stale_temporaries(out)
