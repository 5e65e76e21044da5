"""PyTorch checkpoints: plain state dicts and Lightning, timm and fairseq checkpoint dicts.

Reading first tries polyak's own reader of torch's zip format (:mod:`polyak.formats.torchzip`):
numpy views of one memory map, no ``import torch``, and a pickle allowlist that is a subset
of ``weights_only``'s (plain containers, dense tensors of the dtypes polyak supports).
Any file it declines (a legacy, non-zip file, a global outside its allowlist, a sparse or
complex tensor...) is loaded with ``torch.load(path, map_location="cpu", weights_only=True,
mmap=True)`` (legacy files without ``mmap``, still ``weights_only``), so both paths give
the same reader and the same errors. polyak never unpickles arbitrary Python objects: a file
that ``weights_only`` refuses raises ``CheckpointError`` naming the refused classes, and
there is no fallback to ``weights_only=False``. The fallback is never weaker than polyak's own
reader: a file it declines for a safety reason (``torchzip.Refused``: a record shorter than
its storage, a view declaring more elements than its storage, a pickle beyond its bounds, a
compressed record beyond the inflation limit) is refused, never handed to ``torch.load``.

Where the weights are in the file, and what else it holds: :class:`TorchReader`.

Writing, and what of the template's container the output keeps: :func:`write_torch`.

Example:
    >>> with TorchReader(Path("last.ckpt")) as reader:  # doctest: +SKIP
    ...     reader.key, reader.names()[:2]
    ('state_dict', ['encoder.weight', 'encoder.bias'])
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polyak.errors import CheckpointError, OutputError, require
from polyak.formats import torchzip
from polyak.formats.background import BackgroundWriter
from polyak.formats.base import (
    DTYPES,
    CheckpointReader,
    PlannedTensors,
    ReaderBase,
    StreamedTensor,
    TensorInfo,
    dtype_name,
)
from polyak.formats.marks import mark_zip_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_KEYS",
    "DROPPED_KEYS",
    "STRIPPED_PREFIXES",
    "TorchReader",
    "check_torch_output",
    "write_torch",
]

# Entries of a checkpoint dict that hold the weights, in the order tried by default.
DEFAULT_KEYS = ("state_dict", "model", "state_dict_ema")

# Name prefixes added by wrappers, stripped when every tensor name has one.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")

# Top-level entries dropped from a checkpoint dict on write: averaged weights match no
# optimizer, scheduler or gradient-scaler state (fairseq keeps its optimizer state in
# ``last_optimizer_state``).
DROPPED_KEYS = (
    "optimizer_states",
    "lr_schedulers",
    "optimizer",
    "optimizers",
    "scheduler",
    "lr_scheduler",
    "amp_scaler",
    "scaler",
    "last_optimizer_state",
)

# The entry every Lightning checkpoint has, which load_from_checkpoint requires.
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"

_ZIP_MAGIC = b"PK\x03\x04"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_MAX_LISTED_KEYS = 20


def _torch():
    return require("torch", "torch", "reading PyTorch checkpoints")


def _dtype_names() -> dict[Any, str]:
    """Canonical dtype names of the torch dtypes polyak supports."""
    torch = _torch()
    names = {}
    for name in DTYPES:
        torch_dtype = getattr(torch, name, None)
        if isinstance(torch_dtype, torch.dtype):
            names[torch_dtype] = name
    return names


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == _ZIP_MAGIC


def _short_reason(error: BaseException) -> str:
    """The useful part of a torch.load error, on one line."""
    text = _ANSI_ESCAPE.sub("", str(error))
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if match:
        reason = match.group(1)
    else:
        reason = text.strip().split("\n", 1)[0]
        reason = reason.split(". ", 1)[0].rstrip(".")
    reason = " ".join(reason.split())
    if not reason:
        reason = "unexpected end of file" if isinstance(error, EOFError) else type(error).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return reason


def _load_error(path: Path, error: BaseException) -> CheckpointError:
    text = _ANSI_ESCAPE.sub("", str(error))
    refused = list(dict.fromkeys(_REFUSED_GLOBAL.findall(text)))
    if refused:
        return CheckpointError(
            f"checkpoint {path}: refused to load {', '.join(refused)}. The file holds pickled "
            "Python objects besides tensors, and polyak never unpickles arbitrary objects "
            "(it loads with torch.load(..., weights_only=True)). If you trust the file, load "
            "it yourself and re-save the weights alone with "
            "torch.save(model.state_dict(), path)."
        )
    return CheckpointError(
        f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({_short_reason(error)})."
    )


def _load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped unless the file is legacy."""
    torch = _torch()
    try:
        # torch warns about the files it loads (an unusual pickle protocol, deprecated
        # storages); the refusal, if any, says what matters, on one line.
        # timm's train.py saves its command line (argparse.Namespace) as ``args``: plain
        # data, allowed as polyak's own reader allows it.
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                # mmap needs the zip serialization; legacy files load without it, still
                # weights_only. Anything else fails the same way again, so it is not retried.
                if _is_zip(path):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _load_error(path, error) from None


def _list_keys(mapping: Mapping) -> str:
    keys = [repr(key) for key in mapping]
    if len(keys) > _MAX_LISTED_KEYS:
        keys = [*keys[:_MAX_LISTED_KEYS], f"... ({len(keys) - _MAX_LISTED_KEYS} more)"]
    return "[" + ", ".join(keys) + "]"


def _is_tensor(value: Any) -> bool:
    """A torch tensor, or a tensor of a file read without torch (``torchzip.StoredTensor``).

    torch is not imported for this: if it is not loaded, ``value`` is no torch tensor.
    """
    if type(value) is torchzip.StoredTensor:
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _count_tensors(mapping: Mapping) -> int:
    return sum(_is_tensor(value) for value in mapping.values())


def _is_plain_state_dict(obj: Any) -> bool:
    """A mapping of tensors, with non-tensor values only under ``..._extra_state`` keys."""
    if not isinstance(obj, Mapping) or _count_tensors(obj) == 0:
        return False
    return all(
        _is_tensor(value) or (isinstance(key, str) and key.endswith("_extra_state"))
        for key, value in obj.items()
    )


def _common_prefix(names: list[str]) -> str:
    """The wrapper prefixes (``module.``, ``_orig_mod.``, nested) that every name starts with."""
    prefix = ""
    stripped = names
    while stripped:
        for candidate in STRIPPED_PREFIXES:
            if all(name.startswith(candidate) and name != candidate for name in stripped):
                prefix += candidate
                stripped = [name[len(candidate) :] for name in stripped]
                break
        else:
            return prefix
    return prefix


class TorchReader(ReaderBase):
    """Reads the weights of a PyTorch checkpoint, loaded as ``weights_only=True`` allows.

    Where the weights are:

    - a dict of tensors (what ``torch.save(model.state_dict(), path)`` writes) is the state dict;
    - otherwise the entry named by ``key``, or by default the first of ``state_dict``
      (Lightning, timm), ``model`` (fairseq) and ``state_dict_ema`` (timm's EMA). timm
      checkpoints hold both ``state_dict`` and ``state_dict_ema``: the default reads
      ``state_dict``; ``key="state_dict_ema"`` (CLI ``--key state_dict_ema``) reads the EMA.

    Inside the state dict only tensors are tensors to average; other values
    (``_extra_state`` entries, for example) are kept as they are in the template. timm's
    ``args`` (an ``argparse.Namespace`` of its command line) is read as plain data and
    written back as a Namespace. A prefix that
    every tensor name shares, ``module.`` (DistributedDataParallel) or ``_orig_mod.``
    (``torch.compile``), possibly nested, is stripped from the names and put back on write.

    Attributes:
        path: the checkpoint file.
        format: ``"torch"``.
        key: the entry of the checkpoint dict that holds the weights (``"state_dict"``,
            ``"model"``, ...), or None when the file is a plain state dict.
        prefix: the wrapper prefix stripped from every tensor name (``"module."``,
            ``"_orig_mod."``, nested ones concatenated), or ``""``.
        container: the whole loaded object (the checkpoint dict, or the state dict itself);
            its tensors are ``torchzip.StoredTensor`` views when ``fast``, else torch tensors.
        fast: whether polyak's own reader loaded the file (no torch), not ``torch.load``.
        state_dict: the state dict the weights come from, with its names as stored.
        metadata: the state dict's ``_metadata`` (module versions), or None.
        extras: the state dict's non-tensor entries, under their names as stored (prefix
            included); they are not averaged and are written back from the template.

    Args:
        path: a file written by ``torch.save``.
        key: the entry holding the weights, e.g. ``"state_dict_ema"``; by default the
            first of ``state_dict``, ``model``, ``state_dict_ema``.

    Raises:
        CheckpointError: the file cannot be read, holds objects ``weights_only`` refuses,
            or has no state dict where it was looked for.

    Example:
        >>> with TorchReader(Path("model.pt")) as reader:  # doctest: +SKIP
        ...     reader.info("0.weight")
        TensorInfo(shape=(3, 2), dtype='float32')
    """

    format = "torch"

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = Path(path)
        try:
            # polyak's own reader first: no torch import, one memory map (see torchzip).
            self.container: Any = torchzip.load(self.path)
            self.fast = True
        except torchzip.NotFastPath:
            self.container = _load(self.path)
            self.fast = False
        except torchzip.Refused as error:
            # Declined for safety: torch.load(mmap=True) would read past a record or
            # allocate what the file only declares, so the file is never handed to it.
            raise CheckpointError(
                f"checkpoint {self.path}: refused ({error}); the file is corrupt or crafted. "
                "Save it again with torch.save(model.state_dict(), path)."
            ) from None
        self.key, self.state_dict = self._find_state_dict(self.container, key)
        self._dtype_names = {} if self.fast else _dtype_names()
        raw_names = []
        self.extras: dict[str, Any] = {}
        for name, value in self.state_dict.items():
            if not isinstance(name, str):
                raise CheckpointError(
                    f"checkpoint {self.path}: the state dict has a key {name!r} of type "
                    f"{type(name).__name__}; state dict keys must be strings."
                )
            if _is_tensor(value):
                raw_names.append(name)
            else:
                self.extras[name] = value
        self.prefix = _common_prefix(raw_names)
        self._tensors: dict[str, Any] = {
            name[len(self.prefix) :]: self.state_dict[name] for name in raw_names
        }
        self._names = list(self._tensors)
        # Module versions that load_state_dict reads; kept for the writer.
        self.metadata: dict | None = getattr(self.state_dict, "_metadata", None)
        self._closed = False

    def _find_state_dict(self, obj: Any, key: str | None) -> tuple[str | None, Mapping]:
        what = type(obj).__name__
        if key is not None:
            if not isinstance(obj, Mapping):
                raise CheckpointError(
                    f"checkpoint {self.path}: key={key!r} was given, but the file holds a "
                    f"{what}, not a dict; read it without a key."
                )
            if _is_plain_state_dict(obj) and key not in obj:
                raise CheckpointError(
                    f"checkpoint {self.path}: key={key!r} was given, but the file is a plain "
                    f"state dict of {_count_tensors(obj)} tensors; read it without a key."
                )
            if key not in obj:
                raise CheckpointError(
                    f"checkpoint {self.path}: has no entry {key!r}; its top-level keys are "
                    f"{_list_keys(obj)}. Pass one of them as key=NAME."
                )
            value = obj[key]
            if not isinstance(value, Mapping) or _count_tensors(value) == 0:
                raise CheckpointError(
                    f"checkpoint {self.path}: entry {key!r} holds a value of type "
                    f"{type(value).__name__} without tensors, not a state dict. Pass key=NAME, "
                    f"the entry that holds the weights; the top-level keys are {_list_keys(obj)}."
                )
            return key, value
        if _is_plain_state_dict(obj):
            return None, obj
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {self.path}: holds a {what}, not a state dict or a checkpoint dict. "
                "Save the weights with torch.save(model.state_dict(), path)."
            )
        for candidate in DEFAULT_KEYS:
            value = obj.get(candidate)
            if isinstance(value, Mapping) and _count_tensors(value) > 0:
                return candidate, value
        expected = ", ".join(repr(candidate) for candidate in DEFAULT_KEYS)
        raise CheckpointError(
            f"checkpoint {self.path}: found no weights. The file is a dict with top-level keys "
            f"{_list_keys(obj)}, none of which is a state dict polyak looks for ({expected}). "
            "Pass key=NAME, the entry that holds the weights."
        )

    def _tensor(self, name: str) -> Any:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path}: the reader is closed.")
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise CheckpointError(
                f"checkpoint {self.path}: has no tensor {name!r} "
                f"({len(self._tensors)} tensors, see names())."
            ) from None
        if type(tensor) is torchzip.StoredTensor:
            # Dense and of a supported dtype, or torchzip would have left the file to torch.
            return tensor
        torch = _torch()
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} is sparse ({tensor.layout}); polyak "
                "reads dense tensors only. Save it dense with tensor.to_dense()."
            )
        if tensor.is_nested or tensor.device.type != "cpu":
            kind = "a nested tensor" if tensor.is_nested else f"on device {tensor.device.type}"
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} is {kind}, which holds no plain "
                "data to average. Save real CPU tensors (tensor.cpu(), to_padded_tensor)."
            )
        storage_elements = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > storage_elements:
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} declares {tensor.numel()} elements, "
                f"more than the {storage_elements} its storage holds (an expanded view); "
                "the output would be larger than the file chooses. Save it with .clone()."
            )
        if tensor.dtype not in self._dtype_names:
            supported = ", ".join(self._dtype_names.values())
            raise CheckpointError(
                f"checkpoint {self.path}: tensor {name!r} has dtype {tensor.dtype}, which "
                f"polyak does not support (supported: {supported}). Convert it, e.g. to "
                "float32, or remove it from the state dict before averaging."
            )
        return tensor

    def names(self) -> list[str]:
        """Tensor names, prefix stripped, in the state dict's order."""
        return list(self._names)

    def weight_entries(self) -> list[str]:
        """The entries of a checkpoint dict that hold a state dict, any of which ``key``
        may name (``["state_dict", "state_dict_ema"]`` for timm); ``[]`` for a plain
        state dict."""
        if self.key is None or not isinstance(self.container, Mapping):
            return []
        return [
            name
            for name, value in self.container.items()
            if isinstance(name, str) and isinstance(value, Mapping) and _count_tensors(value)
        ]

    def aliases(self) -> dict[str, str]:
        """Tied tensors: each name whose tensor is the same view of the same storage as
        an earlier name's (``lm_head.weight`` and ``transformer.wte.weight``), mapped to
        that earlier name. Prefix stripped, like ``names()``."""
        first_of: dict[tuple, str] = {}
        aliases: dict[str, str] = {}
        for name in self._names:
            view = _view_of(self._tensors[name])
            if view is None:
                continue
            first = first_of.setdefault(view, name)
            if first != name:
                aliases[name] = first
        return aliases

    def info(self, name: str) -> TensorInfo:
        """Shape and canonical dtype of one tensor."""
        tensor = self._tensor(name)
        if type(tensor) is torchzip.StoredTensor:
            return TensorInfo(tensor.shape, tensor.dtype)
        return TensorInfo(
            tuple(int(size) for size in tensor.shape), self._dtype_names[tensor.dtype]
        )

    def read(self, name: str) -> np.ndarray:
        """The data of one tensor, read-only, sharing memory with the loaded file."""
        tensor = self._tensor(name)
        if type(tensor) is torchzip.StoredTensor:
            return tensor.numpy()
        torch = _torch()
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        if tensor.dtype == torch.bfloat16:
            array = tensor.view(torch.int16).numpy().view(DTYPES["bfloat16"])
        else:
            array = tensor.numpy()
        array.flags.writeable = False
        return array

    def close(self) -> None:
        """Drop the loaded tensors and container (and so the memory map)."""
        self._closed = True
        self._tensors = {}
        self.container = None
        self.state_dict = None


def _view_of(tensor: Any) -> tuple | None:
    """What identifies a tensor's data: its storage and its view of it (None if unknown)."""
    if type(tensor) is torchzip.StoredTensor:
        return (id(tensor.storage), tensor.offset, tensor.shape, tensor.stride, tensor.dtype)
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (
        storage.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        str(tensor.dtype),
    )


def _to_torch(name: str, array: np.ndarray, path: Path) -> torch.Tensor:
    """A new tensor holding a copy of ``array`` (the engine reuses the array's buffer)."""
    torch = _torch()
    copied = _copied(name, array, path)
    if dtype_name(copied.dtype) == "bfloat16":
        return torch.from_numpy(copied.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(copied)


def _copied(name: str, array: Any, path: Path) -> np.ndarray:
    """A C-ordered copy of ``array`` in its canonical dtype (the engine reuses buffers)."""
    if isinstance(array, StreamedTensor):
        return np.asarray(array)  # collecting the chunks makes the copy
    array = np.asarray(array)
    dtype = dtype_name(array.dtype)
    if dtype is None:
        raise OutputError(
            f"output {path}: tensor {name!r} has dtype {array.dtype}, which cannot be written "
            f"(supported: {', '.join(DTYPES)})."
        )
    return np.array(array, dtype=DTYPES[dtype], copy=True, order="C")


def _state_dict(path: Path, prefix: str, tensors: Iterable[tuple[str, Any]]) -> OrderedDict:
    """The state dict of ``(name, tensor)`` pairs, ``prefix`` put back; a repeated name refused."""
    state_dict: OrderedDict[str, Any] = OrderedDict()
    for name, tensor in tensors:
        full_name = prefix + name
        if full_name in state_dict:
            raise OutputError(f"output {path}: tensor {name!r} was given twice.")
        state_dict[full_name] = tensor
    return state_dict


def _in_container(state_dict: OrderedDict[str, Any], template: TorchReader | None) -> Any:
    """What to save: ``state_dict`` with the template's extras and metadata, in its dict."""
    if template is None:
        return state_dict
    for name, value in template.extras.items():
        state_dict.setdefault(name, value)
    if template.metadata is not None:
        state_dict._metadata = copy.copy(template.metadata)  # type: ignore[attr-defined]
    if template.key is None:
        return state_dict
    obj = copy.copy(template.container)
    obj[template.key] = state_dict
    for dropped in DROPPED_KEYS:
        obj.pop(dropped, None)
    return obj


def _is_lightning_checkpoint(template: CheckpointReader | None) -> bool:
    container = getattr(template, "container", None)
    return isinstance(template, TorchReader) and (
        isinstance(container, Mapping) and LIGHTNING_VERSION_KEY in container
    )


def check_torch_output(path: Path, template: CheckpointReader) -> None:
    """Refuse a ``.ckpt`` output from inputs that are not Lightning checkpoints.

    A ``.ckpt`` is what Lightning's ``load_from_checkpoint`` reads, and it requires
    Lightning's entries (``pytorch-lightning_version``, ``hyper_parameters``...), which
    only a Lightning checkpoint as template can give.

    Raises:
        OutputError: ``path`` ends with ``.ckpt`` and ``template`` is not a Lightning
            checkpoint.
    """
    if Path(path).name.lower().endswith(".ckpt") and not _is_lightning_checkpoint(template):
        source = getattr(template, "path", None) or type(template).__name__
        raise OutputError(
            f"output {path}: a .ckpt file is a Lightning checkpoint, which "
            f"LightningModule.load_from_checkpoint reads only with Lightning's entries "
            f"({LIGHTNING_VERSION_KEY}, hyper_parameters), but the newest input {source} is "
            "not a Lightning checkpoint. Write .pt (load it with model.load_state_dict("
            "torch.load(path))) or .safetensors instead."
        )


def write_torch(
    path: Path,
    tensors: Iterable[tuple[str, np.ndarray]],
    template: CheckpointReader | None,
) -> None:
    """Write tensors as ``torch.save`` does, in the template's container when it is a torch file.

    Writing (``write_torch``) streams a state dict of new tensors in the order received: the
    pickle first, then each tensor's data as the engine computes it, in the layout
    ``torch.save`` writes (``torch.load`` reads it with or without ``mmap``); tensors tied in
    every member (an embedding shared with the output layer) share one storage in the output,
    as they did in the input. polyak does this
    itself because ``import torch`` costs over a second and ``torch.save`` needs the whole
    output in memory; only a template that torch had to load is written back with
    ``torch.save``. With a ``TorchReader`` as template it puts back the template's prefix, its
    non-tensor entries and its ``_metadata`` (module versions used by ``load_state_dict``), and
    if the template was a checkpoint dict, writes a shallow copy of that dict with the weights
    entry replaced. The copy keeps everything else (``epoch``, ``global_step``,
    ``hyper_parameters``, callbacks, other weights entries such as timm's ``state_dict_ema``,
    which stay the template's) but drops optimizer and scheduler state (see ``DROPPED_KEYS``):
    averaged weights match no optimizer state, so resuming training from the output starts fresh
    optimizers, while ``load_state_dict`` and Lightning's ``load_from_checkpoint`` work. With
    any other template (conversion from another format) the output is a plain state dict.

    polyak writes the zip format itself (see :mod:`polyak.formats.torchzip`), streaming:
    the pickle first, from the planned names, shapes and dtypes, then each tensor's data
    as it comes, so the output is never whole in memory and torch is not imported. Only
    a template that torch had to load (a legacy file, or one outside polyak's reader)
    is written back with ``torch.save``, since its container holds torch objects.

    Args:
        path: the file to write (the caller renames it into place).
        tensors: ``(name, array)`` pairs in output order, best a ``PlannedTensors``
            (streamed); anything else is copied pair by pair as it comes.
        template: the reader whose container is copied. A ``TorchReader`` gives back its
            name prefix, non-tensor entries, ``_metadata`` and, for a checkpoint dict, the
            dict itself with the weights replaced and ``DROPPED_KEYS`` removed. Anything
            else gives a plain state dict.

    Raises:
        OutputError: a tensor has an unsupported dtype, a name repeats, the template was
            closed, or the file cannot be written.
    """
    path = Path(path)
    torch_template = template if isinstance(template, TorchReader) else None
    if torch_template is not None and torch_template.key is not None:
        if torch_template.container is None:
            raise OutputError(
                f"output {path}: the template {torch_template.path} was closed before "
                f"writing; its {torch_template.key!r} checkpoint dict is needed. Write while "
                "the template is open."
            )
    if torch_template is not None and not torch_template.fast:
        _save_with_torch(path, tensors, torch_template)
        return
    if not isinstance(tensors, PlannedTensors):
        # Copied as they come (a producer may reuse its arrays), then planned.
        tensors = PlannedTensors.from_arrays(
            (name, _copied(name, array, path)) for name, array in tensors
        )
    prefix = torch_template.prefix if torch_template is not None else ""
    # Tied tensors (equal in every member) share one storage, as in the input.
    aliases = tensors.aliases
    pairs: list[tuple[str, torchzip.NewTensor]] = []
    by_name: dict[str, torchzip.NewTensor] = {}
    for name, info in tensors.infos:
        tensor = by_name[aliases[name]] if name in aliases else torchzip.NewTensor(name, info)
        by_name.setdefault(name, tensor)
        pairs.append((name, tensor))
    state_dict = _state_dict(path, prefix, pairs)
    new_tensors = [tensor for name, tensor in pairs if name not in aliases]
    arrays = ((name, array) for name, array in tensors if name not in aliases)
    obj = _in_container(state_dict, torch_template)
    try:
        # Written by a second thread, as the engine computes (see formats/background.py).
        with BackgroundWriter(path) as file:
            torchzip.write(file, obj, new_tensors, arrays)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"output {path}: cannot be written ({reason}).") from error


def _save_with_torch(
    path: Path, tensors: Iterable[tuple[str, np.ndarray]], template: TorchReader
) -> None:
    """``torch.save`` of new tensors in the container of a template torch loaded."""
    torch = _torch()
    state_dict = _state_dict(
        path, template.prefix, ((name, _to_torch(name, array, path)) for name, array in tensors)
    )
    obj = _in_container(state_dict, template)
    try:
        # Through a Python file, so that a failed write (a full disk) raises OSError
        # rather than torch's RuntimeError from its C++ stream.
        with open(path, "w+b") as file:
            torch.save(obj, file)
            file.flush()
            mark_zip_file(file)  # as polyak's own writer marks its outputs
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise OutputError(f"output {path}: cannot be written ({reason}).") from error
