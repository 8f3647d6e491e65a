"""Blob file I/O for the disk tier: whole-file writes from buffer parts, whole-file reads."""

from __future__ import annotations

import os

import torch


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


def read_blob_file(path: str) -> memoryview:
    """The whole file in a writable buffer we own (decoded tensors view it).

    The buffer is uninitialised memory: a zero-filled ``bytearray`` would add a full pass
    over 32 MiB in series with the read (measured: a quarter of a cold get's time).
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        # The kernel reads ahead more aggressively for a file declared sequential.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = memoryview(torch.empty(size, dtype=torch.uint8).numpy()).cast("B")
        got = 0
        while got < size:
            n = f.readinto(buf[got:])
            if not n:
                break
            got += n
    return buf[:got]
