"""``DiskTier``: a persistent tier on local disk — a durable LMDB index plus blobs.

Layout: ``index/`` (LMDB: records, lifetime counters and, for ``blob_storage="lmdb"``, the
objects), ``blobs/ab/<key>.<writer>-<id>.kvo`` (one container file per entry),
``writers/`` (a lease per live writable opener), ``kvcache.lock`` (``StoreLock``).

Every mutation of the index and of the counters is one LMDB write transaction, so a crash
leaves either the old or the new state and ``used_bytes`` always matches the records.
A blob file is written under a temporary name, renamed, and only then referenced by a
committed record; files of removed entries are unlinked after the commit. Each put gets a
fresh file name, so a reader never sees a file being rewritten: it reads the old inode or
the new one. A file left unreferenced by a writer that died between rename and commit is
reclaimed as soon as its lease shows the writer dead (``kvcache.kvstore.writer_lease``).

Integrity: an object read must match its checksum and the key asked for, else it is a
counted miss, removed; records are validated as read (``index_format``). An untrusted index
is never mapped: the tier opens *damaged* (reads miss, writes raise ``StoreCorruptError``,
``stats().damage`` says why) or, opened exclusively, is rebuilt (``kvcache.kvstore.fsck``).

Other processes may have the directory open (LMDB is multi-process): counters are
read-modify-written inside write transactions, victims that vanished are skipped, and the
in-memory policy is re-read from the index when it runs out of victims.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from kvcache.kvstore.blob_files import publish_blob_file, read_blob_file, read_blob_header
from kvcache.kvstore.container import (
    ObjectHeader,
    StoredObject,
    decode_object,
    encode_parts,
    header_of_bytes,
)
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    DiskFullError,
    EntryPinnedError,
    KVCacheError,
    ObjectTooLargeError,
    StoreCorruptError,
    StoreFullError,
    StoreUnavailableError,
)
from kvcache.kvstore.eviction import make_policy
from kvcache.kvstore.index_format import (
    BLOB_STORAGES,
    BLOBS_DIR,
    INDEX_DIR,
    LOCK_FILE,
    MAX_KEY_BYTES,
    WRITERS_DIR,
    BadRecordError,
    Record,
    blob_name,
    index_problem,
    new_record_id,
)
from kvcache.kvstore.lmdb_index import (
    LmdbIndex,
    disk_full_message,
    free_disk_bytes,
    is_enospc,
    lmdb_put,
)
from kvcache.kvstore.store_lock import StoreLock, unavailable
from kvcache.kvstore.tier import DELETE_CAUSES, EntryInfo, Tier, TierStats, check_object_key
from kvcache.kvstore.writer_lease import WriterLease, sweep_orphans

__all__ = ["BLOB_STORAGES", "LOCK_FILE", "DiskTier"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_INDEX_MAP_BYTES = 1 << 30  # address space only; the file grows with the index
_MAP_HEADROOM = 256 << 20  # LMDB cannot reuse pages freed by the last two transactions
_MIN_FREE_TO_CREATE = 1 << 20  # a new index's first pages and reader table, with room
_FLUSH_EVERY = 1024  # batched access updates
_FLUSH_INTERVAL_S = 2.0
# A file without a writer token (named before tokens existed) is junk only once no write
# could still be running: a write never takes this long.
_ORPHAN_AGE_S = 3600.0
_SWEEP_INTERVAL_S = 60.0  # at most one orphan sweep per minute when the tier is full

class DiskTier(Tier):
    """Persistent tier: LMDB index, blobs in files or LMDB; thread- and process-safe.

    ``capacity_bytes`` bounds the bytes of stored containers (``EntryInfo.nbytes`` is the
    container's length on disk). ``sync_blobs`` fsyncs each blob file and its directory
    before the record commits; off by default because the index itself is always synced
    and a blob that a power loss cut short fails its checksum and becomes a counted miss.
    ``stats()`` reports lifetime counters, shared by every process that opens the store.
    ``sweep``: remove orphan blob files while opening (``kvcache fsck`` reports them
    instead). ``damage`` is None, or why the index cannot be trusted (see the module docstring);
    ``rebuilt`` is the report of a rebuild this open did, if any.
    """

    name = "disk"
    _index: LmdbIndex | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        policy: str = "lru",
        blob_storage: str = "files",
        readonly: bool = False,
        exclusive: bool = False,
        create: bool = True,
        sync_blobs: bool = False,
        io_threads: int = 4,
        sweep: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) \
                or capacity_bytes <= 0:
            raise ConfigError(
                f"disk tier capacity_bytes must be an integer > 0, got {capacity_bytes!r}")
        if blob_storage not in BLOB_STORAGES:
            raise ConfigError(
                f"unknown blob_storage {blob_storage!r}; use one of {', '.join(BLOB_STORAGES)}"
            )
        self.path = Path(path).absolute()
        self.capacity_bytes = capacity_bytes
        self.blob_storage = blob_storage
        self.readonly = readonly
        self.damage: str | None = None
        self._opening = False
        self.rebuilt: Any = None  # fsck.FsckReport of a rebuild done while opening
        self._index = None
        self._sync_blobs = sync_blobs
        # Reads of a batch run concurrently: a disk answers a queue of requests faster
        # than one at a time (measured in docs/benchmarks.md, "store").
        self._io_threads = max(1, io_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._policy = make_policy(policy)
        self._known: set[str] = set()  # keys the policy holds
        self._lock = threading.RLock()
        self._closed = False
        self._dir_lock: StoreLock | None = None
        self._lease: WriterLease | None = None
        self._opened_at = time.time()
        self._pending: dict[str, tuple[float, int]] = {}  # key -> (last_access, new hits)
        self._pending_counts: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._last_sweep = time.monotonic()
        self._dir_lock = StoreLock(self.path, create=create and not readonly,
                                   readonly=readonly, exclusive=exclusive)
        try:
            self._open(exclusive)
            if self.damage is None and not readonly:
                self._lease = WriterLease(self.path / WRITERS_DIR)
                if sweep:
                    self.sweep_orphans(0.0 if exclusive else _ORPHAN_AGE_S)
        except BaseException:
            self._release()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _open(self, exclusive: bool) -> None:
        """Map the index if it can be trusted; otherwise rebuild it (exclusive, writable
        opens) or open damaged."""
        problem = self._index_problem()
        if problem is None:
            self._opening = True  # damage found now is reported once, below, or repaired
            try:
                self._open_index()
                return
            except StoreCorruptError as e:
                problem = str(e)
                self._close_index()
            finally:
                self._opening = False
        if exclusive and not self.readonly:
            from kvcache.kvstore.fsck import rebuild_index

            self.rebuilt = rebuild_index(self.path, self.blob_storage, self._map_size(), problem)
            log.warning("the index of the disk tier at %s was damaged (%s); rebuilt it from "
                        "the blob files: %s", self.path, problem, self.rebuilt.summary())
            self._open_index()
            return
        self._damaged(problem)

    def _index_problem(self) -> str | None:
        """Why the index must not be mapped, or None (also None for a new store)."""
        problem = index_problem(self.path, readonly=self.readonly)
        new = not (self.path / INDEX_DIR / "data.mdb").exists()
        if problem is None and new and free_disk_bytes(self.path) < _MIN_FREE_TO_CREATE:
            # LMDB maps the files it creates: on a full disk a new one would SIGBUS.
            raise DiskFullError(disk_full_message(
                self.path, f"creating the index needs {_MIN_FREE_TO_CREATE >> 20} MiB free"))
        return problem

    def _map_size(self) -> int:
        if self.blob_storage == "lmdb":
            return self.capacity_bytes + self.capacity_bytes // 4 + _MAP_HEADROOM
        return _INDEX_MAP_BYTES

    def _open_index(self) -> None:
        try:
            self._index = LmdbIndex(self.path / INDEX_DIR, map_size=self._map_size(),
                                    readonly=self.readonly, on_damage=self._damaged)
        except OSError as e:
            raise unavailable(self.path, e) from e
        self._rebuild_policy()

    def _rebuild_policy(self) -> None:
        """Feed the policy every valid key in last-access order; drop invalid records."""
        rows: list[tuple[float, str, int]] = []
        bad: list[bytes] = []
        idx = self._idx()
        with idx.read() as txn:
            for raw, key, rec, err in idx.records(txn):
                if key is None or rec is None:
                    log.warning("disk tier at %s: dropping a damaged index record: %s",
                                self.path, err)
                    bad.append(raw)
                    continue
                rows.append((rec["last_access"], key, rec["hits"]))
        for _, key, hits in sorted(rows):
            self._policy.on_insert(key, hits=hits)
            self._known.add(key)
        if bad and not self.readonly:
            self._write(lambda txn: idx.drop_raw(txn, bad))

    # -- orphans -----------------------------------------------------------------------------
    def sweep_orphans(self, min_age: float = _ORPHAN_AGE_S) -> int:
        """Remove blob files no record references whose writer is dead (or, for files that
        name no writer, older than ``min_age`` seconds); returns how many."""
        if self.blob_storage != "files" or self.readonly or self.damage is not None:
            return 0

        def referenced() -> set[str]:
            with self._locked():
                return self._idx().referenced_blobs()

        n = sweep_orphans(self.path / BLOBS_DIR, self.path / WRITERS_DIR,
                          self._lease.token if self._lease is not None else None,
                          referenced, min_age)
        self._last_sweep = time.monotonic()
        if n:
            log.info("disk tier at %s: removed %d orphan blob files", self.path, n)
        return n

    # -- plumbing (every transaction runs under self._lock) ------------------------------------
    def _damaged(self, why: str) -> StoreCorruptError:
        """Mark the index damaged (reads miss, writes refuse) and return the error to raise.
        While opening, only the reason: ``_open`` decides between damaged and rebuilt."""
        if self._opening:
            return StoreCorruptError(why)
        if self.damage is None:
            self.damage = (
                f"the index of the disk tier at {self.path} is damaged ({why}); it serves "
                "nothing until repaired: run `kvcache fsck --repair` on this store, which "
                "rebuilds the index from the blob files"
            )
            log.error("%s", self.damage)
        return StoreCorruptError(self.damage)

    def _idx(self) -> LmdbIndex:
        if self.damage is not None:
            raise StoreCorruptError(self.damage)
        assert self._index is not None
        return self._index

    def _write(self, fn: Callable[[lmdb.Transaction], T], grow_hint: int = 0) -> T:
        """Run ``fn`` in one write transaction with the batched access updates folded in."""
        self._check_writable()
        idx = self._idx()

        def body(txn: lmdb.Transaction) -> T:
            self._apply_pending(txn)
            return fn(txn)

        result = idx.write(body, grow_hint)
        self._pending.clear()
        self._pending_counts.clear()
        self._last_flush = time.monotonic()
        return result

    def _apply_pending(self, txn: lmdb.Transaction) -> None:
        idx = self._idx()
        for key, (last_access, hits) in self._pending.items():
            try:
                rec = idx.get_rec(txn, key)
            except BadRecordError:
                continue  # dropped by the next read of it
            if rec is not None:  # gone meanwhile: its hits die with it
                rec["last_access"] = max(rec["last_access"], last_access)
                rec["hits"] += hits
                idx.put_rec(txn, key, rec)
        idx.add(txn, self._pending_counts)

    @property
    def index(self) -> LmdbIndex:
        """The LMDB index (for ``kvcache.kvstore.fsck``); ``StoreCorruptError`` if damaged."""
        return self._idx()

    def blob_path(self, rel: str) -> Path:
        """Where the blob file a record names (``rec["blob"]``) lives."""
        return self.path / BLOBS_DIR / rel

    def _unlink_blobs(self, recs: list[Record]) -> None:
        for rec in recs:
            if rec["loc"] == "files":
                self.blob_path(rec["blob"]).unlink(missing_ok=True)

    def _forget(self, key: str) -> None:
        self._policy.on_remove(key)
        self._known.discard(key)
        self._pending.pop(key, None)

    def _count(self, **deltas: int) -> None:
        """Add to the batched counters (persisted with the next write)."""
        with self._lock:
            for name, d in deltas.items():
                self._pending_counts[name] = self._pending_counts.get(name, 0) + d

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the disk tier at {self.path} is closed")
            yield

    def _check_writable(self) -> None:
        if self.damage is not None:
            raise StoreCorruptError(self.damage)
        if self.readonly:
            raise StoreUnavailableError(
                f"the disk tier at {self.path} was opened read-only; open the store writable "
                "(store.readonly = false, no --readonly) to change it"
            )

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
            raise KVCacheError(f"keys must be non-empty strings of <= {MAX_KEY_BYTES} bytes")

    # -- reads -----------------------------------------------------------------------------
    def _read(self, key: str, header_only: bool) -> tuple[Any, int] | None:
        """(verified object or header, container bytes) or None; corrupt entries — a bad
        checksum, another key's object, a damaged record — are dropped and counted."""
        self._check_key(key)
        if self.damage is not None:
            return None
        try:
            return self._read_verified(key, header_only)
        except StoreCorruptError:
            return None  # the index turned out damaged: a miss from now on
        except StoreUnavailableError as e:
            if self._closed:
                raise
            log.warning("disk tier at %s: reading %s failed: %s", self.path, key, e)
            return None

    def _read_verified(self, key: str, header_only: bool) -> tuple[Any, int] | None:
        for _ in range(4):
            data: Any = None
            with self._locked():
                idx = self._idx()
                with idx.read() as txn:
                    try:
                        rec = idx.get_rec(txn, key)
                    except BadRecordError as e:
                        log.warning("disk tier at %s: the record of %s is damaged: %s",
                                    self.path, key, e)
                        rec = None
                        data = e
                    else:
                        if rec is not None and rec["loc"] == "lmdb":
                            buf = txn.get(key.encode(), db=idx.blobs)
                            if buf is not None:  # the buffer dies with the transaction
                                data = bytearray(buf)
            if isinstance(data, BadRecordError):
                self._drop_bad(key)
                return None
            if rec is None:
                return None
            try:
                # Blob files are read outside the lock: a concurrent replace or delete only
                # unlinks, so we read a whole old file, a whole new one, or nothing.
                if rec["loc"] == "files":
                    path = str(self.blob_path(rec["blob"]))
                    data = read_blob_header(path) if header_only else read_blob_file(path)
                elif data is not None:
                    data = header_of_bytes(data) if header_only else decode_object(data)
                if data is None:
                    raise CorruptObjectError(f"the blob of {key} is missing")
                check_object_key(key, data if header_only else data.header)
                return data, rec["nbytes"]
            except (CorruptObjectError, FileNotFoundError) as e:
                if self._drop_if_unchanged(key, rec["id"], e):
                    return None
        return None

    def _drop_bad(self, key: str) -> None:
        """Remove ``key``'s record, which fails validation, and count it as corrupt."""
        with self._lock:
            if self.readonly:
                self._count(corrupt=1)
                return
            idx = self._idx()
            self._write(lambda txn: idx.drop_raw(txn, [key.encode()]))
            self._forget(key)

    def _drop_if_unchanged(self, key: str, rec_id: str, why: Exception) -> bool:
        """Remove a corrupt entry unless another process replaced (then False: read again)
        or deleted it meanwhile: its blob vanishing under us was that, not corruption."""
        with self._lock:
            idx = self._idx()
            if self.readonly:
                with idx.read() as txn:
                    cur = idx.get_rec(txn, key)
                if cur is None or cur["id"] != rec_id:
                    return cur is None  # deleted: a miss; replaced: read it again
                log.warning("disk tier at %s: %s is corrupt: %s", self.path, key, why)
                self._count(corrupt=1)
                return True

            def drop(txn: lmdb.Transaction) -> Record | bool | None:
                cur = idx.get_rec(txn, key)
                if cur is None:
                    return None
                if cur["id"] != rec_id:
                    return False
                idx.remove(txn, key, cur)
                idx.add(txn, {"corrupt": 1, "used_bytes": -cur["nbytes"]})
                return cur

            cur = self._write(drop)
            if cur is False:
                return False
            self._forget(key)
        if isinstance(cur, dict):
            log.warning("disk tier at %s: dropping %s: %s", self.path, key, why)
            self._unlink_blobs([cur])
        return True

    def contains(self, key: str) -> bool:
        self._check_key(key)
        try:
            with self._locked():
                idx = self._idx()
                with idx.read() as txn:
                    return txn.get(key.encode(), db=idx.entries) is not None
        except StoreCorruptError:
            return False

    def get(self, key: str) -> StoredObject | None:
        got = self._read(key, header_only=False)
        with self._lock:
            if got is None:
                self._count(misses=1)
                if self.damage is not None:
                    return None
            else:
                obj, nbytes = got
                self._count(hits=1, hit_tokens=obj.header.num_tokens, bytes_read=nbytes)
                _, hits = self._pending.get(key, (0.0, 0))
                self._pending[key] = (time.time(), hits + 1)
                if key in self._known:
                    self._policy.on_access(key)
                else:  # stored by another process since we opened
                    self._policy.on_insert(key, hits=hits + 1)
                    self._known.add(key)
            # Access updates are batched: a write transaction (an fsync) per hit would cost
            # more than the read itself.
            due = time.monotonic() - self._last_flush > _FLUSH_INTERVAL_S
            if len(self._pending) >= _FLUSH_EVERY or due:
                self.flush()
        return None if got is None else got[0]

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        if len(keys) <= 1 or self._io_threads == 1:
            return [self.get(k) for k in keys]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._io_threads, "kvcache-disk-read")
            pool = self._pool
        return list(pool.map(self.get, keys))

    def count_misses(self, chunks: int, tokens: int) -> None:
        self._count(misses=chunks, miss_tokens=tokens)

    def header(self, key: str) -> ObjectHeader | None:
        got = self._read(key, header_only=True)
        return None if got is None else got[0]

    def _entry_info(self, key: str, rec: Record) -> EntryInfo:
        last_access, hits = self._pending.get(key, (rec["last_access"], 0))
        return EntryInfo(
            key=key, tier=self.name, nbytes=rec["nbytes"], num_tokens=rec["num_tokens"],
            codec=rec["codec"], model_id=rec["model_id"], created_at=rec["created_at"],
            last_access=max(last_access, rec["last_access"]), hits=rec["hits"] + hits,
            pinned=rec["pinned"], keying=rec.get("keying", "prefix"),
        )

    def info(self, key: str) -> EntryInfo | None:
        self._check_key(key)
        try:
            with self._locked():
                idx = self._idx()
                with idx.read() as txn:
                    rec = idx.get_rec(txn, key)
                return None if rec is None else self._entry_info(key, rec)
        except (BadRecordError, StoreCorruptError):
            return None

    def scan(self) -> Iterator[EntryInfo]:
        """Every valid entry (damaged records are left out: reads drop them, and
        ``kvcache fsck`` lists them)."""
        try:
            with self._locked():
                idx = self._idx()
                with idx.read() as txn:
                    rows = list(idx.valid_records(txn))
                return iter([self._entry_info(k, rec) for k, rec in rows])
        except StoreCorruptError:
            return iter([])

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, obj: StoredObject) -> None:
        self._check_key(key)
        check_object_key(key, obj.header)
        with self._locked():  # fail before writing a blob nobody will reference
            self._check_writable()
        # Checked on the tensors' sizes first: serialising a huge (e.g. expanded) tensor
        # to find out would allocate all of it.
        self._check_fits(key, obj.nbytes)
        parts = encode_parts(obj)
        size = sum(memoryview(p).nbytes for p in parts)
        self._check_fits(key, size)
        if time.monotonic() - self._last_sweep > _SWEEP_INTERVAL_S \
                and self.used_bytes + size > self.capacity_bytes:
            self.sweep_orphans()  # about to evict: first reclaim what dead writers left
        assert self._lease is not None
        rec_id = new_record_id(self._lease.token)
        now = time.time()
        rec: Record = {
            "nbytes": size, "num_tokens": obj.header.num_tokens, "codec": obj.header.codec,
            "model_id": obj.header.layout.model_id, "created_at": now, "last_access": now,
            "hits": 0, "pinned": False, "loc": self.blob_storage, "blob": None, "id": rec_id,
        }
        if obj.header.keying != "prefix":  # prefix records keep their original fields
            rec["keying"] = obj.header.keying
        final: Path | None = None
        if self.blob_storage == "files":
            rec["blob"] = blob_name(key, rec_id)
            final = self.blob_path(rec["blob"])
            self._write_file(final, parts)
        try:
            with self._locked():
                victims, old = self._write(lambda txn: self._put_txn(txn, key, rec, parts), size)
                for vkey, _ in victims:
                    self._forget(vkey)
                self._forget(key)
                self._policy.on_insert(key, hits=rec["hits"])
                self._known.add(key)
        except BaseException:
            if final is not None:
                final.unlink(missing_ok=True)
            raise
        self._unlink_blobs([v for _, v in victims] + ([old] if old else []))

    def _check_fits(self, key: str, size: int) -> None:
        if size > self.capacity_bytes:
            raise ObjectTooLargeError(
                f"object {key} is {size} bytes, more than the disk tier's whole capacity "
                f"({self.capacity_bytes}); raise capacity_bytes or store it compressed"
            )

    def _write_file(self, final: Path, parts: list[bytes | memoryview]) -> None:
        try:
            publish_blob_file(final, parts, self._sync_blobs)
        except OSError as e:
            if is_enospc(e):
                raise DiskFullError(disk_full_message(self.path, f"writing {final.name}: {e}")
                                    ) from e
            raise unavailable(self.path, e) from e

    def _put_txn(
        self, txn: lmdb.Transaction, key: str, rec: Record, parts: list[bytes | memoryview]
    ) -> tuple[list[tuple[str, Record]], Record | None]:
        idx = self._idx()
        try:
            old = idx.get_rec(txn, key)
        except BadRecordError:
            idx.drop_raw(txn, [key.encode()])
            old = None
        if old is not None:  # a replacement keeps the key's pin and popularity
            rec["pinned"], rec["hits"] = old["pinned"], old["hits"]
        freed = old["nbytes"] if old else 0
        need = idx.used(txn) - freed + rec["nbytes"] - self.capacity_bytes
        victims = self._plan_victims(txn, key, need)
        corrupt = 0
        for vkey, vrec in victims:
            corrupt += not self._hand_off(txn, vkey, vrec)
            idx.remove(txn, vkey, vrec)
        if old is not None and old["loc"] == "lmdb" and rec["loc"] != "lmdb":
            txn.delete(key.encode(), db=idx.blobs)
        if rec["loc"] == "lmdb":
            lmdb_put(txn, key.encode(), b"".join(parts), idx.blobs)
        idx.put_rec(txn, key, rec)
        evicted = sum(v["nbytes"] for _, v in victims)
        idx.add(txn, {
            "used_bytes": rec["nbytes"] - freed - evicted, "puts": 1,
            "bytes_written": rec["nbytes"], "evictions": len(victims) - corrupt,
            "corrupt": corrupt,
        })
        return victims, old

    def _plan_victims(
        self, txn: lmdb.Transaction, key: str, need: int
    ) -> list[tuple[str, Record]]:
        """Pick victims freeing ``need`` bytes, or raise without touching anything."""
        chosen: list[tuple[str, Record]] = []
        if need <= 0:
            return chosen
        idx = self._idx()
        seen = {key}
        for attempt in range(2):
            for vkey in self._policy.victims():
                if vkey in seen:
                    continue
                seen.add(vkey)
                try:
                    vrec = idx.get_rec(txn, vkey)
                except BadRecordError:
                    vrec = None  # its size is unknown: dropped when it is read
                if vrec is None:  # another process removed it
                    self._forget(vkey)
                    continue
                if vrec["pinned"]:
                    continue
                chosen.append((vkey, vrec))
                need -= vrec["nbytes"]
                if need <= 0:
                    return chosen
            if attempt == 0:
                self._resync_policy(txn)  # other processes may have added entries
                seen = {key} | {k for k, _ in chosen}
        raise StoreFullError(
            f"disk tier at {self.path} is full: {key} needs {need} more bytes than "
            "evicting every unpinned entry frees; unpin or delete entries, or raise "
            "capacity_bytes"
        )

    def _resync_policy(self, txn: lmdb.Transaction) -> None:
        live = dict(self._idx().valid_records(txn))
        for gone in self._known - live.keys():
            self._forget(gone)
        for new in sorted(live.keys() - self._known, key=lambda k: live[k]["last_access"]):
            self._policy.on_insert(new, hits=live[new]["hits"])
            self._known.add(new)

    def _hand_off(self, txn: lmdb.Transaction, key: str, rec: Record) -> bool:
        """Give a victim to the evict handler; False when its blob turned out corrupt."""
        if self._evict_handler is None:
            return True
        try:
            if rec["loc"] == "lmdb":
                buf = txn.get(key.encode(), db=self._idx().blobs)
                if buf is None:
                    return False
                obj = decode_object(bytearray(buf))
            else:
                obj = read_blob_file(str(self.blob_path(rec["blob"])))
            check_object_key(key, obj.header)
        except (CorruptObjectError, FileNotFoundError):
            return False
        self._evict_handler(key, obj)
        return True

    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        self._check_key(key)
        counter = DELETE_CAUSES[cause]

        def fn(txn: lmdb.Transaction) -> Record | None:
            idx = self._idx()
            rec = idx.get_rec(txn, key)
            if rec is None:
                return None
            if rec["pinned"] and not force:
                raise EntryPinnedError(
                    f"{key} is pinned in the disk tier; unpin it first or pass force=True"
                )
            idx.remove(txn, key, rec)
            idx.add(txn, {"used_bytes": -rec["nbytes"], counter: 1})
            return rec

        with self._locked():
            try:
                rec = self._write(fn)
            except BadRecordError:
                self._drop_bad(key)
                return True
            self._forget(key)
        if rec is None:
            return False
        self._unlink_blobs([rec])
        return True

    def set_pinned(self, key: str, pinned: bool) -> bool:
        self._check_key(key)

        def fn(txn: lmdb.Transaction) -> bool:
            idx = self._idx()
            rec = idx.get_rec(txn, key)
            if rec is None:
                return False
            rec["pinned"] = bool(pinned)
            idx.put_rec(txn, key, rec)
            return True

        with self._locked():
            try:
                return self._write(fn)
            except BadRecordError:
                self._drop_bad(key)
                return False

    # -- accounting ------------------------------------------------------------------------
    def _counters(self) -> dict[str, int]:
        try:
            out = self._idx().counters()
        except StoreCorruptError:
            return {}
        for n, d in self._pending_counts.items():
            out[n] += d
        return out

    @property
    def used_bytes(self) -> int:
        with self._locked():
            return self._counters().get("used_bytes", 0)

    def stats(self) -> TierStats:
        with self._locked():
            counters = self._counters()
        return TierStats(name=self.name, capacity_bytes=self.capacity_bytes,
                         opened_at=self._opened_at, damage=self.damage, **counters)

    def flush(self) -> None:
        """Persist batched access updates (``close`` does this too)."""
        with self._lock:
            if not self._closed and not self.readonly and self.damage is None \
                    and (self._pending or self._pending_counts):
                self._write(lambda txn: None)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:  # outside the lock: its reads take the lock to finish
            pool.shutdown(wait=True)
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            except (StoreCorruptError, DiskFullError) as e:
                # Only access times and counters were pending; closing must still release.
                log.warning("disk tier at %s: last counters not saved: %s", self.path, e)
            finally:
                self._release()

    def _close_index(self) -> None:
        index, self._index = self._index, None
        if index is not None:
            index.close()

    def _release(self) -> None:
        self._closed = True
        self._close_index()
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._dir_lock is not None:
            self._dir_lock.release()
            self._dir_lock = None
