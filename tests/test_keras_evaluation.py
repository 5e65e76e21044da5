"""Evaluating Keras checkpoints: data files, metrics, and the sweep on one reused model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
datasets = pytest.importorskip("sklearn.datasets")

from polyak.errors import DataError  # noqa: E402
from polyak.keras import evaluation  # noqa: E402
from polyak.keras.evaluation import (  # noqa: E402
    Dataset,
    accuracy,
    load_dataset,
    resolve_metric,
    sweep,
)

EPOCHS = range(490, 500)
SCHEMES = ["equal", "linear", "exp:0.5", "exp:2", "custom:3,2,1"]


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


def classic_blobs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SEED.md's data: the first 100 points train, the other 1000 test; validation alike."""
    x, y, centers = datasets.make_blobs(
        n_samples=1100, centers=3, n_features=2, cluster_std=2, random_state=2, return_centers=True
    )
    x_val, y_val = datasets.make_blobs(
        n_samples=500, centers=centers, n_features=2, cluster_std=2, random_state=5
    )
    one_hot = np.eye(3, dtype=np.float32)
    return {
        "train": (x[:100].astype(np.float32), one_hot[y[:100]]),
        "test": (x[100:].astype(np.float32), one_hot[y[100:]]),
        "validation": (x_val.astype(np.float32), one_hot[y_val]),
    }


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return classic_blobs()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory, data) -> tuple[Path, list[list[np.ndarray]]]:
    """Ten legacy .h5 files from model.save(f"model_{e}.h5"), one epoch apart, and their weights.

    Returns the directory and each member's get_weights(), newest first.
    """
    directory = tmp_path_factory.mktemp("snapshots")
    keras.utils.set_random_seed(0)
    model = classic_model()
    x, y = data["train"]
    weights = []
    for epoch in EPOCHS:
        model.fit(x, y, epochs=1, verbose=0)
        model.save(directory / f"model_{epoch}.h5")
        weights.append(model.get_weights())
    return directory, weights[::-1]


@pytest.fixture(scope="module")
def reference():
    """A clone of the architecture that evaluates given weights, independently of the sweep."""
    clone = keras.models.clone_model(classic_model())

    def predict(member_weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        clone.set_weights(member_weights)
        return np.asarray(keras.ops.convert_to_numpy(clone(x, training=False)))

    return predict


def formula_weights(scheme: str, n: int) -> np.ndarray:
    i = np.arange(1, n + 1, dtype=np.float64)
    if scheme == "equal":
        return np.ones(n)
    if scheme == "linear":
        return (n - i + 1) / n
    if scheme.startswith("exp:"):
        return np.exp(-i / float(scheme[4:]))
    return np.array([float(v) for v in scheme[len("custom:") :].split(",")])


def numpy_average(members: list[list[np.ndarray]], raw: np.ndarray) -> list[np.ndarray]:
    return [
        np.average([member[k] for member in members], axis=0, weights=raw)
        for k in range(len(members[0]))
    ]


def reference_accuracy(predictions: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(predictions.argmax(-1) == y.argmax(-1)))


def reference_cross_entropy(predictions: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.sum(y * np.log(predictions.astype(np.float64)), axis=-1)))


# ---------------------------------------------------------------- load_dataset


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_dataset_reads_x_and_y(tmp_path):
    path = save_npz(tmp_path / "test.npz", x=np.ones((4, 2)), y=np.arange(4))
    dataset = load_dataset(path)
    assert dataset.name == "test.npz"
    np.testing.assert_array_equal(dataset.x, np.ones((4, 2)))
    np.testing.assert_array_equal(dataset.y, np.arange(4))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x": np.ones((3, 2)), "z": np.ones(3)},
            r"needs arrays 'x' and 'y'; it holds \['x', 'z'\]",
        ),
        ({"inputs": np.ones((3, 2))}, r"needs arrays 'x' and 'y'; it holds \['inputs'\]"),
        ({"x": np.ones((3, 2)), "y": np.ones(2)}, "x has 3 rows but y has 2"),
        ({"x": np.ones((0, 2)), "y": np.ones(0)}, "holds no examples"),
    ],
)
def test_load_dataset_refuses_bad_arrays_naming_the_file(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=rf"^data {path}: {message}"):
        load_dataset(path)


def test_load_dataset_refuses_a_file_that_is_not_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("not a zip archive at all", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^data {path}: cannot be read as .npz"):
        load_dataset(path)


def test_load_dataset_refuses_a_missing_file(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(DataError, match=rf"^data {path}: cannot be read as .npz"):
        load_dataset(path)


def test_load_dataset_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^data {path}"):
        load_dataset(path)


def test_load_dataset_refuses_a_single_npy_array(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((3, 2)))
    with pytest.raises(DataError, match=rf"^data {path}"):
        load_dataset(path)


# ---------------------------------------------------------------- metrics


def test_accuracy_with_one_hot_targets():
    y_true = np.eye(3)[[0, 1, 2, 1]]
    y_pred = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    assert accuracy(y_true, y_pred) == 0.75


def test_accuracy_with_class_indices():
    y_pred = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    assert accuracy(np.array([0, 1, 2, 1]), y_pred) == 0.75
    assert accuracy(np.array([[0], [1], [2], [0]]), y_pred) == 0.5


def test_accuracy_with_a_single_sigmoid_output():
    y_pred = np.array([[0.9], [0.2], [0.6], [0.4], [0.51]])
    assert accuracy(np.array([1, 0, 0, 0, 1]), y_pred) == 0.8
    assert accuracy(np.array([[1], [0], [0], [0], [1]]), y_pred.reshape(-1)) == 0.8


def test_resolve_metric_names_and_directions():
    assert resolve_metric("accuracy") == ("accuracy", accuracy, True)
    assert resolve_metric("loss") == ("loss", None, False)

    def f1(y_true, y_pred):
        return 0.0

    assert resolve_metric(f1) == ("f1", f1, True)


def test_user_metric_from_module_function(tmp_path, monkeypatch):
    (tmp_path / "polyak_test_user_metrics.py").write_text(
        "import numpy as np\n\n\n"
        "def share_of_class_zero(y_true, y_pred):\n"
        "    return float(np.mean(y_pred.argmax(-1) == 0))\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    name, function, higher = resolve_metric("polyak_test_user_metrics:share_of_class_zero")
    assert (name, higher) == ("share_of_class_zero", True)
    assert function(None, np.eye(3)[[0, 0, 1, 2]]) == 0.5
    with pytest.raises(DataError, match="polyak_test_user_metrics has no function missing"):
        resolve_metric("polyak_test_user_metrics:missing")


@pytest.mark.parametrize("spec", ["f1", "no_module_polyak_xyz:f"])
def test_unknown_metrics_are_refused(spec):
    with pytest.raises(DataError, match=f"metric '?{spec}'?:"):
        resolve_metric(spec)


# ---------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def swept(snapshots, data):
    directory, _ = snapshots
    return sweep(directory, data["test"], data["validation"], schemes=",".join(SCHEMES))


def all_pairs() -> list[tuple[str, int]]:
    return [
        (scheme, n)
        for scheme in SCHEMES
        for n in range(1, len(EPOCHS) + 1)
        if not scheme.startswith("custom") or n == 3
    ]


def test_sweep_reports_every_candidate(swept):
    assert sorted((c.scheme, c.n) for c in swept.candidates) == sorted(all_pairs())
    assert [m.path.name for m in swept.members] == [f"model_{e}.h5" for e in reversed(EPOCHS)]
    assert swept.metric == "accuracy" and swept.higher_is_better is True
    assert swept.selected_on == "validation"


def test_sweep_accuracy_equals_numpy_average_in_a_clone_for_every_candidate(
    swept, snapshots, data, reference
):
    _, weights = snapshots
    (x, y), (x_val, y_val) = data["test"], data["validation"]
    for candidate in swept.candidates:
        raw = formula_weights(candidate.scheme, candidate.n)
        np.testing.assert_allclose(candidate.weights, raw / raw.sum(), rtol=1e-12)
        averaged = numpy_average(weights[: candidate.n], raw)
        expected_test = reference_accuracy(reference(averaged, x), y)
        expected_validation = reference_accuracy(reference(averaged, x_val), y_val)
        assert (candidate.test, candidate.validation) == (expected_test, expected_validation), (
            candidate
        )


def test_sweep_singles_are_each_members_accuracy(swept, snapshots, data, reference):
    _, weights = snapshots
    x, y = data["test"]
    assert [reference_accuracy(reference(w, x), y) for w in weights] == [
        s.test for s in swept.single
    ]


def test_sweep_selects_on_validation(swept):
    # Ties go to the fewest members, then to the scheme listed first.
    best = max(swept.candidates, key=lambda c: (c.validation, -c.n, -swept.schemes.index(c.scheme)))
    assert swept.best == best


def test_sweep_neither_clones_nor_compiles_per_candidate(snapshots, data, monkeypatch):
    directory, _ = snapshots
    model = keras.models.load_model(directory / "model_499.h5", compile=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the sweep must reuse one model: no clone, no compile")

    monkeypatch.setattr(keras.models, "clone_model", forbidden)
    monkeypatch.setattr(keras.Model, "compile", forbidden)
    calls = []
    original_call = evaluation.KerasEvaluator.__call__

    def counting_call(self, tensors):
        calls.append(self.model)
        return original_call(self, tensors)

    monkeypatch.setattr(evaluation.KerasEvaluator, "__call__", counting_call)
    result = sweep(directory, data["test"], schemes="equal,linear,exp:2", model=model)
    assert len(calls) == len(EPOCHS) + len(result.candidates) == 40
    assert all(m is model for m in calls)
    assert result.selected_on == "test"


def test_sweep_loss_is_categorical_cross_entropy_and_lower_is_better(snapshots, data, reference):
    directory, weights = snapshots
    x, y = data["test"]
    result = sweep(directory, data["test"], schemes="equal,exp:2", last=3, metric="loss")
    assert (result.metric, result.higher_is_better) == ("loss", False)
    for candidate in result.candidates:
        raw = formula_weights(candidate.scheme, candidate.n)
        expected = reference_cross_entropy(
            reference(numpy_average(weights[: candidate.n], raw), x), y
        )
        assert candidate.test == pytest.approx(expected, abs=1e-5)
    assert result.best == min(result.candidates, key=lambda c: c.test)


def test_sweep_loss_with_class_indices_uses_sparse_cross_entropy(snapshots, data, reference):
    directory, weights = snapshots
    x, y = data["test"]
    labels = y.argmax(-1)
    uncompiled = keras.models.load_model(directory / "model_499.h5", compile=False)
    result = sweep(
        directory, Dataset(x, labels), schemes="equal", last=2, model=uncompiled, metric="loss"
    )
    for single, member in zip(result.single, weights[:2], strict=True):
        predictions = reference(member, x).astype(np.float64)
        expected = -np.mean(np.log(predictions[np.arange(len(labels)), labels]))
        assert single.test == pytest.approx(expected, abs=1e-5)


def test_sweep_with_a_user_metric(snapshots, data, reference, tmp_path, monkeypatch):
    (tmp_path / "polyak_test_sweep_metrics.py").write_text(
        "import numpy as np\n\n\n"
        "def mean_top_probability(y_true, y_pred):\n"
        "    return float(np.mean(y_pred.max(-1)))\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    directory, weights = snapshots
    x, _ = data["test"]
    result = sweep(
        directory,
        data["test"],
        schemes="linear",
        last=2,
        metric="polyak_test_sweep_metrics:mean_top_probability",
        higher_is_better=False,
    )
    assert (result.metric, result.higher_is_better) == ("mean_top_probability", False)
    for single, member in zip(result.single, weights[:2], strict=True):
        assert single.test == pytest.approx(float(np.mean(reference(member, x).max(-1))), abs=1e-6)
    assert result.best == min(result.candidates, key=lambda c: c.test)


def test_sweep_reads_data_from_npz_files(snapshots, data, tmp_path):
    directory, _ = snapshots
    x, y = data["test"]
    path = save_npz(tmp_path / "test.npz", x=x, y=y)
    from_file = sweep(directory, path, schemes="equal", last=2)
    from_arrays = sweep(directory, (x, y), schemes="equal", last=2)
    assert [c.test for c in from_file.candidates] == [c.test for c in from_arrays.candidates]


def test_sweep_data_the_model_cannot_take_is_refused(snapshots):
    directory, _ = snapshots
    wrong = Dataset(np.ones((5, 7), np.float32), np.zeros(5), "wide.npz")
    with pytest.raises(DataError, match="data wide.npz: the model cannot predict on it"):
        sweep(directory, wrong, schemes="equal", last=1)


def test_sweep_weights_only_without_model_asks_for_model(tmp_path, data):
    model = classic_model()
    for epoch in (1, 2):
        model.save_weights(tmp_path / f"model_{epoch}.weights.h5")
    with pytest.raises(DataError, match="--model"):
        sweep(tmp_path, data["test"], schemes="equal")


# ---------------------------------------------------------------- evaluate(model)


def test_sweep_with_evaluate_model_scores_each_candidate_on_the_model(snapshots, data, reference):
    directory, weights = snapshots
    x, y = data["test"]
    seen = []

    def evaluate(model) -> float:
        seen.append(model)
        return reference_accuracy(np.asarray(keras.ops.convert_to_numpy(model(x))), y)

    result = sweep(directory, evaluate=evaluate, schemes="equal,exp:2")
    assert result.selected_on == "test"
    assert len({id(model) for model in seen}) == 1  # one model, reused
    assert len(seen) == len(EPOCHS) * 3
    for candidate in result.candidates:
        averaged = numpy_average(
            weights[: candidate.n], formula_weights(candidate.scheme, candidate.n)
        )
        assert candidate.test == reference_accuracy(reference(averaged, x), y)


def test_sweep_with_evaluate_model_returning_validation_selects_on_it(snapshots, data):
    directory, _ = snapshots
    (x, y), (x_val, y_val) = data["test"], data["validation"]

    def evaluate(model) -> dict:
        return {
            "test": reference_accuracy(np.asarray(keras.ops.convert_to_numpy(model(x))), y),
            "validation": reference_accuracy(
                np.asarray(keras.ops.convert_to_numpy(model(x_val))), y_val
            ),
        }

    result = sweep(directory, evaluate=evaluate, schemes="linear", metric="acc")
    assert result.selected_on == "validation"
    assert result.metric == "acc"
    assert result.best.validation == max(c.validation for c in result.candidates)


def test_sweep_with_evaluate_model_and_lower_is_better(snapshots, data):
    directory, _ = snapshots
    x, y = data["test"]

    def error_rate(model) -> float:
        return 1 - reference_accuracy(np.asarray(keras.ops.convert_to_numpy(model(x))), y)

    result = sweep(directory, evaluate=error_rate, schemes="equal", higher_is_better=False)
    assert result.higher_is_better is False
    assert result.best.test == min(c.test for c in result.candidates)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, r"either test data or evaluate\(model\)"),
        ({"test_data": "x.npz", "evaluate": len}, r"either test data or evaluate\(model\)"),
        ({"evaluate": len, "validation_data": "v.npz"}, r"validation_data goes with test_data"),
        ({"evaluate": 3}, r"evaluate must be a callable"),
    ],
)
def test_sweep_refuses_data_and_evaluate_mixed_up(snapshots, arguments, message):
    directory, _ = snapshots
    with pytest.raises(DataError, match=message):
        sweep(directory, **arguments)


# ---------------------------------------------------------------- BatchNorm recalibration


def batchnorm_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy"
    )
    return model


def test_sweep_recalibrates_each_candidate_and_keeps_both_scores(tmp_path, data):
    from polyak.keras import load_averaged_model, recalibrate_batchnorm

    keras.utils.set_random_seed(0)
    model = batchnorm_model()
    (x, y), (x_test, y_test) = data["train"], data["test"]
    for epoch in range(4):
        model.fit(x, y, epochs=1, verbose=0)
        model.save(tmp_path / f"model_{epoch}.keras")
    result = sweep(tmp_path, (x_test, y_test), schemes="equal", recalibrate=(x, y))
    assert result.recalibrated
    for candidate in result.candidates:
        reference = load_averaged_model(tmp_path, "equal", last=candidate.n)
        plain = reference_accuracy(keras.ops.convert_to_numpy(reference(x_test)), y_test)
        recalibrate_batchnorm(reference, x, batch_size=1024)
        recalibrated = reference_accuracy(keras.ops.convert_to_numpy(reference(x_test)), y_test)
        assert (candidate.test, candidate.recalibrated_test) == (plain, recalibrated)


def test_a_model_the_caller_gave_gets_its_weights_back(snapshots, data):
    directory, _ = snapshots
    model = keras.models.load_model(directory / "model_490.h5", compile=False)
    before = model.get_weights()
    sweep(directory, data["test"], schemes="equal", model=model)
    for after, original in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, original)


# ---------------------------------------------------------------- per-example outcomes


def test_sweep_keeps_per_example_outcomes_for_accuracy(snapshots, data, reference):
    directory, weights = snapshots
    x, y = data["test"]
    result = sweep(directory, data["test"], data["validation"], schemes="equal,exp:2", last=4)
    final = result.outcomes["final"]
    assert final.dtype == bool and len(final) == len(y)
    np.testing.assert_array_equal(final, reference(weights[0], x).argmax(-1) == y.argmax(-1))
    best_single = result.outcomes["best_single"]
    np.testing.assert_array_equal(
        best_single, reference(weights[result.best_single], x).argmax(-1) == y.argmax(-1)
    )
    raw = formula_weights(result.best.scheme, result.best.n)
    expected = reference(numpy_average(weights[: result.best.n], raw), x).argmax(-1)
    np.testing.assert_array_equal(result.outcomes["selected"], expected == y.argmax(-1))
    assert result.comparisons()["final"].p_value is not None


def test_sweep_keeps_per_example_losses(snapshots, data, reference):
    directory, weights = snapshots
    x, y = data["test"]
    result = sweep(directory, data["test"], schemes="equal", last=3, metric="loss")
    per_example = -np.sum(y * np.log(reference(weights[0], x).astype(np.float64)), axis=-1)
    np.testing.assert_allclose(result.outcomes["final"], per_example, rtol=1e-5, atol=1e-6)
    comparison = result.comparisons()["final"]
    assert comparison.p_value is None and comparison.low is not None


def test_sweep_with_a_user_metric_has_unknown_uncertainty(snapshots, data):
    directory, _ = snapshots
    result = sweep(
        directory,
        data["test"],
        schemes="equal",
        last=2,
        metric=lambda y_true, y_pred: float(np.mean(y_pred.max(-1))),
    )
    assert result.outcomes["selected"] is None
    assert "unknown" in result.comparisons()["final"].sentence


def test_sweep_passes_on_outcomes_from_evaluate_model(snapshots, data):
    directory, _ = snapshots
    x, y = data["test"]

    def evaluate(model):
        predictions = keras.ops.convert_to_numpy(model(x, training=False))
        outcomes = predictions.argmax(-1) == y.argmax(-1)
        return {"test": float(outcomes.mean()), "outcomes": outcomes}

    result = sweep(directory, evaluate=evaluate, schemes="equal", last=3)
    assert result.outcomes["final"].mean() == pytest.approx(result.single[0].test)
    assert result.comparisons()["final"].p_value is not None
