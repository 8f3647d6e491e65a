"""Cold reads for disk benchmarks: evicting exactly the files about to be read from the
page cache (or, only when asked, the whole host's page cache), and the reference read of
what a disk delivers (``O_DIRECT`` requests in flight, cf. fio).

Benchmarks compare every read against a baseline read in the same run; both must be cold
in the same way, and nothing here touches files that are not the benchmark's own unless
the caller asked for the host-wide drop.
"""

from __future__ import annotations

import mmap
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvcache.kvstore.errors import ConfigError

COLD_CACHE_METHODS = ("fadvise", "drop_caches")


def files_under(path: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def fsync_paths(paths: list[Path]) -> None:
    """fsync files or directories (a directory's fsync commits its unlinks)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dirs_under(path: Path) -> list[Path]:
    return [Path(d) for d, _, _ in os.walk(path)]


class CacheDropper:
    """Makes the next read of some files cold, by one of ``COLD_CACHE_METHODS``:

    - ``"fadvise"`` (the default): fsync each file (dirty pages cannot be dropped), then
      ``posix_fadvise(POSIX_FADV_DONTNEED)`` on it. Only the benchmark's own files leave
      the page cache; nothing else on the machine notices.
    - ``"drop_caches"``: ``sync`` and ``echo 1 > /proc/sys/vm/drop_caches``, which empties
      the page cache of the whole host (every process's files, not only ours). Root only;
      only when asked for explicitly.
    """

    DROP_CACHES = Path("/proc/sys/vm/drop_caches")

    def __init__(self, method: str = "fadvise") -> None:
        if method not in COLD_CACHE_METHODS:
            raise ConfigError(
                f"unknown cold-cache method {method!r}; use one of {', '.join(COLD_CACHE_METHODS)}"
            )
        if method == "drop_caches" and not os.access(self.DROP_CACHES, os.W_OK):
            raise ConfigError(
                f"dropping the host's page cache needs write access to {self.DROP_CACHES} "
                "(root); run as root or leave it out (the default evicts only the "
                "benchmark's own files)"
            )
        self.method = method

    @property
    def description(self) -> str:
        if self.method == "drop_caches":
            return ("sync + `echo 1 > /proc/sys/vm/drop_caches` before each cold pass: the "
                    "page cache of the whole host was dropped (asked for explicitly)")
        return ("fsync + posix_fadvise(POSIX_FADV_DONTNEED) on exactly the files about to be "
                "read (nothing else leaves the page cache); the tier is closed first so "
                "LMDB's mapping does not pin pages")

    def drop(self, paths: list[Path]) -> None:
        if self.method == "drop_caches":
            os.sync()  # dirty pages are not dropped
            self.DROP_CACHES.write_text("1\n")
            return
        for p in paths:
            evict(p)


def evict(path: Path | str) -> None:
    """fsync the file at ``path`` (dirty pages cannot be dropped), then drop it from the
    page cache; no root needed, and nothing else is touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# The "what the disk gives" read: O_DIRECT requests of this size, this many in flight.
DIRECT_REQUEST = 2 << 20
DIRECT_IN_FLIGHT = 8


def direct_reader(path: Path) -> Callable[[], None] | None:
    """A read of the whole file at ``path`` with ``O_DIRECT`` requests in flight together,
    into reused memory: about what the disk can deliver (cf. fio). None when the file
    system refuses ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return None
    # One aligned slot per request in flight, faulted in once (mmap is page-aligned).
    slots = mmap.mmap(-1, DIRECT_REQUEST * DIRECT_IN_FLIGHT,
                      flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    slots.write(b"\0" * len(slots))
    views = [memoryview(slots)[i * DIRECT_REQUEST : (i + 1) * DIRECT_REQUEST]
             for i in range(DIRECT_IN_FLIGHT)]
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    for v in views:
        free.put(v)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        size = os.fstat(fd).st_size

        def one(offset: int) -> None:
            slot = free.get()
            try:
                os.preadv(fd, [slot], offset)
            finally:
                free.put(slot)

        try:
            with ThreadPoolExecutor(DIRECT_IN_FLIGHT) as pool:
                list(pool.map(one, range(0, size, DIRECT_REQUEST)))
        finally:
            os.close(fd)

    return read
