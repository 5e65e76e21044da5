"""Issue acceptance: `polyak average` on ten Keras `model.save('model_49x.h5')` files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")


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
def snapshots(tmp_path_factory) -> tuple[Path, list[list[np.ndarray]]]:
    """Ten legacy full-model .h5 files saved by Keras, and each one's get_weights()."""
    directory = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    y = np.eye(3)[rng.integers(0, 3, 64)]
    keras.utils.set_random_seed(0)
    model = classic_model()
    weights = []
    for epoch in range(490, 500):
        model.fit(x, y, epochs=1, verbose=0)
        model.save(directory / f"model_{epoch}.h5")
        weights.append(model.get_weights())
    return directory, weights


@pytest.mark.parametrize("scheme", ["equal", "linear", "exp:2"])
def test_average_of_keras_h5_loads_and_equals_numpy_average(snapshots, tmp_path, scheme):
    directory, weights = snapshots
    out = tmp_path / f"averaged_{scheme.replace(':', '')}.h5"
    completed = subprocess.run(
        [sys.executable, "-m", "polyak", "average", str(directory), "-s", scheme, "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    loaded = keras.models.load_model(out)
    newest_first = weights[::-1]
    n = len(newest_first)
    i = np.arange(1, n + 1)
    raw = {"equal": np.ones(n), "linear": (n - i + 1) / n, "exp:2": np.exp(-i / 2.0)}[scheme]
    for index, averaged in enumerate(loaded.get_weights()):
        expected = np.average([member[index] for member in newest_first], axis=0, weights=raw)
        np.testing.assert_allclose(averaged, expected, rtol=2e-6, atol=1e-7)
    assert loaded.optimizer is not None  # the container's training config survived


def test_keras_container_of_another_kind_is_refused(snapshots, tmp_path):
    directory, _ = snapshots
    out = tmp_path / "averaged.keras"
    # .keras output from .h5 inputs is a different container: refused with advice.
    completed = subprocess.run(
        [sys.executable, "-m", "polyak", "average", str(directory), "-o", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert "a keras file can only be written from keras inputs" in completed.stderr
    assert "the inputs are keras-h5" in completed.stderr
    assert not out.exists()
