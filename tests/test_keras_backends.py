"""polyak.keras across Keras' backends: the same numbers on each, the demo on each, the choice.

Keras fixes its backend once per process, so every test here runs its backends in
subprocesses; this file runs once (``make test`` reruns the other Keras test files under
each backend, see the Makefile). Snapshots are written once, here, and read on every
backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from polyak.keras import SnapshotCheckpoint  # noqa: E402

BACKENDS = ("torch", "jax", "tensorflow")
installed = {backend: importlib.util.find_spec(backend) is not None for backend in BACKENDS}
needs_backend = {
    backend: pytest.mark.skipif(
        not installed[backend],
        reason=f"{backend} is not installed (pip install polyak[keras-backends])",
    )
    for backend in BACKENDS
}
EVERY_BACKEND = [pytest.param(backend, marks=needs_backend[backend]) for backend in BACKENDS]

# Runs in a subprocess on one backend: load_averaged_model and the sweep (with BatchNorm
# recalibration) of the snapshots in DIRECTORY, their numbers written to OUT.npz.
EVALUATE = """
import sys
import numpy as np
from polyak.keras import load_averaged_model, sweep
import keras
directory, out = sys.argv[1], sys.argv[2]
with np.load(directory + "/data.npz") as data:
    train, test, validation = ((data["x" + s], data["y" + s]) for s in ("", "_test", "_val"))
model = load_averaged_model(directory + "/snapshots", "exp:2")
predictions = model.predict(test[0], batch_size=64, verbose=0)
result = sweep(
    directory + "/snapshots", test, validation, schemes="equal,exp:2", metric="loss",
    recalibrate=train,
)
scores = [
    [c.test, c.validation, c.recalibrated_test, c.recalibrated_validation]
    for c in [*result.single, *result.candidates]
]
np.savez(
    out,
    backend=np.array(keras.backend.backend()),
    predictions=keras.ops.convert_to_numpy(predictions),
    scores=np.array(scores, dtype=np.float64),
    best=np.array([result.best.scheme, str(result.best.n)]),
    **{f"weight/{i}": np.asarray(w) for i, w in enumerate(model.get_weights())},
)
"""


def environment(backend: str | None, home: Path | None = None) -> dict[str, str]:
    """This process's environment with ``KERAS_BACKEND=backend`` (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    if backend:
        env["KERAS_BACKEND"] = backend
    if home is not None:
        env["KERAS_HOME"] = str(home)
    return env


def run_on(backend: str | None, arguments: list[str], home: Path | None = None):
    """Run ``ARGUMENTS`` (python or the polyak script) with Keras on ``backend``."""
    env = environment(backend, home)
    return subprocess.run(arguments, env=env, capture_output=True, text=True, check=False)


def start_on(backend: str, arguments: list[str]) -> subprocess.Popen:
    """:func:`run_on`, started and not waited for."""
    return subprocess.Popen(
        arguments, env=environment(backend), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def blobs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.array([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    labels = rng.integers(0, 3, size=n)
    x = centers[labels] + rng.normal(scale=1.2, size=(n, 2))
    return x.astype(np.float32), np.eye(3, dtype=np.float32)[labels]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Four .keras snapshots of a Dense-BatchNorm-Dense model, written by SnapshotCheckpoint."""
    directory = tmp_path_factory.mktemp("backends")
    rng = np.random.default_rng(0)
    (x, y), (x_test, y_test), (x_val, y_val) = blobs(rng, 96), blobs(rng, 200), blobs(rng, 200)
    np.savez(directory / "data.npz", x=x, y=y, x_test=x_test, y_test=y_test, x_val=x_val,
             y_val=y_val)  # fmt: skip
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss="categorical_crossentropy")  # fmt: skip
    checkpoint = SnapshotCheckpoint(directory / "snapshots", keep=4, format="keras")
    model.fit(x, y, batch_size=32, epochs=6, callbacks=[checkpoint], verbose=0)
    assert len(checkpoint.saved) == 4
    return directory


@pytest.fixture(scope="module")
def evaluated(written) -> dict[str, dict[str, np.ndarray]]:
    """Each installed backend's numbers for the same snapshots."""
    # The backends side by side: each process is mostly start-up and compilation.
    running = {}
    for backend in BACKENDS:
        if installed[backend]:
            arguments = [sys.executable, "-c", EVALUATE, str(written), f"{written}/{backend}.npz"]
            running[backend] = start_on(backend, arguments)
    results = {}
    for backend, process in running.items():
        _, stderr = process.communicate()
        assert process.returncode == 0, f"{backend}: {stderr[-3000:]}"
        with np.load(written / f"{backend}.npz") as archive:
            results[backend] = {key: archive[key] for key in archive.files}
    return results


@pytest.mark.parametrize("backend", [p for p in EVERY_BACKEND if p.values[0] != "torch"])
def test_load_averaged_model_and_sweep_give_torchs_numbers(evaluated, backend):
    if "torch" not in evaluated:
        pytest.skip("torch is not installed: no reference backend")
    ours, torch = evaluated[backend], evaluated["torch"]
    assert str(ours["backend"]) == backend
    weights = sorted(key for key in torch if key.startswith("weight/"))
    assert weights and weights == sorted(key for key in ours if key.startswith("weight/"))
    for key in weights:  # averaged by polyak's numpy core: the same bits
        np.testing.assert_array_equal(ours[key], torch[key])
    # Forward passes differ only by float32 rounding (summation order).
    np.testing.assert_allclose(ours["predictions"], torch["predictions"], rtol=1e-5, atol=1e-6)
    # Every member and candidate: test and validation loss, before and after recalibration.
    assert ours["scores"].shape == torch["scores"].shape == (4 + 8, 4)
    assert np.isfinite(torch["scores"]).all()
    np.testing.assert_allclose(ours["scores"], torch["scores"], rtol=2e-5, atol=1e-6)
    assert ours["best"].tolist() == torch["best"].tolist()


@pytest.mark.parametrize("backend", [p for p in EVERY_BACKEND if p.values[0] != "torch"])
def test_polyak_demo_runs_to_the_end(tmp_path, backend):
    # torch: tests/test_cli_sweep.py runs the demo in-process.
    out = tmp_path / "demo"
    script = Path(sys.executable).with_name("polyak")
    arguments = [str(script), "demo", "--epochs", "10", "--out", str(out)]
    completed = run_on(backend, arguments)
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = " ".join(completed.stdout.split())
    assert f"(Keras, {backend} backend)" in text
    assert "Recommended (chosen on validation)" in text
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["selected_on"] == "validation" and len(report["members"]) == 10
    assert (out / "best.keras").is_file()


# ---------------------------------------------------------------- choosing the backend

# Prints, for each case of argv[1] (a JSON list of [KERAS_BACKEND, keras.json's backend or
# null, TensorFlow present]), the KERAS_BACKEND that polyak sets (null: Keras' own choice).
# One process for every case: choose_keras_backend decides without importing Keras.
DECIDE = """
import json, os, sys, tempfile
from polyak.keras_backend import choose_keras_backend
decided = []
for variable, configured, tensorflow in json.loads(sys.argv[1]):
    os.environ.pop("KERAS_BACKEND", None)
    if variable is not None:
        os.environ["KERAS_BACKEND"] = variable
    home = os.environ["KERAS_HOME"] = tempfile.mkdtemp()
    if configured is not None:
        with open(os.path.join(home, "keras.json"), "w") as file:
            json.dump({"backend": configured}, file)
    if tensorflow:
        sys.modules.pop("tensorflow", None)
    else:
        sys.modules["tensorflow"] = None  # not installed, as importlib sees it
    choose_keras_backend()
    decided.append(os.environ.get("KERAS_BACKEND"))
print(json.dumps(decided))
"""

# (KERAS_BACKEND, keras.json's backend or None, TensorFlow present) -> KERAS_BACKEND set
# by polyak (None: left to Keras, which reads keras.json, else uses TensorFlow).
CHOICES = [
    ((None, "tensorflow", False), "torch"),  # keras.json as Keras writes it, unasked
    ((None, None, False), "torch"),
    ((None, "numpy", False), None),
    ((None, "jax", False), None),
    ((None, None, True), None),  # Keras' default: TensorFlow
    ((None, "tensorflow", True), None),
    ((None, "jax", True), None),
    (("jax", "torch", True), "jax"),
    (("tensorflow", None, False), "tensorflow"),  # as asked; Keras then fails to import
]

# Imports Keras after polyak.keras chose, as a user's script would; prints the backend.
IMPORT = """
import sys
if sys.argv[1] == "absent":
    sys.modules["tensorflow"] = None
import polyak
assert "keras" not in sys.modules
import polyak.keras, keras
print(keras.backend.backend())
"""


def test_choose_keras_backend_sets_torch_only_when_nothing_usable_is_chosen(tmp_path):
    cases = json.dumps([case for case, _ in CHOICES])
    completed = run_on(None, [sys.executable, "-c", DECIDE, cases], home=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout) == [expected for _, expected in CHOICES]


@pytest.mark.parametrize(
    ("configured", "tensorflow", "expected"),
    [
        pytest.param("tensorflow", False, "torch", marks=needs_backend["torch"], id="absent"),
        pytest.param(None, True, "tensorflow", marks=needs_backend["tensorflow"], id="present"),
    ],
)
def test_keras_imported_after_polyak_keras_runs_on_the_chosen_backend(
    tmp_path, configured, tensorflow, expected
):
    if configured is not None:
        (tmp_path / "keras.json").write_text(json.dumps({"backend": configured}))
    state = "present" if tensorflow else "absent"
    completed = run_on(None, [sys.executable, "-c", IMPORT, state], home=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split()[-1] == expected
