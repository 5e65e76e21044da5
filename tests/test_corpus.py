"""A corpus of bad inputs, generated here from real files and then damaged.

Every case builds its files in ``tmp_path`` from checkpoints written by the real
libraries (safetensors, huggingface_hub, numpy, torch, Keras), damages or crafts
them, and runs the command line (``polyak average``, or ``polyak inspect``) on them
in-process. Each must be refused with exit code 2 and one line on stderr that names
the file (and the tensor where there is one), and afterwards:

- every file under ``tmp_path`` is byte-identical, no file is added or removed: the
  inputs are never modified, no output and no temporary (``.polyak-tmp-*``, an
  extracted ``.keras`` member) is left behind;
- nothing in a file was executed (a pickle's payload would create a marker file);
- hostile sizes (absurd header lengths, huge declared shapes, zip bombs) are refused
  cheaply: a loose bound on time and on memory traced by ``tracemalloc``.

Disk-full and read-only outputs run the real command in a subprocess where the
process limits or a private mount namespace need one. ``test_corpus_size`` counts
the classes and generated files that the README's Safety section quotes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from polyak.cli.main import _register, main
from polyak.formats import open_checkpoint

# -- the good files everything starts from -------------------------------------------------

# format -> suffix of a member file ("" for a checkpoint directory)
SUFFIXES = {
    "safetensors": ".safetensors",
    "sharded": "",
    "npz": ".npz",
    "pt": ".pt",
    "pt-legacy": ".pt",
    "keras": ".keras",
    "weights.h5": ".weights.h5",
    "h5": ".h5",
}
# The output suffix a case writes to, per input format.
OUTPUTS = {**SUFFIXES, "sharded": ".safetensors"}
KERAS_FORMATS = ("keras", "weights.h5", "h5")


def state(member: int) -> dict[str, np.ndarray]:
    """The tensors of member 1 or 2 of a tiny 2-4-3 network, as numpy arrays."""
    rng = np.random.default_rng(member)
    return {
        "0.weight": rng.normal(size=(4, 2)).astype(np.float32),
        "0.bias": rng.normal(size=4).astype(np.float32),
        "1.weight": rng.normal(size=(3, 4)).astype(np.float32),
        "1.bias": rng.normal(size=3).astype(np.float32),
    }


def torch_state(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array.copy()) for name, array in tensors.items()}


def keras_model(width: int = 4) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(width, activation="relu", name="dense"),
            keras.layers.Dense(3, activation="softmax", name="dense_1"),
        ],
        name="sequential",
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="categorical_crossentropy"
    )
    return model


def save_keras(model: keras.Model, directory: Path, stem: str) -> None:
    model.save(directory / f"{stem}.keras")
    model.save(directory / f"{stem}.h5")
    model.save_weights(directory / f"{stem}.weights.h5")


@dataclass(frozen=True)
class Sources:
    """Two good members of every format, written by the real libraries."""

    directory: Path

    def member(self, fmt: str, number: int) -> Path:
        if fmt == "sharded":
            return self.directory / f"checkpoint-{number}"
        folder = "legacy" if fmt == "pt-legacy" else ""
        return self.directory / folder / f"m_{number}{SUFFIXES[fmt]}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Sources:
    hub = pytest.importorskip("huggingface_hub")
    directory = tmp_path_factory.mktemp("sources")
    (directory / "legacy").mkdir()
    for number in (1, 2):
        tensors = state(number)
        save_file(tensors, str(directory / f"m_{number}.safetensors"), metadata={"format": "pt"})
        (directory / f"checkpoint-{number}").mkdir()
        hub.save_torch_state_dict(
            torch_state(tensors), directory / f"checkpoint-{number}", max_shard_size=60
        )
        np.savez(directory / f"m_{number}.npz", **tensors)
        torch.save(torch_state(tensors), directory / f"m_{number}.pt")
        torch.save(
            torch_state(tensors),
            directory / "legacy" / f"m_{number}.pt",
            _use_new_zipfile_serialization=False,
        )
    keras.utils.set_random_seed(0)
    model = keras_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 2)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, size=32), 3)
    for number in (1, 2):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)  # optimizer state exists
        save_keras(model, directory, f"m_{number}")
    wide = keras_model(width=5)
    wide.save_weights(directory / "wide_1.weights.h5")
    return Sources(directory)


# -- cases -----------------------------------------------------------------------------------


@dataclass
class Scenario:
    """What a case built and what the command must answer.

    Attributes:
        args: the command line after ``polyak``.
        message: a regex the one-line message must match (it names the file).
        bad: the generated bad files (what the corpus counts).
        marker: a file that exists only if something in an input was executed.
        cheap: a hostile size: the refusal must cost little time and memory.
    """

    args: list[str]
    message: str
    bad: list[Path]
    marker: Path | None = None
    cheap: bool = False


@dataclass
class Workspace:
    """Where a case builds: ``inputs/`` for checkpoints, ``out/`` for outputs."""

    root: Path
    sources: Sources

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def copy(self, fmt: str, number: int, name: str | None = None) -> Path:
        source = self.sources.member(fmt, number)
        target = self.inputs / (name or source.name)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        return target

    def pair(self, fmt: str) -> tuple[Path, Path]:
        return self.copy(fmt, 1), self.copy(fmt, 2)

    def output(self, fmt: str) -> Path:
        return self.out / f"avg{OUTPUTS[fmt]}"

    def average(self, inputs: list[Path], fmt: str, *extra: str) -> list[str]:
        return ["average", *map(str, inputs), "-o", str(self.output(fmt)), *extra]


@dataclass(frozen=True)
class Case:
    klass: str
    variant: str
    build: Callable[[Workspace], Scenario]

    @property
    def id(self) -> str:
        return f"{self.klass}[{self.variant}]"


CASES: list[Case] = []


def case(klass: str, *variants: str):
    """Register ``build(workspace, variant)`` for each variant (or once, without one)."""

    def register(build):
        for variant in variants or ("-",):
            if variants:
                CASES.append(Case(klass, variant, lambda w, v=variant: build(w, v)))
            else:
                CASES.append(Case(klass, variant, build))
        return build

    return register


def named(path: Path) -> str:
    return re.escape(str(path))


def first_file(member: Path) -> Path:
    """The file to damage in a member: itself, or a checkpoint directory's first shard."""
    if member.is_dir():
        return sorted(member.glob("model-*.safetensors"))[0]
    return member


def first_tensor(path: Path) -> str:
    with open_checkpoint(path) as reader:
        return reader.names()[0]


# -- Keras helpers: edit the HDF5 inside a .keras zip, rewrite zips ------------------------


def rezip(
    path: Path,
    transform: Callable[[list[tuple[zipfile.ZipInfo, bytes]]], list[tuple[str, bytes, int]]],
) -> None:
    """Rewrite the zip at ``path`` with ``transform`` applied to its (info, data) members."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are on purpose
        for name, data, compression in transform(members):
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data, compression)


def keep(members) -> list[tuple[str, bytes, int]]:
    return [(info.filename, data, info.compress_type) for info, data in members]


def edit_hdf5(path: Path, edit: Callable[[h5py.File], None]) -> None:
    """Apply ``edit`` to an HDF5 file, or to the ``model.weights.h5`` inside a ``.keras``."""
    if path.suffix != ".keras":
        with h5py.File(path, "r+") as file:
            edit(file)
        return
    scratch = path.with_name(path.name + ".scratch.h5")

    def transform(members):
        result = []
        for info, data in members:
            if info.filename == "model.weights.h5":
                scratch.write_bytes(data)
                with h5py.File(scratch, "r+") as file:
                    edit(file)
                data = scratch.read_bytes()
                scratch.unlink()
            result.append((info.filename, data, info.compress_type))
        return result

    rezip(path, transform)


# -- 1. truncated files of every format ------------------------------------------------------

TRUNCATIONS = {"head": lambda size: 8, "half": lambda size: size // 2, "last-byte": lambda s: s - 1}
TRUNCATION_MESSAGES = {
    "safetensors": r"(too small|header length \d+ is larger than the file|fall outside)",
    "npz": r"cannot be read as a \.npz archive",
    "pt": r"cannot be read as a PyTorch checkpoint",
    "keras": r"cannot be read as a zip",
    "hdf5": r"is not a readable HDF5 file",
}


def truncation_message(fmt: str) -> str:
    if fmt in ("safetensors", "sharded"):
        return TRUNCATION_MESSAGES["safetensors"]
    if fmt.startswith("pt"):
        return TRUNCATION_MESSAGES["pt"]
    if fmt in ("weights.h5", "h5"):
        return TRUNCATION_MESSAGES["hdf5"]
    return TRUNCATION_MESSAGES[fmt]


for _fmt in SUFFIXES:
    for _where in TRUNCATIONS:

        @case("truncated", f"{_fmt}-{_where}")
        def _truncated(w: Workspace, variant: str, fmt=_fmt, where=_where) -> Scenario:
            good, member = w.pair(fmt)
            bad = first_file(member)
            data = bad.read_bytes()
            bad.write_bytes(data[: TRUNCATIONS[where](len(data))])
            return Scenario(
                w.average([good, member], fmt),
                rf"checkpoint {named(bad)}: .*{truncation_message(fmt)}",
                [bad],
            )


# -- 2. wrong magic, tiny and empty files ------------------------------------------------------

WRONG_CONTENT = {
    "empty": b"",
    "tiny": b"PK\x03",
    "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
    "text": b"<html><body>404 Not Found</body></html>\n",
}
WRONG_MESSAGES = {
    "safetensors": r"(too small for a safetensors file|header length \d+ is larger)",
    "npz": r"cannot be read as a \.npz archive",
    "pt": r"cannot be read as a PyTorch checkpoint",
    "keras": r"cannot be read as a zip",
    "weights.h5": r"is not a readable HDF5 file",
    "h5": r"is not a readable HDF5 file",
}

for _fmt in WRONG_MESSAGES:
    for _content in WRONG_CONTENT if _fmt == "safetensors" else ("empty", "text"):

        @case("wrong-magic-or-tiny", f"{_fmt}-{_content}")
        def _wrong(w: Workspace, variant: str, fmt=_fmt, content=_content) -> Scenario:
            good = w.copy(fmt, 1)
            bad = w.inputs / f"m_2{SUFFIXES[fmt]}"
            bad.write_bytes(WRONG_CONTENT[content])
            return Scenario(
                w.average([good, bad], fmt),
                rf"checkpoint {named(bad)}: .*{WRONG_MESSAGES[fmt]}",
                [bad],
            )


@case("wrong-magic-or-tiny", "npz-that-is-safetensors", "weights.h5-that-is-zip")
def _misnamed(w: Workspace, variant: str) -> Scenario:
    fmt = "npz" if variant.startswith("npz") else "weights.h5"
    good = w.copy(fmt, 1)
    bad = w.inputs / f"m_2{SUFFIXES[fmt]}"
    other = w.sources.member("safetensors" if fmt == "npz" else "npz", 2)
    shutil.copyfile(other, bad)
    return Scenario(
        w.average([good, bad], fmt), rf"checkpoint {named(bad)}: .*{WRONG_MESSAGES[fmt]}", [bad]
    )


@case("unknown-suffix")
def _unknown_suffix(w: Workspace) -> Scenario:
    bad = w.inputs / "m_2.ckpt.txt"
    shutil.copyfile(w.sources.member("safetensors", 2), bad)
    return Scenario(
        ["average", str(bad), "-o", str(w.output("safetensors"))],
        rf"checkpoint {named(bad)}: unknown format of 'm_2\.ckpt\.txt'",
        [bad],
    )


# -- 3. safetensors headers ---------------------------------------------------------------------


def safetensors_with(path: Path, header: bytes, data: bytes, length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def real_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def damaged_safetensors(w: Workspace, damage: Callable[[dict], None]) -> tuple[Path, Path]:
    """Member 2 with its real header edited by ``damage`` (data kept)."""
    good = w.copy("safetensors", 1)
    bad = w.inputs / "m_2.safetensors"
    header, data = real_header(w.sources.member("safetensors", 2))
    damage(header)
    safetensors_with(bad, json.dumps(header).encode(), data)
    return good, bad


@case("safetensors-header-length-beyond-file")
def _length_beyond(w: Workspace) -> Scenario:
    good = w.copy("safetensors", 1)
    bad = w.inputs / "m_2.safetensors"
    raw = w.sources.member("safetensors", 2).read_bytes()
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: safetensors header length {len(raw)} is larger than the file",
        [bad],
        cheap=True,
    )


@case("safetensors-header-length-absurd", "2**63", "2**64-1")
def _length_absurd(w: Workspace, variant: str) -> Scenario:
    good = w.copy("safetensors", 1)
    length = 2**63 if variant == "2**63" else 2**64 - 1
    bad = safetensors_with(w.inputs / "m_2.safetensors", b"{}", b"", length=length)
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: safetensors header length {length} is larger",
        [bad],
        cheap=True,
    )


@case("safetensors-header-not-json", "garbage", "not-utf8", "not-an-object", "truncated-json")
def _not_json(w: Workspace, variant: str) -> Scenario:
    good = w.copy("safetensors", 1)
    header = {
        "garbage": b"this is not json at all!",
        "not-utf8": b'{"\xff\xfe": 1}  ',
        "not-an-object": b"[1, 2, 3]",
        "truncated-json": b'{"0.weight": {"dtype": "F32", ',
    }[variant]
    bad = safetensors_with(w.inputs / "m_2.safetensors", header, bytes(64))
    expected = {
        "garbage": "header is invalid",
        "not-utf8": "header is not UTF-8",
        "not-an-object": "header is not a JSON object",
        "truncated-json": "header is invalid",
    }[variant]
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: safetensors {expected}",
        [bad],
    )


@case("safetensors-unknown-dtype", "F8_E9M9", "complex", "missing")
def _unknown_dtype(w: Workspace, variant: str) -> Scenario:
    def damage(header):
        if variant == "missing":
            del header["0.bias"]["dtype"]
        else:
            header["0.bias"]["dtype"] = "C64" if variant == "complex" else variant

    good, bad = damaged_safetensors(w, damage)
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: tensor 0\.bias: dtype .* is not supported",
        [bad],
    )


@case("safetensors-overlapping-offsets", "shifted", "same-bytes")
def _overlap(w: Workspace, variant: str) -> Scenario:
    def damage(header):
        begin, end = header["0.weight"]["data_offsets"]
        if variant == "same-bytes":
            header["0.bias"]["data_offsets"] = [begin, begin + 16]
        else:
            header["0.bias"]["data_offsets"] = [end - 4, end + 12]

    good, bad = damaged_safetensors(w, damage)
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: tensors (0\.weight and 0\.bias|0\.bias and 0\.weight) overlap",
        [bad],
    )


@case("safetensors-offsets-out-of-range", "beyond-end", "negative", "reversed", "huge")
def _out_of_range(w: Workspace, variant: str) -> Scenario:
    def damage(header):
        begin, end = header["1.bias"]["data_offsets"]
        header["1.bias"]["data_offsets"] = {
            "beyond-end": [begin + 64, end + 64],
            "negative": [-12, 0],
            "reversed": [end, begin],
            "huge": [2**62, 2**62 + 12],
        }[variant]

    good, bad = damaged_safetensors(w, damage)
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: tensor 1\.bias: data_offsets \[.*\] fall outside",
        [bad],
        cheap=variant == "huge",
    )


@case("duplicate-tensor-names", "safetensors", "npz", "keras-zip-member")
def _duplicates(w: Workspace, variant: str) -> Scenario:
    if variant == "safetensors":
        good = w.copy("safetensors", 1)
        header, data = real_header(w.sources.member("safetensors", 2))
        text = json.dumps(header)
        entry = json.dumps(header["0.bias"])
        text = text[:-1] + f', "0.bias": {entry}' + "}"
        bad = safetensors_with(w.inputs / "m_2.safetensors", text.encode(), data)
        message = r"header is invalid: duplicate tensor name '0\.bias'"
        fmt = "safetensors"
    elif variant == "npz":
        good, bad = w.pair("npz")
        rezip(bad, lambda members: [*keep(members), keep(members)[0]])
        message = r"tensor 0\.weight appears twice"
        fmt = "npz"
    else:
        good, bad = w.pair("keras")
        rezip(bad, lambda members: [*keep(members), ("config.json", b"{}", zipfile.ZIP_STORED)])
        message = r"zip members 'config\.json' appear more than once"
        fmt = "keras"
    return Scenario(w.average([good, bad], fmt), rf"checkpoint {named(bad)}: .*{message}", [bad])


@case("safetensors-shape-not-matching-bytes", "bigger-shape", "smaller-shape", "negative-dim")
def _shape_mismatch(w: Workspace, variant: str) -> Scenario:
    def damage(header):
        header["0.weight"]["shape"] = {
            "bigger-shape": [4, 3],
            "smaller-shape": [2, 2],
            "negative-dim": [-4, -2],
        }[variant]

    good, bad = damaged_safetensors(w, damage)
    expected = (
        r"shape \[-4, -2\] is not a list of integers >= 0"
        if variant == "negative-dim"
        else r"shape \(\d, \d\) of float32 needs \d+ bytes; data_offsets give 32"
    )
    return Scenario(
        w.average([good, bad], "safetensors"),
        rf"checkpoint {named(bad)}: tensor 0\.weight: {expected}",
        [bad],
    )


# -- 4. sharded index ----------------------------------------------------------------------------


def edit_index(directory: Path, edit: Callable[[dict], None]) -> Path:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index))
    return index_path


@case("shard-missing", "deleted", "name-too-long", "nul-byte")
def _shard_missing(w: Workspace, variant: str) -> Scenario:
    good, member = w.pair("sharded")
    shard = first_file(member)
    index = member / "model.safetensors.index.json"
    if variant == "deleted":
        shard.unlink()
        message = rf"shard {re.escape(shard.name)} named in the index is missing"
    else:
        name = "x" * 300 if variant == "name-too-long" else "model\x00.safetensors"

        def edit(content):
            content["weight_map"]["0.bias"] = name

        edit_index(member, edit)
        message = (
            r"shard 'x+' named in the index cannot be opened \(File name too long\)"
            if variant == "name-too-long"
            else r"tensor 0\.bias points to shard 'model\\x00\.safetensors'"
        )
    return Scenario(
        w.average([good, member], "sharded"), rf"checkpoint {named(index)}: {message}", [index]
    )


@case("shard-outside-directory", "dot-dot", "absolute", "sub-directory", "dot-dot-existing")
def _shard_outside(w: Workspace, variant: str) -> Scenario:
    good, member = w.pair("sharded")
    outside = w.copy("safetensors", 2, name="outside.safetensors")
    target = {
        "dot-dot": "../outside.safetensors",
        "absolute": str(outside),
        "sub-directory": "sub/model.safetensors",
        "dot-dot-existing": "../checkpoint-1/model-00001-of-00004.safetensors",
    }[variant]

    def edit(index):
        index["weight_map"]["0.bias"] = target

    index = edit_index(member, edit)
    return Scenario(
        w.average([good, member], "sharded"),
        rf"checkpoint {named(index)}: tensor 0\.bias points to shard '{re.escape(target)}'; "
        "shards must be plain file names",
        [index],
    )


@case("shard-index-not-json", "garbage", "no-weight-map", "weight-map-list")
def _index_not_json(w: Workspace, variant: str) -> Scenario:
    good, member = w.pair("sharded")
    index = member / "model.safetensors.index.json"
    content = {
        "garbage": b'{"weight_map": {"0.bias": ',
        "no-weight-map": b'{"metadata": {"total_size": 12}}',
        "weight-map-list": b'{"weight_map": ["model-00001-of-00004.safetensors"]}',
    }[variant]
    index.write_bytes(content)
    message = (
        "the shard index cannot be read as JSON"
        if variant == "garbage"
        else "the shard index has no 'weight_map'"
    )
    return Scenario(
        w.average([good, member], "sharded"), rf"checkpoint {named(index)}: {message}", [index]
    )


@case("shard-index-huge")
def _index_huge(w: Workspace) -> Scenario:
    good, member = w.pair("sharded")
    index = member / "model.safetensors.index.json"
    with open(index, "r+b") as file:  # sparse: costs no disk, would cost memory to read
        file.truncate(100_000_001)
    return Scenario(
        w.average([good, member], "sharded"),
        rf"checkpoint {named(index)}: the shard index is \d+ bytes, above the limit",
        [index],
        cheap=True,
    )


# -- 5. pickles --------------------------------------------------------------------------------


class RunsCode:
    """Unpickling it runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Opaque:
    """A class of this test module: never on torch's weights_only list."""

    def __init__(self) -> None:
        self.value = 3


@case("pickle-runs-a-command", "pt-zip", "pt-legacy", "raw-pickle", "inspect")
def _pickle_runs(w: Workspace, variant: str) -> Scenario:
    good = w.copy("pt", 1)
    marker = w.root / "MARKER-pwned"
    bad = w.inputs / "m_2.pt"
    payload = {"state_dict": torch_state(state(2)), "callbacks": RunsCode(marker)}
    if variant == "raw-pickle":
        import pickle

        bad.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, bad, _use_new_zipfile_serialization=variant != "pt-legacy")
    args = (
        ["inspect", str(good), str(bad)] if variant == "inspect" else w.average([good, bad], "pt")
    )
    message = (
        r"cannot be read as a PyTorch checkpoint"
        if variant == "raw-pickle"
        else r"refused to load .*(posix|os)\.system.*never unpickles arbitrary objects"
    )
    return Scenario(args, rf"checkpoint {named(bad)}: {message}", [bad], marker=marker)


# argparse.Namespace is not here: timm saves its command line as one, and polyak reads it
# as plain data without calling argparse (tests/test_real_trainers.py).
@case("pickle-classes-outside-safe-list", "custom-class", "legacy-custom-class")
def _unsafe_classes(w: Workspace, variant: str) -> Scenario:
    good = w.copy("pt", 1)
    bad = w.inputs / "m_2.pt"
    torch.save(
        {"model": torch_state(state(2)), "args": Opaque()},
        bad,
        _use_new_zipfile_serialization=variant != "legacy-custom-class",
    )
    return Scenario(
        w.average([good, bad], "pt"),
        rf"checkpoint {named(bad)}: refused to load [\w.]*Opaque",
        [bad],
    )


@case("pt-not-weights", "tensor", "list", "dict-without-weights")
def _not_weights(w: Workspace, variant: str) -> Scenario:
    good = w.copy("pt", 1)
    bad = w.inputs / "m_2.pt"
    content = {
        "tensor": torch.ones(3),
        "list": [torch.ones(3)],
        "dict-without-weights": {"epoch": 3, "notes": "x"},
    }[variant]
    torch.save(content, bad)
    message = "found no weights" if variant.startswith("dict") else r"holds a \w+, not a state dict"
    return Scenario(w.average([good, bad], "pt"), rf"checkpoint {named(bad)}: {message}", [bad])


@case("npz-pickled-objects", "object-array", "object-field")
def _npz_objects(w: Workspace, variant: str) -> Scenario:
    good = w.copy("npz", 1)
    marker = w.root / "MARKER-pwned"
    payload = np.empty(1, dtype=object if variant == "object-array" else [("a", "O")])
    payload[0] = RunsCode(marker) if variant == "object-array" else (RunsCode(marker),)
    bad = w.inputs / "m_2.npz"
    np.savez(bad, **state(2), payload=payload)
    return Scenario(
        w.average([good, bad], "npz"),
        rf"checkpoint {named(bad)}: tensor payload: holds Python objects",
        [bad],
        marker=marker,
    )


def npy_member(shape: tuple[int, ...], data: bytes, descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + data


@case("npz-huge-shape", "both-members", "inspect")
def _npz_huge(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair("npz")
    huge = npy_member((2**40,), bytes(16))
    for path in (good, bad) if variant == "both-members" else (bad,):

        def transform(members):
            return [
                (name, huge if name == "0.bias.npy" else data, c) for name, data, c in keep(members)
            ]

        rezip(path, transform)
    args = ["inspect", str(bad)] if variant == "inspect" else w.average([good, bad], "npz")
    return Scenario(
        args,
        rf"checkpoint {named(bad)}: tensor 0\.bias: declares shape \(1099511627776,\)",
        [bad],
        cheap=True,
    )


@case("npz-unsupported-member", "complex", "not-npy", "unicode-strings")
def _npz_unsupported(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair("npz")
    member = {
        "complex": npy_member((2,), bytes(16), "<c8"),
        "not-npy": b"definitely not an npy file",
        "unicode-strings": npy_member((2,), bytes(16), "<U2"),
    }[variant]

    def transform(members):
        return [
            (name, member if name == "0.bias.npy" else data, c) for name, data, c in keep(members)
        ]

    rezip(bad, transform)
    message = "not a valid .npy member" if variant == "not-npy" else "dtype .* is not supported"
    return Scenario(
        w.average([good, bad], "npz"), rf"checkpoint {named(bad)}: tensor 0\.bias: {message}", [bad]
    )


# -- 6. .keras zips --------------------------------------------------------------------------


def bomb(size: int = 32 * 2**20) -> bytes:
    return bytes(size)


@case("zip-bomb", "weights-member", "other-member", "declared-size", "small-declared-size")
def _zip_bomb(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair("keras")
    if variant == "weights-member":
        # Real weights, then zeros HDF5 ignores: a valid file that inflates 700-fold.
        def transform(members):
            return [
                (
                    name,
                    data + bomb() if name == "model.weights.h5" else data,
                    zipfile.ZIP_DEFLATED if name == "model.weights.h5" else c,
                )
                for name, data, c in keep(members)
            ]

        message = r"member 'model\.weights\.h5' inflates from \d+ to \d+ bytes"
    elif variant == "other-member":

        def transform(members):
            return [*keep(members), ("assets/bomb.bin", bomb(), zipfile.ZIP_DEFLATED)]

        message = r"member 'assets/bomb\.bin' inflates from \d+ to \d+ bytes"
    elif variant == "small-declared-size":
        # Below the .keras rule's 1 MiB exemption, a lie deflate cannot tell: the shared rule.
        def transform(members):
            return [
                (name, data, zipfile.ZIP_DEFLATED if name == "config.json" else c)
                for name, data, c in keep(members)
            ]

        message = r"member 'config\.json' declares 1000000 bytes from \d+ compressed bytes"
    else:

        def transform(members):
            return [
                (name, data, zipfile.ZIP_DEFLATED if name == "model.weights.h5" else c)
                for name, data, c in keep(members)
            ]

        message = r"member 'model\.weights\.h5' inflates from \d+ to 4294967294 bytes"
    rezip(bad, transform)
    if variant == "declared-size":
        declare_size(bad, "model.weights.h5", 2**32 - 2)
    if variant == "small-declared-size":
        declare_size(bad, "config.json", 1_000_000)
    return Scenario(
        w.average([good, bad], "keras"), rf"checkpoint {named(bad)}: {message}", [bad], cheap=True
    )


def declare_size(path: Path, member: str, size: int) -> None:
    """Patch the uncompressed size a zip member declares, in its local and central headers."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    struct.pack_into("<I", raw, info.header_offset + 22, size)
    position = raw.find(b"PK\x01\x02")
    while position != -1:
        (name_length,) = struct.unpack_from("<H", raw, position + 28)
        if raw[position + 46 : position + 46 + name_length] == member.encode():
            struct.pack_into("<I", raw, position + 24, size)
        position = raw.find(b"PK\x01\x02", position + 4)
    path.write_bytes(bytes(raw))


@case("zip-path-traversal", "dot-dot", "nested-dot-dot", "absolute", "windows-drive", "backslash")
def _traversal(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair("keras")
    name = {
        "dot-dot": "../evil.sh",
        "nested-dot-dot": "assets/../../evil.sh",
        "absolute": "/tmp/evil.sh",
        "windows-drive": "C:/evil.sh",
        "backslash": "assets\\..\\..\\evil.sh",
    }[variant]
    rezip(bad, lambda members: [*keep(members), (name, b"echo pwned", zipfile.ZIP_STORED)])
    return Scenario(
        w.average([good, bad], "keras"),
        rf"checkpoint {named(bad)}: zip member '{re.escape(name)}' has an absolute path or '\.\.'",
        [bad],
    )


@case("keras-zip-without-weights")
def _no_weights(w: Workspace) -> Scenario:
    good, bad = w.pair("keras")
    rezip(bad, lambda members: [m for m in keep(members) if m[0] != "model.weights.h5"])
    return Scenario(
        w.average([good, bad], "keras"),
        rf"checkpoint {named(bad)}: a \.keras archive holds its weights in the member",
        [bad],
    )


# -- 7. HDF5 -----------------------------------------------------------------------------------


@case("hdf5-links", *[f"{kind}-{fmt}" for kind in ("soft", "external") for fmt in KERAS_FORMATS])
def _links(w: Workspace, variant: str) -> Scenario:
    kind, fmt = variant.split("-", 1)
    good, bad = w.pair(fmt)
    secret = w.inputs / "secret.h5"
    with h5py.File(secret, "w") as file:
        file["data"] = np.arange(8, dtype=np.float32)
    group_name = first_tensor(bad).rsplit("/", 1)[0]

    def edit(file):
        link = (
            h5py.SoftLink("/" + first_tensor(good))
            if kind == "soft"
            else h5py.ExternalLink(str(secret), "/data")
        )
        file[group_name + "/evil"] = link

    edit_hdf5(bad, edit)
    description = "a soft link" if kind == "soft" else "an external link"
    return Scenario(
        w.average([good, bad], fmt),
        rf"checkpoint {named(bad)}: '{re.escape(group_name)}/evil' is {description}",
        [bad, secret],
    )


@case("hdf5-external-storage", "weights.h5", "h5", "keras")
def _external_storage(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair(variant)
    name = first_tensor(bad)
    with open_checkpoint(bad) as reader:
        info = reader.info(name)
    # A file whose bytes would be read as the tensor, and averaged without complaint.
    secret = w.inputs / "secret.bin"
    secret.write_bytes(np.arange(info.size, dtype=np.float32).tobytes())

    def edit(file):
        del file[name]
        file.create_dataset(name, info.shape, "float32", external=[(str(secret), 0, info.nbytes)])

    edit_hdf5(bad, edit)
    return Scenario(
        w.average([good, bad], variant),
        rf"checkpoint {named(bad)}: tensor '{re.escape(name)}' keeps its data in another file",
        [bad, secret],
    )


@case("hdf5-virtual-dataset", "weights.h5", "h5")
def _virtual(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair(variant)
    name = first_tensor(bad)
    secret = w.inputs / "secret.h5"
    with h5py.File(bad, "r") as file:
        shape, dtype = file[name].shape, file[name].dtype
    with h5py.File(secret, "w") as file:
        file["data"] = np.ones(shape, dtype)

    def edit(file):
        layout = h5py.VirtualLayout(shape, dtype)
        layout[...] = h5py.VirtualSource(str(secret), "data", shape)
        del file[name]
        file.create_virtual_dataset(name, layout)

    edit_hdf5(bad, edit)
    return Scenario(
        w.average([good, bad], variant),
        rf"checkpoint {named(bad)}: tensor '{re.escape(name)}' keeps its data in another file",
        [bad, secret],
    )


@case("hdf5-unsupported-dtype", "float-numpy-cannot-represent", "complex", "strings")
def _hdf5_dtype(w: Workspace, variant: str) -> Scenario:
    good, bad = w.pair("weights.h5")
    name = first_tensor(bad)

    def edit(file):
        shape = file[name].shape
        del file[name]
        if variant == "float-numpy-cannot-represent":
            # A 64-bit float with a 20-bit exponent: no numpy type can hold it.
            odd = h5py.h5t.IEEE_F64LE.copy()
            odd.set_fields(63, 43, 20, 0, 43)
            odd.set_ebias(2**19 - 1)
            h5py.h5d.create(file.id, name.encode(), odd, h5py.h5s.create_simple(shape))
        elif variant == "complex":
            file.create_dataset(name, shape, "complex64")
        else:
            file.create_dataset(name, shape, h5py.string_dtype())

    edit_hdf5(bad, edit)
    return Scenario(
        w.average([good, bad], "weights.h5"),
        rf"checkpoint {named(bad)}: tensor '{re.escape(name)}' has dtype .*, which polyak does "
        "not support",
        [bad],
    )


@case("hdf5-huge-shape", "weights.h5", "h5-chunked", "keras", "inspect")
def _huge_shape(w: Workspace, variant: str) -> Scenario:
    fmt = {"h5-chunked": "h5", "inspect": "weights.h5"}.get(variant, variant)
    good, bad = w.pair(fmt)
    name = first_tensor(bad)

    def edit(file):
        del file[name]
        if variant == "h5-chunked":
            file.create_dataset(name, (2**20, 2**20), "float32", chunks=(64, 64))
        else:
            file.create_dataset(name, (2**40,), "float32")

    # Both members, so that they agree and only reading the data would show it.
    edit_hdf5(good, edit)
    edit_hdf5(bad, edit)
    args = ["inspect", str(bad)] if variant == "inspect" else w.average([bad, good], fmt)
    return Scenario(
        args,
        rf"checkpoint {named(bad)}: tensor '{re.escape(name)}' declares shape "
        r"\(\d+(, \d+)?,?\) of float32 \(\d+ bytes\) but the file holds 0 bytes of it",
        [good, bad],
        cheap=True,
    )


# -- 8. values and members ---------------------------------------------------------------------

NONFINITE = ("safetensors", "npz", "pt", "weights.h5", "h5", "keras")


def build_nonfinite(w: Workspace, fmt: str) -> tuple[Path, Path, str]:
    """Members 1 and 2 of ``fmt``, member 2 with a NaN or an infinity in its first tensor."""
    good = w.copy(fmt, 1)
    bad = w.inputs / f"m_2{SUFFIXES[fmt]}"
    value = {"safetensors": np.nan, "npz": np.inf, "pt": -np.inf}.get(fmt, np.nan)
    if fmt in KERAS_FORMATS:
        shutil.copyfile(w.sources.member(fmt, 2), bad)
        name = first_tensor(bad)

        def edit(file):
            data = file[name][()]
            data.flat[0] = value
            file[name][...] = data

        edit_hdf5(bad, edit)
        return good, bad, name
    tensors = state(2)
    tensors["0.weight"][1, 1] = value
    if fmt == "safetensors":
        save_file(tensors, str(bad))
    elif fmt == "npz":
        np.savez(bad, **tensors)
    else:
        torch.save(torch_state(tensors), bad)
    return good, bad, "0.weight"


@case("nonfinite-values", *NONFINITE)
def _nonfinite(w: Workspace, variant: str) -> Scenario:
    good, bad, name = build_nonfinite(w, variant)
    return Scenario(
        w.average([good, bad], variant),
        rf"checkpoint {named(bad)}: tensor {re.escape(name)} holds NaN or infinite values.*"
        "--allow-nonfinite",
        [bad],
    )


@case("incompatible-members", "names", "shapes", "dtypes", "keras-architecture")
def _incompatible(w: Workspace, variant: str) -> Scenario:
    if variant == "keras-architecture":
        bad = w.inputs / "m_1.weights.h5"
        shutil.copyfile(w.sources.directory / "wide_1.weights.h5", bad)
        good = w.copy("weights.h5", 2)
        fmt = "weights.h5"
        message = (
            r"m_1\.weights\.h5: tensor layers/dense/vars/0 has shape \(2, 5\); m_2\.weights\.h5"
        )
    else:
        fmt = {"names": "safetensors", "shapes": "npz", "dtypes": "pt"}[variant]
        good = w.copy(fmt, 2)
        bad = w.inputs / f"m_1{SUFFIXES[fmt]}"
        tensors = state(1)
        if variant == "names":
            tensors["extra.weight"] = tensors.pop("1.bias")
            save_file(tensors, str(bad))
            message = (
                r"m_2\.safetensors has tensor 1\.bias that m_1\.safetensors lacks; "
                r"m_1\.safetensors has tensor extra"
            )
        elif variant == "shapes":
            tensors["0.weight"] = np.zeros((4, 3), np.float32)
            np.savez(bad, **tensors)
            message = r"m_1\.npz: tensor 0\.weight has shape \(4, 3\); m_2\.npz has \(4, 2\)"
        else:
            tensors["1.weight"] = tensors["1.weight"].astype(np.float16)
            torch.save(torch_state(tensors), bad)
            message = r"m_1\.pt: tensor 1\.weight has dtype float16; m_2\.pt has float32"
    return Scenario(
        w.average([good, bad], fmt), rf"checkpoints cannot be averaged.*{message}", [bad]
    )


# -- 9. outputs --------------------------------------------------------------------------------


@case(
    "output-is-an-input",
    *[
        f"{how}-{fmt}"
        for how in ("plain", "symlink", "hardlink")
        for fmt in ("safetensors", "keras")
    ],
)
def _output_is_input(w: Workspace, variant: str) -> Scenario:
    how, fmt = variant.split("-", 1)
    good, member = w.pair(fmt)
    if how == "plain":
        out = member
    else:
        out = w.out / f"avg{SUFFIXES[fmt]}"
        if how == "symlink":
            out.symlink_to(member)
        else:
            os.link(member, out)
    return Scenario(
        ["average", str(good), str(member), "-o", str(out), "--overwrite"],
        rf"output {named(out)}: is the input {named(member)}; polyak never overwrites an input",
        [out] if how != "plain" else [],
    )


@case("output-under-a-file")
def _under_a_file(w: Workspace) -> Scenario:
    good, member = w.pair("safetensors")
    blocker = w.out / "not-a-directory"
    blocker.write_text("a file")
    out = blocker / "avg.safetensors"
    return Scenario(
        ["average", str(good), str(member), "-o", str(out)],
        rf"output {named(out)}: the directory {named(blocker)} does not exist",
        [],
    )


# -- running the cases ------------------------------------------------------------------------


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's SHA-256, a link's target, or 'dir'."""
    entries = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            if path.is_symlink():
                entries[relative] = "-> " + os.readlink(path)
            elif path.is_dir():
                entries[relative] = "dir"
            else:
                with open(path, "rb") as file:
                    entries[relative] = hashlib.file_digest(file, "sha256").hexdigest()
    return entries


@pytest.fixture
def workspace(tmp_path, sources, monkeypatch) -> Workspace:
    w = Workspace(tmp_path, sources)
    w.inputs.mkdir()
    w.out.mkdir()
    # Extracted .keras members go to the system temporary directory: watch it too.
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    monkeypatch.chdir(tmp_path)
    _register()
    return w


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``polyak`` in-process; stderr includes the warnings Python would print there."""
    with warnings.catch_warnings(record=True) as caught:
        # Python's default filters, as the command line runs with them.
        warnings.simplefilter("default")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning):
            warnings.filterwarnings("ignore", category=category)
        with pytest.raises(SystemExit) as exited:
            main(args)
    captured = capsys.readouterr()
    printed = "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught
    )
    return exited.value.code, captured.out, printed + captured.err


def assert_one_line_refusal(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("polyak: error: "), err
    assert re.search(message, lines[0]), f"{message!r} not in {lines[0]!r}"


# Loose bounds for the cheap refusals: not benchmarks, just far below what reading costs.
CHEAP_SECONDS = 3.0
CHEAP_TRACED_BYTES = 16 * 2**20
CHEAP_RSS_KIB = 256 * 2**10


@pytest.mark.parametrize("corpus_case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused(corpus_case: Case, workspace: Workspace, capsys):
    scenario = corpus_case.build(workspace)
    capsys.readouterr()
    before = tree(workspace.root)
    if scenario.cheap:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        started = time.perf_counter()
    try:
        code, _, err = run_cli(scenario.args, capsys)
    finally:
        if scenario.cheap:
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert_one_line_refusal(code, err, scenario.message)
    assert tree(workspace.root) == before, "an input changed, or an output or temporary was left"
    if scenario.marker is not None:
        assert not scenario.marker.exists(), "a pickled payload ran"
    if scenario.cheap:
        assert elapsed < CHEAP_SECONDS, f"took {elapsed:.2f} s"
        assert peak < CHEAP_TRACED_BYTES, f"traced {peak} bytes"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        assert grown < CHEAP_RSS_KIB, f"max RSS grew by {grown} KiB"


@pytest.mark.parametrize("fmt", NONFINITE)
def test_nonfinite_values_are_averaged_when_allowed(fmt: str, workspace: Workspace, capsys):
    good, bad, name = build_nonfinite(workspace, fmt)
    before = tree(workspace.inputs)
    code, _, err = run_cli(workspace.average([good, bad], fmt, "--allow-nonfinite"), capsys)
    assert code == 0, err
    assert tree(workspace.inputs) == before
    with open_checkpoint(workspace.output(fmt)) as reader:
        assert not np.isfinite(reader.read(name)).all()


def test_corpus_size(sources, tmp_path):
    """At least 24 classes and 60 generated bad files (the README quotes the counts)."""
    classes = {c.klass for c in CASES}
    files: set[Path] = set()
    for number, corpus_case in enumerate(CASES):
        w = Workspace(tmp_path / str(number), sources)
        w.inputs.mkdir(parents=True)
        w.out.mkdir()
        files.update(corpus_case.build(w).bad)
    classes |= set(PROCESS_CLASSES)
    print(f"corpus: {len(classes)} classes, {len(CASES)} cases, {len(files)} files")
    assert len(classes) >= 24
    assert len(files) >= 60


# -- outputs that the file system refuses: full disk, read-only directory -----------------------

PROCESS_CLASSES = ("disk-full", "output-directory-read-only")
COMMAND = [sys.executable, "-c", "import sys; from polyak.cli.main import main; main(sys.argv[1:])"]


def run_process(args: list[str], **options) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **options)


def full_disk_inputs(w: Workspace, output: str) -> tuple[list[Path], Path]:
    fmt = output if output in SUFFIXES else "safetensors"
    inputs = list(w.pair(fmt))
    out = w.out / "avg" if output == "directory" else w.output(fmt)
    # An existing output must survive a failed --overwrite unchanged.
    if output == "directory":
        out.mkdir()
        shutil.copyfile(inputs[0], out / "model.safetensors")
    else:
        out.write_bytes(b"the previous output")
    return inputs, out


@pytest.mark.parametrize("limit", [0, 300])
@pytest.mark.parametrize("output", ["safetensors", "directory", "npz", "pt"])
def test_disk_full_file_size_limit(
    output: str, limit: int, workspace: Workspace, capsys, file_size_limit
):
    """``ulimit -f`` in-process: a write past the limit fails with EFBIG (Python ignores
    SIGXFSZ), as on a full disk; the previous output stays, nothing is left behind."""
    inputs, out = full_disk_inputs(workspace, output)
    before = tree(workspace.root)
    args = ["average", *map(str, inputs), "-o", str(out), "--overwrite"]
    with file_size_limit(limit):
        code, _, err = run_cli(args, capsys)
    assert_one_line_refusal(
        code, err, rf"output {named(out)}: cannot be written \(File too large\)"
    )
    assert tree(workspace.root) == before


@pytest.mark.parametrize("output", KERAS_FORMATS)
def test_disk_full_file_size_limit_keras(output: str, workspace: Workspace):
    """The same for Keras outputs, in a subprocess (``ulimit -f`` set by ``preexec_fn``):
    h5py crashes the process when a write fails as it closes a file, so a failure here
    must not take the test run down with it."""
    inputs, out = full_disk_inputs(workspace, output)
    limit = inputs[1].stat().st_size // 2  # the copy of the template fails half-way
    before = tree(workspace.root)

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    result = run_process(
        [*COMMAND, "average", *map(str, inputs), "-o", str(out), "--overwrite"],
        preexec_fn=limited,
    )
    assert_one_line_refusal(
        result.returncode,
        result.stderr,
        rf"output {named(out)}: cannot be written \(File too large\)",
    )
    assert tree(workspace.root) == before


def mount_namespace_works(script: str) -> bool:
    """Whether ``script`` (given a directory as $0) runs in a private mount namespace."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as directory:
        probe = subprocess.run(
            ["unshare", "-m", "--", "sh", "-c", script, directory], capture_output=True
        )
    return probe.returncode == 0


MOUNT_TMPFS = 'mount -t tmpfs -o size=16k polyak-full "$0"'
MOUNT_READ_ONLY = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0"'


def test_disk_full_tmpfs(workspace: Workspace):
    """A full file system: a 16 KiB tmpfs over the output directory, in a private mount
    namespace (nothing to clean up): ENOSPC, and nothing left on it."""
    if not mount_namespace_works(MOUNT_TMPFS):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    w = workspace
    inputs = []
    for number in (1, 2):
        path = w.inputs / f"big_{number}.safetensors"
        save_file({"w": np.full((64, 128), number, np.float32)}, str(path))  # 32 KiB
        inputs.append(path)
    out = w.out / "avg.safetensors"
    before = tree(w.root)
    script = (
        f'{MOUNT_TMPFS} || exit 99; "$@"; code=$?; '
        'echo "left on the full disk: [$(ls -A "$0")]"; exit $code'
    )
    args = [*COMMAND, "average", *map(str, inputs), "-o", str(out)]
    result = run_process(["unshare", "-m", "--", "sh", "-c", script, str(w.out), *args])
    assert result.returncode != 99, result.stderr
    assert_one_line_refusal(
        result.returncode,
        result.stderr,
        rf"output {named(out)}: cannot be written \(No space left on device\)",
    )
    assert "left on the full disk: []" in result.stdout  # no output, no temporary
    assert tree(w.root) == before


def test_output_directory_read_only(workspace: Workspace, capsys):
    """A read-only output directory. chmod does not stop root, so as root (as in this
    sandbox) the directory is bind-mounted read-only in a private mount namespace."""
    w = workspace
    inputs = list(w.pair("safetensors"))
    out = w.out / "avg.safetensors"
    before = tree(w.root)
    expected = (
        rf"output {named(out)}: cannot be written \((Read-only file system|Permission denied)\)"
    )
    args = ["average", *map(str, inputs), "-o", str(out)]
    if os.geteuid() != 0:
        w.out.chmod(0o555)
        try:
            code, _, err = run_cli(args, capsys)
        finally:
            w.out.chmod(0o755)
        assert_one_line_refusal(code, err, expected)
    else:
        if not mount_namespace_works(MOUNT_READ_ONLY):
            pytest.skip("running as root, and no read-only bind mount is possible here")
        script = f'{MOUNT_READ_ONLY} || exit 99; exec "$@"'
        result = run_process(
            ["unshare", "-m", "--", "sh", "-c", script, str(w.out), *COMMAND, *args]
        )
        assert result.returncode != 99, result.stderr
        assert_one_line_refusal(result.returncode, result.stderr, expected)
    assert tree(w.root) == before
