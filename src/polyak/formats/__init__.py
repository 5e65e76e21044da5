"""Checkpoint formats, each one module behind the reader/writer interface of ``base``.

The registry below is the one place that lists them. Modules are imported only
when a file of their format is opened, so ``import polyak`` never imports torch.

| format              | suffixes                      | module          |
|---------------------|-------------------------------|-----------------|
| safetensors         | .safetensors                  | safetensors     |
| sharded-safetensors | checkpoint directories        | safetensors     |
| npz                 | .npz                          | npz             |
| torch               | .pt .pth .bin .ckpt .pth.tar  | torch           |
| keras-weights       | .weights.h5                   | keras           |
| keras               | .keras                        | keras           |
| keras-h5            | .h5 .hdf5 (legacy full model) | keras           |
| dcp                 | DCP directories (.metadata)   | dcp             |

``sharded-safetensors`` is read from a directory holding ``model.safetensors.index.json``
and written to an output directory (a path ending with ``/`` or without a suffix):
``model-00001-of-0000K.safetensors`` shards and their index, or a single
``model.safetensors`` when everything fits in one shard (Hugging Face's layout).

``dcp`` is a ``torch.distributed.checkpoint`` directory (``.metadata`` and ``.distcp``
files; accelerate's FSDP checkpoints hold one as ``pytorch_model_fsdp_0/``). It is
written only when asked for (``format="dcp"``, CLI ``--format dcp``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polyak.errors import CheckpointError, OutputError
from polyak.files import is_directory_output
from polyak.formats.base import CheckpointReader, CheckpointWriter, TensorInfo

__all__ = [
    "FORMATS",
    "CheckpointReader",
    "CheckpointWriter",
    "Format",
    "TensorInfo",
    "format_for_output",
    "format_from_name",
    "format_of",
    "open_checkpoint",
    "suffix_of",
]

# Files inside a directory checkpoint (Hugging Face layout) that hold the model.
DIRECTORY_MODEL_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin",
    # torch.distributed.checkpoint: FSDP2, torchtitan, Megatron torch_dist; accelerate FSDP.
    ".metadata",
    "pytorch_model_fsdp_0/.metadata",
)


@dataclass(frozen=True)
class Format:
    """One checkpoint format: how to recognize it and which module reads and writes it."""

    name: str
    suffixes: tuple[str, ...]
    module: str
    reader: str
    writer: str
    description: str
    # A function ``check(path, template)`` that refuses an output this format cannot
    # make from that template, before anything is read or written; or None.
    output_check: str | None = None

    def load(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self.module), attribute)

    def open(self, path: Path, **options: Any) -> CheckpointReader:
        return self.load(self.reader)(path, **options)

    def write(self, path, tensors, template, **options: Any) -> Any:
        """Write with the format's writer; ``options`` are writer-specific keywords."""
        return self.load(self.writer)(path, tensors, template, **options)

    def check_output(self, path: Path, template: CheckpointReader) -> None:
        """Refuse (``OutputError``) an output this format cannot make from ``template``."""
        if self.output_check is not None:
            self.load(self.output_check)(Path(path), template)


FORMATS: tuple[Format, ...] = (
    Format(
        "safetensors",
        (".safetensors",),
        "polyak.formats.safetensors",
        "SafetensorsReader",
        "write_safetensors",
        "safetensors, memory-mapped",
    ),
    Format(
        "sharded-safetensors",
        (".safetensors.index.json",),
        "polyak.formats.safetensors",
        "ShardedSafetensorsReader",
        "write_sharded_safetensors",
        "safetensors checkpoint directory: shards and model.safetensors.index.json",
    ),
    Format("npz", (".npz",), "polyak.formats.npz", "NpzReader", "write_npz", "numpy .npz"),
    Format(
        "torch",
        # .pth.tar: timm's checkpoint-N.pth.tar (a torch.save zip despite its name).
        (".pt", ".pth", ".bin", ".ckpt", ".pth.tar"),
        "polyak.formats.torch",
        "TorchReader",
        "write_torch",
        "PyTorch pickle (weights_only), plain or Lightning/timm/fairseq checkpoint dict",
        output_check="check_torch_output",
    ),
    Format(
        "keras-weights",
        (".weights.h5",),
        "polyak.formats.keras",
        "KerasWeightsReader",
        "write_keras_weights",
        "Keras 3 save_weights",
    ),
    Format(
        "keras",
        (".keras",),
        "polyak.formats.keras",
        "KerasArchiveReader",
        "write_keras_archive",
        "Keras 3 model.save (.keras zip)",
    ),
    Format(
        "keras-h5",
        (".h5", ".hdf5"),
        "polyak.formats.keras",
        "KerasLegacyH5Reader",
        "write_keras_legacy_h5",
        "legacy Keras full-model HDF5 (model.save('x.h5'))",
    ),
    Format(
        "dcp",
        (".metadata",),
        "polyak.formats.dcp",
        "DcpReader",
        "write_dcp",
        "torch.distributed.checkpoint directory (.metadata and .distcp files)",
    ),
)
_BY_NAME = {fmt.name: fmt for fmt in FORMATS}


def format_from_name(name: str) -> Format | None:
    """The format a file name's suffix says, or None."""
    # Longest suffix wins, so ".weights.h5" is not taken for legacy ".h5".
    best: tuple[int, Format] | None = None
    lower = name.lower()
    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            if lower.endswith(suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), fmt)
    return best[1] if best else None


def suffix_of(name: str) -> str | None:
    """The known checkpoint suffix a file name ends with (the longest), or None.

    Example:
        >>> suffix_of("model_0499.weights.h5")
        '.weights.h5'
    """
    lower = name.lower()
    matches = [suffix for fmt in FORMATS for suffix in fmt.suffixes if lower.endswith(suffix)]
    return max(matches, key=len) if matches else None


def directory_model_file(path: Path) -> Path | None:
    """The model file inside a directory checkpoint such as ``checkpoint-500/``, if any."""
    for name in DIRECTORY_MODEL_FILES:
        candidate = path / name
        if candidate.is_file():
            return candidate
    return None


def resolve_checkpoint_file(path: Path) -> Path:
    """The file to open for a checkpoint path (a directory resolves to its model file)."""
    if path.is_dir():
        inner = directory_model_file(path)
        if inner is None:
            expected = ", ".join(DIRECTORY_MODEL_FILES)
            raise CheckpointError(
                f"checkpoint {path}: the directory holds no model file; expected one of {expected}."
            )
        return inner
    return path


def format_of(path: str | Path) -> Format:
    """The format of a checkpoint path, from its suffix (directories: from their model file)."""
    file = resolve_checkpoint_file(Path(path))
    fmt = format_from_name(file.name)
    if fmt is None:
        known = ", ".join(s for f in FORMATS for s in f.suffixes)
        raise CheckpointError(
            f"checkpoint {path}: unknown format of '{file.name}'. Known suffixes: {known}."
        )
    return fmt


def format_for_output(path: str | Path, input_format: Format, name: str | None = None) -> Format:
    """The format to write ``path`` in: its suffix decides; it must be able to hold the input.

    A path that ends with ``/`` or has no suffix (``"averaged/"``, ``"averaged"``) is an
    output directory, written as ``sharded-safetensors`` (see
    :func:`polyak.files.is_directory_output`). Keras containers need a member of the
    same format as their template, so they can only be written from inputs of that
    format, except ``.weights.h5`` from ``.keras`` archives (whose ``model.weights.h5``
    member is that file). Any format converts to safetensors (file or directory), npz
    and torch.

    ``name="dcp"`` asks for a DCP directory (from DCP inputs only); it is the only
    way to get one.

    Raises:
        OutputError: an unknown suffix, a shard index named as the output (give its
            directory), a Keras container from inputs of another format, or a DCP
            output asked for from other inputs or by a file name.
    """
    if name is not None and name != "dcp":
        raise OutputError(
            f"output {path}: format {name!r} is not chosen by name; only 'dcp' is. Give "
            "the output a suffix (.safetensors, .pt...) or a directory instead."
        )
    if name == "dcp":
        if input_format.name != "dcp":
            raise OutputError(
                f"output {path}: a DCP directory is written from DCP inputs only (it keeps "
                f"their state dict's structure); the inputs are {input_format.name}."
            )
        return _BY_NAME["dcp"]
    if is_directory_output(path):
        return _BY_NAME["sharded-safetensors"]
    fmt = format_from_name(Path(path).name)
    if fmt is None:
        known = ", ".join(s for f in FORMATS for s in f.suffixes if not s.endswith(".json"))
        raise OutputError(
            f"output {path}: unknown suffix. Use one of: {known}; or a directory (a path "
            "ending with / or without a suffix) for a safetensors checkpoint directory."
        )
    if fmt.name == "sharded-safetensors":
        directory = Path(path).parent
        raise OutputError(
            f"output {path}: a shard index is not a checkpoint file of its own. Give the "
            f"directory to write the shards and the index into instead: {directory}/ "
            "(or a single .safetensors file)."
        )
    if fmt.name == "dcp":
        raise OutputError(
            f"output {path}: a DCP checkpoint is a directory; write one with format='dcp' "
            "and a directory name."
        )
    # A .keras archive holds the very file save_weights writes (model.weights.h5).
    from_archive = fmt.name == "keras-weights" and input_format.name == "keras"
    if fmt.name.startswith("keras") and fmt.name != input_format.name and not from_archive:
        raise OutputError(
            f"output {path}: a {fmt.name} file can only be written from {fmt.name} inputs "
            f"(it copies their architecture); the inputs are {input_format.name}. "
            "Write .safetensors, .npz or .pt instead."
        )
    return fmt


def open_checkpoint(path: str | Path, **options: Any) -> CheckpointReader:
    """Open a checkpoint for reading, whatever its format.

    Args:
        path: a checkpoint file, or a directory holding one (``checkpoint-500/``).
        **options: format-specific options, e.g. ``key="state_dict_ema"`` for torch.

    Returns:
        A reader with ``names()``, ``info(name)``, ``read(name)``; use it as a context manager.

    Example:
        >>> with polyak.open_checkpoint("model_499.h5") as reader:  # doctest: +SKIP
        ...     print(reader.names())
    """
    path = Path(path)
    options = {name: value for name, value in options.items() if value is not None}
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory.")
    file = resolve_checkpoint_file(path)
    fmt = format_of(file)
    supported = {"key"} if fmt.name in ("torch", "dcp") else set()
    unknown = set(options) - supported
    if unknown:
        raise CheckpointError(
            f"checkpoint {path}: option(s) {sorted(unknown)} do not apply to {fmt.name} files."
        )
    return fmt.open(file, **options)
