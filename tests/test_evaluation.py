"""The sweep chosen by the checkpoints' format (polyak.evaluation), and refusing together."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from polyak.distributed import checked_together
from polyak.errors import ArgumentError, DataError, OutputError
from polyak.evaluation import SweepOptions, framework_of, sweep_checkpoints, sweep_files


def keras_checkpoint(tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    path = tmp_path / "model_0001.weights.h5"
    model.save_weights(path)
    return path, model


def test_the_format_names_the_framework(tmp_path):
    torch_file = tmp_path / "model_0001.safetensors"
    save_file({"w": np.ones((2, 3), np.float32)}, str(torch_file))
    keras_file, _ = keras_checkpoint(tmp_path)
    assert framework_of(torch_file) == "torch"
    assert framework_of(keras_file) == "keras"


def test_device_and_key_are_refused_for_keras_checkpoints_by_their_parameter_names(tmp_path):
    keras_file, model = keras_checkpoint(tmp_path)
    data = (np.zeros((4, 2), np.float32), np.zeros(4, np.int64))
    with pytest.raises(
        DataError,
        match=r"^device and key apply to PyTorch checkpoints, not Keras ones; received "
        r"device='cpu', key=None\.$",
    ):
        sweep_checkpoints([keras_file], data, model=model, device="cpu")


def test_checked_together_in_a_plain_process_runs_the_block_and_raises_its_error():
    ran = []
    with checked_together(None):
        ran.append(1)
    assert ran == [1]
    with pytest.raises(DataError, match="refused"), checked_together(None):
        raise DataError("refused")


@pytest.mark.parametrize(
    ("options", "message", "parameters"),
    [
        ({}, r"^give test data with test_data, or an evaluation function with evaluate\.$",
         ("test_data", "evaluate")),
        ({"test_data": "t.npz", "evaluate": "m:f"}, r"^give test data with test_data",
         ("test_data", "evaluate")),
        ({"evaluate": "m:f", "validation_data": "v.npz"},
         r"^validation_data goes with test_data; with evaluate, return",
         ("validation_data", "test_data", "evaluate")),
        ({"test_data": "t.npz", "batch_size": 0},
         r"^batch_size must be a whole number >= 1; received 0\.$", ("batch_size",)),
    ],
)  # fmt: skip
def test_sweep_options_that_do_not_go_together_are_named_by_their_parameters(
    options, message, parameters
):
    with pytest.raises(ArgumentError, match=message) as refused:
        SweepOptions(["run/"], **options).check()
    assert refused.value.parameters == parameters


def linear_members(tmp_path, count=3):
    """Members of a torch.nn.Linear(2, 1) whose bias is the member's number."""
    run = tmp_path / "run"
    run.mkdir()
    for number in range(1, count + 1):
        tensors = {"weight": np.zeros((1, 2), np.float32), "bias": np.full(1, number, np.float32)}
        save_file(tensors, str(run / f"model_{number}.safetensors"))
    (tmp_path / "polyak_test_linear.py").write_text(
        textwrap.dedent(
            """
            import torch

            def build():
                return torch.nn.Linear(2, 1)

            def evaluate(module):
                return -abs(float(module.bias.detach()) - 2.0)  # best: a bias of 2
            """
        )
    )
    return run


def test_sweep_files_picks_the_framework_sweeps_and_writes_what_it_is_asked(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    run = linear_members(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    options = SweepOptions(
        [run],
        evaluate="polyak_test_linear:evaluate",
        model="polyak_test_linear:build",
        schemes="equal",
        json_path=tmp_path / "report.json",
        out_model=str(tmp_path / "best.safetensors"),
    )
    result = sweep_files(options)
    # Newest first, biases 3, 2, 1: the equal averages of n = 1, 2, 3 have biases 3, 2.5, 2.
    assert [c.test for c in result.candidates] == [-1.0, -0.5, 0.0]
    assert (result.best.scheme, result.best.n) == ("equal", 3)
    assert json.loads((tmp_path / "report.json").read_text())["best"]["n"] == 3
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "best.safetensors"))["bias"].tolist() == [2.0]


def test_sweep_files_refuses_an_existing_output_before_reading_data(tmp_path):
    run = linear_members(tmp_path)
    member = run / "model_3.safetensors"
    before = member.read_bytes()
    options = SweepOptions([run], test_data=tmp_path / "missing.npz", json_path=member)
    with pytest.raises(OutputError, match=f"output {member}: already exists"):
        sweep_files(options)
    assert member.read_bytes() == before
