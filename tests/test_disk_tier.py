"""DiskTier: durability, eviction order, corruption handling, locking, disk-full paths."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lmdb
import pytest
import torch

from kvcache.kvstore import disk_tier, lmdb_index
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import (
    DiskFullError,
    EntryPinnedError,
    ObjectTooLargeError,
    StoreFullError,
    StoreUnavailableError,
)
from kvcache.kvstore.layout import KVLayout

LAYOUT = KVLayout("test-model", 2, 2, 8, dtype="float16")
STORAGES = ["files", "lmdb"]


def key(i: int) -> str:
    return f"{i:032x}"


def make_obj(k: str, fill: float | None = None, num_tokens: int = 4) -> StoredObject:
    """A raw object; chunk ``[2, 2, num_tokens, 2, 8]`` float16 (constant when ``fill``)."""
    shape = LAYOUT.chunk_shape(num_tokens)
    if fill is None:
        g = torch.Generator().manual_seed(int(k[-6:], 16))
        kv = torch.randn(shape, generator=g).to(torch.float16)
    else:
        kv = torch.full(shape, fill, dtype=torch.float16)
    return StoredObject(ObjectHeader(k, LAYOUT, num_tokens, created_at=1.0), {"kv": kv})


def obj_size(tmp_path: Path) -> int:
    with DiskTier(tmp_path / "probe", 1 << 20) as t:
        t.put(key(0), make_obj(key(0)))
        return t.used_bytes


def keys_of(t: DiskTier) -> set[str]:
    return {e.key for e in t.scan()}


def blob_files(path: Path) -> list[Path]:
    return sorted(p for p in (path / "blobs").rglob("*") if p.is_file())


def run_py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
        timeout=60,
    )


@pytest.mark.parametrize("storage", STORAGES)
def test_roundtrip_bit_exact(tmp_path: Path, storage: str) -> None:
    with DiskTier(tmp_path, 1 << 20, blob_storage=storage) as t:
        obj = make_obj(key(1))
        t.put(key(1), obj)
        got = t.get(key(1))
        assert got is not None
        assert got.header == obj.header
        assert torch.equal(got.tensors["kv"].view(torch.int16), obj.tensors["kv"].view(torch.int16))
        got.tensors["kv"].add_(1)  # the caller owns the tensors
        assert t.contains(key(1)) and not t.contains(key(2))
        assert t.get(key(2)) is None
        hdr = t.header(key(1))
        assert hdr == obj.header
        info = t.info(key(1))
        assert info is not None and info.tier == "disk" and info.num_tokens == 4
        assert info.hits == 1 and info.model_id == "test-model" and info.nbytes == t.used_bytes
        # replacing keeps one entry and the accounting exact
        t.put(key(1), make_obj(key(1), fill=2.0))
        got = t.get(key(1))
        assert got is not None and bool((got.tensors["kv"] == 2.0).all())
        s = t.stats()
        assert (s.name, s.entries, s.puts, s.hits, s.misses) == ("disk", 1, 2, 2, 1)
        assert s.used_bytes == t.info(key(1)).nbytes  # type: ignore[union-attr]
        if storage == "files":
            assert len(blob_files(tmp_path)) == 1  # the replaced file is gone


@pytest.mark.parametrize("storage", STORAGES)
def test_lru_eviction_order(tmp_path: Path, storage: str) -> None:
    size = obj_size(tmp_path)
    with DiskTier(tmp_path / "s", 3 * size + size // 2, blob_storage=storage) as t:
        for i in (1, 2, 3):
            t.put(key(i), make_obj(key(i)))
        assert t.get(key(1)) is not None
        t.put(key(4), make_obj(key(4)))
        assert keys_of(t) == {key(1), key(3), key(4)}
        t.put(key(5), make_obj(key(5)))
        assert keys_of(t) == {key(1), key(4), key(5)}
        assert t.stats().evictions == 2 and t.used_bytes == 3 * size
    if storage == "files":
        assert len(blob_files(tmp_path / "s")) == 3
    # the order survives a restart: rebuilt from last_access
    with DiskTier(tmp_path / "s", 3 * size + size // 2, blob_storage=storage) as t:
        assert t.get(key(4)) is not None
        t.put(key(6), make_obj(key(6)))
        assert keys_of(t) == {key(4), key(5), key(6)}


def test_lfu_eviction_order(tmp_path: Path) -> None:
    size = obj_size(tmp_path)
    with DiskTier(tmp_path / "s", 3 * size, policy="lfu") as t:
        for i in (1, 2, 3):
            t.put(key(i), make_obj(key(i)))
        for k in (key(1), key(1), key(2)):
            assert t.get(k) is not None
        t.put(key(4), make_obj(key(4)))
        assert keys_of(t) == {key(1), key(2), key(4)}
        t.put(key(5), make_obj(key(5)))  # key(4) has fewer hits than 1 and 2
        assert keys_of(t) == {key(1), key(2), key(5)}


def test_pinned_never_evicted_and_store_full(tmp_path: Path) -> None:
    size = obj_size(tmp_path)
    path = tmp_path / "s"
    with DiskTier(path, 2 * size) as t:
        t.put(key(1), make_obj(key(1)))
        t.put(key(2), make_obj(key(2)))
        assert t.set_pinned(key(1), True)
        t.put(key(3), make_obj(key(3)))
        assert keys_of(t) == {key(1), key(3)}
        assert t.set_pinned(key(3), True)
        before = t.used_bytes
        with pytest.raises(StoreFullError) as ei:
            t.put(key(4), make_obj(key(4)))
        assert not isinstance(ei.value, ObjectTooLargeError)
        assert keys_of(t) == {key(1), key(3)} and t.used_bytes == before
        assert len(blob_files(path)) == 2  # no partial entry, no stray file
        with pytest.raises(ObjectTooLargeError):
            t.put(key(5), make_obj(key(5), num_tokens=16))
        assert keys_of(t) == {key(1), key(3)}


def test_delete_and_pin_semantics(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(key(1), make_obj(key(1)))
        assert t.set_pinned(key(1), True) and not t.set_pinned(key(9), True)
        with pytest.raises(EntryPinnedError):
            t.delete(key(1))
        assert t.contains(key(1))
    with DiskTier(tmp_path, 1 << 20) as t:  # pins persist
        info = t.info(key(1))
        assert info is not None and info.pinned
        assert t.delete(key(1), force=True)
        assert not t.delete(key(1))
        assert t.used_bytes == 0 and blob_files(tmp_path) == []
        t.put(key(2), make_obj(key(2)))
        assert t.delete(key(2)) and t.get(key(2)) is None


def test_evict_handler_sees_victim_before_removal(tmp_path: Path) -> None:
    size = obj_size(tmp_path)
    seen: list[tuple[str, bool]] = []
    with DiskTier(tmp_path / "s", size) as t:
        t.set_evict_handler(lambda k, o: seen.append((k, torch.equal(
            o.tensors["kv"], make_obj(k).tensors["kv"]))))
        t.put(key(1), make_obj(key(1)))
        t.put(key(2), make_obj(key(2)))
        assert seen == [(key(1), True)]

        def refuse(k: str, o: StoredObject) -> None:
            raise RuntimeError("lower tier down")

        t.set_evict_handler(refuse)
        with pytest.raises(RuntimeError):
            t.put(key(3), make_obj(key(3)))
        assert keys_of(t) == {key(2)}  # nothing lost when the handler fails


@pytest.mark.slow
@pytest.mark.parametrize("storage", STORAGES)
def test_durable_across_processes(tmp_path: Path, storage: str) -> None:
    child_put = f"""
        import torch
        from kvcache.kvstore.disk_tier import DiskTier
        from kvcache.kvstore.container import ObjectHeader, StoredObject
        from kvcache.kvstore.layout import KVLayout
        L = KVLayout("test-model", 2, 2, 8, dtype="float16")
        with DiskTier({str(tmp_path)!r}, 1 << 20, blob_storage={storage!r}) as t:
            t.put("c" * 32, StoredObject(ObjectHeader("c" * 32, L, 4),
                  {{"kv": torch.full(L.chunk_shape(4), 3.0, dtype=torch.float16)}}))
            obj = t.get("p" * 32)
            assert obj is not None and bool((obj.tensors["kv"] == 7.0).all())
            print("ok", t.stats().hits)
    """
    with DiskTier(tmp_path, 1 << 20, blob_storage=storage) as t:
        t.put("p" * 32, make_obj("p" * 32, fill=7.0))
    r = run_py(child_put)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "1"]
    with DiskTier(tmp_path, 1 << 20, blob_storage=storage) as t:
        got = t.get("c" * 32)
        assert got is not None and bool((got.tensors["kv"] == 3.0).all())
        assert keys_of(t) == {"c" * 32, "p" * 32}
        assert t.info("p" * 32).hits == 1  # type: ignore[union-attr]


@pytest.mark.slow
def test_resyncs_with_entries_added_by_another_process(tmp_path: Path) -> None:
    size = obj_size(tmp_path)
    path = tmp_path / "s"
    with DiskTier(path, 2 * size) as t:
        r = run_py(f"""
            import torch
            from kvcache.kvstore.disk_tier import DiskTier
            from kvcache.kvstore.container import ObjectHeader, StoredObject
            from kvcache.kvstore.layout import KVLayout
            L = KVLayout("test-model", 2, 2, 8, dtype="float16")
            with DiskTier({str(path)!r}, {2 * size}) as t:
                for k in ("a" * 32, "b" * 32):
                    kv = torch.zeros(L.chunk_shape(4), dtype=torch.float16)
                    t.put(k, StoredObject(ObjectHeader(k, L, 4, created_at=1.0), {{"kv": kv}}))
        """)
        assert r.returncode == 0, r.stderr
        assert t.used_bytes == 2 * size  # counters are shared through LMDB
        t.put(key(1), make_obj(key(1)))  # policy knew nothing: it re-reads the index
        assert keys_of(t) == {"b" * 32, key(1)}
        assert t.used_bytes == 2 * size


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_payload", "flip_header", "truncate", "missing"])
def test_corrupt_file_is_a_counted_miss(tmp_path: Path, damage: str) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(key(1), make_obj(key(1)))
        t.put(key(2), make_obj(key(2)))
    victim = next(p for p in blob_files(tmp_path) if p.name.startswith(key(1)))
    if damage == "flip_payload":
        flip_byte(victim, victim.stat().st_size - 3)
    elif damage == "flip_header":
        flip_byte(victim, 20)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    with DiskTier(tmp_path, 1 << 20) as t:
        if damage in ("truncate", "missing", "flip_header"):
            assert t.header(key(1)) is None  # header() notices what it can without a checksum
        else:
            assert t.get(key(1)) is None
        assert not t.contains(key(1)) and t.get(key(1)) is None
        s = t.stats()
        assert s.corrupt == 1 and s.entries == 1 and s.used_bytes == t.info(key(2)).nbytes  # type: ignore[union-attr]
        assert t.get(key(2)) is not None
    assert not victim.exists()
    with DiskTier(tmp_path, 1 << 20) as t:
        assert t.stats().corrupt == 1  # lifetime counter


def test_corrupt_lmdb_value_is_a_counted_miss(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20, blob_storage="lmdb") as t:
        t.put(key(1), make_obj(key(1)))
    env = lmdb.open(str(tmp_path / "index"), max_dbs=4)
    blobs = env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        data = bytearray(txn.get(key(1).encode(), db=blobs))
        data[-5] ^= 0x01
        txn.put(key(1).encode(), bytes(data), db=blobs)
    env.close()
    with DiskTier(tmp_path, 1 << 20, blob_storage="lmdb") as t:
        assert t.header(key(1)) is not None  # the header is intact; only get verifies
        assert t.get(key(1)) is None
        s = t.stats()
        assert (s.corrupt, s.misses, s.entries, s.used_bytes) == (1, 1, 0, 0)


def test_open_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreUnavailableError, match="open it writable"):
        DiskTier(tmp_path / "nope", 1 << 20, create=False)
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        DiskTier(tmp_path / "nope", 1 << 20, readonly=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreUnavailableError, match="no kvcache store"):
        DiskTier(tmp_path / "empty", 1 << 20, readonly=True)
    real_open = os.open

    def ro_open(path: object, flags: int, *args: object) -> int:
        if str(path).endswith("kvcache.lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(disk_tier.os, "open", ro_open)
    with pytest.raises(StoreUnavailableError, match="KVCACHE_READONLY=1 or --readonly"):
        DiskTier(tmp_path / "ro", 1 << 20)


def test_readonly_rejects_writes(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(key(1), make_obj(key(1)))
    with DiskTier(tmp_path, 1 << 20, readonly=True) as t:
        assert t.get(key(1)) is not None
        for write in (lambda: t.put(key(2), make_obj(key(2))), lambda: t.delete(key(1)),
                      lambda: t.set_pinned(key(1), True)):
            with pytest.raises(StoreUnavailableError, match="read-only"):
                write()
        assert keys_of(t) == {key(1)}


@pytest.mark.slow
def test_locking(tmp_path: Path) -> None:
    probe = f"""
        from kvcache.kvstore.disk_tier import DiskTier
        from kvcache.kvstore.errors import StoreUnavailableError
        try:
            DiskTier({str(tmp_path)!r}, 1 << 20, exclusive=EXCL).close()
            print("opened")
        except StoreUnavailableError as e:
            print("locked" if "locked by another process" in str(e) else e)
    """
    with DiskTier(tmp_path, 1 << 20) as t:
        with pytest.raises(StoreUnavailableError, match="already open in this process"):
            DiskTier(tmp_path, 1 << 20)
        assert run_py(probe.replace("EXCL", "True")).stdout.strip() == "locked"
        assert t.contains(key(1)) is False
    with DiskTier(tmp_path, 1 << 20, exclusive=True):
        assert run_py(probe.replace("EXCL", "False")).stdout.strip() == "locked"
    assert run_py(probe.replace("EXCL", "True")).stdout.strip() == "opened"


@pytest.mark.parametrize("storage", STORAGES)
def test_disk_full_leaves_store_unchanged(
    tmp_path: Path, storage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DiskTier(tmp_path, 1 << 20, blob_storage=storage) as t:
        t.put(key(1), make_obj(key(1)))
        before = (keys_of(t), t.used_bytes, t.stats().puts, blob_files(tmp_path))

        def enospc(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def map_full(*args: object) -> None:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")

        if storage == "files":
            monkeypatch.setattr(disk_tier, "publish_blob_file", enospc)
        else:
            monkeypatch.setattr(disk_tier, "lmdb_put", map_full)
            monkeypatch.setattr(lmdb_index, "free_disk_bytes", lambda p: 0)
        with pytest.raises(DiskFullError, match="free disk space"):
            t.put(key(2), make_obj(key(2)))
        assert (keys_of(t), t.used_bytes, t.stats().puts, blob_files(tmp_path)) == before


def test_lmdb_map_grows_instead_of_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_put = lmdb_index.lmdb_put

    def full_once(txn: lmdb.Transaction, k: bytes, v: bytes, db: object) -> None:
        calls.append(k)
        if len(calls) == 1:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")
        real_put(txn, k, v, db)

    with DiskTier(tmp_path, 1 << 20, blob_storage="lmdb") as t:
        size0 = t.index.map_size
        monkeypatch.setattr(disk_tier, "lmdb_put", full_once)
        t.put(key(1), make_obj(key(1)))
        assert t.index.map_size > size0
        assert t.get(key(1)) is not None and len(calls) == 2


@pytest.mark.parametrize("storage", STORAGES)
def test_threads_put_get_no_torn_reads(tmp_path: Path, storage: str) -> None:
    size = obj_size(tmp_path)
    errors: list[BaseException] = []
    with DiskTier(tmp_path / "s", 6 * size, blob_storage=storage) as t:

        def worker(w: int) -> None:
            try:
                for i in range(40):
                    k = key(i % 8)
                    if (i + w) % 3:
                        # the fill names the writer: a torn read would mix two fills
                        t.put(k, make_obj(k, fill=float(w * 100 + i)))
                    else:
                        obj = t.get(k)
                        if obj is not None:
                            kv = obj.tensors["kv"]
                            assert bool((kv == kv.flatten()[0]).all()), "torn read"
                    if i % 10 == 0:
                        list(t.scan())
            except BaseException as e:  # surfaced in the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        s = t.stats()
        assert s.corrupt == 0 and s.used_bytes <= 6 * size
        assert s.used_bytes == sum(e.nbytes for e in t.scan())
    if storage == "files":
        assert len(blob_files(tmp_path / "s")) == s.entries


def test_counters_and_access_persist(tmp_path: Path) -> None:
    size = obj_size(tmp_path)
    with DiskTier(tmp_path / "s", size) as t:
        t.put(key(1), make_obj(key(1)))
        t.put(key(2), make_obj(key(2)))  # evicts key(1)
        for _ in range(3):
            assert t.get(key(2)) is not None
        assert t.get(key(1)) is None
    with DiskTier(tmp_path / "s", size, readonly=True) as t:
        s = t.stats()
        assert (s.puts, s.hits, s.misses, s.evictions, s.entries) == (2, 3, 1, 1, 1)
        assert s.bytes_written == 2 * size and s.bytes_read == 3 * size
        info = t.info(key(2))
        assert info is not None and info.hits == 3 and info.last_access > info.created_at


def test_orphan_files_swept_on_exclusive_open(tmp_path: Path) -> None:
    with DiskTier(tmp_path, 1 << 20) as t:
        t.put(key(1), make_obj(key(1)))
    shard = blob_files(tmp_path)[0].parent
    (shard / "junk.kvo.tmp").write_bytes(b"partial")
    with DiskTier(tmp_path, 1 << 20):
        assert len(blob_files(tmp_path)) == 2  # young orphans may be another writer's
    with DiskTier(tmp_path, 1 << 20, exclusive=True) as t:
        assert len(blob_files(tmp_path)) == 1 and t.get(key(1)) is not None
