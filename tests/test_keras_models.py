"""Keras model helpers: averaging models, loading averages, mapping checkpoints to variables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from polyak.errors import CheckpointError, DataError  # noqa: E402
from polyak.formats import open_checkpoint  # noqa: E402
from polyak.keras.models import (  # noqa: E402
    KerasWeightMap,
    average_models,
    load_averaged_model,
    resolve_model,
)

STEPS = (10, 11, 12)  # model_12 is the newest
SUFFIXES = {"keras": ".keras", "h5": ".h5", "weights": ".weights.h5"}


def tiny_model(hidden: int = 4) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def batchnorm_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def randomize(model: keras.Model, seed: int) -> keras.Model:
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])
    return model


def scheme_weights(scheme, n: int) -> np.ndarray:
    """Raw weights, newest first, from the schemes' formulas (numpy.average normalizes)."""
    i = np.arange(1, n + 1, dtype=np.float64)
    if isinstance(scheme, list):
        return np.asarray(scheme, dtype=np.float64)
    if scheme == "equal":
        return np.ones(n)
    if scheme == "linear":
        return (n - i + 1) / n
    if scheme.startswith("exp:"):
        return np.exp(-i / float(scheme[4:]))
    return np.array([float(v) for v in scheme.partition(":")[2].split(",")])


def expected_average(weights_newest_first: list[list[np.ndarray]], scheme) -> list[np.ndarray]:
    raw = scheme_weights(scheme, len(weights_newest_first))
    return [
        np.average([member[k] for member in weights_newest_first], axis=0, weights=raw)
        for k in range(len(weights_newest_first[0]))
    ]


def assert_weights_close(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        # float32 accumulation relative to the newest member: a few float32 ulps.
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.fixture(scope="module")
def members() -> list[keras.Model]:
    """Three models of one architecture with different weights, newest first."""
    return [randomize(tiny_model(), seed=step) for step in reversed(STEPS)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, members) -> dict[str, Path]:
    """The members saved as .keras, legacy .h5 and .weights.h5, one directory each.

    As in training, one model object saves every member (legacy .h5 files name their
    tensors after the layers, which differ between model objects).
    """
    root = tmp_path_factory.mktemp("saved")
    saver = tiny_model()
    directories = {}
    for kind, suffix in SUFFIXES.items():
        directory = root / kind
        directory.mkdir()
        for step, model in zip(reversed(STEPS), members, strict=True):
            saver.set_weights(model.get_weights())
            path = directory / f"model_{step}{suffix}"
            if kind == "weights":
                saver.save_weights(path)
            else:
                saver.save(path)
        directories[kind] = directory
    return directories


@pytest.mark.parametrize("scheme", ["equal", "linear", "exp:2", "custom:3,2,1", [0.5, 0.3, 0.2]])
def test_average_models_equals_numpy_average(members, scheme):
    before = [m.get_weights() for m in members]
    averaged = average_models(members, scheme)
    assert averaged is not members[0]
    assert all(averaged is not m for m in members)
    assert_weights_close(averaged.get_weights(), expected_average(before, scheme))
    for model, weights in zip(members, before, strict=True):  # the members are untouched
        for got, want in zip(model.get_weights(), weights, strict=True):
            np.testing.assert_array_equal(got, want)


def test_average_models_of_one_model_is_a_copy(members):
    averaged = average_models(members[:1])
    assert averaged is not members[0]
    for got, want in zip(averaged.get_weights(), members[0].get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_average_models_needs_a_model():
    with pytest.raises(DataError, match="at least one model"):
        average_models([])


@pytest.mark.parametrize("kind", ["keras", "h5"])
@pytest.mark.parametrize("scheme", ["equal", "linear", "exp:2"])
def test_load_averaged_full_models(saved, members, kind, scheme):
    averaged = load_averaged_model(saved[kind], scheme)
    assert isinstance(averaged, keras.Model)
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members], scheme)
    )


def test_load_averaged_last_n(saved, members):
    averaged = load_averaged_model(saved["keras"], "linear", last=2)
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members[:2]], "linear")
    )


def test_load_averaged_weights_only_with_a_factory_callable(saved, members):
    averaged = load_averaged_model(saved["weights"], "linear", model=tiny_model)
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members], "linear")
    )


def test_load_averaged_weights_only_with_a_model_object(saved, members):
    target = tiny_model()
    averaged = load_averaged_model(saved["weights"], "equal", model=target)
    assert averaged is target
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members], "equal")
    )


def test_load_averaged_weights_only_with_a_module_factory(saved, members, tmp_path, monkeypatch):
    (tmp_path / "polyak_test_factory_models.py").write_text(
        "import keras\n\n\n"
        "def build():\n"
        "    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation='relu'),"
        " keras.layers.Dense(3, activation='softmax')])\n\n\n"
        "def not_a_model():\n"
        "    return 42\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    averaged = load_averaged_model(
        saved["weights"], "exp:2", model="polyak_test_factory_models:build"
    )
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members], "exp:2")
    )
    with pytest.raises(DataError, match="the factory returned int, not a keras.Model"):
        resolve_model("polyak_test_factory_models:not_a_model", saved["weights"])
    with pytest.raises(DataError, match="polyak_test_factory_models has no function missing"):
        resolve_model("polyak_test_factory_models:missing", saved["weights"])


def test_load_averaged_weights_only_with_a_model_file(saved, members):
    architecture = next(saved["keras"].iterdir())
    averaged = load_averaged_model(saved["weights"], "equal", model=architecture)
    assert_weights_close(
        averaged.get_weights(), expected_average([m.get_weights() for m in members], "equal")
    )


def test_weights_only_without_model_asks_for_model(saved):
    with pytest.raises(DataError, match=r"holds weights only; give the architecture with --model"):
        load_averaged_model(saved["weights"])


@pytest.mark.parametrize("kind", ["keras", "h5", "weights"])
def test_a_different_architecture_is_refused(saved, kind):
    with pytest.raises(CheckpointError, match="does not fit the model|architecture differs"):
        load_averaged_model(saved[kind], model=lambda: tiny_model(hidden=26))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nomodule_polyak_xyz:fn", "cannot import module nomodule_polyak_xyz"),
        ("no-colon", "give a model file .* or a factory 'module:function'"),
        ("missing.keras", "model missing.keras: no such file"),
        (42, "expected a keras.Model, a callable, or a file"),
        (lambda: "not a model", "the factory returned str, not a keras.Model"),
    ],
)
def test_resolve_model_refuses_bad_specs(saved, spec, message):
    with pytest.raises(DataError, match=message):
        resolve_model(spec, next(saved["weights"].iterdir()))


def test_resolve_model_returns_a_given_model(saved):
    model = tiny_model()
    assert resolve_model(model, next(saved["weights"].iterdir())) is model


@pytest.mark.parametrize("kind", ["keras", "h5", "weights"])
def test_weight_map_covers_every_variable_including_batchnorm_statistics(tmp_path, kind):
    source = randomize(batchnorm_model(), seed=7)
    path = tmp_path / f"bn_1{SUFFIXES[kind]}"
    if kind == "weights":
        source.save_weights(path)
    else:
        source.save(path)
    target = batchnorm_model()
    with open_checkpoint(path) as reader:
        weight_map = KerasWeightMap(target, reader)
        assert len(weight_map.pairs) == len(target.weights) == 8
        mapped = {id(variable) for variable, _ in weight_map.pairs}
        non_trainable = target.non_trainable_weights
        assert len(non_trainable) == 2  # the moving mean and variance
        assert all(id(v) in mapped for v in non_trainable)
        untouched = [np.array(w) for w in target.get_weights()]
        # Building the map restores the model's own values.
        for got, want in zip(target.get_weights(), untouched, strict=True):
            np.testing.assert_array_equal(got, want)
        weight_map.assign({name: reader.read(name) for name in reader.names()})
    for got, want in zip(target.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_weight_map_refuses_a_checkpoint_of_another_architecture(saved):
    with open_checkpoint(next(saved["weights"].iterdir())) as reader:
        with pytest.raises(CheckpointError, match="does not fit the model|architecture differs"):
            KerasWeightMap(tiny_model(hidden=26), reader)


def test_weight_map_refuses_non_keras_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "model_1.safetensors"
    save_file({"kernel": np.zeros((2, 4), np.float32)}, str(path))
    with open_checkpoint(path) as reader:
        with pytest.raises(DataError, match=r"from Keras checkpoints .*this one is safetensors"):
            KerasWeightMap(tiny_model(), reader)
