"""Tests of polyak.keras.callbacks: SnapshotCheckpoint with real Keras fits in tmp_path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import polyak  # noqa: E402
from polyak.keras import SnapshotCheckpoint  # noqa: E402
from polyak.snapshots import MANIFEST_NAME, read_manifest, verify  # noqa: E402


def classic_model(*, compile: bool = True) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    if not compile:  # to load weights into: no optimizer whose state goes unused
        return model
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def data(samples: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, 2)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, samples)]
    return x, y


class RecordWeights(keras.callbacks.Callback):
    """get_weights() at the end of every epoch and after every batch (global step)."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: dict[int, list[np.ndarray]] = {}
        self.steps: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.steps.append(self.model.get_weights())

    def on_epoch_end(self, epoch, logs=None) -> None:
        self.epochs[epoch] = self.model.get_weights()


class FailAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None) -> None:
        if epoch == self.epoch:
            raise RuntimeError(f"crash at epoch {epoch}")


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_weights_equal(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(a, e)


@pytest.fixture(scope="module")
def last_epochs(tmp_path_factory) -> tuple[Path, RecordWeights]:
    """12 epochs with keep=3: the snapshots of epochs 9, 10, 11."""
    directory = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    model = classic_model()
    recorder = RecordWeights()
    x, y = data()
    model.fit(
        x, y, epochs=12, verbose=0, callbacks=[SnapshotCheckpoint(directory, keep=3), recorder]
    )
    return directory, recorder


def test_default_mode_saves_the_last_keep_epochs(last_epochs) -> None:
    directory, recorder = last_epochs
    expected = ["model_0009.weights.h5", "model_0010.weights.h5", "model_0011.weights.h5"]
    assert names(directory) == sorted([*expected, MANIFEST_NAME])
    snapshots = verify(directory)
    assert [s.name for s in snapshots] == expected
    assert [s.epoch for s in snapshots] == [9, 10, 11]
    assert [s.step for s in snapshots] == [20, 22, 24]  # 64 samples, batches of 32
    for snapshot in snapshots:
        assert "loss" in snapshot.logs
        assert isinstance(snapshot.logs["loss"], float)
        model = classic_model(compile=False)
        model.load_weights(snapshot.path)
        assert_weights_equal(model.get_weights(), recorder.epochs[snapshot.epoch])


def test_find_checkpoints_and_average_read_the_snapshot_directory(last_epochs) -> None:
    directory, recorder = last_epochs
    found = polyak.find_checkpoints(directory)
    assert [c.name for c in found] == [s.name for s in read_manifest(directory)][::-1]
    averaged = polyak.average(directory)
    assert list(averaged) == [
        "layers/dense/vars/0",
        "layers/dense/vars/1",
        "layers/dense_1/vars/0",
        "layers/dense_1/vars/1",
    ]
    for array, *members in zip(
        averaged.values(), *(recorder.epochs[epoch] for epoch in (9, 10, 11)), strict=True
    ):
        reference = np.mean([m.astype(np.float64) for m in members], axis=0)
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, reference, rtol=1e-6, atol=1e-7)


def test_every_epochs_counts_back_from_the_final_epoch(tmp_path: Path) -> None:
    x, y = data()
    classic_model().fit(
        x, y, epochs=8, verbose=0, callbacks=[SnapshotCheckpoint(tmp_path, keep=2, every_epochs=3)]
    )
    assert [s.epoch for s in verify(tmp_path)] == [4, 7]


def test_rolling_keeps_the_epochs_that_ran_when_training_stops_early(tmp_path: Path) -> None:
    x, y = data()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    history = classic_model().fit(
        x,
        y,
        epochs=20,
        verbose=0,
        callbacks=[SnapshotCheckpoint(tmp_path, keep=3, rolling=True), stop],
    )
    ran = len(history.history["loss"])
    assert ran < 20
    assert [s.epoch for s in verify(tmp_path)] == list(range(ran))[-3:]


# pytest.warns re-emits the warnings it did not match, Keras' own deprecations among them.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_default_mode_warns_when_training_stops_before_the_last_epochs(tmp_path: Path) -> None:
    x, y = data()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=1e9)
    with pytest.warns(RuntimeWarning, match=r"rolling=True"):
        classic_model().fit(
            x, y, epochs=20, verbose=0, callbacks=[SnapshotCheckpoint(tmp_path, keep=3), stop]
        )
    assert read_manifest(tmp_path) is None
    assert names(tmp_path) == []


def test_rolling_saves_every_epochs_and_keeps_the_most_recent(tmp_path: Path) -> None:
    x, y = data()
    checkpoint = SnapshotCheckpoint(tmp_path, keep=2, rolling=True, every_epochs=2)
    classic_model().fit(x, y, epochs=7, verbose=0, callbacks=[checkpoint])
    assert [s.epoch for s in checkpoint.saved] == [1, 3, 5]
    assert [s.name for s in verify(tmp_path)] == ["model_0003.weights.h5", "model_0005.weights.h5"]


def test_keras_format_saves_whole_models(tmp_path: Path) -> None:
    x, y = data()
    recorder = RecordWeights()
    checkpoint = SnapshotCheckpoint(tmp_path, keep=2, format="keras", prefix="net")
    classic_model().fit(x, y, epochs=4, verbose=0, callbacks=[checkpoint, recorder])
    snapshots = verify(tmp_path)
    assert [s.name for s in snapshots] == ["net_0002.keras", "net_0003.keras"]
    for snapshot in snapshots:
        loaded = keras.models.load_model(snapshot.path)
        assert_weights_equal(loaded.get_weights(), recorder.epochs[snapshot.epoch])
    averaged = polyak.average(tmp_path)
    assert {array.shape for array in averaged.values()} == {(2, 25), (25,), (25, 3), (3,)}


def test_every_steps_saves_by_global_batch_count(tmp_path: Path) -> None:
    x, y = data()
    model = classic_model()
    recorder = RecordWeights()
    checkpoint = SnapshotCheckpoint(tmp_path, keep=2, every_steps=5)
    # 64 samples in batches of 16: 4 steps an epoch, 12 in all: steps 5 and 10.
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[checkpoint, recorder])
    snapshots = verify(tmp_path)
    assert [s.name for s in snapshots] == [
        "model_step00000005.weights.h5",
        "model_step00000010.weights.h5",
    ]
    assert [(s.epoch, s.step) for s in snapshots] == [(1, 5), (2, 10)]
    assert "loss" in snapshots[0].logs
    restored = classic_model(compile=False)
    restored.load_weights(snapshots[1].path)
    assert_weights_equal(restored.get_weights(), recorder.steps[10 - 1])
    # A second fit goes on counting from the optimizer's 12 steps: 13..16 saves 15.
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[checkpoint])
    assert [s.step for s in verify(tmp_path)] == [10, 15]
    assert [c.step for c in polyak.find_checkpoints(tmp_path)] == [15, 10]


def test_a_crash_during_training_leaves_only_committed_snapshots(tmp_path: Path) -> None:
    x, y = data()
    (tmp_path / "model_9999.weights.h5").write_bytes(b"a stray file, not a snapshot")
    callbacks = [SnapshotCheckpoint(tmp_path, keep=3, rolling=True), FailAtEpoch(5)]
    with pytest.raises(RuntimeError, match="crash at epoch 5"):
        classic_model().fit(x, y, epochs=10, verbose=0, callbacks=callbacks)
    snapshots = verify(tmp_path)
    assert [s.epoch for s in snapshots] == [3, 4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    found = polyak.find_checkpoints(tmp_path)
    assert {c.path for c in found} == {s.path for s in snapshots}
    assert [c.name for c in found] == [s.name for s in snapshots][::-1]


def test_a_resumed_run_replaces_the_snapshots_it_saves_again(tmp_path: Path) -> None:
    x, y = data()
    model = classic_model()
    model.fit(
        x, y, epochs=4, verbose=0, callbacks=[SnapshotCheckpoint(tmp_path, keep=3, rolling=True)]
    )
    first = {s.name: s.sha256 for s in verify(tmp_path)}
    model.fit(
        x,
        y,
        epochs=5,
        initial_epoch=3,
        verbose=0,
        callbacks=[SnapshotCheckpoint(tmp_path, keep=3, rolling=True)],
    )
    snapshots = verify(tmp_path)
    assert [s.epoch for s in snapshots] == [2, 3, 4]
    assert snapshots[1].sha256 != first["model_0003.weights.h5"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": 0}, r"keep must be a whole number >= 1; received 0"),
        ({"keep": 2.5}, r"keep must be a whole number"),
        ({"every_epochs": 0}, r"every_epochs must be a whole number >= 1"),
        ({"every_steps": 0}, r"every_steps must be a whole number >= 1 or None"),
        ({"every_steps": 10, "every_epochs": 2}, r"every_steps or every_epochs, not both"),
        ({"format": "h5"}, r"format must be one of 'weights.h5', 'keras'; received 'h5'"),
        ({"prefix": ""}, r"prefix must be a non-empty"),
        ({"prefix": "a/b"}, r"prefix must be .*received 'a/b'"),
        ({"prefix": ".hidden"}, r"prefix must be"),
        ({"rolling": "yes"}, r"rolling must be True or False"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SnapshotCheckpoint(tmp_path, **arguments)
    assert names(tmp_path) == []


def test_the_callback_keeps_its_arguments_as_one_checked_options_record(tmp_path: Path) -> None:
    from polyak.posthoc import DEFAULT_PROFILE_KEEP
    from polyak.snapshots import SnapshotOptions

    callback = SnapshotCheckpoint(str(tmp_path), keep=np.int64(3), every_steps=5, format="keras")
    assert callback.options == SnapshotOptions(
        directory=tmp_path,
        formats={"weights.h5": ".weights.h5", "keras": ".keras"},
        format="keras",
        keep=3,
        every_steps=5,
        posthoc_keep=DEFAULT_PROFILE_KEEP,
    )
    assert callback.schedule is callback.options.schedule
    assert (callback.directory, callback.keep, callback.every_steps) == (tmp_path, 3, 5)


def test_every_steps_skips_the_steps_a_loss_scale_optimizer_skips(tmp_path: Path) -> None:
    # mixed_float16: the LossScaleOptimizer skips the first steps (its first loss scale
    # overflows float16) and iterations stays; snapshots are named and taken by the
    # optimizer's steps, each step once, not by batches.
    x, y = data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(25, activation="relu", dtype="mixed_float16"),
            keras.layers.Dense(3, activation="softmax", dtype="mixed_float16"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.01, momentum=0.9), initial_scale=2**30
        ),
        loss="categorical_crossentropy",
    )
    checkpoint = SnapshotCheckpoint(tmp_path, keep=100, every_steps=1)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[checkpoint])
    taken = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert 0 < taken < 16, f"the fixture must skip some steps and take some: {taken}"
    assert [s.step for s in verify(tmp_path)] == list(range(1, taken + 1))


def test_every_steps_counts_optimizer_steps_with_gradient_accumulation(tmp_path: Path) -> None:
    # Two batches a step: 64 samples in batches of 16 make 2 steps an epoch, 6 in 3 epochs;
    # steps 2, 4, 6 end on batches 4, 8, 12, where the weights change.
    x, y = data()
    keras.utils.set_random_seed(0)
    model = classic_model(compile=False)
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    recorder = RecordWeights()
    checkpoint = SnapshotCheckpoint(tmp_path, keep=3, every_steps=2, posthoc=(0.1,))
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[checkpoint, recorder])
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 6
    snapshots = verify(tmp_path)
    assert [(s.step, s.epoch) for s in snapshots] == [(2, 0), (4, 1), (6, 2)]
    restored = classic_model(compile=False)
    for snapshot, batch in zip(snapshots, (4, 8, 12), strict=True):
        restored.load_weights(snapshot.path)
        assert_weights_equal(restored.get_weights(), recorder.steps[batch - 1])
    # The post-hoc profile is updated once a step, at the step's last batch.
    from polyak.posthoc import gamma_of, profile_directory

    profile = verify(profile_directory(tmp_path, 0.1))[-1]
    assert profile.step == 6
    exponent = gamma_of(0.1) + 1
    expected = [w.astype(np.float64) for w in recorder.steps[1]]
    for t, batch in enumerate((4, 6, 8, 10, 12), start=2):
        beta = (1 - 1 / t) ** exponent
        expected = [beta * a + (1 - beta) * w for a, w in zip(expected, recorder.steps[batch - 1],
                                                              strict=True)]  # fmt: skip
    restored.load_weights(profile.path)
    for value, reference in zip(restored.get_weights(), expected, strict=True):
        np.testing.assert_allclose(value, reference, rtol=2e-6, atol=1e-7)


FULL_DISK_SCRIPT = """
import resource, sys
import numpy as np
import keras
from polyak.errors import OutputError
from polyak.keras import SnapshotCheckpoint

directory, format, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(256), keras.layers.Dense(3)])
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).normal(size=(32, 2)).astype("float32")
y = np.arange(32) % 3
callback = SnapshotCheckpoint(directory, keep=5, rolling=True, format=format)
model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])  # one snapshot fits
# The disk is full from here on (ulimit -f: writes fail with EFBIG, as with ENOSPC).
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
try:
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
except OutputError as error:
    print("caught:", error)
    model.fit(x, y, epochs=1, verbose=0)  # training goes on
    print("trained on")
"""


@pytest.mark.parametrize("format", ["weights.h5", pytest.param("keras", marks=pytest.mark.slow)])
def test_a_full_disk_is_an_exception_the_script_catches_not_a_crash(tmp_path, format) -> None:
    """Before: SIGSEGV inside HDF5 (3 of 3 runs), the training process lost."""
    (tmp_path / "script.py").write_text(FULL_DISK_SCRIPT)
    directory = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(directory), format, "4096"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "caught: " in done.stdout and "File too large" in done.stdout, done.stdout
    assert "trained on" in done.stdout
    snapshots = verify(directory)  # the earlier snapshot intact, checksums and all
    assert len(snapshots) == 1
    assert not [p for p in directory.iterdir() if p.name.startswith(".polyak-tmp")]
