"""Post-hoc EMA end to end: profiles tracked by the snapshot helpers in real training runs.

Each helper (SnapshotSaver, the Lightning SnapshotCallback, the Keras
SnapshotCheckpoint) tracks the power EMA profiles 0.05 and 0.10 while a small model
trains; the EMA of another width reconstructed from their snapshots must agree with an
EMA of that width tracked directly during the same run, within a small fraction of how
much the two saved profiles differ; resumed runs must continue the profiles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import polyak  # noqa: E402
from polyak.cli.main import main  # noqa: E402
from polyak.errors import SchemeError  # noqa: E402
from polyak.posthoc import find_profile_snapshots, profile_directory, reconstruct  # noqa: E402
from polyak.snapshots import read_manifest, verify  # noqa: E402
from polyak.torch import OnlineAverage, SnapshotSaver  # noqa: E402

SAVED = (0.05, 0.10)
STEPS, EVERY = 300, 15  # 20 EMA snapshots of each profile
# The reconstruction errs by 3e-4 to 6e-4 of the spread between the two saved profiles
# here (under 1e-3 in the simulated runs of test_posthoc.py).
TOLERANCE = 2e-3

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    # Loading a .weights.h5 file into a model whose optimizer is not built yet.
    pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer"),
]


NET_SOURCE = """
import torch

def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )
"""
namespace: dict = {}
exec(NET_SOURCE, namespace)  # the same factory the command line imports
build = namespace["build"]


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 4, generator=generator)
    return x, (x @ torch.randn(4, 3, generator=generator)).argmax(1)


X, Y = data()


def train(model, optimizer, steps: range, callback) -> None:
    """SGD steps on batches that depend only on the step, so that runs can resume."""
    for step in steps:
        batch = torch.randint(0, 512, (32,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.cross_entropy(model(X[batch]), Y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        callback(step)


def floating(state) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(value, dtype=np.float64)
        for name, value in state.items()
        if np.issubdtype(np.asarray(value).dtype, np.floating)
    }


def relative_error(reconstructed, tracked, saved_a, saved_b) -> float:
    """max |reconstructed - tracked| over the model, over max |saved_a - saved_b|."""
    reconstructed, tracked = floating(reconstructed), floating(tracked)
    saved_a, saved_b = floating(saved_a), floating(saved_b)
    assert sorted(reconstructed) == sorted(tracked)
    spread = max(np.abs(saved_a[name] - saved_b[name]).max() for name in saved_a)
    assert spread > 1e-3
    return max(np.abs(reconstructed[name] - tracked[name]).max() for name in tracked) / spread


def numpy_state(average: OnlineAverage) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in average.averaged_state_dict().items()}


# ---------------------------------------------------------------- PyTorch: SnapshotSaver


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> dict:
    """300 steps saving every 15, profiles 0.05 and 0.10, a directly tracked 0.08 beside."""
    root = tmp_path_factory.mktemp("posthoc-torch")
    directory = root / "run"
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    saver = SnapshotSaver(directory, keep=5, posthoc=SAVED)
    tracked = {s: OnlineAverage(model, sigma_rel=s) for s in (0.05, 0.08, 0.10)}
    states = []

    def after_step(step: int) -> None:
        saver.track(model, step)
        for average in tracked.values():
            average.update(step)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if step % EVERY == 0:
            saver.save(model, step=step)

    train(model, optimizer, range(1, STEPS + 1), after_step)
    x_test, y_test = data(seed=2)
    np.savez(root / "test.npz", x=x_test.numpy(), y=y_test.numpy())
    (root / "polyak_posthoc_net.py").write_text(NET_SOURCE)
    return {"root": root, "dir": directory, "tracked": tracked, "states": states}


def test_the_saver_commits_every_profile_with_each_snapshot(torch_run, float64_power_ema) -> None:
    directory = torch_run["dir"]
    assert [s.step for s in verify(directory)] == [240, 255, 270, 285, 300]  # keep=5
    snapshots = find_profile_snapshots(directory)
    for width in SAVED:
        steps = [s.step for s in snapshots if s.sigma_rel == width]
        assert steps == list(range(EVERY, STEPS + 1, EVERY))  # all 20 kept
        assert (profile_directory(directory, width) / "model_step00000300.safetensors").is_file()
    # The saved EMA is the power EMA of the weights after every step (float64 reference).
    saved = safetensors_torch.load_file(
        profile_directory(directory, 0.05) / "model_step00000300.safetensors"
    )
    reference = float64_power_ema(torch_run["states"], 0.05)
    assert sorted(saved) == sorted(reference)
    for name, expected in reference.items():
        if expected.is_floating_point():
            assert saved[name].dtype == torch.float32
            torch.testing.assert_close(saved[name].double(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(saved[name], expected) and expected.item() == STEPS


@pytest.mark.parametrize("width", [0.06, 0.08])
def test_the_reconstruction_matches_a_directly_tracked_ema(
    torch_run, width, float64_power_ema
) -> None:
    tracked = torch_run["tracked"]
    if width not in tracked:
        tracked_state = float64_power_ema(torch_run["states"], width)
        tracked_state = {k: v.numpy() for k, v in tracked_state.items()}
    else:
        tracked_state = numpy_state(tracked[width])
    tensors, result = reconstruct(torch_run["dir"], width)
    assert result.time == STEPS and len(result.snapshots) == 40
    error = relative_error(
        tensors, tracked_state, numpy_state(tracked[0.05]), numpy_state(tracked[0.10])
    )
    assert error < TOLERANCE
    assert tensors["1.num_batches_tracked"] == STEPS


def run_cli(arguments: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_polyak_posthoc_writes_a_model_that_loads_strictly(torch_run, tmp_path, capsys) -> None:
    code, _, err = run_cli(
        ["posthoc", str(torch_run["dir"]), "--sigma-rel", "0.08", "-o", str(tmp_path)], capsys
    )
    assert code == 0, err
    model = build()
    written = safetensors_torch.load_file(tmp_path / "posthoc-0.08.safetensors")
    model.load_state_dict(written, strict=True)
    tensors, _ = reconstruct(torch_run["dir"], 0.08)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), tensors[name])


def test_polyak_sweep_evaluates_the_posthoc_candidates(
    torch_run, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.syspath_prepend(str(torch_run["root"]))
    test = torch_run["root"] / "test.npz"
    arguments = [
        "sweep", str(torch_run["dir"]), "--model", "polyak_posthoc_net:build", "--data",
        str(test), "--schemes", "equal", "--posthoc", "0.06,0.08", "--print-json",
    ]  # fmt: skip
    code, out, err = run_cli(arguments, capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["schemes"] == ["equal", "posthoc:0.06", "posthoc:0.08"]
    with np.load(test) as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    for width in (0.06, 0.08):
        (candidate,) = [c for c in report["candidates"] if c["scheme"] == f"posthoc:{width}"]
        assert candidate["n"] == 40 and sum(candidate["weights"]) == pytest.approx(1.0)
        tensors, _ = reconstruct(torch_run["dir"], width)
        model = build()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
        with torch.no_grad():
            accuracy = (model.eval()(x).argmax(1) == y).double().mean().item()
        assert candidate["metric"] == pytest.approx(accuracy, abs=1e-9)


def test_a_resumed_saver_continues_the_profiles_exactly(torch_run, tmp_path) -> None:
    """150 steps, a checkpoint with the saver's state, a new process's 150: the same files."""
    directory = tmp_path / "run"
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    saver = SnapshotSaver(directory, keep=5, posthoc=SAVED)

    def after_step(step: int) -> None:
        saver.track(model, step)
        if step % EVERY == 0:
            saver.save(model, step=step)

    train(model, optimizer, range(1, 151), after_step)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
         "saver": saver.state_dict()},
        checkpoint,
    )  # fmt: skip
    del model, optimizer, saver

    state = torch.load(checkpoint, weights_only=True)
    model = build()
    model.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer.load_state_dict(state["optimizer"])
    saver = SnapshotSaver(directory, keep=5, posthoc=SAVED)
    saver.load_state_dict(state["saver"])
    train(model, optimizer, range(151, STEPS + 1), after_step)

    for width in SAVED:
        resumed = {s.step: s.path for s in verify(profile_directory(directory, width))}
        uninterrupted = {s.step: s.path for s in verify(profile_directory(torch_run["dir"], width))}
        assert sorted(resumed) == sorted(uninterrupted)
        for step in (165, 300):
            torch.testing.assert_close(
                safetensors_torch.load_file(resumed[step]),
                safetensors_torch.load_file(uninterrupted[step]),
                rtol=1e-6,
                atol=1e-7,
            )


def test_posthoc_every_commits_the_profiles_between_saves(tmp_path) -> None:
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    saver = SnapshotSaver(tmp_path, keep=2, posthoc=(0.05, 0.1), posthoc_every=4, posthoc_keep=3)

    def after_step(step: int) -> None:
        saver.track(model, step)
        if step in (6, 8):
            saver.save(model, step=step)

    train(model, optimizer, range(1, 11), after_step)
    for width in (0.05, 0.1):
        # Every 4 steps (4, 8) and with each save (6, 8 once); the newest 3 kept.
        assert [s.step for s in verify(profile_directory(tmp_path, width))] == [4, 6, 8]


def test_the_saver_refuses_what_would_give_wrong_profiles(tmp_path) -> None:
    model = build()
    saver = SnapshotSaver(tmp_path / "run", posthoc=SAVED)
    with pytest.raises(ValueError, match=r"profiles have not been updated yet.*track\(model"):
        saver.save(model, step=10)
    assert not (tmp_path / "run" / "posthoc").exists()
    assert read_manifest(tmp_path / "run") is None  # nothing written
    with pytest.raises(ValueError, match=r"step must be a whole number >= 1.*received 0"):
        saver.track(model, 0)
    for step in (1, 2, 3):
        saver.track(model, step)
    with pytest.raises(
        ValueError, match=r"at step 4, but the profiles were last updated at step 3"
    ):
        saver.save(model, step=4)
    with pytest.raises(ValueError, match=r"needs step=\.\.\.; received step=None and epoch=3"):
        saver.save(model, epoch=3)
    with pytest.raises(ValueError, match=r"tracks the EMA profiles of one model"):
        saver.track(build(), 4)
    saver.save(model, step=3)
    # A new run into the same directory, without the saved state, would mix two runs.
    fresh = SnapshotSaver(tmp_path / "run", posthoc=SAVED)
    with pytest.raises(ValueError, match=r"sigma-0.05 already holds 1 EMA snapshot\(s\).*afresh"):
        fresh.track(model, 1)
    with pytest.raises(ValueError, match=r"holds the widths \['0.05', '0.1'\].*posthoc=\(0.05,\)"):
        SnapshotSaver(tmp_path / "other", posthoc=(0.05,)).load_state_dict(saver.state_dict())
    # Without posthoc, track is free and nothing is tracked.
    plain = SnapshotSaver(tmp_path / "plain")
    plain.track(model, 1)
    plain.save(model, epoch=0)
    assert not (tmp_path / "plain" / "posthoc").exists()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"posthoc": 0.05}, ValueError, r"posthoc takes the widths .* received 0.05"),
        ({"posthoc": (0.05, 0.5)}, SchemeError, r"sigma_rel must be a number in \(0, 0\.2887\)"),
        ({"posthoc": (0.1, 0.10)}, ValueError, r"posthoc widths must differ"),
        ({"posthoc_keep": 0}, ValueError, r"posthoc_keep must be a whole number >= 1; received 0"),
        ({"posthoc_every": 0}, ValueError, r"posthoc_every must be .* or None; received 0"),
    ],
)
def test_bad_posthoc_arguments_are_refused(tmp_path, arguments, error, message) -> None:
    with pytest.raises(error, match=message):
        SnapshotSaver(tmp_path, **arguments)


# ---------------------------------------------------------------- Lightning: SnapshotCallback


def lightning_fit(directory: Path, checkpoints: Path, epochs: int, ckpt_path=None):
    pl = pytest.importorskip("lightning.pytorch")
    from polyak.lightning import SnapshotCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    snapshots = SnapshotCallback(directory, keep=2, rolling=True, posthoc=SAVED)
    checkpoint = pl.callbacks.ModelCheckpoint(checkpoints, save_top_k=-1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[snapshots, checkpoint], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:256], Y[:256]), 32)
    trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    return snapshots


def test_lightning_profiles_resume_from_the_checkpoint(tmp_path) -> None:
    """6 epochs of 8 steps straight, and 3 + 3 resumed from a .ckpt: the same profiles."""
    straight = tmp_path / "straight"
    lightning_fit(straight, tmp_path / "ckpt-straight", epochs=6)
    resumed = tmp_path / "resumed"
    first = lightning_fit(resumed, tmp_path / "ckpt", epochs=3)
    saved = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)
    assert saved["callbacks"][first.state_key]["saved_step"] == 24
    lightning_fit(resumed, tmp_path / "ckpt", epochs=6, ckpt_path=tmp_path / "ckpt/epoch=2.ckpt")
    for width in SAVED:
        expected = {s.step: s.path for s in verify(profile_directory(straight, width))}
        got = {s.step: s.path for s in verify(profile_directory(resumed, width))}
        assert sorted(got) == sorted(expected) == list(range(8, 49, 8))  # every epoch end
        for step in (32, 48):
            torch.testing.assert_close(
                safetensors_torch.load_file(got[step]),
                safetensors_torch.load_file(expected[step]),
                rtol=1e-6,
                atol=1e-7,
            )
    # A new run into that directory, without the state, is refused before training.
    with pytest.raises(ValueError, match=r"already holds 6 EMA snapshot\(s\) \(steps 8 to 48\)"):
        lightning_fit(resumed, tmp_path / "ckpt-new", epochs=1)


# ---------------------------------------------------------------- Keras: SnapshotCheckpoint


def keras_model():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


KERAS_X, KERAS_Y = X[:320].numpy(), Y[:320].numpy()  # 10 steps an epoch at batch size 32


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory) -> dict:
    """20 epochs (200 steps), profiles saved at every epoch end, 0.08 tracked beside."""
    keras = pytest.importorskip("keras")
    from polyak.keras import OnlineAverage as KerasOnlineAverage
    from polyak.keras import SnapshotCheckpoint

    directory = tmp_path_factory.mktemp("posthoc-keras") / "run"
    model = keras_model()
    checkpoint = SnapshotCheckpoint(directory, keep=3, rolling=True, posthoc=SAVED)
    tracked = {s: KerasOnlineAverage(sigma_rel=s) for s in (0.05, 0.08, 0.10)}
    model.fit(KERAS_X, KERAS_Y, batch_size=32, epochs=20, shuffle=False, verbose=0,
              callbacks=[checkpoint, *tracked.values()])  # fmt: skip
    averaged = {}
    for width, average in tracked.items():
        with average.swapped():
            averaged[width] = [keras.ops.convert_to_numpy(v).copy() for v in model.weights]
    return {"dir": directory, "model": model, "averaged": averaged}


def test_keras_reconstruction_matches_a_directly_tracked_ema(keras_run, tmp_path) -> None:
    directory = keras_run["dir"]
    snapshots = find_profile_snapshots(directory)
    assert [s.step for s in snapshots if s.sigma_rel == 0.05] == list(range(10, 201, 10))
    assert [s.name for s in verify(directory)] == [
        "model_0017.weights.h5", "model_0018.weights.h5", "model_0019.weights.h5",
    ]  # fmt: skip
    polyak.posthoc.reconstruct_to(directory, 0.08, tmp_path / "posthoc.weights.h5")
    model = keras_model()
    model.load_weights(str(tmp_path / "posthoc.weights.h5"))
    reconstructed = {str(i): np.asarray(v) for i, v in enumerate(model.weights)}
    averaged = {w: {str(i): v for i, v in enumerate(s)} for w, s in keras_run["averaged"].items()}
    error = relative_error(reconstructed, averaged[0.08], averaged[0.05], averaged[0.10])
    assert error < TOLERANCE
    # The last profile snapshot is the tracked profile itself.
    with polyak.open_checkpoint(
        profile_directory(directory, 0.10) / "model_step00000200.weights.h5"
    ) as reader:
        saved = [np.asarray(reader.read(name)) for name in reader.names()]
    assert sum(a.size for a in saved) == sum(a.size for a in keras_run["averaged"][0.10])


def test_a_resumed_keras_run_continues_the_profiles_from_their_snapshots(keras_run, tmp_path):
    keras = pytest.importorskip("keras")
    from polyak.keras import SnapshotCheckpoint

    directory = tmp_path / "run"
    model = keras_model()
    first = SnapshotCheckpoint(directory, keep=3, rolling=True, posthoc=SAVED)
    model.fit(KERAS_X, KERAS_Y, batch_size=32, epochs=10, shuffle=False, verbose=0,
              callbacks=[first])  # fmt: skip
    model.save(tmp_path / "raw.keras")  # the raw weights and the optimizer, at step 100
    model = keras.models.load_model(tmp_path / "raw.keras")
    checkpoint = SnapshotCheckpoint(directory, keep=3, rolling=True, posthoc=SAVED)
    model.fit(KERAS_X, KERAS_Y, batch_size=32, epochs=20, initial_epoch=10, shuffle=False,
              verbose=0, callbacks=[checkpoint])  # fmt: skip
    for width in SAVED:
        got = {s.step: s.path for s in verify(profile_directory(directory, width))}
        expected = {s.step: s.path for s in verify(profile_directory(keras_run["dir"], width))}
        assert sorted(got) == sorted(expected)
        for step in (110, 200):
            with (
                polyak.open_checkpoint(got[step]) as a,
                polyak.open_checkpoint(expected[step]) as b,
            ):
                assert a.names() == b.names()
                for name in a.names():
                    np.testing.assert_allclose(a.read(name), b.read(name), rtol=1e-5, atol=1e-6)
    # Reading the profiles' snapshots leaves the model and its optimizer as they were.
    model = keras.models.load_model(tmp_path / "raw.keras")
    for variable in model.optimizer.variables[2:]:  # the momenta
        variable.assign(keras.ops.full(variable.shape, 7.0))
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.weights]
    checkpoint = SnapshotCheckpoint(directory, keep=3, rolling=True, posthoc=SAVED)
    checkpoint.set_model(model)
    checkpoint.set_params({"epochs": 1})
    checkpoint.on_train_begin()
    assert checkpoint._profiles.saved_step == 100  # continued from the step-100 snapshots
    for variable in model.optimizer.variables[2:]:
        assert np.all(keras.ops.convert_to_numpy(variable) == 7.0)
    for variable, value in zip(model.weights, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    # Resuming at a step the profiles were not saved at is refused, naming the fix.
    model = keras.models.load_model(tmp_path / "raw.keras")
    model.optimizer.iterations.assign(105)
    with pytest.raises(ValueError, match=r"holds EMA snapshots .* but none of step 105"):
        checkpoint = SnapshotCheckpoint(directory, rolling=True, posthoc=SAVED)
        model.fit(KERAS_X, KERAS_Y, batch_size=32, epochs=1, verbose=0, callbacks=[checkpoint])
    # So is a new run (step 0) into the directory: it would mix two runs' profiles.
    with pytest.raises(ValueError, match=r"but none of step 0, where this run starts afresh"):
        checkpoint = SnapshotCheckpoint(directory, rolling=True, posthoc=SAVED)
        keras_model().fit(KERAS_X, KERAS_Y, epochs=1, verbose=0, callbacks=[checkpoint])
