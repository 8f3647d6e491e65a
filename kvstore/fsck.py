"""``kvcache fsck``: check a disk tier's index against its objects both ways, and repair it.

A check (read-only; it runs beside serving processes) finds:

- ``damaged-index``: the index cannot be used at all (its file is cut short, unreadable, or
  missing beside blob files) — the tier serves nothing until repaired;
- ``bad-record``: a record or key that does not decode (a flipped bit in the index);
- ``missing-object`` / ``corrupt-object`` / ``wrong-key``: a record whose object is gone,
  fails its checksum (every byte is read unless ``verify=False``) or holds another key's
  object (a blob copied over another's name);
- ``orphan``: an object no record references — a file left by a writer that died between
  writing and committing, or a blob in LMDB without a record;
- ``counter``: ``used_bytes`` differs from the sum of the records.

A repair needs the store to itself (an exclusive lock: stop the processes using it): a
damaged index is rebuilt from the objects' own headers (``rebuild_index``), and then every
problem above is removed — the entry, the orphan — and ``used_bytes`` is recounted. A
rebuild keeps every readable object whose header names the key its file name says; what
it cannot keep is the index's own bookkeeping: pins, hit counts, last-access times (set to
the file's modification time) and the lifetime counters start afresh.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from kvcache.kvstore.blob_files import read_blob_file, read_blob_header
from kvcache.kvstore.container import ObjectHeader, decode_object, header_of_bytes
from kvcache.kvstore.errors import CorruptObjectError, StoreCorruptError
from kvcache.kvstore.index_format import (
    BLOB_SUFFIX,
    BLOBS_DIR,
    INDEX_DIR,
    TMP_SUFFIX,
    WRITERS_DIR,
    BadRecordError,
    Record,
    check_index_file,
    decode_key,
    pack,
    parse_blob_name,
    safe_name,
    unpack_counter,
)
from kvcache.kvstore.lmdb_index import LmdbIndex
from kvcache.kvstore.writer_lease import writer_alive

_BATCH_BYTES = 64 << 20  # objects salvaged per LMDB transaction during a rebuild


@dataclass
class Problem:
    """One thing wrong: ``kind`` (see the module docstring), the entry's key or the
    object's file, and what was found."""

    kind: str
    where: str
    detail: str
    fixed: bool = False
    raw_key: bytes | None = field(default=None, repr=False)  # for bad records


@dataclass
class FsckReport:
    path: str
    blob_storage: str
    entries: int = 0
    objects_checked: int = 0
    bytes_checked: int = 0
    damage: str | None = None
    problems: list[Problem] = field(default_factory=list)
    repaired: bool = False
    # a rebuild: entries recovered, objects that could not be used, superseded copies
    rebuilt: dict[str, int] | None = None

    @property
    def clean(self) -> bool:
        """Nothing wrong is left (none found, or every one fixed)."""
        return all(p.fixed for p in self.problems)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def summary(self) -> str:
        parts = []
        if self.rebuilt is not None:
            r = self.rebuilt
            parts.append(f"index rebuilt: {r['recovered']} entries recovered, "
                         f"{r['unreadable']} objects unusable, {r['superseded']} older copies "
                         "removed")
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items()))
        parts.append(f"{self.entries} entries, {self.objects_checked} objects checked"
                     + (f"; problems: {found}" if found else "; no problems"))
        if self.problems:
            parts.append("all fixed" if self.clean else "not fixed (run with --repair)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p in d["problems"]:
            p.pop("raw_key", None)
        d["clean"] = self.clean
        d["counts"] = self.counts()
        return d


def fsck(
    path: str | os.PathLike[str],
    *,
    capacity_bytes: int,
    blob_storage: str = "files",
    repair: bool = False,
    verify: bool = True,
) -> FsckReport:
    """Check the disk tier at ``path`` (and fix what is wrong when ``repair``)."""
    from kvcache.kvstore.disk_tier import DiskTier

    path = Path(path).absolute()
    report = FsckReport(str(path), blob_storage)
    if repair:
        # Exclusive: no writer may be between writing a file and committing its record
        # while orphans are judged, and a damaged index is rebuilt by the open itself.
        tier = DiskTier(path, capacity_bytes, blob_storage=blob_storage, exclusive=True,
                        create=False, sweep=False)
        if tier.rebuilt is not None:
            report.damage = tier.rebuilt.damage
            report.rebuilt = tier.rebuilt.rebuilt
            report.problems.append(
                Problem("damaged-index", "index", str(report.damage), fixed=True))
    else:
        tier = DiskTier(path, capacity_bytes, blob_storage=blob_storage, readonly=True,
                        create=False)
    with tier:
        if tier.damage is not None:
            report.damage = tier.damage
            report.problems.append(Problem("damaged-index", "index", tier.damage))
            return report
        _check(tier, report, verify)
        if repair:
            _fix(tier, report)
            report.repaired = True
    return report


def _check(tier: Any, report: FsckReport, verify: bool) -> None:
    idx: LmdbIndex = tier.index
    with idx.read() as txn:
        rows = list(idx.records(txn))
        try:  # not idx.counter(): that reads a damaged counter as 0
            recorded = unpack_counter(txn.get(b"used_bytes", db=idx.meta))
            recorded_ok = True
        except BadRecordError:
            recorded, recorded_ok = 0, False
        lmdb_blob_keys = {bytes(k) for k, _ in txn.cursor(db=idx.blobs)}
    valid: list[tuple[str, Record]] = []
    for raw, key, rec, err in rows:
        if key is None or rec is None:
            report.problems.append(
                Problem("bad-record", raw.decode("utf-8", "replace"), str(err), raw_key=raw))
        else:
            valid.append((key, rec))
    report.entries = len(valid)
    for key, rec in valid:
        problem = _check_object(tier, key, rec, verify)
        report.objects_checked += 1
        if problem is None:
            report.bytes_checked += rec["nbytes"] if verify else 0
        else:
            report.problems.append(Problem(problem[0], key, problem[1]))
    in_lmdb = {k.encode() for k, rec in valid if rec["loc"] == "lmdb"}
    for k in sorted(lmdb_blob_keys - in_lmdb):
        report.problems.append(Problem("orphan", k.decode("utf-8", "replace"),
                                       "an object in LMDB that no record references",
                                       raw_key=k))
    referenced = {rec["blob"] for _, rec in valid if rec["blob"]}
    writers = Path(report.path) / WRITERS_DIR
    for rel, f in _blob_files(Path(report.path)):
        if rel in referenced:
            continue
        parsed = parse_blob_name(f.name)
        writer = None if parsed is None else parsed[1]
        state = "no writer named" if writer is None else \
            "writer alive" if writer_alive(writers, writer) else "writer dead"
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            continue
        report.problems.append(Problem("orphan", rel, f"{size} bytes, {state}"))
    actual = sum(rec["nbytes"] for _, rec in valid)
    if not recorded_ok or recorded != actual:
        shown = recorded if recorded_ok else "unreadable"
        report.problems.append(Problem(
            "counter", "used_bytes", f"recorded {shown}, records sum to {actual}"))


def _check_object(tier: Any, key: str, rec: Record, verify: bool) -> tuple[str, str] | None:
    """(problem kind, detail) for ``key``'s object, or None when it is sound."""
    try:
        header: ObjectHeader
        if rec["loc"] == "lmdb":
            with tier.index.read() as txn:
                buf = txn.get(key.encode(), db=tier.index.blobs)
                data = None if buf is None else bytearray(buf)
            if data is None:
                return "missing-object", "no object in LMDB"
            header = decode_object(data).header if verify else header_of_bytes(data)
            size = len(data)
        else:
            path = tier.blob_path(rec["blob"])
            size = path.stat().st_size
            header = read_blob_file(str(path)).header if verify else read_blob_header(str(path))
    except FileNotFoundError:
        return "missing-object", f"{rec['blob']} does not exist"
    except CorruptObjectError as e:
        return "corrupt-object", str(e)
    if header.key != key:
        return "wrong-key", f"holds the object of {header.key}"
    if size != rec["nbytes"]:
        return "corrupt-object", f"{size} bytes, the record says {rec['nbytes']}"
    return None


def _fix(tier: Any, report: FsckReport) -> None:
    idx: LmdbIndex = tier.index
    bad_raw = [p.raw_key for p in report.problems if p.kind == "bad-record" and p.raw_key]
    drop = {p.where for p in report.problems
            if p.kind in ("missing-object", "corrupt-object", "wrong-key")}
    lmdb_orphans = [p.raw_key for p in report.problems if p.kind == "orphan" and p.raw_key]
    removed: list[Record] = []

    def fn(txn: lmdb.Transaction) -> None:
        idx.drop_raw(txn, bad_raw)
        for key in drop:
            rec = idx.get_rec(txn, key)
            if rec is not None:
                idx.remove(txn, key, rec)
                removed.append(rec)
        for k in lmdb_orphans:
            txn.delete(k, db=idx.blobs)
        idx.add(txn, {"corrupt": len(removed)})
        idx.recount_used(txn)

    idx.write(fn)
    for rec in removed:
        if rec["blob"]:
            tier.blob_path(rec["blob"]).unlink(missing_ok=True)
    for p in report.problems:
        if p.kind == "orphan" and p.raw_key is None:
            tier.blob_path(p.where).unlink(missing_ok=True)
        p.fixed = True


def _blob_files(root: Path) -> list[tuple[str, Path]]:
    blobs = root / BLOBS_DIR
    out = []
    for shard in sorted(blobs.iterdir()) if blobs.is_dir() else ():
        for f in sorted(shard.iterdir()) if shard.is_dir() else ():
            out.append((f"{shard.name}/{f.name}", f))
    return out


# -- rebuilding ------------------------------------------------------------------------------
def rebuild_index(path: Path, blob_storage: str, map_size: int, why: str) -> FsckReport:
    """Replace the index at ``path`` by one built from the objects themselves.

    The caller holds the store's exclusive lock and has no environment open. Files mode:
    every blob file's header (its checksum is checked when the entry is read, as always);
    LMDB mode: what can still be read from the damaged file's ``blobs`` database, each
    object verified. The damaged index is removed once the new one is complete.
    """
    report = FsckReport(str(path), blob_storage, damage=why)
    index = path / INDEX_DIR
    damaged: Path | None = None
    if index.exists():
        damaged = path / f"{INDEX_DIR}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        index.rename(damaged)

    def refuse(problem: str) -> StoreCorruptError:
        return StoreCorruptError(f"the rebuilt index at {index} is unusable: {problem}")

    new = LmdbIndex(index, map_size=map_size, readonly=False, on_damage=refuse)
    try:
        if blob_storage == "files":
            stats = _rebuild_from_files(path, new)
        else:
            stats = _salvage_lmdb(damaged, new)
    finally:
        new.close()
    if damaged is not None:
        shutil.rmtree(damaged, ignore_errors=True)
    report.rebuilt = stats
    report.entries = stats["recovered"]
    return report


def _rebuild_from_files(path: Path, new: LmdbIndex) -> dict[str, int]:
    best: dict[str, tuple[float, str, Record]] = {}  # key -> (created, rel, record)
    unusable = superseded = 0
    for rel, f in _blob_files(path):
        parsed = parse_blob_name(f.name)
        if f.name.endswith(TMP_SUFFIX) or parsed is None or not f.name.endswith(BLOB_SUFFIX):
            f.unlink(missing_ok=True)  # an unfinished write: exclusive, so nobody's
            continue
        try:
            st = f.stat()
            header = read_blob_header(str(f))
        except (OSError, CorruptObjectError):
            unusable += 1
            f.unlink(missing_ok=True)
            continue
        if safe_name(header.key) != parsed[0]:  # a blob under another key's name
            unusable += 1
            f.unlink(missing_ok=True)
            continue
        rec_id = f.name[len(parsed[0]) + 1 : -len(BLOB_SUFFIX)]
        rec: Record = {
            "nbytes": st.st_size, "num_tokens": header.num_tokens, "codec": header.codec,
            "model_id": header.layout.model_id, "created_at": header.created_at,
            "last_access": max(header.created_at, st.st_mtime), "hits": 0, "pinned": False,
            "loc": "files", "blob": rel, "id": rec_id,
        }
        if header.keying != "prefix":
            rec["keying"] = header.keying
        prev = best.get(header.key)
        if prev is not None:  # two copies of one key (a crash mid-replace): keep the newer
            superseded += 1
            if (prev[0], prev[1]) >= (header.created_at, rel):
                f.unlink(missing_ok=True)
                continue
            (path / BLOBS_DIR / prev[1]).unlink(missing_ok=True)
        best[header.key] = (header.created_at, rel, rec)

    def write(txn: lmdb.Transaction) -> None:
        for key, (_, _, rec) in best.items():
            new.put_rec(txn, key, rec)
        txn.put(b"used_bytes", pack(sum(r["nbytes"] for _, _, r in best.values())),
                db=new.meta)

    new.write(write)
    return {"recovered": len(best), "unreadable": unusable, "superseded": superseded}


def _salvage_lmdb(damaged: Path | None, new: LmdbIndex) -> dict[str, int]:
    recovered = unusable = 0
    if damaged is None or not (damaged / "data.mdb").exists() \
            or check_index_file(damaged / "data.mdb") is not None:
        return {"recovered": 0, "unreadable": 0, "superseded": 0}  # nothing safe to map
    batch: list[tuple[str, bytes, ObjectHeader]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size

        def write(txn: lmdb.Transaction) -> None:
            for key, data, header in batch:
                now = time.time()
                txn.put(key.encode(), data, db=new.blobs)
                new.put_rec(txn, key, {
                    "nbytes": len(data), "num_tokens": header.num_tokens,
                    "codec": header.codec, "model_id": header.layout.model_id,
                    "created_at": header.created_at, "last_access": now, "hits": 0,
                    "pinned": False, "loc": "lmdb", "blob": None, "id": os.urandom(6).hex(),
                })
            new.add(txn, {"used_bytes": sum(len(d) for _, d, _ in batch)})

        if batch:
            new.write(write, size)
        batch, size = [], 0

    try:
        env = lmdb.open(str(damaged), readonly=True, lock=False, max_dbs=4,
                        map_size=max(1 << 30, (damaged / "data.mdb").stat().st_size))
    except lmdb.Error:
        return {"recovered": 0, "unreadable": 0, "superseded": 0}
    try:
        blobs = env.open_db(b"blobs", create=False)
        with env.begin(buffers=True) as txn:
            for k, v in txn.cursor(db=blobs):
                try:
                    key = decode_key(k)
                    data = bytes(v)
                    header = decode_object(bytearray(data)).header
                    if header.key != key:
                        raise CorruptObjectError("another key's object")
                except (BadRecordError, CorruptObjectError):
                    unusable += 1
                    continue
                batch.append((key, data, header))
                size += len(data)
                recovered += 1
                if size >= _BATCH_BYTES:
                    flush()
    except lmdb.Error:
        pass  # the rest of the tree is unreadable: keep what was salvaged
    finally:
        env.close()
    flush()
    return {"recovered": recovered, "unreadable": unusable, "superseded": 0}
