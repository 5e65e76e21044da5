"""The parsers polyak exposes to hostile files, each as one function of raw bytes.

Each target writes the bytes where its reader expects a file, opens it, lists every
tensor and reads it, as ``polyak average`` would. The property is the one the README
promises: it returns, or raises one of polyak's own errors (a clean refusal); any
other exception, a signal, a hang or memory beyond the fuzzer's bound is a bug.

``tests/fuzz_run.py`` drives them with atheris (coverage-guided); every input that
broke the property is kept in ``tests/fuzz_regressions/TARGET/`` and replayed by
``tests/test_fuzz_regressions.py`` in ``make test``. ``seeds(target)`` gives real files
written by the libraries themselves to start from.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from polyak.errors import PolyakError
from polyak.formats import torchzip
from polyak.formats.npz import NpzReader
from polyak.formats.safetensors import (
    SafetensorsReader,
    ShardedSafetensorsReader,
    parse_header,
)
from polyak.snapshots import MANIFEST_NAME, read_manifest

_SHARD_NAME = "model-00001-of-00001.safetensors"


def _read_all(reader) -> None:
    with reader:
        for name in reader.names():
            reader.info(name)
            reader.read(name)


def _read_files(files: dict[str, bytes], open_reader: Callable[[Path], object]) -> None:
    """Write ``files`` (name -> bytes) into a fresh directory, open it with
    ``open_reader(directory)`` and read everything; a clean refusal is a pass."""
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        try:
            _read_all(open_reader(folder))
        except PolyakError:
            pass


def safetensors_header(data: bytes) -> None:
    try:
        parse_header(Path("fuzz.safetensors"), data, 1 << 20)
    except PolyakError:
        pass


def safetensors_file(data: bytes) -> None:
    _read_files({"fuzz.safetensors": data}, lambda d: SafetensorsReader(d / "fuzz.safetensors"))


def safetensors_index(data: bytes) -> None:
    from safetensors.numpy import save

    index = "model.safetensors.index.json"
    shard = save({"a": np.ones(2, np.float32)})
    _read_files({_SHARD_NAME: shard, index: data}, lambda d: ShardedSafetensorsReader(d / index))


def _walk(value: object) -> None:
    """Read every tensor polyak's .pt reader made of the pickle (iteratively)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is torchzip.StoredTensor:
            item.numpy()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


def torch_zip(data: bytes) -> None:
    """polyak's own .pt reader (the torch.load fallback is torch's, not fuzzed here)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "fuzz.pt"
        path.write_bytes(data)
        try:
            _walk(torchzip.load(path))
        except (torchzip.NotFastPath, torchzip.Refused):
            pass


def npz(data: bytes) -> None:
    _read_files({"fuzz.npz": data}, lambda d: NpzReader(d / "fuzz.npz"))


def keras_archive(data: bytes) -> None:
    from polyak.formats.keras import KerasArchiveReader

    _read_files({"fuzz.keras": data}, lambda d: KerasArchiveReader(d / "fuzz.keras"))


def _dcp_pair(metadata: bytes, payload: bytes) -> bytes:
    """A DCP directory of one payload file as one input: 4 bytes of length, then each."""
    return len(metadata).to_bytes(4, "little") + metadata + payload


def dcp_directory(data: bytes) -> None:
    """polyak's DCP reader on a ``.metadata`` (an allowlisted pickle) and ``__0_0.distcp``.

    The input is ``_dcp_pair(metadata, payload)``; where the length does not fit, the
    whole input is the ``.metadata``, with an empty payload.
    """
    from polyak.formats.dcp import DcpReader

    size = int.from_bytes(data[:4], "little")
    metadata, payload = (
        (data[4 : 4 + size], data[4 + size :]) if size <= len(data) - 4 else (data, b"")
    )
    _read_files({".metadata": metadata, "__0_0.distcp": payload}, DcpReader)


def manifest(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / MANIFEST_NAME).write_bytes(data)
        try:
            read_manifest(directory)
        except PolyakError:
            pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "safetensors_header": safetensors_header,
    "safetensors_file": safetensors_file,
    "safetensors_index": safetensors_index,
    "torch_zip": torch_zip,
    "npz": npz,
    "keras_archive": keras_archive,
    "manifest": manifest,
    "dcp_directory": dcp_directory,
}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "0.weight": rng.normal(size=(3, 2)).astype(np.float32),
        "0.bias": np.zeros(3, np.float32),
        "steps": np.arange(4, dtype=np.int64),
    }


def seeds(target: str) -> list[bytes]:
    """Real files of the target's format, written by the libraries themselves."""
    tensors = _tensors()
    if target in ("safetensors_header", "safetensors_file"):
        from safetensors.numpy import save

        data = save(tensors, metadata={"format": "pt"})
        header_size = int.from_bytes(data[:8], "little")
        return [data[8 : 8 + header_size]] if target == "safetensors_header" else [data]
    if target == "safetensors_index":
        index = {"metadata": {"total_size": 8}, "weight_map": {"a": _SHARD_NAME}}
        return [json.dumps(index).encode()]
    if target == "torch_zip":
        import torch

        buffer = io.BytesIO()
        torch.save({name: torch.from_numpy(array) for name, array in tensors.items()}, buffer)
        return [buffer.getvalue()]
    if target == "npz":
        stored, compressed = io.BytesIO(), io.BytesIO()
        np.savez(stored, **tensors)
        np.savez_compressed(compressed, **tensors)
        return [stored.getvalue(), compressed.getvalue()]
    if target == "keras_archive":
        import keras

        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.keras"
            model.save(path)
            return [path.read_bytes()]
    if target == "dcp_directory":
        return _dcp_seeds(tensors)
    if target == "manifest":
        record = {
            "format": "polyak-snapshots",
            "version": 1,
            "snapshots": [
                {"file": "model_0001.npz", "epoch": 1, "step": 10, "logs": {"loss": 0.5},
                 "sha256": "0" * 64, "bytes": 10, "time": "2026-01-01T00:00:00Z"},
            ],
        }  # fmt: skip
        return [json.dumps(record).encode()]
    raise KeyError(target)


def _dcp_seeds(tensors: dict[str, np.ndarray]) -> list[bytes]:
    """``dcp.save`` in one process (no process group), with torch's two payload kinds."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    state = {"model": {k: torch.from_numpy(v) for k, v in tensors.items()}, "step": 3}
    found = []
    for options in ({}, {"serialization_format": SerializationFormat.SAFETENSORS}):
        with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save(state, storage_writer=dcp.FileSystemWriter(directory, **options))
            payloads = sorted(Path(directory).glob("*.distcp"))
            assert [p.name for p in payloads] == ["__0_0.distcp"], payloads
            found.append(
                _dcp_pair((Path(directory) / ".metadata").read_bytes(), payloads[0].read_bytes())
            )
    return found
