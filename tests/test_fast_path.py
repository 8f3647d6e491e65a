"""The same-node fast path: a client maps the daemon's CPU pool and reads from it."""

from __future__ import annotations

import pytest
import torch

from kvcache.kvstore.cache_client import CacheClient
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.remote_tier import RemoteTier
from tests.daemon import ProcessDaemon
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
        # A copy that took longer than half the loan time is not trusted: a miss.
        client._fast.loan_ttl_s = 0.0
        assert client.get_objects([make_key(0)]) == [None]
        client._fast.loan_ttl_s = 30.0
        assert client.get_objects([make_key(0)])[0] is not None
        # A tier over the same socket reads through it too; HTTP clients see the same data.
        tier = RemoteTier(f"unix://{sock}", timeout_s=10)
        assert tier.get(make_key(3)) is not None and tier.client.uses_fast_path
        http = CacheClient(daemon.url)
        assert not http.uses_fast_path and http.get_objects([make_key(3)])[0] is not None
        stats = http.stats()
        assert stats["tenants"]["default"]["hits"] >= 7
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
