"""Tests of polyak.formats.torch: real files written by torch.save in tmp_path."""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polyak.errors import CheckpointError, OutputError  # noqa: E402
from polyak.formats.base import TensorInfo  # noqa: E402
from polyak.formats.torch import TorchReader, write_torch  # noqa: E402


class Net(torch.nn.Module):
    """A tiny model with float parameters, BatchNorm buffers and an int64 counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, kernel_size=3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


class Opaque:
    """A custom class that weights_only must refuse."""

    def __init__(self) -> None:
        self.value = 3


class RunsCode:
    """Unpickling it would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net.train()
    net(torch.randn(4, 2, 5, 5))  # updates running stats and num_batches_tracked
    return net


def copy_through(source, path, template=None):
    """Write every tensor of ``source`` to ``path`` with write_torch, then reopen it."""
    write_torch(path, source.items(), source if template is None else template)
    return TorchReader(path)


def assert_same(reader, expected: dict) -> None:
    """The reader holds exactly ``expected`` (name -> tensor), bit for bit and in order."""
    assert reader.names() == list(expected)
    for name, tensor in expected.items():
        info = reader.info(name)
        array = reader.read(name)
        assert info == TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        assert array.shape == tuple(tensor.shape)
        if tensor.dtype == torch.bfloat16:
            assert array.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(
                array.view(np.int16), tensor.view(torch.int16).numpy(), strict=True
            )
        else:
            np.testing.assert_array_equal(array, tensor.numpy(), strict=True)


# --- plain state dicts --------------------------------------------------------------------


def test_state_dict_round_trip(tmp_path):
    net = trained_net()
    state_dict = net.state_dict()
    torch.save(state_dict, tmp_path / "net.pt")
    with TorchReader(tmp_path / "net.pt") as reader:
        assert reader.format == "torch"
        assert reader.path == tmp_path / "net.pt"
        assert reader.key is None
        assert reader.prefix == ""
        assert reader.extras == {}
        assert reader.info("norm.num_batches_tracked") == TensorInfo((), "int64")
        assert reader.read("norm.num_batches_tracked") == 1
        assert_same(reader, state_dict)
        with copy_through(reader, tmp_path / "out.pt") as again:
            assert_same(again, state_dict)

    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert type(loaded) is OrderedDict
    assert loaded["norm.num_batches_tracked"].dtype == torch.int64
    fresh = Net()
    fresh.load_state_dict(loaded, strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state_dict[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_dtypes_are_bit_exact(tmp_path, dtype):
    torch.manual_seed(1)
    values = torch.randn(7, 5) * 1e3
    state_dict = {
        "weight": values.to(dtype),
        "tiny": torch.tensor([1e-30, -0.0, float("inf"), float("nan")]).to(dtype),
        "scalar": torch.tensor(2.5, dtype=dtype),
    }
    torch.save(state_dict, tmp_path / "in.pt")
    with TorchReader(tmp_path / "in.pt") as reader:
        assert_same(reader, state_dict)
        with copy_through(reader, tmp_path / "out.pt") as again:
            assert_same(again, state_dict)
    for name, tensor in torch.load(tmp_path / "out.pt", weights_only=True).items():
        assert tensor.dtype == dtype
        assert torch.equal(
            tensor.view(-1).view(torch.uint8), state_dict[name].view(-1).view(torch.uint8)
        )


def test_integer_and_bool_dtypes(tmp_path):
    state_dict = {
        "int32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
    }
    torch.save(state_dict, tmp_path / "in.pt")
    with TorchReader(tmp_path / "in.pt") as reader:
        assert_same(reader, state_dict)
        assert [reader.info(name).dtype for name in reader.names()] == [
            "int32",
            "int8",
            "uint8",
            "bool",
        ]


def test_read_is_read_only_and_handles_views(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state_dict = {"transposed": base.t(), "row": base[1], "bf16_t": base.t().to(torch.bfloat16)}
    torch.save(state_dict, tmp_path / "views.pt")
    with TorchReader(tmp_path / "views.pt") as reader:
        assert_same(reader, state_dict)
        array = reader.read("row")
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[0] = 1.0


def test_parameters_are_read(tmp_path):
    torch.save({"weight": torch.nn.Parameter(torch.ones(2, 2))}, tmp_path / "param.pt")
    with TorchReader(tmp_path / "param.pt") as reader:
        np.testing.assert_array_equal(reader.read("weight"), np.ones((2, 2), np.float32))


def test_legacy_serialization(tmp_path):
    state_dict = trained_net().state_dict()
    state_dict["half"] = torch.randn(3).to(torch.bfloat16)
    torch.save(state_dict, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with TorchReader(tmp_path / "legacy.pt") as reader:
        assert_same(reader, state_dict)


def test_writer_copies_arrays_it_is_given(tmp_path):
    """The engine reuses its buffers, so each array is valid only until the next is asked for."""
    buffer = np.zeros(4, np.float32)

    def pairs():
        for index in range(3):
            buffer[:] = index
            yield f"t{index}", buffer

    write_torch(tmp_path / "out.pt", pairs(), None)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(loaded) == ["t0", "t1", "t2"]
    for index, tensor in enumerate(loaded.values()):
        assert torch.equal(tensor, torch.full((4,), float(index)))


def test_writer_converts_from_other_formats(tmp_path):
    arrays = {
        "a": np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian input becomes native
        "b": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "c": np.array(7, dtype=np.int64),
    }
    write_torch(tmp_path / "out.pt", arrays.items(), None)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert type(loaded) is OrderedDict
    assert loaded["a"].dtype == torch.float32
    assert torch.equal(loaded["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert loaded["b"].dtype == torch.bfloat16
    assert loaded["b"].tolist() == [1.5, -2.0]
    assert loaded["c"].dtype == torch.int64 and loaded["c"].item() == 7


def test_writer_refuses_unsupported_dtype_and_duplicates(tmp_path):
    with pytest.raises(OutputError, match=r"out\.pt: tensor 'z' has dtype complex64"):
        write_torch(tmp_path / "out.pt", [("z", np.zeros(2, np.complex64))], None)
    ones = np.ones(2, np.float32)
    with pytest.raises(OutputError, match="tensor 'a' was given twice"):
        write_torch(tmp_path / "out.pt", [("a", ones), ("a", ones)], None)


# --- checkpoint dicts ---------------------------------------------------------------------


def lightning_checkpoint(net: Net) -> dict:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 2, 5, 5)).sum().backward()
    optimizer.step()
    return {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": net.state_dict(),
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "hidden": [3, 2]},
    }


def test_lightning_checkpoint(tmp_path):
    net = trained_net()
    checkpoint = lightning_checkpoint(net)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    with TorchReader(tmp_path / "last.ckpt") as reader:
        assert reader.key == "state_dict"
        assert reader.container["global_step"] == 10
        assert_same(reader, checkpoint["state_dict"])
        write_torch(tmp_path / "avg.ckpt", reader.items(), reader)

    written = torch.load(tmp_path / "avg.ckpt", weights_only=True)
    assert "optimizer_states" not in written
    assert "lr_schedulers" not in written
    assert written["epoch"] == 1 and written["global_step"] == 10
    assert written["hyper_parameters"] == {"lr": 0.1, "hidden": [3, 2]}
    assert written["loops"] == checkpoint["loops"]
    assert written["callbacks"] == checkpoint["callbacks"]
    fresh = Net()
    fresh.load_state_dict(written["state_dict"], strict=True)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, checkpoint["state_dict"][name])
    # The template file is left as it was.
    assert "optimizer_states" in torch.load(tmp_path / "last.ckpt", weights_only=True)


def test_timm_checkpoint_default_and_ema(tmp_path):
    model, ema = trained_net(0).state_dict(), trained_net(1).state_dict()
    checkpoint = {
        "epoch": 3,
        "arch": "net",
        "state_dict": model,
        "state_dict_ema": ema,
        "optimizer": {"state": {}, "param_groups": []},
        "amp_scaler": {"scale": 65536.0},
    }
    torch.save(checkpoint, tmp_path / "checkpoint-3.pth.tar.pth")
    with TorchReader(tmp_path / "checkpoint-3.pth.tar.pth") as reader:
        assert reader.key == "state_dict"
        assert_same(reader, model)
    with TorchReader(tmp_path / "checkpoint-3.pth.tar.pth", key="state_dict_ema") as reader:
        assert reader.key == "state_dict_ema"
        assert_same(reader, ema)
        doubled = [
            (name, array * 2 if array.dtype.kind == "f" else array)
            for name, array in reader.items()
        ]
        write_torch(tmp_path / "out.pth", doubled, reader)
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert set(written) == {"epoch", "arch", "state_dict", "state_dict_ema"}
    assert torch.equal(written["state_dict_ema"]["head.weight"], ema["head.weight"] * 2)
    assert torch.equal(written["state_dict"]["head.weight"], model["head.weight"])


def test_only_ema_entry_is_found_by_default(tmp_path):
    ema = trained_net().state_dict()
    torch.save({"state_dict_ema": ema, "epoch": 2}, tmp_path / "ema.pt")
    with TorchReader(tmp_path / "ema.pt") as reader:
        assert reader.key == "state_dict_ema"
        assert_same(reader, ema)


def test_fairseq_checkpoint(tmp_path):
    state_dict = trained_net().state_dict()
    checkpoint = {
        "model": state_dict,
        "args": None,
        "optimizer_history": [{"num_updates": 5}],
        "last_optimizer_state": {"state": {}},
        "extra_state": {"epoch": 4},
    }
    torch.save(checkpoint, tmp_path / "checkpoint4.pt")
    with TorchReader(tmp_path / "checkpoint4.pt") as reader:
        assert reader.key == "model"
        assert_same(reader, state_dict)
        write_torch(tmp_path / "out.pt", reader.items(), reader)
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(written) == {"model", "args", "optimizer_history", "extra_state"}
    assert written["args"] is None and written["extra_state"] == {"epoch": 4}


# --- prefixes and extras ------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."]
)
def test_wrapper_prefixes_are_stripped_and_restored(tmp_path, prefix):
    state_dict = trained_net().state_dict()
    prefixed = OrderedDict((prefix + name, tensor) for name, tensor in state_dict.items())
    torch.save(prefixed, tmp_path / "ddp.pt")
    with TorchReader(tmp_path / "ddp.pt") as reader:
        assert reader.prefix == prefix
        assert_same(reader, state_dict)
        write_torch(tmp_path / "out.pt", reader.items(), reader)
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(written) == list(prefixed)
    # Converted from another format, the names carry no prefix.
    with TorchReader(tmp_path / "ddp.pt") as reader:
        write_torch(tmp_path / "plain.pt", reader.items(), None)
    assert list(torch.load(tmp_path / "plain.pt", weights_only=True)) == list(state_dict)


def test_prefix_inside_checkpoint_dict(tmp_path):
    state_dict = trained_net().state_dict()
    prefixed = {"module." + name: tensor for name, tensor in state_dict.items()}
    torch.save({"state_dict": prefixed, "epoch": 1}, tmp_path / "ddp.ckpt")
    with TorchReader(tmp_path / "ddp.ckpt") as reader:
        assert (reader.key, reader.prefix) == ("state_dict", "module.")
        assert_same(reader, state_dict)
        write_torch(tmp_path / "out.ckpt", reader.items(), reader)
    assert list(torch.load(tmp_path / "out.ckpt", weights_only=True)["state_dict"]) == list(
        prefixed
    )


def test_prefix_only_stripped_when_every_name_has_it(tmp_path):
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "mixed.pt")
    with TorchReader(tmp_path / "mixed.pt") as reader:
        assert reader.prefix == ""
        assert reader.names() == ["module.a", "b"]


def test_extra_state_and_metadata_are_kept(tmp_path):
    net = trained_net()
    state_dict = net.state_dict()
    state_dict["head._extra_state"] = b"\x00config"
    assert state_dict._metadata["norm"]["version"] == 2
    torch.save(state_dict, tmp_path / "extra.pt")
    with TorchReader(tmp_path / "extra.pt") as reader:
        assert reader.key is None
        assert "head._extra_state" not in reader.names()
        assert reader.extras == {"head._extra_state": b"\x00config"}
        write_torch(tmp_path / "out.pt", reader.items(), reader)
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert written["head._extra_state"] == b"\x00config"
    assert written._metadata == state_dict._metadata


# --- refusals and errors ------------------------------------------------------------------


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save(
        {"state_dict": {"w": torch.ones(1)}, "evil": RunsCode(f"touch {marker}")},
        tmp_path / "evil.pt",
    )
    with pytest.raises(
        CheckpointError, match=r"evil\.pt: refused to load .*system.*never unpickles"
    ):
        TorchReader(tmp_path / "evil.pt")
    assert not marker.exists()


def test_custom_class_is_refused_and_named(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "config": Opaque()}, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"custom\.pt: refused to load .*Opaque") as caught:
        TorchReader(tmp_path / "custom.pt")
    assert "torch.save(model.state_dict(), path)" in str(caught.value)


def test_custom_class_in_legacy_file_is_refused(tmp_path):
    torch.save({"config": Opaque()}, tmp_path / "custom.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"refused to load .*Opaque"):
        TorchReader(tmp_path / "custom.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy):
    path = tmp_path / "whole.pt"
    torch.save(trained_net().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"cut\.pt: cannot be read as a PyTorch checkpoint \(.+\)\.$"
    ):
        TorchReader(tmp_path / "cut.pt")


@pytest.mark.parametrize("content", [os.urandom(1000), b"", b"hello, world\n" * 10])
def test_not_a_torch_file(tmp_path, content):
    (tmp_path / "noise.pt").write_bytes(content)
    with pytest.raises(
        CheckpointError, match=r"noise\.pt: cannot be read as a PyTorch checkpoint \(.+\)\.$"
    ):
        TorchReader(tmp_path / "noise.pt")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"gone\.pt: cannot be read as a PyTorch checkpoint"):
        TorchReader(tmp_path / "gone.pt")


def test_dict_without_weights_lists_its_keys(tmp_path):
    torch.save({"epoch": 3, "weights": {"w": torch.ones(1)}, "notes": "x"}, tmp_path / "odd.pt")
    with pytest.raises(
        CheckpointError, match=r"odd\.pt: found no weights.*\['epoch', 'weights', 'notes'\].*key="
    ):
        TorchReader(tmp_path / "odd.pt")
    with TorchReader(tmp_path / "odd.pt", key="weights") as reader:
        assert reader.key == "weights"
        assert reader.names() == ["w"]


def test_mixed_top_level_dict_is_not_taken_for_a_state_dict(tmp_path):
    torch.save({"w": torch.ones(1), "step": 5}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"found no weights.*'w', 'step'"):
        TorchReader(tmp_path / "mixed.pt")


def test_missing_key_option(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 1}, tmp_path / "last.ckpt")
    with pytest.raises(
        CheckpointError, match=r"last\.ckpt: has no entry 'ema'.*\['state_dict', 'epoch'\]"
    ):
        TorchReader(tmp_path / "last.ckpt", key="ema")
    with pytest.raises(
        CheckpointError, match=r"entry 'epoch' holds a value of type int without tensors"
    ):
        TorchReader(tmp_path / "last.ckpt", key="epoch")


def test_key_option_on_plain_state_dict(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(
        CheckpointError,
        match=r"plain\.pt: key='state_dict' was given, but the file is a plain state dict",
    ):
        TorchReader(tmp_path / "plain.pt", key="state_dict")


def test_not_a_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a state dict"):
        TorchReader(tmp_path / "list.pt")


def test_unknown_tensor_name(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with TorchReader(tmp_path / "plain.pt") as reader:
        with pytest.raises(CheckpointError, match=r"plain\.pt: has no tensor 'v'"):
            reader.read("v")
        with pytest.raises(CheckpointError, match=r"plain\.pt: has no tensor 'v'"):
            reader.info("v")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.ones(2, dtype=torch.complex64), r"tensor 'odd' has dtype torch\.complex64"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn), r"tensor 'odd' has dtype torch\.float8_e4m3fn"),
        (torch.eye(2).to_sparse(), r"tensor 'odd' is sparse"),
    ],
)
def test_unsupported_tensors(tmp_path, tensor, message):
    torch.save({"fine": torch.ones(1), "odd": tensor}, tmp_path / "odd.pt")
    with TorchReader(tmp_path / "odd.pt") as reader:
        assert reader.names() == ["fine", "odd"]
        with pytest.raises(CheckpointError, match=r"odd\.pt: " + message):
            reader.info("odd")
        with pytest.raises(CheckpointError, match=r"odd\.pt: " + message):
            reader.read("odd")


def test_close_drops_references(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "last.ckpt")
    reader = TorchReader(tmp_path / "last.ckpt")
    reader.close()
    assert reader.container is None
    assert reader.names() == ["w"]
    with pytest.raises(CheckpointError, match="closed"):
        reader.read("w")
    with pytest.raises(OutputError, match="closed before writing"):
        write_torch(tmp_path / "out.ckpt", [("w", np.ones(1, np.float32))], reader)


def test_meta_nested_and_expanded_tensors_are_refused_in_one_line(tmp_path):
    """Before: "internal error" (TypeError, RuntimeError) from the torch.load fallback."""
    import subprocess
    import sys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    cases = {
        "meta": ({"w": torch.empty(3, device="meta")}, "is on device meta"),
        "nested": ({"w": nested}, "is a nested tensor"),
        # A legacy (non-zip) file goes to torch.load; its expanded view is 2**20 of 1 element.
        "expanded": ({"w": torch.ones(1).expand(2**20)}, "declares 1048576 elements"),
    }
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(state, path, _use_new_zipfile_serialization=name != "expanded")
        with pytest.raises(CheckpointError, match=message):
            with TorchReader(path) as reader:
                reader.info("w")
                reader.read("w")
        done = subprocess.run(
            [sys.executable, "-m", "polyak", "inspect", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
