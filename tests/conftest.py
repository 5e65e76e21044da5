"""Shared test set-up: Keras on torch unless KERAS_BACKEND says otherwise, one thread."""

import contextlib
import os
import resource
import sys

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One thread per process: CI and these machines have 2 shared cores, and torch's
# default of one thread per core made small models 5-10x slower under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header(config):
    """The Keras backend of this run (`make test` runs the Keras tests on each)."""
    return f"keras backend: {os.environ['KERAS_BACKEND']}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests, restored after (where torch is loaded).

    Tiny models run fastest on one thread; more spin against other processes on 2
    cores. OMP_NUM_THREADS above covers torch loaded after it; this covers the rest.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def file_size_limit():
    """``ulimit -f`` in-process, as a context manager: ``with file_size_limit(bytes):``.

    A write past the limit fails with EFBIG ("File too large"; Python ignores SIGXFSZ),
    as a write to a full disk fails with ENOSPC: a real failure of a real write.
    """

    @contextlib.contextmanager
    def limited(limit: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    return limited


@pytest.fixture
def float64_power_ema():
    """The reference of post-hoc EMA profiles: ``(states, sigma_rel) -> state``.

    The power EMA (Karras et al.) of the torch state dicts after steps 1..T, updated
    every step, in float64; integer tensors are the newest state's.
    """
    from polyak.posthoc import gamma_of

    def power_ema(states: list[dict], sigma_rel: float) -> dict:
        exponent = gamma_of(sigma_rel) + 1
        average: dict = {}
        for t, state in enumerate(states, start=1):
            beta = (1 - 1 / t) ** exponent
            for name, value in state.items():
                if not value.is_floating_point():
                    average[name] = value
                elif t == 1:
                    average[name] = value.double()
                else:
                    average[name] = beta * average[name] + (1 - beta) * value.double()
        return average

    return power_ema
