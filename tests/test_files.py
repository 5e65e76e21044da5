"""Tests of polyak.files: atomic outputs and refusing to overwrite inputs, in tmp_path."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from polyak.errors import OutputError
from polyak.files import (
    atomic_directory,
    atomic_output,
    check_output_path,
    is_directory_output,
)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".polyak-tmp-" in p.name)


def checkpoint_directory(path: Path, content: bytes = b"old") -> Path:
    """A directory shaped like a sharded safetensors output (contents are not read)."""
    path.mkdir()
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ):
        (path / name).write_bytes(content)
    return path


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------- atomic_output


def test_renames_on_success(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with atomic_output(out) as temporary:
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".avg.safetensors.polyak-tmp-")
        assert f"-{os.getpid()}-" in temporary.name
        temporary.write_bytes(b"new")
        assert not out.exists()  # nothing under the final name until the block ends
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_replaces_a_previous_output_on_success(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    out.write_bytes(b"old")
    with atomic_output(out, overwrite=True) as temporary:
        temporary.write_bytes(b"new")
        assert out.read_bytes() == b"old"
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_exception_keeps_the_previous_content(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output(out, overwrite=True) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("disk on fire")
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_exception_leaves_no_output_when_there_was_none(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    with pytest.raises(ValueError, match="bad tensor"):
        with atomic_output(out) as temporary:
            temporary.write_bytes(b"partial")
            raise ValueError("bad tensor")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_cleans_up_too(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as temporary:
            temporary.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_exception_before_the_temporary_exists(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    with pytest.raises(RuntimeError, match="early"):
        with atomic_output(out):
            raise RuntimeError("early")
    assert list(tmp_path.iterdir()) == []


def test_block_that_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    with pytest.raises(OutputError, match=rf"output {re.escape(str(out))}: cannot be written"):
        with atomic_output(out):
            pass
    assert list(tmp_path.iterdir()) == []


def test_accepts_a_string_path(tmp_path: Path) -> None:
    out = tmp_path / "avg.pt"
    with atomic_output(str(out)) as temporary:  # type: ignore[arg-type]
        Path(temporary).write_bytes(b"x")
    assert out.read_bytes() == b"x"


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    stale = tmp_path / f".avg.safetensors.polyak-tmp-{dead_pid()}-abcd"
    stale.write_bytes(b"left by a killed run")
    with atomic_output(out) as temporary:
        assert not stale.exists()
        temporary.write_bytes(b"new")
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_temporaries_of_live_processes_and_other_outputs_are_kept(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    live_other = tmp_path / f".avg.safetensors.polyak-tmp-{os.getppid()}-beef"
    own = tmp_path / f".avg.safetensors.polyak-tmp-{os.getpid()}-cafe"
    other_output = tmp_path / f".other.safetensors.polyak-tmp-{dead_pid()}-abcd"
    not_a_pid = tmp_path / ".avg.safetensors.polyak-tmp-notapid-abcd"
    for path in (live_other, own, other_output, not_a_pid):
        path.write_bytes(b"keep")
    with atomic_output(out) as temporary:
        temporary.write_bytes(b"new")
    for path in (live_other, own, other_output, not_a_pid):
        assert path.exists(), path.name


def test_stale_temporary_removed_even_if_the_new_write_fails(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    stale = tmp_path / f".avg.npz.polyak-tmp-{dead_pid()}-abcd"
    stale.write_bytes(b"old leftovers")
    with pytest.raises(RuntimeError):
        with atomic_output(out):
            raise RuntimeError("fails")
    assert not stale.exists()


def test_stale_temporary_removed_for_a_name_with_glob_characters(tmp_path: Path) -> None:
    out = tmp_path / "avg[1].npz"
    stale = tmp_path / f".avg[1].npz.polyak-tmp-{dead_pid()}-abcd"
    stale.write_bytes(b"left by a killed run")
    with atomic_output(out) as temporary:
        temporary.write_bytes(b"new")
    assert not stale.exists()


# ---------------------------------------------------------------- check_output_path


def test_a_fresh_output_is_fine(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    check_output_path(tmp_path / "avg.pt", [source], overwrite=False)


def test_output_equal_to_an_input(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.write_bytes(b"weights")
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(source))}: is the input {re.escape(str(source))}; "
        "polyak never overwrites an input",
    ):
        check_output_path(source, [tmp_path / "model_0.pt", source], overwrite=True)
    assert source.read_bytes() == b"weights"


def test_output_equal_to_an_input_by_another_spelling(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(Path("model_1.pt"), [source], overwrite=True)
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(tmp_path / "sub" / ".." / "model_1.pt", [source], overwrite=True)


def test_output_through_a_symlink(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    link = tmp_path / "avg.pt"
    link.symlink_to(source)
    with pytest.raises(OutputError, match=rf"output {re.escape(str(link))}: is the input"):
        check_output_path(link, [source], overwrite=True)


def test_input_given_through_a_symlink(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    link = tmp_path / "link_1.pt"
    link.symlink_to(source)
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(source, [link], overwrite=True)


def test_output_through_a_hard_link(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    hard = tmp_path / "avg.pt"
    os.link(source, hard)
    with pytest.raises(
        OutputError, match=rf"output {re.escape(str(hard))}: is the input {re.escape(str(source))}"
    ):
        check_output_path(hard, [source], overwrite=True)


def test_output_inside_a_directory_input(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-500"
    checkpoint.mkdir()
    model = checkpoint / "model.safetensors"
    model.touch()
    with pytest.raises(OutputError, match=rf"is the input {re.escape(str(model))}"):
        check_output_path(model, [checkpoint], overwrite=True)
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(checkpoint, [checkpoint], overwrite=True)


def test_existing_output_without_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = tmp_path / "avg.pt"
    out.write_bytes(b"previous")
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: already exists\. Pass overwrite=True to replace it",
    ):
        check_output_path(out, [source], overwrite=False)
    check_output_path(out, [source], overwrite=True)
    assert out.read_bytes() == b"previous"


def test_file_output_that_is_a_directory(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = tmp_path / "avg.pt"
    out.mkdir()
    with pytest.raises(OutputError, match=rf"output {re.escape(str(out))}: is a directory"):
        check_output_path(out, [source], overwrite=True)
    # Told explicitly that the output is a file, a suffix-less directory is refused too.
    other = tmp_path / "avg"
    other.mkdir()
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        check_output_path(other, [source], overwrite=True, directory=False)


def test_missing_parent_directory(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = tmp_path / "missing" / "avg.pt"
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: the directory "
        rf"{re.escape(str(out.parent))} does not exist",
    ):
        check_output_path(out, [source], overwrite=False)


def test_output_error_is_an_os_error() -> None:
    assert issubclass(OutputError, OSError)


# ---------------------------------------------------------------- output directories


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("averaged/", True),
        ("averaged", True),
        ("runs/avg.v1/", True),
        (Path("runs/averaged"), True),
        (".", True),
        ("avg.safetensors", False),
        ("avg.v1", False),
        (Path("runs/avg.pt"), False),
        ("avg/model.safetensors.index.json", False),
    ],
)
def test_is_directory_output(out, expected) -> None:
    assert is_directory_output(out) is expected


def test_a_fresh_or_empty_output_directory_is_fine(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    check_output_path(tmp_path / "averaged", [source], overwrite=False)
    (tmp_path / "empty").mkdir()
    check_output_path(tmp_path / "empty", [source], overwrite=False)


def test_existing_output_directory_needs_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = checkpoint_directory(tmp_path / "averaged")
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: already exists\. Pass overwrite=True to replace it",
    ):
        check_output_path(out, [source], overwrite=False)
    check_output_path(out, [source], overwrite=True)
    (out / "model-00001-of-00002.safetensors").unlink()
    (out / "model.safetensors").write_bytes(b"x")  # an unsharded checkpoint directory
    check_output_path(out, [source], overwrite=True)


@pytest.mark.parametrize("foreign", ["config.json", "notes/", "run_1.pt"])
def test_output_directory_with_other_files_is_never_replaced(tmp_path: Path, foreign) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = checkpoint_directory(tmp_path / "averaged")
    if foreign.endswith("/"):
        (out / foreign).mkdir()
    else:
        (out / foreign).write_text("{}")
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: holds {re.escape(foreign)}, which polyak did not "
        "write; overwrite=True replaces the whole directory, so polyak refuses to",
    ):
        check_output_path(out, [source], overwrite=True)


def test_output_directory_holding_an_input(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    source = run / "model_1.pt"
    source.touch()
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(run))}: holds the input {re.escape(str(source))}; polyak "
        "never overwrites an input",
    ):
        check_output_path(run, [source], overwrite=True)
    with pytest.raises(OutputError, match="holds the input"):
        check_output_path(tmp_path, [source], overwrite=True)


def test_output_directory_that_is_a_directory_input(tmp_path: Path) -> None:
    checkpoint = checkpoint_directory(tmp_path / "checkpoint-500")
    with pytest.raises(OutputError, match=rf"is the input {re.escape(str(checkpoint))}"):
        check_output_path(checkpoint, [checkpoint], overwrite=True)
    link = tmp_path / "averaged"
    link.symlink_to(checkpoint)
    with pytest.raises(OutputError, match="is the input"):
        check_output_path(link, [checkpoint], overwrite=True)


@pytest.mark.parametrize("inside", ["averaged", "avg.safetensors"])
def test_new_output_inside_a_directory_input(tmp_path: Path, inside) -> None:
    checkpoint = checkpoint_directory(tmp_path / "checkpoint-500")
    out = checkpoint / inside
    with pytest.raises(
        OutputError,
        match=rf"output {re.escape(str(out))}: lies inside the input checkpoint directory "
        rf"{re.escape(str(checkpoint))}; polyak never writes into an input",
    ):
        check_output_path(out, [checkpoint], overwrite=False)


def test_output_directory_that_is_a_symlink_or_a_file(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    elsewhere = checkpoint_directory(tmp_path / "elsewhere")
    link = tmp_path / "averaged"
    link.symlink_to(elsewhere)
    with pytest.raises(OutputError, match=rf"output {re.escape(str(link))}: is a symbolic link"):
        check_output_path(link, [source], overwrite=True)
    file = tmp_path / "plain"
    file.write_bytes(b"a file")
    with pytest.raises(
        OutputError, match=rf"output {re.escape(str(file))}: is a file, but a path without a suffix"
    ):
        check_output_path(file, [source], overwrite=True)


def test_output_directory_parent_must_exist(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = tmp_path / "missing" / "averaged"
    with pytest.raises(OutputError, match=r"the directory .*missing does not exist"):
        check_output_path(out, [source], overwrite=False)


def test_atomic_directory_renames_on_success(tmp_path: Path) -> None:
    out = tmp_path / "averaged"
    with atomic_directory(out) as temporary:
        assert temporary.parent == tmp_path and temporary.is_dir()
        assert temporary.name.startswith(f".averaged.polyak-tmp-{os.getpid()}-")
        (temporary / "model.safetensors").write_bytes(b"new")
        assert not out.exists()
    assert contents(out) == {"model.safetensors": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_fills_an_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "averaged"
    out.mkdir()
    with atomic_directory(out) as temporary:
        (temporary / "model.safetensors").write_bytes(b"new")
    assert contents(out) == {"model.safetensors": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_replaces_a_previous_output_as_a_whole(tmp_path: Path) -> None:
    out = checkpoint_directory(tmp_path / "averaged")
    with atomic_directory(out, overwrite=True) as temporary:
        (temporary / "model.safetensors").write_bytes(b"new")
        assert contents(out)["model.safetensors.index.json"] == b"old"
    # No old shard survives beside the new file.
    assert contents(out) == {"model.safetensors": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_failure_keeps_the_previous_output(tmp_path: Path) -> None:
    out = checkpoint_directory(tmp_path / "averaged")
    before = contents(out)
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_directory(out, overwrite=True) as temporary:
            (temporary / "model-00001-of-00002.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk on fire")
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_failure_leaves_nothing_when_there_was_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "averaged") as temporary:
            (temporary / "model-00001-of-00002.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_puts_the_old_output_back_if_the_new_cannot_go_in(
    tmp_path: Path, monkeypatch
) -> None:
    out = checkpoint_directory(tmp_path / "averaged")
    before = contents(out)
    real_rename = os.rename

    def rename(source, target):
        if ".polyak-tmp-" in os.fspath(source):
            raise OSError(28, "No space left on device")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(
        OutputError, match=rf"output {re.escape(str(out))}: cannot be written \(No space left"
    ):
        with atomic_directory(out, overwrite=True) as temporary:
            (temporary / "model.safetensors").write_bytes(b"new")
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_refuses_files_that_appeared_meanwhile(tmp_path: Path) -> None:
    out = checkpoint_directory(tmp_path / "averaged")
    with pytest.raises(OutputError, match=r"holds config\.json, which polyak did not write"):
        with atomic_directory(out, overwrite=True) as temporary:
            (temporary / "model.safetensors").write_bytes(b"new")
            (out / "config.json").write_text("{}")
    assert "config.json" in contents(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_atomic_directory_cleans_stale_leftovers_of_dead_processes(tmp_path: Path) -> None:
    dead = dead_pid()
    stale = tmp_path / f".averaged.polyak-tmp-{dead}-abcd"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    live = tmp_path / f".averaged.polyak-tmp-{os.getppid()}-beef"
    live.mkdir()
    old = checkpoint_directory(tmp_path / f".averaged.polyak-old-{dead}-abcd")
    # No output yet: the set-aside old output is the only copy, so it is kept...
    with atomic_directory(tmp_path / "averaged") as temporary:
        assert not stale.exists() and live.exists() and old.exists()
        (temporary / "model.safetensors").write_bytes(b"new")
    # ...until the new output is in: this write leaves nothing of the killed one.
    assert not old.exists() and live.exists()
    assert contents(tmp_path / "averaged") == {"model.safetensors": b"new"}
    with atomic_directory(tmp_path / "averaged", overwrite=True) as temporary:
        (temporary / "model.safetensors").write_bytes(b"newer")
    assert contents(tmp_path / "averaged") == {"model.safetensors": b"newer"}


# ---------------------------------------------------------------- create-if-absent


def test_a_file_another_writer_committed_meanwhile_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with pytest.raises(OutputError, match=r"created by another writer.*overwrite=True"):
        with atomic_output(out) as temporary:
            temporary.write_bytes(b"mine")
            out.write_bytes(b"theirs")  # the other run finished first
    assert out.read_bytes() == b"theirs"
    assert leftovers(tmp_path) == []


def test_a_file_committed_meanwhile_is_replaced_under_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "avg.safetensors"
    with atomic_output(out, overwrite=True) as temporary:
        temporary.write_bytes(b"mine")
        out.write_bytes(b"theirs")
    assert out.read_bytes() == b"mine"


def test_a_directory_another_writer_committed_meanwhile_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "averaged"
    with pytest.raises(OutputError, match=r"created by another writer"):
        with atomic_directory(out) as temporary:
            (temporary / "model.safetensors").write_bytes(b"mine")
            checkpoint_directory(out, b"theirs")
    assert set(contents(out).values()) == {b"theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_an_existing_directory_is_never_set_aside_without_overwrite(tmp_path: Path) -> None:
    out = checkpoint_directory(tmp_path / "averaged")
    before = contents(out)
    with pytest.raises(OutputError, match=r"created by another writer"):
        with atomic_directory(out) as temporary:
            (temporary / "model.safetensors").write_bytes(b"new")
    assert contents(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def test_two_averages_to_one_output_the_second_exits_2(tmp_path: Path) -> None:
    """Two real `polyak average` processes race for one output: one wins, one exits 2."""
    import sys

    import numpy as np
    from safetensors.numpy import save_file

    for step in (1, 2):
        save_file(
            {"w": np.full((64, 64), step, np.float32)}, str(tmp_path / f"m_{step}.safetensors")
        )
    out = tmp_path / "out" / "avg.safetensors"
    out.parent.mkdir()
    command = [sys.executable, "-m", "polyak", "average", str(tmp_path), "-o", str(out)]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(p.wait(), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes.count(0) == 1 and set(codes) <= {0, 2}, results
    for code, err in results:
        if code == 2:
            assert err.count("\n") == 1 and ("already exists" in err or "another writer" in err)
    assert sorted(p.name for p in out.parent.iterdir()) == ["avg.safetensors"]
