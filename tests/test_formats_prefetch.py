"""The prefetcher maps members' pages ahead of the engine, and never changes a result."""

from __future__ import annotations

import mmap
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import polyak
from polyak.formats import prefetch
from polyak.formats.prefetch import Prefetcher

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="MADV_POPULATE_READ is Linux's"
)


def mapped_file(path: Path, size: int) -> np.ndarray:
    """A file of ``size`` bytes, freshly mapped: none of its pages in this process yet."""
    path.write_bytes(np.arange(size // 8, dtype=np.int64).tobytes())
    with open(path, "rb") as file:
        return np.frombuffer(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


def resident_kb(array: np.ndarray) -> int:
    """How much of the mapping that holds ``array`` this process has mapped (smaps Rss)."""
    address = array.ctypes.data
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("the array's mapping is not in /proc/self/smaps")


def wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@linux_only
def test_the_pages_of_queued_arrays_are_mapped_by_the_thread(tmp_path):
    data = mapped_file(tmp_path / "member.bin", 8 << 20)
    assert resident_kb(data) == 0
    with Prefetcher() as prefetcher:
        assert prefetcher.active
        prefetcher.ahead(1, [data[: 4 << 20]])
        thread = prefetcher._thread
        assert wait_for(lambda: resident_kb(data) >= 4 << 10)
    assert thread is not None and not thread.is_alive()  # closing waited for it


@linux_only
def test_an_idle_thread_ends_and_the_next_request_starts_another(tmp_path, monkeypatch):
    # An average abandoned half-way never closes its prefetcher: it must hold no thread.
    monkeypatch.setattr(prefetch, "IDLE_SECONDS", 0.05)
    first = mapped_file(tmp_path / "first.bin", 1 << 20)
    second = mapped_file(tmp_path / "second.bin", 1 << 20)
    prefetcher = Prefetcher()
    prefetcher.ahead(1, [first])
    thread = prefetcher._thread
    assert wait_for(lambda: resident_kb(first) >= 1 << 10)
    assert wait_for(lambda: not thread.is_alive())
    prefetcher.ahead(2, [second])
    assert wait_for(lambda: resident_kb(second) >= 1 << 10)
    prefetcher.close()


@linux_only
def test_what_the_engine_has_passed_is_skipped(tmp_path):
    passed = mapped_file(tmp_path / "passed.bin", 4 << 20)
    later = mapped_file(tmp_path / "later.bin", 4 << 20)
    with Prefetcher() as prefetcher:
        prefetcher.reached(5)
        prefetcher.ahead(3, [passed])  # the engine is at 5: too late for 3
        prefetcher.ahead(6, [later])
        assert wait_for(lambda: resident_kb(later) >= 4 << 10)
        assert resident_kb(passed) == 0


@linux_only
def test_a_kernel_that_refuses_the_advice_stops_the_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "MADV_POPULATE_READ", 12345)  # no such advice: EINVAL
    data = mapped_file(tmp_path / "member.bin", 1 << 20)
    with Prefetcher() as prefetcher:
        prefetcher.ahead(1, [data])
        assert wait_for(lambda: not prefetcher.active)
        prefetcher.ahead(2, [data])  # ignored from now on
    assert resident_kb(data) == 0


def test_strided_and_empty_arrays_are_left_out():
    values = np.arange(100, dtype=np.float32)
    assert prefetch._span(values[::2]) is None
    assert prefetch._span(values[:0]) is None
    first, length = prefetch._span(values[10:20])
    assert first % mmap.PAGESIZE == 0
    assert first <= values[10:20].ctypes.data and values[20:].ctypes.data <= first + length


def write_members(directory: Path, count: int) -> None:
    rng = np.random.default_rng(5)
    for step in range(count):
        save_file(
            {"w": rng.normal(size=(700, 900)).astype(np.float32), "b": rng.normal(size=9)},
            str(directory / f"ck_{step}.safetensors"),
        )


def test_the_average_is_the_same_with_and_without_the_prefetcher(tmp_path, monkeypatch):
    write_members(tmp_path, 4)
    with_it = polyak.average(tmp_path, scheme="linear")
    monkeypatch.setattr(prefetch, "MADV_POPULATE_READ", 12345)  # the thread stops at once
    without = polyak.average(tmp_path, scheme="linear")
    for name, array in with_it.items():
        assert array.tobytes() == without[name].tobytes()
    # Each average closed its prefetcher; any other test's idle thread ends within a second.
    assert wait_for(lambda: not [t for t in threading.enumerate() if t.name == "polyak-prefetch"])
