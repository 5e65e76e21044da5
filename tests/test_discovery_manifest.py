"""Tests of polyak.discovery on snapshot directories: the manifest, not a scan, decides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import polyak
from polyak.discovery import find_checkpoints
from polyak.errors import CheckpointError, DiscoveryError
from polyak.snapshots import MANIFEST_NAME, SnapshotDirectory


def save_npz(values: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as file:
            np.savez(file, w=values)

    return write


def snapshot_directory(directory: Path, epochs=(7, 8, 9), keep: int = 3) -> SnapshotDirectory:
    snapshots = SnapshotDirectory(directory, keep=keep)
    for epoch in epochs:
        values = np.full(2, float(epoch), dtype=np.float32)
        snapshots.commit(save_npz(values), f"model_{epoch:04d}.npz", epoch=epoch)
    return snapshots


def test_a_manifest_directory_gives_exactly_the_listed_files(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    # What a crash or the user may leave beside the snapshots.
    (tmp_path / "model_9999.weights.h5").write_bytes(b"stray, not listed")
    (tmp_path / "model_0010.npz").write_bytes(b"renamed but never listed")
    (tmp_path / ".polyak-tmp-1-abcd-model_0011.npz").write_bytes(b"half written")
    found = find_checkpoints(tmp_path)
    assert [c.name for c in found] == ["model_0009.npz", "model_0008.npz", "model_0007.npz"]
    assert [c.step for c in found] == [9, 8, 7]
    assert all(c.path.parent == tmp_path for c in found)
    assert [c.name for c in find_checkpoints(tmp_path, last=2)] == [
        "model_0009.npz",
        "model_0008.npz",
    ]


def test_evicted_snapshots_are_not_found(tmp_path: Path) -> None:
    snapshot_directory(tmp_path, epochs=range(6), keep=2)
    assert [c.name for c in find_checkpoints(tmp_path)] == ["model_0005.npz", "model_0004.npz"]


def test_average_ignores_a_stray_file_that_does_not_fit(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    with open(tmp_path / "model_9999.npz", "wb") as file:
        np.savez(file, w=np.zeros(5, dtype=np.float32))  # another shape: would be refused
    averaged = polyak.average(tmp_path)
    np.testing.assert_array_equal(averaged["w"], np.full(2, 8.0, dtype=np.float32))


def test_a_missing_listed_file_is_an_error_naming_it(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    (tmp_path / "model_0008.npz").unlink()
    with pytest.raises(DiscoveryError, match=rf"{MANIFEST_NAME} lists model_0008\.npz, which is"):
        find_checkpoints(tmp_path)


def test_several_missing_files_are_all_named(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    (tmp_path / "model_0007.npz").unlink()
    (tmp_path / "model_0009.npz").unlink()
    with pytest.raises(DiscoveryError, match=r"lists model_0007\.npz, model_0009\.npz, which are"):
        find_checkpoints(tmp_path)


def test_a_manifest_with_no_snapshots_is_an_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(
        '{"format": "polyak-snapshots", "version": 1, "snapshots": []}'
    )
    (tmp_path / "model_0001.npz").write_bytes(b"not listed")
    with pytest.raises(DiscoveryError, match="lists no snapshots yet"):
        find_checkpoints(tmp_path)


def test_a_damaged_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{truncated")
    with pytest.raises(CheckpointError, match=rf"manifest .*{MANIFEST_NAME}: is not valid JSON"):
        find_checkpoints(tmp_path)


def test_files_named_explicitly_are_still_taken_as_given(tmp_path: Path) -> None:
    snapshot_directory(tmp_path)
    (tmp_path / "model_9999.npz").write_bytes(b"stray")
    found = find_checkpoints([tmp_path / "model_9999.npz", tmp_path / "model_0009.npz"])
    assert [c.name for c in found] == ["model_9999.npz", "model_0009.npz"]


def test_a_directory_without_a_manifest_is_still_scanned(tmp_path: Path) -> None:
    for epoch in (1, 2, 10):
        (tmp_path / f"model_{epoch}.npz").write_bytes(b"x")
    assert [c.name for c in find_checkpoints(tmp_path)] == [
        "model_10.npz",
        "model_2.npz",
        "model_1.npz",
    ]


def test_steps_and_epochs_come_from_the_manifest(tmp_path: Path) -> None:
    # Named by epoch, as the Keras callback names them; the manifest also has the step.
    snapshots = SnapshotDirectory(tmp_path, keep=3)
    for epoch in (7, 8, 9):
        values = np.full(2, float(epoch), dtype=np.float32)
        snapshots.commit(save_npz(values), f"model_{epoch:04d}.npz", epoch=epoch, step=40 * epoch)
    found = find_checkpoints(tmp_path)
    assert [(c.epoch, c.step) for c in found] == [(9, 360), (8, 320), (7, 280)]
    # Also when the files are named one by one, as a caller passing on members would.
    explicit = find_checkpoints([tmp_path / "model_0008.npz", tmp_path / "model_0009.npz"])
    assert [(c.epoch, c.step) for c in explicit] == [(9, 360), (8, 320)]


def test_power_scheme_weighs_snapshots_by_their_recorded_steps(tmp_path: Path) -> None:
    from polyak.posthoc import power_snapshot_weights

    snapshots = SnapshotDirectory(tmp_path, keep=3)
    steps = {7: 100, 8: 300, 9: 310}  # uneven steps behind evenly numbered epochs
    for epoch, step in steps.items():
        values = np.full(2, float(epoch), dtype=np.float32)
        snapshots.commit(save_npz(values), f"model_{epoch:04d}.npz", epoch=epoch, step=step)
    averaged = polyak.average(tmp_path, scheme="power:0.2")["w"]
    weights = power_snapshot_weights([310, 300, 100], 0.2)
    np.testing.assert_allclose(
        averaged, weights @ np.array([9.0, 8.0, 7.0]) * np.ones(2), rtol=1e-6
    )
