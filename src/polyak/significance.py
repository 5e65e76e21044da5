"""Is a difference between two models on one test set more than noise? numpy only.

Two models scored on the same test examples give paired per-example outcomes:
correct or not (accuracy), or a loss per example. From them:

- :func:`paired_bootstrap`: a percentile interval for mean(a) - mean(b). Each of
  ``resamples`` rounds draws n example indices with replacement (the same indices
  for both models, which keeps the pairing) and takes the mean of the differences
  d_i = a_i - b_i; the interval is the (1 - confidence)/2 and (1 + confidence)/2
  quantiles of those means (``numpy.quantile``, linear interpolation). Seeded:
  the same seed gives the same interval.
- :func:`mcnemar_exact`: for correct-or-not outcomes, the exact McNemar test. Of
  the examples the two models disagree on, b are right for ``a`` only and c for
  ``b`` only; under "equally good", b ~ Binomial(b + c, 1/2), and the two-sided
  p-value is min(1, 2 P(X <= min(b, c))) (1 when b + c = 0).
- :func:`compare`: both, and one plain sentence saying whether the difference is
  within noise.

Example:
    >>> import numpy as np
    >>> from polyak.significance import compare
    >>> a = np.array([True] * 90 + [False] * 10)
    >>> b = np.array([True] * 80 + [False] * 20)
    >>> comparison = compare(a, b, higher_is_better=True, against="the final model")
    >>> round(comparison.difference, 2), comparison.p_value < 0.01
    (0.1, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from polyak.checks import whole_number
from polyak.errors import SchemeError

__all__ = [
    "Comparison",
    "compare",
    "is_binary",
    "mcnemar_exact",
    "paired_bootstrap",
    "unknown",
]

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
LEVEL = 0.05  # the p-value (or interval) below which a difference is "larger than noise"
# Index draws per chunk: bounds the memory of the vectorized bootstrap (16 MB of int64
# indices, and as much for the gathered values) whatever the number of examples.
_CHUNK_ELEMENTS = 2_000_000


def is_binary(outcomes: np.ndarray) -> bool:
    """Whether per-example outcomes are correct-or-not: bool, or integers all 0 or 1."""
    outcomes = np.asarray(outcomes)
    if outcomes.dtype == bool:
        return True
    if np.issubdtype(outcomes.dtype, np.integer):
        return bool(np.all((outcomes == 0) | (outcomes == 1)))
    return False


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b) or len(a) == 0:
        raise SchemeError(
            "paired outcomes must be two 1-D arrays of the same, nonzero length (one value "
            f"per test example); received shapes {a.shape} and {b.shape}."
        )
    return a, b


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b) over paired examples.

    Draws ``rng.integers(0, n, size=n)`` per resample from
    ``numpy.random.default_rng(seed)``, in order, vectorized in chunks of rounds
    (the stream is the same as one call per round).

    Args:
        a, b: per-example outcomes of two models on the same examples, in the same order.
        resamples: bootstrap rounds.
        confidence: the interval's coverage, e.g. 0.95.
        seed: the random generator's seed.

    Returns:
        ``(low, high)``.
    """
    a, b = _paired(a, b)
    resamples = whole_number(resamples, "resamples", minimum=1)
    if not 0 < confidence < 1:
        raise SchemeError(f"bootstrap: confidence must be in (0, 1); received {confidence}.")
    differences = a.astype(np.float64) - b.astype(np.float64)
    count = len(differences)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    rows = max(1, _CHUNK_ELEMENTS // count)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        indices = rng.integers(0, count, size=(stop - start, count), dtype=np.int64)
        means[start:stop] = differences[indices].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired correct-or-not outcomes.

    With b = #(a right, b wrong) and c = #(a wrong, b right):
    p = min(1, 2 * sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c)); p = 1 when b + c = 0.
    """
    a, b = _paired(a, b)
    if not (is_binary(a) and is_binary(b)):
        raise SchemeError("McNemar's test needs correct-or-not outcomes (bool, or 0/1).")
    a, b = a.astype(bool), b.astype(bool)
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    disagreements = only_a + only_b
    smaller = min(only_a, only_b)
    if disagreements == 0 or 2 * smaller == disagreements:
        return 1.0
    # log C(n, k) - n log 2 for k = 0..smaller, by the ratio C(n, k+1) / C(n, k).
    k = np.arange(smaller, dtype=np.float64)
    steps = np.log((disagreements - k) / (k + 1))
    logs = np.concatenate([[0.0], np.cumsum(steps)]) - disagreements * math.log(2)
    top = logs.max()
    tail = math.exp(top) * float(np.sum(np.exp(logs - top)))
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    """The selected candidate against another model, on the same test examples.

    Attributes:
        against: what it is compared with, e.g. ``"the final model"``.
        difference: selected - other on test (mean of the per-example outcomes when
            known, else of the two scores).
        low, high: the 95% paired bootstrap interval of ``difference``; None when the
            per-example outcomes are unknown.
        p_value: the exact McNemar p-value, for correct-or-not outcomes; else None.
        examples: the number of test examples compared (None when unknown).
        resamples, seed: of the bootstrap.
        within_noise: whether the difference is within noise: p >= 0.05 for
            correct-or-not outcomes, else the interval contains 0; None when unknown.
        sentence: the finding in plain words.
    """

    against: str
    difference: float
    low: float | None
    high: float | None
    p_value: float | None
    examples: int | None
    within_noise: bool | None
    sentence: str
    resamples: int = RESAMPLES
    seed: int = SEED

    def to_json(self) -> dict:
        """JSON-ready data."""
        return {
            "against": self.against,
            "difference": self.difference,
            "interval": None if self.low is None else [self.low, self.high],
            "confidence": CONFIDENCE,
            "p_value": self.p_value,
            "test": None if self.p_value is None else "exact McNemar (binomial)",
            "examples": self.examples,
            "resamples": self.resamples,
            "seed": self.seed,
            "within_noise": self.within_noise,
            "sentence": self.sentence,
        }


def _format_p(p_value: float) -> str:
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.1e}"


def compare(
    selected: np.ndarray,
    other: np.ndarray,
    *,
    higher_is_better: bool,
    against: str,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Comparison:
    """The selected model against another on paired per-example test outcomes.

    Within noise: for correct-or-not outcomes when McNemar's p >= 0.05; otherwise
    when the 95% bootstrap interval contains 0.
    """
    selected, other = _paired(selected, other)
    difference = float(np.mean(selected.astype(np.float64)) - np.mean(other.astype(np.float64)))
    low, high = paired_bootstrap(selected, other, resamples=resamples, seed=seed)
    binary = is_binary(selected) and is_binary(other)
    p_value = mcnemar_exact(selected, other) if binary else None
    within = p_value >= LEVEL if p_value is not None else low <= 0 <= high
    better = difference > 0 if higher_is_better else difference < 0
    if difference == 0:
        word = "the difference from"
    elif better:
        word = "the gain over"
    else:
        word = "the shortfall against"
    if within:
        sentence = f"{word} {against} is within noise on this test set"
    else:
        evidence = (
            f"p = {_format_p(p_value)}" if p_value is not None else "the 95% interval excludes 0"
        )
        sentence = f"{word} {against} is larger than noise ({evidence})"
    return Comparison(
        against, difference, low, high, p_value, len(selected), within, sentence, resamples, seed
    )


def unknown(difference: float, against: str) -> Comparison:
    """A comparison whose uncertainty is unknown: no per-example outcomes."""
    return Comparison(
        against,
        difference,
        None,
        None,
        None,
        None,
        None,
        f"the uncertainty of the difference from {against} is unknown (the evaluator "
        "returned no per-example outcomes)",
    )
