"""Tests of polyak.lightning.OnlineAverageCallback with real Lightning Trainers on the CPU.

Expected averages come from the raw weights recorded after every optimizer step and
the schedules' formulas in float64, never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from polyak.errors import SchemeError  # noqa: E402
from polyak.lightning import OnlineAverageCallback  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning"),
    # Resuming without the run's ModelCheckpoint, on purpose.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]

SAMPLES, BATCH = 64, 16  # 4 optimizer steps an epoch
HALF_LIFE = 3.0


class Classifier(pl.LightningModule):
    """Linear -> BatchNorm1d -> ReLU -> Linear, trained by SGD with momentum."""

    def __init__(self, seed: int = 0, fail_validation_at_epoch: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 8),
            torch.nn.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 3),
        )
        self.fail_validation_at_epoch = fail_validation_at_epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if self.current_epoch == self.fail_validation_at_epoch and not self.trainer.sanity_checking:
            raise RuntimeError(f"validation fails in epoch {self.current_epoch}")
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


class Recorder(pl.Callback):
    """The raw state after every optimizer step, and each validation's val_loss (not sanity)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.val_loss: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The first batch end of a step follows its optimizer step; with gradient
        # accumulation the next batches' forward passes move BatchNorm's statistics.
        if trainer.global_step not in self.steps:
            self.steps[trainer.global_step] = copy_state(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.val_loss[trainer.global_step] = trainer.callback_metrics["val_loss"].item()


class SaveDuringValidation(pl.Callback):
    """Saves a weights-only checkpoint from inside validation, while the average is in."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.seen.append(copy_state(pl_module.net))  # what the model holds: the average
        path = self.directory / f"inside-{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path, weights_only=True)


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def loader(seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, 2, generator=generator)
    y = torch.randint(0, 3, (SAMPLES,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def trainer_for(callbacks: list, checkpointing: bool = False, **arguments) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **arguments,
    )


def ema_reference(steps: dict[int, dict[str, torch.Tensor]], until: int) -> dict:
    """The EMA of half-life HALF_LIFE updated at every step 1..until, in float64.

    Floating tensors (BatchNorm statistics included) are averaged; integer buffers
    are the raw model's at ``until``.
    """
    decay = 0.5 ** (1 / HALF_LIFE)
    average = {}
    for step in range(1, until + 1):
        for name, value in steps[step].items():
            if not value.is_floating_point():
                average[name] = value.clone()
            elif step == 1:
                average[name] = value.double()
            else:
                average[name] = decay * average[name] + (1 - decay) * value.double()
    return average


def loss_with(state: dict[str, torch.Tensor], data: DataLoader) -> float:
    module = Classifier(seed=9)
    module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in state.items()})
    module.eval()
    losses = [
        torch.nn.functional.cross_entropy(module.net(x), y, reduction="sum").item() for x, y in data
    ]
    return sum(losses) / SAMPLES


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)


def assert_close_to_reference(actual: dict, reference: dict) -> None:
    assert sorted(actual) == sorted(reference)
    for name, expected in reference.items():
        if expected.is_floating_point():
            torch.testing.assert_close(actual[name].double(), expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(actual[name], expected), name


def strip(state: dict[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    return {name.removeprefix(prefix): value for name, value in state.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """5 epochs (20 steps) with validation, an EMA callback and ModelCheckpoint every epoch."""
    directory = tmp_path_factory.mktemp("online")
    average, recorder = OnlineAverageCallback(half_life=HALF_LIFE), Recorder()
    inside = SaveDuringValidation(directory)
    checkpoints = pl.callbacks.ModelCheckpoint(
        directory, monitor="val_loss", save_top_k=-1, filename="{epoch}-{step}"
    )
    module = Classifier()
    trainer = trainer_for([checkpoints, average, recorder, inside], True, max_epochs=5)
    trainer.fit(module, loader(), loader(seed=1))
    return {
        "directory": directory,
        "average": average,
        "recorder": recorder,
        "inside": inside,
        "module": module,
        "trainer": trainer,
    }


def test_validation_in_fit_sees_the_average_and_fit_ends_with_the_raw_weights(run) -> None:
    recorder, average, module = run["recorder"], run["average"], run["module"]
    assert sorted(recorder.val_loss) == [4, 8, 12, 16, 20]
    for step, logged in recorder.val_loss.items():
        expected = loss_with(ema_reference(recorder.steps, step), loader(seed=1))
        raw = loss_with(recorder.steps[step], loader(seed=1))
        assert logged == pytest.approx(expected, rel=1e-5)
        assert abs(logged - raw) > 1e-3 * raw  # the average's loss, not the raw model's
    assert_state_equal(copy_state(module), recorder.steps[20])
    assert not average.is_swapped and average.average.updates == 20
    assert_close_to_reference(
        average.average.averaged_state_dict(), ema_reference(recorder.steps, 20)
    )
    # The model inside validation held the average...
    assert_close_to_reference(run["inside"].seen[0], strip(ema_reference(recorder.steps, 4)))


def test_checkpoints_saved_in_validation_hold_the_raw_weights_and_the_average(run) -> None:
    directory, recorder, average = run["directory"], run["recorder"], run["average"]
    for step in (4, 12):
        epoch = step // 4 - 1
        # ModelCheckpoint at validation end, after the average was swapped out...
        checkpoint = torch.load(directory / f"epoch={epoch}-step={step}.ckpt", weights_only=True)
        assert_state_equal(checkpoint["state_dict"], recorder.steps[step])
        state = checkpoint["callbacks"][average.state_key]
        assert state["progress"]["last_step"] == step
        assert_close_to_reference(
            {**state["average"], "net.1.num_batches_tracked": torch.tensor(step)},
            ema_reference(recorder.steps, step),
        )
        # ... and a weights-only checkpoint saved while it was in: the raw weights too.
        inside = torch.load(directory / f"inside-{step}.ckpt", weights_only=True)
        assert_state_equal(inside["state_dict"], recorder.steps[step])
        assert "callbacks" not in inside
    # The hook that kept them raw is gone with the swap.
    assert not run["module"]._state_dict_hooks


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(run, tmp_path: Path) -> None:
    directory, recorder = run["directory"], run["recorder"]
    average = OnlineAverageCallback(half_life=HALF_LIFE)
    resumed_recorder = Recorder()
    module = Classifier(seed=5)  # other weights: the checkpoint's raw ones replace them
    trainer = trainer_for([average, resumed_recorder], max_epochs=5)
    trainer.fit(module, loader(), loader(seed=1), ckpt_path=directory / "epoch=1-step=8.ckpt")
    assert sorted(resumed_recorder.steps) == list(range(9, 21))
    # Training went on from the raw weights of step 8: the same weights at every step.
    for step in range(9, 21):
        torch.testing.assert_close(resumed_recorder.steps[step], recorder.steps[step])
    assert average.average.updates == 20
    expected = run["average"].average.averaged_state_dict()
    torch.testing.assert_close(average.average.averaged_state_dict(), expected)
    assert resumed_recorder.val_loss == pytest.approx(
        {s: v for s, v in recorder.val_loss.items() if s > 8}, rel=1e-6
    )


def test_export_validate_test_and_predict_use_the_average(run, tmp_path: Path) -> None:
    average, recorder, module = run["average"], run["recorder"], run["module"]
    exported = average.export(tmp_path / "averaged.safetensors")
    restored = Classifier(seed=3)
    restored.load_state_dict(safetensors_torch.load_file(exported), strict=True)
    assert_close_to_reference(copy_state(restored), ema_reference(recorder.steps, 20))
    expected = loss_with(ema_reference(recorder.steps, 20), loader(seed=1))

    trainer = run["trainer"]
    (tested,) = trainer.test(module, loader(seed=1), verbose=False)
    assert tested["test_loss"] == pytest.approx(expected, rel=1e-5)
    predictions = torch.cat(trainer.predict(module, loader(seed=1)))
    with torch.no_grad():
        x = torch.cat([x for x, _ in loader(seed=1)])
        torch.testing.assert_close(predictions, restored.eval().net(x), rtol=1e-5, atol=1e-6)
    assert_state_equal(copy_state(module), recorder.steps[20])  # raw again after each

    # A fresh callback in a fresh Trainer reads the average from the checkpoint.
    fresh = OnlineAverageCallback(half_life=HALF_LIFE)
    (validated,) = trainer_for([fresh]).validate(
        Classifier(seed=4),
        loader(seed=1),
        ckpt_path=run["directory"] / "epoch=4-step=20.ckpt",
        verbose=False,
    )
    assert validated["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_an_error_inside_validation_leaves_the_raw_weights(tmp_path: Path) -> None:
    average, recorder = OnlineAverageCallback(half_life=HALF_LIFE), Recorder()
    module = Classifier(fail_validation_at_epoch=1)
    with pytest.raises(RuntimeError, match="validation fails in epoch 1"):
        trainer_for([average, recorder], max_epochs=3).fit(module, loader(), loader(seed=1))
    assert not average.is_swapped
    assert_state_equal(copy_state(module), recorder.steps[8])
    assert not module._state_dict_hooks


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    average, recorder = OnlineAverageCallback("polyak", start_step=2), Recorder()
    module = Classifier()
    # 4 batches an epoch, 2 per optimizer step: 6 steps in 3 epochs.
    trainer_for([average, recorder], max_epochs=3, accumulate_grad_batches=2).fit(module, loader())
    assert sorted(recorder.steps) == [0, 1, 2, 3, 4, 5, 6]
    assert average.average.updates == 4  # steps 3, 4, 5, 6
    reference = {
        name: sum(recorder.steps[step][name].double() for step in (3, 4, 5, 6)) / 4
        for name, value in recorder.steps[6].items()
        if value.is_floating_point()
    }
    averaged = average.average.averaged_state_dict()
    for name, expected in reference.items():
        torch.testing.assert_close(averaged[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_two_online_average_callbacks_are_refused() -> None:
    callbacks = [OnlineAverageCallback(half_life=10), OnlineAverageCallback("polyak")]
    assert callbacks[0].state_key != callbacks[1].state_key
    with pytest.raises(ValueError, match=r"one OnlineAverageCallback per Trainer.*received 2"):
        trainer_for(callbacks, max_epochs=1).fit(Classifier(), loader())


def test_bad_arguments_and_early_export_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"buffers must be one of 'average', 'copy'"):
        OnlineAverageCallback(buffers="keep")
    with pytest.raises(SchemeError, match=r"mode 'polyak' takes no parameter"):
        OnlineAverageCallback("polyak", half_life=3)
    with pytest.raises(ValueError, match=r"export\(\) needs the average.*trainer.fit"):
        OnlineAverageCallback().export(tmp_path / "a.safetensors")
