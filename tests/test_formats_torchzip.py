"""Tests of polyak.formats.torchzip: torch's zip format read and written without torch.

torch is the reference: files written by ``torch.save`` must read the same through
polyak's reader as through ``torch.load``, and files polyak writes must load with
``torch.load(weights_only=True)``, with and without ``mmap``, bit for bit.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polyak.errors import CheckpointError, OutputError  # noqa: E402
from polyak.formats import torchzip  # noqa: E402
from polyak.formats.base import PlannedTensors, StreamedTensor, TensorInfo  # noqa: E402
from polyak.formats.torch import TorchReader, write_torch  # noqa: E402

ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
]


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, kernel_size=3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3, 2)
        self.tied = torch.nn.Linear(3, 3, bias=False)
        self.tied_again = self.tied  # shares its weight: one storage in the file


def trained_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    net.norm.train()
    net.norm(torch.randn(4, 3, 2, 2))  # running stats and num_batches_tracked
    return net


def values(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * 100).to(dtype)
    low = 0 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -100
    return torch.randint(low, 100, shape, generator=generator, dtype=torch.int64).to(dtype)


def torch_path(monkeypatch) -> None:
    """Make TorchReader use torch.load, as it does for files polyak's reader declines."""

    def decline(path):
        raise torchzip.NotFastPath("test")

    monkeypatch.setattr(torchzip, "load", decline)


def open_both(path: Path, monkeypatch, **options) -> tuple[TorchReader, TorchReader]:
    fast = TorchReader(path, **options)
    with monkeypatch.context() as patch:
        torch_path(patch)
        slow = TorchReader(path, **options)
    return fast, slow


def assert_bits_equal(array: np.ndarray, tensor: torch.Tensor) -> None:
    assert array.shape == tuple(tensor.shape)
    if tensor.dtype == torch.bfloat16:
        assert array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(
            array.view(np.int16), tensor.contiguous().view(torch.int16).numpy(), strict=True
        )
    else:
        np.testing.assert_array_equal(array, tensor.numpy(), strict=True)


def assert_same_readers(fast: TorchReader, slow: TorchReader) -> None:
    """Both paths give the same reader: names, infos, bits, key, prefix, extras, metadata."""
    assert fast.fast and not slow.fast
    assert (fast.key, fast.prefix) == (slow.key, slow.prefix)
    assert fast.names() == slow.names()
    assert fast.extras == slow.extras
    assert fast.metadata == slow.metadata
    for name in fast.names():
        assert fast.info(name) == slow.info(name)
        array, expected = fast.read(name), slow.read(name)
        assert not array.flags.writeable
        assert array.dtype == expected.dtype and array.shape == expected.shape
        assert array.tobytes() == expected.tobytes()


# --- reading: polyak's reader against torch.load ------------------------------------------


def test_every_dtype_scalar_empty_and_view(tmp_path, monkeypatch):
    state_dict = {}
    for number, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        state_dict[f"{name}.matrix"] = values(dtype, (3, 4), number)
        state_dict[f"{name}.scalar"] = values(dtype, (), number)
        state_dict[f"{name}.empty"] = values(dtype, (0, 5), number)
        state_dict[f"{name}.transposed"] = values(dtype, (4, 3), number).t()
        state_dict[f"{name}.row"] = values(dtype, (3, 4), number)[1]
    torch.save(state_dict, tmp_path / "all.pt")
    fast, slow = open_both(tmp_path / "all.pt", monkeypatch)
    assert_same_readers(fast, slow)
    for name, tensor in state_dict.items():
        assert_bits_equal(fast.read(name), tensor)
    assert fast.info("uint16.matrix") == TensorInfo((3, 4), "uint16")
    assert fast.info("bool.scalar") == TensorInfo((), "bool")


def test_module_state_dict_with_metadata_parameters_and_tied_weights(tmp_path, monkeypatch):
    net = trained_net()
    state_dict = net.state_dict()
    state_dict["head._extra_state"] = b"\x00config\xff"
    state_dict["param"] = torch.nn.Parameter(torch.arange(4.0))
    torch.save(state_dict, tmp_path / "net.pt")
    fast, slow = open_both(tmp_path / "net.pt", monkeypatch)
    assert_same_readers(fast, slow)
    assert fast.extras == {"head._extra_state": b"\x00config\xff"}
    assert fast.metadata == state_dict._metadata and fast.metadata["norm"]["version"] == 2
    # Tied weights: two names, one storage in the file, read the same.
    assert fast.state_dict["tied.weight"].storage is fast.state_dict["tied_again.weight"].storage
    assert fast.state_dict["param"].is_parameter
    np.testing.assert_array_equal(fast.read("param"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_checkpoint_layouts_and_prefixes(tmp_path, monkeypatch, prefix):
    model = OrderedDict((prefix + k, v) for k, v in trained_net(0).state_dict().items())
    ema = trained_net(1).state_dict()
    layouts = {
        "lightning.ckpt": {
            "epoch": 1,
            "global_step": 10,
            "state_dict": model,
            "loops": {"fit_loop": {"done": [1, 2.5, None, True, (3, "x")]}},
            "hyper_parameters": {"lr": 0.1, "big": 2**40, "negative": -5},
        },
        "timm.pth.tar": {"epoch": 3, "arch": "net", "state_dict": model, "state_dict_ema": ema},
        "fairseq.pt": {"model": model, "args": None, "extra_state": {"epoch": 4}},
        "plain.pt": model,
    }
    for file, checkpoint in layouts.items():
        torch.save(checkpoint, tmp_path / file)
        fast, slow = open_both(tmp_path / file, monkeypatch)
        assert_same_readers(fast, slow)
        assert fast.prefix == prefix
        plain = {k: v for k, v in fast.container.items() if k not in ("state_dict", "model")}
        if isinstance(checkpoint, dict) and fast.key is not None:
            assert plain.keys() == {k for k in checkpoint if k not in ("state_dict", "model")}
    fast, slow = open_both(tmp_path / "timm.pth.tar", monkeypatch, key="state_dict_ema")
    assert_same_readers(fast, slow)


def test_a_storage_past_its_file_is_refused(tmp_path):
    """A record shorter than its storage claims is refused, never handed to torch."""
    torch.save({"w": torch.ones(4)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickled = archive.read("w/data.pkl")
    # numel 4 -> 9: beyond the 16-byte record.
    tampered = pickled.replace(b"K\x04t", b"K\x09t", 1)
    assert tampered != pickled
    (tmp_path / "bad.pt").write_bytes(data.replace(pickled, tampered))
    with pytest.raises(torchzip.Refused, match="storage 0 has 16 bytes, fewer than its 36"):
        torchzip.load(tmp_path / "bad.pt")


# --- what falls back to torch --------------------------------------------------------------


class Opaque:
    def __init__(self) -> None:
        self.value = 3


class RunsCode:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_declined_files_load_through_torch(tmp_path):
    state_dict = {"w": torch.ones(2)}
    cases = {
        "legacy.pt": (state_dict, {"_use_new_zipfile_serialization": False}),
        "set.pt": ({**state_dict, "_extra_state": {1, 2}}, {}),
        "complex.pt": ({**state_dict, "z": torch.ones(2, dtype=torch.complex64)}, {}),
        "sparse.pt": ({**state_dict, "s": torch.eye(2).to_sparse()}, {}),
        "float8.pt": ({**state_dict, "f": torch.zeros(2, dtype=torch.float8_e4m3fn)}, {}),
        "size.pt": ({**state_dict, "_extra_state": torch.Size([2, 3])}, {}),
    }
    for file, (obj, options) in cases.items():
        torch.save(obj, tmp_path / file, **options)
        with pytest.raises(torchzip.NotFastPath):
            torchzip.load(tmp_path / file)
        with TorchReader(tmp_path / file) as reader:
            assert not reader.fast
            assert reader.names()[0] == "w"


def test_refused_globals_are_refused_as_before_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.ones(1)}, "evil": RunsCode(f"touch {marker}")},
               tmp_path / "evil.pt")  # fmt: skip
    torch.save({"state_dict": {"w": torch.ones(1)}, "config": Opaque()}, tmp_path / "custom.pt")
    for file, refused in (("evil.pt", "system"), ("custom.pt", "Opaque")):
        with pytest.raises(torchzip.NotFastPath, match="global"):
            torchzip.load(tmp_path / file)
        with pytest.raises(CheckpointError, match=rf"refused to load .*{refused}.*never unpickles"):
            TorchReader(tmp_path / file)
    assert not marker.exists()


def craft(tmp_path: Path, pickled: bytes) -> Path:
    """A torch zip file holding ``pickled`` as its data.pkl and one 8-byte storage."""
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", pickled)
        archive.writestr("crafted/byteorder", "little")
        archive.writestr("crafted/data/0", b"\x00" * 8)
        archive.writestr("crafted/version", "3\n")
    return path


@pytest.mark.parametrize(
    "pickled",
    [
        # A call through an allowed name's stand-in: the storage class is not callable.
        b"\x80\x02ctorch\nFloatStorage\n)R.",
        # SETITEM on a list, APPEND on a dict: torch's weights-only unpickler refuses both.
        b"\x80\x02]K\x00K\x01s.",
        b"\x80\x02}K\x01a.",
        # BUILD on a plain dict, and opcodes weights_only does not know (protocol 4).
        b"\x80\x02}}X\x01\x00\x00\x00ak\x01sb.",
        b"\x80\x04\x8c\x01a\x94.",
        # A persistent id that is not a storage.
        b"\x80\x02X\x04\x00\x00\x00evilQ.",
    ],
)
def test_crafted_pickles_are_declined(tmp_path, pickled):
    with pytest.raises(torchzip.NotFastPath):
        torchzip.load(craft(tmp_path, pickled))


def test_crafted_tensor_inside_its_storage_is_read(tmp_path):
    """The counterpart of the last crafted pickle: offset 0 fits, and reads as torch does."""
    pickled = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
        b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01"
        b"\x85\x89ccollections\nOrderedDict\n)RtR."
    )
    path = craft(tmp_path, pickled)
    loaded = torchzip.load(path)
    np.testing.assert_array_equal(loaded.numpy(), np.zeros(2, np.float32))
    assert torch.equal(torch.load(path, weights_only=True), torch.zeros(2))


# --- writing: torch.load reads what polyak writes -------------------------------------------


def load_both_ways(path: Path) -> object:
    """torch.load with and without mmap; both must give the same values."""
    plain = torch.load(path, weights_only=True)
    mapped = torch.load(path, weights_only=True, mmap=True)
    assert type(plain) is type(mapped)
    return plain


def test_written_state_dict_loads_into_the_module(tmp_path, monkeypatch):
    net = trained_net()
    state_dict = net.state_dict()
    torch.save(state_dict, tmp_path / "net.pt")
    with TorchReader(tmp_path / "net.pt") as reader:
        assert reader.fast
        planned = PlannedTensors([(n, reader.info(n)) for n in reader.names()], reader.items())
        write_torch(tmp_path / "out.pt", planned, reader)
    loaded = load_both_ways(tmp_path / "out.pt")
    assert type(loaded) is OrderedDict
    assert loaded._metadata == state_dict._metadata
    for mmap in (False, True):
        fresh = Net()
        fresh.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True, mmap=mmap))
        for name, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, state_dict[name]), name
    # torch's own offset arithmetic (which assumes miniz's layout) finds every storage.
    monkeypatch.setenv("TORCH_SERIALIZATION_DEBUG", "1")
    from torch.utils.serialization import config

    config.load.calculate_storage_offsets = True
    try:
        torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)
        torch.load(tmp_path / "out.pt", weights_only=True, map_location="meta")
    finally:
        config.load.calculate_storage_offsets = False


def test_every_dtype_written_bit_for_bit(tmp_path):
    arrays = {}
    for number, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        arrays[f"{name}.matrix"] = values(dtype, (3, 4), number)
        arrays[f"{name}.scalar"] = values(dtype, (), number)
        arrays[f"{name}.empty"] = values(dtype, (0, 5), number)
    numpy_arrays = [(name, _numpy(tensor)) for name, tensor in arrays.items()]
    write_torch(tmp_path / "out.pt", numpy_arrays, None)
    loaded = load_both_ways(tmp_path / "out.pt")
    assert list(loaded) == list(arrays)
    for name, tensor in arrays.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert loaded[name].is_contiguous()
        assert torch.equal(loaded[name], tensor), name
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        assert archive.testzip() is None  # every CRC right


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def streamed(array: np.ndarray, chunk: int) -> StreamedTensor:
    """A StreamedTensor that refuses to be collected whole, as the engine's may not be."""

    class Chunked(StreamedTensor):
        def __array__(self, dtype=None, copy=None):
            raise AssertionError("the writer collected a whole streamed tensor")

    flat = array.reshape(-1)
    info = TensorInfo(array.shape, str(array.dtype))
    return Chunked(info, lambda: (flat[i : i + chunk].copy() for i in range(0, flat.size, chunk)))


def test_streamed_tensors_are_written_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((7, 9)).astype(np.float32)
    half = rng.standard_normal(10).astype(ml_dtypes.bfloat16)
    infos = [("weight", TensorInfo((7, 9), "float32")), ("half", TensorInfo((10,), "bfloat16"))]
    planned = PlannedTensors(infos, [("weight", streamed(weight, 5)), ("half", streamed(half, 3))])
    write_torch(tmp_path / "out.pt", planned, None)
    loaded = load_both_ways(tmp_path / "out.pt")
    np.testing.assert_array_equal(loaded["weight"].numpy(), weight)
    assert loaded["half"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["half"].view(torch.int16).numpy(), half.view(np.int16))


def test_template_container_and_its_own_tensors_are_copied(tmp_path):
    model = trained_net(0).state_dict()
    ema = trained_net(1).state_dict()
    ema["param"] = torch.nn.Parameter(torch.arange(3.0), requires_grad=False)
    checkpoint = {
        "epoch": 3,
        "state_dict": model,
        "state_dict_ema": ema,
        "optimizer": {"state": {}, "param_groups": []},
        "notes": b"\x00\x01",
        "nested": [{"a": (1, 2.5)}, None, True, "x", 2**40],
    }
    torch.save(checkpoint, tmp_path / "timm.pth")
    with TorchReader(tmp_path / "timm.pth") as reader:
        assert reader.fast and reader.key == "state_dict"
        doubled = [
            (n, a * 2 if a.dtype.kind == "f" else a) for n, a in reader.items()
        ]  # fmt: skip
        write_torch(tmp_path / "out.pth", doubled, reader)
    written = load_both_ways(tmp_path / "out.pth")
    assert list(written) == ["epoch", "state_dict", "state_dict_ema", "notes", "nested"]
    assert written["notes"] == b"\x00\x01" and written["nested"] == checkpoint["nested"]
    assert written["state_dict"]._metadata == model._metadata
    assert torch.equal(written["state_dict"]["head.weight"], model["head.weight"] * 2)
    # The template's EMA is copied bit for bit, its ties and its parameter kept.
    for name, tensor in ema.items():
        assert torch.equal(written["state_dict_ema"][name], tensor), name
    copied = written["state_dict_ema"]
    assert copied["tied.weight"].data_ptr() == copied["tied_again.weight"].data_ptr()
    assert isinstance(copied["param"], torch.nn.Parameter) and not copied["param"].requires_grad
    assert written["state_dict_ema"]._metadata == ema._metadata


def test_writer_errors(tmp_path):
    ones = np.ones(2, np.float32)
    with pytest.raises(OutputError, match=r"out\.pt: tensor 'z' has dtype complex64"):
        write_torch(tmp_path / "out.pt", [("z", np.zeros(2, np.complex64))], None)
    infos = [("a", TensorInfo((2,), "float32")), ("a", TensorInfo((2,), "float32"))]
    with pytest.raises(OutputError, match="tensor 'a' was given twice"):
        write_torch(tmp_path / "out.pt", PlannedTensors(infos, [("a", ones)] * 2), None)
    with pytest.raises(OutputError, match=r"missing[/\\]out\.pt: cannot be written"):
        write_torch(tmp_path / "missing" / "out.pt", [("a", ones)], None)


def test_a_failed_write_names_the_file(tmp_path, file_size_limit):
    """A write the file system refuses (here past ``ulimit -f``, as on a full disk)."""
    with (
        file_size_limit(300),
        pytest.raises(OutputError, match=r"out\.pt: cannot be written \(File too large"),
    ):
        write_torch(tmp_path / "out.pt", [("a", np.ones(2**16, np.float32))], None)


# --- ZIP64 ---------------------------------------------------------------------------------


def test_zip64_fields_as_miniz_writes_them(tmp_path, monkeypatch):
    """With the ZIP64 limit lowered, every record and offset past it takes the ZIP64 form."""
    monkeypatch.setattr(torchzip, "_ZIP64_LIMIT", 200)
    arrays = [("big", np.arange(100, dtype=np.float32)), ("small", np.arange(3, dtype=np.int64))]
    write_torch(tmp_path / "out.pt", arrays, None)
    with zipfile.ZipFile(tmp_path / "out.pt") as archive:
        assert archive.testzip() is None
        infos = {info.filename: info for info in archive.infolist()}
    assert infos["archive/data/0"].file_size == 400
    assert any(struct.unpack("<H", info.extra[:2]) == (1,) for info in infos.values())
    loaded = load_both_ways(tmp_path / "out.pt")
    np.testing.assert_array_equal(loaded["big"].numpy(), arrays[0][1])
    np.testing.assert_array_equal(loaded["small"].numpy(), arrays[1][1])
    with TorchReader(tmp_path / "out.pt") as reader:
        assert reader.fast
        np.testing.assert_array_equal(reader.read("big"), arrays[0][1])


def test_zip64_headers_for_records_past_4_gib(tmp_path):
    """Real 5 GiB sizes and offsets, in a sparse file: zipfile and the reader agree."""
    size, second = 5 << 30, (5 << 30) + 4096
    path = tmp_path / "sparse.zip"
    with open(path, "wb") as file:
        header = torchzip.local_header(b"a/data/0", size, 0)
        file.write(header)
        assert len(header) % 64 == 0
        file.seek(len(header) + size)
        file.write(torchzip.data_descriptor(0, size, 0))
        assert len(torchzip.data_descriptor(0, size, 0)) == 24
        file.seek(second)
        header2 = torchzip.local_header(b"a/data/1", 4, second)
        file.write(header2 + b"\x01\x02\x03\x04" + torchzip.data_descriptor(0xB63CFBCD, 4, second))
        assert (second + len(header2)) % 64 == 0
        directory = file.tell()
        entries = torchzip.central_header(b"a/data/0", size, 0, 0) + torchzip.central_header(
            b"a/data/1", 4, 0xB63CFBCD, second
        )
        file.write(entries + torchzip.end_records(2, directory, len(entries)))
    with zipfile.ZipFile(path) as archive:
        first, last = archive.infolist()
        assert (first.file_size, first.header_offset) == (size, 0)
        assert (last.file_size, last.header_offset) == (4, second)
        assert archive.read("a/data/1") == b"\x01\x02\x03\x04"  # CRC checked
        buffer = np.memmap(path, np.uint8, mode="r")
        assert torchzip._record_data(buffer, archive, "a/data/1").tobytes() == b"\x01\x02\x03\x04"
        assert torchzip._record_data(buffer, archive, "a/data/0").size == size


# --- no torch on the fast path --------------------------------------------------------------


def test_averaging_pt_files_never_imports_torch(tmp_path):
    for step in range(3):
        net = trained_net(step)
        torch.save({"state_dict": net.state_dict(), "epoch": step}, tmp_path / f"ckpt_{step}.pt")
    out = tmp_path / "avg.pt"
    script = (
        "import sys\n"
        "from polyak.cli.main import main\n"
        "try:\n"
        f"    main(['average', {str(tmp_path)!r}, '-o', {str(out)!r}])\n"
        "except SystemExit as exited:\n"
        "    assert exited.code in (0, None), exited.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
    assert completed.returncode == 0, completed.stderr
    written = load_both_ways(out)
    nets = [trained_net(step).state_dict() for step in range(3)]
    expected = (nets[0]["head.weight"] + nets[1]["head.weight"] + nets[2]["head.weight"]) / 3
    torch.testing.assert_close(written["state_dict"]["head.weight"], expected)
    assert written["epoch"] == 2
    assert torch.equal(
        written["state_dict"]["norm.num_batches_tracked"], nets[2]["norm.num_batches_tracked"]
    )


def test_pickle_module_is_not_changed():
    """The cut-down dispatch tables are the subclasses' own."""
    assert pickle._Unpickler.dispatch[pickle.BUILD[0]] is pickle._Unpickler.load_build
    assert torchzip._Global not in pickle._Pickler.dispatch


def test_same_tensors_give_the_same_file(tmp_path):
    """Outputs are reproducible (torch derives its serialization id from the content too)."""
    arrays = [("a", np.arange(6, dtype=np.float32)), ("b", np.ones(2, np.int64))]
    write_torch(tmp_path / "one.pt", arrays, None)
    write_torch(tmp_path / "two.pt", arrays, None)
    assert (tmp_path / "one.pt").read_bytes() == (tmp_path / "two.pt").read_bytes()
    write_torch(tmp_path / "three.pt", [arrays[0], ("b", np.zeros(2, np.int64))], None)
    with (
        zipfile.ZipFile(tmp_path / "one.pt") as one,
        zipfile.ZipFile(tmp_path / "three.pt") as three,
    ):
        name = "archive/.data/serialization_id"
        assert len(one.read(name)) == 40 and one.read(name) != three.read(name)


# --- refused for safety: never handed to torch.load -----------------------------------------

REBUILD = (
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
    b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
)
REBUILD_END = b"\x89ccollections\nOrderedDict\n)RtR"


def tensor_pickle(offset: bytes, shape: bytes, stride: bytes) -> bytes:
    """A pickle of one tensor on the 2-float storage of `craft`."""
    return REBUILD + offset + shape + stride + REBUILD_END + b"."


def int4(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


@pytest.mark.parametrize(
    ("pickled", "reason"),
    [
        # 2 floats in 8 bytes, offset 1, 2 elements: reaches past the storage.
        (tensor_pickle(b"K\x01", b"K\x02\x85", b"K\x01\x85"), "reaches beyond its storage"),
        # A stride-0 view declaring 2**30 elements of a 2-element storage.
        (tensor_pickle(b"K\x00", int4(2**30) + b"\x85", b"K\x00\x85"), "1073741824 elements"),
        # 65 dimensions.
        (tensor_pickle(b"K\x00", b"(" + b"K\x01" * 65 + b"t", b"(" + b"K\x00" * 65 + b"t"),
         "65 dimensions"),
        # A shape of 2**100 with a zero dimension: nothing to read, still no such array.
        (tensor_pickle(b"K\x00", b"(K\x00\x8a\x0d" + (2**100).to_bytes(13, "little") + b"t",
                       b"K\x00K\x00\x86"), "larger than any file"),
        # A dict key that is a deep tuple: hashing it recurses in C.
        (b"\x80\x02}N" + b"\x85" * 200_000 + b"K\x01s.", "key of type tuple"),
        # SETITEMS with a tuple key.
        (b"\x80\x02}(N\x85K\x01u.", "key of type tuple"),
        # Containers nested 1,000 deep under a string key.
        (b"\x80\x02}X\x01\x00\x00\x00a]" + b"]" * 999 + b"a" * 999 + b"s.", "nest more than"),
        # BUILD setting an attribute that shadows OrderedDict.items.
        (b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsK\x01sb.", "_metadata"),
    ],
)  # fmt: skip
def test_crafted_pickles_are_refused_for_safety(tmp_path, pickled, reason):
    path = craft(tmp_path, pickled)
    with pytest.raises(torchzip.Refused, match=reason):
        torchzip.load(path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: refused \(.*{reason}"):
        TorchReader(path)


def test_a_deep_tuple_key_is_one_line_not_a_crash(tmp_path):
    """Before: SIGSEGV while the pickle's SETITEM hashed the key."""
    path = craft(tmp_path, b"\x80\x02}N" + b"\x85" * 200_000 + b"K\x01s.")
    done = subprocess.run(
        [sys.executable, "-m", "polyak", "inspect", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-500:]
    assert done.stderr.count("\n") == 1 and "key of type tuple" in done.stderr


def test_a_record_shorter_than_its_storage_is_not_averaged_with_other_records(tmp_path):
    """Before: torch.load(mmap=True) read tensor a's declared 8 floats from a's and b's records."""
    from polyak.cli.main import main

    torch.save({"a": torch.ones(4), "b": torch.full((4,), 2.0)}, tmp_path / "m_1.pt")
    data = (tmp_path / "m_1.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickled = archive.read("m_1/data.pkl")
    tampered = pickled.replace(b"K\x04t", b"K\x08t", 1).replace(b"K\x04\x85", b"K\x08\x85", 1)
    assert tampered != pickled
    (tmp_path / "m_2.pt").write_bytes(data.replace(pickled, tampered))
    with pytest.raises(SystemExit) as exited:
        main(["average", str(tmp_path / "m_2.pt"), "-o", str(tmp_path / "avg.safetensors")])
    assert exited.value.code == 2
    assert not (tmp_path / "avg.safetensors").exists()


def test_a_compressed_pickle_beyond_the_inflation_limit_is_refused(tmp_path):
    """A deflated data.pkl whose zip directory declares 2 GiB: refused before inflating."""
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("bomb/data.pkl", b"\x80\x02}." + b"\x00" * 4096, zipfile.ZIP_DEFLATED)
        archive.writestr("bomb/byteorder", "little")
        archive.writestr("bomb/version", "3\n")
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")  # data.pkl's entry comes first
    struct.pack_into("<I", data, central + 24, 2**31)  # its uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="more than deflate can inflate"):
        TorchReader(path)
