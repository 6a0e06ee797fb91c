"""Numbers that the worker processes of one server write and read alike.

A gunicorn master forks its workers; memory mapped ``MAP_SHARED | MAP_ANONYMOUS`` before
the fork is the same memory in each of them afterwards (no file, no lock, no server).
What flask-obo keeps there are a few floats per dependency (``EntraPace``, ``Health``),
read and written without a lock: a worker killed while holding one would stop every
other, and each cell is one aligned 8-byte store, so a reader never sees half a number.
"""

from __future__ import annotations

import mmap


def doubles(count: int, *, shared: bool) -> memoryview[float]:
    """``count`` floats, all 0.0: this process's own, or (``shared``) the same memory in
    every process this one forks afterwards."""
    buffer: bytearray | mmap.mmap = mmap.mmap(-1, 8 * count) if shared else bytearray(8 * count)
    return memoryview(buffer).cast("d")
