"""Tests of polyak.online: the averaging schedules against their closed forms."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyak.errors import ArgumentError, SchemeError
from polyak.online import (
    AveragingProgress,
    AveragingSchedule,
    AveragingState,
    SwappableAverage,
    advance,
    check_buffer_policy,
    whole_or_none,
)
from polyak.posthoc import gamma_of

# ---------------------------------------------------------------- which steps update


def test_update_steps_follow_start_step_and_update_every():
    assert [s for s in range(0, 8) if AveragingSchedule().should_update(s)] == list(range(1, 8))
    schedule = AveragingSchedule(start_step=100, update_every=10)
    assert [s for s in range(0, 141) if schedule.should_update(s)] == [110, 120, 130, 140]


def test_steps_in_jumps_update_once_when_they_cross_an_update_step():
    schedule = AveragingSchedule(update_every=3)
    # Four steps per call (Keras' steps_per_execution): 3 is crossed by 0 -> 4, 6 by 4 -> 8.
    assert [schedule.should_update(s, s - 4) for s in (4, 8, 12, 16)] == [True, True, True, True]
    assert schedule.should_update(5, 4) is False
    assert schedule.should_update(4, 4) is False  # the same step again


def test_progress_counts_updates_and_ignores_a_repeated_step():
    progress = AveragingProgress(AveragingSchedule("polyak", update_every=2))
    decays = [progress.advance(step) for step in (1, 2, 2, 3, 4, 4, 6)]
    assert decays == [None, 0.0, None, None, 1 / 2, None, 2 / 3]
    assert (progress.updates, progress.last_step, progress.last_update_step) == (3, 6, 6)


def test_progress_refuses_a_decreasing_step():
    progress = AveragingProgress(AveragingSchedule())
    progress.advance(10)
    with pytest.raises(ValueError, match="steps must not decrease; received step 9 after step 10"):
        progress.advance(9)
    with pytest.raises(ValueError, match=r"step must be a whole number >= 0; received 1\.5"):
        progress.advance(1.5)


def test_progress_round_trips_through_its_dict():
    progress = AveragingProgress(AveragingSchedule(half_life=50, start_step=3, update_every=4))
    for step in range(1, 20):
        progress.advance(step)
    restored = AveragingProgress.from_dict(progress.to_dict())
    assert restored == progress
    assert [restored.advance(s) for s in range(20, 24)] == [
        progress.advance(s) for s in range(20, 24)
    ]


# ---------------------------------------------------------------- the pure advance

schedules = st.one_of(
    st.builds(lambda: AveragingSchedule("polyak")),
    st.builds(lambda r: AveragingSchedule(decay=r), st.floats(0.5, 0.9999)),
    st.builds(lambda h: AveragingSchedule(half_life=h), st.floats(0.5, 500.0)),
    st.builds(lambda s: AveragingSchedule(sigma_rel=s), st.floats(0.01, 0.28)),
).flatmap(
    lambda schedule: st.builds(
        lambda start, every: replace(schedule, start_step=start, update_every=every),
        st.integers(0, 20),
        st.integers(1, 7),
    )
)


def closed_form_decay(schedule: AveragingSchedule, updates: int, step: int, elapsed: int):
    """The decay of an update, from the formulas in the module docstring (float64)."""
    if updates == 0:
        return 0.0
    if schedule.mode == "polyak":
        return updates / (updates + 1)
    if schedule.mode == "ema":
        rate = schedule.decay if schedule.decay is not None else 0.5 ** (1 / schedule.half_life)
        return rate**elapsed
    gamma = gamma_of(schedule.sigma_rel)
    return (1 - elapsed / (step - schedule.start_step)) ** (gamma + 1)


@settings(max_examples=150, deadline=None)
@given(schedules, st.lists(st.integers(0, 9), min_size=1, max_size=40))
def test_advance_is_pure_and_follows_the_closed_forms(schedule, increments):
    state, step = AveragingState(), 0
    updates, last_update = 0, None
    for increment in increments:
        step += increment
        before = replace(state)
        new_state, decay = advance(schedule, state, step)
        # Pure: the input is unchanged, and the same call gives the same answer.
        assert state == before
        assert advance(schedule, state, step) == (new_state, decay)
        # An update exactly when an update step start + every * j (j >= 1) was crossed.
        previous = step - 1 if state.last_step is None else state.last_step
        crossed = [
            s
            for s in range(previous + 1, step + 1)
            if s > schedule.start_step and (s - schedule.start_step) % schedule.update_every == 0
        ]
        if not crossed:
            assert decay is None
            assert new_state == AveragingState(step, updates, last_update)
        else:
            since = schedule.start_step if last_update is None else last_update
            expected = closed_form_decay(schedule, updates, step, step - since)
            assert decay == pytest.approx(expected, rel=1e-12, abs=1e-15)
            updates, last_update = updates + 1, step
            assert new_state == AveragingState(step, updates, step)
        state = new_state


def test_advance_refuses_a_decreasing_step_and_leaves_the_state_alone():
    schedule = AveragingSchedule(half_life=10)
    state, decay = advance(schedule, AveragingState(), 5)
    assert (state, decay) == (AveragingState(5, 1, 5), 0.0)
    with pytest.raises(ValueError, match="steps must not decrease; received step 4 after step 5"):
        advance(schedule, state, 4)
    with pytest.raises(ArgumentError, match=r"step must be a whole number >= 0; received -1"):
        advance(schedule, state, -1)
    assert state == AveragingState(5, 1, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.updates = 2  # type: ignore[misc]


def test_the_progress_object_advances_as_the_pure_function_does():
    schedule = AveragingSchedule(sigma_rel=0.1, start_step=2, update_every=3)
    progress, state = AveragingProgress(schedule), AveragingState()
    for step in (1, 3, 5, 5, 9, 20):
        state, decay = advance(schedule, state, step)
        assert progress.advance(step) == decay
        assert progress.state == state
    assert AveragingProgress.of(schedule, state) == progress
    assert AveragingProgress.from_dict(progress.to_dict()).state == state


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    ("start_step", "update_every", "count"), [(0, 1, 1), (0, 1, 7), (5, 3, 40)]
)
def test_polyak_gives_every_update_the_same_weight(start_step, update_every, count):
    schedule = AveragingSchedule("polyak", start_step=start_step, update_every=update_every)
    steps = [start_step + update_every * j for j in range(1, count + 1)]
    np.testing.assert_allclose(schedule.weights(steps), np.full(count, 1 / count), rtol=1e-12)
    # The decay of the n-th update is (n - 1) / n.
    assert [schedule.decay_at(s, n, update_every) for n, s in enumerate(steps[:4])] == [
        (n - 1) / n for n in range(1, min(count, 4) + 1)
    ]


@pytest.mark.parametrize("update_every", [1, 10])
def test_ema_half_life_weights_match_the_closed_form(update_every):
    half_life, total = 30.0, 200
    rate = 0.5 ** (1 / half_life)  # decay per step
    steps = np.arange(update_every, total + 1, update_every)
    weights = AveragingSchedule(half_life=half_life, update_every=update_every).weights(steps)
    # The first update holds all the mass before it; each later one (1 - r^k) r^(T - s).
    expected = (1 - rate**update_every) * rate ** (total - steps.astype(float))
    expected[0] = rate ** (total - steps[0])
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_ema_half_life_gives_the_same_time_scale_with_update_every_1_and_10():
    half_life, total = 30, 300
    every_step = AveragingSchedule(half_life=half_life).weights(range(1, total + 1))
    every_ten = AveragingSchedule(half_life=half_life, update_every=10).weights(
        range(10, total + 1, 10)
    )
    # Each update every 10 steps carries exactly the weight the every-step EMA gives
    # its 10 steps...
    np.testing.assert_allclose(every_step.reshape(-1, 10).sum(axis=1), every_ten, rtol=1e-10)
    # ...and a step's weight halves after half_life steps, in both.
    np.testing.assert_allclose(every_step[-1 - half_life] / every_step[-1], 0.5, rtol=1e-12)
    np.testing.assert_allclose(every_ten[-1 - half_life // 10] / every_ten[-1], 0.5, rtol=1e-12)


def test_ema_decay_is_per_step_and_equals_the_half_life_it_implies():
    by_decay = AveragingSchedule(decay=0.99, update_every=10)
    by_half_life = AveragingSchedule(half_life=math.log(0.5) / math.log(0.99), update_every=10)
    assert by_decay.decay_at(20, 1, 10) == pytest.approx(0.99**10, rel=1e-15)
    assert by_half_life.decay_at(20, 1, 10) == pytest.approx(0.99**10, rel=1e-12)
    assert by_decay.decay_at(30, 2, 7) == pytest.approx(0.99**7, rel=1e-15)  # irregular gap


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_weights_are_the_profiles_mass_per_step(sigma_rel):
    exponent = gamma_of(sigma_rel) + 1
    total = 100
    tau = np.arange(1, total + 1, dtype=float)
    weights = AveragingSchedule(sigma_rel=sigma_rel).weights(tau.astype(int))
    expected = (tau**exponent - (tau - 1) ** exponent) / total**exponent
    np.testing.assert_allclose(weights, expected, rtol=1e-9, atol=1e-300)


def test_power_weights_with_update_every_and_a_start_step():
    exponent = gamma_of(0.1) + 1
    start, every, count = 50, 5, 30
    steps = start + every * np.arange(1, count + 1)
    weights = AveragingSchedule(sigma_rel=0.1, start_step=start, update_every=every).weights(steps)
    # Time runs from start_step: the update at s stands for (s - every, s].
    time = (steps - start).astype(float)
    expected = (time**exponent - (time - every) ** exponent) / time[-1] ** exponent
    np.testing.assert_allclose(weights, expected, rtol=1e-9, atol=1e-300)


def test_the_first_update_copies_the_weights_in_every_mode():
    for schedule in (
        AveragingSchedule("polyak"),
        AveragingSchedule(decay=0.9999),
        AveragingSchedule(sigma_rel=0.1, start_step=7),
    ):
        assert schedule.decay_at(17, 0, 10) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["polyak", "ema", "power"]),
    start_step=st.integers(0, 1000),
    gaps=st.lists(st.integers(1, 50), min_size=1, max_size=40),
)
def test_weights_are_positive_and_sum_to_one(mode, start_step, gaps):
    parameters = {"ema": {"half_life": 17.0}, "power": {"sigma_rel": 0.15}}.get(mode, {})
    schedule = AveragingSchedule(mode, start_step=start_step, **parameters)
    steps = start_step + np.cumsum(gaps)
    weights = schedule.weights(steps)
    assert np.all(weights >= 0)
    assert weights.sum() == pytest.approx(1.0, abs=1e-9)


# ---------------------------------------------------------------- arguments


def test_the_mode_is_inferred_from_the_parameters():
    assert AveragingSchedule().mode == "polyak"
    assert AveragingSchedule(decay=0.9).mode == "ema"
    assert AveragingSchedule(half_life=10).mode == "ema"
    assert AveragingSchedule(sigma_rel=0.1).mode == "power"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "swa"}, r"mode must be one of 'polyak', 'ema', 'power'; received 'swa'"),
        ({"mode": "polyak", "decay": 0.9}, r"mode 'polyak' takes no parameter .* decay=0\.9"),
        ({"mode": "power", "half_life": 3}, r"mode 'power' takes sigma_rel=S .* half_life=3"),
        ({"decay": 0.9, "half_life": 3}, r"exactly one of them; received \{'decay': 0\.9"),
        ({"mode": "ema"}, r"exactly one of them; received neither"),
        ({"decay": 1.0}, r"0 < decay < 1 \(per step.*received 1\.0"),
        ({"decay": 0}, r"0 < decay < 1 .*received 0"),
        ({"decay": float("nan")}, r"0 < decay < 1 .*received nan"),
        ({"decay": "0.9"}, r"0 < decay < 1 .*received '0\.9'"),
        ({"half_life": 0}, r"half_life must be a finite number of steps > 0; received 0"),
        ({"half_life": float("inf")}, r"half_life must be .*received inf"),
        ({"mode": "power"}, r"mode 'power' needs sigma_rel=S"),
        ({"sigma_rel": 0.5}, r"sigma_rel must be a number in \(0, 0\.2887\)"),
        ({"update_every": 0}, r"update_every must be a whole number >= 1; received 0"),
        ({"update_every": 2.0}, r"update_every must be a whole number >= 1; received 2\.0"),
        ({"start_step": -1}, r"start_step must be a whole number >= 0; received -1"),
        ({"start_step": True}, r"start_step must be a whole number >= 0; received True"),
    ],
)
def test_bad_arguments_are_refused_with_the_rule(arguments, message):
    with pytest.raises(SchemeError, match=message):
        AveragingSchedule(**arguments)


def test_a_bad_count_is_a_scheme_error_and_an_argument_error_naming_it():
    with pytest.raises(ArgumentError) as caught:
        AveragingSchedule(update_every=0)
    assert isinstance(caught.value, SchemeError)
    assert caught.value.parameter == "update_every"
    # The shared rule reads numpy integers and 0-d arrays as whole numbers too.
    schedule = AveragingSchedule(start_step=np.int64(4), update_every=np.array(2))
    assert (schedule.start_step, schedule.update_every) == (4, 2)
    assert type(schedule.start_step) is int and type(schedule.update_every) is int


def test_schedule_errors_are_value_errors():
    with pytest.raises(ValueError):
        AveragingSchedule(decay=2)


def test_weights_need_increasing_steps():
    with pytest.raises(
        SchemeError, match=r"update steps must increase strictly; received \[1, 1\]"
    ):
        AveragingSchedule().weights([1, 1])


def test_describe_says_mode_parameters_and_steps():
    assert AveragingSchedule().describe() == (
        "Polyak running mean (equal weights), updated every step after step 0"
    )
    assert AveragingSchedule(half_life=2000, update_every=10, start_step=5).describe() == (
        "EMA, half-life 2000 steps (decay 0.999653 per step), 0.99654 per update, "
        "updated every 10 steps after step 5"
    )
    assert AveragingSchedule(sigma_rel=0.1).describe().startswith("power EMA, sigma_rel 0.1 (gamma")


def test_schedule_round_trips_through_its_dict_and_refuses_other_dicts():
    schedule = AveragingSchedule(sigma_rel=0.05, start_step=3, update_every=2)
    assert AveragingSchedule.from_dict(schedule.to_dict()) == schedule
    with pytest.raises(SchemeError, match="saved as a mapping with the keys"):
        AveragingSchedule.from_dict({"mode": "ema"})
    assert schedule.starting_at(40).start_step == 40


@pytest.mark.parametrize("value", [None, 0, 7, np.int64(3), np.array(5)])
def test_whole_or_none_takes_none_and_whole_numbers_from_zero(value):
    expected = None if value is None else int(value)
    assert whole_or_none(value, "step") == expected


@pytest.mark.parametrize("value", [-1, 2.0, True, "3", np.float32(1)])
def test_whole_or_none_refuses_the_rest_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"epoch must be a whole number >= 0 or None; received"):
        whole_or_none(value, "epoch")


def test_check_buffer_policy():
    for policy in ("average", "copy"):
        check_buffer_policy(policy, "floating buffers")
    with pytest.raises(
        ValueError,
        match=r"buffers must be one of 'average', 'copy' \(floating buffers averaged, or "
        r"taken from the raw model\); received 'mean'",
    ):
        check_buffer_policy("mean", "floating buffers")


# ---------------------------------------------------------------- swapping, framework-free


class ListAverage(SwappableAverage):
    """The smallest average: the model is a list of floats, the average another list."""

    def __init__(self, weights: list[float], average: list[float]) -> None:
        self.weights, self.average = weights, average

    def _swap_model(self, action: str) -> list[float]:
        return self.weights

    def _put_average_in(self) -> list[float]:
        backup = list(self.weights)
        self.weights[:] = self.average
        return backup

    def _put_raw_back(self, backup: list[float]) -> None:
        self.weights[:] = backup


def test_the_shared_swap_refuses_swapping_twice_and_restores_on_error():
    average = ListAverage([1.0, 2.0], [0.5, 0.25])
    average.swap_in()
    assert average.is_swapped and average.weights == [0.5, 0.25]
    with pytest.raises(RuntimeError, match="already swapped in; call swap_out\\(\\) first"):
        average.swap_in()
    average.swap_out()
    assert not average.is_swapped and average.weights == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="not swapped in; swap_out\\(\\) follows swap_in"):
        average.swap_out()
    with pytest.raises(KeyError), average.swapped() as model:
        assert model == [0.5, 0.25]
        with average.swapped() as inner:  # nested: the outer block swaps back
            assert inner is model
        assert average.is_swapped
        raise KeyError("evaluation failed")
    assert not average.is_swapped and average.weights == [1.0, 2.0]
