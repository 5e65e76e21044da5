"""polyak.significance against closed forms and slow float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from polyak.errors import SchemeError
from polyak.significance import compare, is_binary, mcnemar_exact, paired_bootstrap, unknown


def outcomes(right_both: int, only_a: int, only_b: int, wrong_both: int):
    """Hand-made paired correct-or-not outcomes with the given cell counts."""
    a = [True] * right_both + [True] * only_a + [False] * only_b + [False] * wrong_both
    b = [True] * right_both + [False] * only_a + [True] * only_b + [False] * wrong_both
    return np.array(a), np.array(b)


@pytest.mark.parametrize(
    ("only_a", "only_b"),
    [(0, 0), (1, 0), (0, 1), (3, 3), (7, 2), (2, 7), (13, 4), (30, 45), (120, 80), (500, 430)],
)
def test_mcnemar_equals_scipy_exact_binomial_test(only_a, only_b):
    a, b = outcomes(900, only_a, only_b, 50)
    expected = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_takes_zero_one_integers_like_bools():
    a, b = outcomes(10, 9, 1, 5)
    assert mcnemar_exact(a.astype(np.int64), b.astype(np.int8)) == mcnemar_exact(a, b)


def test_mcnemar_refuses_losses():
    with pytest.raises(SchemeError, match="correct-or-not"):
        mcnemar_exact(np.array([0.2, 0.5]), np.array([0.1, 0.7]))


def slow_bootstrap(a, b, resamples, seed, confidence=0.95):
    """One resample at a time, in float64: the reference for the vectorized bootstrap."""
    rng = np.random.default_rng(seed)
    differences = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    means = []
    for _ in range(resamples):
        indices = rng.integers(0, len(differences), size=len(differences), dtype=np.int64)
        total = 0.0
        for index in indices:
            total += differences[index]
        means.append(total / len(differences))
    tail = (1 - confidence) / 2
    return tuple(np.quantile(np.array(means), [tail, 1 - tail]))


@pytest.mark.parametrize("kind", ["binary", "loss"])
def test_bootstrap_equals_a_slow_loop_with_the_same_seed(kind):
    rng = np.random.default_rng(5)
    if kind == "binary":
        a, b = rng.random(301) < 0.8, rng.random(301) < 0.75
    else:
        a, b = rng.gamma(2.0, size=301), rng.gamma(2.0, size=301)
    low, high = paired_bootstrap(a, b, resamples=400, seed=11)
    expected = slow_bootstrap(a, b, 400, 11)
    assert (low, high) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_bootstrap_chunks_give_the_stream_of_one_draw_per_round(monkeypatch):
    from polyak import significance

    a, b = outcomes(50, 12, 4, 9)
    whole = paired_bootstrap(a, b, resamples=300, seed=3)
    monkeypatch.setattr(significance, "_CHUNK_ELEMENTS", len(a) * 7)  # 7 rounds a chunk
    assert paired_bootstrap(a, b, resamples=300, seed=3) == whole


def test_bootstrap_is_seeded():
    a, b = outcomes(50, 12, 4, 9)
    assert paired_bootstrap(a, b, seed=1) == paired_bootstrap(a, b, seed=1)
    assert paired_bootstrap(a, b, seed=1) != paired_bootstrap(a, b, seed=2)


def test_identical_models_give_a_zero_interval_and_p_one():
    a, _ = outcomes(70, 20, 0, 10)
    comparison = compare(a, a.copy(), higher_is_better=True, against="the final model")
    assert (comparison.low, comparison.high) == (0.0, 0.0)
    assert comparison.p_value == 1.0
    assert comparison.difference == 0.0
    assert comparison.within_noise is True
    assert (
        comparison.sentence
        == "the difference from the final model is within noise on this test set"
    )


def test_a_clear_gain_is_larger_than_noise_with_its_p_value():
    a, b = outcomes(800, 40, 5, 155)
    comparison = compare(a, b, higher_is_better=True, against="the final model")
    p_value = binomtest(40, 45, 0.5).pvalue
    assert comparison.difference == pytest.approx(35 / 1000)
    assert comparison.p_value == pytest.approx(p_value, rel=1e-9)
    assert comparison.low > 0
    assert comparison.sentence == (
        f"the gain over the final model is larger than noise (p = {p_value:.1e})"
    )


def test_a_small_gain_is_within_noise():
    a, b = outcomes(800, 6, 4, 190)
    comparison = compare(a, b, higher_is_better=True, against="the final model")
    assert comparison.within_noise is True
    assert comparison.low < 0 < comparison.high
    assert comparison.sentence == "the gain over the final model is within noise on this test set"


def test_losses_use_the_interval_and_lower_is_better():
    rng = np.random.default_rng(0)
    final = rng.gamma(2.0, size=2000)
    selected = final - 0.3  # every example's loss lower by 0.3
    comparison = compare(selected, final, higher_is_better=False, against="the final model")
    assert comparison.p_value is None
    assert comparison.difference == pytest.approx(-0.3)
    assert comparison.low == pytest.approx(-0.3) and comparison.high == pytest.approx(-0.3)
    assert comparison.sentence == (
        "the gain over the final model is larger than noise (the 95% interval excludes 0)"
    )
    worse = compare(final, selected, higher_is_better=False, against="the final model")
    assert worse.sentence.startswith("the shortfall against the final model is larger than noise")


def test_unknown_says_so_and_invents_nothing():
    comparison = unknown(0.01, "the final model")
    assert comparison.low is None and comparison.p_value is None and comparison.within_noise is None
    assert "unknown" in comparison.sentence
    assert comparison.to_json()["interval"] is None


def test_is_binary():
    assert is_binary(np.array([True, False]))
    assert is_binary(np.array([0, 1, 1]))
    assert not is_binary(np.array([0, 2]))
    assert not is_binary(np.array([0.0, 1.0]))


def test_unpaired_outcomes_are_refused():
    with pytest.raises(SchemeError, match="same, nonzero length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
