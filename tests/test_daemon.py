"""The cache daemon's HTTP API, in-process: every endpoint, auth, limits, bad input,
leases, tenants, metrics, and the admin CLI through ``--server``."""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
import torch

from kvcache.kvstore import wire
from kvcache.kvstore.cache_client import CacheClient, RemoteAuthError, RemoteRequestError
from kvcache.kvstore.container import ObjectHeader, StoredObject, encode_object
from kvcache.kvstore.errors import ObjectTooLargeError
from kvcache.kvstore.fail_open import RemoteUnavailableError
from kvcache.kvstore.layout import KVLayout
from kvcache.tools import cli
from tests.daemon import TOKEN, thread_daemon
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("daemon-test", 2, 2, 64, dtype="float16")


def obj(i: int, tokens: int = 16) -> StoredObject:
    return StoredObject(ObjectHeader(make_key(i), LAYOUT, tokens),
                        {"kv": make_chunk(LAYOUT, tokens, seed=i)})


def raw_request(url: str, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def daemon(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN) as d:
        yield d


@pytest.fixture
def client(daemon):
    with CacheClient(daemon.url, token=TOKEN) as c:
        yield c


def test_put_get_lookup_delete_round_trip(client):
    objs = [obj(i) for i in range(4)]
    assert client.put_objects(objs) == 4
    keys = [make_key(i) for i in range(6)]
    got = client.get_objects(keys)
    for o, g in zip(objs, got[:4], strict=True):
        assert g is not None and g.header.key == o.header.key
        assert torch.equal(g.tensors["kv"], o.tensors["kv"])
    assert got[4:] == [None, None]
    assert client.lookup_prefix(keys, [16] * 6) == 4
    assert client.exists([keys[5], keys[1]]) == [False, True]
    assert client.delete([keys[1], keys[5]]) == 1
    assert client.exists([keys[1]]) == [False]
    assert client.get_objects([]) == []


def test_overwrite_serves_the_latest_object(client):
    client.put_objects([obj(1)])
    newer = StoredObject(ObjectHeader(make_key(1), LAYOUT, 16), {"kv": make_chunk(LAYOUT, 16, 99)})
    client.put_objects([newer])
    got = client.get_objects([make_key(1)])[0]
    assert got is not None and torch.equal(got.tensors["kv"], newer.tensors["kv"])


def test_without_the_token_writes_and_admin_get_401_and_change_nothing(daemon, client):
    client.put_objects([obj(0)])
    anonymous = CacheClient(daemon.url, retries=0)
    wrong = CacheClient(daemon.url, token="x" * 32, retries=0)
    for c in (anonymous, wrong):
        for call in (lambda c=c: c.put_objects([obj(1)]),
                     lambda c=c: c.delete([make_key(0)]),
                     lambda c=c: c.pin([make_key(0)]),
                     lambda c=c: c.evict({"all": True}),
                     lambda c=c: c.inspect(),
                     lambda c=c: c.stats()):
            with pytest.raises(RemoteAuthError):
                call()
        # reads are open by default
        assert c.exists([make_key(0), make_key(1)]) == [True, False]
    assert client.inspect()["entries"][0]["pinned"] is False
    assert len(client.inspect()["entries"]) >= 1


def test_read_auth_token_closes_reads_too(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, read_auth="token") as d:
        CacheClient(d.url, token=TOKEN).put_objects([obj(0)])
        anonymous = CacheClient(d.url, retries=0)
        with pytest.raises(RemoteAuthError):
            anonymous.get_objects([make_key(0)])
        with pytest.raises(RemoteAuthError):
            anonymous.lookup_prefix([make_key(0)])
        status, _ = raw_request(d.url, "GET", "/healthz")
        assert status == 200


def test_a_body_over_the_limit_is_413_and_stores_nothing(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, max_body=40_000) as d:
        c = CacheClient(d.url, token=TOKEN, retries=0)
        with pytest.raises(ObjectTooLargeError):
            c.put_objects([obj(0), obj(1), obj(2)])  # ~17 KB each: the third crosses it
        assert c.exists([make_key(0), make_key(1)]) == [False, False]
        # announced too large up front: refused before the body is read
        status, body = raw_request(d.url, "PUT", "/v1/objects", b"x" * 50_000,
                                   {"Content-Type": wire.OBJECTS,
                                    "Authorization": f"Bearer {TOKEN}"})
        assert status == 413 and wire.unpack_map(body)["error"] == "too_large"


def test_a_batch_with_a_corrupt_object_stores_none_of_it(daemon, client):
    good, bad = encode_object(obj(0)), bytearray(encode_object(obj(1)))
    bad[-3] ^= 0xFF
    body = b"".join(wire.FRAME_HEADER.pack(len(b)) + bytes(b) for b in (good, bad))
    status, reply = raw_request(daemon.url, "PUT", "/v1/objects", body,
                                {"Content-Type": wire.OBJECTS,
                                 "Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and b"checksum" in reply
    assert client.exists([make_key(0), make_key(1)]) == [False, False]


@pytest.mark.parametrize(
    ("method", "path", "body", "ctype", "status"),
    [
        ("POST", "/v1/lookup", b"\xc1\xc1", wire.MSGPACK, 400),           # not msgpack
        ("POST", "/v1/lookup", wire.pack([1, 2]), wire.MSGPACK, 400),      # not a map
        ("POST", "/v1/lookup", wire.pack({"keys": "abc"}), wire.MSGPACK, 400),
        ("POST", "/v1/lookup", wire.pack({"keys": ["nothex"]}), wire.MSGPACK, 400),
        ("POST", "/v1/lookup", wire.pack({"keys": [], "mode": "x"}), wire.MSGPACK, 400),
        ("POST", "/v1/get", wire.pack({"keys": ["a"]}), "application/json", 415),
        ("PUT", "/v1/objects", b"\x10\x00\x00\x00\x00\x00\x00\x00abc", wire.OBJECTS, 400),
        ("PUT", "/v1/objects", b"\x01\x02\x03", wire.OBJECTS, 400),          # torn header
        ("PUT", "/v1/objects", b"abc", "text/plain", 415),
        ("POST", "/v1/pin", wire.pack({"keys": [], "ttl": -1}), wire.MSGPACK, 400),
        ("POST", "/v1/renew", wire.pack({"lease": 5}), wire.MSGPACK, 400),
        ("POST", "/v1/evict", wire.pack({"selection": {"bogus": 1}}), wire.MSGPACK, 400),
        ("POST", "/v1/evict", wire.pack({"selection": {}}), wire.MSGPACK, 400),
        ("GET", "/v1/nothing", b"", "", 404),
        ("DELETE", "/v1/get", b"", "", 405),
    ],
)
def test_bad_requests_get_4xx_with_a_typed_body(daemon, client, method, path, body, ctype,
                                                status):
    client.put_objects([obj(0)])
    headers = {"Authorization": f"Bearer {TOKEN}"} | ({"Content-Type": ctype} if ctype else {})
    got, reply = raw_request(daemon.url, method, path, body, headers)
    assert got == status
    assert "error" in wire.unpack_map(reply)
    assert client.exists([make_key(0)]) == [True]  # nothing else changed


def test_batches_over_the_cap_are_refused(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, max_batch=3) as d:
        c = CacheClient(d.url, token=TOKEN, retries=0)
        with pytest.raises(RemoteRequestError, match="limit is 3"):
            c.exists([make_key(i) for i in range(4)])
        with pytest.raises(RemoteRequestError, match="more than 3 objects"):
            c.put_objects([obj(i) for i in range(4)])
        assert c.exists([make_key(0)]) == [False]


def _slow_upload(url: str, declared: int) -> socket.socket:
    """A put that sends its headers and then stalls, holding a request in flight."""
    parts = urlsplit(url)
    s = socket.create_connection((parts.hostname, parts.port))
    s.sendall(f"PUT /v1/objects HTTP/1.1\r\nHost: x\r\nContent-Type: {wire.OBJECTS}\r\n"
              f"Authorization: Bearer {TOKEN}\r\nContent-Length: {declared}\r\n\r\n".encode())
    return s


def test_a_client_over_its_concurrency_limit_gets_429(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, max_client_requests=1) as d:
        stalled = _slow_upload(d.url, 1000)
        time.sleep(0.3)
        status, reply = raw_request(d.url, "POST", "/v1/lookup", wire.pack({"keys": []}),
                                    {"Content-Type": wire.MSGPACK})
        assert status == 429 and wire.unpack_map(reply)["error"] == "busy"
        stalled.close()
        time.sleep(0.3)
        status, _ = raw_request(d.url, "POST", "/v1/lookup", wire.pack({"keys": []}),
                                {"Content-Type": wire.MSGPACK})
        assert status == 200


def test_a_request_past_the_timeout_is_503_and_stores_nothing(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, request_timeout=0.5) as d:
        s = _slow_upload(d.url, 100_000)
        s.sendall(wire.FRAME_HEADER.pack(90_000) + b"\0" * 100)
        s.settimeout(5)
        reply = s.recv(4096)
        s.close()
        assert reply.startswith(b"HTTP/1.1 503")
        assert CacheClient(d.url).exists([make_key(0)]) == [False]


def test_leases_pin_until_released_or_expired(daemon, client):
    client.put_objects([obj(0), obj(1)])
    lease = client.pin([make_key(0), make_key(7)], ttl_s=5)
    assert lease.pinned == [True, False]

    def pinned(i: int) -> bool:
        return client.inspect(key=make_key(i))["entry"]["info"]["pinned"]

    assert pinned(0)
    assert client.renew(lease.lease_id, ttl_s=5)
    assert client.unpin(lease.lease_id) and not pinned(0)
    assert not client.unpin(lease.lease_id)  # already released
    assert not client.renew("0" * 32)
    # Two leases on one key: it stays pinned until both are gone.
    a, b = client.pin([make_key(1)]), client.pin([make_key(1)], ttl_s=0.2)
    time.sleep(0.3)
    assert daemon.server.leases.expire() == 1  # b ran out unrenewed
    assert pinned(1)
    assert not client.renew(b.lease_id)
    client.unpin(a.lease_id)
    assert not pinned(1)
    assert daemon.server.leases.expired == 1 and daemon.server.leases.active == 0


def test_a_pinned_entry_survives_deletion_without_force(daemon, client):
    client.put_objects([obj(0)])
    client.pin([make_key(0)])
    with pytest.raises(RemoteRequestError, match="409"):
        client.delete([make_key(0)])
    assert client.delete([make_key(0)], force=True) == 1
    assert daemon.server.leases.pinned_keys == 0


def test_tenant_quota_evicts_the_tenants_own_oldest_writes(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, tenant_quota="1MiB") as d:
        big = KVLayout("daemon-test", 4, 2, 128, dtype="float16")  # 256 KiB at 64 tokens

        def big_obj(i: int) -> StoredObject:
            return StoredObject(ObjectHeader(make_key(i), big, 64),
                                {"kv": make_chunk(big, 64, seed=i)})

        a = CacheClient(d.url, token=TOKEN, tenant="a")
        b = CacheClient(d.url, token=TOKEN, tenant="b")
        b.put_objects([big_obj(100)])
        for i in range(6):
            a.put_objects([big_obj(i)])
        present = a.exists([make_key(i) for i in range(6)])
        assert present == [False, False, True, True, True, True]  # 4 × 256 KiB fit
        assert b.exists([make_key(100)]) == [True]
        tenants = a.stats()["tenants"]
        assert tenants["a"]["used_bytes"] <= 1 << 20 and tenants["a"]["quota_evictions"] == 2
        assert tenants["b"]["entries"] == 1
        b.get_objects([make_key(100), make_key(0)])
        assert a.stats()["tenants"]["b"]["hits"] == 1
        with pytest.raises(ObjectTooLargeError, match="tenant quota"):
            a.put_objects([big_obj(i) for i in range(10, 15)])


def test_metrics_export_tiers_leases_tenants_and_errors(daemon, client):
    client.put_objects([obj(0)])
    client.get_objects([make_key(0), make_key(1)])
    client.pin([make_key(0)])
    with pytest.raises(RemoteAuthError):
        CacheClient(daemon.url, retries=0).delete([make_key(0)])
    text = urllib.request.urlopen(daemon.url + "/metrics").read().decode()
    for series in ('kvcache_tier_hits_total{tier="cpu"}', 'kvcache_tier_used_bytes{tier="disk"}',
                   'kvcache_tier_removals_total{cause="ttl",tier="cpu"}',
                   "kvcache_leases_active 1.0", "kvcache_pinned_keys 1.0",
                   'kvcache_tenant_hits_total{tenant="default"} 1.0',
                   'kvcache_request_errors_total{endpoint="/v1/delete",type="unauthorized"} 1.0',
                   'kvcache_request_seconds_count{endpoint="/v1/get"} 1.0',
                   "kvcache_open_connections"):
        assert series in text, series


def test_health_endpoints(daemon, client):
    assert raw_request(daemon.url, "GET", "/healthz") == (200, b"ok\n")
    assert client.health()["tiers"] == ["cpu", "disk"]


def test_admin_cli_through_the_daemon(daemon, client, capsys):
    client.put_objects([obj(i) for i in range(3)])
    client.get_objects([make_key(0)])
    server = ["--server", daemon.url, "--token", TOKEN]
    assert cli.main(["inspect", *server, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {e["key"] for e in listed["entries"]} >= {make_key(i) for i in range(3)}
    assert cli.main(["inspect", make_key(1), *server]) == 0
    assert make_key(1) in capsys.readouterr().out
    assert cli.main(["stats", *server]) == 0
    out = capsys.readouterr().out
    assert "HIT RATE" in out and "top consumers" in out and "default" in out
    assert cli.main(["evict", "--key", make_key(2), *server]) == 0
    assert client.exists([make_key(2)]) == [False]
    assert cli.main(["evict", "--key", make_key(2), *server]) == 1  # nothing matches now
    assert cli.main(["stats", "--server", daemon.url]) == 2  # no token: refused
    assert "token" in capsys.readouterr().err


def test_a_durable_put_answers_once_the_objects_are_on_disk(daemon, client):
    disk = daemon.store.tiers[1]
    assert client.put_objects([obj(i) for i in range(8)], durable=True) == 8
    assert all(disk.contains(make_key(i)) for i in range(8))


def test_a_get_cancelled_while_lending_returns_its_loans(tmp_path):
    with thread_daemon(tmp_path, token=TOKEN, request_timeout=0.2) as d:
        c = CacheClient(d.url, token=TOKEN, retries=0, timeout_s=5)
        # Stored directly, not through a request: a durable put can take longer than the
        # 0.2 s this daemon allows a request on a loaded machine.
        d.store.put_object(obj(0))
        d.store.flush()
        d.store.tiers[0].delete(make_key(0))  # on disk only: lent from the thread pool
        lend = d.store.lend

        def slow_lend(keys):
            loans = lend(keys)
            time.sleep(0.5)  # the request times out meanwhile
            return loans

        d.store.lend = slow_lend
        with pytest.raises(RemoteUnavailableError, match="503"):
            c.get_objects([make_key(0)])
        time.sleep(0.6)
        cpu = d.store.tiers[0]
        assert cpu._entries[make_key(0)].refs == 0  # promoted, lent, given back: evictable
