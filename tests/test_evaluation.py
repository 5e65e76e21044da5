"""The sweep chosen by the checkpoints' format (polyak.evaluation), and refusing together."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from polyak.distributed import checked_together
from polyak.errors import DataError
from polyak.evaluation import framework_of, sweep_checkpoints


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
