"""The study (bench/quality.py) is deterministic on one machine: a seed run twice gives
the same numbers, as the README promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def quality():
    """bench/quality.py as a module (it imports its neighbours from bench/)."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("polyak_bench_quality", BENCH / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def without_timings(run: dict) -> dict:
    return {key: value for key, value in run.items() if not key.endswith("_seconds")}


def test_one_seed_of_blobs_twice_gives_equal_results(quality, tmp_path, monkeypatch):
    # A tiny budget: 30 epochs, snapshots of the last 5.
    task = quality.TASKS["blobs"]
    monkeypatch.setitem(quality.TASKS, "blobs", type(task)(**{**task.__dict__, "quick_epochs": 30}))
    first = quality.run_seed("blobs", 3, True, str(tmp_path / "first"))
    second = quality.run_seed("blobs", 3, True, str(tmp_path / "second"))
    assert first["problems"] == [] and second["problems"] == []
    assert first["epochs"] == 30 and len(first["single"]["test"]) == 5
    assert without_timings(first) == without_timings(second)
    assert first["uncertainty"]["examples"] == 1000
