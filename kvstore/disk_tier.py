"""``DiskTier``: a persistent tier on local disk — a durable LMDB index plus blobs.

Directory layout::

    <path>/kvcache.lock         flock: shared by every opener, exclusive for admin work
    <path>/index/data.mdb       LMDB: "entries" (key -> msgpack record), "meta" (format and
                                lifetime counters), "blobs" (key -> container bytes, when
                                blob_storage="lmdb")
    <path>/blobs/ab/<key>.<id>.kvo   one container per entry (blob_storage="files")

Every mutation of the index and of the counters is one LMDB write transaction, so a crash
leaves either the old or the new state and ``used_bytes`` always matches the records.
A blob file is written under a temporary name, renamed, and only then referenced by a
committed record; files of removed entries are unlinked after the commit. Each put gets a
fresh file name (``<id>``), so a reader never sees a file being rewritten: it reads either
the old inode or the new one, and if a file vanished under it the record changed too.

Another process may have the same directory open (LMDB is multi-process): counters are
read-modify-written inside write transactions, victims that vanished are skipped, and the
in-memory policy is re-read from the index when it runs out of victims.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import msgpack
import xxhash

from kvcache.kvstore.blob_files import read_blob_file, write_blob_file
from kvcache.kvstore.container import (
    ObjectHeader,
    StoredObject,
    decode_object,
    encode_parts,
    read_header_unverified,
)
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    DiskFullError,
    EntryPinnedError,
    KVCacheError,
    ObjectTooLargeError,
    StoreFullError,
    StoreUnavailableError,
)
from kvcache.kvstore.eviction import make_policy
from kvcache.kvstore.keys import is_key
from kvcache.kvstore.tier import EntryInfo, Tier, TierStats

T = TypeVar("T")
Record = dict[str, Any]

BLOB_STORAGES = ("files", "lmdb")
LOCK_FILE = "kvcache.lock"
_FORMAT = {"format": "kvcache-disk-tier", "version": 1}
_COUNTERS = ("used_bytes", "hits", "misses", "puts", "evictions", "corrupt",
             "bytes_read", "bytes_written")
_INDEX_MAP_BYTES = 1 << 30  # address space only; the file grows with the index
_MAP_HEADROOM = 256 << 20  # LMDB cannot reuse pages freed by the last two transactions
_MIN_FREE_DISK = 64 << 20
_MAX_KEY_BYTES = 480  # LMDB's key limit is 511
_MAX_HEADER_BYTES = 16 << 20
_FLUSH_EVERY = 1024  # batched access updates
_FLUSH_INTERVAL_S = 2.0
_ORPHAN_AGE_S = 3600.0  # a write never takes this long; older unreferenced files are junk

_open_paths: set[str] = set()  # LMDB forbids opening one environment twice per process
_open_paths_lock = threading.Lock()


def _lmdb_put(txn: lmdb.Transaction, key: bytes, value: bytes, db: Any) -> None:
    txn.put(key, value, db=db)


def _free_disk_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _pread(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


def _buffer_header(buf: bytes | memoryview) -> ObjectHeader | None:
    try:
        return read_header_unverified(lambda o, n: bytes(buf[o : o + n]), len(buf))
    except CorruptObjectError:
        return None


def _unavailable(path: Path, e: OSError) -> StoreUnavailableError:
    if e.errno == errno.EROFS:
        hint = "the file system is read-only: open with readonly=True, or use a writable disk"
    elif e.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied: fix the directory's permissions (readonly=True needs read)"
    elif e.errno == errno.ENOENT:
        hint = "no kvcache store there: check the path, or open with create=True"
    else:
        hint = str(e)
    return StoreUnavailableError(f"cannot open the kvcache store at {path}: {hint}")


def _is_enospc(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left" in str(e) or "Disk quota" in str(e)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(raw: Any) -> Any:
    return None if raw is None else msgpack.unpackb(raw, raw=False)


class DiskTier(Tier):
    """Persistent tier: LMDB index, blobs in files or LMDB; thread- and process-safe.

    ``capacity_bytes`` bounds the bytes of stored containers (``EntryInfo.nbytes`` is the
    container's length on disk). ``sync_blobs`` fsyncs each blob file and its directory
    before the record commits; off by default because the index itself is always synced
    and a blob that a power loss cut short fails its checksum and becomes a counted miss.
    ``stats()`` reports lifetime counters, shared by every process that opens the store.
    """

    name = "disk"
    _env: lmdb.Environment

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
    ) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ConfigError(f"disk tier capacity_bytes must be > 0, got {capacity_bytes}")
        if blob_storage not in BLOB_STORAGES:
            raise ConfigError(
                f"unknown blob_storage {blob_storage!r}; use one of {', '.join(BLOB_STORAGES)}"
            )
        self.path = Path(path).absolute()
        self.capacity_bytes = int(capacity_bytes)
        self.blob_storage = blob_storage
        self.readonly = readonly
        self._sync_blobs = sync_blobs
        # Reads of a batch run concurrently: a disk answers a queue of requests faster
        # than one at a time (measured in docs/benchmarks.md, "store").
        self._io_threads = max(1, io_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._policy = make_policy(policy)
        self._known: set[str] = set()  # keys the policy holds
        self._lock = threading.RLock()
        self._closed = False
        self._lock_fd: int | None = None
        self._opened_at = time.time()
        self._pending: dict[str, tuple[float, int]] = {}  # key -> (last_access, new hits)
        self._pending_counts: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._lock_fd = self._lock_directory(create and not readonly, exclusive)
        try:
            self._open_index()
            referenced = self._rebuild_policy()
            if not readonly:
                self._sweep_orphans(referenced, 0.0 if exclusive else _ORPHAN_AGE_S)
        except BaseException:
            self._release()
            raise

    # -- opening ---------------------------------------------------------------------------
    def _lock_directory(self, create: bool, exclusive: bool) -> int:
        if not self.path.is_dir():
            if self.path.exists():
                raise StoreUnavailableError(f"{self.path} is not a directory; pick another path")
            if not create:
                raise StoreUnavailableError(
                    f"no kvcache store at {self.path}: the directory does not exist; check "
                    "the path, or open with create=True (and readonly=False) to make one"
                )
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _unavailable(self.path, e) from e
        real = os.path.realpath(self.path)
        with _open_paths_lock:
            if real in _open_paths:
                raise StoreUnavailableError(
                    f"the kvcache store at {self.path} is already open in this process; "
                    "share that DiskTier instead of opening it twice"
                )
            flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
            try:
                fd = os.open(self.path / LOCK_FILE, flags, 0o644)
            except OSError as e:
                raise _unavailable(self.path, e) from e
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                held = "in use" if exclusive else "held exclusively (e.g. by `kvcache evict`)"
                raise StoreUnavailableError(
                    f"the kvcache store at {self.path} is locked by another process ({held}); "
                    "stop that process or retry when it is done"
                ) from None
            _open_paths.add(real)
        self._real_path = real
        return fd

    def _open_index(self) -> None:
        index = self.path / "index"
        if not (index / "data.mdb").exists() and self.readonly:
            raise StoreUnavailableError(
                f"no kvcache store at {self.path} (no index); check the path or create it "
                "by opening with readonly=False"
            )
        if self.blob_storage == "lmdb":
            map_size = self.capacity_bytes + self.capacity_bytes // 4 + _MAP_HEADROOM
        else:
            map_size = _INDEX_MAP_BYTES
        try:
            index.mkdir(exist_ok=True)
            # metasync=False: one fsync per commit instead of two; LMDB keeps the index
            # consistent and a system crash can at most undo the last commit.
            self._env = lmdb.open(
                str(index), map_size=map_size, max_dbs=4, readonly=self.readonly,
                sync=True, metasync=False, lock=True,
            )
        except OSError as e:
            raise _unavailable(self.path, e) from e
        except lmdb.Error as e:
            raise StoreUnavailableError(f"cannot open the kvcache index at {index}: {e}") from e
        try:
            self._entries = self._env.open_db(b"entries", create=not self.readonly)
            self._meta = self._env.open_db(b"meta", create=not self.readonly)
            self._blobs = self._env.open_db(b"blobs", create=not self.readonly)
        except lmdb.Error as e:
            raise StoreUnavailableError(
                f"{index} is not a complete kvcache index ({e}); open it writable once or "
                "remove the directory"
            ) from e
        with self._begin(write=False) as txn:
            fmt = _unpack(txn.get(b"format", db=self._meta))
        if fmt is None and not self.readonly:
            with self._begin(write=True) as txn:
                txn.put(b"format", _pack(_FORMAT), db=self._meta)
        elif fmt != _FORMAT:
            raise StoreUnavailableError(
                f"{index} holds {fmt!r}, not a {_FORMAT} index; point the disk tier at "
                "its own directory"
            )

    def _rebuild_policy(self) -> set[str]:
        """Feed the policy every key in last-access order; return the blob files in use."""
        rows: list[tuple[float, str, int]] = []
        referenced: set[str] = set()
        with self._begin(write=False) as txn:
            for k, v in txn.cursor(db=self._entries):
                rec = _unpack(v)
                assert rec is not None
                rows.append((rec["last_access"], bytes(k).decode(), rec["hits"]))
                if rec["blob"]:
                    referenced.add(rec["blob"])
        for _, key, hits in sorted(rows):
            self._policy.on_insert(key, hits=hits)
            self._known.add(key)
        return referenced

    def _sweep_orphans(self, referenced: set[str], min_age: float) -> None:
        """Remove blob files no record references (a crash between rename and commit)."""
        root = self.path / "blobs"
        if not root.is_dir():
            return
        cutoff = time.time() - min_age
        for shard in root.iterdir():
            for f in shard.iterdir() if shard.is_dir() else ():
                rel = f"{shard.name}/{f.name}"
                try:
                    if rel not in referenced and f.stat().st_mtime <= cutoff:
                        f.unlink()
                except FileNotFoundError:
                    pass  # another opener swept it

    # -- LMDB plumbing (every transaction runs under self._lock) -----------------------------
    def _begin(self, write: bool) -> lmdb.Transaction:
        try:
            return self._env.begin(write=write, buffers=True)
        except lmdb.MapResizedError:
            self._env.set_mapsize(0)  # another process grew the map: adopt its size
            return self._env.begin(write=write, buffers=True)

    def _write(self, fn: Callable[[lmdb.Transaction], T], grow_hint: int = 0) -> T:
        """Run ``fn`` in one write transaction with the batched access updates folded in;
        grow the map and retry when it is full."""
        self._check_writable()
        for _ in range(8):
            try:
                with self._begin(write=True) as txn:
                    self._apply_pending(txn)
                    result = fn(txn)
            except lmdb.MapFullError:
                self._grow_map(grow_hint)
                continue
            except lmdb.Error as e:
                if _is_enospc(e):
                    raise DiskFullError(self._disk_full_msg(str(e))) from e
                raise
            self._pending.clear()
            self._pending_counts.clear()
            self._last_flush = time.monotonic()
            return result
        raise DiskFullError(self._disk_full_msg("the LMDB map stays full after growing"))

    def _grow_map(self, need: int) -> None:
        cur = self._env.info()["map_size"]
        free = _free_disk_bytes(self.path)
        # The map is address space; what must exist is disk for the file to grow into.
        if free < need + _MIN_FREE_DISK:
            raise DiskFullError(self._disk_full_msg(f"{free} bytes free, need {need}"))
        self._env.set_mapsize(cur + min(max(2 * need, cur // 2, 64 << 20), free))

    def _disk_full_msg(self, why: str) -> str:
        return (
            f"disk full under {self.path} ({why}); free disk space or lower the disk "
            "tier's capacity_bytes"
        )

    def _get_rec(self, txn: lmdb.Transaction, key: str) -> Record | None:
        return _unpack(txn.get(key.encode(), db=self._entries))

    def _add(self, txn: lmdb.Transaction, deltas: dict[str, int]) -> None:
        for name, d in deltas.items():
            if d:
                cur = _unpack(txn.get(name.encode(), db=self._meta)) or 0
                txn.put(name.encode(), _pack(cur + d), db=self._meta)

    def _apply_pending(self, txn: lmdb.Transaction) -> None:
        for key, (last_access, hits) in self._pending.items():
            rec = self._get_rec(txn, key)
            if rec is not None:  # gone meanwhile: its hits die with it
                rec["last_access"] = max(rec["last_access"], last_access)
                rec["hits"] += hits
                txn.put(key.encode(), _pack(rec), db=self._entries)
        self._add(txn, self._pending_counts)

    def _counters(self) -> dict[str, int]:
        with self._begin(write=False) as txn:
            out = {n: _unpack(txn.get(n.encode(), db=self._meta)) or 0 for n in _COUNTERS}
            out["entries"] = txn.stat(self._entries)["entries"]
        for n, d in self._pending_counts.items():
            out[n] += d
        return out

    def _remove_rec(self, txn: lmdb.Transaction, key: str, rec: Record) -> None:
        txn.delete(key.encode(), db=self._entries)
        if rec["loc"] == "lmdb":
            txn.delete(key.encode(), db=self._blobs)

    def _blob_path(self, rel: str) -> Path:
        return self.path / "blobs" / rel

    def _unlink_blobs(self, recs: list[Record]) -> None:
        for rec in recs:
            if rec["loc"] == "files":
                self._blob_path(rec["blob"]).unlink(missing_ok=True)

    def _forget(self, key: str) -> None:
        self._policy.on_remove(key)
        self._known.discard(key)
        self._pending.pop(key, None)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the disk tier at {self.path} is closed")
            yield

    def _check_writable(self) -> None:
        if self.readonly:
            raise StoreUnavailableError(
                f"the disk tier at {self.path} was opened readonly; reopen it with "
                "readonly=False to change it"
            )

    @staticmethod
    def _check_key(key: str) -> None:
        if not isinstance(key, str) or not key or len(key.encode()) > _MAX_KEY_BYTES:
            raise KVCacheError(f"keys must be non-empty strings of <= {_MAX_KEY_BYTES} bytes")

    # -- reads -----------------------------------------------------------------------------
    def _read(self, key: str, header_only: bool) -> tuple[Any, int] | None:
        """(decoded object or header, container bytes) or None; corrupt entries are dropped."""
        self._check_key(key)
        for _ in range(4):
            data: Any = None
            with self._locked(), self._begin(write=False) as txn:
                rec = self._get_rec(txn, key)
                if rec is not None and rec["loc"] == "lmdb":
                    buf = txn.get(key.encode(), db=self._blobs)
                    if buf is not None:  # the buffer dies with the transaction: copy
                        data = _buffer_header(buf) if header_only else bytearray(buf)
            if rec is None:
                return None
            try:
                # Blob files are read outside the lock: a concurrent replace or delete only
                # unlinks, so we read a whole old file, a whole new one, or nothing.
                if rec["loc"] == "files":
                    path = str(self._blob_path(rec["blob"]))
                    if header_only:
                        with open(path, "rb") as f:
                            size = os.fstat(f.fileno()).st_size
                            data = read_header_unverified(partial(_pread, f.fileno()), size)
                    else:
                        data = read_blob_file(path)
                if data is None:
                    raise CorruptObjectError(f"blob of {key} is missing or unreadable")
                if isinstance(data, bytearray):  # an LMDB blob, copied out above
                    data = decode_object(data)
                return data, rec["nbytes"]
            except (CorruptObjectError, FileNotFoundError):
                if self._drop_if_unchanged(key, rec["id"]):
                    return None
        return None

    def _drop_if_unchanged(self, key: str, rec_id: str) -> bool:
        """Remove a corrupt entry unless it was replaced meanwhile (then False: read again)."""
        with self._lock:
            if self.readonly:
                self._pending_counts["corrupt"] = self._pending_counts.get("corrupt", 0) + 1
                return True

            def drop(txn: lmdb.Transaction) -> Record | bool | None:
                cur = self._get_rec(txn, key)
                if cur is None:
                    return None
                if cur["id"] != rec_id:
                    return False
                self._remove_rec(txn, key, cur)
                self._add(txn, {"corrupt": 1, "used_bytes": -cur["nbytes"]})
                return cur

            cur = self._write(drop)
            if cur is False:
                return False
            self._forget(key)
        if isinstance(cur, dict):
            self._unlink_blobs([cur])
        return True

    def contains(self, key: str) -> bool:
        self._check_key(key)
        with self._locked(), self._begin(write=False) as txn:
            return txn.get(key.encode(), db=self._entries) is not None

    def get(self, key: str) -> StoredObject | None:
        got = self._read(key, header_only=False)
        with self._lock:
            counts = self._pending_counts
            if got is None:
                counts["misses"] = counts.get("misses", 0) + 1
            else:
                counts["hits"] = counts.get("hits", 0) + 1
                counts["bytes_read"] = counts.get("bytes_read", 0) + got[1]
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

    def header(self, key: str) -> ObjectHeader | None:
        got = self._read(key, header_only=True)
        return None if got is None else got[0]

    def _entry_info(self, key: str, rec: Record) -> EntryInfo:
        last_access, hits = self._pending.get(key, (rec["last_access"], 0))
        return EntryInfo(
            key=key, tier=self.name, nbytes=rec["nbytes"], num_tokens=rec["num_tokens"],
            codec=rec["codec"], model_id=rec["model_id"], created_at=rec["created_at"],
            last_access=max(last_access, rec["last_access"]), hits=rec["hits"] + hits,
            pinned=rec["pinned"],
        )

    def info(self, key: str) -> EntryInfo | None:
        self._check_key(key)
        with self._locked():
            with self._begin(write=False) as txn:
                rec = self._get_rec(txn, key)
            return None if rec is None else self._entry_info(key, rec)

    def scan(self) -> Iterator[EntryInfo]:
        with self._locked():
            with self._begin(write=False) as txn:
                rows = [(bytes(k).decode(), _unpack(v)) for k, v in txn.cursor(db=self._entries)]
            return iter([self._entry_info(k, rec) for k, rec in rows if rec is not None])

    # -- writes ----------------------------------------------------------------------------
    def put(self, key: str, obj: StoredObject) -> None:
        self._check_key(key)
        with self._locked():  # fail before writing a blob nobody will reference
            self._check_writable()
        parts = encode_parts(obj)
        size = sum(memoryview(p).nbytes for p in parts)
        if size > self.capacity_bytes:
            raise ObjectTooLargeError(
                f"object {key} is {size} bytes, more than the disk tier's whole capacity "
                f"({self.capacity_bytes}); raise capacity_bytes or store it compressed"
            )
        rec_id = os.urandom(6).hex()
        now = time.time()
        rec: Record = {
            "nbytes": size, "num_tokens": obj.header.num_tokens, "codec": obj.header.codec,
            "model_id": obj.header.layout.model_id, "created_at": now, "last_access": now,
            "hits": 0, "pinned": False, "loc": self.blob_storage, "blob": None, "id": rec_id,
        }
        final: Path | None = None
        if self.blob_storage == "files":
            safe = key if is_key(key) else xxhash.xxh3_128_hexdigest(key.encode())
            rec["blob"] = f"{safe[:2]}/{safe}.{rec_id}.kvo"
            final = self._blob_path(rec["blob"])
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

    def _write_file(self, final: Path, parts: list[bytes | memoryview]) -> None:
        # A temporary name first: a crash mid-write leaves only a *.tmp that nothing
        # references, and any file under a final name is complete.
        tmp = final.with_name(final.name + ".tmp")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            write_blob_file(str(tmp), parts, self._sync_blobs)
            os.replace(tmp, final)
            if self._sync_blobs:  # make the rename itself survive a power loss
                dfd = os.open(final.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            if _is_enospc(e):
                raise DiskFullError(self._disk_full_msg(f"writing {final.name}: {e}")) from e
            raise _unavailable(self.path, e) from e

    def _put_txn(
        self, txn: lmdb.Transaction, key: str, rec: Record, parts: list[bytes | memoryview]
    ) -> tuple[list[tuple[str, Record]], Record | None]:
        old = self._get_rec(txn, key)
        if old is not None:  # a replacement keeps the key's pin and popularity
            rec["pinned"], rec["hits"] = old["pinned"], old["hits"]
        used = _unpack(txn.get(b"used_bytes", db=self._meta)) or 0
        freed = old["nbytes"] if old else 0
        victims = self._plan_victims(txn, key, used - freed + rec["nbytes"] - self.capacity_bytes)
        corrupt = 0
        for vkey, vrec in victims:
            corrupt += not self._hand_off(txn, vkey, vrec)
            self._remove_rec(txn, vkey, vrec)
        if old is not None and old["loc"] == "lmdb" and rec["loc"] != "lmdb":
            txn.delete(key.encode(), db=self._blobs)
        if rec["loc"] == "lmdb":
            _lmdb_put(txn, key.encode(), b"".join(parts), self._blobs)
        txn.put(key.encode(), _pack(rec), db=self._entries)
        evicted = sum(v["nbytes"] for _, v in victims)
        self._add(txn, {
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
        seen = {key}
        for attempt in range(2):
            for vkey in self._policy.victims():
                if vkey in seen:
                    continue
                seen.add(vkey)
                vrec = self._get_rec(txn, vkey)
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
        live: dict[str, Record] = {
            bytes(k).decode(): _unpack(v) for k, v in txn.cursor(db=self._entries)
        }
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
                buf = txn.get(key.encode(), db=self._blobs)
                if buf is None:
                    return False
                obj = decode_object(bytearray(buf))
            else:
                obj = read_blob_file(str(self._blob_path(rec["blob"])))
        except (CorruptObjectError, FileNotFoundError):
            return False
        self._evict_handler(key, obj)
        return True

    def delete(self, key: str, *, force: bool = False) -> bool:
        self._check_key(key)

        def fn(txn: lmdb.Transaction) -> Record | None:
            rec = self._get_rec(txn, key)
            if rec is None:
                return None
            if rec["pinned"] and not force:
                raise EntryPinnedError(
                    f"{key} is pinned in the disk tier; unpin it first or pass force=True"
                )
            self._remove_rec(txn, key, rec)
            self._add(txn, {"used_bytes": -rec["nbytes"]})
            return rec

        with self._locked():
            rec = self._write(fn)
            self._forget(key)
        if rec is None:
            return False
        self._unlink_blobs([rec])
        return True

    def set_pinned(self, key: str, pinned: bool) -> bool:
        self._check_key(key)

        def fn(txn: lmdb.Transaction) -> bool:
            rec = self._get_rec(txn, key)
            if rec is None:
                return False
            rec["pinned"] = bool(pinned)
            txn.put(key.encode(), _pack(rec), db=self._entries)
            return True

        with self._locked():
            return self._write(fn)

    # -- accounting ------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        with self._locked():
            return self._counters()["used_bytes"]

    def stats(self) -> TierStats:
        with self._locked():
            c = self._counters()
        return TierStats(name=self.name, capacity_bytes=self.capacity_bytes,
                         opened_at=self._opened_at, **c)

    def flush(self) -> None:
        """Persist batched access updates (``close`` does this too)."""
        with self._lock:
            if not self._closed and not self.readonly and (self._pending or self._pending_counts):
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
            finally:
                self._release()

    def _release(self) -> None:
        self._closed = True
        env = self.__dict__.pop("_env", None)
        if env is not None:
            env.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None
            with _open_paths_lock:
                _open_paths.discard(self._real_path)
