"""Malformed input against ``kvcache serve`` as a real process: 10,000 random requests,
and checksummed containers or selections that are well-formed bytes but wrong inside.
No input fails more than its own request: a 4xx (or, for bytes that are not HTTP, a
closed connection), never a 5xx, the daemon up and its data intact.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import socket
import struct
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest
import xxhash

from kvcache.kvstore import wire
from kvcache.kvstore.cache_client import CacheClient
from kvcache.kvstore.container import ObjectHeader, encode_object
from tests.daemon import LAYOUT, TOKENS, daemon, holds, make_obj, server_errors, thread_daemon
from tests.helpers import make_key

pytestmark = pytest.mark.slow


ROUTES = {("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/v1/health"),
          ("POST", "/v1/lookup"), ("POST", "/v1/get"), ("PUT", "/v1/objects"),
          ("POST", "/v1/delete"), ("POST", "/v1/pin"), ("POST", "/v1/renew"),
          ("POST", "/v1/unpin"), ("POST", "/v1/evict"), ("GET", "/v1/inspect"),
          ("GET", "/v1/stats")}
META_PATHS = ["/v1/lookup", "/v1/get", "/v1/delete", "/v1/pin", "/v1/renew", "/v1/unpin",
              "/v1/evict"]
FUZZ_FRESH = range(500_000, 500_050)  # valid objects sent only inside refused batches


def random_value(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack-able value (nested up to 3 levels)."""
    kinds = ["nil", "bool", "int", "bigint", "float", "str", "hexkey", "bin"]
    if depth < 3:
        kinds += ["list", "map"]
    kind = rng.choice(kinds)
    if kind == "nil":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-1000, 1000)
    if kind == "bigint":
        return rng.choice([2**63 - 1, -(2**63), 2**64 - 1, 2**32])
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e308, float("nan"), float("inf"), float("-inf"), 3.25])
    if kind == "str":
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 40)))
    if kind == "hexkey":  # a well-formed key no test entry has
        return rng.getrandbits(128).to_bytes(16, "big").hex()
    if kind == "bin":
        return rng.randbytes(rng.randint(0, 64))
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {str(random_value(rng, depth + 1)): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def meta_body(rng: random.Random, path: str) -> tuple[bytes, bool]:
    """(a msgpack-ish body for ``path``, whether it must be refused). Never a request that
    could remove or pin a stored entry: keys are random, evictions are dry runs with
    selections that are not maps of filters."""
    choice = rng.randrange(6)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 300)), True
    if choice == 1:  # a valid message cut short
        full = wire.pack({"keys": [random_value(rng) for _ in range(4)], "mode": "each"})
        return full[:rng.randrange(len(full))], True
    if choice == 2:  # msgpack, but not a map with string keys
        return wire.pack(rng.choice([[1, 2], "keys", 7, None, {1: 2}, b"\x80"])), True
    if choice == 3:  # a map that lacks what the endpoint needs
        return wire.pack({"kyes": [], "x": random_value(rng)}), True
    if path == "/v1/evict":
        sel = rng.choice([random_value(rng, 2), [1], "all", {"everything": True}, None])
        if isinstance(sel, dict):
            sel = {"bogus_" + k: v for k, v in sel.items()}
        return wire.pack({"selection": sel, "dry_run": True}), not isinstance(sel, dict)
    body: dict[str, object] = {}
    if choice == 4:
        body["keys"] = random_value(rng)
    else:
        body["keys"] = [random_value(rng) if rng.random() < 0.3 else random_value(rng, 3)
                        for _ in range(rng.randint(0, 5))]
    for field in ("mode", "tokens", "force", "ttl", "lease"):
        if rng.random() < 0.4:
            body[field] = random_value(rng)
    return wire.pack(body), False


def garbage_frames(rng: random.Random, sample: bytes) -> bytes:
    """A body for ``PUT /v1/objects`` that must be refused as a whole."""
    frame = struct.pack("<Q", len(sample)) + sample
    choice = rng.randrange(7)
    if choice == 0:
        return rng.randbytes(rng.randint(1, 600))
    if choice == 1:  # a frame cut anywhere
        return frame[:rng.randrange(1, len(frame))]
    if choice == 2:  # a length beyond the body
        return struct.pack("<Q", rng.randint(len(sample) + 1, 1 << 40)) + sample
    if choice == 3:  # one byte of the object changed: its checksum no longer matches
        pos = rng.randrange(8, len(frame))
        return frame[:pos] + bytes([frame[pos] ^ rng.randint(1, 255)]) + frame[pos + 1:]
    if choice == 4:  # a good frame, then garbage: nothing of the batch may be stored
        return frame + rng.choice([b"\x01", rng.randbytes(9), struct.pack("<Q", 5) + b"xy"])
    if choice == 5:
        return struct.pack("<Q", rng.choice([0, wire.MISS, 2**63]))
    return struct.pack("<Q", 16) + rng.randbytes(16)


RAW_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST /v1/get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/msgpack\r\n\r\nzz\r\n",
    b"POST /v1/get HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS client hello's start
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\x00\xff\r\n\r\n",
]


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection, close our side, return all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with contextlib.suppress(OSError):  # the daemon may close before it all went out
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    return out


def statuses(reply: bytes) -> list[int]:
    """The status of every HTTP response in ``reply``."""
    out = []
    for line in reply.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            out.append(int(line[9:12]))
    return out


class Http:
    """A keep-alive connection that reconnects when the daemon closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str]) -> int:
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                resp.read()
                if resp.will_close:
                    self.conn.close()
                return resp.status
            except (http.client.RemoteDisconnected, ConnectionError):
                self.conn.close()  # a keep-alive connection the daemon had closed
                if attempt:
                    raise
        raise AssertionError("unreachable")


def test_ten_thousand_garbage_requests(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    stored = list(range(20))
    sample = encode_object(make_obj(FUZZ_FRESH[0], 1))
    with daemon(tmp_path / "store") as d, CacheClient(d.url) as client:
        assert client.put_objects([make_obj(i, i) for i in stored]) == len(stored)
        conn = Http(d.port)
        bad: list[str] = []  # requests answered wrongly, described
        seen: dict[int, int] = {}
        start = time.monotonic()
        for _ in range(10_000):
            kind = rng.randrange(10)
            if kind == 0:  # bytes on a socket, HTTP or not
                data = (rng.choice(RAW_REQUESTS) if rng.random() < 0.3
                        else rng.randbytes(rng.randint(1, 400)))
                got = statuses(raw_exchange(d.port, data))
                for st in got:
                    seen[st] = seen.get(st, 0) + 1
                # Garbage is refused (4xx) or the connection closed; a request in front of
                # it may have been answered normally.
                if any(st >= 500 for st in got) or (got and not data.startswith(b"GET /h")
                                                    and got[0] < 400):
                    bad.append(f"raw {data[:60]!r} -> {got}")
                continue
            headers = {"Content-Type": wire.MSGPACK}
            body: bytes | None
            if kind <= 4:
                path = rng.choice(META_PATHS)
                method = "POST"
                body, refuse = meta_body(rng, path)
                if rng.random() < 0.2:  # a tenant name that may not be one
                    headers[wire.TENANT_HEADER] = "".join(
                        chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, 80)))
            elif kind <= 6:
                method, path = "PUT", "/v1/objects"
                headers["Content-Type"] = wire.OBJECTS
                body, refuse = garbage_frames(rng, sample), True
            elif kind == 7:  # the right endpoint, the wrong content type
                method, path = rng.choice(sorted(r for r in ROUTES if r[0] != "GET"))
                body = wire.pack({"keys": []}) if path != "/v1/objects" else b"\0" * 8
                ctype = rng.choice(["text/plain", "application/json", None, wire.OBJECTS,
                                    wire.MSGPACK, "application/msgpack\x7f"])
                if ctype == (wire.OBJECTS if path == "/v1/objects" else wire.MSGPACK):
                    ctype = "application/octet-stream"
                headers = {} if ctype is None else {"Content-Type": ctype}
                refuse = True
            elif kind == 8:  # an endpoint that is not there, or the wrong method
                method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                                     "OPTIONS", "FROB"])
                chars = "abcdefghijklmnopqrstuvwxyz0123456789/._~-%"
                path = rng.choice(["/v1/", "/", "/v2/", "//", "/v1/objects/"]) + "".join(
                    rng.choice(chars) for _ in range(rng.randint(0, 30)))
                body = rng.randbytes(rng.randint(0, 100)) if method != "GET" else None
                refuse = (method, path) not in ROUTES
            else:  # inspect with any query
                method = "GET"
                q = "".join(rng.choice("abcdef0123456789%=&+zk") for _ in range(40))
                path = rng.choice(["/v1/inspect?key=", "/v1/inspect?model=", "/v1/inspect?"])
                path += q
                body, refuse = None, False
            try:
                st = conn.request(method, path, body, headers)
            except OSError as e:
                bad.append(f"{method} {path} {body!r:.60}: no answer ({e!r})")
                conn = Http(d.port)
                continue
            seen[st] = seen.get(st, 0) + 1
            if st >= 500 or (refuse and not 400 <= st < 500):
                bad.append(f"{method} {path} {headers} {body!r:.80} -> {st}")
        took = time.monotonic() - start
        print(f"10000 garbage requests in {took:.1f}s; statuses {dict(sorted(seen.items()))}")
        assert bad == [], f"{len(bad)} answered wrongly, e.g. {bad[:10]}"
        assert d.alive()
        with urllib.request.urlopen(d.url + "/healthz", timeout=5) as r:
            assert r.status == 200
        got = client.get_objects([make_key(i) for i in stored])
        assert all(holds(o, i, [i]) for i, o in zip(stored, got, strict=True))
        assert not any(client.exists([make_key(i) for i in FUZZ_FRESH]))  # no partial batch
        assert client.corrupt == 0
        assert server_errors(d.url) == {}
        assert took < 40


def crafted_container(table: Mapping[str, object], header: object, payload: bytes) -> bytes:
    """A container with a valid checksum over whatever ``table`` and ``header`` say."""
    table = dict(table)
    table["__metadata__"] = {"kvcache": json.dumps(header), "checksum": "0" * 32}
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw = struct.pack("<Q", len(raw) + (-len(raw) % 8)) + raw
    raw += b" " * (-len(raw) % 8)
    digest = xxhash.xxh3_128(raw)
    digest.update(payload)
    at = raw.index(b'"checksum":"') + len(b'"checksum":"')
    return raw[:at] + digest.hexdigest().encode() + raw[at + 32:] + payload


def post(url: str, method: str, path: str, body: bytes, content_type: str) -> int:
    parts = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_checksummed_container_with_a_malformed_table_is_refused(tmp_path: Path) -> None:
    header = ObjectHeader(make_key(1), LAYOUT, TOKENS).to_json()
    payload = b"\0" * (math.prod(LAYOUT.chunk_shape(TOKENS)) * 2)
    shape = list(LAYOUT.chunk_shape(TOKENS))
    cases = {
        "offsets null": ({"kv": {"dtype": "F16", "shape": shape,
                                 "data_offsets": [0, None]}}, header),
        "offsets strings": ({"kv": {"dtype": "F16", "shape": shape,
                                    "data_offsets": ["0", str(len(payload))]}}, header),
        "negative shape": ({"kv": {"dtype": "F16", "shape": [-shape[0], -shape[1], *shape[2:]],
                                   "data_offsets": [0, len(payload)]}}, header),
        "fractional shape": ({"kv": {"dtype": "F16", "shape": [shape[0] + 0.5, *shape[1:]],
                                     "data_offsets": [0, len(payload)]}}, header),
        "header not a map": ({"kv": {"dtype": "F16", "shape": shape,
                                     "data_offsets": [0, len(payload)]}}, [header]),
    }
    with thread_daemon(tmp_path) as d:
        got = {}
        for name, (table, head) in cases.items():
            obj = crafted_container(table, head, payload)
            got[name] = post(d.url, "PUT", "/v1/objects", struct.pack("<Q", len(obj)) + obj,
                             wire.OBJECTS)
        assert got == dict.fromkeys(cases, 400)


def test_evict_with_mistyped_selection_is_refused(tmp_path: Path) -> None:
    with thread_daemon(tmp_path) as d:
        with CacheClient(d.url) as client:
            client.put_objects([make_obj(0, 0)])
        got = {name: post(d.url, "POST", "/v1/evict",
                          wire.pack({"selection": sel, "dry_run": True}), wire.MSGPACK)
               for name, sel in (("prefix", {"prefix": 5}), ("to_size", {"to_size": "1"}))}
        assert got == {"prefix": 400, "to_size": 400}
