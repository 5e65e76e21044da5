"""Shared console output: rich tables on stdout, a progress bar on stderr.

The progress bar appears only on a terminal and only once work has run longer
than a second, so short runs and pipes stay quiet.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console(highlight=False)
error_console = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Print JSON for scripts (plain, no colors)."""
    print(json.dumps(data, indent=2, default=str))


#: The longest message printed whole; a longer one (a hostile file's 10,000-character
#: tensor name, say) keeps its start, which names the file, and its end, the fix.
MAX_MESSAGE = 2000


def one_line(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``...), so a message
    stays one line whatever a file's tensor or member names hold, and at most
    :data:`MAX_MESSAGE` characters long (the middle of a longer one is left out)."""
    if not text.isprintable():
        text = "".join(
            character if character.isprintable() else character.encode("unicode_escape").decode()
            for character in text
        )
    if len(text) > MAX_MESSAGE:
        head, tail = MAX_MESSAGE * 3 // 5, MAX_MESSAGE // 5
        left_out = len(text) - head - tail
        text = f"{text[:head]} [... {left_out} characters left out ...] {text[-tail:]}"
    return text


def flags_of(command: Callable[..., None]) -> dict[str, str]:
    """The long flag of each option of a subcommand, by its parameter's name.

    The subcommands name their parameters as the library names the ones they feed
    (``max_shard_size`` -> ``--max-shard-size``, ``test_data`` -> ``--data``).
    """
    flags = {}
    for name, parameter in signature(command).parameters.items():
        if isinstance(parameter.default, typer.models.OptionInfo):
            long = [flag for flag in parameter.default.param_decls if flag.startswith("--")]
            if long:
                flags[name] = long[0]
    return flags


def in_flags(message: str, flags: Mapping[str, str], named: Iterable[str] = ()) -> str:
    """A library message said with the command line's flags instead of the library's names.

    ``name=True`` becomes the flag, ``name='value'`` (or ``name=value``) the flag and the
    value. A bare name becomes the flag only where the error is about that parameter
    (``named``, an ``ArgumentError``'s ``parameters``); elsewhere it may be a plain word
    or the name of a quantity (``sigma_rel``). A name inside a path (``runs/last/``) is
    left alone.

    Example:
        >>> flags = {"overwrite": "--overwrite", "integers": "--integers", "last": "--last"}
        >>> in_flags("Pass overwrite=True to replace it.", flags)
        'Pass --overwrite to replace it.'
        >>> in_flags("integers='require-equal' forbids that", flags)
        '--integers require-equal forbids that'
        >>> in_flags("last must be a whole number >= 1 or None; received 0.", flags, ["last"])
        '--last must be a whole number >= 1; received 0.'
    """
    named = set(named)
    before, after = r"(?<![\w/\\.-])", r"(?![\w/\\])"
    for parameter, flag in flags.items():
        name = re.escape(parameter)
        message = re.sub(rf"{before}{name}=True\b", flag, message)
        value = r"""(['"]?)(\w[\w.:,/+-]*)\1"""
        message = re.sub(rf"{before}{name}={value}", rf"{flag} \2", message)
        if parameter in named:
            message = re.sub(rf"{before}{name}{after}", flag, message)
    if named:  # an option left out is None already; a command line cannot pass None
        message = message.replace(" or None;", ";")
    return message


def print_note(note: str) -> None:
    """One line on stderr for something the user should know that is not an error."""
    print(f"polyak: note: {one_line(note)}", file=sys.stderr)


def human_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def path_size(path: Path) -> int:
    """Bytes of a file, or of the files directly inside a directory."""
    if path.is_dir():
        return sum(child.stat().st_size for child in path.iterdir() if child.is_file())
    return path.stat().st_size


class DelayedProgress:
    """A byte-count progress bar that shows only after ``delay`` seconds on a terminal."""

    def __init__(self, description: str, delay: float = 1.0) -> None:
        self.description = description
        self.delay = delay
        self.total = 0
        self.done = 0
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task = None

    def start(self, total: int) -> None:
        self.total = total
        self._started = time.monotonic()

    def advance(self, amount: int) -> None:
        self.done += amount
        if self._progress is None:
            if not error_console.is_terminal or time.monotonic() - self._started < self.delay:
                return
            # Imported only when a bar shows: most runs never need rich.progress.
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

            self._progress = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TimeRemainingColumn(),
                console=error_console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total)
        self._progress.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> DelayedProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
