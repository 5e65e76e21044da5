"""The command line: output, one-line errors, exit codes 0/2/1, inputs left untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import polyak
from polyak.cli.main import main


def run(arguments: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    for step in range(490, 500):
        save_file(
            {
                "dense/kernel": np.full((2, 3), float(step), np.float32),
                "steps": np.array(step, dtype=np.int64),
            },
            str(directory / f"ckpt_{step}.safetensors"),
        )
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_inspect_lists_checkpoints_newest_first(run_dir, capsys):
    code, out, _ = run(["inspect", str(run_dir), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert [Path(row["path"]).name for row in report["checkpoints"]][:2] == [
        "ckpt_499.safetensors",
        "ckpt_498.safetensors",
    ]
    first = report["checkpoints"][0]
    assert (first["format"], first["step"], first["tensors"], first["parameters"]) == (
        "safetensors",
        499,
        2,
        7,
    )
    assert report["compatible"] is True


def test_inspect_table_says_whether_they_average(run_dir, capsys):
    save_file({"other": np.zeros(1, np.float32)}, str(run_dir / "ckpt_500.safetensors"))
    code, out, _ = run(["inspect", str(run_dir), "--last", "3"], capsys)
    assert code == 0
    assert "ckpt_500" in out and "ckpt_497" not in out
    assert "Cannot be averaged together" in out
    assert "ckpt_500.safetensors has tensor other that ckpt_499.safetensors lacks" in out


def test_average_writes_output_and_prints_members_and_weights(run_dir, tmp_path, capsys):
    out_file = tmp_path / "avg.safetensors"
    code, out, err = run(
        ["average", str(run_dir), "--last", "3", "--scheme", "linear", "-o", str(out_file)],
        capsys,
    )
    assert code == 0, err
    assert "0.5000" in out and "0.3333" in out and "0.1667" in out
    assert "Wrote" in out
    result = load_file(str(out_file))
    np.testing.assert_allclose(result["dense/kernel"], (3 * 499 + 2 * 498 + 497) / 6)
    assert result["steps"] == 499


def test_average_json(run_dir, tmp_path, capsys):
    out_file = tmp_path / "avg.npz"
    code, out, _ = run(
        [
            "average",
            str(run_dir / "ckpt_*.safetensors"),
            "-s",
            "exp:2",
            "-o",
            str(out_file),
            "--json",
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    assert report["format"] == "npz" and report["scheme"] == "exp:2"
    weights = np.exp(-np.arange(10) / 2)
    np.testing.assert_allclose([m["weight"] for m in report["members"]], weights / weights.sum())
    assert report["members"][0]["step"] == 499


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-s", "custom:1,2"], "custom weights: 2 values were given for 10 members"),
        (["-s", "exp:-1"], "alpha must be a finite number > 0"),
        (["-s", "bogus"], "unknown scheme 'bogus'"),
        (["--last", "0"], "last must be a whole number >= 1"),
        (["--min-members", "0"], "error: --min-members must be a whole number >= 1; received 0."),
        (["--integers", "mean"], "--integers must be one of newest, require-equal"),
    ],
)
def test_bad_options_exit_2_with_one_line(run_dir, tmp_path, capsys, arguments, message):
    before = snapshot(run_dir)
    out_file = tmp_path / "avg.safetensors"
    code, _, err = run(["average", str(run_dir), "-o", str(out_file), *arguments], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("polyak: error: ")
    assert not out_file.exists()
    assert snapshot(run_dir) == before


def test_output_equal_to_an_input_is_refused(run_dir, capsys):
    before = snapshot(run_dir)
    target = run_dir / "ckpt_495.safetensors"
    code, _, err = run(["average", str(run_dir), "-o", str(target), "--overwrite"], capsys)
    assert code == 2
    assert "polyak never overwrites an input" in err
    assert snapshot(run_dir) == before


def test_existing_output_needs_overwrite(run_dir, tmp_path, capsys):
    out_file = tmp_path / "avg.safetensors"
    out_file.write_bytes(b"keep me")
    code, _, err = run(["average", str(run_dir), "-o", str(out_file)], capsys)
    assert code == 2 and "Pass --overwrite" in err
    assert out_file.read_bytes() == b"keep me"


def test_incompatible_members_exit_2_naming_files(run_dir, tmp_path, capsys):
    save_file(
        {"dense/kernel": np.zeros((2, 4), np.float32), "steps": np.array(1)},
        str(run_dir / "ckpt_500.safetensors"),
    )
    code, _, err = run(["average", str(run_dir), "-o", str(tmp_path / "a.safetensors")], capsys)
    assert code == 2
    assert "ckpt_499.safetensors: tensor dense/kernel has shape (2, 3);" in err
    assert "ckpt_500.safetensors has (2, 4)" in err


def test_corrupt_checkpoint_exit_2_naming_the_file(run_dir, tmp_path, capsys):
    (run_dir / "ckpt_500.safetensors").write_bytes(b"\x00" * 4)
    code, _, err = run(["average", str(run_dir), "-o", str(tmp_path / "a.safetensors")], capsys)
    assert code == 2
    assert "ckpt_500.safetensors: 4 bytes is too small" in err


def test_verbose_shows_the_traceback(run_dir, tmp_path, capsys):
    code, _, err = run(
        ["-v", "average", str(run_dir), "-s", "bogus", "-o", str(tmp_path / "a.safetensors")],
        capsys,
    )
    assert code == 2
    assert "Traceback" in err and "unknown scheme 'bogus'" in err


def test_usage_error_exits_2(capsys):
    code, _, err = run(["average"], capsys)
    assert code == 2
    assert "Missing" in err


def test_missing_path_exits_2(tmp_path, capsys):
    code, _, err = run(["inspect", str(tmp_path / "nope.pt")], capsys)
    assert code == 2
    assert f"checkpoint {tmp_path / 'nope.pt'}: no such file or directory" in err


@pytest.mark.parametrize("where", ["input", "output", "glob"])
def test_a_path_the_file_system_refuses_is_a_one_line_error(run_dir, tmp_path, where, capsys):
    """Before: a name too long for the file system was an "internal error" (OSError)."""
    long = str(tmp_path / ("x" * 5000))
    arguments = {
        "input": ["average", long, str(run_dir), "-o", str(tmp_path / "a.safetensors")],
        "output": ["average", str(run_dir), "-o", long + ".safetensors"],
        "glob": ["inspect", long + "/*.pt"],
    }[where]
    code, _, err = run(arguments, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("polyak: error: ") and "File name too long" in err, err
    assert not (tmp_path / "a.safetensors").exists()


def test_a_bug_exits_1_with_a_hint(monkeypatch, run_dir, tmp_path, capsys):
    import polyak.cli.average as average_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(average_module, "average_to", broken)
    code, _, err = run(["average", str(run_dir), "-o", str(tmp_path / "a.safetensors")], capsys)
    assert code == 1
    assert "internal error" in err and "RuntimeError: boom" in err and "-v" in err


def test_module_entry_point_and_version():
    completed = subprocess.run(
        [sys.executable, "-m", "polyak", "--version"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0
    assert completed.stdout.startswith("polyak ")


def test_console_script_error_exit_code(tmp_path):
    script = Path(sys.executable).parent / "polyak"
    if not script.exists():
        pytest.skip("console script not installed")
    completed = subprocess.run(
        [str(script), "average", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0
    assert "missing.pt: no such file or directory" in completed.stderr


# ---------------------------------------------------------------- checkpoint directory output


def test_average_into_a_sharded_directory_then_inspect_it(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "averaged"
    code, out, err = run(
        ["average", str(run_dir), "-o", f"{out_dir}/", "--max-shard-size", "30B", "--json"],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "sharded-safetensors"
    assert report["output"] == str(out_dir)
    assert [Path(f).name for f in report["files"]] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    single = tmp_path / "single.safetensors"
    assert run(["average", str(run_dir), "-o", str(single)], capsys)[0] == 0
    merged = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        merged |= load_file(str(shard))
    assert merged.keys() == load_file(str(single)).keys()
    for name, array in load_file(str(single)).items():
        assert merged[name].tobytes() == array.tobytes()
    code, out, _ = run(["inspect", str(out_dir), "--json"], capsys)
    assert code == 0
    row = json.loads(out)["checkpoints"][0]
    assert (row["format"], row["shards"], row["tensors"]) == ("sharded-safetensors", 2, 2)


def test_average_into_a_directory_prints_its_layout(run_dir, tmp_path, capsys):
    code, out, err = run(["average", str(run_dir), "-o", str(tmp_path / "averaged")], capsys)
    assert code == 0, err
    assert "Wrote" in out and "1 file" in out
    assert [p.name for p in (tmp_path / "averaged").iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize(
    ("output", "arguments", "message"),
    [
        (
            "averaged",
            ["--max-shard-size", "5 parsecs"],
            "--max-shard-size must be a size above 0 such as 500MB, 2GB, 1.5GiB or a whole "
            "number of bytes; received '5 parsecs'.",
        ),
        ("averaged", ["--max-shard-size", "0"], "--max-shard-size must be a size above 0"),
        (
            "avg.safetensors",
            ["--max-shard-size", "1GB"],
            "avg.safetensors: --max-shard-size splits the output into safetensors shards in a "
            "directory",
        ),
        (
            "averaged/model.safetensors.index.json",
            [],
            "model.safetensors.index.json: a shard index is not a checkpoint file of its own. "
            "Give the directory to write the shards and the index into instead",
        ),
    ],
)
def test_directory_output_refusals_exit_2(run_dir, tmp_path, capsys, output, arguments, message):
    (tmp_path / "averaged").mkdir()
    code, _, err = run(["average", str(run_dir), "-o", str(tmp_path / output), *arguments], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("polyak: error: ")
    assert list((tmp_path / "averaged").iterdir()) == []


def test_existing_output_directory_needs_overwrite(run_dir, tmp_path, capsys):
    out_dir = tmp_path / "averaged"
    assert run(["average", str(run_dir), "-o", str(out_dir)], capsys)[0] == 0
    before = snapshot(out_dir)
    code, _, err = run(["average", str(run_dir), "-o", str(out_dir), "--last", "2"], capsys)
    assert code == 2
    assert f"output {out_dir}: already exists. Pass --overwrite to replace it." in err
    assert snapshot(out_dir) == before
    code, _, err = run(
        ["average", str(run_dir), "-o", str(out_dir), "--last", "2", "--overwrite"], capsys
    )
    assert code == 0, err
    assert snapshot(out_dir) != before


def test_output_directory_holding_the_inputs_is_refused(run_dir, capsys):
    before = snapshot(run_dir)
    code, _, err = run(["average", str(run_dir), "-o", f"{run_dir}/", "--overwrite"], capsys)
    assert code == 2
    assert f"output {run_dir}: holds the input {run_dir}/ckpt_" in err
    assert "polyak never overwrites an input" in err
    assert snapshot(run_dir) == before


def test_output_inside_an_input_checkpoint_directory_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint-500"
    checkpoint.mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(checkpoint / "model.safetensors"))
    before = snapshot(checkpoint)
    code, _, err = run(["average", str(checkpoint), "-o", str(checkpoint / "avg")], capsys)
    assert code == 2
    assert f"output {checkpoint / 'avg'}: lies inside the input checkpoint directory" in err
    assert snapshot(checkpoint) == before


def test_average_window_in_steps_and_tokens(tmp_path: Path, capsys) -> None:
    directory = tmp_path / "run"
    directory.mkdir()
    for step in (100, 200, 300, 400):
        np.savez(directory / f"model_step{step}.npz", w=np.full(3, float(step), np.float32))
    out = tmp_path / "avg.npz"
    code, stdout, _ = run(
        ["average", str(directory), "--window-steps", "200", "-o", str(out), "--json"], capsys
    )
    assert code == 0
    assert [m["step"] for m in json.loads(stdout)["members"]] == [400, 300, 200]
    np.testing.assert_array_equal(np.load(out)["w"], np.full(3, 300.0, np.float32))
    arguments = ["--window-tokens", "4e6", "--tokens-per-step", "4e4", "--overwrite"]
    code, stdout, _ = run(["average", str(directory), *arguments, "-o", str(out), "--json"], capsys)
    assert code == 0 and len(json.loads(stdout)["members"]) == 2
    code, _, stderr = run(
        ["average", str(directory), "--window-tokens", "4e6", "-o", str(out)], capsys
    )
    assert code == 2 and "needs the tokens per step" in stderr


# ---------------------------------------------------------------- start-up: what a command imports

# Modules a command must not import unless its files need them: each costs from 0.1 s
# (h5py) to over a second (ml_dtypes 0.7, torch, keras) before a byte is read.
HEAVY_MODULES = ("ml_dtypes", "torch", "keras", "h5py", "matplotlib", "scipy")

# Runs the command line in a fresh interpreter, then writes the names of every module
# it imported (sys.modules at exit) to the file named by the first argument.
IMPORTS_PROBE = """
import json, sys
from polyak.cli.main import main
record, arguments = sys.argv[1], sys.argv[2:]
try:
    main(arguments)
except SystemExit as exited:
    code = exited.code
with open(record, "w") as file:
    json.dump({"code": code, "modules": sorted(sys.modules)}, file)
"""


def imported_by_command(arguments: list[str], tmp_path: Path) -> set[str]:
    """Top-level names of the modules ``polyak ARGUMENTS`` imported, in a fresh process."""
    record = tmp_path / "imports.json"
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTS_PROBE, str(record), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(record.read_text())
    assert result["code"] in (0, None), completed.stderr
    return {name.split(".")[0] for name in result["modules"]}


def float32_pair(tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    """Two members of one format, written by their own library: w = 0, then w = 1."""
    paths = tmp_path / f"model_1{suffix}", tmp_path / f"model_2{suffix}"
    for value, path in enumerate(paths):
        weights = np.full((3, 2), float(value), np.float32)
        if suffix == ".safetensors":
            save_file({"w": weights}, str(path))
        elif suffix == ".npz":
            np.savez(path, w=weights)
        else:
            import torch

            torch.save({"w": torch.from_numpy(weights)}, path)
    return paths


COMMANDS = {
    "average": ["average", "{a}", "{b}", "-o", "{out}"],
    "inspect-json": ["inspect", "{a}", "{b}", "--json"],
}


@pytest.mark.parametrize(
    ("suffix", "command"),
    [
        pytest.param(".safetensors", ["--version"], id="version"),
        pytest.param(".safetensors", ["inspect", "{a}"], id="inspect-table.safetensors"),
    ]
    + [
        # .pt too: polyak reads and writes torch's zip format without torch.
        pytest.param(suffix, command, id=f"{name}{suffix}")
        for suffix in (".safetensors", ".npz", ".pt")
        for name, command in COMMANDS.items()
    ],
)
def test_commands_import_no_heavy_module(suffix, command, tmp_path):
    a, b = float32_pair(tmp_path, suffix)
    out = tmp_path / f"out{suffix}"
    arguments = [part.format(a=a, b=b, out=out) for part in command]
    imported = imported_by_command(arguments, tmp_path)
    assert "polyak" in imported and "typer" in imported  # the probe ran the command line
    assert sorted(imported.intersection(HEAVY_MODULES)) == []
    if "average" in command:
        with polyak.open_checkpoint(out) as reader:
            np.testing.assert_array_equal(reader.read("w"), np.full((3, 2), 0.5, np.float32))


def test_inspect_of_bfloat16_files_reads_dtypes_from_headers_only(tmp_path):
    import ml_dtypes  # to write the files; the probe starts a process without it

    path = tmp_path / "half.safetensors"
    save_file({"w": np.ones((2, 2), ml_dtypes.bfloat16)}, str(path))
    imported = imported_by_command(["inspect", str(path), "--json"], tmp_path)
    assert "ml_dtypes" not in imported


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_bfloat16_average_from_the_command_line_imports_ml_dtypes_when_needed(suffix, tmp_path):
    # A fresh process, as a user runs it: ml_dtypes is imported on meeting bfloat16.
    import ml_dtypes
    import torch

    rng = np.random.default_rng(3)
    members = [rng.standard_normal((4, 5)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    paths = []
    for step, values in enumerate(members):
        paths.append(tmp_path / f"ckpt_{step}{suffix}")
        wide = values.astype(np.float32)  # bfloat16 values, exactly
        if suffix == ".safetensors":
            save_file({"w": values, "f": wide}, str(paths[-1]))
        else:
            tensors = {"w": torch.from_numpy(wide).to(torch.bfloat16), "f": torch.from_numpy(wide)}
            torch.save(tensors, paths[-1])
    out = tmp_path / f"out{suffix}"
    imported = imported_by_command(["average", *map(str, paths), "-o", str(out)], tmp_path)
    assert "ml_dtypes" in imported and "torch" not in imported
    if suffix == ".safetensors":
        averaged = load_file(str(out))
        half, single = averaged["w"], averaged["f"]
        assert half.dtype == ml_dtypes.bfloat16
        half = half.astype(np.float64)
    else:
        averaged = torch.load(out, weights_only=True)
        assert averaged["w"].dtype == torch.bfloat16
        half, single = averaged["w"].double().numpy(), averaged["f"].numpy()
    reference = np.mean([values.astype(np.float64) for values in members], axis=0)
    # One rounding to bfloat16 (unit roundoff 2^-8) of a float32-accurate mean.
    np.testing.assert_allclose(half, reference, rtol=2.0**-8 + 2.0**-20)
    np.testing.assert_allclose(single, reference, rtol=1e-6, atol=1e-7)


def test_progress_bar_shows_on_a_terminal_after_its_delay(monkeypatch):
    import io

    from rich.console import Console

    from polyak.cli import output

    screen = io.StringIO()
    monkeypatch.setattr(output, "error_console", Console(file=screen, force_terminal=True))
    with output.DelayedProgress("Averaging", delay=0.0) as progress:
        progress.start(total=2048)
        progress.advance(1024)
        assert progress._progress is not None  # shown: rich.progress imported on demand
        progress.advance(1024)
    assert "Averaging" in screen.getvalue()
    quiet = output.DelayedProgress("Averaging", delay=3600.0)
    quiet.start(total=10)
    quiet.advance(10)
    assert quiet._progress is None  # not shown before its delay


def test_control_characters_in_names_are_escaped_in_the_one_line_error(tmp_path, capsys):
    """Before: a tensor name holding a newline printed a second line that read like
    polyak's own output."""
    fake = "w\npolyak: done \x1b[2J"
    save_file({fake: np.ones(2, np.float32)}, str(tmp_path / "a_2.safetensors"))
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "a_1.safetensors"))
    code, _, err = run(["average", str(tmp_path), "-o", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert "has tensor w\\npolyak: done \\x1b[2J that a_1.safetensors lacks" in err


def test_a_hostile_names_length_is_bounded_in_the_one_line_error(tmp_path, capsys):
    """Before: an index naming a 10,000-character shard printed all of it on one line."""
    checkpoint = tmp_path / "ck"
    checkpoint.mkdir()
    save_file({"a": np.zeros(2, np.float32)}, str(checkpoint / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "x" * 10_000 + ".safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run(["inspect", str(checkpoint)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"polyak: error: checkpoint {checkpoint}")
    from polyak.cli import output

    assert len(err) <= len("polyak: error: ") + output.MAX_MESSAGE + 50
    assert "characters left out" in err


def test_control_characters_in_a_note_are_escaped(tmp_path, capsys):
    # The one-member note names the member: its path may hold a newline too.
    run_dir = tmp_path / "run\npolyak: done"
    run_dir.mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(run_dir / "a_1.safetensors"))
    code, _, err = run(["average", str(run_dir), "-o", str(tmp_path / "x.safetensors")], capsys)
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("polyak: note: only one checkpoint"), err
    assert "run\\npolyak: done" in err


@pytest.mark.parametrize(
    ("message", "named", "said"),
    [
        ("Pass overwrite=True to replace it.", (), "Pass --overwrite to replace it."),
        ("integers='require-equal' forbids that", (), "--integers require-equal forbids that"),
        ("fewer than min_members=2; or lower it.", (), "fewer than --min-members 2; or lower it."),
        ("widths (sigma_rel) are numbers", (), "widths (sigma_rel) are numbers"),
        ("last must be a whole number >= 1 or None; received 0.", ("last",),
         "--last must be a whole number >= 1; received 0."),
        # A plain word is not a flag unless the error is about that parameter, and a
        # name inside a path never is.
        ("the last member", (), "the last member"),
        ("output runs/last/min_members.npz: last", ("last",),
         "output runs/last/min_members.npz: --last"),
        ("checkpoint a.pt: key='ema' was given; pass key=NAME.", (),
         "checkpoint a.pt: --key ema was given; pass --key NAME."),
    ],
)  # fmt: skip
def test_library_messages_are_said_with_the_commands_flags(message, named, said):
    from polyak.cli.average import average_command
    from polyak.cli.output import flags_of, in_flags

    flags = {**flags_of(average_command), "key": "--key"}
    assert in_flags(message, flags, named) == said


def test_a_refusal_names_the_flag_that_lifts_it(tmp_path, capsys):
    for number in (1, 2):
        save_file(
            {"steps": np.array([number], np.int64)}, str(tmp_path / f"ck_{number}.safetensors")
        )
    out = tmp_path / "avg.safetensors"
    arguments = ["average", str(tmp_path), "-o", str(out), "--integers", "require-equal"]
    code, _, err = run(arguments, capsys)
    assert code == 2 and not out.exists()
    assert "and --integers require-equal forbids that. Pass --integers newest to take" in err
