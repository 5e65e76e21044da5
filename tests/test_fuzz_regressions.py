"""Replay the fuzz targets' seeds and every input the atheris fuzzer found breaking them.

``tests/fuzz_regressions/TARGET/`` holds what ``make fuzz`` saved (the inputs whose bug
is now fixed); each must now return or end in a clean refusal, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz_targets import TARGETS, seeds

pytest.importorskip("torch")
pytest.importorskip("keras")

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
FOUND = sorted(
    path
    for path in REGRESSIONS.glob("*/*")
    if path.is_file() and path.parent.name in TARGETS and not path.name.startswith(".")
)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_seeds_of_each_target_are_read_cleanly(target):
    for seed in seeds(target):
        TARGETS[target](seed)


@pytest.mark.parametrize("path", FOUND, ids=[f"{p.parent.name}/{p.name}" for p in FOUND])
def test_an_input_the_fuzzer_found_is_now_refused_cleanly(path):
    TARGETS[path.parent.name](path.read_bytes())
