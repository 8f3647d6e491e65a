"""Blob file I/O for the disk tier: whole-file writes from buffer parts, whole-file reads."""

from __future__ import annotations

import os

from kvcache.kvstore.container import StoredObject, read_object


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


def read_blob_file(path: str) -> StoredObject:
    """Read, verify and decode the container stored in the file at ``path``."""
    with open(path, "rb", buffering=0) as f:
        # The kernel reads ahead more aggressively for a file declared sequential.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return read_object(f.readinto, os.fstat(f.fileno()).st_size)
