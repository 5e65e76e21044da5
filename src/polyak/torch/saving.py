"""Writing a PyTorch state dict to one file (safetensors or ``torch.save``), checked first.

What a snapshot, an online average's export and a post-hoc profile are written with;
the rules for non-tensor entries are those of :class:`polyak.torch.SnapshotSaver`.
"""

from __future__ import annotations

import io
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from polyak.errors import require

torch = require("torch", "torch", "polyak.torch")

__all__ = ["SUFFIXES", "check_state_dict", "save_state_dict"]

# format argument -> file suffix.
SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}

_MAX_REASON = 160
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _check_format(format: object) -> None:
    if format not in SUFFIXES:
        raise ValueError(
            f"format must be one of {', '.join(map(repr, SUFFIXES))}; received {format!r}."
        )


def _state_dict(model: object) -> Mapping[str, Any]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        return model
    raise ValueError(
        "model must be a torch.nn.Module or a state dict (a mapping of names to tensors); "
        f"received {type(model).__name__}."
    )


def _load_refusal(error: BaseException) -> str:
    """Why torch.load(weights_only=True) (or torch.save) failed, in a few words."""
    text = _ANSI_ESCAPE.sub("", str(error))
    refused = list(dict.fromkeys(_REFUSED_GLOBAL.findall(text)))
    if refused:
        return f"it refuses {', '.join(refused)}"
    text = " ".join(text.split("\n", 1)[0].split()) or type(error).__name__
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _check_entries(state: Mapping[str, Any], format: str) -> None:
    """Refuse what cannot be saved in ``format`` and read back by polyak, naming the entry."""
    extras = {}
    tensors = 0
    for name, value in state.items():
        if not isinstance(name, str):
            raise ValueError(
                f"state dict keys must be strings; received the key {name!r} of type "
                f"{type(name).__name__}."
            )
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise ValueError(
                    f"state dict entry {name!r} is a sparse tensor ({value.layout}); polyak "
                    "saves and averages dense tensors only. Store it dense (tensor.to_dense())."
                )
            tensors += 1
        elif format == "safetensors":
            raise ValueError(
                f"state dict entry {name!r} is a {type(value).__name__}, not a tensor, and "
                "safetensors files hold tensors only. Save with format='pt' (torch.save, "
                "which keeps such entries), or have the module's get_extra_state() return a "
                "tensor."
            )
        else:
            extras[name] = value
    if tensors == 0:
        raise ValueError(
            f"the state dict holds no tensors ({len(state)} entries); there is nothing to "
            "average. Pass the model or model.state_dict()."
        )
    if extras:
        # polyak reads .pt snapshots with weights_only=True; find out now, not when averaging.
        entries = f"entr{'y' if len(extras) == 1 else 'ies'} {', '.join(map(repr, extras))}"
        fix = (
            "Have get_extra_state() return tensors, numbers, strings, or lists and dicts of "
            "them, or leave the entries out of the state dict."
        )
        buffer = io.BytesIO()
        try:
            torch.save(extras, buffer)
        except Exception as error:
            raise ValueError(
                f"state dict {entries}: not tensors, and torch.save cannot save them "
                f"({_load_refusal(error)}). {fix}"
            ) from None
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as error:
            raise ValueError(
                f"state dict {entries}: not tensors, and polyak reads .pt snapshots with "
                "torch.load(weights_only=True), which cannot load them back "
                f"({_load_refusal(error)}). {fix}"
            ) from None


def check_state_dict(
    model: torch.nn.Module | Mapping[str, Any], format: str = "safetensors"
) -> None:
    """Check, without copying the model's tensors, that its state dict can be saved in ``format``.

    Args:
        model: a ``torch.nn.Module`` or its state dict.
        format: ``"safetensors"`` or ``"pt"``.

    Raises:
        ValueError: ``model`` is neither a module nor a mapping, a key is not a string,
            there are no tensors, a tensor is sparse, or a non-tensor entry cannot be
            saved in ``format`` (see :class:`polyak.torch.SnapshotSaver`); the message
            names the entry.

    Example:
        >>> check_state_dict(torch.nn.Linear(2, 3))
    """
    _check_format(format)
    _check_entries(_state_dict(model), format)


def _tensors_to_write(state: Mapping[str, Any], format: str) -> dict[str, Any]:
    """The entries as written: tensors detached on the CPU; for safetensors, unshared."""
    written: dict[str, Any] = OrderedDict()
    seen_storage: set[int] = set()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            written[name] = value
            continue
        tensor = value.detach().to("cpu")
        if format == "safetensors":
            tensor = tensor.contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            # Tied weights share memory; safetensors refuses that, so write a copy.
            if pointer in seen_storage:
                tensor = tensor.clone()
            seen_storage.add(pointer)
        written[name] = tensor
    metadata = getattr(state, "_metadata", None)
    if format == "pt" and metadata is not None:
        # Module versions, which load_state_dict passes to _load_from_state_dict.
        written._metadata = metadata  # type: ignore[attr-defined]
    return written


def save_state_dict(
    model: torch.nn.Module | Mapping[str, Any],
    path: str | os.PathLike[str],
    format: str = "safetensors",
) -> None:
    """Write a model's complete state dict to one file, as a snapshot is written.

    Not atomic by itself: :class:`SnapshotSaver` calls it on a temporary file.

    Args:
        model: a ``torch.nn.Module`` or its state dict.
        path: the file to write.
        format: ``"safetensors"`` (``safetensors.torch.save_file``, metadata
            ``{"format": "pt"}``) or ``"pt"`` (``torch.save``).

    Raises:
        ValueError: the state dict cannot be saved in ``format``; see
            :func:`check_state_dict`.

    Example:
        >>> save_state_dict(model, "model.safetensors")  # doctest: +SKIP
        >>> state = safetensors.torch.load_file("model.safetensors")  # doctest: +SKIP
        >>> model.load_state_dict(state, strict=True)  # doctest: +SKIP
    """
    _check_format(format)
    state = _state_dict(model)
    _check_entries(state, format)
    _write(state, path, format)


def _write(state: Mapping[str, Any], path: str | os.PathLike[str], format: str) -> None:
    written = _tensors_to_write(state, format)
    if format == "safetensors":
        safetensors_torch = require("safetensors.torch", "torch", "saving safetensors snapshots")
        safetensors_torch.save_file(written, os.fspath(path), metadata={"format": "pt"})
    else:
        torch.save(written, os.fspath(path))
