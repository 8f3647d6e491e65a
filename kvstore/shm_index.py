"""A lock-free index of the daemon's shared CPU pool, so same-node reads need no round trip.

The daemon (one writer) keeps, in a memfd next to its pool, an open-addressing table:
key → where the object's bytes and its descriptor (header and tensor table, msgpack) lie
in the pool. Clients map it read-only and read it like a seqlock: a slot's ``seq`` is odd
while the daemon changes it and grows by two with each change, and the daemon withdraws
an entry from the table *before* its bytes can be freed and reused. So a reader that
notes ``seq``, copies the object and finds ``seq`` unchanged copied bytes that were not
reused meanwhile; otherwise it asks the daemon (the loan protocol of
``tools/server/fast_path.py``), which is also what a key missing from the table costs.

That reasoning needs stores to become visible in program order and loads not to pass
earlier loads, which x86-64 guarantees (TSO) and Python cannot ask for elsewhere: other
machines use loans only (``lock_free_reads_supported``). The table is an accelerator, not
a source of truth: an entry it has no room for is simply not published. A row after the
last slot counts those entries, so that a reader of a daemon whose pool is all it holds
can take a key missing from a table that lacks nothing as a miss, without asking.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
from typing import Any

import msgpack
import numpy as np

SLOT = np.dtype([
    ("seq", "<u8"),
    ("key", "S16"),       # the key's 16 bytes; empty: never used; _GONE: withdrawn
    ("offset", "<u8"),    # the object's tensors in the pool
    ("size", "<u8"),
    ("desc_offset", "<u8"),
    ("desc_size", "<u8"),
    ("pad", "<u8"),
])
assert SLOT.itemsize == 64
_GONE = b"\xff" * 16
_EMPTY = b"\0" * 16
_ROW = struct.Struct("<Q16sQQQQQ")
_SEQ = struct.Struct("<Q")
_MIN_SLOTS = 4096
PROBES = 64  # slots looked at from a key's home: runs are short in a half-empty table
_TYPICAL_OBJECT = 64 << 10  # the table has two slots per object of this size in the pool


def describe(header_json: dict[str, Any], slots: list[list[Any]]) -> bytes:
    """An object's descriptor as stored beside it: its header and where each of its
    tensors lies relative to the object (``[name, dtype, shape, offset, nbytes]``)."""
    return msgpack.packb({"header": header_json, "slots": slots}, use_bin_type=True)


def lock_free_reads_supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def slots_for(pool_bytes: int) -> int:
    """Table size for a pool: a power of two, two slots per typical object."""
    want = max(_MIN_SLOTS, 2 * pool_bytes // _TYPICAL_OBJECT)
    return 1 << (want - 1).bit_length()


class SharedIndex:
    """The table over a memfd: ``create`` (the daemon, writable) or ``attach`` (a client,
    read-only). The writer must be one thread at a time (the CPU tier's lock)."""

    def __init__(self, fd: int, slots: int, *, writable: bool) -> None:
        self.fd, self.slots = fd, slots
        # The slots, then a row whose first 8 bytes count the entries left unpublished
        # (absent in a table made by an older daemon).
        rows = slots + 1 if os.fstat(fd).st_size >= (slots + 1) * SLOT.itemsize else slots
        self.counts_unpublished = rows > slots
        self._map = mmap.mmap(fd, rows * SLOT.itemsize,
                              prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        self.table = np.ndarray((slots,), dtype=SLOT, buffer=self._map)
        self._mask = slots - 1

    @classmethod
    def create(cls, slots: int) -> SharedIndex:
        if slots & (slots - 1):
            raise ValueError("the table size must be a power of two")
        fd = os.memfd_create("kvcache-cpu-index", os.MFD_CLOEXEC)
        os.ftruncate(fd, (slots + 1) * SLOT.itemsize)  # zero-filled: every slot empty, seq 0
        return cls(fd, slots, writable=True)

    @classmethod
    def attach(cls, fd: int, slots: int) -> SharedIndex:
        return cls(fd, slots, writable=False)

    def _home(self, raw: bytes) -> int:
        return int.from_bytes(raw[:8], "little") & self._mask

    def _find_slot(self, raw: bytes, *, for_insert: bool) -> int | None:
        """The slot holding ``raw``; with ``for_insert``, else the first free one met. Both
        within ``PROBES`` of its home slot, where readers look: a key with no room there
        is not published (withdrawn slots are reused, so the table never clogs)."""
        free = None
        i = self._home(raw)
        for _ in range(min(self.slots, PROBES)):
            k = _ROW.unpack_from(self._map, i * SLOT.itemsize)[1]
            if k == raw:
                return i
            if k == _EMPTY:
                return free if free is not None else (i if for_insert else None)
            if k == _GONE and free is None and for_insert:
                free = i
            i = (i + 1) & self._mask
        return free

    # -- the writer ------------------------------------------------------------------------
    def _write(self, i: int, fields: dict[str, Any]) -> None:
        row = self.table[i : i + 1]
        row["seq"] += 1  # odd: readers of this slot retry or give up
        for name, value in fields.items():
            row[name] = value
        row["seq"] += 1

    def publish(self, key: str, offset: int, size: int, desc_offset: int,
                desc_size: int) -> bool:
        """Make ``key`` readable at these places; False if the table has no room."""
        raw = bytes.fromhex(key)
        i = self._find_slot(raw, for_insert=True)
        if i is None:
            return False
        self._write(i, {"key": raw, "offset": offset, "size": size,
                        "desc_offset": desc_offset, "desc_size": desc_size})
        return True

    def withdraw(self, key: str) -> None:
        """``key`` is no longer readable here (call before its bytes may be reused)."""
        raw = bytes.fromhex(key)
        i = self._find_slot(raw, for_insert=False)
        if i is not None and _ROW.unpack_from(self._map, i * SLOT.itemsize)[1] == raw:
            self._write(i, {"key": _GONE, "offset": 0, "size": 0, "desc_offset": 0,
                            "desc_size": 0})

    def set_unpublished(self, n: int) -> None:
        """How many entries of the pool the table lacks (``publish`` found no room)."""
        _SEQ.pack_into(self._map, self.slots * SLOT.itemsize, n)

    # -- readers ---------------------------------------------------------------------------
    def unpublished(self) -> int | None:
        """How many entries of the pool the table lacks; None: not counted."""
        if not self.counts_unpublished:
            return None
        return int(_SEQ.unpack_from(self._map, self.slots * SLOT.itemsize)[0])

    def find(self, key: str) -> tuple[int, int, int, int, int, int] | None:
        """(slot, seq, offset, size, desc_offset, desc_size) of ``key`` as the table holds
        it now, or None; ``still(slot, seq)`` after copying says whether it held."""
        raw = bytes.fromhex(key)
        i = self._home(raw)
        for _ in range(min(self.slots, PROBES)):
            # One unpack per slot (numpy field access costs ~10x more on this hot path).
            seq, k, offset, size, desc_offset, desc_size, _ = _ROW.unpack_from(
                self._map, i * SLOT.itemsize)
            if seq & 1:
                return None  # being changed right now: ask the daemon instead
            if k == _EMPTY:
                return None
            if k == raw:
                found = (i, seq, offset, size, desc_offset, desc_size)
                return found if self.still(i, seq) else None
            i = (i + 1) & self._mask
        return None

    def still(self, slot: int, seq: int) -> bool:
        return bool(_SEQ.unpack_from(self._map, slot * SLOT.itemsize)[0] == seq)

    def close(self) -> None:
        self.table = np.empty(0, dtype=SLOT)
        os.close(self.fd)
