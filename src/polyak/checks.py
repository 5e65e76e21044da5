"""The checks of a caller's arguments that many parts of polyak share, each written once.

Numpy-free and framework-free; it imports nothing of polyak but its errors, so even
the weight math may use it. Both checks raise :class:`polyak.errors.ArgumentError`
naming the library's parameter; the command line words the rule with its own flags.
"""

from __future__ import annotations

import operator
import re

from polyak.errors import ArgumentError

__all__ = ["as_whole_number", "parse_size", "whole_number"]

# Size units: decimal as huggingface_hub reads them ("5GB" = 5 * 10**9), and binary.
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def as_whole_number(value: object, minimum: int = 0, maximum: int | None = None) -> int | None:
    """``value`` as an int in ``[minimum, maximum]``, or None where it is not one.

    A whole number is anything ``operator.index`` accepts (int, numpy integers, 0-d
    integer tensors) except ``bool``: ``True`` is not a count.
    """
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    if number < minimum or (maximum is not None and number > maximum):
        return None
    return number


def whole_number(
    value: object,
    name: str,
    *,
    minimum: int = 0,
    maximum: int | None = None,
    or_none: bool = False,
) -> int | None:
    """``value`` checked as a whole number ``>= minimum`` (and ``<= maximum``), as an int.

    Args:
        value: what the caller passed.
        name: the library's name of the parameter, for the message.
        minimum: the least value allowed.
        maximum: the largest value allowed, if any.
        or_none: None is allowed too (and returned).

    Raises:
        ArgumentError: "``name`` must be a whole number >= ``minimum`` [or None];
            received ``value``", with ``parameter`` set to ``name``.

    Example:
        >>> whole_number(3, "keep", minimum=1)
        3
        >>> whole_number(None, "every_steps", minimum=1, or_none=True) is None
        True
    """
    if value is None and or_none:
        return None
    number = as_whole_number(value, minimum, maximum)
    if number is None:
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        allowed = f"a whole number {bounds}" + (" or None" if or_none else "")
        raise ArgumentError(f"{name} must be {allowed}; received {value!r}.", parameter=name)
    return number


def parse_size(size: object, name: str = "max_shard_size") -> int:
    """A size in bytes from a number of bytes or a string such as ``"500MB"``, ``"1.5GiB"``.

    Units are decimal as in huggingface_hub (``KB`` = 1000 bytes, ``MB``, ``GB``, ``TB``)
    or binary (``KiB`` = 1024 bytes, ``MiB``, ``GiB``, ``TiB``), case-insensitive;
    ``B`` or no unit means bytes, which must then be a whole number. Fractions of a
    byte are rounded down.

    Args:
        size: the size, e.g. ``2_000_000_000``, ``"2GB"``, ``"1.5 GiB"``, ``"4096"``.
        name: the library's name of the parameter, for the message.

    Returns:
        The size in bytes, at least 1.

    Raises:
        ArgumentError: anything else, with what was received and ``parameter`` set to
            ``name``.

    Example:
        >>> parse_size("500MB"), parse_size("1.5KiB"), parse_size(4096)
        (500000000, 1536, 4096)
    """
    count = as_whole_number(size, 1)
    if count is None and isinstance(size, str):
        match = _SIZE.fullmatch(size)
        unit = match.group(2).upper() if match else None
        if match is not None and unit in _SIZE_UNITS:
            from fractions import Fraction  # here: exact, and only a size string needs it

            value = Fraction(match.group(1))
            if unit not in {"", "B"} or value.denominator == 1:
                count = int(value * _SIZE_UNITS[unit]) or None
    if count is None:
        raise ArgumentError(
            f"{name} must be a size above 0 such as 500MB, 2GB, 1.5GiB or a whole number of "
            f"bytes; received {size!r}.",
            parameter=name,
        )
    return count
