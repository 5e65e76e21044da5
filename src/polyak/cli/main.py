"""The ``polyak`` entry point: subcommands, one-line errors and exit codes.

Exit codes: 0 done, 2 bad input or refused (any ``PolyakError``, a usage error, or
a file the file system refuses: a name too long, a full disk), 1 a bug. ``-v`` shows
the traceback. Under torchrun every process joins torch's process group
(``polyak.distributed``) and only process 0 prints results.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import NoReturn

import typer

from polyak import __version__
from polyak.cli import average, demo, inspect, posthoc, sweep
from polyak.cli.output import console, flags_of, in_flags, one_line, print_note
from polyak.distributed import init_from_environment, launched_by_torchrun, shut_down
from polyak.errors import PolyakError, PolyakNote

app = typer.Typer(
    name="polyak",
    help="Polyak-Ruppert weight averaging of neural network checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _State:
    verbose = False


STATE = _State()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"polyak {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Show tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Polyak-Ruppert weight averaging of neural network checkpoints."""
    STATE.verbose = verbose


#: The subcommands, in the order ``--help`` lists them: one module each, registered here.
COMMANDS = {
    "average": average.average_command,
    "demo": demo.demo_command,
    "inspect": inspect.inspect_command,
    "posthoc": posthoc.posthoc_command,
    "sweep": sweep.sweep_command,
}


def _register() -> None:
    """Add the subcommands of :data:`COMMANDS` to ``app``, once."""
    if not app.registered_commands:
        for name, command in COMMANDS.items():
            app.command(name)(speaking_flags(command))


def speaking_flags(command: Callable[..., None]) -> Callable[..., None]:
    """``command``, whose errors name its flags where the library named its parameters.

    The library's messages name its parameters (``max_shard_size must be a size...``,
    ``Pass overwrite=True``), which is right for a Python caller; a command line user
    typed ``--max-shard-size`` and would type ``--overwrite`` (:func:`in_flags`).
    """
    flags = flags_of(command)

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        try:
            command(*args, **kwargs)
        except PolyakError as error:
            message = in_flags(str(error), flags, getattr(error, "parameters", ()))
            if message != str(error):
                error.args = (message,)  # the same error, said for the command line
            raise

    return run


def _join_torchrun_group() -> str:
    """Under torchrun: join the process group; only process 0 prints results.

    Returns:
        How errors name this process (empty in a plain process).
    """
    if not launched_by_torchrun():
        return ""
    group = init_from_environment()
    if group is None:
        return ""
    if not group.is_main:
        sys.stdout = open(os.devnull, "w")  # for the rest of the process
        console.quiet = True
    return f" (process {group.rank} of {group.size})"


def run() -> None:
    """The ``polyak`` command: :func:`main` as the whole life of its process.

    The console script and ``python -m polyak`` call this. The objects the imports made
    (numpy, typer, rich, polyak: tens of thousands) live until the process ends; frozen
    here (``gc.freeze``), the garbage collector no longer walks them, in its
    collections while the command runs and in the last one at exit, which took 60 to
    70 ms of every command on a 2-core machine (``polyak --version`` 0.32 s -> 0.25 s).
    Objects made from here on are collected as usual. :func:`main`, which a program or
    a test may call many times in one process, freezes nothing.
    """
    gc.freeze()
    main()


def main(argv: list[str] | None = None) -> None:
    """Run the command line; never returns (exits with the command's code)."""
    _register()
    arguments = sys.argv[1:] if argv is None else argv
    STATE.verbose = "-v" in arguments or "--verbose" in arguments
    where = ""
    try:
        where = _join_torchrun_group()
    except PolyakError as error:
        print(f"polyak: error: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    try:
        _run(arguments, where)
    finally:
        if where:  # in a torchrun group: leave it before the interpreter exits
            exit_code = getattr(sys.exc_info()[1], "code", 1)
            shut_down(clean=exit_code in (0, None))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A ``PolyakNote`` as one line on stderr; every other warning as Python shows it."""
    if issubclass(category, PolyakNote):
        print_note(str(message))
        return
    _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def _run(arguments: list[str], where: str) -> None:
    warnings.showwarning = _show_warning
    command = typer.main.get_command(app)
    try:
        # Standalone mode: typer itself reports usage errors (exit 2) and --help.
        command.main(args=arguments, prog_name="polyak", standalone_mode=True)
    except PolyakError as error:
        if STATE.verbose:
            traceback.print_exc()
        print(f"polyak: error{where}: {one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("polyak: interrupted.", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.filename is None:  # not about a file: a bug, below
            _internal_error(error)
        # The file system refused a file: a name too long, no permission, a full disk.
        if STATE.verbose:
            traceback.print_exc()
        reason = error.strerror or type(error).__name__
        print(f"polyak: error{where}: {one_line(f'{error.filename}: {reason}.')}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        _internal_error(error)


def _internal_error(error: Exception) -> NoReturn:
    """A bug: say so, and how to see more; exit 1."""
    if STATE.verbose:
        traceback.print_exc()
    print(
        "polyak: internal error (a bug, please report it): "
        f"{type(error).__name__}: {one_line(str(error))}"
        + ("" if STATE.verbose else " (run with -v for the traceback)"),
        file=sys.stderr,
    )
    sys.exit(1)
