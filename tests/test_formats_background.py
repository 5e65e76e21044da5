"""BackgroundWriter: the bytes written in order, errors raised in the caller, bounded buffers."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from polyak.formats import background
from polyak.formats.background import BUFFER_BYTES, BUFFERS, BackgroundWriter


def writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "polyak-writer"]


def pieces(seed: int) -> list[object]:
    """Writes of every kind and size: empty, tiny, across buffers, exact buffer multiples."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 7, BUFFER_BYTES - 8, 8, BUFFER_BYTES, 3 * BUFFER_BYTES + 5, 4096, 0, 12345]
    out: list[object] = []
    for number, size in enumerate(sizes):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        kind = number % 3
        if kind == 0:
            out.append(data.tobytes())
        elif kind == 1:
            out.append(data.view(np.uint8).data)  # a memoryview, as the writers pass
        else:
            out.append(data)
    out.append(np.arange(10, dtype=np.float32))  # any dtype: written as its bytes
    out.append(np.float64(2.5))  # a 0-d array
    return out


def expected_bytes(items: list[object]) -> bytes:
    return b"".join(
        np.asarray(item).tobytes() if isinstance(item, np.ndarray | np.generic) else bytes(item)
        for item in items
    )


@pytest.mark.parametrize("direct", [True, False])
def test_writes_every_byte_in_order(tmp_path: Path, direct: bool) -> None:
    items = pieces(0)
    path = tmp_path / "out.bin"
    with BackgroundWriter(path, direct=direct) as file:
        written = [
            file.write(np.asarray(item) if isinstance(item, np.generic) else item) for item in items
        ]
    expected = expected_bytes(items)
    assert sum(written) == len(expected)
    assert path.read_bytes() == expected


@pytest.mark.parametrize("size", [0, 5, BUFFER_BYTES, 2 * BUFFER_BYTES, 2 * BUFFER_BYTES + 1])
def test_sizes_at_the_buffer_edges(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "out.bin"
    with BackgroundWriter(path) as file:
        file.write(data)
    assert path.read_bytes() == data.tobytes()


def test_the_caller_may_reuse_its_buffer_at_once(tmp_path: Path) -> None:
    """Each write is copied: the engine overwrites its chunk right after handing it over."""
    chunk = np.empty(300_000, np.uint8)
    path = tmp_path / "out.bin"
    with BackgroundWriter(path) as file:
        for value in range(40):
            chunk.fill(value)
            file.write(chunk)
    data = np.fromfile(path, np.uint8).reshape(40, -1)
    assert (data == np.arange(40, dtype=np.uint8)[:, None]).all()


def test_buffers_are_bounded_and_reused(tmp_path: Path) -> None:
    piece = np.ones(BUFFER_BYTES // 2, np.uint8)
    with BackgroundWriter(tmp_path / "out.bin") as file:
        for _ in range(6 * BUFFERS):
            file.write(piece)
        made = file._made
    assert 1 <= made <= BUFFERS
    assert (tmp_path / "out.bin").stat().st_size == 3 * BUFFERS * BUFFER_BYTES


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_write_is_raised_in_the_callers_thread(
    tmp_path: Path, direct: bool, file_size_limit
) -> None:
    piece = np.ones(BUFFER_BYTES, np.uint8)
    with file_size_limit(3 * BUFFER_BYTES), pytest.raises(OSError) as raised:
        with BackgroundWriter(tmp_path / "out.bin", direct=direct) as file:
            for _ in range(10 * BUFFERS):  # blocks on the buffers until the error comes
                file.write(piece)
    assert raised.value.errno == errno.EFBIG
    assert not writer_threads()  # the writer's thread has ended


def test_a_failing_caller_stops_the_thread_and_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    with pytest.raises(KeyError), BackgroundWriter(path) as file:
        file.write(b"header")
        raise KeyError("the engine failed")
    assert not writer_threads()
    with pytest.raises(ValueError, match="closed file"):
        os.fstat(file._file.fileno())


def test_refused_direct_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    """A file system that takes O_DIRECT at open but refuses the write gets buffered writes."""
    real = BackgroundWriter._write_all
    refused = []

    def write_all(self: BackgroundWriter, data: memoryview) -> None:
        if self.direct:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        real(self, data)

    monkeypatch.setattr(BackgroundWriter, "_write_all", write_all)
    monkeypatch.setattr(background, "_set_direct", lambda descriptor, on: True)
    data = np.arange(3 * BUFFER_BYTES // 4, dtype=np.int32)
    path = tmp_path / "out.bin"
    with BackgroundWriter(path) as file:
        assert file.direct
        file.write(data)
    assert refused == [BUFFER_BYTES]
    assert path.read_bytes() == data.tobytes()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")
def test_direct_writes_end_with_a_buffered_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    data = np.random.default_rng(1).integers(0, 256, 2 * BUFFER_BYTES + 3, dtype=np.uint8)
    file = BackgroundWriter(path)
    if not file.direct:
        file.close()
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    file.write(data)
    file.close()
    assert not file.direct  # switched off for the last, partial buffer
    assert path.read_bytes() == data.tobytes()


@pytest.mark.parametrize("sync", [True, False])
def test_a_scratch_file_is_not_synced_as_it_goes(tmp_path: Path, monkeypatch, sync) -> None:
    calls = []
    monkeypatch.setattr(background, "_sync", lambda descriptor: calls.append(descriptor))
    monkeypatch.setattr(background, "SYNC_BYTES", 2 * BUFFER_BYTES)
    data = np.random.default_rng(3).integers(0, 256, 5 * BUFFER_BYTES, dtype=np.uint8)
    with BackgroundWriter(tmp_path / "out.bin", direct=False, sync=sync) as file:
        file.write(data)
    assert (tmp_path / "out.bin").read_bytes() == data.tobytes()
    assert (len(calls) == 2) if sync else (calls == [])
