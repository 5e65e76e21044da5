"""Weighting schemes: how much each member counts in the average.

The public name of :mod:`polyak.weights.schemes`, where the schemes and their formulas live.

Example:
    >>> from polyak.schemes import parse_scheme
    >>> parse_scheme("linear").weights(3).round(3).tolist()
    [0.5, 0.333, 0.167]
"""

from polyak.weights.schemes import (
    SCHEMES,
    WSM_CURVES,
    Custom,
    Equal,
    Exponential,
    Greedy,
    Linear,
    Power,
    Scheme,
    Wsm,
    format_number,
    normalize,
    parse_scheme,
    parse_schemes,
)

__all__ = [
    "SCHEMES",
    "WSM_CURVES",
    "Custom",
    "Equal",
    "Exponential",
    "Greedy",
    "Linear",
    "Power",
    "Scheme",
    "Wsm",
    "format_number",
    "normalize",
    "parse_scheme",
    "parse_schemes",
]
