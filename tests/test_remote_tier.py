"""``RemoteTier``: the daemon as a tier under ``TieredStore``, failing open."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

from kvcache.kvstore import remote_tier
from kvcache.kvstore.config import RemoteTierConfig, StoreConfig
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.remote_tier import RemoteTier
from kvcache.kvstore.tiered_store import TieredStore
from tests.daemon import TOKEN, lookups, thread_daemon
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("remote-test", 2, 2, 64, dtype="float16")  # 16 tokens: 16 KiB


@pytest.fixture
def daemon(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN) as d:
        yield d


def test_a_store_demotes_into_the_daemon_and_reads_back(daemon):
    remote = RemoteTier(daemon.url, token=TOKEN)
    store = TieredStore([CpuTier(1 << 20), remote])
    chunks = {make_key(i): make_chunk(LAYOUT, 128, seed=i) for i in range(12)}  # 128 KiB each
    for key, chunk in chunks.items():
        store.put(key, chunk, LAYOUT)
    store.flush()
    assert remote.stats().puts >= 12
    for key, chunk in chunks.items():
        got = store.get(key)
        assert got is not None and torch.equal(got, chunk)
    assert remote.stats().hits > 0
    # another process's store sees the same chunks through the daemon
    other = TieredStore([CpuTier(1 << 20), RemoteTier(daemon.url, token=TOKEN)])
    assert other.longest_prefix(list(chunks)) == 12
    got = other.get(make_key(3))
    assert got is not None and torch.equal(got, chunks[make_key(3)])
    store.close()
    other.close()


def test_a_prefix_lookup_asks_the_daemon_once(daemon):
    """``longest_prefix`` asks the local tiers first and the daemon once for the rest, not
    once per key: an engine's lookup costs one round trip."""
    store = TieredStore([CpuTier(1 << 20), RemoteTier(daemon.url, token=TOKEN)])
    local, remote_only = [make_key(i) for i in range(2)], [make_key(i) for i in range(2, 6)]
    for key in local:
        store.put(key, make_chunk(LAYOUT, 16), LAYOUT)
    store.flush()
    for key in remote_only:
        store.tiers[1].put(key, StoredObject(ObjectHeader(key, LAYOUT, 16),
                                             {"kv": make_chunk(LAYOUT, 16)}))
    before = lookups(daemon.url)
    assert store.longest_prefix([*local, *remote_only, make_key(9), make_key(10)]) == 6
    assert lookups(daemon.url) - before == 1
    store.close()


def test_pins_are_leases_released_on_unpin_and_close(daemon):
    remote = RemoteTier(daemon.url, token=TOKEN)
    remote.put(make_key(0), StoredObject(ObjectHeader(make_key(0), LAYOUT, 16),
                                         {"kv": make_chunk(LAYOUT, 16)}))
    assert remote.set_pinned(make_key(0), True)
    assert remote.info(make_key(0)).pinned
    assert remote.set_pinned(make_key(0), False)
    assert not remote.info(make_key(0)).pinned
    assert not remote.set_pinned(make_key(1), True)  # absent
    remote.set_pinned(make_key(0), True)
    remote.close()
    assert daemon.server.leases.active == 0


def test_header_info_scan_delete(daemon):
    remote = RemoteTier(daemon.url, token=TOKEN)
    o = StoredObject(ObjectHeader(make_key(0), LAYOUT, 16), {"kv": make_chunk(LAYOUT, 16)})
    remote.put(make_key(0), o)
    assert remote.header(make_key(0)).key == make_key(0)
    assert remote.contains(make_key(0))
    assert any(e.key == make_key(0) for e in remote.scan())
    assert remote.delete(make_key(0)) and not remote.contains(make_key(0))
    assert remote.stats().deletes == 1
    assert remote.header(make_key(0)) is None


def test_put_many_to_a_store_on_the_daemon_sends_one_request(daemon, monkeypatch):
    remote = RemoteTier(daemon.url, token=TOKEN)
    store = TieredStore([remote])
    batches: list[int] = []
    real = remote.client.put_objects

    def counted(objs, *args, **kw):  # the real call, counted
        batches.append(len(objs))
        return real(objs, *args, **kw)
    monkeypatch.setattr(remote.client, "put_objects", counted)
    items = [(make_key(i), make_chunk(LAYOUT, 16, seed=i)) for i in range(10)]
    assert store.put_many(items, LAYOUT, rope_starts=[16 * i for i in range(10)]) == [None] * 10
    assert batches == [10]
    for key, chunk in items:
        assert torch.equal(store.get(key), chunk)
    assert store.get_object(make_key(3)).header.rope_start == 48
    # requests stay under a size: 16 KiB objects, 40 KiB a request
    monkeypatch.setattr(remote_tier, "PUT_REQUEST_BYTES", 40 << 10)
    batches.clear()
    assert store.put_many(items, LAYOUT) == [None] * 10
    assert batches == [3, 3, 3, 1] and store.get_object(make_key(3)).header.rope_start == 0
    store.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_daemon_that_is_down_is_a_counted_miss_within_the_deadline():
    remote = RemoteTier(f"http://127.0.0.1:{_dead_port()}", timeout_s=0.5)
    store = TieredStore([CpuTier(1 << 20), remote])
    start = time.monotonic()
    assert store.get(make_key(0)) is None
    assert store.longest_prefix([make_key(0)]) == 0
    store.put(make_key(1), make_chunk(LAYOUT, 16), LAYOUT)
    store.flush()  # the skipped write below is not an error of the store
    assert time.monotonic() - start < 2.0
    s = remote.stats()
    assert s.errors >= 1 and s.misses >= 1 and s.puts == 0
    store.close()


def test_a_daemon_that_hangs_costs_one_deadline_then_the_breaker_answers():
    # A listener that accepts and never answers.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        remote = RemoteTier(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=0.3,
                            retries=0)
        start = time.monotonic()
        for _ in range(5):
            assert remote.get(make_key(0)) is None
        elapsed = time.monotonic() - start
        # 3 reads time out (0.3 s each), then the open breaker answers the rest at once
        assert elapsed < 1.5, elapsed
        assert remote.client.breaker.refused >= 1
        assert remote.stats().errors >= 3
    finally:
        stop.set()
        t.join()
        srv.close()
        for s in held:
            s.close()


def test_a_daemon_answering_garbage_is_a_miss():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        for _ in range(4):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-kvcache-objects\r\n"
                      b"Content-Length: 12\r\n\r\n\x05\x00\x00\x00\x00\x00\x00\x00abcd")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    remote = RemoteTier(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=1.0, retries=0)
    assert remote.get(make_key(0)) is None
    assert remote.stats().errors >= 1
    srv.close()


def test_config_builds_the_remote_tier(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCACHE_REMOTE_TOKEN", TOKEN)
    from kvcache.kvstore.config import KVCacheConfig

    cfg = KVCacheConfig.from_env({"KVCACHE_REMOTE_URL": daemon.url,
                                  "KVCACHE_REMOTE_TOKEN": TOKEN,
                                  "KVCACHE_DIR": str(tmp_path / "local")})
    store = TieredStore.open(cfg.store)
    assert [t.name for t in store.tiers] == ["cpu", "disk", "remote"]
    store.close()
    with pytest.raises(ConfigError, match="not a remote tier URL"):
        RemoteTierConfig(url="ftp://x")
    with pytest.raises(ConfigError, match="timeout"):
        StoreConfig.from_dict({"remote": {"url": daemon.url, "timeout": "0s"}})
