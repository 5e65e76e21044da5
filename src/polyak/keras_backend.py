"""Choosing Keras' backend before Keras is imported, without importing Keras.

Keras reads its backend once, on first import: ``KERAS_BACKEND`` if set, else
``keras.json``, else TensorFlow. polyak runs on the torch backend when the user has
not chosen: ``KERAS_BACKEND`` wins if set; else a backend configured in
``keras.json`` whose package is installed; else, without TensorFlow, torch. With
TensorFlow installed and nothing chosen, polyak sets nothing and Keras uses
TensorFlow, its default (also when ``keras.json`` names TensorFlow, as Keras writes
it on first import).
``polyak.keras`` calls :func:`choose_keras_backend` on import; code that imports
``keras`` itself first (the demo) calls it before.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

__all__ = ["choose_keras_backend"]

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


def choose_keras_backend() -> None:
    """Set ``KERAS_BACKEND`` to torch when nothing usable is chosen and TensorFlow is absent.

    Does nothing once Keras is imported (its backend is fixed then) or when
    ``KERAS_BACKEND`` is set.
    """
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
