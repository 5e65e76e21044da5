"""`polyak sweep` and `polyak demo`: outputs, honest selection, one-line errors, exit codes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
datasets = pytest.importorskip("sklearn.datasets")

from polyak.cli.main import main  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPOCHS = range(490, 500)


def run(arguments: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def run_captured(arguments: list[str]) -> dict:
    """`run` for module-scoped fixtures, where capsys (function-scoped) is not available."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
        pytest.raises(SystemExit) as exited,
    ):
        main(arguments)
    return {"code": exited.value.code, "out": stdout.getvalue(), "err": stderr.getvalue()}


def classic_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> dict:
    """Ten model.save("model_e.h5") snapshots, test.npz and val.npz, and members' weights."""
    root = tmp_path_factory.mktemp("experiment")
    x, y, centers = datasets.make_blobs(
        n_samples=1100, centers=3, n_features=2, cluster_std=2, random_state=2, return_centers=True
    )
    x_val, y_val = datasets.make_blobs(
        n_samples=500, centers=centers, n_features=2, cluster_std=2, random_state=5
    )
    one_hot = np.eye(3, dtype=np.float32)
    x = x.astype(np.float32)
    np.savez(root / "test.npz", x=x[100:], y=one_hot[y[100:]])
    np.savez(root / "val.npz", x=x_val.astype(np.float32), y=one_hot[y_val])
    snapshots = root / "snapshots"
    snapshots.mkdir()
    keras.utils.set_random_seed(0)
    model = classic_model()
    weights = []
    for epoch in EPOCHS:
        model.fit(x[:100], one_hot[y[:100]], epochs=1, verbose=0)
        model.save(snapshots / f"model_{epoch}.h5")
        weights.append(model.get_weights())
    return {
        "snapshots": snapshots,
        "test": root / "test.npz",
        "val": root / "val.npz",
        "weights": weights[::-1],  # newest first
    }


def formula_weights(scheme: str, n: int) -> np.ndarray:
    i = np.arange(1, n + 1, dtype=np.float64)
    if scheme == "equal":
        return np.ones(n)
    if scheme == "linear":
        return (n - i + 1) / n
    return np.exp(-i / float(scheme.partition(":")[2]))


def check_report_schema(report: dict, schemes: list[str], members: int) -> None:
    assert {"metric", "selected_on", "members", "single", "candidates", "best"} <= set(report)
    assert report["metric"] == "accuracy"
    assert len(report["members"]) == members
    assert all({"path", "step"} <= set(m) for m in report["members"])
    steps = [m["step"] for m in report["members"]]
    assert steps == sorted(steps, reverse=True)  # newest first
    assert [Path(s["path"]).name for s in report["single"]] == [
        Path(m["path"]).name for m in report["members"]
    ]
    assert all(isinstance(s["metric"], float) for s in report["single"])
    assert sorted((c["scheme"], c["n"]) for c in report["candidates"]) == sorted(
        (scheme, n) for scheme in schemes for n in range(1, members + 1)
    )
    for candidate in report["candidates"]:
        assert {"scheme", "n", "weights", "metric"} <= set(candidate)
        raw = formula_weights(candidate["scheme"], candidate["n"])
        np.testing.assert_allclose(candidate["weights"], raw / raw.sum(), rtol=1e-12)
    assert {"scheme", "n", "metric"} <= set(report["best"])


@pytest.fixture(scope="module")
def full_run(experiment, tmp_path_factory):
    """One `polyak sweep` with every output; run once, checked by several tests."""
    out = tmp_path_factory.mktemp("outputs")
    arguments = [
        "sweep",
        str(experiment["snapshots"]),
        "--data",
        str(experiment["test"]),
        "--val",
        str(experiment["val"]),
        "--schemes",
        "equal,linear,exp:2",
        "--json",
        str(out / "r.json"),
        "--plot",
        str(out / "p.png"),
        "--out-model",
        str(out / "best.h5"),
    ]
    return {**run_captured(arguments), "dir": out}


def test_sweep_exits_0_and_prints_the_classic_lines(full_run):
    assert full_run["code"] == 0, full_run["err"]
    lines = full_run["out"].splitlines()
    assert sum(line.startswith("> 1: single=") for line in lines) == 3
    assert sum(line.startswith("> 10: single=") for line in lines) == 3
    for scheme in ("equal", "linear", "exp:2"):
        assert f"{scheme} (test accuracy)" in full_run["out"]
    assert "selected on validation" in " ".join(full_run["out"].split())
    assert "chosen on the test data itself" not in full_run["out"]
    # The CLI's own --data evaluation keeps per-example outcomes: a McNemar p-value.
    flat = " ".join(full_run["out"].split())  # rich wraps long lines
    found = re.findall(
        r"> selected − final: [+-]\d\.\d{4} \(95% interval [+-]\d\.\d{4} to [+-]\d\.\d{4}, "
        r"McNemar p = [\d.e+-]+, 1000 test examples\): the [a-z ]+ the final model is "
        r"(within|larger than) noise",
        flat,
    )
    assert len(found) == 1


def experiment_test_labels(experiment) -> np.ndarray:
    with np.load(experiment["test"]) as data:
        return data["y"]


def test_sweep_writes_a_valid_json_report(full_run, experiment):
    report = json.loads((full_run["dir"] / "r.json").read_text(encoding="utf-8"))
    check_report_schema(report, ["equal", "linear", "exp:2"], len(EPOCHS))
    assert report["selected_on"] == "validation"
    assert all("validation" in c for c in report["candidates"])
    best = max(report["candidates"], key=lambda c: c["validation"])
    assert (report["best"]["scheme"], report["best"]["n"]) == (best["scheme"], best["n"])
    assert [Path(m["path"]).name for m in report["members"]] == [
        f"model_{e}.h5" for e in reversed(EPOCHS)
    ]
    final = report["uncertainty"]["selected_minus_final"]
    assert len(final["interval"]) == 2 and 0 <= final["p_value"] <= 1
    assert final["examples"] == len(experiment_test_labels(experiment))
    assert final["sentence"].startswith("the ")


def test_sweep_writes_a_real_png(full_run):
    from matplotlib import image

    path = full_run["dir"] / "p.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert image.imread(path).size > 0


def test_sweep_best_model_loads_and_holds_the_best_average(full_run, experiment):
    report = json.loads((full_run["dir"] / "r.json").read_text(encoding="utf-8"))
    best = report["best"]
    raw = formula_weights(best["scheme"], best["n"])
    members = experiment["weights"][: best["n"]]
    loaded = keras.models.load_model(full_run["dir"] / "best.h5")
    got = loaded.get_weights()
    assert len(got) == len(members[0])
    for k, array in enumerate(got):
        expected = np.average([m[k] for m in members], axis=0, weights=raw)
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, expected, rtol=2e-7, atol=1e-7)


def test_sweep_without_validation_says_the_choice_was_made_on_test(experiment, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    code, out, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            "--schemes",
            "linear",
            "--last",
            "4",
            "--json",
            str(report_path),
        ],
        capsys,
    )
    assert code == 0, err
    assert "chosen on the test data itself" in " ".join(out.split())
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["selected_on"] == "test"
    check_report_schema(report, ["linear"], 4)
    assert report["best"]["metric"] == max(c["metric"] for c in report["candidates"])


def test_sweep_print_json(experiment, capsys):
    code, out, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            "--schemes",
            "equal",
            "-n",
            "2",
            "--print-json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    check_report_schema(report, ["equal"], 2)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.startswith("polyak: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_data_file_exits_2(experiment, tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    code, _, err = run(["sweep", str(experiment["snapshots"]), "--data", str(missing)], capsys)
    assert_one_line_error(code, err, f"data {missing}")


def test_data_without_y_exits_2(experiment, tmp_path, capsys):
    path = tmp_path / "x_only.npz"
    np.savez(path, x=np.ones((3, 2), np.float32))
    code, _, err = run(["sweep", str(experiment["snapshots"]), "--data", str(path)], capsys)
    assert_one_line_error(code, err, f"data {path}", "needs arrays 'x' and 'y'", "['x']")


def test_weights_only_snapshots_without_model_exit_2(experiment, tmp_path, capsys):
    model = classic_model()
    for epoch in (1, 2, 3):
        model.save_weights(tmp_path / f"model_{epoch}.weights.h5")
    code, _, err = run(["sweep", str(tmp_path), "--data", str(experiment["test"])], capsys)
    assert_one_line_error(code, err, "holds weights only", "--model")


def test_existing_json_without_overwrite_exits_2_and_keeps_the_file(experiment, tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text("keep me", encoding="utf-8")
    code, _, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            "--json",
            str(report),
        ],
        capsys,
    )
    assert_one_line_error(code, err, f"output {report}: already exists", "--overwrite")
    assert report.read_text(encoding="utf-8") == "keep me"


# ---------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "polyak-demo"
    return {**run_captured(["demo", "--epochs", "30", "--out", str(out)]), "dir": out}


def test_demo_exits_0_and_prints_ten_classic_lines_per_scheme(demo_run):
    assert demo_run["code"] == 0, demo_run["err"]
    lines = demo_run["out"].splitlines()
    classic = [line for line in lines if line.startswith("> ")]
    # Ten per scheme, and the selected scheme's two uncertainty lines, once.
    assert len(classic) == 32
    assert sum(line.startswith("> selected − final: ") for line in lines) == 1
    assert sum(line.startswith("> selected − best single: ") for line in lines) == 1
    for scheme in ("equal", "linear", "exp:2"):
        start = lines.index(
            next(line for line in lines if line.startswith(f"{scheme}: test accuracy"))
        )
        block = lines[start + 1 : start + 11]
        assert [line.split(":")[0] for line in block] == [f"> {n}" for n in range(1, 11)]
        assert all(", ensemble=" in line for line in block)
    assert "Recommended (chosen on validation)" in " ".join(demo_run["out"].split())


def test_demo_writes_report_plot_model_and_snapshots(demo_run):
    directory = demo_run["dir"]
    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    check_report_schema(report, ["equal", "linear", "exp:2"], 10)
    assert report["selected_on"] == "validation"
    assert (directory / "sweep.png").read_bytes().startswith(PNG_SIGNATURE)
    model = keras.models.load_model(directory / "best.keras")
    assert [w.shape for w in model.get_weights()] == [(2, 25), (25,), (25, 3), (3,)]
    snapshots = sorted((directory / "snapshots").glob("*.keras"))
    assert len(snapshots) == 10
    # best.keras holds the selected average of the newest snapshots.
    best = report["best"]
    newest_first = [keras.models.load_model(p).get_weights() for p in snapshots[::-1]]
    raw = formula_weights(best["scheme"], best["n"])
    for k, array in enumerate(model.get_weights()):
        expected = np.average([m[k] for m in newest_first[: best["n"]]], axis=0, weights=raw)
        np.testing.assert_allclose(array, expected, rtol=2e-7, atol=1e-7)


def test_demo_with_too_few_epochs_exits_2(tmp_path, capsys):
    code, _, err = run(["demo", "--epochs", "5", "--out", str(tmp_path / "demo")], capsys)
    assert_one_line_error(code, err, "--epochs must be at least 10", "got 5")
    assert not (tmp_path / "demo").exists()


def test_demo_runs_as_a_console_script_without_keras_backend_set(tmp_path):
    # The way `make demo` runs it on a fresh machine: no KERAS_BACKEND, and a keras.json
    # naming TensorFlow (Keras writes one on first import) when TensorFlow is absent.
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "tensorflow"}))
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(home)
    out = tmp_path / "demo"
    script = Path(sys.executable).with_name("polyak")
    completed = subprocess.run(
        [str(script), "demo", "--epochs", "12", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Recommended (chosen on validation)" in " ".join(completed.stdout.split())
    assert (out / "report.json").is_file()


@pytest.mark.parametrize("option", ["--json", "--plot", "--out-model"])
def test_an_output_naming_a_member_exits_2_even_with_overwrite(
    experiment, tmp_path, capsys, option
):
    member = sorted(experiment["snapshots"].iterdir())[0]
    before = member.read_bytes()
    code, _, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            option,
            str(member),
            "--overwrite",
        ],
        capsys,
    )
    assert_one_line_error(code, err, f"output {member}: is the input", "another output path")
    assert member.read_bytes() == before


def test_an_output_naming_the_data_file_exits_2(experiment, capsys):
    before = experiment["test"].read_bytes()
    code, _, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            "--json",
            str(experiment["test"]),
            "--overwrite",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "is the input", str(experiment["test"]))
    assert experiment["test"].read_bytes() == before


def test_two_outputs_on_one_path_exit_2(experiment, tmp_path, capsys):
    same = tmp_path / "same.out"
    code, _, err = run(
        [
            "sweep",
            str(experiment["snapshots"]),
            "--data",
            str(experiment["test"]),
            "--json",
            str(same),
            "--plot",
            str(same),
        ],
        capsys,
    )
    assert_one_line_error(code, err, f"output {same}: is also the output", "its own path")
    assert not same.exists()


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_labels_the_keras_model_cannot_output_exit_2(experiment, tmp_path, capsys, metric):
    """Before: every candidate scored 0.0 accuracy silently."""
    with np.load(experiment["test"]) as test:
        x, y = test["x"], test["y"]
    np.savez(tmp_path / "other.npz", x=x, y=y.argmax(-1) + 3)  # classes 3..5 of a 3-class model
    code, _, err = run(
        ["sweep", str(experiment["snapshots"]), "--data", str(tmp_path / "other.npz"),
         "--metric", metric],
        capsys,
    )  # fmt: skip
    assert_one_line_error(code, err, "y holds labels 3 to 5", "3 classes (0 to 2)")
