"""A binary file written by a second thread, so that writing overlaps computing.

The streaming writers (safetensors) hand each chunk the engine computes to a
:class:`BackgroundWriter`. It copies the chunk into one of a few reused buffers of
``BUFFER_BYTES`` and returns; a thread writes the full buffers to the file in order.
The engine's numpy work and the thread's ``write`` calls both release the GIL, so on
two cores the output is written while the next chunks are computed.

How the thread sends the bytes to the disk, what that gained, and its memory:
:class:`BackgroundWriter`.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from types import TracebackType

import numpy as np

__all__ = ["BUFFERS", "BUFFER_BYTES", "SYNC_BYTES", "BackgroundWriter"]

# 1 MiB pieces stay in the CPU caches while they are copied and written (several-MiB
# writes were often slower here, see bench/average.py's floor); a multiple of every
# block size O_DIRECT may require.
BUFFER_BYTES = 1 << 20
BUFFERS = 16
SYNC_BYTES = 16 << 20

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_sync = getattr(os, "fdatasync", os.fsync)


def _set_direct(descriptor: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on or off for an open file; False where it is refused."""
    import fcntl

    flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    try:
        fcntl.fcntl(descriptor, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError as error:
        if error.errno == errno.EINVAL:
            return False
        raise
    return True


class BackgroundWriter:
    """Write a new binary file from a second thread; use it like a file opened ``"wb"``.

    Every output is fsynced before it is renamed into place
    (:func:`polyak.files.atomic_output`), so its bytes go to the disk in any case; the
    thread sends them there as it goes rather than leaving it all to that last fsync:

    - On Linux the full buffers are written with ``O_DIRECT``, straight from the reused
      buffers to the disk: the output's pages never enter the page cache, so no fresh
      memory is taken for them (on these virtual machines a fresh page costs far more
      than the copy into it). The buffers are page-aligned and every full buffer starts
      at a multiple of ``BUFFER_BYTES``, as ``O_DIRECT`` requires; the last, partial
      buffer is written through the page cache. A file system that refuses ``O_DIRECT``
      (``EINVAL``: tmpfs on older kernels, some network file systems) gets the buffered
      way below, for the whole file.
    - Elsewhere, buffered writes and ``fdatasync`` every ``SYNC_BYTES``, which starts the
      disk's work early, in parallel with the computing.

    Measured on 10 x 500 MB safetensors on a 2-core virtual machine (bench/average.py
    inputs, output removed and ``sync`` before each run, runs interleaved): writing from
    the engine's thread with one fsync at the end, 1.13 s at best; the thread with
    buffered writes, 1.10 s; the thread with ``O_DIRECT``, 0.89 s (the I/O floor: 0.55 s).

    Memory: at most ``BUFFERS`` buffers (16 MiB), made as needed and reused, whatever the
    file's size. A write that fails (a full disk) stops the thread and is raised, as the
    same ``OSError``, by the next :meth:`BackgroundWriter.write` or by
    :meth:`BackgroundWriter.close`.

    Args:
        path: the file to create (or truncate).
        direct: write full buffers with ``O_DIRECT`` where the platform and the file
            system allow it (above).
        sync: without ``O_DIRECT``, ``fdatasync`` every ``SYNC_BYTES`` (above); False
            for a scratch file that is read back and deleted, whose bytes need never
            reach the disk.

    Example:
        >>> with BackgroundWriter(Path("out.bin")) as file:  # doctest: +SKIP
        ...     file.write(header)
        ...     for chunk in chunks:
        ...         file.write(chunk)  # copied at once: the chunk may be reused
    """

    def __init__(self, path: Path, *, direct: bool = True, sync: bool = True) -> None:
        self.path = Path(path)
        self.sync = sync
        self.name = str(self.path)
        self._file = open(self.path, "wb", buffering=0)
        try:
            self.direct = bool(direct and _O_DIRECT) and _set_direct(self._file.fileno(), True)
        except BaseException:
            self._file.close()
            raise
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[np.ndarray, int] | None] = queue.SimpleQueue()
        self._made = 0
        self._buffer: np.ndarray | None = None
        self._filled = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._drain, name="polyak-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, data: object) -> int:
        """Copy ``data`` (bytes or any contiguous buffer) to be written; return its size."""
        self._raise_failure()
        source = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        source = source.reshape(-1).view(np.uint8)
        size = source.size
        start = 0
        while start < size:
            if self._buffer is None:
                self._buffer = self._take_buffer()
            count = min(BUFFER_BYTES - self._filled, size - start)
            self._buffer[self._filled : self._filled + count] = source[start : start + count]
            self._filled += count
            start += count
            if self._filled == BUFFER_BYTES:
                self._hand_over()
        return size

    def close(self) -> None:
        """Write what is left, wait for the thread, close the file; raise a write's error."""
        try:
            if self._buffer is not None and self._filled:
                self._hand_over()
            self._full.put(None)
            self._thread.join()
            self._raise_failure()
        finally:
            self._file.close()

    def abort(self) -> None:
        """Stop without writing what is left (the caller is failing); close the file."""
        self._stopping = True
        self._full.put(None)
        self._thread.join()
        self._file.close()

    def _take_buffer(self) -> np.ndarray:
        if self._made < BUFFERS:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                self._made += 1
                # Anonymous maps are page-aligned, as O_DIRECT needs.
                return np.frombuffer(mmap.mmap(-1, BUFFER_BYTES), np.uint8)
        buffer = self._free.get()
        self._raise_failure()
        return buffer

    def _hand_over(self) -> None:
        assert self._buffer is not None
        self._full.put((self._buffer, self._filled))
        self._buffer = None
        self._filled = 0

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_all(self, data: memoryview) -> None:
        while data:
            data = data[self._file.write(data) :]

    def _write_buffer(self, buffer: np.ndarray, filled: int) -> None:
        data = memoryview(buffer)[:filled]
        if self.direct and filled < BUFFER_BYTES:
            # The last piece: its length is not a multiple of the block size.
            _set_direct(self._file.fileno(), False)
            self.direct = False
        if self.direct:
            try:
                self._write_all(data)
                return
            except OSError as error:
                if error.errno != errno.EINVAL or self._file.tell() != 0:
                    raise
                # Accepted at open but refused on writing: buffered, from the start.
                _set_direct(self._file.fileno(), False)
                self.direct = False
        self._write_all(data)

    def _drain(self) -> None:
        """The thread: write full buffers in order, sync as it goes, give the buffers back."""
        unsynced = 0
        while (item := self._full.get()) is not None:
            buffer, filled = item
            try:
                if self._error is None and not self._stopping:
                    self._write_buffer(buffer, filled)
                    unsynced += filled
                    if self.sync and not self.direct and unsynced >= SYNC_BYTES:
                        _sync(self._file.fileno())
                        unsynced = 0
            except BaseException as error:  # raised in the caller's thread
                self._error = error
            finally:
                self._free.put(buffer)
