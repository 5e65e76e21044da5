"""Benchmark: averaging N checkpoints, ``polyak average`` against the I/O floor and the usual ways.

What it measures
    Wall-clock seconds of one process that averages N checkpoints of a transformer-like
    float32 model (equal weights) into one output file, and that process's peak memory.
    Every contender is its own child process, so its time includes starting Python and
    its imports, and its memory is its own:

    - seconds: ``time.perf_counter`` from just before the child is spawned
      (``os.posix_spawnp``) to the moment ``os.wait4`` reaps it (a blocking wait, so
      no polling delay is in the time);
    - peak RSS: ``ru_maxrss`` of the child as ``os.wait4`` returns it, the kernel's
      high-water mark of resident memory (it counts the pages of memory-mapped input
      files the process touched, which live in the page cache, not only memory it
      allocated). Linux adds to it the high-water mark of the process the child was
      spawned from, so children are spawned and reaped by a small launcher (``python
      -I -S``, about 10 MB, less than any contender), never by the harness itself;
    - peak anonymous memory: the largest ``RssAnon`` (memory the process allocated:
      heap, arrays, tensors; no file pages) read from ``/proc/PID/status`` by a
      thread of the launcher every 5 ms while the child runs. A spike shorter than
      5 ms can be missed, so this is a lower bound of the true peak, to within one
      sampling interval.

    Contenders on safetensors inputs (the same N files for all):

    - ``floor``: the I/O floor. A child that imports numpy (the least any contender
      starts with), maps every input file and loads each of its bytes into the CPU
      once (``numpy.bitwise_or.reduce`` over the mapping as uint64 words, 1 MiB at a
      time: no copy out of the page cache), then writes one output file of the size of
      one member in 1 MiB ``write`` calls and fsyncs it (as ``polyak average`` fsyncs
      its output). The inputs are in the page cache (the harness reads them before
      every run), so this is the warm-cache floor.
    - ``floor-read``: the same with ``readinto`` of every input into one reused 1 MiB
      buffer instead of the mapping (one more copy per byte), for comparison.
    - ``polyak``: ``polyak average DIR -o OUT.safetensors --overwrite`` (the console
      script next to this Python, or ``--polyak``), a black box.
    - ``classic``: load all N with ``safetensors.numpy.load_file``, then per tensor
      ``numpy.average(numpy.stack([...]), axis=0)``, ``safetensors.numpy.save_file``.
    - ``naive-numpy``: ``safe_open(framework="numpy")`` one member after the other,
      ``get_tensor``, a float32 running sum per tensor, ``/= N``, ``save_file`` at the end.
    - ``naive-torch``: the same with ``framework="pt"``, ``add_``, ``div_`` and
      ``safetensors.torch.save_file``.
    - ``mergekit``: ``mergekit-pytorch`` (mergekit's command for raw state dicts) with a
      ``linear`` merge, weight 1 per member, ``dtype: float32``, when mergekit is
      installed (see Other tools).

    On ``.pt`` inputs (``torch.save`` of a state dict): ``floor``, ``polyak`` (``-o
    OUT.pt``), ``classic-torch`` (``torch.load`` all N, ``torch.stack(...).mean(0)`` per
    tensor, ``torch.save``), ``naive-torch`` (``torch.load(mmap=True)`` one at a time,
    ``add_``, ``div_``, ``torch.save``) and ``mergekit`` (it writes safetensors); the
    floors as above. On both, a ``startup`` row times a child that only imports numpy:
    the part of every time that is Python's start-up.

    Start-up rows, run first: ``python -c 'import numpy'`` against ``polyak --version``
    (Python, polyak's imports and its command line, no work), ``--startup-repeats`` runs
    each, interleaved. With the 10 x 1 MB data set (where fixed costs are nearly all of
    the time, so it is judged in seconds over the floor's process, not by ratio) and
    10 x 100 MB, they make README.md's start-up and small-models block, which names the
    versions of numpy, ml_dtypes, safetensors, typer and rich measured (what polyak's
    fixed costs depend on).

    Every contender runs with this environment, less PYTHONDONTWRITEBYTECODE: Python's
    bytecode caches are written by the warm-up and used, as they are for an installed
    package (pip compiles them at install).

How
    The model: an embedding (vocabulary x d), L layers of a pre-norm transformer block
    (layer norm weight and bias, fused qkv weight 3d x d and bias, attention output d x d
    and bias, layer norm, MLP up 4d x d and bias, MLP down d x 4d and bias) and a final
    norm, float32; d and L are chosen from the member size (d ~ sqrt(params / 300), a
    multiple of 64, then L, then the vocabulary to hit the size). N members (default
    10) with different random values (``numpy.random.default_rng``, float32) are written
    with a streaming safetensors writer of this file (no polyak code) or with
    ``torch.save``, into ``--workdir`` (default /tmp/polyak-bench), one directory per
    format, total size and N, reused by later runs. ``--totals`` are the sizes of all
    N members together (1GB = 10^9 bytes; 10 members of 100 MB).

    For each data set, each contender runs once as a warm-up (untimed: its output is
    checked, and it warms the page cache), then ``--repeats`` rounds, interleaved and
    in a rotating order so that the contenders share the machine's noise. Before every
    run the harness deletes the previous output and calls ``sync`` (untimed), so that
    no contender pays for another's write-back, and reads every input byte (untimed,
    :func:`warm`), so that none pays for inputs the kernel paged out meanwhile. polyak
    and the floor fsync their output; the others do not (their code as people write
    it), which favours them.
    The table reports the min and the median seconds, the ratio of mins to the
    floor's min, and the largest peak RSS and peak anonymous memory over all runs.

Checks (exit status 1 on failure)
    Every contender's warm-up output is compared with a float64 reference the harness
    computes once per data set, streaming over the members in float64 per tensor and
    dividing by N. Required: the same tensor names, shapes, dtype float32, no NaN, and
    per tensor max |output - reference| <= N * eps32 * max |member values| (eps32 =
    2^-23: twice the first-order bound on the error of a float32 running sum of N
    terms divided by N, so float32 accumulation passes). Leaving out one member, or one
    tensor, fails by orders of magnitude. A contender whose output fails,
    or whose process exits non-zero, is marked FAILED in the table.

Other tools
    timm's ``avg_checkpoints.py`` and fairseq's ``scripts/average_checkpoints.py`` are
    listed with the reason they do not run here. mergekit runs when ``mergekit-pytorch``
    is found in ``--tools-venv`` (default WORKDIR/tools-venv), next to this Python or
    on PATH; ``--install-tools`` creates WORKDIR/tools-venv (no system site packages)
    with this Python's exact torch version pinned as a pip constraint, so pip can never
    replace it by a CUDA build, and mergekit from PyPI.

Report
    bench/out/average.md holds the whole report. A full run (not ``--quick``, no
    ``--contenders``, no ``--no-readme``) in which every contender passed its check also
    rewrites the block between ``<!-- bench-average:begin -->`` and
    ``<!-- bench-average:end -->`` in README.md with the command, the summary table and
    the verdicts, and the start-up and small-models block (``bench-small``), in one step
    at the end. ``--small`` runs only the start-up rows and the 10 MB and 1 GB safetensors
    data sets (a few minutes instead of about ten) and rewrites only ``bench-small``,
    saying that the main table is from another run.

Usage:
    .venv/bin/python bench/average.py [--totals 10MB,1GB,5GB] [--pt-totals 1GB,5GB]
        [--members 10] [--repeats 3] [--startup-repeats 10] [--workdir /tmp/polyak-bench]
        [--quick | --small] [--install-tools] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from readme_block import has_readme_block, replace_readme_block

GENERATOR_VERSION = 2  # bump when the model layout or values change: regenerates caches
FLOAT32_EPSILON = 2.0**-23
SAMPLE_SECONDS = 0.005
# The floors read and write in 1 MiB pieces, which stay in the CPU caches: here, reads into
# and writes from buffers of several MiB were often (not always) several times slower.
CHUNK_BYTES = 1024 * 1024
ANON_TARGET_MB = 256
SAFETENSORS_FLOOR_TARGET = 1.5
PT_FLOOR_TARGET = 2.0
MB = 1_000_000
SAFETENSORS_DTYPES = {"float32": "F32", "float64": "F64"}
# Start-up and small models: fixed costs, judged in seconds over the baseline, not by ratio.
STARTUP_TARGET_SECONDS = 0.15  # polyak --version over python -c 'import numpy'
SMALL_TARGET_SECONDS = 0.25  # polyak over the floor's process, members up to SMALL_MEMBER_BYTES
SMALL_MEMBER_BYTES = 10 * MB
SMALL_TOTALS = "10MB,1GB"
# Distributions whose versions decide the fixed costs (ml_dtypes 0.7 took 1.1 s to import).
MEASURED_VERSIONS = ("numpy", "ml_dtypes", "safetensors", "typer", "rich")


# -- sizes --------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of ``500MB``, ``5GB`` (decimal), ``1.5GiB`` (binary) or a plain number."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"a size is a number with an optional unit (500MB, 5GB, 1.5GiB); received {text!r}."
        )
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def parse_sizes(text: str) -> list[int]:
    """``1GB,5GB`` -> [10**9, 5 * 10**9]; an empty string -> []."""
    return [parse_size(part) for part in text.split(",") if part.strip()]


def size_label(size: int) -> str:
    """The shortest decimal label: 1000000000 -> '1GB', 2500000 -> '2.5MB'."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:.4g}{unit}"
    return f"{size}B"


# -- the model ----------------------------------------------------------------------------


def transformer_layout(member_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a float32 pre-norm transformer of about ``member_bytes``.

    Width d is a multiple of 64 near sqrt(params / 300); then as many layers as fit
    beside an embedding of 32000 tokens (at most a quarter of the parameters, as in
    small models), then the vocabulary that brings the total to the size (within d
    parameters).
    """
    parameters = max(member_bytes // 4, 1)
    width = max(64, 64 * round(math.sqrt(parameters / 300) / 64))
    per_layer = 12 * width * width + 13 * width
    embedding = min(32000 * width, parameters // 4)
    layers = max(1, (parameters - embedding - 2 * width) // per_layer)
    vocabulary = max(64, (parameters - layers * per_layer - 2 * width) // width)
    layout: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocabulary, width))]
    for layer in range(layers):
        prefix = f"layers.{layer}."
        layout += [
            (prefix + "attn_norm.weight", (width,)),
            (prefix + "attn_norm.bias", (width,)),
            (prefix + "attn.qkv.weight", (3 * width, width)),
            (prefix + "attn.qkv.bias", (3 * width,)),
            (prefix + "attn.out.weight", (width, width)),
            (prefix + "attn.out.bias", (width,)),
            (prefix + "mlp_norm.weight", (width,)),
            (prefix + "mlp_norm.bias", (width,)),
            (prefix + "mlp.up.weight", (4 * width, width)),
            (prefix + "mlp.up.bias", (4 * width,)),
            (prefix + "mlp.down.weight", (width, 4 * width)),
            (prefix + "mlp.down.bias", (width,)),
        ]
    layout += [("final_norm.weight", (width,)), ("final_norm.bias", (width,))]
    return layout


def member_tensors(layout: list[tuple[str, tuple[int, ...]]], seed: int, member: int) -> Iterator:
    """Yield (name, float32 array) of one member, one tensor at a time.

    Weights ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2);
    each member has its own random stream.
    """
    import numpy as np

    rng = np.random.default_rng([seed, member])
    for name, shape in layout:
        values = rng.standard_normal(shape, dtype=np.float32)
        values *= np.float32(0.02)
        if "norm" in name and name.endswith(".weight"):
            values += np.float32(1.0)
        yield name, values


def write_safetensors_streamed(
    path: Path, layout: list[tuple[str, tuple[int, ...]]], dtype: str, tensors: Iterator
) -> None:
    """Write a safetensors file tensor by tensor: the header from the layout, then the data.

    ``tensors`` yields (name, array) in layout order with arrays of ``dtype``. The header
    is padded with spaces to a multiple of 8 bytes, as the format asks.
    """
    import numpy as np

    itemsize = np.dtype(dtype).itemsize
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout:
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    expected = iter(layout)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name, array in tensors:
            layout_name, shape = next(expected)
            if name != layout_name or tuple(array.shape) != shape or array.dtype != dtype:
                raise RuntimeError(f"{path}: tensor {name} {array.shape} out of layout order")
            file.write(memoryview(np.ascontiguousarray(array)).cast("B"))


# -- data sets ----------------------------------------------------------------------------


@dataclass
class Dataset:
    """N members of one format and total size, and the float64 reference of their average."""

    fmt: str  # "safetensors" or "pt"
    total: int
    members: list[Path]
    directory: Path
    reference: Path
    max_abs: dict[str, float]
    tensors: int
    parameters: int

    @property
    def label(self) -> str:
        return f"{self.fmt} {size_label(self.total)}"

    @property
    def member_bytes(self) -> int:
        return self.members[0].stat().st_size

    @property
    def input_directory(self) -> Path:
        return self.members[0].parent


def prepare_dataset(
    workdir: Path, fmt: str, total: int, count: int, seed: int, log: Callable[[str], None]
) -> Dataset:
    """The cached data set for (format, total, N), generated (and its reference) if missing."""
    directory = workdir / f"{fmt}-{size_label(total)}-n{count}-seed{seed}-v{GENERATOR_VERSION}"
    layout = transformer_layout(total // count)
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    members = [directory / "members" / f"model_{i}{suffix}" for i in range(1, count + 1)]
    marker = directory / "dataset.json"
    description = {
        "format": fmt,
        "total": total,
        "members": count,
        "seed": seed,
        "version": GENERATOR_VERSION,
        "layout": [[name, list(shape)] for name, shape in layout],
    }
    parameters = sum(math.prod(shape) for _, shape in layout)

    def dataset(max_abs: dict[str, float]) -> Dataset:
        reference = directory / "reference.safetensors"
        return Dataset(fmt, total, members, directory, reference, max_abs, len(layout), parameters)

    if marker.exists():
        stored = json.loads(marker.read_text())
        if stored.get("description") == description and all(p.exists() for p in members):
            log(f"  reusing {directory}")
            return dataset(stored["max_abs"])
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "members").mkdir(parents=True)
    width = layout[0][1][1]
    log(
        f"  generating {count} x {size_label(total // count)} {fmt} members in {directory} "
        f"(d={width}, {(len(layout) - 3) // 12} layers, vocabulary {layout[0][1][0]}, "
        f"{len(layout)} tensors) ..."
    )
    start = time.perf_counter()
    for number, path in enumerate(members, 1):
        tensors = member_tensors(layout, seed, number)
        if fmt == "safetensors":
            write_safetensors_streamed(path, layout, "float32", tensors)
        else:
            import torch

            torch.save({name: torch.from_numpy(array) for name, array in tensors}, path)
    log(f"  generated in {time.perf_counter() - start:.1f} s; computing the float64 reference")
    start = time.perf_counter()
    max_abs = write_reference(members, layout, directory / "reference.safetensors")
    log(f"  reference in {time.perf_counter() - start:.1f} s")
    marker.write_text(json.dumps({"description": description, "max_abs": max_abs}))
    return dataset(max_abs)


def open_members(paths: list[Path]) -> list[Callable[[str], object]]:
    """One ``read(name) -> numpy array`` per member file (safetensors or torch.save)."""
    readers = []
    for path in paths:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(path), framework="numpy")
            readers.append(handle.get_tensor)
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            readers.append(lambda name, state=state: state[name].numpy())
    return readers


def write_reference(
    members: list[Path], layout: list[tuple[str, tuple[int, ...]]], path: Path
) -> dict[str, float]:
    """Write the float64 mean of the members, tensor by tensor; return max |value| per tensor."""
    import numpy as np

    readers = open_members(members)
    max_abs: dict[str, float] = {}

    def averaged() -> Iterator:
        for name, shape in layout:
            total = np.zeros(shape, dtype=np.float64)
            largest = 0.0
            for read in readers:
                values = read(name)
                total += values
                largest = max(largest, float(np.max(np.abs(values))))
            total /= len(readers)
            max_abs[name] = largest
            yield name, total

    write_safetensors_streamed(path, layout, "float64", averaged())
    return max_abs


# -- checking an output -------------------------------------------------------------------


@dataclass
class Check:
    ok: bool
    message: str


def output_tensors(path: Path) -> dict[str, Callable[[], object]]:
    """Loaders of every tensor in an output: a safetensors file or directory, or a .pt file."""
    loaders: dict[str, Callable[[], object]] = {}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors file in the output directory")
    else:
        files = [path]
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            handle = safe_open(str(file), framework="numpy")
            for name in handle.keys():
                loaders[name] = lambda name=name, handle=handle: handle.get_tensor(name)
        else:
            import torch

            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, dict):
                raise TypeError(f"{file}: holds a {type(state).__name__}, not a state dict")
            for name, tensor in state.items():
                loaders[name] = lambda tensor=tensor: tensor.numpy()
    return loaders


def check_output(path: Path, dataset: Dataset) -> Check:
    """Compare an output with the data set's float64 reference (see Checks above)."""
    import numpy as np
    from safetensors import safe_open

    try:
        loaders = output_tensors(path)
    except Exception as error:  # any unreadable output is a failed check, with its reason
        return Check(False, f"unreadable output: {error}")
    count = len(dataset.members)
    worst_error, worst_fraction = 0.0, 0.0
    with safe_open(str(dataset.reference), framework="numpy") as reference:
        expected = set(reference.keys())
        if set(loaders) != expected:
            missing, extra = sorted(expected - set(loaders)), sorted(set(loaders) - expected)
            return Check(False, f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}")
        for name in sorted(expected):
            exact = reference.get_tensor(name)
            values = loaders[name]()
            if values.shape != exact.shape or values.dtype != np.float32:
                return Check(
                    False, f"{name}: {values.dtype} {values.shape}, expected float32 {exact.shape}"
                )
            error = float(np.max(np.abs(values.astype(np.float64) - exact)))
            tolerance = count * FLOAT32_EPSILON * dataset.max_abs[name]
            if not error <= tolerance:  # also catches NaN
                return Check(False, f"{name}: max error {error:.3g} > tolerance {tolerance:.3g}")
            worst_error = max(worst_error, error)
            worst_fraction = max(worst_fraction, error / tolerance if tolerance else 0.0)
    return Check(True, f"ok, max err {worst_error:.1e} ({worst_fraction:.2f} of tol)")


# -- the contenders, run in their own process -------------------------------------------


def run_startup(inputs: list[Path], out: Path) -> None:
    """Only Python's start-up and ``import numpy``."""
    import numpy  # noqa: F401


def write_member_sized_output(inputs: list[Path], out: Path) -> None:
    """Write as many bytes as the first input holds, in CHUNK_BYTES writes, and fsync."""
    with open(inputs[0], "rb") as file:
        chunk = memoryview(file.read(CHUNK_BYTES))
    remaining = inputs[0].stat().st_size
    with open(out, "wb", buffering=0) as file:
        while remaining:
            remaining -= file.write(chunk[: min(remaining, len(chunk))])
        os.fsync(file.fileno())


def run_floor(inputs: list[Path], out: Path) -> None:
    """Map every input and load each of its bytes into the CPU once, then write one member.

    The load is ``numpy.bitwise_or.reduce`` over the mapped file as uint64 words, in
    CHUNK_BYTES slices: no copy out of the page cache, and no less than any averaging
    must do, which reads every value once.
    """
    import mmap

    import numpy as np

    words_per_chunk = CHUNK_BYTES // 8
    for path in inputs:
        with open(path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ)
        data = np.frombuffer(mapped, dtype=np.uint8)
        words = data[: data.size // 8 * 8].view(np.uint64)
        for start in range(0, words.size, words_per_chunk):
            np.bitwise_or.reduce(words[start : start + words_per_chunk])
        np.bitwise_or.reduce(data[words.size * 8 :])
        del data, words  # the arrays must let go of the mapping before it closes
        mapped.close()
    write_member_sized_output(inputs, out)


def run_floor_read(inputs: list[Path], out: Path) -> None:
    """Read every input with ``readinto`` into one reused buffer, then write one member."""
    import numpy  # noqa: F401 - the least any contender starts with

    view = memoryview(bytearray(CHUNK_BYTES))
    for path in inputs:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(view):
                pass
    write_member_sized_output(inputs, out)


def run_classic(inputs: list[Path], out: Path) -> None:
    """Load all members, numpy.average over the stacked arrays per tensor, save_file."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    members = [load_file(path) for path in inputs]
    averaged = {
        name: np.average(np.stack([member[name] for member in members]), axis=0)
        for name in members[0]
    }
    save_file(averaged, out)


def run_naive_numpy(inputs: list[Path], out: Path) -> None:
    """safe_open one member after the other, a float32 running sum, save_file at the end."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    total: dict[str, np.ndarray] = {}
    for path in inputs:
        with safe_open(str(path), framework="numpy") as member:
            for name in member.keys():
                tensor = member.get_tensor(name)
                if name in total:
                    total[name] += tensor
                else:
                    total[name] = tensor  # a fresh, writable array
    for tensor in total.values():
        tensor /= len(inputs)
    save_file(total, out)


def run_naive_torch(inputs: list[Path], out: Path) -> None:
    """safe_open(framework="pt") one member after the other, add_, div_, save_file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    total: dict[str, torch.Tensor] = {}
    for path in inputs:
        with safe_open(str(path), framework="pt") as member:
            for name in member.keys():
                tensor = member.get_tensor(name)
                if name in total:
                    total[name].add_(tensor)
                else:
                    total[name] = tensor  # a fresh tensor
    for tensor in total.values():
        tensor.div_(len(inputs))
    save_file(total, out)


def run_classic_torch(inputs: list[Path], out: Path) -> None:
    """torch.load every member, torch.stack(...).mean(0) per tensor, torch.save."""
    import torch

    states = [torch.load(path, map_location="cpu", weights_only=True) for path in inputs]
    averaged = {name: torch.stack([s[name] for s in states]).mean(dim=0) for name in states[0]}
    torch.save(averaged, out)


def run_naive_torch_pt(inputs: list[Path], out: Path) -> None:
    """torch.load(mmap=True) one member at a time, add_, div_, torch.save."""
    import torch

    total: dict[str, torch.Tensor] | None = None
    for path in inputs:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if total is None:
            total = {name: tensor.clone() for name, tensor in state.items()}
        else:
            for name, tensor in state.items():
                total[name].add_(tensor)
        del state
    assert total is not None
    for tensor in total.values():
        tensor.div_(len(inputs))
    torch.save(total, out)


IN_PROCESS_CONTENDERS: dict[str, Callable[[list[Path], Path], None]] = {
    "startup": run_startup,
    "floor": run_floor,
    "floor-read": run_floor_read,
    "classic": run_classic,
    "naive-numpy": run_naive_numpy,
    "naive-torch": run_naive_torch,
    "classic-torch": run_classic_torch,
    "naive-torch-pt": run_naive_torch_pt,
}


# -- contenders as commands ----------------------------------------------------------------


@dataclass
class Contender:
    """One row of a table: how to run it on a data set and where its output goes."""

    name: str
    command: Callable[[Dataset, Path], list[str]]
    output_name: str  # relative to the outputs directory; a name ending in / is a directory
    checked: bool = True
    note: str = ""

    def output(self, outputs: Path) -> Path:
        return outputs / self.output_name.rstrip("/")


def reentry(function_name: str) -> Callable[[Dataset, Path], list[str]]:
    """A command that runs one of IN_PROCESS_CONTENDERS in a fresh Python process."""

    def command(dataset: Dataset, out: Path) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-contender",
            function_name,
            "--contender-out",
            str(out),
            *map(str, dataset.members),
        ]

    return command


def polyak_command(polyak: Path) -> Callable[[Dataset, Path], list[str]]:
    def command(dataset: Dataset, out: Path) -> list[str]:
        return [str(polyak), "average", str(dataset.input_directory), "-o", str(out), "--overwrite"]

    return command


def mergekit_command(executable: Path, workdir: Path) -> Callable[[Dataset, Path], list[str]]:
    """``mergekit-pytorch CONFIG OUT``: a linear merge, weight 1 each, float32."""

    def command(dataset: Dataset, out: Path) -> list[str]:
        config = workdir / f"mergekit-{dataset.directory.name}.yml"
        lines = ["merge_method: linear", "dtype: float32", "models:"]
        for path in dataset.members:
            lines += [f"  - model: {json.dumps(str(path))}", "    parameters: {weight: 1.0}"]
        config.write_text("\n".join(lines) + "\n")
        return [str(executable), str(config), str(out), "--no-copy-tokenizer"]

    return command


def startup_contenders(polyak: Path) -> list[Contender]:
    """The start-up rows: Python importing numpy (the floor of every contender's start),
    and ``polyak --version`` (Python, polyak's imports and its command line, no work)."""
    return [
        Contender(
            "import numpy",
            lambda dataset, out: [sys.executable, "-c", "import numpy"],
            "startup-numpy.none",
            checked=False,
        ),
        Contender(
            "polyak --version",
            lambda dataset, out: [str(polyak), "--version"],
            "startup-polyak.none",
            checked=False,
        ),
    ]


def contenders_for(fmt: str, polyak: Path, mergekit: Path | None, workdir: Path) -> list[Contender]:
    """The contenders of one input format, in table order."""
    suffix = ".safetensors" if fmt == "safetensors" else ".pt"
    rows = [
        Contender("startup", reentry("startup"), "startup.none", checked=False),
        Contender("floor", reentry("floor"), f"floor{suffix}", checked=False),
        Contender("floor-read", reentry("floor-read"), f"floor-read{suffix}", checked=False),
        Contender("polyak", polyak_command(polyak), f"polyak{suffix}"),
    ]
    if fmt == "safetensors":
        rows += [
            Contender("classic", reentry("classic"), "classic.safetensors"),
            Contender("naive-numpy", reentry("naive-numpy"), "naive-numpy.safetensors"),
            Contender("naive-torch", reentry("naive-torch"), "naive-torch.safetensors"),
        ]
    else:
        rows += [
            Contender("classic-torch", reentry("classic-torch"), "classic-torch.pt"),
            Contender("naive-torch", reentry("naive-torch-pt"), "naive-torch.pt"),
        ]
    if mergekit is not None:
        note = "writes safetensors" if fmt == "pt" else ""
        rows.append(
            Contender("mergekit", mergekit_command(mergekit, workdir), "mergekit/", note=note)
        )
    return rows


# -- measuring one process ----------------------------------------------------------------


@dataclass
class Measurement:
    seconds: float
    returncode: int
    peak_rss_kb: int  # ru_maxrss from wait4
    peak_anon_kb: int  # max RssAnon over samples
    samples: int
    cpu_seconds: float  # user + system time of the child, from wait4


# The process that spawns and reaps each contender. Linux's ru_maxrss of a child counts
# the memory of the process it was spawned from (exec records the old address space's
# high-water mark), so the spawner must be small: this runs in ``python -I -S`` (about
# 10 MB), never in the harness, which holds numpy, torch and the checks. It times the
# child from spawn to reap, samples /proc/PID/status, and writes JSON to argv[1].
LAUNCHER = """
import json, os, signal, sys, threading, time
result_path, interval, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
argv, peaks, samples, stop = sys.argv[4:], {"RssAnon:": 0, "VmHWM:": 0}, [0], threading.Event()
def sample(path):
    while not stop.is_set():
        try:
            with open(path) as status:
                for line in status:
                    if line.startswith(("RssAnon:", "VmHWM:")):
                        key, value = line.split()[:2]
                        peaks[key] = max(peaks[key], int(value))
            samples[0] += 1
        except OSError:
            pass
        stop.wait(interval)
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
sampler = threading.Thread(target=sample, args=(f"/proc/{pid}/status",), daemon=True)
sampler.start()
killer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL))
killer.start()
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
killer.cancel()
stop.set()
sampler.join()
with open(result_path, "w") as out:
    json.dump({"seconds": seconds, "returncode": os.waitstatus_to_exitcode(status),
               "maxrss_kb": usage.ru_maxrss, "hwm_kb": peaks["VmHWM:"],
               "anon_kb": peaks["RssAnon:"], "samples": samples[0],
               "cpu": usage.ru_utime + usage.ru_stime}, out)
"""


def contender_environment() -> dict[str, str]:
    """The contenders' environment: this one, with Python's bytecode caches allowed.

    pip compiles an installed package's modules at install, so users run from bytecode
    caches; an environment that sets PYTHONDONTWRITEBYTECODE (some sandboxes do) would
    instead make every run compile polyak's sources again (35 ms of CPU more for
    ``polyak --version`` here). The warm-up run writes the caches.
    """
    return {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def measure_process(argv: list[str], log_path: Path, timeout: float) -> Measurement:
    """Run argv to completion under LAUNCHER; its wall time, exit status and peak memory."""
    result_path = log_path.with_name("measurement.json")
    result_path.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result_path)]
        subprocess.run(
            [*launcher, str(SAMPLE_SECONDS), str(timeout), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=timeout + 60,
            env=contender_environment(),
        )
    result = json.loads(result_path.read_text())
    return Measurement(
        result["seconds"],
        result["returncode"],
        max(result["maxrss_kb"], result["hwm_kb"]),
        result["anon_kb"],
        result["samples"],
        result["cpu"],
    )


def warm(files: list[Path]) -> None:
    """Read every byte of ``files`` (untimed), so that all of them are in the page cache.

    These machines page out files left alone for about a minute (DAMON reclaim): read
    again before every timed run, the inputs are cached for every contender alike,
    instead of whichever one met paged-out inputs paying for the disk.
    """
    buffer = bytearray(16 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(buffer):
                pass


def remove_output(path: Path) -> None:
    """Delete an output (file or directory) and polyak-style temporaries beside it."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    for leftover in path.parent.glob(f".{path.name}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    os.sync()


# -- one data set, side by side ------------------------------------------------------------


@dataclass
class Row:
    contender: Contender
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_rss_kb: int = 0
    peak_anon_kb: int = 0
    samples: int = 0
    check: str = ""
    failed: bool = False

    def record(self, measurement: Measurement) -> None:
        self.peak_rss_kb = max(self.peak_rss_kb, measurement.peak_rss_kb)
        self.peak_anon_kb = max(self.peak_anon_kb, measurement.peak_anon_kb)
        self.samples += measurement.samples


def benchmark_dataset(
    dataset: Dataset | None,
    contenders: list[Contender],
    outputs: Path,
    repeats: int,
    timeout: float,
    log: Callable[[str], None],
) -> list[Row]:
    """Warm up and check each contender, then time them interleaved and rotated.

    ``dataset`` is None for the start-up rows, which read and write nothing.
    """
    rows = [Row(contender) for contender in contenders]
    log_path = outputs / "contenders.log"

    def run(row: Row, label: str) -> Measurement:
        out = row.contender.output(outputs)
        remove_output(out)
        if dataset is not None:
            warm(dataset.members)
        measurement = measure_process(row.contender.command(dataset, out), log_path, timeout)
        row.record(measurement)
        log(
            f"  {label:9} {row.contender.name:14} {measurement.seconds:8.3f} s  "
            f"RSS {measurement.peak_rss_kb / 1000:8.0f} MB  "
            f"anon {measurement.peak_anon_kb / 1000:7.0f} MB  ({measurement.samples} samples)"
            + ("" if measurement.returncode == 0 else f"  exit {measurement.returncode}")
        )
        return measurement

    for row in rows:
        measurement = run(row, "warm-up")
        out = row.contender.output(outputs)
        if measurement.returncode != 0:
            row.failed = True
            row.check = f"FAILED: exit {measurement.returncode} (see {log_path})"
        elif row.contender.checked and dataset is not None:
            result = check_output(out, dataset)
            row.failed = not result.ok
            row.check = result.message if result.ok else f"FAILED: {result.message}"
        else:
            row.check = "-"
        remove_output(out)
    active = [row for row in rows if not row.failed]
    for repeat in range(repeats):
        shift = repeat % len(active)
        for row in active[shift:] + active[:shift]:
            measurement = run(row, f"repeat {repeat + 1}")
            remove_output(row.contender.output(outputs))
            if measurement.returncode != 0:
                row.failed = True
                row.check = f"FAILED: exit {measurement.returncode} in repeat {repeat + 1}"
            else:
                row.times.append(measurement.seconds)
                row.cpu_times.append(measurement.cpu_seconds)
    return rows


# -- other tools --------------------------------------------------------------------------


def find_mergekit(tools_venv: Path) -> Path | None:
    """``mergekit-pytorch`` in the tools venv, next to this Python, or on PATH."""
    for candidate in (
        tools_venv / "bin" / "mergekit-pytorch",
        Path(sys.executable).parent / "mergekit-pytorch",
    ):
        if candidate.exists():
            return candidate
    found = shutil.which("mergekit-pytorch")
    return Path(found) if found else None


def tool_version(executable: Path, distribution: str) -> str:
    """A distribution's version in the environment of ``executable``'s Python."""
    python = executable.parent / "python"
    result = subprocess.run(
        [
            str(python if python.exists() else sys.executable),
            "-c",
            f"import importlib.metadata as m; print(m.version({distribution!r}))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown version"


def install_tools(tools_venv: Path, log: Callable[[str], None]) -> None:
    """Create ``tools_venv`` with this Python's torch pinned, then mergekit from PyPI."""
    import torch

    constraints = tools_venv.parent / "tools-constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    # The exact local version (2.13.0+cpu): pip may use it or fail, never swap in CUDA.
    constraints.write_text(f"torch=={torch.__version__}\n")
    log(f"Creating {tools_venv} (torch=={torch.__version__} pinned), installing mergekit ...")
    subprocess.run([sys.executable, "-m", "venv", str(tools_venv)], check=True)
    pip = [str(tools_venv / "bin" / "python"), "-m", "pip", "install", "-c", str(constraints)]
    subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
    subprocess.run([*pip, "mergekit"], check=True)


def other_tools(mergekit: Path | None, mergekit_ran: bool) -> list[tuple[str, str]]:
    """(tool, what happened here) for every other averaging tool the issue names."""
    if mergekit is not None and not mergekit_ran:
        mergekit_status = f"found ({mergekit}) but not selected by --contenders"
    elif mergekit is None:
        mergekit_status = (
            "not run here: `mergekit-pytorch` not found (it installs from PyPI beside torch "
            "CPU: rerun with --install-tools)"
        )
    else:
        mergekit_status = (
            f"run ({tool_version(mergekit, 'mergekit')}, {mergekit}): `mergekit-pytorch "
            "CONFIG OUT` with `merge_method: linear`, weight 1.0 per member, `dtype: float32`"
        )
    return [
        ("mergekit (mergekit-pytorch)", mergekit_status),
        (
            "mergekit (mergekit-yaml)",
            "not run here: it merges Hugging Face model directories whose config.json names "
            "an architecture mergekit knows; these are raw state dicts, which mergekit's "
            "own `mergekit-pytorch` (above) is for",
        ),
        (
            "timm avg_checkpoints.py",
            "not run here: it is a script in timm's source repository, not in the timm "
            "package on PyPI (the timm 1.0.31 wheel has no avg_checkpoints); copying it "
            "in would be vendoring",
        ),
        (
            "fairseq scripts/average_checkpoints.py",
            "not run here: fairseq 0.12.2, the newest on PyPI (an sdist only), fails to "
            "build on Python 3.11 with torch 2.13 (its sdist lacks "
            "fairseq/clib/libbase/balanced_assignment.cpp); the script also reads fairseq "
            "checkpoint dicts (`state['model']`), not plain state dicts",
        ),
    ]


# -- the report ---------------------------------------------------------------------------


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def minimum(row: Row | None) -> float | None:
    return min(row.times) if row is not None and row.times and not row.failed else None


def dataset_table(dataset: Dataset, rows: list[Row]) -> str:
    floor = minimum(next((r for r in rows if r.contender.name == "floor"), None))
    lines = []
    for row in rows:
        best = minimum(row)
        ratio = f"{best / floor:.2f}x" if best is not None and floor else "-"
        name = row.contender.name + (f" ({row.contender.note})" if row.contender.note else "")
        lines.append(
            [
                name,
                f"{best:.3f}" if best is not None else "-",
                f"{statistics.median(row.times):.3f}" if row.times and not row.failed else "-",
                ratio,
                f"{row.peak_rss_kb / 1000:.0f}",
                f"{row.peak_anon_kb / 1000:.0f}" if row.samples else "-",
                row.check,
            ]
        )
    return markdown_table(
        [
            "contender",
            "min s",
            "median s",
            "min / floor min",
            "peak RSS MB",
            "peak anon MB",
            "check",
        ],
        lines,
    )


def verdicts(results: list[tuple[Dataset, list[Row]]]) -> list[str]:
    """One line per target of the issue, from the numbers of this run."""
    lines = []
    anon_by_size = []
    for dataset, rows in results:
        by_name = {row.contender.name: row for row in rows}
        polyak, floor = by_name.get("polyak"), by_name.get("floor")
        polyak_min, floor_min = minimum(polyak), minimum(floor)
        head = f"{dataset.label} ({len(dataset.members)} x {dataset.member_bytes / MB:.0f} MB)"
        if polyak is None or polyak_min is None or floor_min is None:
            lines.append(f"- {head}: polyak or the floor did not run or FAILED; no verdict.")
            continue
        target = SAFETENSORS_FLOOR_TARGET if dataset.fmt == "safetensors" else PT_FLOOR_TARGET
        ratio = polyak_min / floor_min
        small = dataset.fmt == "safetensors" and dataset.member_bytes <= SMALL_MEMBER_BYTES
        others = [
            (minimum(row), row.contender.name)
            for row in rows
            if row.contender.name not in ("polyak", "floor", "floor-read", "startup")
        ]
        ran = [(seconds, name) for seconds, name in others if seconds is not None]
        failed = [name for seconds, name in others if seconds is None]
        fastest = min(ran) if ran else None
        faster = fastest is None or polyak_min < fastest[0]
        if small:  # fixed costs dominate: judged by seconds over the floor's process
            over = polyak_min - floor_min
            line = (
                f"- {head}: polyak - floor = {over:+.3f} s by mins (medians "
                f"{statistics.median(polyak.times) - statistics.median(floor.times):+.3f} s; "
                f"{ratio:.2f}x by mins); target <= +{SMALL_TARGET_SECONDS} s: "
                f"{'met' if over <= SMALL_TARGET_SECONDS else 'MISSED'}."
            )
        else:
            line = (
                f"- {head}: polyak / floor = {ratio:.2f}x by mins (medians "
                f"{statistics.median(polyak.times) / statistics.median(floor.times):.2f}x); "
                f"target <= {target}x: {'met' if ratio <= target else 'MISSED'}."
            )
        if fastest is not None:
            line += (
                f" Faster than every other contender: {'yes' if faster else 'NO'} (fastest "
                f"other: {fastest[1]}, {fastest[0]:.3f} s = {fastest[0] / polyak_min:.2f}x "
                "polyak's min)"
            )
            line += f"; FAILED: {', '.join(failed)}." if failed else "."
        anon = polyak.peak_anon_kb / 1000
        line += f" polyak peak anon {anon:.0f} MB"
        if dataset.fmt == "safetensors":
            anon_by_size.append((dataset, anon))
            classic = by_name.get("classic")
            if classic is not None:
                line += (
                    f"; classic {classic.peak_anon_kb / 1000:.0f} MB "
                    f"(N whole models = {len(dataset.members) * dataset.member_bytes / MB:.0f} MB)"
                )
        lines.append(line + ".")
    if anon_by_size:
        worst = max(anon for _, anon in anon_by_size)
        lines.append(
            f"- polyak peak anonymous memory under {ANON_TARGET_MB} MB at every safetensors "
            "size: "
            + ", ".join(f"{d.label}: {anon:.0f} MB" for d, anon in anon_by_size)
            + f": {'met' if worst < ANON_TARGET_MB else 'MISSED'}."
        )
    return lines


def startup_table(rows: list[Row]) -> str:
    """The start-up rows: min and median seconds, and each min over ``import numpy``'s."""
    base_row = next((r for r in rows if r.contender.name == "import numpy"), None)
    base = minimum(base_row)
    base_cpu = min(base_row.cpu_times) if base is not None and base_row is not None else None
    lines = []
    for row in rows:
        best = minimum(row)
        cpu = min(row.cpu_times) if best is not None else None
        lines.append(
            [
                f"`{row.contender.name}`",
                f"{best:.3f}" if best is not None else "FAILED",
                f"{statistics.median(row.times):.3f}" if best is not None else "-",
                f"{best - base:+.3f}" if best is not None and base is not None else "-",
                f"{cpu:.3f}" if cpu is not None else "-",
                f"{cpu - base_cpu:+.3f}" if cpu is not None and base_cpu is not None else "-",
            ]
        )
    return markdown_table(
        [
            "start-up",
            "min s",
            "median s",
            "min over `import numpy` s",
            "min CPU s",
            "CPU over `import numpy` s",
        ],
        lines,
    )


def startup_verdict(rows: list[Row]) -> str:
    """The start-up target: ``polyak --version`` within STARTUP_TARGET_SECONDS of numpy's."""
    by_name = {row.contender.name: row for row in rows}
    numpy_row, polyak_row = by_name["import numpy"], by_name["polyak --version"]
    numpy_min, polyak_min = minimum(numpy_row), minimum(polyak_row)
    if numpy_min is None or polyak_min is None:
        return "- start-up: a start-up row FAILED; no verdict."
    over = polyak_min - numpy_min
    medians = statistics.median(polyak_row.times) - statistics.median(numpy_row.times)
    cpu = min(polyak_row.cpu_times) - min(numpy_row.cpu_times)
    return (
        f"- start-up: `polyak --version` {polyak_min:.3f} s against `python -c 'import numpy'` "
        f"{numpy_min:.3f} s by mins: {over:+.3f} s (medians {medians:+.3f} s; CPU time "
        f"{cpu:+.3f} s by mins); target <= +{STARTUP_TARGET_SECONDS} s: "
        f"{'met' if over <= STARTUP_TARGET_SECONDS else 'MISSED'}."
    )


def is_small(dataset: Dataset) -> bool:
    """Whether a data set belongs to the start-up and small-models block (members <= 100 MB)."""
    return dataset.fmt == "safetensors" and dataset.total / len(dataset.members) <= 100 * MB


def summary_table(results: list[tuple[Dataset, list[Row]]]) -> str:
    """Contenders x data sets: min seconds, ratio to the floor, peak anonymous MB."""
    names: list[str] = []
    for _, rows in results:
        for row in rows:
            if row.contender.name not in names and row.contender.name != "startup":
                names.append(row.contender.name)
    header = ["contender"] + [
        f"{d.label} ({len(d.members)} x {d.member_bytes / MB:.0f} MB)" for d, _ in results
    ]
    lines = []
    for name in names:
        cells = [name]
        for _, rows in results:
            by_name = {row.contender.name: row for row in rows}
            row, floor = by_name.get(name), minimum(by_name.get("floor"))
            best = minimum(row)
            if row is None:
                cells.append("-")
            elif best is None:
                cells.append("FAILED")
            else:
                ratio = f", {best / floor:.2f}x" if floor else ""
                cells.append(f"{best:.2f} s{ratio}, {row.peak_anon_kb / 1000:.0f} MB")
        lines.append(cells)
    return markdown_table(header, lines)


def readme_summary(
    command: str,
    machine: str,
    polyak_text: str,
    repeats: int,
    results: list[tuple[Dataset, list[Row]]],
) -> str:
    """The README's benchmark block: the command, the machine, the verdicts and the summary."""
    return "\n".join(
        [
            f"Command: `{command}` (`make bench-average`). Machine: {machine}. "
            f"Under test: {polyak_text}.",
            "",
            f"Each cell: the fastest of {repeats} timed runs, interleaved with the other "
            "contenders' after an untimed warm-up (seconds, from "
            "spawning the process to reaping it, Python's start-up included), its ratio to the "
            "I/O floor's, and the process's peak anonymous memory (what it allocated, page "
            "cache excluded). Inputs warm in the page cache. Every output was checked against "
            "a float64 reference. bench/out/average.md has medians, peak RSS and the "
            "per-size tables.",
            "",
            summary_table(results),
            "",
            *verdicts(results),
        ]
    )


def small_summary(
    command: str,
    machine: str,
    versions: str,
    polyak_text: str,
    repeats: int,
    startup_repeats: int,
    startup_rows: list[Row],
    results: list[tuple[Dataset, list[Row]]],
    partial: bool,
) -> str:
    """The README's start-up and small-models block (bench-small)."""
    small = [(dataset, rows) for dataset, rows in results if is_small(dataset)]
    rerun = (
        "This block was rewritten by a run of these rows only; the table above is from "
        "its own (full) run, named in its command line."
        if partial
        else "The table above is from the same run."
    )
    return "\n".join(
        [
            f"Command: `{command}`. Machine: {machine}. Measured with {versions}. "
            f"Under test: {polyak_text}. {rerun}",
            "",
            f"Start-up: each the fastest and the median of {startup_repeats} runs, interleaved; "
            "seconds from spawning the process to reaping it, and its CPU time (user + "
            "system, from wait4), which other work on the machine stretches far less.",
            "",
            startup_table(startup_rows),
            "",
            f"Small models: as in the table above (the fastest of {repeats} timed runs, its "
            "ratio to the I/O floor's, peak anonymous memory).",
            "",
            summary_table(small),
            "",
            startup_verdict(startup_rows),
            *verdicts(small),
        ]
    )


def measured_versions(polyak: Path) -> str:
    """The versions of MEASURED_VERSIONS in polyak's environment."""
    return ", ".join(f"{name} {tool_version(polyak, name)}" for name in MEASURED_VERSIONS)


def load_text(start: tuple[float, float, float]) -> str:
    """The machine's 1-minute load average at the start and the end of the run: how much
    other work shared its CPUs (wall times stretch with it; CPU times much less)."""
    return (
        f"load average {start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        f"({os.cpu_count()} CPUs)"
    )


def machine_description() -> str:
    import numpy
    import safetensors
    import torch

    memory = "unknown"
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return (
        f"Python {platform.python_version()}, numpy {numpy.__version__}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), safetensors "
        f"{safetensors.__version__}, {os.cpu_count()} CPUs, {memory} RAM, "
        f"{platform.platform()}"
    )


def source_digest() -> str:
    """SHA-256 (12 hex digits) of this checkout's src/polyak/*.py: which engine ran."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parent.parent / "src" / "polyak").rglob("*.py")):
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def polyak_description(polyak: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    python = polyak.parent / "python"
    imported = subprocess.run(
        [
            str(python if python.exists() else sys.executable),
            "-c",
            "import polyak; print(polyak.__file__)",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=contender_environment(),
    ).stdout.strip()
    return (
        f"polyak {tool_version(polyak, 'polyak')} ({polyak}, imported from "
        f"{Path(imported).parent.parent if imported else 'unknown'}, git {commit or 'unknown'}, "
        f"src/polyak sha256 {source_digest()})"
    )


# -- main ---------------------------------------------------------------------------------


def run_contender_here(name: str, out: str, inputs: list[str]) -> int:
    """Re-entry: ``--run-contender NAME`` runs one in-process contender and exits."""
    IN_PROCESS_CONTENDERS[name]([Path(p) for p in inputs], Path(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Sizes: 500MB, 5GB (decimal) or 1.5GiB; a total is all N members together.",
    )
    parser.add_argument(
        "--totals",
        default="10MB,1GB,5GB",
        help="safetensors data sets, total sizes (default 10MB,1GB,5GB)",
    )
    parser.add_argument(
        "--pt-totals",
        default="1GB,5GB",
        help=".pt data sets, total sizes; '' for none (default 1GB,5GB)",
    )
    parser.add_argument("--members", type=int, default=10, help="checkpoints per data set")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random members")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/polyak-bench"),
        help="cached inputs, outputs and logs (default /tmp/polyak-bench)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where average.md goes")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run for development: --totals 20MB --pt-totals 20MB --repeats 2",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"only the start-up rows and the small models: --totals {SMALL_TOTALS} "
        "--pt-totals ''; rewrites only README.md's start-up and small-models block",
    )
    parser.add_argument(
        "--startup-repeats",
        type=int,
        default=10,
        help="timed runs of each start-up row (default 10)",
    )
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite the benchmark block of README.md (implied by --quick, --contenders)",
    )
    parser.add_argument(
        "--contenders", default="", help="run only these, comma-separated (floor is always run)"
    )
    parser.add_argument(
        "--polyak",
        type=Path,
        default=Path(sys.executable).parent / "polyak",
        help="the polyak console script (default: next to this Python)",
    )
    parser.add_argument(
        "--tools-venv",
        type=Path,
        default=None,
        help="a virtual environment with other tools (default WORKDIR/tools-venv)",
    )
    parser.add_argument(
        "--install-tools",
        action="store_true",
        help="create --tools-venv (this torch pinned) with mergekit from PyPI, then run",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a contender is killed"
    )
    parser.add_argument("--run-contender", help=argparse.SUPPRESS)
    parser.add_argument("--contender-out", help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_contender:
        return run_contender_here(args.run_contender, args.contender_out, args.inputs)
    if args.inputs:
        parser.error(f"unexpected arguments {args.inputs}")
    if args.quick:
        args.totals, args.pt_totals, args.repeats = "20MB", "20MB", 2
    if args.small:
        args.totals, args.pt_totals = SMALL_TOTALS, ""
    try:
        totals, pt_totals = parse_sizes(args.totals), parse_sizes(args.pt_totals)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.members < 2:
        parser.error(f"--members must be >= 2; received {args.members}.")
    if args.repeats < 1 or args.startup_repeats < 1:
        parser.error(
            f"--repeats and --startup-repeats must be >= 1; received {args.repeats} and "
            f"{args.startup_repeats}."
        )
    if not args.polyak.exists():
        parser.error(f"--polyak {args.polyak} does not exist; install polyak (make test) first.")
    selected = {name.strip() for name in args.contenders.split(",") if name.strip()}
    write_readme = not (args.quick or args.no_readme or selected)
    blocks = (
        (["bench-small"] if args.small else ["bench-average", "bench-small"])
        if write_readme
        else []
    )
    for block in blocks:
        if not has_readme_block(block):
            parser.error(f"README.md has no {block} block to rewrite; use --no-readme.")

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    load_at_start = os.getloadavg()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tools_venv = (args.tools_venv or workdir / "tools-venv").resolve()
    if args.install_tools:
        install_tools(tools_venv, log)
    mergekit = find_mergekit(tools_venv)
    machine = machine_description()
    polyak_text = polyak_description(args.polyak)
    versions = measured_versions(args.polyak)
    log(machine)
    log(polyak_text)
    log(f"Measured with {versions}")

    outputs = workdir / "outputs"
    outputs.mkdir(exist_ok=True)
    (outputs / "contenders.log").write_text("")  # what the contenders printed, this run
    log(f"\nstart-up, {args.startup_repeats} runs each:")
    startup_rows = benchmark_dataset(
        None, startup_contenders(args.polyak), outputs, args.startup_repeats, args.timeout, log
    )
    log("\n" + startup_table(startup_rows))
    results: list[tuple[Dataset, list[Row]]] = []
    plan = [("safetensors", total) for total in totals] + [("pt", total) for total in pt_totals]
    for fmt, total in plan:
        log(f"\n{fmt}, {size_label(total)} in {args.members} members:")
        dataset = prepare_dataset(workdir, fmt, total, args.members, args.seed, log)
        contenders = [
            c
            for c in contenders_for(fmt, args.polyak, mergekit, workdir)
            if not selected or c.name in selected or c.name == "floor"
        ]
        rows = benchmark_dataset(dataset, contenders, outputs, args.repeats, args.timeout, log)
        results.append((dataset, rows))
        log("\n" + dataset_table(dataset, rows))

    ran = any(row.contender.name == "mergekit" for _, rows in results for row in rows)
    machine += f", {load_text(load_at_start)}"
    if source_digest() not in polyak_text:
        polyak_text += f"; CHANGED during the run, now {source_digest()}"
    command = shlex.join(["python", *sys.argv])
    sections = [
        "# Averaging benchmark (bench/average.py)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Under test: {polyak_text}  ",
        f"Measured with: {versions}",
        "",
        f"Each contender is its own process: warm-up (checked), then {args.repeats} timed "
        "runs interleaved in rotating order. Seconds include Python's start-up and imports; "
        "inputs are in the page cache (warm); polyak and the floor fsync their output, the "
        "others do not. Peak RSS is ru_maxrss (it counts the pages of memory-mapped inputs); "
        "peak anon is the largest RssAnon sampled every 5 ms, the memory the process "
        "allocated. Check: float32 output within N * 2^-23 * max|member value| of a float64 "
        "reference, per tensor.",
        "",
        "## Verdicts",
        "",
        startup_verdict(startup_rows),
        *verdicts(results),
        "",
        f"## Start-up (the fastest and the median of {args.startup_repeats} runs, interleaved)",
        "",
        startup_table(startup_rows),
        "",
        "## Summary (min seconds, ratio to the floor's min, peak anonymous memory)",
        "",
        summary_table(results),
    ]
    for dataset, rows in results:
        sections += [
            "",
            f"## {dataset.label}: {len(dataset.members)} members of "
            f"{dataset.member_bytes / MB:.1f} MB, {dataset.tensors} tensors, "
            f"{dataset.parameters / 1e6:.1f} M parameters each",
            "",
            dataset_table(dataset, rows),
        ]
    sections += [
        "",
        "## Other tools",
        "",
        markdown_table(["tool", "here"], [list(item) for item in other_tools(mergekit, ran)]),
        "",
        f"Inputs cached in {workdir}. Total run time: {time.perf_counter() - started:.0f} s.",
    ]
    report = "\n".join(sections)
    print()
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "average.md").write_text(report + "\n")
    print(f"\nWritten to {args.out / 'average.md'}.")
    failed = [
        f"{dataset.label} {row.contender.name}"
        for dataset, rows in results
        for row in rows
        if row.failed
    ] + [f"start-up {row.contender.name}" for row in startup_rows if row.failed]
    if failed:
        print(f"FAILED: {', '.join(failed)}; README.md left as it was.", file=sys.stderr)
        return 1
    if "bench-average" in blocks:
        block = readme_summary(command, machine, polyak_text, args.repeats, results)
        replace_readme_block("bench-average", block, "## Speed and memory")
        print("README.md's benchmark block rewritten from this run.")
    if "bench-small" in blocks:
        block = small_summary(
            command,
            machine,
            versions,
            polyak_text,
            args.repeats,
            args.startup_repeats,
            startup_rows,
            results,
            partial=args.small,
        )
        replace_readme_block("bench-small", block, "## Speed and memory")
        print("README.md's start-up and small-models block rewritten from this run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
