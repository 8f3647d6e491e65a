"""The same-node fast path: a client maps the daemon's CPU pool and reads from it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvcache.kvstore.cache_client import CacheClient
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.remote_tier import RemoteTier
from kvcache.kvstore.shm_index import SharedIndex, lock_free_reads_supported
from tests.daemon import ProcessDaemon, lookups
from tests.helpers import make_chunk, make_key

pytestmark = pytest.mark.slow  # starts a daemon process
LAYOUT = KVLayout("fast-path-test", 2, 2, 64, dtype="float16")


def obj(i: int) -> StoredObject:
    return StoredObject(ObjectHeader(make_key(i), LAYOUT, 64), {"kv": make_chunk(LAYOUT, 64, i)})


def test_shared_pool_lends_entries_that_eviction_cannot_touch():
    cpu = CpuTier(1 << 20, shared=True)
    assert cpu.pool_fd is not None
    cpu.put(make_key(0), obj(0))
    loan = cpu.lend(make_key(0))
    assert loan is not None and loan.header.key == make_key(0)
    for i in range(1, 40):  # 64 KiB each: the pool turns over several times
        cpu.put(make_key(i), obj(i))
    # Lent entries are never victims: its bytes are where the loan says, unchanged.
    view = cpu._pool[loan.offset : loan.offset + loan.size]
    assert torch.equal(view[: obj(0).nbytes].view(torch.float16).view(obj(0).tensors["kv"].shape),
                       obj(0).tensors["kv"])
    cpu.release(loan)
    assert cpu.lend(make_key(999)) is None
    cpu.close()


def test_reads_through_shared_memory_across_processes(tmp_path):
    sock = tmp_path / "kv.sock"
    daemon = ProcessDaemon(tmp_path / "store", "--socket", str(sock))
    try:
        client = CacheClient(f"unix://{sock}", timeout_s=10)
        objs = [obj(i) for i in range(6)]
        assert client.put_objects(objs) == 6
        got = client.get_objects([make_key(i) for i in range(7)])
        assert client.uses_fast_path
        for o, g in zip(objs, got, strict=False):
            assert g is not None and torch.equal(g.tensors["kv"], o.tensors["kv"])
        assert got[6] is None
        fast = client._fast
        # In-memory objects come through the shared index, with no round trip; the daemon
        # still counts them (and its eviction policy sees them).
        if lock_free_reads_supported():
            assert fast.index_reads >= 6
        # An overwrite is seen at once: the index slot changed, the new bytes are read.
        newer = StoredObject(ObjectHeader(make_key(0), LAYOUT, 64),
                             {"kv": make_chunk(LAYOUT, 64, 1234)})
        client.put_objects([newer])
        assert torch.equal(client.get_objects([make_key(0)])[0].tensors["kv"],
                           newer.tensors["kv"])
        # The loan path: a copy that took longer than half the loan time is not trusted.
        index, fast._index = fast._index, None
        fast.loan_ttl_s = 0.0
        assert client.get_objects([make_key(0)]) == [None]
        fast.loan_ttl_s = 30.0
        assert client.get_objects([make_key(0)])[0] is not None
        fast._index = index
        # A tier over the same socket reads through it too; HTTP clients see the same data.
        tier = RemoteTier(f"unix://{sock}", timeout_s=10)
        assert tier.get(make_key(3)) is not None and tier.client.uses_fast_path
        http = CacheClient(daemon.url)
        assert not http.uses_fast_path and http.get_objects([make_key(3)])[0] is not None
        client.close()  # reports its last reads through the index
        time.sleep(0.2)
        stats = http.stats()
        assert stats["tenants"]["default"]["hits"] >= 7
        assert stats["tiers"]["cpu"]["hits"] >= 7
        # The daemon goes away: reads fall back, fail open, and come back after a restart.
        assert daemon.stop() == 0
        assert tier.get(make_key(3)) is None and tier.stats().errors >= 1
        daemon = ProcessDaemon(tmp_path / "store", "--socket", str(sock))
        fresh = CacheClient(f"unix://{sock}", timeout_s=10)
        back = fresh.get_objects([make_key(3)])[0]  # from the disk tier, promoted, lent
        assert back is not None and torch.equal(back.tensors["kv"], objs[3].tensors["kv"])
        assert fresh.uses_fast_path
    finally:
        daemon.stop()


def test_shared_index_publishes_withdraws_and_signals_every_change():
    index = SharedIndex.create(16)
    keys = [make_key(i) for i in range(8)]
    for i, key in enumerate(keys):
        assert index.publish(key, i * 100, 100, i * 100 + 90, 10)
    slot, seq, offset, size, desc_offset, desc_size = index.find(keys[3])
    assert (offset, size, desc_offset, desc_size) == (300, 100, 390, 10) and seq % 2 == 0
    assert index.still(slot, seq)
    index.publish(keys[3], 5000, 100, 5090, 10)  # replaced: a reader of the old one knows
    assert not index.still(slot, seq)
    assert index.find(keys[3])[2] == 5000
    index.withdraw(keys[3])
    assert index.find(keys[3]) is None
    for key in keys[:3] + keys[4:]:  # probing passes the withdrawn slot
        assert index.find(key) is not None
    assert index.find(make_key(99)) is None
    for i in range(8, 40):  # full: publishing fails, nothing else breaks
        index.publish(make_key(i), 0, 1, 0, 1)
    assert not index.publish(make_key(1000), 0, 1, 0, 1)
    assert index.find(keys[0]) is not None
    index.close()


def test_the_cpu_tier_withdraws_before_reusing_bytes():
    cpu = CpuTier(1 << 20, shared=True)
    if cpu.index is None:
        pytest.skip("lock-free reads need x86-64")
    cpu.put(make_key(0), obj(0))
    slot, seq, *_ = cpu.index.find(make_key(0))
    cpu.delete(make_key(0))
    assert cpu.index.find(make_key(0)) is None and not cpu.index.still(slot, seq)
    for i in range(1, 40):  # evictions withdraw too
        cpu.put(make_key(i), obj(i))
    published = [i for i in range(1, 40) if cpu.index.find(make_key(i)) is not None]
    assert published == [i for i in range(1, 40) if cpu.contains(make_key(i))]
    cpu.close()


def test_reads_racing_overwrites_and_evictions_are_never_torn(tmp_path):
    """A writer overwrites keys and makes the daemon evict while a reader reads through
    shared memory: every object read is one whole version, never a mix of two."""
    sock = tmp_path / "kv.sock"
    daemon = ProcessDaemon(tmp_path / "store", "--socket", str(sock),
                           env={"KVCACHE_CPU_CAPACITY": "2MiB", "KVCACHE_DISK_ENABLED": "0"})
    stop = threading.Event()
    written: dict[str, set[float]] = {make_key(i): set() for i in range(8)}

    def version(i: int, v: float) -> StoredObject:  # 64 KiB, every element v
        return StoredObject(ObjectHeader(make_key(i), LAYOUT, 64),
                            {"kv": torch.full(LAYOUT.chunk_shape(64), v, dtype=torch.float16)})

    def write() -> None:
        w = CacheClient(daemon.url, timeout_s=10)
        v = 0.0
        while not stop.is_set():
            v += 1.0
            batch = [version(i, v) for i in range(8)]
            for o in batch:
                written[o.header.key].add(v)
            w.put_objects(batch)
            w.put_objects([version(100 + j, v) for j in range(24)])  # churn: evictions

    try:
        writer = threading.Thread(target=write)
        writer.start()
        reader = CacheClient(f"unix://{sock}", timeout_s=10)
        reads = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            for key, got in zip(written, reader.get_objects(list(written)), strict=True):
                if got is None:
                    continue
                kv = got.tensors["kv"].flatten()
                assert got.header.key == key
                assert torch.all(kv == kv[0]), "a torn object: two versions mixed"
                assert float(kv[0]) in written[key]
                reads += 1
        assert reads > 50 and reader.uses_fast_path
        if lock_free_reads_supported():
            assert reader._fast.index_reads > 50
    finally:
        stop.set()
        writer.join()
        daemon.stop()


def test_without_the_token_a_client_gets_no_shared_memory(tmp_path):
    from kvcache.kvstore.cache_client import RemoteAuthError
    from tests.daemon import TOKEN

    sock = tmp_path / "kv.sock"
    daemon = ProcessDaemon(tmp_path / "store", "--socket", str(sock),
                           env={"KVCACHE_SERVER_TOKEN": TOKEN,
                                "KVCACHE_SERVER_READ_AUTH": "token"})
    try:
        CacheClient(daemon.url, token=TOKEN).put_objects([obj(0)])
        anonymous = CacheClient(f"unix://{sock}", retries=0)
        with pytest.raises(RemoteAuthError):  # refused on the fast path, then over HTTP
            anonymous.get_objects([make_key(0)])
        assert not anonymous.uses_fast_path
        member = CacheClient(f"unix://{sock}", token=TOKEN)
        assert member.get_objects([make_key(0)])[0] is not None and member.uses_fast_path
    finally:
        daemon.stop()


def test_the_cpu_tier_counts_entries_its_index_has_no_room_for():
    cpu = CpuTier(16 << 20, shared=True)
    if cpu.index is None:
        pytest.skip("lock-free reads need x86-64")
    cpu.index.close()
    cpu.index = SharedIndex.create(16)  # far fewer slots than the pool has room for entries
    for i in range(40):
        cpu.put(make_key(i), obj(i))
    left_out = [i for i in range(40) if cpu.index.find(make_key(i)) is None]
    assert len(left_out) == 40 - 16 and cpu.index.unpublished() == len(left_out)
    cpu.delete(make_key(left_out[0]))
    cpu.delete(make_key(next(i for i in range(40) if i not in left_out)))
    assert cpu.index.unpublished() == len(left_out) - 1
    for i in range(40):
        cpu.delete(make_key(i))
    assert cpu.index.unpublished() == 0
    # A reader of an older daemon's table (no count after the slots) is told it is not
    # counted, rather than that nothing is missing.
    fd = os.memfd_create("old-index")
    os.ftruncate(fd, 16 * 64)
    old = SharedIndex.attach(fd, 16)
    assert not old.counts_unpublished and old.unpublished() is None
    old.close()
    cpu.close()


@pytest.mark.skipif(not lock_free_reads_supported(), reason="the shared index needs x86-64")
def test_lookups_are_answered_from_the_shared_index(tmp_path):
    """Keys in the daemon's pool are looked up without asking it; when the pool is all it
    holds, so are the keys it lacks. A daemon with a disk tier is asked about those."""
    sock = tmp_path / "pool.sock"
    pool_only = ProcessDaemon(tmp_path / "a", "--socket", str(sock),
                              env={"KVCACHE_DISK_ENABLED": "false"})
    try:
        client = CacheClient(f"unix://{sock}", timeout_s=10)
        client.put_objects([obj(i) for i in range(4)])
        before = lookups(pool_only.url)
        assert client.exists([make_key(i) for i in range(6)]) == [True] * 4 + [False] * 2
        assert lookups(pool_only.url) == before and client.uses_fast_path
        # The daemon goes away: its memory stays mapped here, but it no longer answers.
        tier = RemoteTier(f"unix://{sock}", timeout_s=2)
        assert tier.contains_many([make_key(0)]) == [True]
        assert pool_only.stop() == 0
        assert tier.contains_many([make_key(0), make_key(1)]) == [False, False]
        assert tier.stats().errors >= 1
    finally:
        pool_only.stop()

    sock = tmp_path / "disk.sock"
    with_disk = ProcessDaemon(tmp_path / "b", "--socket", str(sock),
                              env={"KVCACHE_CPU_CAPACITY": "1MiB"})
    try:
        client = CacheClient(f"unix://{sock}", timeout_s=10)
        client.put_objects([obj(i) for i in range(40)], durable=True)  # 64 KiB each
        in_pool = [i for i in range(40) if client._fast_reader()._index.find(make_key(i))]
        assert 0 < len(in_pool) < 40
        before = lookups(with_disk.url)
        assert client.exists([make_key(i) for i in in_pool]) == [True] * len(in_pool)
        assert lookups(with_disk.url) == before
        # Keys only on the disk, and keys nowhere: one question for those, none for the rest.
        assert client.exists([make_key(i) for i in range(41)]) == [True] * 40 + [False]
        assert lookups(with_disk.url) == before + 1
    finally:
        with_disk.stop()


def test_withdrawn_slots_are_reused_so_the_table_never_clogs():
    index = SharedIndex.create(4096)
    for i in range(20_000):  # far more entries over time than slots
        key = make_key(i)
        assert index.publish(key, i, 1, i, 1)
        if i >= 1000:
            index.withdraw(make_key(i - 1000))  # about 1000 live at a time
    live = [make_key(i) for i in range(19_000, 20_000)]
    assert all(index.find(k) is not None for k in live)
    assert index.find(make_key(5)) is None
    assert index.publish(make_key(99_999), 0, 1, 0, 1)
    index.close()


def test_a_greeting_of_another_version_is_refused(tmp_path):
    """A daemon speaking another fast-path version: the client maps nothing (it reads over
    HTTP instead)."""
    import socket

    from kvcache.kvstore import wire
    from kvcache.kvstore.shm_reader import SharedMemoryReader

    path = str(tmp_path / "old.fast")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    fd = os.memfd_create("pool")
    os.ftruncate(fd, 1 << 20)

    def greet() -> None:
        conn, _ = srv.accept()
        conn.recv(4096)  # the hello
        socket.send_fds(conn, [wire.message({"pool_bytes": 1 << 20, "loan_ttl": 30.0,
                                             "version": wire.FAST_PATH_VERSION + 1})], [fd])
        conn.close()

    t = threading.Thread(target=greet)
    t.start()
    with pytest.raises(wire.ProtocolError, match="version"):
        SharedMemoryReader(path, timeout_s=5)
    t.join()
    srv.close()
    os.close(fd)
