"""Blob file I/O for the disk tier: whole-file writes from buffer parts, whole-file reads."""

from __future__ import annotations

import os


def write_blob_file(path: str, parts: list[bytes | memoryview], sync: bool) -> None:
    """Write ``parts`` in order to a new file at ``path`` (the one place blob bytes reach
    the disk). Parts are written where they lie: no joined copy of a 32 MiB chunk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_blob_file(path: str) -> bytearray:
    """The whole file in a buffer we own (decoded tensors view it, writable)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        got, view = 0, memoryview(buf)
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return buf if got == len(buf) else buf[:got]
