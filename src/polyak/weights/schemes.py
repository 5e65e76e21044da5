"""Weighting schemes: how much each member counts in the average.

numpy only; public as :mod:`polyak.schemes` too.

Members are ordered newest first, ``i = 1..n``. Every scheme returns ``n`` weights
as a float64 array normalized to sum to 1 (so, like ``numpy.average``, only their
ratios matter):

=============== ======================================= =========================
scheme          weight of member i (before normalizing) spec string
=============== ======================================= =========================
equal           1/n                                      ``equal``
linear          (n - i + 1)/n: n/n, (n-1)/n, ..., 1/n    ``linear``
exponential     exp(-i/alpha), alpha > 0                 ``exp:2``
custom          given, newest first                      ``custom:0.5,0.3,0.2``
power EMA       the power profile's mass at each member  ``power:0.1``
WSM decay       f((n-i)/n) - f((n-i+1)/n), f a decay curve ``wsm:1-sqrt``
greedy soup     1/k for the k members the soup keeps     ``greedy`` (sweep only)
=============== ======================================= =========================

Each scheme's class says where its formula comes from (:class:`Power`, :class:`Wsm`,
:class:`Greedy`).

Example:
    >>> from polyak.schemes import parse_scheme
    >>> parse_scheme("linear").weights(3).round(3).tolist()
    [0.5, 0.333, 0.167]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polyak.checks import whole_number
from polyak.errors import SchemeError
from polyak.weights.profiles import gamma_of, power_snapshot_weights

__all__ = [
    "SCHEMES",
    "Custom",
    "Equal",
    "Exponential",
    "Greedy",
    "Linear",
    "Power",
    "Scheme",
    "Wsm",
    "normalize",
    "parse_scheme",
    "parse_schemes",
]


def normalize(weights: object, *, source: str = "weights") -> np.ndarray:
    """Check raw weights and scale them to sum to 1.

    Refuses negative, non-finite, empty or all-zero weights, saying which.

    Args:
        weights: a sequence of numbers.
        source: how to name the weights in an error message.
    """
    try:
        values = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise SchemeError(f"{source} must be numbers; received {weights!r}.") from None
    if values.size == 0:
        raise SchemeError(f"{source}: at least one weight is needed; received none.")
    if not np.all(np.isfinite(values)):
        raise SchemeError(f"{source} must be finite; received {values.tolist()}.")
    if np.any(values < 0):
        raise SchemeError(f"{source} must be >= 0; received {values.tolist()}.")
    largest = values.max()
    if largest <= 0:
        raise SchemeError(f"{source} sum to zero; at least one must be positive.")
    # Scale by the largest first: the sum of huge finite weights must not overflow.
    scaled = values / largest
    return scaled / scaled.sum()


def format_number(value: float) -> str:
    """The shortest text that parses back to exactly ``value``: ``2.0`` -> ``2``."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


class Scheme:
    """A weighting scheme: ``weights(n)`` for the n newest members, newest first."""

    spec: str
    #: Whether the weights depend on the members' steps (``positions``).
    uses_positions: bool = False

    def raw_weights(self, n: int) -> np.ndarray:
        """Unnormalized weights (the formula), newest first."""
        raise NotImplementedError

    def weights(self, n: int, positions: Sequence[float] | None = None) -> np.ndarray:
        """Weights of the n newest members, newest first, summing to 1.

        Args:
            n: the number of members.
            positions: the members' steps, newest first; only schemes with
                ``uses_positions`` (``power``) need them, the others ignore them.
        """
        n = whole_number(n, "n", minimum=1)
        return normalize(self.raw_weights(int(n)), source=f"scheme {self.spec}")

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class Equal(Scheme):
    """Every member counts the same: w_i = 1/n."""

    @property
    def spec(self) -> str:
        return "equal"

    def raw_weights(self, n: int) -> np.ndarray:
        return np.full(n, 1.0 / n)


@dataclass(frozen=True)
class Linear(Scheme):
    """Linearly decreasing: w_i = (n - i + 1)/n, so the newest gets n/n and the oldest 1/n.

    Normalized, w_i = 2 (n - i + 1) / (n (n + 1)).
    """

    @property
    def spec(self) -> str:
        return "linear"

    def raw_weights(self, n: int) -> np.ndarray:
        i = np.arange(1, n + 1, dtype=np.float64)
        return (n - i + 1) / n


@dataclass(frozen=True)
class Exponential(Scheme):
    """Exponentially decreasing: w_i = exp(-i/alpha); alpha > 0 is the decay rate.

    A larger alpha spreads the weight over more members; alpha -> 0 keeps only the newest.
    """

    alpha: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)) or (
            self.alpha <= 0
        ):
            raise SchemeError(
                f"exponential scheme: alpha must be a finite number > 0; received {self.alpha!r}."
            )

    @property
    def spec(self) -> str:
        return f"exp:{format_number(self.alpha)}"

    def raw_weights(self, n: int) -> np.ndarray:
        i = np.arange(1, n + 1, dtype=np.float64)
        # Shift the exponent so the newest is exp(0) = 1: same ratios, no underflow to
        # all zeros for tiny alpha.
        return np.exp(-(i - 1) / self.alpha)


@dataclass(frozen=True)
class Custom(Scheme):
    """Weights given by the user, newest first; normalized to sum to 1."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        normalize(self.values, source="custom weights")

    @property
    def spec(self) -> str:
        return "custom:" + ",".join(format_number(v) for v in self.values)

    def raw_weights(self, n: int) -> np.ndarray:
        if n != len(self.values):
            raise SchemeError(
                f"custom weights: {len(self.values)} values were given for {n} members; "
                "give one weight per member, newest first."
            )
        return np.asarray(self.values, dtype=np.float64)


@dataclass(frozen=True)
class Power(Scheme):
    """A power-function EMA profile of relative width ``sigma_rel``, over the members' steps.

    The profile of Karras et al. (2024), see :mod:`polyak.weights.profiles`. Member i at
    step p_i (newest first) gets the profile's mass over (p_i - d_i, p_i], d_i the spacing
    to its newer neighbour: w_i ~ p_i^(g+1) - (p_i - d_i)^(g+1), with g the profile's
    exponent (:func:`polyak.weights.profiles.gamma_of`). Needs the steps.
    """

    sigma_rel: float = 0.1
    uses_positions = True

    def __post_init__(self) -> None:
        gamma_of(self.sigma_rel)  # refuses widths outside (0, 0.2887)

    @property
    def spec(self) -> str:
        return f"power:{format_number(self.sigma_rel)}"

    def weights(self, n: int, positions: Sequence[float] | None = None) -> np.ndarray:
        n = whole_number(n, "n", minimum=1)
        if positions is None or any(p is None for p in positions):
            raise SchemeError(
                f"scheme {self.spec}: weighs members by their steps, but a checkpoint's name "
                "has no step number. Name checkpoints with their steps (model_step1000...)."
            )
        if len(positions) < n:
            raise SchemeError(
                f"scheme {self.spec}: {len(positions)} steps were given for {n} members."
            )
        return power_snapshot_weights(list(positions)[:n], self.sigma_rel)

    def raw_weights(self, n: int) -> np.ndarray:
        raise SchemeError(
            f"scheme {self.spec}: needs the members' steps; use weights(n, positions)."
        )


# Decay curves of the WSM scheme: f(0) = 1, f(1) = 0, non-increasing.
WSM_CURVES = {
    "linear": lambda x: 1.0 - x,
    "1-sqrt": lambda x: 1.0 - np.sqrt(x),
    "cosine": lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
}


@dataclass(frozen=True)
class Wsm(Scheme):
    """Weights that turn a checkpoint average into a learning-rate decay (WSM).

    WSM (Tian et al., 2025, arXiv 2507.17634) gives the average of checkpoints taken at
    a constant learning rate the effect of decaying it over their window by the curve f
    (f(0) = 1 to f(1) = 0): the gradient of the j-th of n equally spaced segments counts
    in every member saved after it, so weights c_j = f((j-1)/n) - f(j/n) (member j
    oldest first) make its learning rate f((j-1)/n). Returned newest first. ``linear``
    (f(x) = 1 - x) gives equal weights; ``1-sqrt`` (f(x) = 1 - sqrt(x)) and ``cosine``
    (f(x) = (1 + cos(pi x))/2) are the others.

    Example:
        >>> Wsm("1-sqrt").weights(4).round(4).tolist()  # 1 - sqrt(3/4), ..., sqrt(1/4)
        [0.134, 0.1589, 0.2071, 0.5]
    """

    curve: str = "1-sqrt"

    def __post_init__(self) -> None:
        if self.curve not in WSM_CURVES:
            raise SchemeError(
                f"scheme wsm:{self.curve}: unknown decay curve; known: {', '.join(WSM_CURVES)}."
            )

    @property
    def spec(self) -> str:
        return f"wsm:{self.curve}"

    def raw_weights(self, n: int) -> np.ndarray:
        f = WSM_CURVES[self.curve]
        j = np.arange(1, n + 1, dtype=np.float64)
        oldest_first = f((j - 1) / n) - f(j / n)
        return oldest_first[::-1].copy()


@dataclass(frozen=True)
class Greedy(Scheme):
    """Greedy soup: members chosen by evaluation, averaged equally (sweep only).

    The greedy soup (Wortsman et al., 2022, "Model soups", Algorithm 1) takes its
    members from evaluation, not from a formula: members are sorted by their own
    validation score, best first; each is added to the soup (a uniform average) if the
    soup's validation score does not get worse. Only :mod:`polyak.sweep` can build it;
    ``weights`` refuses.
    """

    @property
    def spec(self) -> str:
        return "greedy"

    def raw_weights(self, n: int) -> np.ndarray:
        raise SchemeError(
            "scheme greedy: a greedy soup's members come from evaluating them on "
            "validation data, so it has no weights of its own. Use it in a sweep: "
            "polyak.sweep.sweep(..., schemes='greedy'), or polyak sweep --schemes greedy."
        )


# The one list of schemes: spec name -> how to build it from its parameters.
SCHEMES = {
    "equal": "Equal members: 1/n",
    "linear": "Linearly decreasing: (n-i+1)/n, newest first",
    "exp": "Exponentially decreasing: exp(-i/alpha), spec exp:ALPHA",
    "custom": "Given weights, newest first, spec custom:W1,W2,...",
    "power": "Power-function EMA profile over the members' steps, spec power:SIGMA_REL",
    "wsm": "A learning-rate decay made of the average (WSM), spec wsm:linear|1-sqrt|cosine",
    "greedy": "Greedy soup: members kept while validation does not get worse (sweep only)",
}


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SchemeError(f"scheme '{spec}': '{text}' is not a number.") from None
    return value


def parse_scheme(spec: str | Scheme) -> Scheme:
    """Build a scheme from its spec string: ``equal``, ``linear``, ``exp:2``, ``custom:0.5,0.3``.

    ``exp`` alone means alpha = 2, the classic experiment's decay rate.
    """
    if isinstance(spec, Scheme):
        return spec
    if not isinstance(spec, str):
        raise SchemeError(f"a scheme must be a spec string; received {spec!r}.")
    text = spec.strip()
    name, _, argument = text.partition(":")
    name = name.strip().lower()
    if name == "equal" and not argument:
        return Equal()
    if name == "linear" and not argument:
        return Linear()
    if name == "greedy" and not argument:
        return Greedy()
    if name in {"exp", "exponential"}:
        if not argument:
            return Exponential(2.0)
        if "," in argument:
            raise SchemeError(
                f"scheme '{spec}': one alpha per exponential scheme; for a grid of decay "
                "rates use a list of schemes, e.g. schemes='exp:0.5,1,2'."
            )
        return Exponential(_number(argument, spec))
    if name == "power":
        if not argument:
            raise SchemeError(f"scheme '{spec}': give the profile's width, e.g. power:0.1.")
        if "," in argument:
            raise SchemeError(
                f"scheme '{spec}': one width per power scheme; for a grid use a list of "
                "schemes, e.g. schemes='power:0.05,0.1,0.2'."
            )
        return Power(_number(argument, spec))
    if name == "wsm":
        return Wsm(argument.strip().lower() or "1-sqrt")
    if name == "custom":
        parts = [part for part in argument.split(",") if part.strip()]
        if not parts:
            raise SchemeError(f"scheme '{spec}': give the weights, e.g. custom:0.5,0.3,0.2.")
        return Custom(tuple(_number(part, spec) for part in parts))
    known = ", ".join(
        (
            "equal",
            "linear",
            "exp:ALPHA",
            "power:SIGMA_REL",
            "wsm:CURVE",
            "custom:W1,W2,...",
            "greedy",
        )
    )
    raise SchemeError(f"unknown scheme '{spec}'. Known schemes: {known}.")


def parse_schemes(specs: str | list[str]) -> list[Scheme]:
    """Parse a comma-separated list of schemes, e.g. ``equal,linear,exp:0.5,1,2``.

    Numbers after ``exp:`` form a grid of decay rates (``exp:0.5,1,2`` is three
    schemes); numbers after ``custom:`` are that scheme's weights.
    """
    items = specs if isinstance(specs, list) else [specs]
    groups: list[list[str]] = []  # a scheme token followed by the numbers after it
    for item in items:
        for token in (t.strip() for t in item.split(",")):
            if not token:
                continue
            if _is_number(token):
                if not groups:
                    raise SchemeError(f"schemes '{item}': the number {token} follows no scheme.")
                groups[-1].append(token)
            else:
                groups.append([token])
    schemes: list[Scheme] = []
    for head, *numbers in groups:
        name = head.partition(":")[0].strip().lower()
        if name == "custom":
            schemes.append(parse_scheme(",".join([head, *numbers])))
        elif name in {"exp", "exponential"}:
            schemes.append(parse_scheme(head))
            schemes.extend(parse_scheme(f"exp:{number}") for number in numbers)
        elif name == "power":
            schemes.append(parse_scheme(head))
            schemes.extend(parse_scheme(f"power:{number}") for number in numbers)
        elif numbers:
            raise SchemeError(f"scheme '{head}' takes no numbers; received {','.join(numbers)}.")
        else:
            schemes.append(parse_scheme(head))
    if not schemes:
        raise SchemeError("no scheme given; e.g. equal, linear, exp:2.")
    return list(dict.fromkeys(schemes))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
