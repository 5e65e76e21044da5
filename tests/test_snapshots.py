"""Tests of polyak.snapshots: atomic commits, retention, recovery after crashes, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from polyak.errors import ArgumentError, CheckpointError, OutputError, SchemeError
from polyak.snapshots import (
    MANIFEST_NAME,
    Snapshot,
    SnapshotDirectory,
    SnapshotOptions,
    SnapshotSchedule,
    read_manifest,
    verify,
)


class Crash(BaseException):
    """Stands for the process dying: nothing catches it on the way out."""


def writer(data: bytes):
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def raw_manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_consistent(directory: Path, at_least: int) -> list[Snapshot]:
    """Every listed file is complete and matches its checksum; none were lost."""
    snapshots = verify(directory)
    for snapshot in snapshots:
        assert snapshot.path.is_file()
        assert sha256(snapshot.path) == snapshot.sha256
        assert snapshot.path.stat().st_size == snapshot.bytes
    assert len(snapshots) >= at_least
    return snapshots


# ---------------------------------------------------------------- commit


def test_commit_writes_the_file_and_the_manifest(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "snapshots"  # created, parents included
    snapshots = SnapshotDirectory(directory, keep=3)
    snapshot = snapshots.commit(
        writer(b"weights"), "model_0499.weights.h5", epoch=499, step=1234, logs={"loss": 0.25}
    )
    path = directory / "model_0499.weights.h5"
    assert path.read_bytes() == b"weights"
    assert snapshot.path == path
    assert snapshot.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert snapshot.bytes == len(b"weights")
    data = raw_manifest(directory)
    assert data["format"] == "polyak-snapshots"
    assert data["version"] == 1
    assert set(data) == {"format", "version", "snapshots"}  # no journal left behind
    [entry] = data["snapshots"]
    assert entry["file"] == "model_0499.weights.h5"
    assert (entry["epoch"], entry["step"], entry["logs"]) == (499, 1234, {"loss": 0.25})
    assert entry["sha256"] == snapshot.sha256
    assert entry["bytes"] == 7
    assert entry["time"].endswith("Z")
    assert snapshots.snapshots() == [snapshot]
    assert read_manifest(directory) == [snapshot]
    assert hidden(directory) == []


def test_write_gets_the_final_name_in_a_hidden_temporary_directory(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(path: Path) -> None:
        seen.append(path)
        assert not (tmp_path / "model_0499.weights.h5").exists()
        path.write_bytes(b"x")

    SnapshotDirectory(tmp_path, keep=1).commit(write, "model_0499.weights.h5")
    [temporary] = seen
    assert temporary.name == "model_0499.weights.h5"
    workspace = temporary.parent
    assert workspace.parent == tmp_path
    assert workspace.name.startswith(f".polyak-tmp-{os.getpid()}-")
    assert workspace.name.endswith("-model_0499.weights.h5")
    assert not workspace.exists()


def test_files_the_save_function_writes_beside_its_own_are_removed(tmp_path: Path) -> None:
    # As safetensors' save_file does: a .tmpXXXXXX beside the file, renamed into it.
    def write(path: Path) -> None:
        (path.parent / ".tmpAbC123").write_bytes(b"x")
        (path.parent / ".tmpAbC123").rename(path)
        (path.parent / ".tmpDeF456").write_bytes(b"a leftover")

    SnapshotDirectory(tmp_path, keep=1).commit(write, "model_0001.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model_0001.safetensors",
        MANIFEST_NAME,
    ]


def test_retention_keeps_the_newest_by_order_of_commit(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=3)
    for epoch in range(6):
        snapshots.commit(writer(bytes([epoch]) * 10), f"model_{epoch:04d}.npz", epoch=epoch)
    names = [s.name for s in snapshots.snapshots()]
    assert names == ["model_0003.npz", "model_0004.npz", "model_0005.npz"]
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert on_disk == sorted([*names, MANIFEST_NAME])
    for snapshot in snapshots.snapshots():
        assert snapshot.sha256 == hashlib.sha256(bytes([snapshot.epoch]) * 10).hexdigest()
    assert "evicting" not in raw_manifest(tmp_path)


def test_committing_a_name_again_replaces_its_entry(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=3)
    snapshots.commit(writer(b"a"), "model_0001.npz", epoch=1)
    snapshots.commit(writer(b"b"), "model_0002.npz", epoch=2)
    again = snapshots.commit(writer(b"a2"), "model_0001.npz", epoch=1, step=7)
    assert [s.name for s in snapshots.snapshots()] == ["model_0002.npz", "model_0001.npz"]
    assert snapshots.snapshots()[-1] == again
    assert (tmp_path / "model_0001.npz").read_bytes() == b"a2"
    assert again.sha256 == hashlib.sha256(b"a2").hexdigest()
    assert_consistent(tmp_path, at_least=2)


def test_a_failing_write_leaves_no_temporary_and_the_manifest_unchanged(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    snapshots.commit(writer(b"a"), "model_0001.npz")
    before = (tmp_path / MANIFEST_NAME).read_bytes()

    class DiskFull(OSError):
        pass

    def write(path: Path) -> None:
        path.write_bytes(b"half a fi")
        raise DiskFull("no space left")

    with pytest.raises(DiskFull, match="no space left"):
        snapshots.commit(write, "model_0002.npz")
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, "model_0001.npz"])


def test_a_write_that_creates_no_file_is_an_error(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    with pytest.raises(OutputError, match=r"model_0001\.npz: the save function wrote no file"):
        snapshots.commit(lambda path: None, "model_0001.npz")
    assert snapshots.snapshots() == []


def test_logs_keep_numbers_and_strings_only(tmp_path: Path) -> None:
    logs = {
        "loss": np.float32(0.5),
        "accuracy": np.array(0.75),
        "count": np.int64(3),
        "lr": 0.01,
        "name": "sgd",
        "diverged": float("nan"),
        "big": float("-inf"),
        "flag": True,
        "history": [1.0, 2.0],
        "matrix": np.zeros((2, 2)),
        "nothing": None,
    }
    SnapshotDirectory(tmp_path, keep=1).commit(writer(b"x"), "model_1.npz", logs=logs)
    [entry] = raw_manifest(tmp_path)["snapshots"]
    assert entry["logs"] == {
        "loss": 0.5,
        "accuracy": 0.75,
        "count": 3,
        "lr": 0.01,
        "name": "sgd",
        "diverged": "nan",
        "big": "-inf",
    }
    assert "NaN" not in (tmp_path / MANIFEST_NAME).read_text()  # strict JSON


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "non-empty"),
        ("../model_1.npz", "plain file name"),
        ("sub/model_1.npz", "plain file name"),
        (".model_1.npz", "hidden"),
        (MANIFEST_NAME, "manifest"),
    ],
)
def test_commit_refuses_names_outside_the_directory_or_reserved(
    tmp_path: Path, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SnapshotDirectory(tmp_path, keep=1).commit(writer(b"x"), name)


@pytest.mark.parametrize("keep", [0, -1, 1.5, True, None])
def test_keep_must_be_a_whole_number_of_at_least_one(tmp_path: Path, keep) -> None:
    with pytest.raises(ValueError, match=r"keep must be a whole number >= 1; received"):
        SnapshotDirectory(tmp_path, keep=keep)


def test_a_file_in_place_of_the_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        SnapshotDirectory(tmp_path / "run", keep=1)


# ---------------------------------------------------------------- verify


def test_verify_returns_the_snapshots_oldest_first(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=5)
    for epoch in range(3):
        snapshots.commit(writer(os.urandom(100)), f"model_{epoch}.npz", epoch=epoch)
    assert [s.epoch for s in verify(tmp_path)] == [0, 1, 2]


def test_verify_detects_a_modified_file(tmp_path: Path) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=5)
    snapshots.commit(writer(b"good"), "model_1.npz")
    snapshots.commit(writer(b"good"), "model_2.npz")
    (tmp_path / "model_2.npz").write_bytes(b"evil")  # same size, other content
    with pytest.raises(CheckpointError, match=r"snapshot .*model_2\.npz: has 4 bytes with SHA"):
        verify(tmp_path)


def test_verify_detects_a_truncated_file(tmp_path: Path) -> None:
    SnapshotDirectory(tmp_path, keep=5).commit(writer(b"complete"), "model_1.npz")
    (tmp_path / "model_1.npz").write_bytes(b"comp")
    with pytest.raises(CheckpointError, match=r"model_1\.npz: has 4 bytes .* records 8 bytes"):
        verify(tmp_path)


def test_verify_detects_a_missing_file(tmp_path: Path) -> None:
    SnapshotDirectory(tmp_path, keep=5).commit(writer(b"x"), "model_1.npz")
    (tmp_path / "model_1.npz").unlink()
    with pytest.raises(CheckpointError, match=r"model_1\.npz: listed in .* but missing"):
        verify(tmp_path)


def test_verify_without_a_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a polyak snapshot directory"):
        verify(tmp_path)
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[]", 'has no "format"'),
        (b'{"format": "other", "version": 1, "snapshots": []}', 'has no "format"'),
        (b'{"format": "polyak-snapshots", "version": 2, "snapshots": []}', "version 2"),
        (b'{"format": "polyak-snapshots", "version": 1, "snapshots": {}}', "not a list"),
        (
            b'{"format": "polyak-snapshots", "version": 1, "snapshots": '
            b'[{"file": "../../etc/passwd", "sha256": "' + b"0" * 64 + b'", "bytes": 1}]}',
            "plain file name",
        ),
        (
            b'{"format": "polyak-snapshots", "version": 1, "snapshots": '
            b'[{"file": "model_1.npz", "sha256": "abc", "bytes": 1}]}',
            "sha256",
        ),
        (
            b'{"format": "polyak-snapshots", "version": 1, "snapshots": [], '
            b'"evicting": ["../outside.txt"]}',
            "evicting",
        ),
        # Before: "internal error" (RecursionError, ValueError), exit 1.
        (b'{"format": "polyak-snapshots", "snapshots": ' + b"[" * 100_000, "nested too deeply"),
        (
            b'{"format": "polyak-snapshots", "version": 1, "snapshots": '
            b'[{"file": "model_1.npz", "step": ' + b"9" * 5000 + b"}]}",
            "not valid JSON",
        ),
        # A step too large for a float (the power schemes compute with floats).
        (
            b'{"format": "polyak-snapshots", "version": 1, "snapshots": '
            b'[{"file": "model_1.npz", "step": 1' + b"0" * 400 + b"}]}",
            "'step' that is not a whole number from 0 to 2\\*\\*63 - 1",
        ),
    ],
)
def test_a_damaged_manifest_is_refused_and_kept(tmp_path: Path, content: bytes, message) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    pattern = rf"manifest .*{MANIFEST_NAME}: .*{message}"
    with pytest.raises(CheckpointError, match=pattern):
        verify(tmp_path)
    with pytest.raises(CheckpointError, match=pattern):
        read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match=pattern):
        SnapshotDirectory(tmp_path, keep=2)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == content  # never overwritten


# ---------------------------------------------------------------- crashes, simulated

USER_FILES = {
    "notes.txt": b"mine",
    "model_0099.npz": b"an older run of mine, not in the manifest",
    ".hidden": b"mine too",
    ".polyak-tmp-notapid-model.npz": b"looks like ours, is not",
}


def crash_on_replace(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    real = os.replace
    calls = {"count": 0}

    def replace(source, target) -> None:
        calls["count"] += 1
        if calls["count"] == at_call:
            raise Crash(f"os.replace #{at_call}")
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)


def crash_on_deleting(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = os.unlink

    def unlink(path, *args, **kwargs) -> None:
        if Path(path).name == name:
            raise Crash(f"deleting {name}")
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


# os.replace calls of one commit that evicts: 1 manifest with the pending entry,
# 2 the snapshot's rename, 3 manifest with the new entry and "evicting",
# 4 manifest without "evicting" (after the deletion).
NEW_NAME_CRASHES = {
    "before the pending manifest": (1, {"model_0000.npz", "model_0001.npz"}),
    "before the rename": (2, {"model_0000.npz", "model_0001.npz"}),
    # Renamed, not yet listed: opening adopts it, and evicts the oldest as the commit would.
    "before the committing manifest": (3, {"model_0001.npz", "model_0002.npz"}),
    "before the cleaned manifest": (4, {"model_0001.npz", "model_0002.npz"}),
}


@pytest.mark.parametrize("stage", [*NEW_NAME_CRASHES, "during the deletion"])
def test_a_crash_in_a_commit_never_loses_or_corrupts_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    for name, content in USER_FILES.items():
        (tmp_path / name).write_bytes(content)
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    snapshots.commit(writer(b"zero"), "model_0000.npz", epoch=0)
    snapshots.commit(writer(b"one"), "model_0001.npz", epoch=1)
    with monkeypatch.context() as patch:
        if stage == "during the deletion":
            crash_on_deleting(patch, "model_0000.npz")
        else:
            crash_on_replace(patch, NEW_NAME_CRASHES[stage][0])
        with pytest.raises(Crash):
            snapshots.commit(writer(b"two"), "model_0002.npz", epoch=2)

    # As the crash left it: complete, checksums valid, nothing lost.
    assert_consistent(tmp_path, at_least=2)
    # The next process to open it completes or undoes the commit.
    SnapshotDirectory(tmp_path, keep=2)
    after = assert_consistent(tmp_path, at_least=2)
    listed = {s.name for s in after}
    if stage == "during the deletion":
        assert listed == {"model_0001.npz", "model_0002.npz"}
    else:
        assert listed == NEW_NAME_CRASHES[stage][1]
    assert set(raw_manifest(tmp_path)) == {"format", "version", "snapshots"}
    on_disk = {p.name for p in tmp_path.iterdir()}
    assert on_disk == listed | set(USER_FILES) | {MANIFEST_NAME}
    for name, content in USER_FILES.items():
        assert (tmp_path / name).read_bytes() == content
    # And training goes on from there.
    SnapshotDirectory(tmp_path, keep=2).commit(writer(b"three"), "model_0003.npz", epoch=3)
    assert [s.name for s in assert_consistent(tmp_path, at_least=2)][-1] == "model_0003.npz"


@pytest.mark.parametrize(("at_call", "content"), [(1, b"old"), (2, b"old"), (3, b"new")])
def test_a_crash_while_replacing_a_name_keeps_a_file_that_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_call: int, content: bytes
) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    snapshots.commit(writer(b"old"), "model_0001.npz", epoch=1)
    snapshots.commit(writer(b"other"), "model_0002.npz", epoch=2)
    with monkeypatch.context() as patch:
        crash_on_replace(patch, at_call)
        with pytest.raises(Crash):
            snapshots.commit(writer(b"new"), "model_0001.npz", epoch=1)
    assert (tmp_path / "model_0001.npz").read_bytes() == content
    verified = {s.name: s for s in assert_consistent(tmp_path, at_least=2)}
    assert verified["model_0001.npz"].sha256 == hashlib.sha256(content).hexdigest()
    reopened = SnapshotDirectory(tmp_path, keep=2)
    entries = {s.name: s for s in reopened.snapshots()}
    assert set(entries) == {"model_0001.npz", "model_0002.npz"}
    assert entries["model_0001.npz"].sha256 == hashlib.sha256(content).hexdigest()
    assert_consistent(tmp_path, at_least=2)


def test_adopting_an_interrupted_commit_never_lists_fewer_than_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=3)
    for index in range(3):
        snapshots.commit(writer(b"%d" % index), f"model_{index:04d}.npz")
    with monkeypatch.context() as patch:
        crash_on_replace(patch, 3)  # renamed, not yet listed
        with pytest.raises(Crash):
            snapshots.commit(writer(b"3"), "model_0003.npz")
    # Opened with a smaller keep: the adopted commit evicts one file, as it would have.
    SnapshotDirectory(tmp_path, keep=1)
    names = [s.name for s in assert_consistent(tmp_path, at_least=3)]
    assert names == ["model_0001.npz", "model_0002.npz", "model_0003.npz"]
    assert set(raw_manifest(tmp_path)) == {"format", "version", "snapshots"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, *names])


def test_the_same_object_recovers_before_its_next_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    snapshots.commit(writer(b"a"), "model_0001.npz")
    with monkeypatch.context() as patch:
        crash_on_replace(patch, 3)  # renamed, not yet listed
        with pytest.raises(Crash):
            snapshots.commit(writer(b"b"), "model_0002.npz")
    snapshots.commit(writer(b"c"), "model_0003.npz")
    names = [s.name for s in assert_consistent(tmp_path, at_least=2)]
    assert names == ["model_0002.npz", "model_0003.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, *names])


def test_opening_removes_temporaries_of_dead_processes_only(tmp_path: Path) -> None:
    SnapshotDirectory(tmp_path, keep=2).commit(writer(b"a"), "model_0001.npz")
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stale = [
            f".polyak-tmp-{dead}-0badcafe-model_0002.npz",
            f".polyak-tmp-{dead}-0badcafe-model_0003.npz",  # a directory, below
            f".{MANIFEST_NAME}.polyak-tmp-{dead}-0badcafe",
        ]
        kept = [
            f".polyak-tmp-{alive.pid}-0badcafe-model_0002.npz",
            f".polyak-tmp-{os.getpid()}-0badcafe-model_0002.npz",
            ".polyak-tmp-notapid-model_0002.npz",
            f".other.polyak-tmp-{dead}-0badcafe",
        ]
        for name in stale[:1] + stale[2:] + kept:
            (tmp_path / name).write_bytes(b"partial")
        # What a killed commit leaves: its directory, the partial file and the save
        # function's own temporary in it.
        (tmp_path / stale[1]).mkdir()
        (tmp_path / stale[1] / "model_0003.npz").write_bytes(b"partial")
        (tmp_path / stale[1] / ".tmpAbC123").write_bytes(b"partial")
        SnapshotDirectory(tmp_path, keep=2)
        assert hidden(tmp_path) == sorted(kept)
    finally:
        alive.kill()
        alive.wait()


def test_evicting_names_are_deleted_only_when_not_listed(tmp_path: Path) -> None:
    SnapshotDirectory(tmp_path, keep=3).commit(writer(b"a"), "model_0001.npz")
    (tmp_path / "model_0000.npz").write_bytes(b"evicted, deletion interrupted")
    data = raw_manifest(tmp_path)
    data["evicting"] = ["model_0000.npz", "model_0001.npz"]  # the second is listed: kept
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    SnapshotDirectory(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_NAME, "model_0001.npz"])
    assert "evicting" not in raw_manifest(tmp_path)


# ---------------------------------------------------------------- crashes, real

CHILD = """
import os, sys
from polyak.snapshots import SnapshotDirectory

directory, start = sys.argv[1], int(sys.argv[2])
snapshots = SnapshotDirectory(directory, keep=3)
print("ready", flush=True)
index = start
while True:
    data = os.urandom(1 + (index * 7919) % 300_000)
    # Each name is committed twice in a row: the second time replaces it.
    snapshots.commit(
        lambda path: path.write_bytes(data),
        f"model_{index // 2:06d}.npz",
        epoch=index // 2,
        step=index,
        logs={"loss": 1.0 / (index + 1)},
    )
    print(index, flush=True)
    index += 1
"""


def kill_during_commits(directory: Path, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    index = 0
    committed_names: set[str] = set()
    for _ in range(trials):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(index)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = [int(line) for line in child.stdout.read().split()]
        child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        committed_names |= {f"model_{i // 2:06d}.npz" for i in done}
        if done:
            index = done[-1] + 1

        # As the kill left it, before any recovery.
        assert_consistent(directory, at_least=min(len(committed_names), 3))
        # After recovery: no journal, no temporaries, no stray files.
        SnapshotDirectory(directory, keep=3)
        listed = {s.name for s in assert_consistent(directory, min(len(committed_names), 3))}
        assert set(raw_manifest(directory)) == {"format", "version", "snapshots"}
        assert {p.name for p in directory.iterdir()} == listed | {MANIFEST_NAME, "user.txt"}
        assert (directory / "user.txt").read_text() == "keep me"


def test_kill_9_during_commits_leaves_a_consistent_directory(tmp_path: Path) -> None:
    (tmp_path / "user.txt").write_text("keep me")
    kill_during_commits(tmp_path, trials=5, seed=0)


@pytest.mark.slow
def test_kill_9_during_commits_200_times(tmp_path: Path) -> None:
    (tmp_path / "user.txt").write_text("keep me")
    kill_during_commits(tmp_path, trials=200, seed=1)


# ---------------------------------------------------------------- the schedule


def test_schedule_default_saves_the_last_keep_epochs_counted_from_the_end() -> None:
    schedule = SnapshotSchedule(keep=3, every_epochs=2)
    saved = [epoch for epoch in range(20) if schedule.saves_epoch(epoch, 20)]
    assert saved == [15, 17, 19]
    assert not schedule.saves_epoch(19, None)  # no epoch count: nothing
    assert schedule.needs_epoch_count


def test_schedule_rolling_saves_every_epochs_whatever_the_length() -> None:
    schedule = SnapshotSchedule(keep=3, rolling=True, every_epochs=3)
    assert [e for e in range(10) if schedule.saves_epoch(e, None)] == [2, 5, 8]
    assert not schedule.needs_epoch_count


def test_schedule_by_steps_saves_once_per_crossed_multiple() -> None:
    schedule = SnapshotSchedule(every_steps=5)
    assert [schedule.saves_step(a, b) for a, b in [(0, 4), (4, 5), (5, 5), (3, 12), (12, 14)]] == [
        False, True, False, True, False
    ]  # fmt: skip
    assert not schedule.saves_epoch(9, 10)


def test_schedule_stopped_early_only_in_the_default_mode() -> None:
    assert SnapshotSchedule().stopped_early(5, 10)
    assert not SnapshotSchedule().stopped_early(9, 10)
    assert not SnapshotSchedule(rolling=True).stopped_early(5, 10)
    assert not SnapshotSchedule().stopped_early(None, 10)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep": 0}, r"keep must be a whole number >= 1; received 0"),
        ({"rolling": 1}, r"rolling must be True or False"),
        ({"every_epochs": True}, r"every_epochs must be a whole number >= 1"),
        ({"every_steps": 0}, r"every_steps must be a whole number >= 1 or None"),
        ({"every_steps": 5, "every_epochs": 2}, r"give every_steps or every_epochs, not both"),
    ],
)
def test_schedule_refuses_bad_arguments(arguments, message) -> None:
    with pytest.raises(ValueError, match=message):
        SnapshotSchedule(**arguments)


def test_counts_may_be_numpy_integers_and_are_kept_as_ints(tmp_path: Path) -> None:
    # The shared rule of polyak.checks: anything operator.index reads, but a bool.
    schedule = SnapshotSchedule(keep=np.int64(3), every_epochs=np.int32(2))
    assert (schedule.keep, schedule.every_epochs) == (3, 2)
    assert type(schedule.keep) is int and type(schedule.every_epochs) is int
    snapshots = SnapshotDirectory(tmp_path, keep=np.int64(2))
    snapshots.commit(writer(b"x"), "model_0001.bin", epoch=np.int64(1), step=np.uint16(5))
    (entry,) = read_manifest(tmp_path)
    assert (entry.epoch, entry.step) == (1, 5)
    assert type(entry.epoch) is int and type(entry.step) is int


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"epoch": -1}, r"epoch must be a whole number from 0 to 9223372036854775807 or None"),
        ({"step": 2**63}, r"step must be a whole number from 0 to 9223372036854775807 or None"),
        ({"step": True}, r"step must be a whole number .*; received True"),
    ],
)
def test_commit_refuses_counts_out_of_range(tmp_path: Path, arguments, message) -> None:
    snapshots = SnapshotDirectory(tmp_path, keep=2)
    with pytest.raises(ValueError, match=message):
        snapshots.commit(writer(b"x"), "model_0001.bin", **arguments)
    assert read_manifest(tmp_path) is None


def test_snapshot_options_hold_the_checked_arguments_as_plain_values() -> None:
    options = SnapshotOptions(
        directory="run",
        formats={"npz": ".npz", "pt": ".pt"},
        format="pt",
        keep=np.int64(4),
        every_steps=np.int32(50),
        posthoc=[0.05, np.float64(0.1)],
        posthoc_keep=np.int64(7),
        posthoc_every=100,
    )
    assert options.directory == Path("run") and options.suffix == ".pt"
    assert (options.keep, options.every_steps, options.posthoc_keep) == (4, 50, 7)
    assert all(type(value) is int for value in (options.keep, options.every_steps))
    assert options.posthoc == (0.05, 0.1) and type(options.posthoc[1]) is float
    assert options.schedule == SnapshotSchedule(keep=4, every_steps=50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.keep = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"directory": 3}, ValueError, r"directory must be a path; received 3"),
        ({"keep": 0}, ArgumentError, r"keep must be a whole number >= 1; received 0"),
        ({"format": "h5"}, ValueError, r"format must be one of 'npz'; received 'h5'"),
        ({"prefix": "a/b"}, ValueError, r"prefix must be .*received 'a/b'"),
        ({"rolling": "yes"}, ValueError, r"rolling must be True or False; received 'yes'"),
        ({"every_epochs": 0}, ArgumentError, r"every_epochs must be a whole number >= 1"),
        ({"every_steps": 2.0}, ArgumentError, r"every_steps must be .* or None; received 2\.0"),
        ({"posthoc": 0.05}, ValueError, r"posthoc takes the widths .*received 0\.05"),
        ({"posthoc": (0.05, 0.5)}, SchemeError, r"sigma_rel must be a number in \(0, 0\.2887\)"),
        ({"posthoc": (0.1, 0.10)}, ValueError, r"posthoc widths must differ"),
        ({"posthoc_keep": 0}, ArgumentError, r"posthoc_keep must be a whole number >= 1"),
        ({"posthoc_every": True}, ArgumentError, r"posthoc_every must be .* or None; received"),
    ],
)
def test_snapshot_options_refuse_each_bad_argument(arguments, error, message) -> None:
    values = {"directory": "run", "formats": {"npz": ".npz"}, "format": "npz", "posthoc_keep": 1}
    with pytest.raises(error, match=message):
        SnapshotOptions(**{**values, **arguments})
