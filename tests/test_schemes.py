"""Tests of polyak.schemes: every scheme against its closed-form formula, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak.errors import ArgumentError, SchemeError
from polyak.schemes import (
    SCHEMES,
    Custom,
    Equal,
    Exponential,
    Linear,
    normalize,
    parse_scheme,
    parse_schemes,
)

SIZES = range(1, 13)
ALPHAS = [0.01, 0.5, 1.0, 2.0, 3.7, 100.0]


def reference_linear(n: int) -> np.ndarray:
    """w_i = (n - i + 1)/n, i = 1..n newest first, normalized: 2 (n - i + 1) / (n (n + 1))."""
    return np.array([2.0 * (n - i + 1) / (n * (n + 1)) for i in range(1, n + 1)])


def reference_exponential(n: int, alpha: float) -> np.ndarray:
    """w_i = exp(-i/alpha) normalized, summed in math.fsum from the newest term's scale."""
    # exp(-i/alpha) / sum_j exp(-j/alpha) = 1 / sum_j exp((i - j)/alpha); written this way
    # the tiny-alpha case neither underflows to 0/0 nor overflows.
    weights = []
    for i in range(1, n + 1):
        terms = [(i - j) / alpha for j in range(1, n + 1)]
        weights.append(1.0 / math.fsum(math.exp(t) if t < 700 else math.inf for t in terms))
    return np.array(weights)


# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("n", SIZES)
def test_equal_is_one_over_n(n: int) -> None:
    weights = Equal().weights(n)
    assert weights.dtype == np.float64
    assert weights.shape == (n,)
    np.testing.assert_allclose(weights, np.full(n, 1.0 / n), rtol=1e-15, atol=0)


@pytest.mark.parametrize("n", SIZES)
def test_linear_matches_formula(n: int) -> None:
    weights = Linear().weights(n)
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, reference_linear(n), rtol=1e-14, atol=0)


@pytest.mark.parametrize("n", SIZES)
def test_linear_raw_weights_are_the_unnormalized_formula(n: int) -> None:
    expected = np.array([(n - i + 1) / n for i in range(1, n + 1)])
    np.testing.assert_allclose(Linear().raw_weights(n), expected, rtol=1e-15)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("n", SIZES)
def test_exponential_matches_formula(n: int, alpha: float) -> None:
    weights = Exponential(alpha).weights(n)
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, reference_exponential(n, alpha), rtol=1e-12, atol=1e-300)


def test_exponential_without_shift_matches_for_moderate_alpha() -> None:
    # The textbook form, computed naively, where it does not underflow.
    n, alpha = 7, 2.0
    raw = np.exp(-np.arange(1, n + 1) / alpha)
    np.testing.assert_allclose(Exponential(alpha).weights(n), raw / raw.sum(), rtol=1e-14)


@pytest.mark.parametrize("n", SIZES)
def test_tiny_alpha_still_gives_a_valid_vector_with_the_newest_about_one(n: int) -> None:
    weights = Exponential(0.01).weights(n)
    assert weights.shape == (n,)
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0)
    assert abs(weights.sum() - 1.0) <= 1e-12
    assert weights[0] == pytest.approx(1.0, abs=1e-40)
    if n > 1:
        assert weights[1] == pytest.approx(math.exp(-100.0), rel=1e-12)


@pytest.mark.parametrize("n", SIZES)
def test_custom_is_normalized(n: int) -> None:
    values = tuple(float(v) for v in range(n, 0, -1))  # n, n-1, ..., 1
    weights = Custom(values).weights(n)
    total = math.fsum(values)
    np.testing.assert_allclose(weights, [v / total for v in values], rtol=1e-15)


def test_custom_keeps_the_order_given_newest_first() -> None:
    weights = Custom((0.2, 0.3, 0.5)).weights(3)
    np.testing.assert_allclose(weights, [0.2, 0.3, 0.5], rtol=1e-15)


def test_custom_with_zeros_keeps_them_zero() -> None:
    np.testing.assert_array_equal(Custom((0.0, 0.0, 1.0)).weights(3), [0.0, 0.0, 1.0])


# ---------------------------------------------------------------- the classic numbers


def test_classic_linear_three() -> None:
    np.testing.assert_allclose(Linear().weights(3), [0.5, 1 / 3, 1 / 6], rtol=1e-15)


def test_classic_docstring_example() -> None:
    assert parse_scheme("linear").weights(3).round(3).tolist() == [0.5, 0.333, 0.167]


def test_classic_equal_four() -> None:
    np.testing.assert_array_equal(Equal().weights(4), [0.25, 0.25, 0.25, 0.25])


def test_classic_exponential_two_members() -> None:
    # exp(-1/2) : exp(-2/2) normalized = 1/(1+e^-1/2), e^-1/2/(1+e^-1/2)
    ratio = math.exp(-0.5)
    np.testing.assert_allclose(
        Exponential(2.0).weights(2), [1 / (1 + ratio), ratio / (1 + ratio)], rtol=1e-15
    )


def test_one_member_always_gets_everything() -> None:
    for scheme in (Equal(), Linear(), Exponential(0.5), Exponential(0.01), Custom((3.0,))):
        np.testing.assert_array_equal(scheme.weights(1), [1.0])


# ---------------------------------------------------------------- properties

sizes = st.integers(min_value=1, max_value=200)
alphas = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)


def check_valid(weights: np.ndarray, n: int) -> None:
    assert weights.shape == (n,)
    assert weights.dtype == np.float64
    assert np.all(np.isfinite(weights))
    assert np.all(weights >= 0)
    assert abs(math.fsum(weights.tolist()) - 1.0) <= 1e-12


@given(n=sizes)
def test_property_equal_valid(n: int) -> None:
    check_valid(Equal().weights(n), n)


@given(n=sizes)
def test_property_linear_valid_and_non_increasing(n: int) -> None:
    weights = Linear().weights(n)
    check_valid(weights, n)
    assert np.all(np.diff(weights) <= 0)


@given(n=sizes, alpha=alphas)
def test_property_exponential_valid_and_non_increasing(n: int, alpha: float) -> None:
    weights = Exponential(alpha).weights(n)
    check_valid(weights, n)
    assert np.all(np.diff(weights) <= 0)
    assert weights[0] > 0


@given(
    values=st.lists(
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=50,
    ).filter(lambda v: sum(v) > 0)
)
def test_property_custom_valid_and_proportional(values: list[float]) -> None:
    weights = Custom(tuple(values)).weights(len(values))
    check_valid(weights, len(values))
    total = math.fsum(values)
    np.testing.assert_allclose(weights, [v / total for v in values], rtol=1e-12, atol=1e-300)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_custom_huge_finite_weights_still_sum_to_one() -> None:
    weights = Custom((1e308, 1e308)).weights(2)
    np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-15)


@given(n=sizes)
def test_property_weights_are_fresh_arrays(n: int) -> None:
    first = Linear().weights(n)
    first[:] = -1
    assert np.all(Linear().weights(n) >= 0)


# ---------------------------------------------------------------- specs


def test_parse_equal_and_linear() -> None:
    assert parse_scheme("equal") == Equal()
    assert parse_scheme("linear") == Linear()
    assert parse_scheme("  Linear ") == Linear()
    assert isinstance(parse_scheme("EQUAL"), Equal)


def test_parse_exp_with_alpha() -> None:
    scheme = parse_scheme("exp:2")
    assert scheme == Exponential(2.0)
    assert scheme.alpha == 2.0
    assert parse_scheme("exp:0.5") == Exponential(0.5)
    assert parse_scheme("exponential:3") == Exponential(3.0)


def test_parse_exp_alone_means_alpha_two() -> None:
    scheme = parse_scheme("exp")
    assert isinstance(scheme, Exponential)
    assert scheme.alpha == 2.0


def test_parse_custom() -> None:
    scheme = parse_scheme("custom:0.5,0.3,0.2")
    assert scheme == Custom((0.5, 0.3, 0.2))
    np.testing.assert_allclose(scheme.weights(3), [0.5, 0.3, 0.2], rtol=1e-15)


def test_parse_passes_a_scheme_through() -> None:
    scheme = Exponential(0.5)
    assert parse_scheme(scheme) is scheme


def test_specs() -> None:
    assert Exponential(2.0).spec == "exp:2"
    assert Exponential(0.5).spec == "exp:0.5"
    assert Equal().spec == "equal"
    assert Linear().spec == "linear"
    assert Custom((0.5, 0.3, 0.2)).spec == "custom:0.5,0.3,0.2"
    assert str(Exponential(2.0)) == "exp:2"


@pytest.mark.parametrize(
    "spec",
    ["equal", "linear", "exp:2", "exp:0.5", "exp:0.01", "custom:0.5,0.3,0.2", "custom:0,0,1"],
)
def test_spec_round_trip(spec: str) -> None:
    scheme = parse_scheme(spec)
    assert scheme.spec == spec
    assert parse_scheme(scheme.spec) == scheme


@given(alpha=st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 10.0, 1000.0]))
def test_property_exp_spec_round_trip_for_short_alphas(alpha: float) -> None:
    scheme = Exponential(alpha)
    assert parse_scheme(scheme.spec) == scheme


def test_exp_spec_round_trip_keeps_every_digit() -> None:
    scheme = Exponential(0.123456789)
    assert parse_scheme(scheme.spec) == scheme


def test_custom_spec_round_trip_keeps_every_digit() -> None:
    scheme = Custom((0.1234567, 1.0))
    assert parse_scheme(scheme.spec) == scheme


def test_scheme_registry_lists_every_spec_name() -> None:
    assert set(SCHEMES) == {"equal", "linear", "exp", "custom", "greedy", "power", "wsm"}


# ---------------------------------------------------------------- lists of schemes


def test_parse_schemes_grid() -> None:
    schemes = parse_schemes("equal,linear,exp:0.5,1,2")
    assert schemes == [Equal(), Linear(), Exponential(0.5), Exponential(1.0), Exponential(2.0)]


def test_parse_schemes_accepts_a_list() -> None:
    assert parse_schemes(["equal", "exp:0.5,1"]) == [Equal(), Exponential(0.5), Exponential(1.0)]


def test_parse_schemes_custom_inside_a_list() -> None:
    schemes = parse_schemes("equal,custom:0,0,1,linear")
    assert schemes == [Equal(), Custom((0.0, 0.0, 1.0)), Linear()]
    np.testing.assert_array_equal(schemes[1].weights(3), [0.0, 0.0, 1.0])


def test_parse_schemes_exp_alone_then_numbers() -> None:
    assert parse_schemes("exp,0.5") == [Exponential(2.0), Exponential(0.5)]


def test_parse_schemes_removes_duplicates_keeping_order() -> None:
    assert parse_schemes("linear,equal,linear,exp:2,exp,2") == [Linear(), Equal(), Exponential(2.0)]


def test_parse_schemes_ignores_empty_items() -> None:
    assert parse_schemes("equal,,linear,") == [Equal(), Linear()]


# ---------------------------------------------------------------- refusals


def test_scheme_error_is_a_value_error() -> None:
    assert issubclass(SchemeError, ValueError)
    with pytest.raises(ValueError):
        parse_scheme("bogus")


def test_negative_weights_refused() -> None:
    with pytest.raises(SchemeError, match=r"custom weights must be >= 0; received \[0.5, -0.1\]"):
        parse_scheme("custom:0.5,-0.1")
    with pytest.raises(SchemeError, match="must be >= 0"):
        Custom((1.0, -1.0))


def test_zero_sum_refused() -> None:
    with pytest.raises(SchemeError, match="sum to zero; at least one must be positive"):
        parse_scheme("custom:0,0,0")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_custom_weights_refused(bad: str) -> None:
    with pytest.raises(SchemeError, match="custom weights must be finite"):
        parse_scheme(f"custom:0.5,{bad}")


def test_non_finite_in_normalize_refused() -> None:
    with pytest.raises(SchemeError, match="weights must be finite"):
        normalize([1.0, math.nan])
    with pytest.raises(SchemeError, match="at least one weight is needed"):
        normalize([])
    with pytest.raises(SchemeError, match="must be numbers"):
        normalize(["a", "b"])


def test_custom_wrong_length_refused() -> None:
    scheme = parse_scheme("custom:0.5,0.3,0.2")
    with pytest.raises(SchemeError, match="3 values were given for 4 members"):
        scheme.weights(4)
    with pytest.raises(SchemeError, match="3 values were given for 2 members.*one weight per"):
        scheme.weights(2)


def test_custom_without_values_refused() -> None:
    with pytest.raises(SchemeError, match=r"give the weights, e.g. custom:0.5,0.3,0.2"):
        parse_scheme("custom:")


@pytest.mark.parametrize("spec", ["exp:0", "exp:-1", "exp:nan", "exp:inf"])
def test_bad_alpha_refused(spec: str) -> None:
    with pytest.raises(SchemeError, match="alpha must be a finite number > 0"):
        parse_scheme(spec)


def test_non_numeric_alpha_refused() -> None:
    with pytest.raises(SchemeError, match="scheme 'exp:abc': 'abc' is not a number"):
        parse_scheme("exp:abc")


def test_bad_alpha_refused_in_constructor() -> None:
    with pytest.raises(SchemeError, match=r"received 0"):
        Exponential(0)
    with pytest.raises(SchemeError, match="alpha must be"):
        Exponential(-1.0)


def test_unknown_scheme_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        SchemeError, match=r"unknown scheme 'cosine'\. Known schemes: equal, linear"
    ):
        parse_scheme("cosine")
    with pytest.raises(SchemeError, match="unknown scheme 'cosine'"):
        parse_schemes("equal,cosine")


def test_non_string_spec_refused() -> None:
    with pytest.raises(SchemeError, match="must be a spec string; received 3"):
        parse_scheme(3)  # type: ignore[arg-type]


def test_numbers_after_a_scheme_that_takes_none_refused() -> None:
    with pytest.raises(SchemeError, match="scheme 'linear' takes no numbers; received 3"):
        parse_schemes("linear,3")


def test_number_first_refused() -> None:
    with pytest.raises(SchemeError, match="the number 3 follows no scheme"):
        parse_schemes("3,linear")


def test_empty_list_refused() -> None:
    with pytest.raises(SchemeError, match="no scheme given"):
        parse_schemes(" , ")


def test_single_exp_with_several_alphas_suggests_a_list() -> None:
    with pytest.raises(SchemeError, match=r"one alpha per exponential scheme.*list of schemes"):
        parse_scheme("exp:1,2")


@pytest.mark.parametrize("n", [0, -1])
def test_weights_of_no_members_refused(n: int) -> None:
    with pytest.raises(ArgumentError, match=rf"^n must be a whole number >= 1; received {n}"):
        Linear().weights(n)


def test_weights_of_non_integer_count_refused() -> None:
    with pytest.raises(ArgumentError, match="must be a whole number >= 1; received 2.0"):
        Equal().weights(2.0)  # type: ignore[arg-type]


def test_weights_accepts_numpy_integers() -> None:
    np.testing.assert_allclose(Linear().weights(np.int64(3)), [0.5, 1 / 3, 1 / 6], rtol=1e-15)


# --- WSM: weights from a decay curve ----------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_wsm_linear_decay_is_the_uniform_average(n: int) -> None:
    np.testing.assert_allclose(parse_scheme("wsm:linear").weights(n), np.full(n, 1.0 / n))


@pytest.mark.parametrize("n", SIZES)
def test_wsm_1_sqrt_matches_its_closed_form(n: int) -> None:
    # Oldest first j = 1..n: sqrt(j/n) - sqrt((j-1)/n); they telescope to 1.
    oldest_first = [math.sqrt(j / n) - math.sqrt((j - 1) / n) for j in range(1, n + 1)]
    np.testing.assert_allclose(
        parse_scheme("wsm:1-sqrt").weights(n), oldest_first[::-1], rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("n", SIZES)
def test_wsm_weights_give_back_the_decay_curve_as_tail_sums(n: int) -> None:
    # The gradient of segment j counts in every member from j on: its learning-rate
    # multiplier is the sum of the weights of members j..n, which must be f((j-1)/n).
    for curve, f in {
        "1-sqrt": lambda x: 1 - math.sqrt(x),
        "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
    }.items():
        oldest_first = parse_scheme(f"wsm:{curve}").weights(n)[::-1]
        tails = np.cumsum(oldest_first[::-1])[::-1]
        np.testing.assert_allclose(tails, [f((j - 1) / n) for j in range(1, n + 1)], atol=1e-12)


def test_wsm_spec_default_and_unknown_curve() -> None:
    assert parse_scheme("wsm").spec == "wsm:1-sqrt"
    assert parse_scheme("wsm:1-sqrt").spec == "wsm:1-sqrt"
    assert [s.spec for s in parse_schemes("equal,wsm:linear,wsm:cosine")] == [
        "equal",
        "wsm:linear",
        "wsm:cosine",
    ]
    with pytest.raises(SchemeError, match="unknown decay curve; known: linear, 1-sqrt, cosine"):
        parse_scheme("wsm:step")
