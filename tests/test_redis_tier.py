"""The Redis tier against real servers: a standalone ``redis-server`` and a 3-master cluster."""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
import uuid

import pytest
import torch

redis = pytest.importorskip("redis", reason="the Redis tier needs redis-py (kvcache[redis])")
if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not on PATH: the Redis tier tests need a real server",
                allow_module_level=True)

from redis.cluster import RedisCluster  # noqa: E402

from kvcache.kvstore.config import RemoteTierConfig  # noqa: E402
from kvcache.kvstore.container import ObjectHeader, StoredObject, encode_object  # noqa: E402
from kvcache.kvstore.cpu_tier import CpuTier  # noqa: E402
from kvcache.kvstore.errors import ConfigError, ObjectTooLargeError  # noqa: E402
from kvcache.kvstore.fail_open import CircuitBreaker  # noqa: E402
from kvcache.kvstore.redis_tier import DEFAULT_MAX_VALUE, RedisTier  # noqa: E402
from kvcache.kvstore.tiered_store import TieredStore  # noqa: E402
from tests import redis_servers  # noqa: E402
from tests.helpers import make_chunk, make_key  # noqa: E402

TOKENS = 8  # one object: 2*2*8*2*8 fp16 = 1 KiB of tensor
SLACK_S = 0.25  # scheduling slack on top of a deadline


def obj_for(layout, i, tokens=TOKENS, **params):
    return StoredObject(ObjectHeader(make_key(i), layout, tokens, codec_params=params),
                        {"kv": make_chunk(layout, tokens, i)})


@pytest.fixture(scope="module")
def standalone_server(tmp_path_factory):
    with redis_servers.standalone(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster_servers(tmp_path_factory):
    if redis_servers.REDIS_CLI is None:
        pytest.skip("redis-cli is not on PATH: it creates the test cluster")
    with redis_servers.cluster(tmp_path_factory.mktemp("redis-cluster")) as servers:
        yield servers


@pytest.fixture(params=["standalone_server", "cluster_servers"], ids=["standalone", "cluster"])
def servers(request):
    """Each test that takes it runs on a single server and on a cluster."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def make_tier():
    """Tiers with a key prefix of their own (tests share servers), closed afterwards."""
    made = []
    prefix = f"kvtest:{uuid.uuid4().hex[:8]}:"

    def make(url, **kw):
        kw.setdefault("key_prefix", prefix)
        made.append(RedisTier(url, **kw))
        return made[-1]

    yield make
    for t in made:
        t.close()


def raw_client(servers):
    """A plain redis-py client, to plant values behind the tier's back."""
    if isinstance(servers, redis_servers.RedisClusterServers):
        return RedisCluster(host=redis_servers.HOST, port=servers.nodes[0].port)
    return servers.client()


def test_round_trip_is_exact(servers, make_tier, layout):
    tier = make_tier(servers.url)
    o = obj_for(layout, 0)
    assert tier.get(make_key(0)) is None
    tier.put(make_key(0), o)
    got = tier.get(make_key(0))
    assert torch.equal(got.tensors["kv"], o.tensors["kv"])
    assert got.header == o.header
    s = tier.stats()
    assert (s.hits, s.misses, s.puts, s.errors, s.corrupt) == (1, 1, 1, 0, 0)
    assert s.bytes_read == s.bytes_written == len(encode_object(o))
    assert s.hit_tokens == TOKENS and s.used_bytes > 0 and s.entries >= 1
    assert tier.contains(make_key(0)) and not tier.contains(make_key(1))


def test_many_keys_one_round_trip_per_server(servers, make_tier, layout, monkeypatch):
    tier = make_tier(servers.url)
    n = 60
    objs = [obj_for(layout, i) for i in range(n)]
    tier.put_many([(make_key(i), o) for i, o in enumerate(objs)])
    calls = []
    for cls, name in ((redis.client.Pipeline, "execute"), (redis.Redis, "mget")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, *a, _o=original, **k: (
            calls.append(self), _o(self, *a, **k))[1])
    got = tier.get_many([make_key(i) for i in range(n + 5)])
    masters = len(getattr(servers, "nodes", [servers]))
    assert len(calls) == masters  # MGET once, or one pipeline per master
    assert got[n:] == [None] * 5
    for o, g in zip(objs, got[:n], strict=True):
        assert torch.equal(g.tensors["kv"], o.tensors["kv"])
    assert tier.stats().hits == n and tier.stats().puts == n


def test_ttl_expires_keys(standalone_server, make_tier, layout):
    tier = make_tier(standalone_server.url, ttl_s=0.3)
    tier.put(make_key(0), obj_for(layout, 0))
    assert 0 < standalone_server.client().pttl(tier.key_prefix + make_key(0)) <= 300
    assert tier.get(make_key(0)) is not None
    time.sleep(0.45)
    assert tier.get(make_key(0)) is None and not tier.contains(make_key(0))


def test_corrupt_value_is_a_counted_miss_and_deleted(servers, make_tier, layout):
    tier = make_tier(servers.url)
    data = bytearray(encode_object(obj_for(layout, 0)))
    data[-5] ^= 0x40  # one bit of the payload
    raw = raw_client(servers)
    raw.set(tier.key_prefix + make_key(0), bytes(data))
    raw.set(tier.key_prefix + make_key(1), b"not a container")
    assert tier.get_many([make_key(0), make_key(1)]) == [None, None]
    s = tier.stats()
    assert (s.corrupt, s.misses, s.hits) == (2, 2, 0)
    assert raw.exists(tier.key_prefix + make_key(0)) == 0
    assert raw.exists(tier.key_prefix + make_key(1)) == 0


def test_object_of_another_key_is_a_miss(servers, make_tier, layout):
    tier = make_tier(servers.url)
    raw, name = raw_client(servers), tier.key_prefix + make_key(0)
    raw.set(name, encode_object(obj_for(layout, 1)))  # valid, but key 1's object
    assert tier.get(make_key(0)) is None and raw.exists(name) == 0
    raw.set(name, encode_object(obj_for(layout, 1)))
    assert tier.header(make_key(0)) is None and raw.exists(name) == 0  # header reads too
    assert tier.stats().corrupt == 2


def test_value_over_the_server_limit_is_refused_and_not_sent(standalone_server, make_tier,
                                                             layout):
    client = standalone_server.client()
    client.config_set("proto-max-bulk-len", "1mb")
    try:
        tier = make_tier(standalone_server.url)
        big = obj_for(layout, 0, tokens=16384)  # 2 MiB of tensor
        with pytest.raises(ObjectTooLargeError, match=r"2097\d+ bytes .* 1048576 bytes"):
            tier.put(make_key(0), big)
        # a batch with one too large sends nothing, and says so for each object
        errors = tier.put_many([(make_key(1), obj_for(layout, 1)), (make_key(0), big)])
        assert [type(e) for e in errors] == [ObjectTooLargeError] * 2
        assert not tier.contains(make_key(0)) and not tier.contains(make_key(1))
        s = tier.stats()
        assert (s.puts, s.errors) == (0, 0)
        tier.put(make_key(1), obj_for(layout, 1))  # the server is fine with small ones
        assert tier.get(make_key(1)) is not None
    finally:
        client.config_set("proto-max-bulk-len", "512mb")


def test_config_and_info_disabled_fall_back_to_defaults(tmp_path, layout):
    with redis_servers.standalone(tmp_path, "--rename-command", "CONFIG", "",
                                  "--rename-command", "INFO", "") as server:
        tier = RedisTier(server.url)
        tier.put(make_key(0), obj_for(layout, 0))
        assert tier.get(make_key(0)) is not None
        assert tier._max_value == DEFAULT_MAX_VALUE  # Redis's default proto-max-bulk-len
        s = tier.stats()
        assert (s.errors, s.capacity_bytes, s.used_bytes, s.entries) == (0, 0, 0, 1)
        tier.close()


def test_capacity_is_maxmemory(servers, make_tier, layout):
    nodes = getattr(servers, "nodes", [servers])
    for n in nodes:
        n.client().config_set("maxmemory", str(64 << 20))
    try:
        tier = make_tier(servers.url)
        assert tier.capacity_bytes == len(nodes) * (64 << 20)
        assert tier.stats().capacity_bytes == tier.capacity_bytes
    finally:
        for n in nodes:
            n.client().config_set("maxmemory", "0")
    assert make_tier(servers.url).capacity_bytes == 0  # unset: unknown


def test_killed_server_fails_open_and_recovers_after_restart(tmp_path, layout):
    timeout_s = 0.6
    with redis_servers.standalone(tmp_path) as server:
        tier = RedisTier(server.url, timeout_s=timeout_s, retries=1,
                         breaker=CircuitBreaker(failures=2, reset_s=0.5))
        tier.put(make_key(0), obj_for(layout, 0))
        assert tier.get(make_key(0)) is not None
        server.kill()
        t0 = time.monotonic()
        assert tier.get(make_key(0)) is None
        assert time.monotonic() - t0 < timeout_s + SLACK_S
        tier.put(make_key(1), obj_for(layout, 1))  # skipped, no exception
        assert not tier.contains(make_key(1))
        assert tier.get_many([make_key(0), make_key(1)]) == [None, None]
        s = tier.stats()
        assert s.errors == 4 and s.misses == 3 and s.puts == 1
        assert tier.breaker.state == "open"
        t0 = time.monotonic()  # an open breaker costs no connect attempt
        assert tier.get(make_key(0)) is None
        assert time.monotonic() - t0 < 0.05
        server.start()  # same port, empty (no persistence)
        time.sleep(0.6)  # the breaker's reset: the next request is its trial
        tier.put(make_key(1), obj_for(layout, 1))
        assert tier.breaker.state == "closed"
        assert tier.get(make_key(1)) is not None
        assert tier.stats().hits == 2
        tier.close()


def test_stalled_server_costs_at_most_the_deadline(tmp_path, layout):
    timeout_s = 0.6
    with redis_servers.standalone(tmp_path) as server:
        tier = RedisTier(server.url, timeout_s=timeout_s, retries=1,
                         breaker=CircuitBreaker(failures=3, reset_s=0.3))
        tier.put(make_key(0), obj_for(layout, 0))
        server.signal(signal.SIGSTOP)
        try:
            for call in (lambda: tier.get(make_key(0)),
                         lambda: tier.put(make_key(1), obj_for(layout, 1)),
                         lambda: tier.contains(make_key(0))):
                t0 = time.monotonic()
                assert not call()
                assert time.monotonic() - t0 < timeout_s + SLACK_S
        finally:
            server.signal(signal.SIGCONT)
        assert tier.stats().errors == 3
        time.sleep(0.4)
        assert tier.get(make_key(0)) is not None
        tier.close()


def test_cluster_master_killed_fails_open_and_recovers(tmp_path, layout):
    timeout_s = 0.6
    keys = [make_key(i) for i in range(30)]
    items = [(k, obj_for(layout, i)) for i, k in enumerate(keys)]
    with redis_servers.cluster(tmp_path) as servers:
        tier = RedisTier(servers.url, timeout_s=timeout_s,
                         breaker=CircuitBreaker(failures=2, reset_s=0.5))
        tier.put_many(items)
        assert all(tier.get_many(keys))
        servers.nodes[1].kill()
        t0 = time.monotonic()
        assert tier.get_many(keys) == [None] * len(keys)
        assert time.monotonic() - t0 < timeout_s + SLACK_S
        tier.put_many(items)  # skipped, no exception
        assert tier.stats().errors == 2
        servers.nodes[1].start()  # rejoins with its nodes.conf, without its keys
        servers.wait_ok()
        time.sleep(0.5)  # the breaker's reset
        tier.put_many(items)
        assert all(tier.get_many(keys))
        tier.close()


def test_tiered_store_demotes_into_redis_and_reads_back(standalone_server, make_tier,
                                                         layout):
    chunks = {make_key(i): make_chunk(layout, TOKENS, i) for i in range(8)}
    store = TieredStore([CpuTier(4 * 1024), make_tier(standalone_server.url)],
                        write_mode="write-back")
    for key, chunk in chunks.items():
        store.put(key, chunk, layout)
    where = [store.where(k) for k in chunks]
    assert where == ["redis"] * 4 + ["cpu"] * 4  # the oldest four were demoted
    assert store.counters.demotions == 4
    for key, chunk in chunks.items():
        assert torch.equal(store.get(key), chunk)
    assert store.stats()["redis"].hits >= 4  # promotions demote others in turn
    store.close()


def test_write_through_copies_everything_down(standalone_server, make_tier, layout):
    redis_tier = make_tier(standalone_server.url)
    store = TieredStore([CpuTier(1 << 20), redis_tier])
    for i in range(5):
        store.put(make_key(i), make_chunk(layout, TOKENS, i), layout)
    store.flush()
    assert all(redis_tier.contains(make_key(i)) for i in range(5))
    store.close()


def test_scan_info_header_delete(servers, make_tier, layout):
    tier = make_tier(servers.url)
    objs = {make_key(i): obj_for(layout, i) for i in range(7)}
    tier.put_many(list(objs.items()))
    raw_client(servers).set(tier.key_prefix + "not-a-key", b"x")  # skipped by scan
    infos = {e.key: e for e in tier.scan()}
    assert set(infos) == set(objs)
    k = make_key(3)
    e = infos[k]
    assert (e.tier, e.nbytes, e.num_tokens, e.codec, e.model_id) == (
        "redis", len(encode_object(objs[k])), TOKENS, "raw", "test-model")
    assert e.created_at == objs[k].header.created_at and not e.pinned
    assert tier.info(k) is not None and tier.info(k).nbytes == e.nbytes
    assert tier.header(k) == objs[k].header
    assert tier.set_pinned(k, True) and not tier.set_pinned(make_key(99), True)
    assert tier.delete(k, cause="ttl") and not tier.delete(k)
    assert tier.delete(make_key(4), force=True, cause="admin") and tier.delete(make_key(5))
    assert tier.info(k) is None and tier.header(k) is None
    s = tier.stats()
    assert (s.expired, s.admin_evictions, s.deletes) == (1, 1, 1)
    assert len(list(tier.scan())) == 4
    tier.count_misses(3, 24)
    assert (tier.stats().misses, tier.stats().miss_tokens) == (3, 24)


def test_header_longer_than_the_first_read(servers, make_tier, layout):
    tier = make_tier(servers.url)
    o = obj_for(layout, 0, pad="x" * 10_000)
    tier.put(make_key(0), o)
    assert tier.header(make_key(0)) == o.header
    assert tier.info(make_key(0)).nbytes == len(encode_object(o))
    assert torch.equal(tier.get(make_key(0)).tensors["kv"], o.tensors["kv"])


def test_concurrent_threads(servers, make_tier, layout):
    tier = make_tier(servers.url)
    errors = []

    def work(t):
        try:
            for i in range(t * 20, t * 20 + 20):
                o = obj_for(layout, i)
                tier.put(make_key(i), o)
                assert torch.equal(tier.get(make_key(i)).tensors["kv"], o.tensors["kv"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert tier.stats().hits == 80 and tier.stats().errors == 0


def test_from_config(standalone_server):
    cfg = RemoteTierConfig(url=standalone_server.url, timeout=1.0, retries=2, tenant="team-a")
    tier = RedisTier.from_config(cfg, store_ttl=60.0)
    assert (tier.timeout_s, tier.retries, tier.ttl_s) == (1.0, 2, 60.0)
    assert tier.key_prefix == "kvcache:team-a:"
    tier.close()
    cfg = RemoteTierConfig(url=standalone_server.url, ttl=5.0)
    tier = RedisTier.from_config(cfg, store_ttl=60.0)
    assert (tier.ttl_s, tier.key_prefix) == (5.0, "kvcache:")
    tier.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "redis+cluster://",
                                 "redis+cluster://127.0.0.1:x", "redis+cluster://h:1/3"])
def test_bad_urls_are_config_errors(url):
    with pytest.raises(ConfigError):
        RedisTier(url)


def test_without_redis_py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kvcache\[redis\]'"):
        RedisTier("redis://127.0.0.1:1/0")


def test_unreachable_at_start_fails_open(layout):
    port = redis_servers.free_port()  # nothing listens there
    for url in (f"redis://127.0.0.1:{port}/0", f"redis+cluster://127.0.0.1:{port}"):
        tier = RedisTier(url, timeout_s=0.3)
        assert tier.capacity_bytes == 0 and tier.used_bytes == 0
        assert tier.get(make_key(0)) is None
        tier.put(make_key(0), obj_for(layout, 0))
        assert list(tier.scan()) == [] and tier.info(make_key(0)) is None
        assert tier.stats().errors >= 3
        tier.close()


def _tls_files(d):
    """A CA and a server certificate for 127.0.0.1 it signed (openssl, no network)."""
    import subprocess

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        "/CN=kvcache test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey",
        str(d / "ca.key"), "-CAcreateserial", "-days", "1", "-out", str(d / "server.crt"),
        "-extfile", str(d / "san.cnf"))
    return d / "ca.crt", d / "server.crt", d / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for certificates")
def test_rediss_url_talks_tls_and_checks_the_certificate(tmp_path, layout):
    import subprocess

    import redis

    ca, cert, key = _tls_files(tmp_path)
    port = redis_servers.free_port()
    proc = subprocess.Popen(
        [redis_servers.REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind",
         "127.0.0.1", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca))
        end = time.monotonic() + 10
        while True:
            try:
                probe.ping()
                break
            except redis.RedisError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        tier = RedisTier(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", timeout_s=2.0)
        o = obj_for(layout, 1)
        tier.put(make_key(1), o)
        got = tier.get(make_key(1))
        assert got is not None and torch.equal(got.tensors["kv"], o.tensors["kv"])
        # A server whose certificate this client's CAs did not sign: a counted miss.
        (tmp_path / "other").mkdir()
        other_ca, _, _ = _tls_files(tmp_path / "other")
        stranger = RedisTier(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other_ca}",
                             timeout_s=1.0, retries=0)
        assert stranger.get(make_key(1)) is None and stranger.stats().errors >= 1
        # Plain redis:// to a TLS port: no answer it can use, a counted miss, no exception.
        plain = RedisTier(f"redis://127.0.0.1:{port}/0", timeout_s=1.0, retries=0)
        assert plain.get(make_key(1)) is None and plain.stats().errors >= 1
        tier.close()
        stranger.close()
        plain.close()
    finally:
        proc.kill()
        proc.wait()
