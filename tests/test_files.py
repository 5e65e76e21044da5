"""Tests of polyak.files: atomic outputs and refusing to overwrite inputs, in tmp_path."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from polyak.errors import OutputError
from polyak.files import atomic_output, check_output_path


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".polyak-tmp-" in p.name)


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
    with atomic_output(out) as temporary:
        temporary.write_bytes(b"new")
        assert out.read_bytes() == b"old"
    assert out.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


def test_exception_keeps_the_previous_content(tmp_path: Path) -> None:
    out = tmp_path / "avg.npz"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output(out) as temporary:
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
        match=rf"output {re.escape(str(out))}: already exists\. Pass --overwrite to replace it",
    ):
        check_output_path(out, [source], overwrite=False)
    check_output_path(out, [source], overwrite=True)
    assert out.read_bytes() == b"previous"


def test_output_that_is_a_directory(tmp_path: Path) -> None:
    source = tmp_path / "model_1.pt"
    source.touch()
    out = tmp_path / "avg"
    out.mkdir()
    with pytest.raises(OutputError, match=rf"output {re.escape(str(out))}: is a directory"):
        check_output_path(out, [source], overwrite=True)


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
