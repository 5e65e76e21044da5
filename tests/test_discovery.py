"""Tests of polyak.discovery: empty files and directories in tmp_path; only names matter."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyak.discovery import Checkpoint, find_checkpoints, order_key, within_window
from polyak.errors import ArgumentError, DiscoveryError


def touch(directory: Path, *names: str) -> list[Path]:
    """Create empty files (and their parent directories); return their paths."""
    paths = []
    for name in names:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        paths.append(path)
    return paths


def names(checkpoints: list[Checkpoint]) -> list[str]:
    return [checkpoint.name for checkpoint in checkpoints]


# ---------------------------------------------------------------- ordering


def test_keras_run_newest_first(tmp_path: Path) -> None:
    files = [f"model_{step}.h5" for step in range(490, 500)]
    random.Random(0).shuffle(files)
    touch(tmp_path, *files)
    found = find_checkpoints(tmp_path)
    assert names(found) == [f"model_{step}.h5" for step in range(499, 489, -1)]
    assert [c.step for c in found] == list(range(499, 489, -1))
    assert all(c.epoch is None for c in found)
    assert found[0].path == tmp_path / "model_499.h5"


def test_natural_not_lexicographic(tmp_path: Path) -> None:
    touch(tmp_path, "model_9.h5", "model_10.h5", "model_100.h5", "model_2.h5")
    assert names(find_checkpoints(tmp_path)) == [
        "model_100.h5",
        "model_10.h5",
        "model_9.h5",
        "model_2.h5",
    ]


def test_natural_order_with_the_keras_run(tmp_path: Path) -> None:
    touch(tmp_path, *(f"model_{step}.h5" for step in range(490, 500)), "model_9.h5", "model_10.h5")
    found = names(find_checkpoints(tmp_path))
    assert found[0] == "model_499.h5"
    assert found[-2:] == ["model_10.h5", "model_9.h5"]
    assert len(found) == 12


def test_zero_padded_numbers(tmp_path: Path) -> None:
    touch(tmp_path, "ckpt_000123.safetensors", "ckpt_000099.safetensors", "ckpt_001000.safetensors")
    found = find_checkpoints(tmp_path)
    assert names(found) == [
        "ckpt_001000.safetensors",
        "ckpt_000123.safetensors",
        "ckpt_000099.safetensors",
    ]
    assert found[1].step == 123
    assert found[1].key == (123,)


def test_number_glued_to_the_name(tmp_path: Path) -> None:
    touch(tmp_path, "checkpoint12.pt", "checkpoint3.pt", "checkpoint100.pt")
    found = find_checkpoints(tmp_path)
    assert names(found) == ["checkpoint100.pt", "checkpoint12.pt", "checkpoint3.pt"]
    assert found[1].step == 12


def test_every_number_counts_left_to_right(tmp_path: Path) -> None:
    touch(tmp_path, "checkpoint_2_2000.pt", "checkpoint_3_900.pt", "checkpoint_3_1500.pt")
    found = find_checkpoints(tmp_path)
    assert names(found) == ["checkpoint_3_1500.pt", "checkpoint_3_900.pt", "checkpoint_2_2000.pt"]
    assert [c.key for c in found] == [(3, 1500), (3, 900), (2, 2000)]
    assert [c.step for c in found] == [1500, 900, 2000]


def test_lightning_names(tmp_path: Path) -> None:
    touch(tmp_path, "epoch=3-step=1200.ckpt", "epoch=2-step=900.ckpt", "epoch=10-step=4000.ckpt")
    found = find_checkpoints(tmp_path)
    assert names(found) == [
        "epoch=10-step=4000.ckpt",
        "epoch=3-step=1200.ckpt",
        "epoch=2-step=900.ckpt",
    ]
    assert found[1].key == (3, 1200)
    assert found[1].step == 1200
    assert found[1].epoch == 3


def test_order_key_attributes() -> None:
    lightning = order_key(Path("epoch=3-step=1200.ckpt"))
    assert (lightning.key, lightning.step, lightning.epoch) == ((3, 1200), 1200, 3)
    epoch_only = order_key(Path("model_epoch_7.pt"))
    assert (epoch_only.key, epoch_only.step, epoch_only.epoch) == ((7,), 7, 7)
    plain = order_key(Path("model_499.h5"))
    assert (plain.key, plain.step, plain.epoch) == ((499,), 499, None)
    nameless = order_key(Path("last.ckpt"))
    assert (nameless.key, nameless.step, nameless.epoch) == ((), None, None)


def test_order_key_ignores_the_suffix_digits() -> None:
    # ".h5" and ".safetensors" hold no step; the "5" of ".h5" must not count.
    assert order_key(Path("model_7.h5")).key == (7,)
    assert order_key(Path("model_7.weights.h5")).key == (7,)
    assert order_key(Path("model_7.hdf5")).key == (7,)


def test_huggingface_directories(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "checkpoint-500/model.safetensors",
        "checkpoint-500/optimizer.pt",
        "checkpoint-500/scheduler.pt",
        "checkpoint-1000/model.safetensors.index.json",
        "checkpoint-1000/model-00001-of-00002.safetensors",
        "checkpoint-1000/model-00002-of-00002.safetensors",
        "checkpoint-1000/optimizer.pt",
        "checkpoint-1500/pytorch_model.bin",
        "runs/events.out",  # a directory without a model is not a checkpoint
    )
    found = find_checkpoints(tmp_path)
    assert names(found) == ["checkpoint-1500", "checkpoint-1000", "checkpoint-500"]
    assert [c.step for c in found] == [1500, 1000, 500]
    assert all(c.path.is_dir() for c in found)


def test_one_huggingface_directory_is_one_checkpoint(tmp_path: Path) -> None:
    touch(tmp_path, "checkpoint-500/model.safetensors", "checkpoint-500/optimizer.pt")
    found = find_checkpoints(tmp_path / "checkpoint-500")
    assert names(found) == ["checkpoint-500"]
    assert found[0].step == 500


def test_sharded_huggingface_directory_given_directly(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "checkpoint-2/model.safetensors.index.json",
        "checkpoint-2/model-00001-of-00002.safetensors",
        "checkpoint-2/model-00002-of-00002.safetensors",
    )
    assert names(find_checkpoints(tmp_path / "checkpoint-2")) == ["checkpoint-2"]


def test_several_directories_listed(tmp_path: Path) -> None:
    touch(tmp_path, "checkpoint-500/model.safetensors", "checkpoint-1000/model.safetensors")
    found = find_checkpoints([tmp_path / "checkpoint-500", tmp_path / "checkpoint-1000"])
    assert names(found) == ["checkpoint-1000", "checkpoint-500"]


@given(
    steps=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=30, unique=True)
)
def test_property_order_is_by_number_whatever_the_listing_order(steps: list[int]) -> None:
    checkpoints = [order_key(Path(f"model_{step}.pt")) for step in steps]
    ordered = sorted(checkpoints, key=lambda c: c.key, reverse=True)
    assert [c.step for c in ordered] == sorted(steps, reverse=True)


# ---------------------------------------------------------------- globs


def test_glob_order_comes_from_names(tmp_path: Path) -> None:
    touch(tmp_path, "model_9.h5", "model_10.h5", "model_11.h5", "notes.txt")
    found = find_checkpoints(str(tmp_path / "model_*.h5"))
    assert names(found) == ["model_11.h5", "model_10.h5", "model_9.h5"]


def test_glob_skips_files_of_unknown_format(tmp_path: Path) -> None:
    touch(tmp_path, "model_1.pt", "model_2.pt", "model_3.txt")
    assert names(find_checkpoints(str(tmp_path / "model_*"))) == ["model_2.pt", "model_1.pt"]


def test_glob_of_directories(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "checkpoint-500/model.safetensors",
        "checkpoint-1000/model.safetensors",
        "checkpoint-empty/readme.txt",
    )
    found = find_checkpoints(str(tmp_path / "checkpoint-*"))
    assert names(found) == ["checkpoint-1000", "checkpoint-500"]


def test_several_globs_and_files_together(tmp_path: Path) -> None:
    touch(tmp_path, "a/model_1.pt", "a/model_2.pt", "b/model_3.pt")
    found = find_checkpoints([str(tmp_path / "a" / "*.pt"), tmp_path / "b" / "model_3.pt"])
    assert names(found) == ["model_3.pt", "model_2.pt", "model_1.pt"]


# ---------------------------------------------------------------- scans, last, duplicates


def test_scan_skips_last_ckpt_and_hidden_files(tmp_path: Path) -> None:
    touch(
        tmp_path,
        "epoch=1-step=100.ckpt",
        "epoch=2-step=200.ckpt",
        "last.ckpt",
        ".epoch=3-step=300.ckpt",
        ".hidden.pt",
        "notes.txt",
        "hparams.yaml",
    )
    (tmp_path / ".cache").mkdir()
    touch(tmp_path, ".cache/model.safetensors")
    assert names(find_checkpoints(tmp_path)) == ["epoch=2-step=200.ckpt", "epoch=1-step=100.ckpt"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["checkpoint-10.pth.tar", "checkpoint-11.pth.tar", "last.pth.tar", "model_best.pth.tar"],
         ["checkpoint-11.pth.tar", "checkpoint-10.pth.tar"]),
        (["checkpoint1.pt", "checkpoint2.pt", "checkpoint_last.pt", "checkpoint_best.pt"],
         ["checkpoint2.pt", "checkpoint1.pt"]),
    ],
)  # fmt: skip
def test_scan_skips_timm_and_fairseq_copies(tmp_path: Path, files, expected) -> None:
    touch(tmp_path, *files)
    assert names(find_checkpoints(tmp_path)) == expected
    assert names(find_checkpoints(str(tmp_path / "*"))) == expected


def test_last_ckpt_given_explicitly_alone(tmp_path: Path) -> None:
    touch(tmp_path, "last.ckpt", "epoch=1-step=100.ckpt")
    found = find_checkpoints(tmp_path / "last.ckpt")
    assert names(found) == ["last.ckpt"]
    assert found[0].key == ()
    assert found[0].step is None


def test_last_keeps_the_newest(tmp_path: Path) -> None:
    touch(tmp_path, *(f"model_{step}.h5" for step in range(490, 500)))
    found = find_checkpoints(tmp_path, last=3)
    assert names(found) == ["model_499.h5", "model_498.h5", "model_497.h5"]
    assert len(find_checkpoints(tmp_path, last=100)) == 10


def test_same_file_twice_counts_once(tmp_path: Path) -> None:
    touch(tmp_path, "model_1.pt", "model_2.pt")
    found = find_checkpoints(
        [tmp_path / "model_2.pt", str(tmp_path / "model_*.pt"), str(tmp_path / "model_2.pt")]
    )
    assert names(found) == ["model_2.pt", "model_1.pt"]


def test_same_file_by_relative_and_absolute_path(tmp_path: Path, monkeypatch) -> None:
    touch(tmp_path, "model_1.pt", "model_2.pt")
    monkeypatch.chdir(tmp_path)
    found = find_checkpoints(["model_1.pt", tmp_path / "model_1.pt", "model_2.pt"])
    assert names(found) == ["model_2.pt", "model_1.pt"]


def test_single_string_and_path_accepted(tmp_path: Path) -> None:
    (path,) = touch(tmp_path, "model_1.pt")
    assert names(find_checkpoints(str(path))) == ["model_1.pt"]
    assert names(find_checkpoints(path)) == ["model_1.pt"]


def test_a_single_nameless_checkpoint_is_fine(tmp_path: Path) -> None:
    touch(tmp_path, "model.safetensors")
    assert names(find_checkpoints(tmp_path / "model.safetensors")) == ["model.safetensors"]


# ---------------------------------------------------------------- errors


def test_discovery_error_is_a_value_error() -> None:
    assert issubclass(DiscoveryError, ValueError)


def test_same_numbers_are_ambiguous(tmp_path: Path) -> None:
    touch(tmp_path, "model_5.pt", "model_05.pt", "model_6.pt")
    with pytest.raises(
        DiscoveryError, match=r"model_0?5\.pt and .*model_0?5\.pt have the same"
    ) as e:
        find_checkpoints(tmp_path)
    message = str(e.value)
    assert "model_5.pt" in message and "model_05.pt" in message
    assert "(5,)" in message
    assert "Pass only one of them" in message


def test_lightning_version_suffix_is_the_same_step(tmp_path: Path) -> None:
    touch(tmp_path, "epoch=3-step=1200.ckpt", "epoch=3-step=1200-v1.ckpt")
    with pytest.raises(DiscoveryError, match=r"same step numbers \(3, 1200\)") as e:
        find_checkpoints(tmp_path)
    assert "epoch=3-step=1200.ckpt" in str(e.value)
    assert "epoch=3-step=1200-v1.ckpt" in str(e.value)


def test_name_without_number_among_several(tmp_path: Path) -> None:
    touch(tmp_path, "model_1.pt", "model_2.pt", "final.pt")
    with pytest.raises(DiscoveryError, match=r"final\.pt: its name has no step or epoch number"):
        find_checkpoints(tmp_path)


def test_last_ckpt_named_explicitly_with_others(tmp_path: Path) -> None:
    touch(tmp_path, "last.ckpt", "epoch=1-step=100.ckpt")
    with pytest.raises(
        DiscoveryError, match=r"last\.ckpt: last\.ckpt is Lightning's copy of the newest checkpoint"
    ):
        find_checkpoints([tmp_path / "last.ckpt", tmp_path / "epoch=1-step=100.ckpt"])


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "model_1.pt"
    with pytest.raises(
        DiscoveryError, match=rf"checkpoint {re.escape(str(missing))}: no such file or directory"
    ):
        find_checkpoints(missing)


def test_glob_matching_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "model_*.h5")
    with pytest.raises(DiscoveryError, match=rf"pattern {re.escape(pattern)}: no files match"):
        find_checkpoints(pattern)


def test_empty_directory(tmp_path: Path) -> None:
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(DiscoveryError, match=rf"directory {re.escape(str(empty))}: no checkpoints"):
        find_checkpoints(empty)


def test_directory_holding_only_last_and_hidden(tmp_path: Path) -> None:
    touch(tmp_path, "last.ckpt", ".model_1.pt", "notes.txt")
    with pytest.raises(DiscoveryError, match="no checkpoints found"):
        find_checkpoints(tmp_path)


def test_shard_passed_directly(tmp_path: Path) -> None:
    (shard,) = touch(tmp_path, "model-00001-of-00002.safetensors")
    with pytest.raises(
        DiscoveryError,
        match=rf"{re.escape(str(shard))}: looks like one shard.*model\.safetensors\.index\.json",
    ):
        find_checkpoints(shard)


def test_shards_matched_by_a_glob(tmp_path: Path) -> None:
    touch(tmp_path, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    with pytest.raises(DiscoveryError, match="looks like one shard"):
        find_checkpoints(str(tmp_path / "*.safetensors"))


@pytest.mark.parametrize("last", [0, -1])
def test_last_must_be_positive(tmp_path: Path, last: int) -> None:
    touch(tmp_path, "model_1.pt")
    with pytest.raises(ArgumentError, match=rf"last must be a whole number >= 1; received {last}"):
        find_checkpoints(tmp_path, last=last)


def test_last_must_be_an_integer(tmp_path: Path) -> None:
    touch(tmp_path, "model_1.pt")
    with pytest.raises(ArgumentError, match="last must be a whole number >= 1; received 2.5"):
        find_checkpoints(tmp_path, last=2.5)  # type: ignore[arg-type]


def test_nothing_given() -> None:
    with pytest.raises(DiscoveryError, match="no checkpoints given"):
        find_checkpoints([])


def test_glob_matching_only_non_checkpoints_names_the_pattern(tmp_path: Path) -> None:
    touch(tmp_path, "notes.txt", "hparams.txt")
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(DiscoveryError, match=re.escape(pattern)):
        find_checkpoints(pattern)


# --- windows by steps and tokens ------------------------------------------------------


def run_of(steps: list[int]) -> list[Checkpoint]:
    return [order_key(Path(f"step-{step}")) for step in steps]


def test_a_window_keeps_the_members_at_most_that_many_steps_older():
    run = run_of([1000, 900, 800, 700, 500])
    assert [c.step for c in within_window(run, 300)] == [1000, 900, 800, 700]
    assert [c.step for c in within_window(run, 299.5)] == [1000, 900, 800]
    assert [c.step for c in within_window(run, 0)] == [1000]
    assert within_window(run) == run


def test_a_window_in_tokens_is_tokens_over_tokens_per_step():
    run = run_of([1000, 900, 800, 700])
    kept = within_window(run, tokens=2e9, tokens_per_step=1e7)  # 200 steps
    assert [c.step for c in kept] == [1000, 900, 800]


def test_window_refusals():
    run = run_of([1000, 900])
    with pytest.raises(DiscoveryError, match="needs the tokens per step"):
        within_window(run, tokens=1e9)
    with pytest.raises(DiscoveryError, match="not both"):
        within_window(run, 100, tokens=1e9, tokens_per_step=1e6)
    with pytest.raises(DiscoveryError, match=">= 0; received -1"):
        within_window(run, -1)
    with pytest.raises(DiscoveryError, match="model.h5: its name has no step number"):
        within_window([order_key(Path("model.h5"))], 10)
