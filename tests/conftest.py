"""Shared test set-up: Keras on the torch backend unless told otherwise, one thread."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One thread per process: CI and these machines have 2 shared cores, and torch's
# default of one thread per core made small models 5-10x slower under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
