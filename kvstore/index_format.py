"""The disk tier's on-disk format: directory layout, index records, blob file names, and
the checks that keep a damaged index from being trusted.

The index is an LMDB environment (``<tier>/index``, see ``kvcache.kvstore.lmdb_index``).
LMDB maps its file and trusts what it finds there, so three things are checked here:

- the file itself (``check_index_file``), before it is mapped: a file cut short would make
  the first access past its end a SIGBUS that kills the process, and an empty one would
  be initialised as a new, empty index while the blob files still hold every object;
- every record (``decode_record``) and key (``decode_key``), when read: a flipped bit must
  become a typed ``BadRecordError`` (the entry is dropped and counted as corrupt), never a
  ``UnicodeDecodeError`` from msgpack or a record pointing outside the tier's directory;
- blob file names (``blob_name`` / ``parse_blob_name``): each names the key it holds and
  the writer that made it, so a file nobody references can be told apart from one a live
  writer is about to commit (``kvcache.kvstore.writer_lease``).

The blob files are self-describing (each container's header holds its key, layout and
sizes), so the index is a recoverable cache of them: ``kvcache.kvstore.fsck`` rebuilds it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash

from kvcache.kvstore.container import KEYINGS
from kvcache.kvstore.errors import CorruptObjectError, StoreUnavailableError
from kvcache.kvstore.keys import is_key

log = logging.getLogger(__name__)

Record = dict[str, Any]

BLOB_STORAGES = ("files", "lmdb")
LOCK_FILE = "kvcache.lock"
INDEX_DIR = "index"
BLOBS_DIR = "blobs"
WRITERS_DIR = "writers"
BLOB_SUFFIX = ".kvo"
TMP_SUFFIX = ".tmp"
FORMAT = {"format": "kvcache-disk-tier", "version": 1}
# Lifetime counters kept in the index's "meta" database, shared by every opener.
COUNTERS = (
    "used_bytes", "hits", "misses", "hit_tokens", "miss_tokens", "puts", "bytes_read",
    "bytes_written", "evictions", "expired", "admin_evictions", "deletes", "corrupt",
)
MAX_KEY_BYTES = 480  # LMDB's key limit is 511


class BadRecordError(CorruptObjectError):
    """An index record or key that does not decode to a valid entry (a damaged index)."""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: Any) -> Any:
    """A msgpack value, or None for None; anything undecodable is a ``BadRecordError``."""
    if raw is None:
        return None
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises ValueError, UnicodeDecodeError, ExtraData, ...
        raise BadRecordError(f"undecodable index value ({type(e).__name__}: {e})") from e


def unpack_counter(raw: Any) -> int:
    value = unpack(raw)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRecordError(f"index counter holds {value!r}, not an integer")
    return value


def decode_key(raw: bytes | memoryview) -> str:
    try:
        key = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"index key {bytes(raw)!r} is not UTF-8") from e
    if not key or len(raw) > MAX_KEY_BYTES:
        raise BadRecordError(f"index key {key!r} has an impossible length")
    return key


# field -> accepted types; floats also accept ints (msgpack keeps 1.0 as a float anyway)
_FIELDS: dict[str, tuple[type, ...]] = {
    "nbytes": (int,), "num_tokens": (int,), "codec": (str,), "model_id": (str,),
    "created_at": (float, int), "last_access": (float, int), "hits": (int,),
    "pinned": (bool,), "loc": (str,), "blob": (str, type(None)), "id": (str,),
}
# Fields only some records have: a segment's keying (ObjectHeader.keying).
_OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"keying": (str,)}
# shard/name: two hex digits, then a file name without any path separator
_BLOB_REL = re.compile(r"^[0-9a-f]{2}/[^/\x00]+\.kvo$")


def decode_record(raw: Any) -> Record:
    """The record stored for one entry, validated field by field."""
    rec = unpack(raw)
    if not isinstance(rec, dict) or not set(_FIELDS) <= set(rec) <= set(_FIELDS) | set(
            _OPTIONAL_FIELDS):
        raise BadRecordError(f"index record is not an entry record: {rec!r:.200}")
    for name, types in (_FIELDS | _OPTIONAL_FIELDS).items():
        if name not in rec:
            continue
        value = rec[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadRecordError(f"index record field {name!r} holds {value!r:.80}")
    if rec.get("keying", "prefix") not in KEYINGS:
        raise BadRecordError(f"index record has unknown keying {rec['keying']!r}")
    if rec["nbytes"] <= 0 or rec["num_tokens"] <= 0 or rec["hits"] < 0:
        raise BadRecordError(f"index record has impossible sizes: {rec!r:.200}")
    if rec["loc"] not in BLOB_STORAGES:
        raise BadRecordError(f"index record has unknown location {rec['loc']!r}")
    if rec["loc"] == "files" and (rec["blob"] is None or not _BLOB_REL.match(rec["blob"])
                                  or ".." in rec["blob"]):
        raise BadRecordError(f"index record names an impossible blob file {rec['blob']!r}")
    return rec


def safe_name(key: str) -> str:
    """The file-name form of ``key`` (keys that are not hex digests are hashed)."""
    return key if is_key(key) else xxhash.xxh3_128_hexdigest(key.encode())


def blob_name(key: str, rec_id: str) -> str:
    """``<shard>/<safe key>.<record id>.kvo``, relative to the blobs directory."""
    safe = safe_name(key)
    return f"{safe[:2]}/{safe}.{rec_id}{BLOB_SUFFIX}"


def new_record_id(writer: str) -> str:
    """``<writer token>-<random>``: the writer's token lets a sweep ask whether the
    process that wrote a file is still alive (``writer_lease.writer_alive``)."""
    return f"{writer}-{os.urandom(6).hex()}"


def parse_blob_name(name: str) -> tuple[str, str | None] | None:
    """(safe key, writer token or None for files named before tokens existed) of a blob
    file or its temporary, or None when ``name`` is not one of ours."""
    if name.endswith(TMP_SUFFIX):
        name = name[: -len(TMP_SUFFIX)]
    if not name.endswith(BLOB_SUFFIX):
        return None
    parts = name[: -len(BLOB_SUFFIX)].split(".")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    safe, rec_id = parts
    writer, dash, _ = rec_id.partition("-")
    return safe, (writer if dash else None)


# -- the LMDB file ---------------------------------------------------------------------
# LMDB's on-disk format (mdb.c, 64-bit): every page starts with a 16-byte header — page
# number (8), pad (2), flags (2), then either lower/upper free-space bounds (2 + 2) or,
# on overflow pages, the run length in pages (4). Two meta pages lead the file.
_META_MAGIC = 0xBEEFC0DE
_META_VERSION = 1
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_F_BIGDATA, _F_SUBDATA, _F_DUPDATA = 0x01, 0x02, 0x04
_PAGE_HEADER = 16
_NODE_HEADER = 8  # lo, hi, flags, key size (2 bytes each)
_DB_STRUCT = "<IHHQQQQQ"  # pad (= page size in the free DB), flags, depth, 4 counts, root
_DB_SIZE = struct.calcsize(_DB_STRUCT)
_P_INVALID = (1 << 64) - 1


def _meta(page: bytes) -> tuple[int, int, int, tuple[Any, ...], tuple[Any, ...]] | None:
    """(txnid, last page, page size, free DB, main DB) of one meta page, or None."""
    if len(page) < _PAGE_HEADER + 24 + 2 * _DB_SIZE + 16:
        return None
    (flags,) = struct.unpack_from("<H", page, 10)
    magic, version = struct.unpack_from("<II", page, _PAGE_HEADER)
    if not flags & _P_META or magic != _META_MAGIC or version != _META_VERSION:
        return None
    free = struct.unpack_from(_DB_STRUCT, page, _PAGE_HEADER + 24)
    main = struct.unpack_from(_DB_STRUCT, page, _PAGE_HEADER + 24 + _DB_SIZE)
    last_pg, txnid = struct.unpack_from("<QQ", page, _PAGE_HEADER + 24 + 2 * _DB_SIZE)
    psize = free[0]
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return txnid, last_pg, psize, free, main


class _Walk:
    """Every branch, leaf and overflow page reachable from the trees' roots, checked the
    way LMDB will trust them: a bad page would otherwise trip an assertion in LMDB
    (an abort) or send it reading outside a page.

    One level of a tree at a time, every page and node of the level in one set of array
    operations over the mapped file (its size was checked first, so the mapping never
    reads past its end): an index of 100k entries has ~10k pages and ~100k nodes."""

    def __init__(self, mem: np.ndarray, psize: int, last_pg: int) -> None:
        self.mem, self.psize, self.last_pg = mem, psize, last_pg
        self.seen = np.zeros(last_pg + 1, dtype=bool)

    def u16(self, at: np.ndarray) -> np.ndarray:
        m = self.mem
        return m[at].astype(np.int64) | m[at + 1].astype(np.int64) << 8

    def u64(self, at: np.ndarray) -> np.ndarray:
        return self.u16(at) | self.u16(at + 2) << 16 | self.u16(at + 4) << 32 | self.u16(
            at + 6) << 48

    def visit(self, pages: np.ndarray) -> None:
        if ((pages < 2) | (pages > self.last_pg)).any():
            bad = pages[(pages < 2) | (pages > self.last_pg)][0]
            raise _Bad(f"a page number {bad} outside the file's pages 2..{self.last_pg}")
        before = np.count_nonzero(self.seen)
        self.seen[pages] = True
        if np.count_nonzero(self.seen) - before != len(pages):
            raise _Bad("a page is reached twice")
        if (self.u64(pages * self.psize) != pages).any():
            raise _Bad("a page does not hold the page its parent names")

    def tree(self, db: tuple[Any, ...], main: bool) -> None:
        _, flags, depth, *_, root = db
        if root == _P_INVALID:
            return
        if depth < 1 or depth > 32 or flags & 0x04:  # DUPSORT: never ours
            raise _Bad(f"a database with depth {depth} and flags {flags:#x}")
        pages = np.array([root], dtype=np.int64)
        for level in range(1, depth + 1):
            self.visit(pages)
            base = pages * self.psize
            pflags, lower, upper = self.u16(base + 10), self.u16(base + 12), self.u16(base + 14)
            kind = pflags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2)
            if (kind != (_P_LEAF if level == depth else _P_BRANCH)).any():
                raise _Bad(f"a page at level {level} of {depth} has the wrong kind")
            if ((lower < _PAGE_HEADER) | (lower > upper) | (upper > self.psize)
                    | (lower % 2 == 1)).any():
                raise _Bad("a page has impossible free-space bounds")
            counts = (lower - _PAGE_HEADER) // 2
            page_of = np.repeat(base, counts)
            within = np.arange(len(page_of)) - np.repeat(np.cumsum(counts) - counts, counts)
            ptrs = self.u16(page_of + _PAGE_HEADER + 2 * within)
            if ((ptrs < np.repeat(upper, counts)) | (ptrs + _NODE_HEADER > self.psize)).any():
                raise _Bad("a page has a node outside the page's nodes")
            at = page_of + ptrs
            lo, hi, nflags, ksize = (self.u16(at + k) for k in (0, 2, 4, 6))
            data = ptrs + _NODE_HEADER + ksize
            if (data > self.psize).any():
                raise _Bad("a page has a key past its end")
            if level < depth:
                pages = lo | hi << 16 | nflags << 32
                continue
            size = lo | hi << 16
            plain = nflags == 0
            if (data[plain] + size[plain] > self.psize).any():
                raise _Bad("a page has a value past its end")
            for i in np.flatnonzero(~plain):  # the few overflow and database nodes
                self.leaf_data(int(page_of[i] + data[i]), int(size[i]), int(nflags[i]), main)

    def leaf_data(self, at: int, size: int, flags: int, main: bool) -> None:
        if flags & _F_DUPDATA or flags & ~(_F_BIGDATA | _F_SUBDATA):
            raise _Bad(f"a node has flags {flags:#x}")
        if flags & _F_BIGDATA:
            if at % self.psize + 8 > self.psize:
                raise _Bad("an overflow reference past its page's end")
            first = int(self.u64(np.array([at]))[0])
            self.visit(np.array([first], dtype=np.int64))
            run = first * self.psize
            oflags = int(self.u16(np.array([run + 10]))[0])
            pages = int(self.u16(np.array([run + 12]))[0] | self.u16(np.array([run + 14]))[0]
                        << 16)
            if not oflags & _P_OVERFLOW or pages != -(-(_PAGE_HEADER + size) // self.psize) \
                    or first + pages - 1 > self.last_pg:
                raise _Bad(f"overflow page {first} does not hold {size} bytes")
            return
        if at % self.psize + size > self.psize:
            raise _Bad("a value past its page's end")
        if flags & _F_SUBDATA:
            if not main or size != _DB_SIZE:
                raise _Bad("a misplaced database record")
            raw = bytes(self.mem[at : at + _DB_SIZE])
            self.tree(struct.unpack(_DB_STRUCT, raw), main=False)


class _Bad(Exception):
    pass


# How many times a check that overlapped another process's commits is run again.
_CHECK_ATTEMPTS = 5


def check_index_file(data_file: Path) -> str | None:
    """Why the LMDB file ``data_file`` must not be mapped, or None when it may be.

    Reads LMDB's two meta pages (it uses the newer), checks that the file holds every page
    the newer one says is in use, and walks every tree it will read. Costs one read of
    the index's branch and leaf pages (not of blobs stored in it), at each open.

    Another process may be committing while we walk. The walk is not an LMDB reader, so
    once newer commits supersede the tree being walked its pages may be reused under us:
    a problem found while the newest transaction moved on proves nothing, and the walk is
    tried again. Only a problem seen over a file that stayed still is damage. A file whose
    every walk overlapped commits is in use by a live writer, which maps and walks it
    itself at each commit; it is trusted rather than reported damaged.
    """
    for attempt in range(_CHECK_ATTEMPTS):
        problem, txnid = _check_once(data_file)
        if problem is None or txnid == _newest_txnid(data_file):
            return problem
        time.sleep(random.uniform(0.005, 0.02) * (attempt + 1))  # let a burst of commits end
    log.info("%s: every check overlapped commits of another process; trusting it", data_file)
    return None


def _check_once(data_file: Path) -> tuple[str | None, int | None]:
    """(problem or None, the transaction id of the meta page walked, if any)."""
    txnid = None
    try:
        with open(data_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(1 << 16)
            if size == 0:
                return "is empty (0 bytes)", None
            metas = _metas(head)
            if not metas:
                return f"is not an LMDB file ({size} bytes, no valid meta page)", None
            txnid, last_pg, psize, free, main = max(metas, key=lambda m: m[0])
            need = (last_pg + 1) * psize
            if size < need:
                return f"is truncated: {size} bytes, but its pages reach {need}", txnid
            mem = np.memmap(f, dtype=np.uint8, mode="r", shape=(need,))
            try:
                walk = _Walk(mem, psize, last_pg)
                walk.tree(free, main=False)
                walk.tree(main, main=True)
            finally:
                mem._mmap.close()  # type: ignore[attr-defined]
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", txnid
    except (_Bad, struct.error) as e:
        return f"is damaged: {e}", txnid
    return None, txnid


def _metas(head: bytes) -> list[tuple[int, int, int, tuple[Any, ...], tuple[Any, ...]]]:
    """The valid ones of the two meta pages at the start of an LMDB file."""
    first = _meta(head)
    psize = first[2] if first is not None else 4096
    return [m for m in (first, _meta(head[psize : 2 * psize])) if m is not None]


def _newest_txnid(data_file: Path) -> int | None:
    try:
        with open(data_file, "rb") as f:
            metas = _metas(f.read(1 << 16))
    except OSError:
        return None
    return max(m[0] for m in metas) if metas else None


def index_problem(tier_dir: Path, *, readonly: bool) -> str | None:
    """Why the index of the disk tier at ``tier_dir`` must not be mapped, or None (also for
    a store that has no index yet). Raises ``StoreUnavailableError`` for a read-only open
    of a directory that holds no store."""
    data = tier_dir / INDEX_DIR / "data.mdb"
    if data.exists():
        problem = check_index_file(data)
        if problem is None or not problem.startswith("is empty"):
            return None if problem is None else f"index/data.mdb {problem}"
    elif readonly:
        raise StoreUnavailableError(
            f"no kvcache store at {tier_dir} (no index); check the path or create it by "
            "opening it writable"
        )
    # Missing or empty: a new store, unless blob files say objects were stored here.
    blobs = tier_dir / BLOBS_DIR
    if blobs.is_dir() and any(any(s.iterdir()) for s in blobs.iterdir() if s.is_dir()):
        return "index/data.mdb is missing or empty while blobs/ holds objects"
    return None
