"""Blob file I/O for the disk tier: whole-file writes from buffer parts, whole-file reads.

A lone read of a large blob that is not in the page cache bypasses it: ``O_DIRECT``
reads of 1-4 MiB pieces, up to ``_READERS`` in flight at once, straight into the object's
buffer, hashed in order as they land. A buffered stream keeps about one request in flight
and copies every byte a second time through the page cache; and the disk tier sits under
a CPU tier that keeps what was read, so caching it again in the page cache would only
push other pages out. A blob that is mostly cached -- just written, or read by another
process -- is read through the page cache, and so is a small blob, a read that overlaps
other reads (``get_many``: see ``_read``), or any blob on a file system that refuses
``O_DIRECT``. Both paths verify the same checksum over every byte.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kvcache.kvstore.container import (
    BUFFER_ALIGN,
    ContainerDigest,
    ObjectHeader,
    StoredObject,
    decode_object,
    object_buffer,
    read_header_unverified,
    read_object,
)
from kvcache.kvstore.errors import CorruptObjectError

# Blobs smaller than this are read through the page cache: a few requests either way, and
# the cache probe and second open cost warm reads more than O_DIRECT saved cold ones.
_DIRECT_MIN = 4 << 20
# One O_DIRECT request: a blob is split into about _READERS of them, 1-4 MiB each.
_PIECE_MIN, _PIECE_MAX = 1 << 20, 4 << 20
_READERS = 8  # O_DIRECT requests in flight, shared by every concurrent read

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_no_direct: set[int] = set()  # st_dev of file systems that refused O_DIRECT
_reading = 0  # blob reads in progress in this process
_reading_lock = threading.Lock()


def _after_fork() -> None:
    """A forked child has none of the parent's threads: no pool, no reads in progress, and
    locks that a parent's thread may have held at the fork."""
    global _pool, _pool_lock, _reading, _reading_lock
    _pool, _pool_lock = None, threading.Lock()
    _reading, _reading_lock = 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _reader_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_READERS, thread_name_prefix="kvcache-blob-read")
        return _pool


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


def publish_blob_file(final: Path, parts: list[bytes | memoryview], sync: bool) -> None:
    """Write ``parts`` to ``final`` so that a file under that name is always whole: under
    a temporary name first, then renamed (with ``sync``, the rename made durable too). A
    crash mid-write leaves only a ``*.tmp`` that nothing references; on an error neither
    name is left behind and the error is raised."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        write_blob_file(str(tmp), parts, sync)
        os.replace(tmp, final)
        if sync:
            dfd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise


def read_blob_header(path: str) -> ObjectHeader:
    """The header of the container in the file at ``path``, read without the payload (no
    checksum: that needs every byte). ``CorruptObjectError`` when it is not one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_header_unverified(lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def read_blob_file(path: str) -> StoredObject:
    """Read, verify and decode the container stored in the file at ``path``.

    Raises ``CorruptObjectError`` when the file is short or its bytes do not verify,
    ``FileNotFoundError`` when it is gone.
    """
    global _reading
    with _reading_lock:
        _reading += 1
        alone = _reading == 1
    try:
        return _read(path, alone)
    finally:
        with _reading_lock:
            _reading -= 1


def _read(path: str, alone: bool) -> StoredObject:
    """``alone``: no other blob read of this process was in progress when this one began.

    Only a lone read takes the O_DIRECT path and huge pages. Reads that overlap (a
    ``get_many`` batch) already keep the disk busy together, and there the plain path was
    the faster one on a 2-vCPU VM (a 32 MiB x 32 batch: 0.9-1.0 GB/s against 0.4-0.8
    with O_DIRECT or huge pages, whose fresh memory for a whole batch held at once costs
    more than it saves), while a lone read got 2x faster with them.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if (
            alone
            and size >= _DIRECT_MIN
            and st.st_dev not in _no_direct
            and hasattr(os, "O_DIRECT")
            and not _mostly_cached(fd, size)
        ):
            obj = _read_direct(path, size, st.st_dev)
            if obj is not None:
                return obj
        # The kernel reads ahead more aggressively for a file declared sequential.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return read_object(lambda view: os.readv(fd, [view]), size, huge_pages=alone)
    finally:
        os.close(fd)


def _read_direct(path: str, size: int, dev: int) -> StoredObject | None:
    """The blob read with ``O_DIRECT`` requests in flight together, each piece hashed in
    order as it lands; None when this file system refuses ``O_DIRECT`` (read it buffered)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _no_direct.add(dev)
        return None
    buf = object_buffer(size)  # block-aligned and a whole number of blocks long
    digest = ContainerDigest(buf, size)
    pool = _reader_pool()

    def read_piece(start: int, end: int) -> int:
        got = start
        while got < end:
            n = os.preadv(fd, [buf[got:end]], got)
            if n == 0:  # end of file
                break
            got += n
            if got % BUFFER_ALIGN:  # a short read ends at the end of the file
                break
        return got

    step = min(_PIECE_MAX, max(_PIECE_MIN, -(-len(buf) // _READERS // _PIECE_MIN) * _PIECE_MIN))
    spans = [(o, min(len(buf), o + step)) for o in range(0, len(buf), step)]
    pieces: list[Future[int]] = [pool.submit(read_piece, a, b) for a, b in spans]
    try:
        for (_, end), piece in zip(spans, pieces, strict=True):
            got = piece.result()
            if got < min(end, size):
                raise CorruptObjectError(f"object truncated: {got} of {size} bytes")
            digest.advance(min(got, size))
        return decode_object(buf[:size], digest=digest.hexdigest())
    except OSError as e:
        if e.errno != errno.EINVAL:  # alignment this file system will not take
            raise
        _no_direct.add(dev)
        return None
    finally:
        for piece in pieces:  # the pieces read into buf through fd: both outlive them
            piece.cancel()
        for piece in pieces:
            if not piece.cancelled():
                piece.exception()  # waits; its error, if any, was raised above
        os.close(fd)


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


# cachestat(2) (Linux 6.5) has this number on every architecture listed; elsewhere, and
# on older kernels, mincore(2) on a mapping of the file answers (slower: ~1.5 ms for
# 32 MiB on a 2-vCPU VM, against 4 us).
_CACHESTAT_NR = 451 if platform.machine() in (
    "x86_64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x") else None
_libc: ctypes.CDLL | None = None


def _mostly_cached(fd: int, size: int) -> bool:
    """Whether at least half of the file's ``size`` bytes are in the page cache (no I/O).
    False when that cannot be told: the read then bypasses the cache."""
    global _libc, _CACHESTAT_NR
    if sys.platform != "linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    pages = -(-size // mmap.PAGESIZE)
    if _CACHESTAT_NR is not None:
        rng, stat = _CacheStatRange(0, 0), _CacheStat()  # len 0: to the end of the file
        if _libc.syscall(_CACHESTAT_NR, fd, ctypes.byref(rng), ctypes.byref(stat), 0) == 0:
            return 2 * stat.nr_cache >= pages
        if ctypes.get_errno() != errno.ENOSYS:
            return False
        _CACHESTAT_NR = None  # an older kernel: do not ask again
    try:
        m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # writable: ctypes wants that
    except (OSError, ValueError):
        return False
    try:
        vec = ctypes.create_string_buffer(pages)
        anchor = ctypes.c_char.from_buffer(m)
        try:
            rc = _libc.mincore(ctypes.addressof(anchor), size, vec)
        finally:
            del anchor  # the mapping cannot close while ctypes holds it
        return rc == 0 and 2 * (pages - vec.raw.count(0)) >= pages
    finally:
        m.close()
