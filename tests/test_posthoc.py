"""Power-function EMA and post-hoc reconstruction: formulas, the power scheme, real files."""

from __future__ import annotations

import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polyak
from polyak.errors import DiscoveryError, IncompatibleCheckpointsError, SchemeError
from polyak.posthoc import (
    MAX_SIGMA_REL,
    find_profile_snapshots,
    gamma_of,
    posthoc_coefficients,
    power_beta,
    power_snapshot_weights,
    profile_directory,
    profile_inner_product,
    reconstruct,
    reconstruct_to,
    sigma_rel_of,
)
from polyak.snapshots import SnapshotDirectory
from polyak.sweep import sweep

# ---------------------------------------------------------------- formulas


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_gamma_and_sigma_rel_are_inverse(sigma_rel):
    gamma = gamma_of(sigma_rel)
    assert gamma > 0
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-10)


def test_sigma_rel_of_is_the_profiles_relative_standard_deviation():
    # Numerically: the profile (g+1) tau^g on [0, 1], its standard deviation.
    gamma = 6.94
    tau = np.linspace(0, 1, 2_000_001)
    density = (gamma + 1) * tau**gamma
    mean = np.trapezoid(tau * density, tau)
    deviation = np.sqrt(np.trapezoid((tau - mean) ** 2 * density, tau))
    assert sigma_rel_of(gamma) == pytest.approx(deviation, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0, -0.1, MAX_SIGMA_REL, 0.5, float("nan"), "0.1"])
def test_widths_outside_the_power_family_are_refused(sigma_rel):
    with pytest.raises(SchemeError, match=r"sigma_rel must be a number in \(0, 0\.2887\)"):
        gamma_of(sigma_rel)


def test_inner_product_matches_numerical_integration_and_is_symmetric():
    t_a, g_a, t_b, g_b = 700.0, 3.0, 1000.0, 9.0
    tau = np.linspace(0, t_a, 2_000_001)
    p_a = (g_a + 1) * tau**g_a / t_a ** (g_a + 1)
    p_b = (g_b + 1) * tau**g_b / t_b ** (g_b + 1)
    numeric = np.trapezoid(p_a * p_b, tau)
    assert profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-6)
    assert profile_inner_product(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-12)


def test_power_beta_starts_from_the_weights_and_follows_its_formula():
    assert power_beta(5.0, 1.0) == 0.0
    assert power_beta(5.0, 10.0, 2.0) == pytest.approx(0.8**6)
    with pytest.raises(SchemeError, match="0 < delta <= t"):
        power_beta(5.0, 1.0, 2.0)


def test_coefficients_give_back_a_profile_that_was_saved():
    times = [100, 200, 300, 100, 200, 300]
    sigmas = [0.05, 0.05, 0.05, 0.1, 0.1, 0.1]
    coefficients = posthoc_coefficients(times, sigmas, 0.1, target_time=200)
    expected = np.zeros(6)
    expected[4] = 1.0
    np.testing.assert_allclose(coefficients, expected, atol=1e-8)


def test_coefficients_refuse_a_singular_system_and_bad_times():
    with pytest.raises(SchemeError, match="same profile at the same time"):
        posthoc_coefficients([100, 100], [0.05, 0.05], 0.08)
    with pytest.raises(SchemeError, match="times must be > 0"):
        posthoc_coefficients([0, 100], [0.05, 0.1], 0.08)
    with pytest.raises(SchemeError, match="one time per snapshot profile"):
        posthoc_coefficients([], [], 0.08)


# ---------------------------------------------------------------- a simulated run


def trajectory(steps: int, dimension: int = 6, seed: int = 0) -> np.ndarray:
    """Weights of a run that drifts and jitters, one row per step 1..steps."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(0, 4, steps)[:, None]
    return (np.cumsum(rng.normal(size=(steps, dimension)), axis=0) / 8 + drift).astype(np.float64)


def tracked_ema(weights: np.ndarray, sigma_rel: float, until: int | None = None) -> np.ndarray:
    """The power EMA updated at every step 1..until, as training would track it."""
    gamma = gamma_of(sigma_rel)
    average = None
    for t, theta in enumerate(weights[:until], start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        average = theta.copy() if average is None else beta * average + (1 - beta) * theta
    return average


def test_power_weights_over_every_step_are_the_tracked_ema_exactly():
    weights = trajectory(300)
    positions = np.arange(300, 0, -1)  # newest first
    scheme_weights = power_snapshot_weights(positions, 0.1)
    averaged = scheme_weights @ weights[::-1]
    np.testing.assert_allclose(averaged, tracked_ema(weights, 0.1), rtol=1e-10, atol=1e-12)


def test_power_weights_over_a_window_follow_the_profile():
    weights = power_snapshot_weights([1000, 990, 980, 970], 0.1)
    g = gamma_of(0.1) + 1
    masses = [1000**g - 990**g, 990**g - 980**g, 980**g - 970**g, 970**g - 960**g]
    np.testing.assert_allclose(weights, np.array(masses) / sum(masses), rtol=1e-10)
    assert power_snapshot_weights([5], 0.1).tolist() == [1.0]


@pytest.mark.parametrize(
    ("positions", "message"),
    [([10, 10], "strictly decreasing"), ([5, 8], "strictly decreasing"), ([3, 0], "step > 0")],
)
def test_power_weights_refuse_unordered_or_missing_steps(positions, message):
    with pytest.raises(SchemeError, match=message):
        power_snapshot_weights(positions, 0.1)


def test_power_scheme_averages_checkpoints_by_their_steps(tmp_path):
    weights = trajectory(50)
    for step in range(41, 51):
        save_file(
            {"w": weights[step - 1].astype(np.float32)}, str(tmp_path / f"m_{step}.safetensors")
        )
    result = polyak.average(tmp_path, scheme="power:0.2")["w"]
    expected = power_snapshot_weights(range(50, 40, -1), 0.2) @ weights[49:39:-1]
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_power_scheme_needs_steps_in_the_names(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SchemeError, match="power:0.1: weighs members by their steps"):
        polyak.average(tmp_path / "model.safetensors", scheme="power:0.1")


# ---------------------------------------------------------------- reconstruction from files


SAVED = (0.05, 0.10)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A run of 1200 steps tracking two profiles, saved every 40 steps like training would."""
    root = tmp_path_factory.mktemp("posthoc-run")
    weights = trajectory(1200, seed=1)
    averages = dict.fromkeys(SAVED)
    directories = {s: SnapshotDirectory(profile_directory(root, s), keep=1000) for s in SAVED}
    raw = SnapshotDirectory(root, keep=5)
    for t, theta in enumerate(weights, start=1):
        for sigma_rel in SAVED:
            beta = power_beta(gamma_of(sigma_rel), t)
            previous = averages[sigma_rel]
            averages[sigma_rel] = (
                theta if previous is None else beta * previous + (1 - beta) * theta
            )
        if t % 40 == 0:
            tensors = {"w": theta.astype(np.float64), "steps": np.array(t)}
            raw.commit(
                lambda path, tensors=tensors: save_file(tensors, str(path)),
                f"model_step{t:08d}.safetensors",
                step=t,
            )
            for sigma_rel in SAVED:
                tensors = {"w": averages[sigma_rel].astype(np.float64), "steps": np.array(t)}
                directories[sigma_rel].commit(
                    lambda path, tensors=tensors: save_file(tensors, str(path)),
                    f"ema_step{t:08d}.safetensors",
                    step=t,
                )
    return {"dir": root, "weights": weights}


@pytest.mark.parametrize("sigma_rel", [0.05, 0.07, 0.10, 0.15])
def test_reconstruction_matches_a_directly_tracked_ema(run, sigma_rel):
    tensors, result = reconstruct(run["dir"], sigma_rel)
    expected = tracked_ema(run["weights"], sigma_rel)
    # The two saved profiles differ by about 1 in these units; the reconstruction errs
    # by under a thousandth of that (millionths between them, more extrapolating past).
    spread = np.abs(tracked_ema(run["weights"], 0.05) - tracked_ema(run["weights"], 0.10)).max()
    assert spread > 0.1
    assert np.abs(tensors["w"] - expected).max() < 1e-3 * spread
    assert result.time == 1200 and len(result.snapshots) == 60
    assert result.coefficients.sum() == pytest.approx(1.0)
    assert tensors["steps"] == 1200  # integers from the newest snapshot


def test_reconstruction_at_an_earlier_time(run):
    tensors, result = reconstruct(run["dir"], 0.08, time=800)
    expected = tracked_ema(run["weights"], 0.08, until=800)
    spread = np.abs(tracked_ema(run["weights"], 0.05) - tracked_ema(run["weights"], 0.10)).max()
    assert np.abs(tensors["w"] - expected).max() < 1e-3 * spread
    assert result.time == 800


def test_reconstruct_to_writes_a_file_and_find_lists_the_snapshots(run, tmp_path):
    snapshots = find_profile_snapshots(run["dir"])
    assert sorted({s.sigma_rel for s in snapshots}) == list(SAVED)
    assert [s.step for s in snapshots if s.sigma_rel == 0.05] == list(range(40, 1201, 40))
    result = reconstruct_to(run["dir"], 0.08, tmp_path / "ema-0.08.safetensors")
    written = load_file(tmp_path / "ema-0.08.safetensors")
    tensors, _ = reconstruct(run["dir"], 0.08)
    np.testing.assert_array_equal(written["w"], tensors["w"])
    assert result.output == tmp_path / "ema-0.08.safetensors"


def test_a_directory_without_profiles_is_refused(tmp_path):
    with pytest.raises(DiscoveryError, match=r"holds no tracked EMA profiles.*posthoc=\(0\.05"):
        find_profile_snapshots(tmp_path)


def test_profile_directory_names_the_width(tmp_path):
    assert profile_directory(tmp_path, 0.05) == tmp_path / "posthoc" / "sigma-0.05"
    with pytest.raises(SchemeError):
        profile_directory(tmp_path, 0.4)


def test_engine_signed_weights_scale_to_one_and_refuse_a_zero_sum(tmp_path):
    from polyak.averaging import average_readers
    from polyak.formats.base import ArrayReader

    readers = [ArrayReader(f"m{i}", {"w": np.full(3, float(i + 1), np.float32)}) for i in range(3)]
    averaged = dict(
        (name, np.array(array))
        for name, array in average_readers(readers, [2, -0.5, -0.5], signed=True)
    )
    np.testing.assert_allclose(averaged["w"], (2 * 1 - 0.5 * 2 - 0.5 * 3) / 1.0)
    with pytest.raises(SchemeError, match="too close to zero"):
        average_readers(readers, [1, -1, 0], signed=True)
    with pytest.raises(SchemeError, match=">= 0"):
        average_readers(readers, [2, -0.5, -0.5])


# ---------------------------------------------------------------- polyak posthoc


def run_cli(arguments: list[str], capsys) -> tuple[int, str, str]:
    from polyak.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_cli_writes_one_file_per_width(run, tmp_path, capsys):
    out = tmp_path / "ema"
    code, stdout, err = run_cli(
        ["posthoc", str(run["dir"]), "--sigma-rel", "0.06,0.09", "-o", str(out)], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "posthoc-0.06.safetensors",
        "posthoc-0.09.safetensors",
    ]
    tensors, _ = reconstruct(run["dir"], 0.09)
    np.testing.assert_array_equal(load_file(out / "posthoc-0.09.safetensors")["w"], tensors["w"])
    assert "Post-hoc EMA from 60 snapshots of profiles 0.05, 0.1" in " ".join(stdout.split())


def test_cli_json_and_conversion(run, tmp_path, capsys):
    import json

    code, stdout, err = run_cli(
        ["posthoc", str(run["dir"]), "--sigma-rel", "0.08", "-o", str(tmp_path), "--suffix", "npz",
         "--time", "600", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    (report,) = json.loads(stdout)
    assert report["time"] == 600 and report["output"].endswith("posthoc-0.08.npz")
    assert sum(report["coefficients"]) == pytest.approx(1.0)
    assert (tmp_path / "posthoc-0.08.npz").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sigma-rel", "0.5"], r"sigma_rel must be a number in \(0, 0\.2887\)"),
        (["--sigma-rel", "wide"], r"widths \(sigma_rel\) are numbers"),
        # Two widths naming one file: refused before either is written.
        (["--sigma-rel", "0.08,0.080"], r"posthoc-0\.08\.safetensors: is also the output"),
        # Before: exit 0 with an extrapolation, or numpy warnings and "weights must be finite".
        *(
            (
                ["--sigma-rel", "0.08", "--time", time],
                rf"within the snapshots' steps, \d+ to \d+; received {shown}\.",
            )
            for time, shown in (
                ("1e9", "1e\\+09"),
                ("1", "1"),
                ("0", "0"),
                ("-5", "-5"),
                ("inf", "inf"),
                ("nan", "nan"),
            )
        ),
    ],
)
def test_cli_refusals_exit_2(run, tmp_path, capsys, arguments, message):
    code, _, err = run_cli(["posthoc", str(run["dir"]), "-o", str(tmp_path), *arguments], capsys)
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_cli_without_profiles_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["posthoc", str(tmp_path), "--sigma-rel", "0.1", "-o", "x"], capsys)
    assert code == 2 and "holds no tracked EMA profiles" in err


# ---------------------------------------------------------------- in the sweep


def test_sweep_evaluates_posthoc_candidates_beside_the_others(run):
    from polyak.report import classic_lines, sweep_table

    seen = {}

    def evaluate(tensors):
        score = -float(np.abs(tensors["w"] - tracked_ema(run["weights"], 0.08)).max())
        seen[score] = np.array(tensors["w"])
        return score

    result = sweep(run["dir"], evaluate, schemes="equal", posthoc=[0.06, 0.08])
    assert [m.step for m in result.members] == [1200, 1160, 1120, 1080, 1040]
    assert result.schemes == ["equal", "posthoc:0.06", "posthoc:0.08"]
    (candidate,) = result.candidates_of("posthoc:0.08")
    expected, details = reconstruct(run["dir"], 0.08)
    np.testing.assert_array_equal(seen[candidate.test], expected["w"])
    assert candidate.n == 60 and candidate.weights == tuple(details.coefficients.tolist())
    assert result.best == candidate  # the reconstruction is the closest to the target EMA
    lines = classic_lines(result, "posthoc:0.08")
    assert lines[0] == f"> post-hoc EMA from 60 EMA snapshots: ensemble={candidate.test:.3f}"
    # The selected scheme's lines end with the uncertainty (unknown: no outcomes here).
    assert [line[:20] for line in lines[1:]] == ["> selected − final: ", "> selected − best si"]
    assert sweep_table(result).row_count == 5 + 1  # five n, one post-hoc row


def test_sweep_refuses_profiles_of_another_model(run, tmp_path):
    save_file({"other": np.ones(2)}, str(tmp_path / "m_1.safetensors"))
    with pytest.raises(IncompatibleCheckpointsError, match="hold other tensors"):
        sweep(
            tmp_path, lambda t: 0.0, schemes="equal", posthoc=[0.08], posthoc_directory=run["dir"]
        )
