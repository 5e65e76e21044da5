"""polyak marks its outputs, each framework still loads them, and scans skip them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from polyak.formats.marks import is_polyak_output


def polyak(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyak", *arguments], capture_output=True, text=True
    )


def members(run: Path, save, suffix: str) -> None:
    """Two members whose equal average is 1.5 everywhere."""
    run.mkdir()
    for step in (1, 2):
        save({"w": np.full((3, 2), float(step), np.float32)}, run / f"model_{step}{suffix}")


def save_npz(tensors: dict, path: Path) -> None:
    np.savez(path, **tensors)


def save_pt(tensors: dict, path: Path) -> None:
    import torch

    torch.save({name: torch.from_numpy(value) for name, value in tensors.items()}, path)


def load_pt(path: Path) -> dict:
    import torch

    return {name: value.numpy() for name, value in torch.load(path, weights_only=True).items()}


def load_npz(path: Path) -> dict:
    with np.load(path) as archive:
        return dict(archive)


@pytest.mark.parametrize(
    ("suffix", "save", "load"),
    [
        (".safetensors", lambda t, p: save_file(t, str(p)), lambda p: load_file(str(p))),
        (".npz", save_npz, load_npz),
        (".pt", save_pt, load_pt),
    ],
)
def test_an_average_in_the_run_folder_is_marked_loadable_and_skipped(tmp_path, suffix, save, load):
    if suffix == ".pt":
        pytest.importorskip("torch")
    run = tmp_path / "run"
    members(run, save, suffix)
    assert not is_polyak_output(run / f"model_1{suffix}")
    average = run / f"model_500{suffix}"  # a step-like name: newest, if taken as a member
    done = polyak("average", str(run), "-o", str(average))
    assert done.returncode == 0, done.stderr
    assert is_polyak_output(average)
    np.testing.assert_array_equal(load(average)["w"], np.full((3, 2), 1.5, np.float32))
    # Again, with a scheme that weighs the newest most: the average must not be a member.
    again = tmp_path / f"again{suffix}"
    done = polyak("average", str(run), "-o", str(again), "--scheme", "custom:3,1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"polyak: note: skipped {average}: polyak wrote it")
    np.testing.assert_allclose(load(again)["w"], np.full((3, 2), 1.75, np.float32))
    # Named on its own, it is used.
    done = polyak("average", str(average), str(run / f"model_1{suffix}"), "-o", str(tmp_path / "x"))
    assert done.returncode == 0, done.stderr


def test_a_sharded_output_directory_is_marked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        tensors = {"a": np.full(4, float(step), np.float32), "b": np.zeros(4, np.float32)}
        save_file(tensors, str(run / f"model_{step}.safetensors"))
    out = tmp_path / "averaged"
    done = polyak("average", str(run), "-o", str(out) + "/", "--max-shard-size", "8")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert is_polyak_output(out)


def test_keras_outputs_are_marked_and_load(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        model.save(run / f"model_{step}.keras")
        model.save_weights(run / f"model_{step}.weights.h5")
    for suffix in (".keras", ".weights.h5"):
        out = tmp_path / f"avg{suffix}"
        done = polyak("average", *map(str, sorted(run.glob(f"*{suffix}"))), "-o", str(out))
        assert done.returncode == 0, done.stderr
        assert is_polyak_output(out)
        assert not is_polyak_output(run / f"model_1{suffix}")
    keras.saving.load_model(tmp_path / "avg.keras")
    model.load_weights(tmp_path / "avg.weights.h5")


def test_an_average_written_by_torch_save_is_marked_too(tmp_path):
    # Legacy (non-zip) members are loaded by torch, so the output is written by torch.save.
    torch = pytest.importorskip("torch")
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        state = {"w": torch.full((3, 2), float(step))}
        torch.save(state, run / f"model_{step}.pt", _use_new_zipfile_serialization=False)
    average = tmp_path / "average.pt"
    done = polyak("average", str(run), "-o", str(average))
    assert done.returncode == 0, done.stderr
    assert is_polyak_output(average)
    np.testing.assert_array_equal(load_pt(average)["w"], np.full((3, 2), 1.5, np.float32))
    assert torch.load(average, weights_only=True, mmap=True)["w"].shape == (3, 2)
