"""The store never serves another key's data, and a re-put replaces a key in every tier.

Wrong-key objects are made the way they happen: a blob file copied over another's name,
two names swapped, an LMDB value under the wrong key, a record moved to another key (what
a flipped bit in the index does). Every read path must treat them as corrupt: a counted
miss, removed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layer_loader import LayerLoader, LayerLoadError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("test-model", 2, 2, 8, dtype="float16")
TOKENS = 8
A, B, C = make_key(1), make_key(2), make_key(3)


def raw_obj(key: str, seed: int) -> StoredObject:
    return StoredObject(ObjectHeader(key, LAYOUT, TOKENS), {"kv": make_chunk(LAYOUT, TOKENS, seed)})


def blob_of(tier: DiskTier, key: str) -> Path:
    with tier.index.read() as txn:
        rec = tier.index.get_rec(txn, key)
    assert rec is not None
    return tier.blob_path(rec["blob"])


def filled(path: Path, storage: str = "files") -> DiskTier:
    t = DiskTier(path, 1 << 20, blob_storage=storage)
    for i, k in enumerate((A, B, C)):
        t.put(k, raw_obj(k, i))
    return t


# -- 1. wrong-key reads ---------------------------------------------------------------------
@pytest.mark.parametrize("read", ["get", "get_many", "header"])
def test_blob_copied_over_another_is_a_counted_miss(tmp_path: Path, read: str) -> None:
    with filled(tmp_path) as t:
        shutil.copyfile(blob_of(t, B), blob_of(t, A))  # A's name now holds B's object
        if read == "get":
            got = t.get(A)
        elif read == "get_many":
            got, other = t.get_many([A, C])
            assert other is not None and other.header.key == C
        else:
            got = t.header(A)
        assert got is None
        s = t.stats()
        assert s.corrupt == 1 and not t.contains(A)
        b = t.get(B)
        assert b is not None and b.header.key == B  # the source is untouched


def test_swapped_blob_names_serve_neither(tmp_path: Path) -> None:
    with filled(tmp_path) as t:
        pa, pb = blob_of(t, A), blob_of(t, B)
        tmp = pa.with_name("swap")
        pa.rename(tmp)
        pb.rename(pa)
        tmp.rename(pb)
        assert t.get(A) is None and t.get(B) is None
        assert t.stats().corrupt == 2
        c = t.get(C)
        assert c is not None and torch.equal(c.tensors["kv"], make_chunk(LAYOUT, TOKENS, 2))


def test_lmdb_blob_under_another_key_is_a_counted_miss(tmp_path: Path) -> None:
    with filled(tmp_path, "lmdb") as t:
        with t.index.env.begin(write=True) as txn:
            txn.put(A.encode(), txn.get(B.encode(), db=t.index.blobs), db=t.index.blobs)
        assert t.get(A) is None and t.header(A) is None
        assert t.stats().corrupt == 1 and not t.contains(A)


@pytest.mark.parametrize("storage", ["files", "lmdb"])
def test_record_under_a_flipped_key_is_a_counted_miss(tmp_path: Path, storage: str) -> None:
    """A bit flipped in an index key leaves A's record (and object) under a key A'."""
    flipped = A[:-1] + format(int(A[-1], 16) ^ 1, "x")
    with filled(tmp_path, storage) as t:
        idx = t.index
        with idx.env.begin(write=True) as txn:
            for db in (idx.entries, idx.blobs):
                value = txn.get(A.encode(), db=db)
                if value is not None:
                    txn.put(flipped.encode(), bytes(value), db=db)
                    txn.delete(A.encode(), db=db)
    with DiskTier(tmp_path, 1 << 20, blob_storage=storage) as t:
        assert flipped in {e.key for e in t.scan()}
        assert t.get(flipped) is None
        assert t.stats().corrupt == 1 and t.get(A) is None


def test_eviction_does_not_demote_another_keys_object(tmp_path: Path) -> None:
    demoted: list[str] = []
    with DiskTier(tmp_path, 1 << 20) as probe:
        probe.put(A, raw_obj(A, 0))
        one = probe.used_bytes
    shutil.rmtree(tmp_path)
    with DiskTier(tmp_path, 2 * one) as t:
        t.set_evict_handler(lambda k, o: demoted.append(f"{k}:{o.header.key}"))
        t.put(A, raw_obj(A, 0))
        t.put(B, raw_obj(B, 1))
        shutil.copyfile(blob_of(t, B), blob_of(t, A))
        t.put(C, raw_obj(C, 2))  # evicts A, whose file holds B's object
        assert demoted == [] and t.stats().corrupt == 1


def test_cpu_tier_never_serves_a_mismatched_entry() -> None:
    tier = CpuTier(1 << 20)
    with pytest.raises(CorruptObjectError, match="object of"):
        tier.put(A, raw_obj(B, 0))
    assert not tier.contains(A)
    tier.put(A, raw_obj(A, 0))
    # whatever lets a wrong header in (a bug), reads must not hand it out
    tier._entries[A].header = raw_obj(B, 0).header
    assert tier.get(A) is None
    with tier.borrow(A) as got:
        assert got is None
    assert tier.stats().corrupt == 1 and not tier.contains(A)


def test_store_and_layer_loader_miss_a_wrong_key_object(tmp_path: Path) -> None:
    layout = LAYOUT
    with TieredStore([CpuTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)]) as store:
        for i, k in enumerate((A, B)):
            store.put(k, make_chunk(layout, TOKENS, i), layout)
        store.flush()
        disk = store.tiers[1]
        assert isinstance(disk, DiskTier)
        store.tiers[0].delete(A)  # only the disk copy is left
        shutil.copyfile(blob_of(disk, B), blob_of(disk, A))
        with pytest.raises(LayerLoadError, match="missing"):
            LayerLoader(store, [A, B], layout)
        assert store.get(A) is None and not store.contains(A)
        assert torch.equal(store.get(B), make_chunk(layout, TOKENS, 1))  # type: ignore[arg-type]


# -- 2. a put of an existing key reaches every tier ----------------------------------------------
def _reopen_and_read(store_dir: Path, key: str, storage: str) -> torch.Tensor:
    code = textwrap.dedent(f"""
        import sys, torch
        from kvcache.kvstore.disk_tier import DiskTier
        from kvcache.kvstore.cpu_tier import CpuTier
        from kvcache.kvstore.tiered_store import TieredStore
        with TieredStore([CpuTier(1 << 20), DiskTier({str(store_dir)!r}, 1 << 20,
                                                     blob_storage={storage!r})]) as s:
            torch.save(s.get({key!r}), sys.argv[1])
    """)
    out = store_dir.parent / "read.pt"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=120)
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["files", "lmdb"])
@pytest.mark.parametrize("write_mode", ["write-through", "write-back"])
def test_overwrite_reaches_disk_and_survives_a_restart(
    tmp_path: Path, write_mode: str, storage: str
) -> None:
    v1, v2 = make_chunk(LAYOUT, TOKENS, 1), make_chunk(LAYOUT, TOKENS, 2)
    d = tmp_path / "disk"
    with TieredStore([CpuTier(1 << 20), DiskTier(d, 1 << 20, blob_storage=storage)],
                     write_mode=write_mode) as store:
        store.put(A, v1, LAYOUT)
        store.flush()
        store.put(A, v2, LAYOUT)
        assert torch.equal(store.get(A), v2)  # type: ignore[arg-type]
        store.flush()
    assert torch.equal(_reopen_and_read(d, A, storage), v2)


def test_overwrite_of_an_entry_evicted_before_its_write_down(tmp_path: Path) -> None:
    """v2 lands in the CPU tier and is evicted at once: the demotion must replace the
    disk's v1 even though the disk already 'has' the key."""
    v1, v2 = make_chunk(LAYOUT, TOKENS, 1), make_chunk(LAYOUT, TOKENS, 2)
    cpu = CpuTier(4 * 1024)  # four 1 KiB objects
    with TieredStore([cpu, DiskTier(tmp_path / "d", 1 << 20)], write_mode="write-back") as s:
        s.put(A, v1, LAYOUT)
        s.flush()
        s.put(A, v2, LAYOUT)
        for i in range(3, 20):  # fill the CPU tier until A is evicted
            s.put(make_key(i), make_chunk(LAYOUT, TOKENS, i), LAYOUT)
            if not cpu.contains(A):
                break
        assert not cpu.contains(A)
        assert torch.equal(s.get(A), v2)  # type: ignore[arg-type]


@pytest.mark.slow
def test_overwrite_that_falls_through_drops_the_older_copy_above(tmp_path: Path) -> None:
    """The CPU tier cannot take v2 (its only other entry is pinned, and a put never evicts
    the key it replaces): v2 goes to disk, and the CPU's v1 must not shadow it."""
    v1, v2 = make_chunk(LAYOUT, TOKENS, 1), make_chunk(LAYOUT, TOKENS, 2)
    cpu = CpuTier(2 * 1024)  # two 1 KiB objects
    with TieredStore([cpu, DiskTier(tmp_path / "d", 1 << 20)], write_mode="write-back") as s:
        s.put(A, v1, LAYOUT)
        s.put(B, make_chunk(LAYOUT, TOKENS, 5), LAYOUT)
        s.pin(B)
        s.put(A, v2, LAYOUT)
        assert not cpu.contains(A)
        assert torch.equal(s.get(A), v2)  # type: ignore[arg-type]
        s.flush()
    assert torch.equal(_reopen_and_read(tmp_path / "d", A, "files"), v2)


def test_lmdb_value_flip_is_caught_by_the_checksum(tmp_path: Path) -> None:
    with filled(tmp_path, "lmdb") as t:
        with t.index.env.begin(write=True) as txn:
            value = bytearray(txn.get(A.encode(), db=t.index.blobs))
            value[-1] ^= 0x10
            txn.put(A.encode(), bytes(value), db=t.index.blobs)
        assert t.get(A) is None and t.stats().corrupt == 1


# -- objects that cannot be decoded --------------------------------------------------------------
def test_an_undecodable_object_is_a_counted_miss_removed_everywhere(tmp_path: Path) -> None:
    """What an older build stored for a chunk with one +inf under fp8 (an inf scale):
    every read used to raise, the entry stayed and lookups kept counting it."""
    from kvcache.codecs.registry import get_codec

    chunk = make_chunk(LAYOUT, TOKENS, 0)
    tensors, params = get_codec("fp8").encode(chunk, LAYOUT)
    tensors["scale"][0, 0, 0] = float("inf")
    poisoned = StoredObject(ObjectHeader(A, LAYOUT, TOKENS, "fp8", params), tensors)
    with TieredStore([CpuTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)],
                     codecs=["fp8", "fp8"]) as store:
        for tier in store.tiers:
            tier.put(A, poisoned)
        assert store.longest_prefix([A]) == 1
        assert store.get(A) is None
        assert store.counters.corrupt == 1 and store.counters.read_misses == 1
        assert store.longest_prefix([A]) == 0 and not store.contains(A)
        for tier in store.tiers:  # and the loader's path: the request fails, the entry goes
            tier.put(A, poisoned)
        with LayerLoader(store, [A], LAYOUT) as loader, pytest.raises(LayerLoadError):
            loader.wait_all()
        assert not store.contains(A) and store.counters.corrupt == 2
