"""polyak.output: which companion files an output carries (the writers are tested through
polyak.average_to in test_averaging and test_distributed)."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save_file

from polyak.discovery import order_key
from polyak.formats import format_for_output, format_of
from polyak.output import carries_companions, companions_of, companions_to_copy


def test_only_a_directory_output_carries_the_newest_members_companions(tmp_path):
    newest = tmp_path / "checkpoint-500"
    newest.mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(newest / "model.safetensors"))
    (newest / "config.json").write_text("{}")
    (newest / "optimizer.pt").write_bytes(b"")  # training state: never a companion
    member = order_key(newest)
    input_format = format_of(newest)
    assert companions_of(member) == [newest / "config.json"]
    directory = format_for_output(tmp_path / "averaged/", input_format)
    assert companions_to_copy(member, directory) == [newest / "config.json"]
    single = format_for_output(tmp_path / "averaged.safetensors", input_format)
    assert companions_to_copy(member, single) == []
    assert carries_companions(directory) and not carries_companions(single)


def test_a_file_member_has_no_companions(tmp_path):
    newest = tmp_path / "model_500.safetensors"
    save_file({"w": np.ones(2, np.float32)}, str(newest))
    (tmp_path / "config.json").write_text("{}")
    directory = format_for_output(tmp_path / "averaged/", format_of(newest))
    assert companions_to_copy(order_key(newest), directory) == []
