"""Tests of polyak.keras.online: the OnlineAverage callback in real ``fit`` runs (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from polyak.errors import SchemeError  # noqa: E402
from polyak.keras.online import OnlineAverage  # noqa: E402

ops = keras.ops
RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 3)).astype("float32")
Y = (X @ RNG.normal(size=(3, 1)) + 0.3).astype("float32")
X_VAL = RNG.normal(size=(32, 3)).astype("float32")
Y_VAL = (X_VAL @ np.ones((3, 1)) * 0.5).astype("float32")
BATCH = 16  # 3 steps per epoch


class Constant(keras.layers.Layer):
    """Holds an integer variable, which must never be averaged."""

    def build(self, input_shape):
        self.counter = self.add_weight(
            shape=(), dtype="int32", initializer="ones", trainable=False, name="counter"
        )

    def call(self, inputs):
        return inputs


CUSTOM = {"Constant": Constant}


def make_model(seed: int = 0, dtype: str | None = None, compiled: bool = True) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            Constant(dtype=dtype),
            keras.layers.Dense(1, dtype=dtype),
        ]
    )
    if compiled:
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    return model


class Recorder(keras.callbacks.Callback):
    """The model's weights (float64) after every training batch, by step."""

    def __init__(self):
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(
            [ops.convert_to_numpy(w).astype(np.float64) for w in self.model.weights]
        )


def mean(snapshots: list[list[np.ndarray]]) -> list[np.ndarray]:
    return [np.mean([s[i] for s in snapshots], axis=0) for i in range(len(snapshots[0]))]


def weights_of(model) -> list[np.ndarray]:
    return [ops.convert_to_numpy(w).astype(np.float64) for w in model.weights]


def evaluate_with(weights: list[np.ndarray]) -> float:
    model = make_model(seed=9)
    model.set_weights([w.astype(v.dtype) for w, v in zip(weights, model.weights, strict=True)])
    return model.evaluate(X_VAL, Y_VAL, batch_size=BATCH, verbose=0)


def saved_average(average: OnlineAverage, path) -> dict[str, np.ndarray]:
    average.save(path)
    with np.load(path) as archive:
        return {k: archive[k] for k in archive.files if k.startswith("average/")}


def test_validation_inside_fit_sees_the_average_and_fit_ends_with_the_raw_weights(tmp_path):
    model, recorder = make_model(), Recorder()
    average = OnlineAverage("polyak", start_epoch=1)
    history = model.fit(
        X, Y, batch_size=BATCH, epochs=3, validation_data=(X_VAL, Y_VAL), shuffle=False,
        callbacks=[recorder, average], verbose=0,
    )  # fmt: skip
    steps_per_epoch = 3
    assert average.updates == 6 and average.step == 9
    assert len(average.averaged_names) == 8  # all float weights
    assert not any("counter" in name for name in average.averaged_names)
    val_loss = history.history["val_loss"]
    # Epoch 0, before the start: the raw model's.
    assert val_loss[0] == pytest.approx(evaluate_with(recorder.weights[2]), rel=1e-5)
    for epoch in (1, 2):
        # The equal average of the weights after each step of epochs 1..epoch.
        members = recorder.weights[steps_per_epoch : steps_per_epoch * (epoch + 1)]
        expected = evaluate_with(mean(members))
        assert val_loss[epoch] == pytest.approx(expected, rel=1e-5)
        raw = evaluate_with(recorder.weights[steps_per_epoch * (epoch + 1) - 1])
        assert abs(val_loss[epoch] - raw) > 1e-4 * raw  # and not the raw model's
    # fit leaves the raw weights in the model, exactly.
    for kept, recorded in zip(weights_of(model), recorder.weights[-1], strict=True):
        np.testing.assert_array_equal(kept, recorded)
    # evaluate() with the callback swaps in too, and back.
    loss = model.evaluate(X_VAL, Y_VAL, batch_size=BATCH, verbose=0, callbacks=[average])
    assert loss == pytest.approx(val_loss[2], rel=1e-6)
    for kept, recorded in zip(weights_of(model), recorder.weights[-1], strict=True):
        np.testing.assert_array_equal(kept, recorded)


def test_polyak_from_start_step_is_the_equal_average_of_the_update_steps(tmp_path):
    model, recorder = make_model(), Recorder()
    average = OnlineAverage(mode="polyak", start_step=2, update_every=2)
    model.fit(X, Y, batch_size=BATCH, epochs=3, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    # Update steps 4, 6, 8 (steps are 1-based; recorder.weights[s - 1] is after step s).
    expected = mean([recorder.weights[s - 1] for s in (4, 6, 8)])
    kept = saved_average(average, tmp_path / "average.npz")
    for name, value in kept.items():
        assert value.dtype == np.float32
        index = int(name.split("/")[1])  # average/INDEX/NAME, INDEX in model.weights
        np.testing.assert_allclose(value, expected[index], rtol=1e-6, atol=1e-7)


def test_a_bf16_models_average_is_kept_in_float32(tmp_path):
    model, recorder = make_model(dtype="bfloat16"), Recorder()
    average = OnlineAverage(mode="polyak")
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    expected = mean(recorder.weights)
    kept = saved_average(average, tmp_path / "average.npz")
    for name, value in kept.items():
        assert value.dtype == np.float32
        index = int(name.split("/")[1])  # average/INDEX/NAME, INDEX in model.weights
        # The mean of 6 bf16 values, kept in float32: no bf16 rounding (2^-8 relative).
        np.testing.assert_allclose(value, expected[index], rtol=1e-6, atol=1e-7)
    with average.swapped():
        for variable in model.weights:
            assert variable.dtype in ("bfloat16", "int32")


@pytest.mark.parametrize("same_callback", [False, True])
def test_resuming_with_the_saved_state_gives_the_uninterrupted_run(tmp_path, same_callback):
    arguments = {"half_life": 4, "start_step": 2, "update_every": 2}
    fit = {"batch_size": BATCH, "shuffle": False, "verbose": 0}
    model = make_model()
    average = OnlineAverage(**arguments)
    model.fit(X, Y, epochs=4, callbacks=[average], validation_data=(X_VAL, Y_VAL), **fit)
    uninterrupted = saved_average(average, tmp_path / "uninterrupted.npz")

    first = make_model()
    average_first = OnlineAverage(**arguments)
    first.fit(X, Y, epochs=2, callbacks=[average_first], validation_data=(X_VAL, Y_VAL), **fit)
    first.save(tmp_path / "model.keras")  # the raw weights, with the optimizer's state
    average_first.save(tmp_path / "average.npz")

    resumed = keras.models.load_model(tmp_path / "model.keras", custom_objects=CUSTOM)
    # A new callback (a new process), or the same object: the state goes to the new model.
    average_resumed = average_first if same_callback else OnlineAverage(**arguments)
    average_resumed.load(tmp_path / "average.npz")
    resumed.fit(X, Y, epochs=4, initial_epoch=2, callbacks=[average_resumed],
                validation_data=(X_VAL, Y_VAL), **fit)  # fmt: skip
    assert average_resumed.step == average.step == 12
    assert average_resumed.updates == average.updates == 5
    for a, b in zip(weights_of(resumed), weights_of(model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    continued = saved_average(average_resumed, tmp_path / "resumed.npz")
    assert continued.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(continued[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_export_writes_the_averaged_model_and_keeps_the_raw_one(tmp_path, suffix):
    model, recorder = make_model(), Recorder()
    average = OnlineAverage()  # polyak from the start
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    raw = weights_of(model)
    path = average.export(tmp_path / f"averaged{suffix}")
    if suffix == ".keras":
        fresh = keras.models.load_model(path, custom_objects=CUSTOM)
    else:
        fresh = make_model(seed=5, compiled=False)
        fresh.load_weights(path)
    expected = mean(recorder.weights)
    for value, reference in zip(weights_of(fresh), expected, strict=True):
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7)
    for kept, before in zip(weights_of(model), raw, strict=True):
        np.testing.assert_array_equal(kept, before)
    with pytest.raises(OSError, match="exists; pass overwrite=True"):
        average.export(path)


def test_swapped_restores_the_raw_weights_on_error_and_copy_leaves_statistics():
    model = make_model()
    average = OnlineAverage(half_life=1, buffers="copy")
    model.fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[average], verbose=0)
    assert not any("moving" in name for name in average.averaged_names)
    raw = weights_of(model)
    kernel, moving_mean = model.layers[0].kernel, model.layers[1].moving_mean
    with pytest.raises(KeyError):
        with average.swapped():
            assert not np.array_equal(ops.convert_to_numpy(kernel), raw[0])
            np.testing.assert_array_equal(ops.convert_to_numpy(moving_mean), raw[4])
            raise KeyError("boom")
    for kept, before in zip(weights_of(model), raw, strict=True):
        np.testing.assert_array_equal(kept, before)
    # Swapping by hand follows the protocol both framework averages share.
    average.swap_in()
    with pytest.raises(RuntimeError, match="already swapped in; call swap_out"):
        average.swap_in()
    average.swap_out()
    with pytest.raises(RuntimeError, match="not swapped in; swap_out\\(\\) follows swap_in"):
        average.swap_out()
    for kept, before in zip(weights_of(model), raw, strict=True):
        np.testing.assert_array_equal(kept, before)


def test_bad_arguments_and_states_are_refused(tmp_path):
    with pytest.raises(ValueError, match="give start_epoch or start_step, not both"):
        OnlineAverage(start_epoch=1, start_step=3)
    with pytest.raises(ValueError, match="start_epoch must be a whole number >= 0"):
        OnlineAverage(start_epoch=-1)
    with pytest.raises(ValueError, match="buffers must be one of 'average', 'copy'"):
        OnlineAverage(buffers="all")
    with pytest.raises(SchemeError, match="exactly one of them"):
        OnlineAverage(decay=0.9, half_life=3)
    with pytest.raises(ValueError, match="export writes .weights.h5 or .keras files"):
        OnlineAverage().export(tmp_path / "model.h5")
    with pytest.raises(ValueError, match="export\\(\\) needs the model"):
        OnlineAverage().export(tmp_path / "model.keras")
    model = make_model()
    average = OnlineAverage(start_epoch=5)
    model.fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[average], verbose=0)
    with pytest.raises(ValueError, match="the average has not started: no update step yet"):
        average.export(tmp_path / "model.keras")
    average.save(tmp_path / "state.npz")
    with pytest.raises(ValueError, match="Build the callback with the arguments it was saved"):
        OnlineAverage(start_epoch=6).load(tmp_path / "state.npz")
    (tmp_path / "other.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an OnlineAverage state saved by"):
        OnlineAverage().load(tmp_path / "other.npz")


def test_a_state_for_another_architecture_is_refused_when_fit_begins(tmp_path):
    model = make_model()
    average = OnlineAverage()
    model.fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[average], verbose=0)
    average.save(tmp_path / "state.npz")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    other.compile(optimizer="sgd", loss="mse")
    resumed = OnlineAverage()
    resumed.load(tmp_path / "state.npz")
    with pytest.raises(ValueError, match="Load it into the model it was saved with"):
        other.fit(X, Y, batch_size=BATCH, epochs=1, callbacks=[resumed], verbose=0)


# Keras' torch backend warns of numpy's __array__ copy keyword in convert_to_numpy.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_run_that_begins_after_start_epoch_warns_and_starts_then():
    model = make_model()
    average = OnlineAverage(start_epoch=1)
    with pytest.warns(RuntimeWarning, match="start_epoch=1, but the first epoch seen is 2"):
        model.fit(X, Y, batch_size=BATCH, epochs=3, initial_epoch=2, callbacks=[average],
                  verbose=0)  # fmt: skip
    assert average.schedule.start_step == 0 and average.updates == 3


def float64_average(members: list[list[np.ndarray]], mode: str, value: float) -> list[np.ndarray]:
    """The average after an update at each of steps 1..T, in float64, from its formula.

    ``a_1 = theta_1``, then ``a_t = beta_t a_(t-1) + (1 - beta_t) theta_t`` with
    ``beta_t = (t - 1) / t`` (polyak), ``r`` (decay), ``0.5 ** (1 / h)`` (half-life) or
    ``(1 - 1 / t) ** (gamma + 1)`` (power, Karras et al.).
    """
    from polyak.posthoc import gamma_of

    average = [w.copy() for w in members[0]]
    for t, weights in enumerate(members[1:], start=2):
        if mode == "polyak":
            beta = (t - 1) / t
        elif mode == "decay":
            beta = value
        elif mode == "half_life":
            beta = 0.5 ** (1 / value)
        else:
            beta = (1 - 1 / t) ** (gamma_of(value) + 1)
        average = [beta * a + (1 - beta) * w for a, w in zip(average, weights, strict=True)]
    return average


def assert_average_is(average: OnlineAverage, path, expected: list[np.ndarray]) -> None:
    kept = saved_average(average, path)
    assert kept
    for name, value in kept.items():
        assert value.dtype == np.float32
        index = int(name.split("/")[1])  # average/INDEX/NAME, INDEX in model.weights
        np.testing.assert_allclose(value, expected[index], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("mode", "value"), [("polyak", None), ("decay", 0.7), ("half_life", 2.0), ("sigma_rel", 0.2)]
)
def test_every_mode_equals_its_float64_reference(tmp_path, mode, value):
    model, recorder = make_model(), Recorder()
    average = OnlineAverage() if mode == "polyak" else OnlineAverage(**{mode: value})
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    assert average.updates == 6
    assert_average_is(average, tmp_path / "average.npz", float64_average(recorder.weights,
                                                                         mode, value))  # fmt: skip


def test_predict_with_the_callback_or_swapped_uses_the_average_then_the_raw_weights():
    model, recorder = make_model(), Recorder()
    average = OnlineAverage(half_life=2)
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    reference = make_model(seed=9)
    expected = float64_average(recorder.weights, "half_life", 2.0)
    reference.set_weights([w.astype(v.dtype) for w, v in zip(expected, reference.weights,
                                                             strict=True)])  # fmt: skip
    averaged = reference.predict(X_VAL, batch_size=BATCH, verbose=0)
    raw = model.predict(X_VAL, batch_size=BATCH, verbose=0)
    assert np.abs(raw - averaged).max() > 1e-3  # the two are told apart
    # Keras' SwapEMAWeights swaps the EMA in at on_predict_end: predicting twice shows it.
    for _ in range(2):
        swapped = model.predict(X_VAL, batch_size=BATCH, verbose=0, callbacks=[average])
        np.testing.assert_allclose(swapped, averaged, rtol=1e-5, atol=1e-6)
        assert not average.is_swapped
        np.testing.assert_array_equal(model.predict(X_VAL, batch_size=BATCH, verbose=0), raw)
    with average.swapped() as inside:
        np.testing.assert_allclose(inside.predict(X_VAL, batch_size=BATCH, verbose=0),
                                   averaged, rtol=1e-5, atol=1e-6)  # fmt: skip
    for kept, recorded in zip(weights_of(model), recorder.weights[-1], strict=True):
        np.testing.assert_array_equal(kept, recorded)


def test_gradient_accumulation_averages_the_weights_of_each_optimizer_step(tmp_path):
    # 48 samples in batches of 12, two batches a step: 2 steps an epoch. The weights
    # change on batches 2, 4, ... only; BatchNorm's statistics on every batch.
    model, recorder = make_model(compiled=False), Recorder()
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
    model.compile(optimizer=optimizer, loss="mse")
    average = OnlineAverage(half_life=2)
    fit = {"batch_size": 12, "shuffle": False, "verbose": 0}
    model.fit(X, Y, epochs=2, callbacks=[recorder, average], **fit)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == average.step == 4
    assert average.updates == 4
    kernel = [w[0] for w in recorder.weights]
    assert np.array_equal(kernel[0], kernel[1]) is False and np.array_equal(kernel[1], kernel[2])
    after_steps = [recorder.weights[b - 1] for b in (2, 4, 6, 8)]
    assert_average_is(average, tmp_path / "a.npz", float64_average(after_steps, "half_life", 2))
    # A second fit goes on counting steps with the optimizer: 2 more.
    model.fit(X, Y, epochs=1, callbacks=[recorder, average], **fit)
    assert average.step == 6 and average.updates == 6
    after_steps += [recorder.weights[b - 1] for b in (10, 12)]
    assert_average_is(average, tmp_path / "b.npz", float64_average(after_steps, "half_life", 2))


def test_a_mixed_bfloat16_model_is_averaged_in_float32_and_evaluated_with_it(tmp_path):
    model, recorder = make_model(dtype="mixed_bfloat16"), Recorder()
    average = OnlineAverage()
    history = model.fit(
        X, Y, batch_size=BATCH, epochs=2, validation_data=(X_VAL, Y_VAL), shuffle=False,
        callbacks=[recorder, average], verbose=0,
    )  # fmt: skip
    expected = mean(recorder.weights)
    assert_average_is(average, tmp_path / "average.npz", expected)
    with average.swapped():
        assert {v.dtype for v in model.weights} == {"float32", "int32"}
        swapped = weights_of(model)
    for value, reference in zip(swapped, expected, strict=True):
        np.testing.assert_allclose(value, reference, rtol=1e-6, atol=1e-7)
    # Validation ran in bfloat16 with the average: a bfloat16 model holding it agrees.
    check = make_model(seed=9, dtype="mixed_bfloat16")
    check.set_weights([w.astype(v.dtype) for w, v in zip(expected, check.weights, strict=True)])
    loss = check.evaluate(X_VAL, Y_VAL, batch_size=BATCH, verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(loss, rel=1e-6)
    raw = make_model(seed=9, dtype="mixed_bfloat16")
    raw.set_weights([w.astype(v.dtype) for w, v in zip(recorder.weights[-1], raw.weights,
                                                       strict=True)])  # fmt: skip
    assert abs(raw.evaluate(X_VAL, Y_VAL, batch_size=BATCH, verbose=0) - loss) > 1e-3 * loss


def mixed_float16_model_that_skips_steps() -> keras.Model:
    """mixed_float16 under a LossScaleOptimizer whose first loss scale overflows float16.

    The optimizer skips the steps whose scaled gradients are not finite, halving the
    scale each time: the first batches change nothing and ``iterations`` stays at 0.
    """
    model = make_model(dtype="mixed_float16", compiled=False)
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2**20)
    model.compile(optimizer=optimizer, loss="mse")
    return model


class IterationsRecorder(Recorder):
    """The weights after every batch and the optimizer's ``iterations`` then."""

    def __init__(self):
        super().__init__()
        self.iterations: list[int] = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        self.iterations.append(int(ops.convert_to_numpy(self.model.optimizer.iterations)))


def test_steps_a_loss_scale_optimizer_skips_are_not_averaged(tmp_path):
    # A skipped step leaves the weights as they were; counting it as a step (as counting
    # batches would) would average the same weights twice. The average follows the
    # optimizer's iterations: one update per step taken, none for a skipped one.
    model, recorder = mixed_float16_model_that_skips_steps(), IterationsRecorder()
    average = OnlineAverage()
    model.fit(X, Y, batch_size=BATCH, epochs=3, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    taken = recorder.iterations
    assert 0 < taken[-1] < len(taken), f"the fixture must skip some steps and take some: {taken}"
    stepped = [b for b, it in enumerate(taken) if it > (taken[b - 1] if b else 0)]
    assert average.step == taken[-1] and average.updates == len(stepped) == taken[-1]
    assert_average_is(
        average, tmp_path / "average.npz", mean([recorder.weights[b] for b in stepped])
    )


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras refuses steps_per_execution > 1 on the torch backend",
)
def test_steps_per_execution_updates_once_per_execution_with_the_decay_of_its_steps(tmp_path):
    # 3 batches an epoch run in one execution: the callback sees steps 3 and 6 only, and
    # an update standing for 3 steps has decay r ** 3.
    model, recorder = make_model(compiled=False), Recorder()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse",
                  steps_per_execution=3)  # fmt: skip
    average = OnlineAverage(decay=0.8)
    model.fit(X, Y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[recorder, average],
              verbose=0)  # fmt: skip
    assert len(recorder.weights) == 2 and average.step == 6 and average.updates == 2
    expected = float64_average(recorder.weights, "decay", 0.8**3)
    assert_average_is(average, tmp_path / "average.npz", expected)


def test_a_model_saved_mid_accumulation_resumes_with_its_pending_batches(tmp_path):
    # Two batches a step, batches of 16: 3 batches an epoch. After epoch 0 the optimizer
    # has made 1 step and holds 1 batch; resumed, batches 4, 6 end steps 2, 3.
    def compiled() -> keras.Model:
        model = make_model(compiled=False)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9, gradient_accumulation_steps=2)
        model.compile(optimizer=optimizer, loss="mse")
        return model

    fit = {"batch_size": BATCH, "shuffle": False, "verbose": 0}
    model, recorder = compiled(), Recorder()
    average = OnlineAverage(decay=0.5)
    model.fit(X, Y, epochs=2, callbacks=[recorder, average], **fit)
    assert average.step == 3 and average.updates == 3
    uninterrupted = float64_average([recorder.weights[b - 1] for b in (2, 4, 6)], "decay", 0.5)
    assert_average_is(average, tmp_path / "uninterrupted.npz", uninterrupted)

    first, average_first = compiled(), OnlineAverage(decay=0.5)
    first.fit(X, Y, epochs=1, callbacks=[average_first], **fit)
    first.save(tmp_path / "model.keras")
    average_first.save(tmp_path / "average.npz")
    resumed = keras.models.load_model(tmp_path / "model.keras", custom_objects=CUSTOM)
    average_resumed = OnlineAverage(decay=0.5)
    average_resumed.load(tmp_path / "average.npz")
    resumed.fit(X, Y, epochs=2, initial_epoch=1, callbacks=[average_resumed], **fit)
    assert average_resumed.step == 3 and average_resumed.updates == 3
    assert_average_is(average_resumed, tmp_path / "resumed.npz", uninterrupted)
