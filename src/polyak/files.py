"""Writing outputs atomically, and refusing to write over an input.

An output is written to a temporary file in its target directory, flushed and
fsynced, then renamed over the final name: an interrupted run leaves either no file
or the previous one under that name, never a partial one. Temporary files are named
``.NAME.polyak-tmp-PID-RANDOM``; one left by a killed process is removed by the next
write to the same output.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path

from polyak.errors import OutputError

__all__ = ["atomic_output", "check_output_path"]

_TEMP_MARK = ".polyak-tmp-"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def check_output_path(out: Path, inputs: Iterable[Path], *, overwrite: bool) -> None:
    """Refuse an output that is one of the inputs (also via a link), or exists unasked.

    Raises:
        OutputError: naming the output and, where it is one, the input it would replace.
    """
    for source in inputs:
        candidates = [source, *source.iterdir()] if source.is_dir() else [source]
        for candidate in candidates:
            if out.resolve() == candidate.resolve() or _same_file(out, candidate):
                raise OutputError(
                    f"output {out}: is the input {candidate}; polyak never overwrites an input. "
                    "Choose another output path."
                )
    if out.exists() and not overwrite:
        raise OutputError(f"output {out}: already exists. Pass --overwrite to replace it.")
    if out.is_dir():
        raise OutputError(f"output {out}: is a directory; give a file name.")
    if not out.parent.is_dir():
        raise OutputError(f"output {out}: the directory {out.parent} does not exist.")


def _remove_stale_temporaries(out: Path) -> None:
    prefix = f".{out.name}{_TEMP_MARK}"
    for stale in out.parent.glob(glob.escape(prefix) + "*"):
        pid_text = stale.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            with contextlib.suppress(OSError):
                stale.unlink()


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


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success fsync it and rename it to ``out``.

    On any exception the temporary file is removed and ``out`` is left as it was.

    Example:
        >>> with atomic_output(Path("avg.safetensors")) as temporary:  # doctest: +SKIP
        ...     write_safetensors(temporary, tensors)
    """
    out = Path(out)
    _remove_stale_temporaries(out)
    temporary = out.parent / f".{out.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield temporary
        try:
            with open(temporary, "rb+") as file:
                os.fsync(file.fileno())
            os.replace(temporary, out)
        except OSError as error:
            raise OutputError(f"output {out}: cannot be written ({error.strerror}).") from None
        _fsync_directory(out.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
