"""Tests of polyak.torch.snapshots: SnapshotSaver with real torch models in tmp_path."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import polyak  # noqa: E402
from polyak.snapshots import MANIFEST_NAME, read_manifest, verify  # noqa: E402
from polyak.torch.snapshots import (  # noqa: E402
    SnapshotSaver,
    check_state_dict,
    save_state_dict,
    snapshot_name,
)


class Crash(BaseException):
    """Stands for the process dying mid-save: nothing catches it on the way out."""


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 8),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    )


class TiedNet(torch.nn.Module):
    """An embedding whose weight is also the output layer's (a tied language-model head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(5, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


class ExtraState(torch.nn.Module):
    """A module with a non-tensor ``_extra_state`` entry in its state dict."""

    def __init__(self, extra: object) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.extra = extra
        self.restored: object = None

    def get_extra_state(self) -> object:
        return self.extra

    def set_extra_state(self, state: object) -> None:
        self.restored = state


class Opaque:
    """An arbitrary Python object, which torch.load(weights_only=True) refuses."""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 2, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0)


def reference_average(states: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    """float64 weighted mean of the floating tensors; integers from the newest (states[0])."""
    averaged = {}
    for name, newest in states[0].items():
        if newest.is_floating_point():
            stacked = np.stack([state[name].double().numpy() for state in states])
            averaged[name] = np.tensordot(np.asarray(weights, dtype=np.float64), stacked, axes=1)
        else:
            averaged[name] = newest.numpy()
    return averaged


def assert_matches_reference(state: dict, reference: dict[str, np.ndarray]) -> None:
    assert set(state) == set(reference)
    for name, expected in reference.items():
        actual = state[name].numpy()
        if np.issubdtype(expected.dtype, np.floating):
            assert actual.dtype == np.float32
            np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7, err_msg=name)
        else:
            assert actual.dtype == expected.dtype
            np.testing.assert_array_equal(actual, expected, err_msg=name)


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def hidden(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict[int, dict], dict[int, float]]:
    """12 training steps saved by step with keep=3: steps 10, 11, 12 remain."""
    directory = tmp_path_factory.mktemp("run")
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = SnapshotSaver(directory, keep=3)
    states, losses = {}, {}
    for step in range(1, 13):
        loss = train_step(model, optimizer, seed=step)
        states[step], losses[step] = copy_state(model), loss.item()
        logs = {"loss": loss.detach(), "lr": np.float64(0.1), "note": "ok", "bad": object()}
        snapshot = saver.save(model, step=step, epoch=(step - 1) // 4, logs=logs)
        assert snapshot.name == f"model_step{step:08d}.safetensors"
    return directory, states, losses


def test_saver_keeps_the_last_snapshots_with_their_manifest_entries(run) -> None:
    directory, _, losses = run
    expected = [f"model_step{step:08d}.safetensors" for step in (10, 11, 12)]
    assert names(directory) == sorted([*expected, MANIFEST_NAME])
    snapshots = verify(directory)
    assert [s.name for s in snapshots] == expected
    assert [(s.step, s.epoch) for s in snapshots] == [(10, 2), (11, 2), (12, 2)]
    for snapshot in snapshots:
        assert snapshot.logs == {"loss": losses[snapshot.step], "lr": 0.1, "note": "ok"}
        assert isinstance(snapshot.logs["loss"], float)
        data = snapshot.path.read_bytes()
        assert snapshot.sha256 == hashlib.sha256(data).hexdigest()
        assert snapshot.bytes == len(data)


def test_snapshots_hold_the_complete_state_dict_on_the_cpu(run) -> None:
    directory, states, _ = run
    for snapshot in verify(directory):
        saved = safetensors_torch.load_file(snapshot.path)
        assert_state_equal(saved, states[snapshot.step])
        assert saved["1.num_batches_tracked"].dtype == torch.int64
        assert saved["1.num_batches_tracked"].item() == snapshot.step
        model = make_net(seed=5)
        model.load_state_dict(saved, strict=True)


def test_find_checkpoints_orders_the_snapshots_newest_first(run) -> None:
    directory, _, _ = run
    found = polyak.find_checkpoints(directory)
    assert [c.name for c in found] == [s.name for s in read_manifest(directory)][::-1]
    assert [c.step for c in found] == [12, 11, 10]


@pytest.mark.parametrize(
    ("out_name", "scheme", "weights"),
    [
        ("avg.safetensors", "equal", [1 / 3, 1 / 3, 1 / 3]),
        ("avg.pt", "linear", [3 / 6, 2 / 6, 1 / 6]),  # n, n-1, ..., 1 over n(n+1)/2, newest first
    ],
)
def test_the_average_loads_strictly_and_matches_a_float64_reference(
    run, tmp_path: Path, out_name: str, scheme: str, weights: list[float]
) -> None:
    directory, states, _ = run
    out = tmp_path / out_name
    polyak.average_to(directory, out, scheme=scheme)
    if out.suffix == ".pt":
        averaged = torch.load(out, weights_only=True)
    else:
        averaged = safetensors_torch.load_file(out)
    model = make_net(seed=5)
    model.load_state_dict(averaged, strict=True)
    reference = reference_average([states[12], states[11], states[10]], weights)
    assert_matches_reference(copy_state(model), reference)
    assert model.state_dict()["1.num_batches_tracked"].item() == 12


def test_pt_format_saves_with_torch_save(tmp_path: Path) -> None:
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = SnapshotSaver(tmp_path, keep=2, format="pt", prefix="net")
    states = {}
    for epoch in range(3):
        train_step(model, optimizer, seed=epoch)
        states[epoch] = copy_state(model)
        saver.save(model.state_dict(), epoch=epoch)
    snapshots = verify(tmp_path)
    assert [s.name for s in snapshots] == ["net_0001.pt", "net_0002.pt"]
    assert [(s.epoch, s.step) for s in snapshots] == [(1, None), (2, None)]
    for snapshot in snapshots:
        loaded = torch.load(snapshot.path, weights_only=True)
        assert_state_equal(dict(loaded), states[snapshot.epoch])
        assert loaded._metadata == model.state_dict()._metadata
    out = tmp_path.parent / f"{tmp_path.name}-avg.pt"
    polyak.average_to(tmp_path, out)
    restored = make_net(seed=5)
    restored.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert_matches_reference(
        copy_state(restored), reference_average([states[2], states[1]], [0.5] * 2)
    )


def test_names_carry_the_number_polyak_orders_by_beyond_the_padding(tmp_path: Path) -> None:
    model = make_net()
    by_step = SnapshotSaver(tmp_path / "steps", keep=3)
    for step in (99_999_999, 100_000_000, 100_000_001):
        by_step.save(model, step=step)
    assert [c.name for c in polyak.find_checkpoints(tmp_path / "steps")] == [
        "model_step100000001.safetensors",
        "model_step100000000.safetensors",
        "model_step99999999.safetensors",
    ]
    by_epoch = SnapshotSaver(tmp_path / "epochs", keep=3)
    for epoch in (9_999, 10_000):
        by_epoch.save(model, epoch=epoch)
    assert [c.name for c in polyak.find_checkpoints(tmp_path / "epochs")] == [
        "model_10000.safetensors",
        "model_9999.safetensors",
    ]
    assert snapshot_name("model", "safetensors", step=1234) == "model_step00001234.safetensors"
    assert snapshot_name("run", "pt", epoch=7) == "run_0007.pt"


def test_step_and_epoch_may_be_numpy_or_tensor_integers(tmp_path: Path) -> None:
    saver = SnapshotSaver(tmp_path, keep=2)
    first = saver.save(make_net(), step=np.int64(5), epoch=torch.tensor(1))
    assert (first.name, first.step, first.epoch) == ("model_step00000005.safetensors", 5, 1)
    assert [type(value) for value in (first.step, first.epoch)] == [int, int]


def test_mixing_names_by_step_and_by_epoch_is_refused(tmp_path: Path) -> None:
    model = make_net()
    SnapshotSaver(tmp_path, keep=3).save(model, step=1000)
    # A new saver, as after a restart, finds the step-named snapshot in the manifest.
    with pytest.raises(ValueError, match=r"named by step \(model_step00001000.safetensors\)"):
        SnapshotSaver(tmp_path, keep=3).save(model, epoch=3)
    assert [s.name for s in verify(tmp_path)] == ["model_step00001000.safetensors"]
    other = tmp_path / "by-epoch"
    SnapshotSaver(other, keep=3).save(model, epoch=3)
    with pytest.raises(ValueError, match=r"named by epoch \(model_0003.safetensors\)"):
        SnapshotSaver(other, keep=3).save(model, step=1000, epoch=4)


def test_tied_weights_are_written_as_separate_tensors(tmp_path: Path) -> None:
    model = TiedNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    shared = model.state_dict()
    assert shared["embed.weight"].data_ptr() == shared["head.weight"].data_ptr()
    with pytest.raises(RuntimeError, match="share memory"):  # why the saver must unshare them
        safetensors_torch.save_file(shared, tmp_path / "plain.safetensors")
    saver = SnapshotSaver(tmp_path / "run", keep=2)
    states = {}
    for step in (1, 2):
        tokens = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(step))
        loss = model(tokens).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        states[step] = copy_state(model)
        saver.save(model, step=step)
    for snapshot in verify(tmp_path / "run"):
        saved = safetensors_torch.load_file(snapshot.path)
        assert_state_equal(saved, states[snapshot.step])
        torch.testing.assert_close(saved["embed.weight"], saved["head.weight"], rtol=0, atol=0)
    out = tmp_path / "avg.safetensors"
    polyak.average_to(tmp_path / "run", out)
    restored = TiedNet()
    restored.load_state_dict(safetensors_torch.load_file(out), strict=True)
    assert restored.head.weight is restored.embed.weight  # still tied after loading
    assert_matches_reference(
        copy_state(restored), reference_average([states[2], states[1]], [0.5] * 2)
    )


def test_non_contiguous_tensors_are_saved_contiguously(tmp_path: Path) -> None:
    model = make_net()
    model.register_buffer("transposed", torch.arange(6.0).reshape(3, 2).t())
    assert not model.transposed.is_contiguous()
    snapshot = SnapshotSaver(tmp_path, keep=1).save(model, step=1)
    saved = safetensors_torch.load_file(snapshot.path)
    torch.testing.assert_close(saved["transposed"], torch.tensor([[0.0, 2, 4], [1, 3, 5]]))


def test_non_tensor_entries_are_refused_for_safetensors_before_writing(tmp_path: Path) -> None:
    model = ExtraState({"scale": 2.0, "name": "calibrated"})
    saver = SnapshotSaver(tmp_path, keep=2)
    with pytest.raises(
        ValueError, match=r"entry '_extra_state' is a dict, not a tensor.*format='pt'"
    ):
        saver.save(model, step=1)
    assert names(tmp_path) == []
    with pytest.raises(ValueError, match=r"_extra_state"):
        check_state_dict(model)


def test_pt_format_keeps_non_tensor_entries_through_the_average(tmp_path: Path) -> None:
    model = ExtraState({"scale": 2.0, "name": "calibrated"})
    saver = SnapshotSaver(tmp_path / "run", keep=2, format="pt")
    for step in (1, 2):
        with torch.no_grad():
            model.linear.weight.add_(step)
        saver.save(model, step=step)
    out = tmp_path / "avg.pt"
    polyak.average_to(tmp_path / "run", out)
    restored = ExtraState(None)
    restored.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert restored.restored == {"scale": 2.0, "name": "calibrated"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (Opaque(), r"entry '_extra_state': not tensors.*weights_only=True.*refuses .*Opaque"),
        (lambda: 1, r"entry '_extra_state': not tensors, and torch.save cannot save them"),
    ],
)
def test_pt_format_refuses_entries_polyak_could_not_load_back(
    tmp_path: Path, extra: object, message: str
) -> None:
    saver = SnapshotSaver(tmp_path, keep=2, format="pt")
    with pytest.raises(ValueError, match=message):
        saver.save(ExtraState(extra), step=1)
    assert names(tmp_path) == []


def test_an_exception_in_the_loop_leaves_only_committed_snapshots(tmp_path: Path) -> None:
    (tmp_path / "model_step99999999.safetensors").write_bytes(b"a stray file, not a snapshot")
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = SnapshotSaver(tmp_path, keep=3)
    with pytest.raises(RuntimeError, match="crash at step 6"):
        for step in range(1, 11):
            train_step(model, optimizer, seed=step)
            if step == 6:
                raise RuntimeError(f"crash at step {step}")
            saver.save(model, step=step)
    snapshots = verify(tmp_path)
    assert [s.step for s in snapshots] == [3, 4, 5]
    assert hidden(tmp_path) == []
    assert [c.step for c in polyak.find_checkpoints(tmp_path)] == [5, 4, 3]


def test_a_crash_while_writing_leaves_the_committed_snapshots(tmp_path: Path, monkeypatch) -> None:
    model = make_net()
    saver = SnapshotSaver(tmp_path, keep=3)
    for step in (1, 2):
        saver.save(model, step=step)
    before = verify(tmp_path)

    def half_written(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\x08\x00\x00\x00")  # the start of a header, no more
        raise Crash

    monkeypatch.setattr(safetensors_torch, "save_file", half_written)
    with pytest.raises(Crash):
        saver.save(model, step=3)
    assert verify(tmp_path) == before
    assert hidden(tmp_path) == []
    assert [c.step for c in polyak.find_checkpoints(tmp_path)] == [2, 1]


def test_a_process_killed_mid_save_leaves_a_directory_the_next_saver_repairs(
    tmp_path: Path,
) -> None:
    script = textwrap.dedent(
        f"""
        import os, torch, safetensors.torch
        from polyak.torch.snapshots import SnapshotSaver
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        saver = SnapshotSaver({str(tmp_path)!r}, keep=2)
        for step in (1, 2, 3):
            saver.save(model, step=step)
        save_file = safetensors.torch.save_file
        def die(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata)
            os._exit(3)  # dies after writing, before the rename: no cleanup runs
        safetensors.torch.save_file = die
        saver.save(model, step=4)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert completed.returncode == 3, completed.stderr.decode()
    assert [s.step for s in verify(tmp_path)] == [2, 3]
    assert len(hidden(tmp_path)) == 1  # the dead process's temporary file
    assert [c.step for c in polyak.find_checkpoints(tmp_path)] == [3, 2]
    saver = SnapshotSaver(tmp_path, keep=2)  # opening removes it
    assert hidden(tmp_path) == []
    saver.save(make_net(), step=4)
    assert [s.step for s in verify(tmp_path)] == [3, 4]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": 0}, r"keep must be a whole number >= 1; received 0"),
        ({"keep": 2.5}, r"keep must be a whole number >= 1; received 2.5"),
        ({"keep": True}, r"keep must be a whole number"),
        ({"format": "h5"}, r"format must be one of 'safetensors', 'pt'; received 'h5'"),
        ({"prefix": ""}, r"prefix must be a non-empty"),
        ({"prefix": "a/b"}, r"prefix must be .*received 'a/b'"),
        ({"prefix": ".hidden"}, r"prefix must be"),
        ({"directory": 3}, r"directory must be a path; received 3"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict, message: str) -> None:
    directory = arguments.pop("directory", tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        SnapshotSaver(directory, **arguments)
    assert names(tmp_path) == []


def test_the_saver_keeps_its_arguments_as_one_checked_options_record(tmp_path: Path) -> None:
    from polyak.posthoc import DEFAULT_PROFILE_KEEP
    from polyak.snapshots import SnapshotOptions
    from polyak.torch.saving import SUFFIXES

    saver = SnapshotSaver(str(tmp_path), keep=np.int64(3), format="pt", posthoc=[0.05])
    assert saver.options == SnapshotOptions(
        directory=tmp_path,
        formats=SUFFIXES,
        format="pt",
        keep=3,
        posthoc=(0.05,),
        posthoc_keep=DEFAULT_PROFILE_KEEP,
    )
    assert (saver.directory, saver.keep, saver.posthoc) == (tmp_path, 3, (0.05,))
    assert type(saver.keep) is int
    # The attributes show the checked record, read-only: no way around the checks.
    with pytest.raises(AttributeError):
        saver.keep = 0
    # The loop decides when to save: no epoch schedule to show.
    assert not hasattr(saver, "every_epochs") and not hasattr(saver, "schedule")


@pytest.mark.parametrize(
    ("model", "arguments", "message"),
    [
        (None, {}, r"named by its step or its epoch; received step=None and epoch=None"),
        (None, {"step": -1}, r"step must be a whole number >= 0 or None; received -1"),
        (None, {"step": True}, r"step must be a whole number >= 0 or None; received True"),
        (None, {"epoch": 2.0}, r"epoch must be a whole number >= 0 or None; received 2.0"),
        (None, {"step": 1, "logs": [0.5]}, r"logs must be a mapping .*received list"),
        ([1, 2], {"step": 1}, r"model must be a torch.nn.Module or a state dict.*received list"),
        ({}, {"step": 1}, r"the state dict holds no tensors \(0 entries\)"),
        ({1: torch.ones(2)}, {"step": 1}, r"keys must be strings; received the key 1 of type int"),
        (
            {"w": torch.ones(2, 2).to_sparse()},
            {"step": 1},
            r"entry 'w' is a sparse tensor .*to_dense",
        ),
    ],
)
def test_bad_saves_are_refused_and_write_nothing(
    tmp_path: Path, model: object, arguments: dict, message: str
) -> None:
    saver = SnapshotSaver(tmp_path, keep=2)
    with pytest.raises(ValueError, match=message):
        saver.save(make_net() if model is None else model, **arguments)
    assert names(tmp_path) == []


def test_save_state_dict_writes_one_file_outside_a_snapshot_directory(tmp_path: Path) -> None:
    model = make_net()
    save_state_dict(model, tmp_path / "model.safetensors")
    save_state_dict(model, tmp_path / "model.pt", format="pt")
    assert_state_equal(
        safetensors_torch.load_file(tmp_path / "model.safetensors"), copy_state(model)
    )
    assert_state_equal(
        dict(torch.load(tmp_path / "model.pt", weights_only=True)), copy_state(model)
    )
