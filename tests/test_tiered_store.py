"""TieredStore: lookup across tiers, promotion, demotion, write modes, pins, TTL, errors.

Tiers are real: a CpuTier and an LMDB-backed DiskTier in a temp directory.
"""

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import (
    KVCacheError,
    LayoutMismatchError,
    StoreFullError,
    UnknownCodecError,
)
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_chunk, make_key

disk_tier = pytest.importorskip("kvcache.kvstore.disk_tier")
DiskTier = disk_tier.DiskTier

TOKENS = 8  # 1 KiB per object with the fp16 test layout


def make_store(tmp_path, *, cpu_objects=4, write_mode="write-through", **kw):
    cpu = CpuTier(cpu_objects * 1024)
    disk = DiskTier(tmp_path / "disk", 1 << 20)
    return TieredStore([cpu, disk], write_mode=write_mode, **kw)


def test_cpu_only_roundtrip(layout):
    with TieredStore.in_memory(1 << 20) as store:
        chunk = make_chunk(layout, TOKENS)
        store.put(make_key(0), chunk, layout)
        assert torch.equal(store.get(make_key(0)), chunk)
        assert store.get(make_key(1)) is None
        assert store.where(make_key(0)) == "cpu"


@pytest.mark.parametrize("write_mode", ["write-through", "write-back"])
def test_eviction_demotes_instead_of_dropping(tmp_path, layout, write_mode):
    chunks = {i: make_chunk(layout, TOKENS, i) for i in range(10)}
    with make_store(tmp_path, write_mode=write_mode) as store:
        for i, c in chunks.items():
            store.put(make_key(i), c, layout)
        store.flush()
        cpu, disk = store.tiers
        assert cpu.stats().entries == 4
        assert all(disk.contains(make_key(i)) for i in range(10))
        for i, c in chunks.items():
            assert torch.equal(store.get(make_key(i)), c)


def test_write_back_writes_only_on_eviction_or_flush(tmp_path, layout):
    with make_store(tmp_path, write_mode="write-back") as store:
        cpu, disk = store.tiers
        for i in range(4):
            store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
        assert disk.stats().entries == 0
        store.put(make_key(4), make_chunk(layout, TOKENS, 4), layout)  # evicts key 0
        assert disk.contains(make_key(0)) and not cpu.contains(make_key(0))
        assert disk.stats().entries == 1
        store.flush()
        assert disk.stats().entries == 5


def test_disk_hit_is_promoted_to_cpu(tmp_path, layout):
    with make_store(tmp_path, cpu_objects=2) as store:
        for i in range(3):
            store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
            # The writer's copy-out holds an entry for a moment, and the CPU tier then
            # evicts the next victim instead of waiting: settle before each put.
            store.flush()
        assert store.where(make_key(0)) == "disk"
        assert torch.equal(store.get(make_key(0)), make_chunk(layout, TOKENS, 0))
        assert store.where(make_key(0)) == "cpu"
        assert store.counters.promotions == 1
        assert store.stats()["disk"].hits == 1


def test_longest_prefix_across_tiers(tmp_path, layout):
    with make_store(tmp_path, cpu_objects=2) as store:
        keys = [make_key(i) for i in range(5)]
        for i in (0, 1, 2, 4):
            store.put(keys[i], make_chunk(layout, TOKENS, i), layout)
        store.flush()
        assert {store.where(k) for k in keys[:3]} == {"cpu", "disk"}
        assert store.longest_prefix(keys) == 3
        assert store.longest_prefix(keys[3:]) == 0
        assert store.contains_many(keys) == [True, True, True, False, True]


@pytest.mark.slow
def test_restart_serves_everything_from_disk(tmp_path, layout):
    chunks = {i: make_chunk(layout, TOKENS, i) for i in range(6)}
    with make_store(tmp_path) as store:
        for i, c in chunks.items():
            store.put(make_key(i), c, layout)
    # A new process on the same directory sees what the first one stored.
    code = textwrap.dedent(f"""
        import torch
        from kvcache.kvstore.cpu_tier import CpuTier
        from kvcache.kvstore.disk_tier import DiskTier
        from kvcache.kvstore.tiered_store import TieredStore
        from tests.helpers import make_key
        with TieredStore([CpuTier(1 << 20), DiskTier({str(tmp_path / 'disk')!r}, 1 << 20)]) as s:
            print(sum(s.get(make_key(i)) is not None for i in range(6)), s.where(make_key(0)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.stdout.split() == ["6", "cpu"]
    with make_store(tmp_path) as store:
        for i, c in chunks.items():
            assert torch.equal(store.get(make_key(i)), c)


def test_pinned_entries_stay_in_cpu(tmp_path, layout):
    with make_store(tmp_path, cpu_objects=2) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS, 0), layout)
        store.pin(make_key(0))
        for i in range(1, 5):
            store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
        store.flush()
        assert store.where(make_key(0)) == "cpu"
        assert store.tiers[1].info(make_key(0)).pinned  # the disk copy is pinned too
        store.unpin(make_key(0))
        for i in range(5, 7):
            store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
        assert store.where(make_key(0)) == "disk"


def test_ttl_expires_entries(tmp_path, layout):
    with make_store(tmp_path, ttl_s=0.2) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS), layout)
        store.flush()
        assert store.get(make_key(0)) is not None
        time.sleep(0.3)
        assert store.get(make_key(0)) is None
        assert not store.contains(make_key(0))
        store.put(make_key(1), make_chunk(layout, TOKENS), layout)
        store.flush()
        time.sleep(0.3)
        assert store.evict_expired() == 2  # CPU and disk copies


def test_bad_puts_change_nothing(tmp_path, layout):
    with make_store(tmp_path) as store:
        good = make_chunk(layout, TOKENS)
        store.put(make_key(0), good, layout)
        with pytest.raises(LayoutMismatchError, match="dtype"):
            store.put(make_key(1), good.float(), layout)
        with pytest.raises(LayoutMismatchError, match="shape"):
            store.put(make_key(1), good[:1], layout)
        other = KVLayout("other", 2, 2, 16, dtype="float16")
        with pytest.raises(LayoutMismatchError):
            store.put(make_key(1), good, other)
        with pytest.raises(KVCacheError, match="key"):
            store.put("not-a-key", good, layout)
        with pytest.raises(LayoutMismatchError):  # a batch with one bad item stores nothing
            store.put_many([(make_key(2), good), (make_key(3), good.float())], layout)
        store.flush()
        assert [s.entries for s in store.stats().values()] == [1, 1]
        assert torch.equal(store.get(make_key(0)), good)


def test_unknown_codec_is_a_typed_error(tmp_path):
    with pytest.raises(UnknownCodecError, match=r"known codecs: .*raw"):
        TieredStore([CpuTier(1024)], codecs=["zip9000"])


def test_corrupt_disk_object_is_a_counted_miss(tmp_path, layout):
    with make_store(tmp_path, cpu_objects=1) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS, 0), layout)
        store.put(make_key(1), make_chunk(layout, TOKENS, 1), layout)
        store.flush()
        assert store.where(make_key(0)) == "disk"
    blobs = [
        p for p in (tmp_path / "disk").rglob("*")
        if p.is_file() and p.suffix != ".mdb" and p.stat().st_size > 1000  # blob files only
    ]
    assert blobs
    with make_store(tmp_path, cpu_objects=1) as store:
        for p in blobs:  # flip one payload byte in every blob file
            data = bytearray(p.read_bytes())
            data[-10] ^= 0xFF
            p.write_bytes(bytes(data))
        assert store.get(make_key(0)) is None
        assert store.stats()["disk"].corrupt == 1
        assert not store.contains(make_key(0))


def test_concurrent_readers_and_writers_across_tiers(tmp_path, layout):
    chunks = {i: make_chunk(layout, TOKENS, i) for i in range(24)}
    errors = []
    with make_store(tmp_path, cpu_objects=6) as store:

        def writer(ids):
            for i in ids:
                store.put(make_key(i), chunks[i], layout)

        def reader():
            for _ in range(5):
                for i in range(24):
                    got = store.get(make_key(i))
                    if got is not None and not torch.equal(got, chunks[i]):
                        errors.append(i)

        threads = [threading.Thread(target=writer, args=(range(k, 24, 2),)) for k in range(2)]
        threads += [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        store.flush()
        assert errors == []
        for i, c in chunks.items():
            assert torch.equal(store.get(make_key(i)), c)


@pytest.mark.slow
def test_reader_process_alongside_a_writer(tmp_path, layout):
    """A second process opens and reads the disk tier while this one writes, evicts and
    overwrites: it never takes the live index for a damaged one, never counts an object
    replaced or deleted under it as corrupt, and every hit it gets is a whole, correct
    chunk."""
    reader = textwrap.dedent(f"""
        import sys, time, torch
        from kvcache.kvstore.disk_tier import DiskTier
        from kvcache.kvstore.layout import KVLayout
        from tests.helpers import make_chunk, make_key
        layout = KVLayout("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
        print("importing done", flush=True)
        sys.stdin.readline()  # the writer is writing: open now
        tier = DiskTier({str(tmp_path / 'disk')!r}, 1 << 20, readonly=True)
        hits = bad = 0
        deadline = time.time() + 2
        while time.time() < deadline:
            for i in range(40):
                obj = tier.get(make_key(i))
                if obj is not None:
                    hits += 1
                    bad += not torch.equal(obj.tensors["kv"], make_chunk(layout, 8, i))
        print(hits, bad, tier.stats().corrupt, tier.damage is not None)
    """)
    root = str(__import__("pathlib").Path(__file__).parents[1])
    with make_store(tmp_path, cpu_objects=4) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS, 0), layout)
        store.flush()  # the directory exists before the reader opens it
        child = subprocess.Popen([sys.executable, "-c", reader], cwd=root, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert child.stdout.readline().strip() == "importing done", child.stderr.read()
        started = False
        deadline = time.time() + 2.5
        while time.time() < deadline:
            for i in range(40):
                store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
            for i in range(0, 40, 3):
                store.delete(make_key(i))
            if not started:
                child.stdin.write("go\n")
                child.stdin.flush()
                started = True
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    hits, bad, corrupt, damaged = out.split()
    assert (bad, corrupt, damaged) == ("0", "0", "False"), err
    assert int(hits) > 0


def test_put_falls_through_when_the_top_tier_cannot_take_it(tmp_path, layout):
    with make_store(tmp_path, cpu_objects=1) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS, 0), layout)
        store.pin(make_key(0))  # the CPU tier is now full of pinned bytes
        big = make_chunk(layout, 4 * TOKENS, 1)  # and this is larger than the CPU tier
        store.put(make_key(1), make_chunk(layout, TOKENS, 1), layout)
        store.put(make_key(2), big, layout)
        assert store.where(make_key(1)) == "disk" and store.where(make_key(2)) == "disk"
        assert torch.equal(store.get(make_key(2)), big)
        assert store.where(make_key(0)) == "cpu"


def test_get_many_mixes_tiers_and_misses_in_order(tmp_path, layout):
    chunks = {i: make_chunk(layout, TOKENS, i) for i in range(8)}
    with make_store(tmp_path, cpu_objects=3) as store:
        for i, c in chunks.items():
            store.put(make_key(i), c, layout)
            store.flush()
        where = {i: store.where(make_key(i)) for i in chunks}
        assert set(where.values()) == {"cpu", "disk"}
        order = [7, 99, 0, 3, 98, 5, 1]
        got = store.get_many([make_key(i) for i in order])
        for i, t in zip(order, got, strict=True):
            assert (t is None) if i >= 98 else torch.equal(t, chunks[i])
        assert store.counters.read_misses == 2
        assert store.counters.promotions == sum(where[i] == "disk" for i in order if i < 98)


def test_disk_get_many_reads_concurrently_and_in_order(tmp_path, layout):
    tier = DiskTier(tmp_path / "disk", 1 << 20, io_threads=4)
    try:
        from kvcache.kvstore.container import ObjectHeader, StoredObject

        for i in range(12):
            obj = StoredObject(ObjectHeader(make_key(i), layout, TOKENS),
                               {"kv": make_chunk(layout, TOKENS, i)})
            tier.put(make_key(i), obj)
        keys = [make_key(i) for i in (11, 3, 50, 0, 7)]
        got = tier.get_many(keys)
        assert got[2] is None
        for i, obj in zip((11, 3, 0, 7), [g for g in got if g is not None], strict=True):
            assert torch.equal(obj.tensors["kv"], make_chunk(layout, TOKENS, i))
        assert tier.stats().hits == 4 and tier.stats().misses == 1
    finally:
        tier.close()


def test_open_reads_the_same_config_as_the_cli(tmp_path, monkeypatch):
    """TieredStore.open() and `kvcache stats` see one configuration: file + environment."""
    from kvcache.kvstore.errors import ConfigError

    cfg_file = tmp_path / "kv.toml"
    cfg_file.write_text('[store.disk]\ncodec = "zstd"\ncapacity = "2GiB"\n')
    monkeypatch.setenv("KVCACHE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("KVCACHE_CONFIG", str(cfg_file))
    monkeypatch.setenv("KVCACHE_CPU_CAPACITY", "32MiB")
    monkeypatch.setenv("KVCACHE_WRITE_MODE", "write-back")
    with TieredStore.open() as s:
        assert s.tiers[0].capacity_bytes == 32 << 20
        assert s.tiers[1].capacity_bytes == 2 << 30 and s.codecs == ["raw", "zstd"]
        assert s.write_mode == "write-back"
        assert s.tiers[1].path == tmp_path / "store" / "disk"
    monkeypatch.setenv("KVCACHE_CPU_CAPACITY", "lots")
    with pytest.raises(ConfigError, match="KVCACHE_CPU_CAPACITY='lots'"):
        TieredStore.open()


def test_readonly_store_serves_from_disk_and_writes_nothing_there(tmp_path, layout):
    from kvcache.kvstore.config import KVCacheConfig

    chunk = make_chunk(layout, TOKENS)
    cfg = KVCacheConfig.from_dict({"store": {"dir": str(tmp_path), "cpu": {"capacity": "4MiB"}}})
    with TieredStore.open(cfg.store) as s:
        s.put(make_key(1), chunk, layout)
    ro = KVCacheConfig.from_dict({"store": {"dir": str(tmp_path), "readonly": True,
                                            "cpu": {"capacity": "4MiB"}}})
    with TieredStore.open(ro.store) as s:
        assert torch.equal(s.get(make_key(1)), chunk)
        s.put(make_key(2), chunk, layout)  # kept in this process's CPU tier only
        assert s.where(make_key(2)) == "cpu"
        s.flush()
    with TieredStore.open(cfg.store) as s:
        assert s.contains(make_key(1)) and not s.contains(make_key(2))


def test_ttl_removals_are_counted_as_expired(tmp_path, layout):
    with make_store(tmp_path, ttl_s=0.05) as store:
        store.put(make_key(1), make_chunk(layout, TOKENS), layout)
        store.flush()
        time.sleep(0.1)
        assert store.evict_expired() == 2  # one copy in each tier
        stats = store.stats()
        assert stats["cpu"].expired == 1 and stats["disk"].expired == 1
        assert stats["disk"].evictions == 0 and stats["disk"].deletes == 0


def test_lend_serves_in_place_promotes_and_expires(tmp_path, layout):
    s = make_store(tmp_path)
    s.put(make_key(0), make_chunk(layout, 8, seed=0), layout)
    s.flush()
    s.tiers[0].delete(make_key(0))  # on disk only now
    s.put(make_key(1), make_chunk(layout, 8, seed=1), layout)
    cpu = s.tiers[0]
    loans = s.lend([make_key(0), make_key(1), make_key(2)])
    assert loans[2] is None and cpu.contains(make_key(0))  # promoted, then lent
    for i in (0, 1):
        got = cpu.lent_object(loans[i])
        assert got.header.key == make_key(i)
        assert torch.equal(s.decode(got), make_chunk(layout, 8, seed=i))
        cpu.release(loans[i])
    assert s.counters.read_hits == 2 and s.counters.read_misses == 1
    s.ttl_s = 1e-9  # everything is older than that: lent never, removed instead
    time.sleep(0.01)
    assert s.lend([make_key(1)]) == [None] and not s.contains(make_key(1))
    assert s.counters.expired >= 1
    s.close()


def test_flush_keys_writes_down_only_those_keys(tmp_path, layout):
    s = make_store(tmp_path, write_mode="write-back", cpu_objects=8)
    for i in range(3):
        s.put(make_key(i), make_chunk(layout, TOKENS, seed=i), layout)
    s.flush_keys([make_key(1)])
    disk = s.tiers[1]
    assert [disk.contains(make_key(i)) for i in range(3)] == [False, True, False]
    got = disk.get(make_key(1))
    assert got is not None and torch.equal(s.decode(got), make_chunk(layout, TOKENS, seed=1))
    s.flush_keys([make_key(1), make_key(7)])  # already down / never stored: no-ops
    s.close()


def test_put_many_reports_each_outcome_falls_through_and_writes_down(tmp_path, layout):
    chunks = {i: make_chunk(layout, TOKENS, i) for i in range(6)}
    with make_store(tmp_path, cpu_objects=8) as store:
        # a key given twice stores its last chunk
        items = [(make_key(i), chunks[i]) for i in range(3)] + [(make_key(0), chunks[5])]
        assert store.put_many(items, layout) == [None] * 4
        store.flush()  # each object of the batch reaches the disk tier
        for i, want in ((0, chunks[5]), (1, chunks[1]), (2, chunks[2])):
            assert store.where(make_key(i)) == "cpu" and store.tiers[1].contains(make_key(i))
            assert torch.equal(store.get(make_key(i)), want)
        store.tiers[0].delete(make_key(0))
        assert torch.equal(store.get(make_key(0)), chunks[5])  # from disk: the last version
    with make_store(tmp_path / "b", cpu_objects=1) as store:
        store.put(make_key(0), chunks[0], layout)
        store.pin(make_key(0))  # the CPU tier is full of pinned bytes: the disk takes them
        assert store.put_many([(make_key(i), chunks[i]) for i in (3, 4)], layout) == [None] * 2
        assert store.where(make_key(3)) == "disk" and store.where(make_key(4)) == "disk"
        assert torch.equal(store.get(make_key(4)), chunks[4])
    cpu_only = TieredStore([CpuTier(1024)])
    cpu_only.put(make_key(0), chunks[0], layout)
    cpu_only.pin(make_key(0))
    errors = cpu_only.put_many([(make_key(i), chunks[i]) for i in (1, 2)], layout)
    assert [type(e) for e in errors] == [StoreFullError] * 2  # reported, not raised
    assert not cpu_only.contains(make_key(1)) and torch.equal(cpu_only.get(make_key(0)),
                                                              chunks[0])


def test_transcoding_into_a_lower_tier_keeps_the_header(tmp_path, layout):
    cpu, disk = CpuTier(8 * 1024), DiskTier(tmp_path / "disk", 1 << 20)
    with TieredStore([cpu, disk], codecs=["raw", "zstd"]) as store:
        store.put(make_key(0), make_chunk(layout, TOKENS), layout, rope_start=32,
                  keying="segment")
        store.flush()
        cpu_header, disk_header = cpu.header(make_key(0)), disk.header(make_key(0))
    assert (disk_header.codec, cpu_header.codec) == ("zstd", "raw")
    for field in ("key", "num_tokens", "rope_start", "created_at", "keying"):
        assert getattr(disk_header, field) == getattr(cpu_header, field), field
    assert disk_header.keying == "segment"


def test_a_delete_during_the_background_copy_down_is_not_undone(tmp_path, layout):
    with make_store(tmp_path) as store:
        disk = store.tiers[1]
        entered, release = threading.Event(), threading.Event()
        real_put = disk.put

        def slow_put(key, obj):  # the real write, held until the delete has run
            entered.set()
            assert release.wait(10)
            real_put(key, obj)
        disk.put = slow_put
        store.put(make_key(0), make_chunk(layout, TOKENS), layout)
        assert entered.wait(10)  # the writer has the object and is writing it down
        assert store.delete(make_key(0))
        release.set()
        store.flush()
        assert not store.contains(make_key(0)) and not disk.contains(make_key(0))
        assert store.get(make_key(0)) is None


def test_a_copy_down_that_lands_after_the_deletes_tier_calls_is_not_kept(tmp_path, layout):
    """The delete removes the key from the disk tier first; the writer's copy lands after
    that and the writer finishes before the delete returns: the copy is removed still."""
    with make_store(tmp_path) as store:
        disk = store.tiers[1]
        deleter = threading.current_thread()
        writing, disk_deleted = threading.Event(), threading.Event()
        real_put, real_delete = disk.put, disk.delete

        def put_after_the_delete(key, obj):
            writing.set()  # the writer holds the object
            assert disk_deleted.wait(10)
            real_put(key, obj)

        def delete_then_let_the_writer_finish(key, **kw):
            found = real_delete(key, **kw)
            if threading.current_thread() is deleter and not disk_deleted.is_set():
                disk_deleted.set()
                store._queue.join()  # the writer's copy landed and its write-down is over
            return found

        disk.put = put_after_the_delete
        disk.delete = delete_then_let_the_writer_finish
        store.put(make_key(0), make_chunk(layout, TOKENS), layout)
        assert writing.wait(10)
        store.delete(make_key(0))
        store.flush()
        assert not disk.contains(make_key(0)) and not store.contains(make_key(0))
