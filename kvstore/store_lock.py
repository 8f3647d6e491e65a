"""``StoreLock``: who has a disk tier's directory open.

Every opener holds ``<dir>/kvcache.lock`` with ``flock``: shared for ordinary use (any
number of processes serve from one store at once), exclusive for work that needs the store
to itself (``kvcache fsck --repair``). Taking it never waits: a conflicting holder is an
error that says who to stop. LMDB also forbids opening one environment twice in a process,
so a second open in the same process is refused here, before LMDB could misbehave.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from pathlib import Path

from kvcache.kvstore.errors import StoreUnavailableError
from kvcache.kvstore.index_format import LOCK_FILE

_open_paths: set[str] = set()
_open_paths_lock = threading.Lock()


def unavailable(path: Path, e: OSError) -> StoreUnavailableError:
    """The error for a store that cannot be opened because of ``e``, saying what to do."""
    if e.errno == errno.EROFS:
        hint = ("the file system is read-only: open the store read-only (store.readonly = "
                "true, KVCACHE_READONLY=1 or --readonly), or use a writable disk")
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied: fix the directory's permissions (read-only opens need read)"
    elif e.errno == errno.ENOENT:
        hint = "no kvcache store there: check the path, or open it writable to create one"
    else:
        hint = str(e)
    return StoreUnavailableError(f"cannot open the kvcache store at {path}: {hint}")


class StoreLock:
    """The lock on directory ``path`` (created when ``create``), held until ``release``."""

    def __init__(self, path: Path, *, create: bool, readonly: bool, exclusive: bool) -> None:
        if not path.is_dir():
            if path.exists():
                raise StoreUnavailableError(f"{path} is not a directory; pick another path")
            if not create:
                raise StoreUnavailableError(
                    f"no kvcache store at {path}: the directory does not exist; check "
                    "the path, or open it writable (not read-only) to create one"
                )
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise unavailable(path, e) from e
        self._real = os.path.realpath(path)
        with _open_paths_lock:
            if self._real in _open_paths:
                raise StoreUnavailableError(
                    f"the kvcache store at {path} is already open in this process; "
                    "share that DiskTier instead of opening it twice"
                )
            flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
            try:
                fd = os.open(path / LOCK_FILE, flags, 0o644)
            except OSError as e:
                raise unavailable(path, e) from e
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                held = "in use" if exclusive else "held exclusively (e.g. by `kvcache fsck`)"
                raise StoreUnavailableError(
                    f"the kvcache store at {path} is locked by another process ({held}); "
                    "stop that process or retry when it is done"
                ) from None
            _open_paths.add(self._real)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
            with _open_paths_lock:
                _open_paths.discard(self._real)
