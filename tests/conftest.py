"""Shared test set-up: Keras runs on the torch backend unless told otherwise."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
