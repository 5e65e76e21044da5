"""The errors polyak raises for a user's mistake or a bad checkpoint.

Each is a ``PolyakError`` and also the builtin exception a caller would expect
(``ValueError`` for bad values, ``OSError`` for files that cannot be used), so code
that already catches those keeps working. The command line turns any
``PolyakError`` into a one-line message and exit code 2; anything else is a bug
(exit code 1).

Messages state the rule, what was received, and the fix, and name the file (and
the tensor, where there is one).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CheckpointError",
    "DataError",
    "DiscoveryError",
    "IncompatibleCheckpointsError",
    "MissingDependencyError",
    "NonFiniteError",
    "OutputError",
    "PolyakError",
    "PolyakNote",
    "SchemeError",
]


class PolyakError(Exception):
    """Base class of every error polyak raises on purpose."""


class PolyakNote(UserWarning):
    """Something polyak did on its own that a user should know (the CLI prints one line)."""


class ArgumentError(PolyakError, ValueError):
    """An argument a caller passed breaks its rule (a count, a size, a choice).

    ``parameter`` is the library's name for it (``"max_shard_size"``), so the command
    line can say the rule again with its own flag (``--max-shard-size``); ``parameters``
    is it and the ``others`` the message names too (two options that do not go together).
    """

    def __init__(
        self, message: str, *, parameter: str | None = None, others: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.parameters = (*(() if parameter is None else (parameter,)), *others)


class SchemeError(ArgumentError):
    """A weighting scheme, an averaging schedule or its spec string is invalid."""


class DiscoveryError(PolyakError, ValueError):
    """Checkpoints could not be found or put in an unambiguous order."""


class CheckpointError(PolyakError, ValueError):
    """A checkpoint file cannot be read: unknown format, corrupt, or unsafe."""


class NonFiniteError(CheckpointError):
    """A floating tensor holds NaN or infinity and the caller did not allow it."""


class IncompatibleCheckpointsError(PolyakError, ValueError):
    """Members disagree on tensor names, shapes or dtypes, or on integer values."""


class DataError(PolyakError, ValueError):
    """Evaluation data cannot be used: missing file, wrong arrays, mismatched model."""


class OutputError(PolyakError, OSError):
    """The output cannot be written where or how it was asked."""


class MissingDependencyError(PolyakError, ImportError):
    """An optional dependency is needed; the message says which extra installs it."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise ``MissingDependencyError``.

    Args:
        module: the module to import, e.g. ``"torch"``.
        extra: the polyak extra that installs it, e.g. ``"torch"``.
        purpose: what it is needed for, e.g. ``"reading .pt checkpoints"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} needs {module}, which is not installed. "
            f"Install it with: pip install 'polyak[{extra}]'"
        ) from error
