"""The sweep: candidates against numpy.average, one read per tensor, honest selection, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import polyak.sweep as sweep_module
from polyak.errors import OutputError, SchemeError
from polyak.posthoc import gamma_of
from polyak.sweep import Candidate, SingleResult, SweepResult, sweep, write_best

STEPS = list(range(490, 495))  # five members, 494 the newest
NEWEST_FIRST = STEPS[::-1]
N = len(STEPS)
FLOATING = ("dense/kernel", "dense/bias", "norm/scale")
INTEGERS = ("steps", "mask")
SCHEMES = ["equal", "linear", "exp:0.5", "exp:2", "power:0.2", "custom:3,2,1"]


def member_tensors(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "dense/kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense/bias": rng.normal(size=(3,)).astype(np.float16),
        "norm/scale": rng.normal(size=(2, 2)).astype(np.float64),
        "steps": np.array(step, dtype=np.int64),
        "mask": np.array([step % 2 == 0, step % 3 == 0]),
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    for step in STEPS:
        save_file(member_tensors(step), str(directory / f"ckpt_{step}.safetensors"))
    return directory


def formula_weights(scheme: str, n: int) -> np.ndarray:
    """Normalized weights of the n newest members, newest first, from the schemes' formulas."""
    i = np.arange(1, n + 1, dtype=np.float64)
    if scheme == "equal":
        raw = np.full(n, 1.0 / n)
    elif scheme == "linear":
        raw = (n - i + 1) / n
    elif scheme.startswith("exp:"):
        raw = np.exp(-i / float(scheme.partition(":")[2]))
    elif scheme.startswith("power:"):
        # The profile's mass over (p - d, p] at each step p, d the spacing (1 here).
        exponent = gamma_of(float(scheme.partition(":")[2])) + 1
        steps = np.array(NEWEST_FIRST[:n], dtype=np.float64)
        raw = steps**exponent - (steps - 1) ** exponent
    else:
        raw = np.array([float(v) for v in scheme.partition(":")[2].split(",")])
        assert len(raw) == n
    return raw / raw.sum()


def expected_pairs() -> list[tuple[str, int]]:
    """(scheme, n) of every candidate, in the order the sweep reports them."""
    return [
        (scheme, n)
        for n in range(1, N + 1)
        for scheme in SCHEMES
        if not scheme.startswith("custom") or n == 3
    ]


class Recorder:
    """An evaluator that keeps a copy of every call's tensors; call k scores k."""

    def __init__(self, scores=None) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.scores = scores

    def __call__(self, tensors):
        self.calls.append({name: np.array(value, copy=True) for name, value in tensors.items()})
        index = len(self.calls) - 1
        return float(index) if self.scores is None else self.scores(index)


def assert_float_close(actual: np.ndarray, expected: np.ndarray, scale: np.ndarray) -> None:
    """Equal to the float64 reference within the rounding to the tensor's own dtype.

    float16 and float32 results are the float64 sums rounded once: half an ulp, with a margin.
    float64 results are the sums themselves; the linear scheme's ``(n+1) S - T`` cancels, and
    power weights are differences of nearby powers, so they are allowed 2**-40 (about
    1e-12) of the members' magnitude ``scale``.
    """
    unit = {np.float16: 2.0**-11, np.float32: 2.0**-24, np.float64: 2.0**-53}[actual.dtype.type]
    tolerance = 2 * unit * np.abs(expected) + np.finfo(actual.dtype).smallest_subnormal
    if actual.dtype == np.float64:
        tolerance = tolerance + 2.0**-40 * scale
    assert np.all(np.abs(actual.astype(np.float64) - expected) <= tolerance), (actual, expected)


@pytest.fixture
def swept(run_dir):
    recorder = Recorder()
    result = sweep(run_dir, recorder, schemes=",".join(SCHEMES))
    return result, recorder


def test_candidates_are_reported_in_order_with_formula_weights(swept):
    result, _ = swept
    assert sorted((c.scheme, c.n) for c in result.candidates) == sorted(expected_pairs())
    assert result.schemes == SCHEMES
    for candidate in result.candidates:
        np.testing.assert_allclose(
            candidate.weights, formula_weights(candidate.scheme, candidate.n), rtol=1e-12
        )
        assert sum(candidate.weights) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("scheme", "n"), expected_pairs())
def test_candidate_equals_numpy_average_of_the_n_newest(swept, scheme, n):
    result, recorder = swept
    (candidate,) = [c for c in result.candidates if (c.scheme, c.n) == (scheme, n)]
    received = recorder.calls[int(candidate.test)]
    members = [member_tensors(step) for step in NEWEST_FIRST[:n]]
    weights = formula_weights(scheme, n)
    for name in FLOATING:
        expected = np.average(
            [m[name].astype(np.float64) for m in members], axis=0, weights=weights
        )
        assert received[name].dtype == members[0][name].dtype
        assert received[name].shape == members[0][name].shape
        scale = np.max([np.abs(m[name].astype(np.float64)) for m in members], axis=0)
        assert_float_close(received[name], expected, scale)
    newest = member_tensors(NEWEST_FIRST[0])
    for name in INTEGERS:
        assert received[name].dtype == newest[name].dtype
        np.testing.assert_array_equal(received[name], newest[name])


def test_singles_are_each_members_own_floating_tensors_newest_first(swept):
    result, recorder = swept
    assert [s.checkpoint.step for s in result.single] == NEWEST_FIRST
    assert [m.step for m in result.members] == NEWEST_FIRST
    for single, step in zip(result.single, NEWEST_FIRST, strict=True):
        received = recorder.calls[int(single.test)]
        own = member_tensors(step)
        for name in FLOATING:
            assert received[name].dtype == own[name].dtype
            np.testing.assert_array_equal(received[name], own[name])


def test_singles_carry_their_own_integer_tensors(swept):
    result, recorder = swept
    for single, step in zip(result.single, NEWEST_FIRST, strict=True):
        received = recorder.calls[int(single.test)]
        own = member_tensors(step)
        for name in INTEGERS:
            np.testing.assert_array_equal(received[name], own[name])


def test_candidates_are_in_scheme_order_then_n(swept):
    result, _ = swept
    by_scheme_then_n = sorted(expected_pairs(), key=lambda pair: (SCHEMES.index(pair[0]), pair[1]))
    assert [(c.scheme, c.n) for c in result.candidates] == by_scheme_then_n


def test_best_tensors_are_the_best_candidates(swept):
    result, recorder = swept
    received = recorder.calls[int(result.best.test)]
    assert set(result.best_tensors) == set(received)
    for name, array in received.items():
        np.testing.assert_array_equal(result.best_tensors[name], array)


class CountingReader:
    """Wraps a reader and counts reads per tensor name."""

    def __init__(self, reader) -> None:
        self._reader = reader
        self.path = reader.path
        self.format = reader.format
        self.reads: dict[str, int] = {}

    def names(self):
        return self._reader.names()

    def info(self, name):
        return self._reader.info(name)

    def read(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self._reader.read(name)

    def close(self):
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def test_each_checkpoint_is_read_once(run_dir, monkeypatch):
    opened: list[CountingReader] = []
    original = sweep_module.open_members

    def counting_open_members(members, key):
        readers = [CountingReader(reader) for reader in original(members, key)]
        opened.extend(readers)
        return readers

    monkeypatch.setattr(sweep_module, "open_members", counting_open_members)
    sweep(run_dir, Recorder(), schemes=",".join(SCHEMES))
    assert [reader.path.name for reader in opened] == [
        f"ckpt_{step}.safetensors" for step in NEWEST_FIRST
    ]
    # Every tensor of every member once: floating ones for the running sums, integer
    # ones for that member's own evaluation (candidates take the newest member's).
    for reader in opened:
        for name in FLOATING + INTEGERS:
            assert reader.reads.get(name) == 1, (reader.path.name, name, reader.reads)


def distinct_scores(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count).astype(np.float64)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_best_is_chosen_on_validation_and_reported_on_test(run_dir, higher_is_better):
    total = N + len(expected_pairs())
    # Opposite orders: the best on validation is the worst on test, whichever the direction.
    validation = distinct_scores(total, 1)
    test = total - 1 - validation
    recorder = Recorder(lambda k: {"test": test[k], "validation": validation[k]})
    result = sweep(run_dir, recorder, schemes=",".join(SCHEMES), higher_is_better=higher_is_better)
    assert result.selected_on == "validation"
    chooser = max if higher_is_better else min
    by_validation = chooser(result.candidates, key=lambda c: c.validation)
    by_test = chooser(result.candidates, key=lambda c: c.test)
    assert by_validation != by_test  # the construction makes the two choices disagree
    assert result.best == by_validation
    assert result.best.test == test[validation.tolist().index(by_validation.validation)]
    assert result.to_json()["selected_on"] == "validation"


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_with_a_float_the_best_is_chosen_on_test(run_dir, higher_is_better):
    total = N + len(expected_pairs())
    test = distinct_scores(total, 3)
    result = sweep(
        run_dir,
        Recorder(lambda k: test[k]),
        schemes=",".join(SCHEMES),
        higher_is_better=higher_is_better,
    )
    assert result.selected_on == "test"
    chooser = max if higher_is_better else min
    assert result.best == chooser(result.candidates, key=lambda c: c.test)
    assert result.best.validation is None


def test_loss_like_metric_picks_the_minimum(run_dir):
    result = sweep(
        run_dir,
        Recorder(lambda k: 100.0 - k),
        schemes="linear",
        metric="loss",
        higher_is_better=False,
    )
    assert result.best == min(result.candidates, key=lambda c: c.test)
    assert (result.best.scheme, result.best.n) == ("linear", N)
    assert result.metric == "loss" and result.higher_is_better is False


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_nan_scores_never_win(run_dir, higher_is_better):
    # The first candidate (equal, n=1) and every other call score NaN; the rest are finite.
    def scores(k: int) -> float:
        return float("nan") if k % 2 == 1 else float(k)

    result = sweep(
        run_dir, Recorder(scores), schemes="equal,linear", higher_is_better=higher_is_better
    )
    finite = [c for c in result.candidates if not np.isnan(c.test)]
    assert finite and len(finite) < len(result.candidates)
    assert np.isnan(result.candidates[0].test)
    chooser = max if higher_is_better else min
    assert result.best == chooser(finite, key=lambda c: c.test)


def test_nan_validation_never_wins(run_dir):
    def scores(k: int) -> dict[str, float]:
        return {"test": 0.5, "validation": float("nan") if k % 2 else float(k)}

    result = sweep(run_dir, Recorder(scores), schemes="equal,linear")
    assert np.isnan(result.candidates[0].validation)
    assert not np.isnan(result.best.validation)
    finite = [c for c in result.candidates if not np.isnan(c.validation)]
    assert result.best == max(finite, key=lambda c: c.validation)


def test_evaluator_without_test_score_is_refused(run_dir):
    with pytest.raises(SchemeError, match=r"it must return a float or a mapping with 'test'"):
        sweep(run_dir, lambda tensors: {"validation": 0.5}, schemes="equal")


def test_validation_for_some_candidates_only_is_refused(run_dir):
    calls = []

    def evaluate(tensors):
        calls.append(None)
        return 0.5 if len(calls) == 1 else {"test": 0.5, "validation": 0.4}

    with pytest.raises(
        SchemeError, match="validation or recalibrated scores for some candidates only"
    ):
        sweep(run_dir, evaluate, schemes="equal")


def test_custom_scheme_longer_than_the_members_is_refused(run_dir):
    with pytest.raises(SchemeError, match=r"custom:1,1,1,1,1,1: 6 weights but only 5 checkpoints"):
        sweep(run_dir, Recorder(), schemes="custom:1,1,1,1,1,1")


def test_last_limits_the_members(run_dir):
    recorder = Recorder()
    result = sweep(run_dir, recorder, schemes="equal", last=2)
    assert [m.step for m in result.members] == NEWEST_FIRST[:2]
    assert [c.n for c in result.candidates] == [1, 2]
    received = recorder.calls[int(result.candidates[-1].test)]
    expected = (
        member_tensors(494)["dense/kernel"].astype(np.float64)
        + member_tensors(493)["dense/kernel"].astype(np.float64)
    ) / 2
    assert_float_close(received["dense/kernel"], expected, np.abs(expected))


def test_to_json_schema(run_dir):
    result = sweep(
        run_dir,
        Recorder(lambda k: {"test": float(k), "validation": float(-k)}),
        schemes="equal,exp:2",
        metric="accuracy",
    )
    data = json.loads(json.dumps(result.to_json()))
    assert {"metric", "selected_on", "members", "single", "candidates", "best"} <= set(data)
    assert data["metric"] == "accuracy" and data["selected_on"] == "validation"
    assert [Path(m["path"]).name for m in data["members"]] == [
        f"ckpt_{step}.safetensors" for step in NEWEST_FIRST
    ]
    assert [m["step"] for m in data["members"]] == NEWEST_FIRST
    assert [Path(s["path"]).name for s in data["single"]] == [
        f"ckpt_{step}.safetensors" for step in NEWEST_FIRST
    ]
    assert [s["metric"] for s in data["single"]] == [s.test for s in result.single]
    assert all(isinstance(s["metric"], float) for s in data["single"])
    assert len(data["candidates"]) == 2 * N
    for row, candidate in zip(data["candidates"], result.candidates, strict=True):
        assert {"scheme", "n", "weights", "metric"} <= set(row)
        assert (row["scheme"], row["n"], row["metric"]) == (
            candidate.scheme,
            candidate.n,
            candidate.test,
        )
        assert row["validation"] == candidate.validation
        np.testing.assert_allclose(row["weights"], formula_weights(row["scheme"], row["n"]))
    assert {"scheme", "n", "metric"} <= set(data["best"])
    assert (data["best"]["scheme"], data["best"]["n"], data["best"]["metric"]) == (
        result.best.scheme,
        result.best.n,
        result.best.test,
    )


def test_to_json_without_validation_has_no_validation_keys(run_dir):
    data = sweep(run_dir, Recorder(), schemes="equal").to_json()
    assert data["selected_on"] == "test"
    assert all("validation" not in row for row in data["single"] + data["candidates"])
    assert "validation" not in data["best"]
    json.dumps(data)


def test_candidates_of_and_dataclasses():
    from polyak.discovery import order_key

    member = order_key(Path("ckpt_1.safetensors"))
    first = Candidate("equal", 1, (1.0,), 0.5)
    second = Candidate("linear", 1, (1.0,), 0.6)
    result = SweepResult(
        metric="accuracy",
        higher_is_better=True,
        selected_on="test",
        members=[member],
        single=[SingleResult(member, 0.5)],
        candidates=[first, second],
        best=second,
        schemes=["equal", "linear"],
    )
    assert result.candidates_of("linear") == [second]
    assert result.candidates_of("exp:2") == []


def test_write_best_writes_the_selected_candidate(run_dir, tmp_path):
    result = sweep(run_dir, Recorder(), schemes="equal,linear")
    (out,) = write_best(result, tmp_path / "best.safetensors")
    assert out == tmp_path / "best.safetensors"
    with safe_open(str(out), "np") as written:
        assert set(written.keys()) == set(result.best_tensors)
        for name, array in result.best_tensors.items():
            np.testing.assert_array_equal(written.get_tensor(name), array)


def test_write_best_converts_by_suffix(run_dir, tmp_path):
    result = sweep(run_dir, Recorder(), schemes="equal")
    (out,) = write_best(result, tmp_path / "best.npz")
    with np.load(out) as written:
        np.testing.assert_array_equal(written["dense/kernel"], result.best_tensors["dense/kernel"])


def test_write_best_refuses_an_existing_file_and_a_member(run_dir, tmp_path):
    result = sweep(run_dir, Recorder(), schemes="equal")
    existing = tmp_path / "best.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match=r"already exists.*overwrite=True"):
        write_best(result, existing)
    assert existing.read_bytes() == b"keep me"
    member = run_dir / f"ckpt_{NEWEST_FIRST[0]}.safetensors"
    before = member.read_bytes()
    with pytest.raises(OutputError, match="input"):
        write_best(result, member, overwrite=True)
    assert member.read_bytes() == before


# ---------------------------------------------------------------- greedy soup

# Members' "dense/kernel" values: near the target, except 492, far off (must be skipped).
GREEDY_TARGET = 1.0
GREEDY_VALUES = {490: 1.3, 491: 0.8, 492: 9.0, 493: 1.1, 494: 0.6}


@pytest.fixture
def soup_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "soup"
    directory.mkdir()
    for step, value in GREEDY_VALUES.items():
        tensors = member_tensors(step)
        tensors["dense/kernel"] = np.full((4, 3), value, dtype=np.float32)
        save_file(tensors, str(directory / f"ckpt_{step}.safetensors"))
    return directory


def closeness(kernel: np.ndarray) -> float:
    """Validation score: higher is better, best at the target."""
    return -float(np.mean((kernel.astype(np.float64) - GREEDY_TARGET) ** 2))


def reference_greedy_soup(values_newest_first: list[float]) -> list[int]:
    """Algorithm 1 of "Model soups", written from the paper, on scalar members."""
    scores = [closeness(np.array(v)) for v in values_newest_first]
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    soup = [order[0]]
    for k in order[1:]:
        with_k = closeness(np.mean([values_newest_first[j] for j in [*soup, k]]))
        without = closeness(np.mean([values_newest_first[j] for j in soup]))
        if with_k >= without:
            soup.append(k)
    return sorted(soup)


def test_greedy_soup_follows_its_definition_and_skips_a_member(soup_dir):
    def evaluate(tensors):
        score = closeness(tensors["dense/kernel"])
        return {"test": score, "validation": score}

    result = sweep(soup_dir, evaluate, schemes="equal,greedy")
    (soup,) = result.candidates_of("greedy")
    newest_first = [GREEDY_VALUES[step] for step in sorted(GREEDY_VALUES, reverse=True)]
    expected = reference_greedy_soup(newest_first)
    assert 2 in [i for i in range(5) if i not in expected]  # member 492 (index 2) is left out
    assert list(soup.members) == expected
    assert soup.n == len(expected)
    assert soup.weights == tuple(1 / len(expected) if i in expected else 0.0 for i in range(5))
    soup_mean = np.mean([newest_first[i] for i in expected])
    assert soup.validation == pytest.approx(closeness(np.array(soup_mean)), rel=1e-4)
    assert result.candidates[-1] == soup  # reported after the other schemes
    assert result.best == soup  # the soup beats every average that includes the outlier


def test_greedy_soup_tensors_are_the_uniform_average_of_the_kept_members(soup_dir):
    def evaluate(tensors):
        return {"test": 0.0, "validation": closeness(tensors["dense/kernel"])}

    result = sweep(soup_dir, evaluate, schemes="greedy")
    (soup,) = result.candidates
    steps = sorted(GREEDY_VALUES, reverse=True)
    kept = [member_tensors(steps[i]) for i in soup.members]
    for name in ("dense/bias", "norm/scale"):
        expected = np.mean([m[name].astype(np.float64) for m in kept], axis=0)
        np.testing.assert_allclose(
            result.best_tensors[name].astype(np.float64), expected, rtol=2e-3
        )
    # Integer tensors come from the newest member the soup kept.
    newest_kept = member_tensors(steps[min(soup.members)])
    for name in INTEGERS:
        np.testing.assert_array_equal(result.best_tensors[name], newest_kept[name])


def test_greedy_soup_without_validation_is_chosen_on_test(soup_dir):
    result = sweep(soup_dir, lambda tensors: closeness(tensors["dense/kernel"]), schemes="greedy")
    assert result.selected_on == "test"
    assert result.to_json()["best"]["members"] == list(result.best.members)


def test_greedy_soup_of_members_that_all_hurt_is_the_best_single(run_dir):
    # Any average is worse than the best member alone: the soup keeps one member.
    steps = NEWEST_FIRST

    def evaluate(tensors):
        distances = [
            float(np.abs(tensors["dense/kernel"] - member_tensors(s)["dense/kernel"]).max())
            for s in steps
        ]
        return -min(distances)  # 0 for any single member, negative for any mix

    result = sweep(run_dir, evaluate, schemes="greedy")
    (soup,) = result.candidates
    assert soup.n == 1 and soup.members == (0,)


def test_greedy_has_no_weights_outside_a_sweep():
    from polyak.schemes import parse_scheme

    with pytest.raises(SchemeError, match="greedy.*polyak sweep"):
        parse_scheme("greedy").weights(3)


# ---------------------------------------------------------------- recalibrated variants


class Recalibrating:
    """An evaluator that reports plain scores and 'recalibrated' ones, and can export them."""

    def __init__(self, plain, recalibrated) -> None:
        self.plain, self.recalibrated, self.calls = plain, recalibrated, 0
        self.exported = []

    def __call__(self, tensors):
        index, self.calls = self.calls, self.calls + 1
        return {
            "test": self.plain(index),
            "validation": self.plain(index),
            "recalibrated": {
                "test": self.recalibrated(index),
                "validation": self.recalibrated(index),
            },
        }

    def recalibrated_tensors(self, tensors):
        self.exported.append(dict(tensors))
        out = dict(tensors)
        out["norm/scale"] = np.full_like(tensors["norm/scale"], 7.0)
        return out


def test_both_variants_compete_and_the_recalibrated_best_is_exported(run_dir):
    # Call 3 (equal, n=2... whichever) gets the best recalibrated score of all.
    evaluator = Recalibrating(lambda i: 0.5, lambda i: 0.9 if i == 3 else 0.4)
    result = sweep(run_dir, evaluator, schemes="equal")
    assert result.best_recalibrated is True
    assert result.best_test == 0.9 and result.best.recalibrated_test == 0.9
    assert result.recalibrated
    assert len(evaluator.exported) == 1
    np.testing.assert_array_equal(result.best_tensors["norm/scale"], 7.0)
    data = result.to_json()
    assert data["best"]["recalibrated"] is True and data["best"]["metric"] == 0.9
    assert all("recalibrated" in c for c in data["candidates"] + data["single"])


def test_a_plain_best_is_written_without_recalibration(run_dir):
    evaluator = Recalibrating(lambda i: 0.9 if i == 3 else 0.5, lambda i: 0.4)
    result = sweep(run_dir, evaluator, schemes="equal")
    assert result.best_recalibrated is False
    assert evaluator.exported == []
    assert result.best_test == 0.9


def test_a_malformed_recalibrated_entry_is_refused(run_dir):
    with pytest.raises(SchemeError, match="'recalibrated' entry must be a mapping with 'test'"):
        sweep(run_dir, lambda tensors: {"test": 1.0, "recalibrated": 0.5}, schemes="equal")


def test_write_best_into_a_directory_writes_safetensors(run_dir, tmp_path):
    result = sweep(run_dir, Recorder(), schemes="equal")
    files = write_best(result, str(tmp_path / "best") + "/")
    assert [f.name for f in files] == ["model.safetensors"]
    with safe_open(str(files[0]), "np") as written:
        np.testing.assert_array_equal(
            written.get_tensor("dense/kernel"), result.best_tensors["dense/kernel"]
        )


def test_write_best_refuses_an_index_path_before_looking_at_the_disk(run_dir, tmp_path):
    result = sweep(run_dir, Recorder(), schemes="equal")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(OutputError, match="a shard index is not a checkpoint file"):
        write_best(result, index)


def test_write_best_to_a_directory_copies_the_newest_model_directory_files(tmp_path):
    for step in STEPS:
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        save_file(member_tensors(step), str(checkpoint / "model.safetensors"))
        (checkpoint / "config.json").write_text(f'{{"step": {step}}}')
        (checkpoint / "trainer_state.json").write_text("{}")
    result = sweep(tmp_path / "run", Recorder(), schemes="equal")
    files = write_best(result, tmp_path / "best/")
    assert sorted(path.name for path in files) == ["config.json", "model.safetensors"]
    newest = max(STEPS)
    assert (tmp_path / "best" / "config.json").read_text() == f'{{"step": {newest}}}'


# -- per-example outcomes and the uncertainty of the gain -----------------------------------


def kernel_outcomes(tensors) -> np.ndarray:
    """Twelve 'test examples': correct where the candidate's kernel entry is positive."""
    return np.asarray(tensors["dense/kernel"], dtype=np.float64).ravel() > 0


def outcome_evaluator(tensors):
    outcomes = kernel_outcomes(tensors)
    return {
        "test": float(np.mean(outcomes)),
        "validation": float(np.asarray(tensors["norm/scale"], dtype=np.float64).sum()),
        "outcomes": outcomes,
    }


def test_outcomes_of_selected_final_and_best_single_are_kept(run_dir):
    from polyak.significance import compare

    result = sweep(run_dir, outcome_evaluator, schemes="equal,linear,exp:2")
    np.testing.assert_array_equal(result.outcomes["selected"], kernel_outcomes(result.best_tensors))
    np.testing.assert_array_equal(
        result.outcomes["final"], kernel_outcomes(member_tensors(NEWEST_FIRST[0]))
    )
    validations = [float(member_tensors(step)["norm/scale"].sum()) for step in NEWEST_FIRST]
    best_single = int(np.argmax(validations))
    assert result.best_single == best_single
    np.testing.assert_array_equal(
        result.outcomes["best_single"], kernel_outcomes(member_tensors(NEWEST_FIRST[best_single]))
    )
    comparisons = result.comparisons()
    expected = compare(
        result.outcomes["selected"],
        result.outcomes["final"],
        higher_is_better=True,
        against="the final model",
    )
    assert comparisons["final"] == expected
    assert comparisons["best_single"].against.startswith("the best single member (ckpt_")
    data = result.to_json()
    assert data["uncertainty"]["selected_minus_final"] == expected.to_json()
    assert data["best_single"]["index"] == best_single
    json.dumps(data)  # JSON-ready: no numpy arrays


def test_greedy_soup_keeps_the_outcomes_of_its_members(run_dir):
    result = sweep(run_dir, outcome_evaluator, schemes="greedy")
    assert result.best.scheme == "greedy"
    np.testing.assert_array_equal(result.outcomes["selected"], kernel_outcomes(result.best_tensors))


def test_without_outcomes_the_uncertainty_is_unknown(run_dir):
    result = sweep(run_dir, Recorder(), schemes="equal")
    comparisons = result.comparisons()
    assert comparisons["final"].difference == result.best_test - result.single[0].test
    for comparison in comparisons.values():
        assert comparison.low is None and comparison.p_value is None
        assert "unknown" in comparison.sentence
    assert result.to_json()["uncertainty"]["selected_minus_final"]["interval"] is None


def test_outcomes_for_some_candidates_only_are_refused(run_dir):
    calls = []

    def evaluate(tensors):
        calls.append(None)
        value = {"test": 0.5}
        if len(calls) == 1:
            value["outcomes"] = np.ones(3, dtype=bool)
        return value

    with pytest.raises(SchemeError, match="per-example outcomes for some only"):
        sweep(run_dir, evaluate, schemes="equal")


@pytest.mark.parametrize(
    ("outcomes", "message"),
    [
        (lambda call: np.ones(3 + call), "outcomes of 4 test examples for one candidate and 3"),
        (lambda call: np.ones((2, 2)), "must be a 1-D array"),
    ],
)
def test_bad_outcomes_are_refused(run_dir, outcomes, message):
    calls = []

    def evaluate(tensors):
        calls.append(None)
        return {"test": 0.5, "outcomes": outcomes(len(calls) - 1)}

    with pytest.raises(SchemeError, match=message):
        sweep(run_dir, evaluate, schemes="equal")
