"""Tests of polyak.lightning: SnapshotCallback with real Lightning Trainers on the CPU."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import polyak  # noqa: E402
from polyak.lightning import SnapshotCallback  # noqa: E402
from polyak.snapshots import MANIFEST_NAME, read_manifest, verify  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # Lightning's advice about DataLoader workers and logging intervals on tiny data.
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning 2.6 on torch 2.13 uses a torch pytree API torch has deprecated.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning"),
]

SAMPLES, BATCH = 64, 16  # 4 optimizer steps an epoch


class Classifier(pl.LightningModule):
    """Linear -> BatchNorm1d -> ReLU -> Linear, trained by SGD."""

    def __init__(self, seed: int = 0, fail_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 8),
            torch.nn.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 3),
        )
        self.fail_at_step = fail_at_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at_step:
            raise RuntimeError(f"crash at step {self.global_step}")
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class ExtraStateClassifier(Classifier):
    def get_extra_state(self) -> dict:
        return {"calibrated": True}

    def set_extra_state(self, state: dict) -> None:
        self.extra = state


class Recorder(pl.Callback):
    """The state dict and metrics at the end of every epoch, and after every optimizer step."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps[trainer.global_step] = copy_state(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs[trainer.current_epoch] = copy_state(pl_module)
        self.metrics[trainer.current_epoch] = {
            key: value.item() for key, value in trainer.callback_metrics.items()
        }


class FailAtEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"crash at epoch {self.epoch}")


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for name, value in module.state_dict().items()
    }


def loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 2, generator=generator)
    y = torch.randint(0, 3, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def fit(module: pl.LightningModule, callbacks: list, validate: bool = False, **trainer_args):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(module, loader(), loader(seed=1) if validate else None)
    return trainer


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)


@pytest.fixture(scope="module")
def last_epochs(tmp_path_factory) -> tuple[Path, SnapshotCallback, Recorder]:
    """6 epochs with validation and keep=3: the snapshots of epochs 3, 4, 5."""
    directory = tmp_path_factory.mktemp("run")
    callback, recorder = SnapshotCallback(directory, keep=3), Recorder()
    fit(Classifier(), [callback, recorder], validate=True, max_epochs=6)
    return directory, callback, recorder


def test_default_mode_saves_the_last_keep_epochs(last_epochs) -> None:
    directory, callback, recorder = last_epochs
    expected = ["model_0003.safetensors", "model_0004.safetensors", "model_0005.safetensors"]
    assert names(directory) == sorted([*expected, MANIFEST_NAME])
    snapshots = verify(directory)
    assert [s.name for s in snapshots] == expected
    assert [s.name for s in callback.saved] == expected
    assert [(s.epoch, s.step) for s in snapshots] == [(3, 16), (4, 20), (5, 24)]
    for snapshot in snapshots:
        # The epoch's training and validation metrics, as numbers.
        assert snapshot.logs == pytest.approx(recorder.metrics[snapshot.epoch], rel=0, abs=0)
        assert set(snapshot.logs) == {"train_loss", "val_loss"}
        saved = safetensors_torch.load_file(snapshot.path)
        assert_state_equal(saved, recorder.epochs[snapshot.epoch])
        assert saved["net.1.num_batches_tracked"].item() == snapshot.step


def test_find_checkpoints_orders_the_snapshot_directory(last_epochs) -> None:
    directory, _, _ = last_epochs
    found = polyak.find_checkpoints(directory)
    assert [c.name for c in found] == [s.name for s in read_manifest(directory)][::-1]
    assert [c.path for c in found] == [directory / f"model_{e:04d}.safetensors" for e in (5, 4, 3)]


@pytest.mark.parametrize(
    ("out_name", "scheme", "weights"),
    [
        ("avg.safetensors", "equal", [1 / 3, 1 / 3, 1 / 3]),
        # exp(-i / alpha) for i = 1, 2, 3 (newest first), alpha = 2, normalized
        (
            "avg.pt",
            "exp:2",
            list(np.exp(-np.arange(1, 4) / 2) / np.exp(-np.arange(1, 4) / 2).sum()),
        ),
    ],
)
def test_the_average_loads_strictly_and_matches_a_float64_reference(
    last_epochs, tmp_path: Path, out_name: str, scheme: str, weights: list[float]
) -> None:
    directory, _, recorder = last_epochs
    out = tmp_path / out_name
    polyak.average_to(directory, out, scheme=scheme)
    if out.suffix == ".pt":
        averaged = torch.load(out, weights_only=True)
    else:
        averaged = safetensors_torch.load_file(out)
    module = Classifier(seed=7)
    module.load_state_dict(averaged, strict=True)
    members = [recorder.epochs[epoch] for epoch in (5, 4, 3)]  # newest first
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            stacked = np.stack([member[name].double().numpy() for member in members])
            expected = np.tensordot(np.asarray(weights), stacked, axes=1)
            assert tensor.dtype == torch.float32
            np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-6, atol=1e-7)
        else:  # integer buffers are never averaged: the newest member's
            assert tensor.dtype == torch.int64
            assert tensor.item() == members[0][name].item() == 24


def test_every_epochs_counts_back_from_the_final_epoch(tmp_path: Path) -> None:
    fit(Classifier(), [SnapshotCallback(tmp_path, keep=2, every_epochs=3)], max_epochs=8)
    assert [s.epoch for s in verify(tmp_path)] == [4, 7]


def test_rolling_keeps_the_epochs_that_ran_when_training_stops_early(tmp_path: Path) -> None:
    # The loss never improves by 1e9, so training stops after 1 + patience epochs.
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", min_delta=1e9, patience=3)
    recorder = Recorder()
    callback = SnapshotCallback(tmp_path, keep=3, rolling=True)
    trainer = fit(Classifier(), [callback, stop, recorder], max_epochs=20)
    assert trainer.should_stop
    ran = sorted(recorder.epochs)
    assert ran == [0, 1, 2, 3]
    snapshots = verify(tmp_path)
    assert [s.epoch for s in snapshots] == ran[-3:]
    for snapshot in snapshots:
        assert_state_equal(
            safetensors_torch.load_file(snapshot.path), recorder.epochs[snapshot.epoch]
        )


def test_rolling_saves_every_epochs_and_keeps_the_most_recent(tmp_path: Path) -> None:
    callback = SnapshotCallback(tmp_path, keep=2, rolling=True, every_epochs=2)
    fit(Classifier(), [callback], max_epochs=7)
    assert [s.epoch for s in callback.saved] == [1, 3, 5]
    assert [s.name for s in verify(tmp_path)] == [
        "model_0003.safetensors",
        "model_0005.safetensors",
    ]


def test_default_mode_warns_when_training_stops_before_the_last_epochs(tmp_path: Path) -> None:
    stop = pl.callbacks.EarlyStopping(monitor="train_loss", min_delta=1e9, patience=0)
    with pytest.warns(RuntimeWarning, match=r"stopped after epoch 1, before the last epoch 19"):
        fit(Classifier(), [SnapshotCallback(tmp_path, keep=3), stop], max_epochs=20)
    assert read_manifest(tmp_path) is None


def test_every_steps_saves_by_global_step(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = SnapshotCallback(tmp_path, keep=2, every_steps=5)
    fit(Classifier(), [callback, recorder], max_epochs=3)  # 12 steps: 5 and 10 saved
    snapshots = verify(tmp_path)
    assert [s.name for s in snapshots] == [
        "model_step00000005.safetensors",
        "model_step00000010.safetensors",
    ]
    assert [(s.epoch, s.step) for s in snapshots] == [(1, 5), (2, 10)]
    for snapshot in snapshots:
        assert_state_equal(
            safetensors_torch.load_file(snapshot.path), recorder.steps[snapshot.step]
        )
    assert [c.step for c in polyak.find_checkpoints(tmp_path)] == [10, 5]


def test_every_steps_saves_each_step_once_with_gradient_accumulation(tmp_path: Path) -> None:
    callback = SnapshotCallback(tmp_path, keep=5, every_steps=2)
    # 4 batches an epoch, 2 per optimizer step: 6 steps in 3 epochs, two batches each.
    fit(Classifier(), [callback], max_epochs=3, accumulate_grad_batches=2)
    assert [s.step for s in callback.saved] == [2, 4, 6]
    assert [s.step for s in verify(tmp_path)] == [2, 4, 6]


def test_pt_format_saves_with_torch_save(tmp_path: Path) -> None:
    recorder = Recorder()
    callback = SnapshotCallback(tmp_path, keep=2, format="pt", prefix="net")
    fit(ExtraStateClassifier(), [callback, recorder], max_epochs=3)
    snapshots = verify(tmp_path)
    assert [s.name for s in snapshots] == ["net_0001.pt", "net_0002.pt"]
    for snapshot in snapshots:
        loaded = torch.load(snapshot.path, weights_only=True)
        assert loaded["_extra_state"] == {"calibrated": True}
        tensors = {k: v for k, v in loaded.items() if k != "_extra_state"}
        expected = {k: v for k, v in recorder.epochs[snapshot.epoch].items() if k != "_extra_state"}
        assert_state_equal(tensors, expected)
    out = tmp_path.parent / f"{tmp_path.name}-avg.pt"
    polyak.average_to(tmp_path, out)
    restored = ExtraStateClassifier(seed=7)
    restored.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert restored.extra == {"calibrated": True}


def test_a_state_dict_safetensors_cannot_hold_is_refused_before_training(tmp_path: Path) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match=r"entry '_extra_state' is a dict.*format='pt'"):
        fit(ExtraStateClassifier(), [SnapshotCallback(tmp_path / "run"), recorder], max_epochs=2)
    assert recorder.steps == {}
    assert not (tmp_path / "run").exists()


class BuiltInConfigureModel(Classifier):
    """Builds its layers in configure_model(), after the setup hooks ran."""

    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))


def test_a_model_built_in_configure_model_is_checked_once_built(tmp_path: Path) -> None:
    callback = SnapshotCallback(tmp_path, keep=2)
    fit(BuiltInConfigureModel(), [callback], max_epochs=2)
    assert [s.epoch for s in verify(tmp_path)] == [0, 1]
    assert set(safetensors_torch.load_file(callback.saved[-1].path)) == {
        "net.0.weight",
        "net.0.bias",
        "net.1.weight",
        "net.1.bias",
        "net.1.running_mean",
        "net.1.running_var",
        "net.1.num_batches_tracked",
    }


@pytest.mark.parametrize("where", ["callback", "training_step"])
def test_a_crash_during_training_leaves_only_committed_snapshots(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "model_9999.safetensors").write_bytes(b"a stray file, not a snapshot")
    callbacks = [SnapshotCallback(tmp_path, keep=3, rolling=True)]
    if where == "callback":
        module = Classifier()
        callbacks.append(FailAtEpoch(5))  # after epoch 5 is saved
        message, expected = "crash at epoch 5", [3, 4, 5]
    else:
        module = Classifier(fail_at_step=22)  # in epoch 5, after epoch 4 is saved
        message, expected = "crash at step 22", [2, 3, 4]
    with pytest.raises(RuntimeError, match=message):
        fit(module, callbacks, max_epochs=10)
    snapshots = verify(tmp_path)
    assert [s.epoch for s in snapshots] == expected
    assert hidden(tmp_path) == []
    found = polyak.find_checkpoints(tmp_path)
    assert [c.path for c in found] == [s.path for s in snapshots][::-1]


def test_only_global_rank_zero_saves(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda trainer: False))
    callback = SnapshotCallback(tmp_path / "run", keep=2, rolling=True)
    fit(Classifier(), [callback], max_epochs=2)
    assert callback.saved == []
    assert not (tmp_path / "run").exists()


def test_fast_dev_run_saves_nothing(tmp_path: Path) -> None:
    callback = SnapshotCallback(tmp_path / "run", keep=2, rolling=True)
    fit(Classifier(), [callback], fast_dev_run=True)
    assert callback.saved == []
    assert not (tmp_path / "run").exists()


def test_default_mode_needs_a_number_of_epochs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"received trainer.max_epochs=-1.*rolling=True"):
        fit(Classifier(), [SnapshotCallback(tmp_path / "run")], max_epochs=-1, max_steps=8)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": 0}, r"keep must be a whole number >= 1; received 0"),
        ({"keep": 2.5}, r"keep must be a whole number"),
        ({"every_epochs": 0}, r"every_epochs must be a whole number >= 1; received 0"),
        ({"every_steps": 0}, r"every_steps must be a whole number >= 1 or None; received 0"),
        ({"every_steps": 10, "every_epochs": 2}, r"every_steps or every_epochs, not both"),
        ({"format": "ckpt"}, r"format must be one of 'safetensors', 'pt'; received 'ckpt'"),
        ({"prefix": ""}, r"prefix must be a non-empty"),
        ({"prefix": "a/b"}, r"prefix must be .*received 'a/b'"),
        ({"rolling": "yes"}, r"rolling must be True or False; received 'yes'"),
        ({"directory": None}, r"directory must be a path; received None"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict, message: str) -> None:
    directory = arguments.pop("directory", tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        SnapshotCallback(directory, **arguments)
    assert names(tmp_path) == []


def test_the_callback_keeps_its_arguments_as_one_checked_options_record(tmp_path: Path) -> None:
    from polyak.posthoc import DEFAULT_PROFILE_KEEP
    from polyak.snapshots import SnapshotOptions
    from polyak.torch.saving import SUFFIXES

    callback = SnapshotCallback(str(tmp_path), keep=np.int64(4), rolling=True, posthoc=(0.1,))
    assert callback.options == SnapshotOptions(
        directory=tmp_path,
        formats=SUFFIXES,
        format="safetensors",
        keep=4,
        rolling=True,
        posthoc=(0.1,),
        posthoc_keep=DEFAULT_PROFILE_KEEP,
    )
    assert callback.schedule is callback.options.schedule
    assert (callback.directory, callback.keep, callback.posthoc) == (tmp_path, 4, (0.1,))
    assert (callback.rolling, callback.every_epochs, callback.every_steps) == (True, 1, None)
    with pytest.raises(AttributeError):
        callback.rolling = False


def run_python(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_without_lightning_the_error_names_the_extra() -> None:
    completed = run_python(
        """
        import sys
        sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # not installed
        from polyak.errors import MissingDependencyError
        try:
            import polyak.lightning
        except MissingDependencyError as error:
            print(error)
        """
    )
    assert completed.returncode == 0, completed.stderr
    assert "pip install 'polyak[lightning]'" in completed.stdout


@pytest.mark.slow
def test_pytorch_lightning_alone_is_used_when_lightning_is_missing(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    completed = run_python(
        f"""
        import sys
        sys.modules["lightning"] = None  # only pytorch_lightning installed
        import torch, pytorch_lightning
        from polyak.lightning import SnapshotCallback
        from polyak.snapshots import verify
        assert issubclass(SnapshotCallback, pytorch_lightning.Callback)

        class Module(pytorch_lightning.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Linear(2, 1)
            def training_step(self, batch, batch_idx):
                return self.net(batch[0]).square().mean()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.TensorDataset(torch.randn(8, 2))
        trainer = pytorch_lightning.Trainer(
            max_epochs=3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            callbacks=[SnapshotCallback({str(tmp_path)!r}, keep=2)],
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
        print([s.epoch for s in verify({str(tmp_path)!r})])
        assert "lightning.pytorch" not in sys.modules
        """
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[1, 2]"


# ---------------------------------------------------------------- post-hoc EMA profiles


def test_posthoc_profiles_are_saved_every_posthoc_every_steps_and_with_each_snapshot(
    tmp_path: Path, float64_power_ema
) -> None:
    from polyak.posthoc import profile_directory

    recorder = Recorder()
    callback = SnapshotCallback(
        tmp_path, keep=5, every_steps=5, posthoc=(0.05, 0.1), posthoc_every=3, posthoc_keep=4
    )
    fit(Classifier(), [callback, recorder], max_epochs=3)  # 12 steps
    assert [s.step for s in verify(tmp_path)] == [5, 10]
    for width in (0.05, 0.1):
        # Every 3 steps (3, 6, 9, 12) and with the snapshots (5, 10); the newest 4 kept.
        snapshots = verify(profile_directory(tmp_path, width))
        assert [s.step for s in snapshots] == [6, 9, 10, 12]
        assert snapshots[-1].name == "model_step00000012.safetensors"
        saved = safetensors_torch.load_file(snapshots[-1].path)
        reference = float64_power_ema([recorder.steps[s] for s in range(1, 13)], width)
        assert sorted(saved) == sorted(reference)
        for name, expected in reference.items():
            if expected.is_floating_point():
                torch.testing.assert_close(saved[name].double(), expected, rtol=1e-5, atol=1e-6)
            else:  # integer buffers: the raw model's
                assert saved[name].item() == 12
    assert callback.state_dict()["saved_step"] == 12


def test_each_snapshot_callback_keeps_its_own_state_in_the_checkpoint(tmp_path: Path) -> None:
    tracking = SnapshotCallback(tmp_path / "a", keep=2, rolling=True, posthoc=(0.05, 0.1))
    plain = SnapshotCallback(tmp_path / "b", keep=2, rolling=True)
    assert tracking.state_key != plain.state_key
    trainer = fit(Classifier(), [tracking, plain], max_epochs=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert plain.state_key not in states  # nothing to save without posthoc
    profiles = states[tracking.state_key]["profiles"]
    assert sorted(profiles) == ["0.05", "0.1"]
    assert profiles["0.1"]["progress"]["last_step"] == 8


def test_the_lightning_adapter_has_the_file_names_of_the_keras_and_torch_adapters() -> None:
    import polyak.lightning.online
    import polyak.lightning.snapshots

    assert SnapshotCallback is polyak.lightning.snapshots.SnapshotCallback
    assert polyak.lightning.OnlineAverageCallback is polyak.lightning.online.OnlineAverageCallback
    package = Path(polyak.__file__).parent
    for adapter in ("keras", "torch", "lightning"):
        assert {"snapshots.py", "online.py"} <= {p.name for p in (package / adapter).iterdir()}
