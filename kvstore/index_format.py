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

import os
import re
import struct
from pathlib import Path
from typing import Any

import msgpack
import xxhash

from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.keys import is_key

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
# shard/name: two hex digits, then a file name without any path separator
_BLOB_REL = re.compile(r"^[0-9a-f]{2}/[^/\x00]+\.kvo$")


def decode_record(raw: Any) -> Record:
    """The record stored for one entry, validated field by field."""
    rec = unpack(raw)
    if not isinstance(rec, dict) or set(rec) != set(_FIELDS):
        raise BadRecordError(f"index record is not an entry record: {rec!r:.200}")
    for name, types in _FIELDS.items():
        value = rec[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadRecordError(f"index record field {name!r} holds {value!r:.80}")
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
_META_MAGIC = 0xBEEFC0DE
_META_VERSION = 1
_P_META = 0x08
_PAGE_HEADER = 16  # pgno (8), pad (2), flags (2), lower (2), upper (2)
_DB_STRUCT = "<IHHQQQQQ"  # pad (= page size in the free DB), flags, depth, 4 counts, root
_DB_SIZE = struct.calcsize(_DB_STRUCT)


def _meta(page: bytes) -> tuple[int, int, int] | None:
    """(txnid, last page number, page size) of one LMDB meta page, or None if invalid."""
    if len(page) < _PAGE_HEADER + 24 + 2 * _DB_SIZE + 16:
        return None
    (flags,) = struct.unpack_from("<H", page, 10)
    magic, version = struct.unpack_from("<II", page, _PAGE_HEADER)
    if not flags & _P_META or magic != _META_MAGIC or version != _META_VERSION:
        return None
    psize = struct.unpack_from(_DB_STRUCT, page, _PAGE_HEADER + 24)[0]
    last_pg, txnid = struct.unpack_from("<QQ", page, _PAGE_HEADER + 24 + 2 * _DB_SIZE)
    if psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return None
    return txnid, last_pg, psize


def check_index_file(data_file: Path) -> str | None:
    """Why the LMDB file ``data_file`` must not be mapped, or None when it may be.

    Reads LMDB's two meta pages (it keeps the newer of the two) and checks that the file
    holds every page the newer one says is in use.
    """
    try:
        with open(data_file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(1 << 16)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "is empty (0 bytes)"
    metas = []
    first = _meta(head)
    psize = first[2] if first is not None else 4096
    for offset in (0, psize):
        m = _meta(head[offset : offset + psize])
        if m is not None:
            metas.append(m)
    if not metas:
        return f"is not an LMDB file ({size} bytes, no valid meta page)"
    _, last_pg, psize = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        return f"is truncated: {size} bytes, but its pages reach {need}"
    return None
