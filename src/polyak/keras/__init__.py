"""Keras 3 adapter: the snapshot callback (and, later, model helpers and evaluators).

Importing this package chooses Keras' backend before Keras is imported, when the
user has not: ``KERAS_BACKEND`` wins if set; else a backend configured in
``keras.json`` whose package is installed; else, without TensorFlow, torch.

Example:
    >>> from polyak.keras import SnapshotCheckpoint
    >>> model.fit(x, y, epochs=500, callbacks=[SnapshotCheckpoint("run/")])  # doctest: +SKIP
"""

import importlib.util
import json
import os
import sys

# Keras' backend names, and the package each needs.
_BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}


def _configured_backend() -> str | None:
    """The backend named in keras.json, looked up where Keras looks for it."""
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json")) as file:
            backend = json.load(file).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) else None


def _select_backend() -> None:
    if os.environ.get("KERAS_BACKEND") or "keras" in sys.modules:
        return
    configured = _configured_backend()
    package = _BACKEND_PACKAGES.get(configured or "")
    # Keras writes keras.json with "tensorflow" on first import, chosen or not; only a
    # configured backend that is installed counts as the user's choice.
    if package is not None and importlib.util.find_spec(package) is not None:
        return
    if importlib.util.find_spec("tensorflow") is None:
        os.environ["KERAS_BACKEND"] = "torch"


_select_backend()

from polyak.errors import require  # noqa: E402

require("keras", "keras", "polyak.keras")

from polyak.keras.callbacks import SnapshotCheckpoint  # noqa: E402

__all__ = [
    "SnapshotCheckpoint",
]
