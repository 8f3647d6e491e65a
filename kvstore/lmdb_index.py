"""``LmdbIndex``: the disk tier's LMDB environment — transactions, records and counters.

One environment, three databases: ``entries`` (key -> record), ``meta`` (format and the
lifetime counters) and ``blobs`` (key -> container bytes, for ``blob_storage="lmdb"``).
Records and counters are validated as they are read (``kvcache.kvstore.index_format``).

Errors: LMDB errors that mean the file is damaged (corrupted pages, pages not found, a bad
format) become ``StoreCorruptError`` after ``on_damage`` has been told why, so the tier can
stop trusting the index; a write that fails on a full disk — LMDB reports ENOSPC as an
``Input/output error`` from ``mdb_txn_commit`` — becomes ``DiskFullError``; a map that is
too small is grown and the write retried.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from kvcache.kvstore.errors import DiskFullError, StoreCorruptError, StoreUnavailableError
from kvcache.kvstore.index_format import (
    COUNTERS,
    FORMAT,
    BadRecordError,
    Record,
    decode_key,
    decode_record,
    pack,
    unpack,
    unpack_counter,
)

T = TypeVar("T")

MIN_FREE_DISK = 64 << 20  # below this a write is refused as a full disk
# LMDB errors that mean the file holds something LMDB cannot read; other LMDB errors
# (out of memory, too many readers, an I/O error) say nothing about the file's contents.
_DAMAGE = (
    lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
    lmdb.VersionMismatchError, lmdb.IncompatibleError, lmdb.BadValsizeError,
    lmdb.BadChecksumError, lmdb.ProblemError,
)


def lmdb_put(txn: lmdb.Transaction, key: bytes, value: bytes, db: Any) -> None:
    txn.put(key, value, db=db)


def free_disk_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_enospc(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left" in str(e) or "Disk quota" in str(e)


def disk_full_message(path: Path, why: str) -> str:
    return (
        f"disk full under {path} ({why}); free disk space or lower the disk tier's "
        "capacity_bytes"
    )


class LmdbIndex:
    """The open environment at ``path`` (a directory). Not thread-safe: the tier
    serialises calls under its lock. ``on_damage(why)`` records why the file cannot be
    trusted and returns the ``StoreCorruptError`` to raise."""

    def __init__(
        self,
        path: Path,
        *,
        map_size: int,
        readonly: bool,
        on_damage: Callable[[str], StoreCorruptError],
        lock: bool = True,
    ) -> None:
        self.path = path
        self.readonly = readonly
        self._on_damage = on_damage
        try:
            path.mkdir(exist_ok=True)
            # metasync=False: one fsync per commit instead of two; LMDB keeps the index
            # consistent and a system crash can at most undo the last commit.
            self.env = lmdb.open(
                str(path), map_size=map_size, max_dbs=4, readonly=readonly, sync=True,
                metasync=False, lock=lock,
            )
        except _DAMAGE as e:
            raise on_damage(f"LMDB cannot open it: {e}") from e
        except lmdb.Error as e:
            raise StoreUnavailableError(f"cannot open the index at {path}: {e}") from e
        try:
            with self.guard():
                self.entries = self.env.open_db(b"entries", create=not readonly)
                self.meta = self.env.open_db(b"meta", create=not readonly)
                self.blobs = self.env.open_db(b"blobs", create=not readonly)
            with self.read() as txn:
                try:
                    fmt = unpack(txn.get(b"format", db=self.meta))
                except BadRecordError as e:
                    raise on_damage(f"its format record is unreadable: {e}") from e
            if fmt is None and not readonly:
                with self.guard(), self.env.begin(write=True) as txn:
                    txn.put(b"format", pack(FORMAT), db=self.meta)
            elif fmt != FORMAT:
                raise StoreUnavailableError(
                    f"{path} holds {fmt!r}, not a {FORMAT} index; point the disk tier at "
                    "its own directory"
                )
        except lmdb.NotFoundError as e:  # a database missing from a read-only index
            self.env.close()
            raise on_damage(f"not a complete kvcache index ({e})") from e
        except BaseException:
            self.env.close()
            raise

    # -- transactions ------------------------------------------------------------------------
    @contextmanager
    def guard(self) -> Iterator[None]:
        """LMDB errors that mean a damaged file become ``StoreCorruptError``; the others
        ``StoreUnavailableError`` (map growth is the writer's business)."""
        try:
            yield
        except (lmdb.MapFullError, lmdb.MapResizedError):
            raise
        except _DAMAGE as e:
            raise self._on_damage(f"LMDB: {e}") from e
        except lmdb.Error as e:
            raise StoreUnavailableError(f"the index at {self.path} failed: {e}") from e

    def _begin(self, write: bool) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write, buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # another process grew the map: adopt its size
            return self.env.begin(write=write, buffers=True)

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (buffers die with it: copy what must outlive it)."""
        with self.guard(), self._begin(write=False) as txn:
            yield txn

    def write(self, fn: Callable[[lmdb.Transaction], T], grow_hint: int = 0) -> T:
        """Run ``fn`` in one write transaction; grow the map and retry when it is full.
        ``grow_hint``: bytes the transaction adds (for growing and for telling a full disk)."""
        for _ in range(8):
            try:
                with self._begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow_map(grow_hint)
            except lmdb.Error as e:
                free = free_disk_bytes(self.path)
                if is_enospc(e) or free < grow_hint + MIN_FREE_DISK:
                    raise DiskFullError(disk_full_message(self.path, f"{e}; {free} bytes free")
                                        ) from e
                if isinstance(e, _DAMAGE):
                    raise self._on_damage(f"LMDB: {e}") from e
                raise StoreUnavailableError(f"writing the index at {self.path} failed: {e}"
                                            ) from e
        raise DiskFullError(disk_full_message(self.path, "the LMDB map stays full after growing"))

    def _grow_map(self, need: int) -> None:
        cur = self.env.info()["map_size"]
        free = free_disk_bytes(self.path)
        # The map is address space; what must exist is disk for the file to grow into.
        if free < need + MIN_FREE_DISK:
            raise DiskFullError(disk_full_message(self.path, f"{free} bytes free, need {need}"))
        self.env.set_mapsize(cur + min(max(2 * need, cur // 2, 64 << 20), free))

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def close(self) -> None:
        self.env.close()

    # -- records -------------------------------------------------------------------------------
    def get_rec(self, txn: lmdb.Transaction, key: str) -> Record | None:
        """The validated record of ``key``; raises ``BadRecordError`` if it is damaged."""
        raw = txn.get(key.encode(), db=self.entries)
        return None if raw is None else decode_record(raw)

    def put_rec(self, txn: lmdb.Transaction, key: str, rec: Record) -> None:
        txn.put(key.encode(), pack(rec), db=self.entries)

    def records(
        self, txn: lmdb.Transaction
    ) -> Iterator[tuple[bytes, str | None, Record | None, BadRecordError | None]]:
        """Every record: (raw key, key, record, None), or (raw key, None, None, why) for
        one that does not validate."""
        for k, v in txn.cursor(db=self.entries):
            raw = bytes(k)
            try:
                yield raw, decode_key(raw), decode_record(v), None
            except BadRecordError as e:
                yield raw, None, None, e

    def valid_records(self, txn: lmdb.Transaction) -> Iterator[tuple[str, Record]]:
        for _, key, rec, _ in self.records(txn):
            if key is not None and rec is not None:
                yield key, rec

    def remove(self, txn: lmdb.Transaction, key: str, rec: Record) -> None:
        txn.delete(key.encode(), db=self.entries)
        if rec["loc"] == "lmdb":
            txn.delete(key.encode(), db=self.blobs)

    def drop_raw(self, txn: lmdb.Transaction, raw_keys: list[bytes]) -> int:
        """Remove records that fail validation (their size is unknown, so ``used_bytes``
        is recounted from the valid records) and count them as corrupt; returns how many."""
        dropped = 0
        for k in raw_keys:
            v = txn.get(k, db=self.entries)
            try:
                if v is not None:
                    decode_key(k)
                    decode_record(v)
                    continue  # rewritten since it was found bad
            except BadRecordError:
                pass
            dropped += bool(txn.delete(k, db=self.entries))
            txn.delete(k, db=self.blobs)
        self.recount_used(txn)
        self.add(txn, {"corrupt": dropped})
        return dropped

    def recount_used(self, txn: lmdb.Transaction) -> int:
        used = sum(rec["nbytes"] for _, rec in self.valid_records(txn))
        txn.put(b"used_bytes", pack(used), db=self.meta)
        return used

    def referenced_blobs(self) -> set[str]:
        with self.read() as txn:
            return {rec["blob"] for _, rec in self.valid_records(txn) if rec["blob"]}

    # -- counters ------------------------------------------------------------------------------
    def counter(self, txn: lmdb.Transaction, name: str) -> int:
        """A counter's value; a damaged one reads as 0 (``kvcache fsck`` reports it)."""
        try:
            return unpack_counter(txn.get(name.encode(), db=self.meta))
        except BadRecordError:
            return 0

    def used(self, txn: lmdb.Transaction) -> int:
        """``used_bytes``, recounted from the records if its counter is damaged."""
        try:
            return unpack_counter(txn.get(b"used_bytes", db=self.meta))
        except BadRecordError:
            return sum(rec["nbytes"] for _, rec in self.valid_records(txn))

    def add(self, txn: lmdb.Transaction, deltas: dict[str, int]) -> None:
        for name, d in deltas.items():
            if d:
                cur = self.used(txn) if name == "used_bytes" else self.counter(txn, name)
                txn.put(name.encode(), pack(cur + d), db=self.meta)

    def counters(self) -> dict[str, int]:
        """Every lifetime counter plus ``entries`` (records, valid or not)."""
        with self.read() as txn:
            out = {n: self.counter(txn, n) for n in COUNTERS}
            out["used_bytes"] = self.used(txn)
            out["entries"] = txn.stat(self.entries)["entries"]
        return out
