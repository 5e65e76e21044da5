"""Saving a Keras model to a file with HDF5 writing only into memory.

Why (HDF5 crashes on a failed write), and the cost: :func:`save_model_file`.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["save_model_file"]

_WEIGHTS_MEMBER = "model.weights.h5"  # the weights inside a .keras archive


def save_model_file(model: Any, path: str | Path, format: str) -> None:
    """Save ``model`` to ``path`` as ``format`` (``"keras"`` or ``"weights.h5"``).

    Keras' ``.keras`` writer accepts a file object: the model is serialized into a
    ``BytesIO`` and polyak writes the bytes with Python's own I/O. For ``.weights.h5`` the
    archive's ``model.weights.h5`` is the file ``model.save_weights`` writes, streamed out.
    Why: when a write fails (a full disk, a quota, a file size limit) as HDF5 closes a file
    on disk, HDF5 crashes the process (SIGSEGV) and the training run is lost; a Python
    write raises ``OSError`` instead. The cost is the file's bytes held in memory twice
    while saving (see the README's Safety section for measurements).

    ``path`` needs no particular suffix (Keras never sees it).

    Raises:
        OSError: the file cannot be written; ``path`` may hold part of it (write to a
            temporary and rename, as the callers do).
    """
    from keras.src.saving import saving_lib  # the writer behind model.save, file objects too

    buffer = io.BytesIO()
    saving_lib.save_model(model, buffer)
    with open(path, "wb") as file:
        if format == "keras":
            file.write(buffer.getbuffer())
        else:  # streamed out of the (stored) archive member, no copy of it
            with zipfile.ZipFile(buffer) as archive, archive.open(_WEIGHTS_MEMBER) as member:
                shutil.copyfileobj(member, file, 1 << 20)
