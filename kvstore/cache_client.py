"""A blocking client of the cache daemon (``kvcache serve``), for tiers and connectors.

Engines call it from their own threads, so it is synchronous (stdlib ``http.client``: no
event loop to share) with a pool of keep-alive connections. Every request runs inside a
``Deadline`` that covers connecting, retries and reading the body; transport failures
(refused, reset, timed out, a reply that does not follow ``kvstore/wire.py``) are retried
with backoff and end as ``RemoteUnavailableError``; a ``CircuitBreaker`` stops a dead
daemon from costing a connect per request. Refusals the daemon meant (401, 413, 400) are
typed errors and are not retried. Every object received is verified (checksum, and that it
is the object of the key asked for); one that fails is a miss and is counted in
``corrupt``.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from kvcache.kvstore import wire
from kvcache.kvstore.container import StoredObject, decode_object, encode_parts, object_buffer
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    KVCacheError,
    ObjectTooLargeError,
)
from kvcache.kvstore.fail_open import (
    CircuitBreaker,
    Deadline,
    RemoteUnavailableError,
    call_with_retries,
)
from kvcache.kvstore.shm_reader import SharedMemoryReader
from kvcache.kvstore.tier import check_object_key

log = logging.getLogger(__name__)
T = TypeVar("T")
_READ_PIECE = 1 << 20
_FAST_PATH_RETRY_S = 5.0


class RemoteAuthError(KVCacheError):
    """The daemon refused the request's token (HTTP 401)."""


class RemoteRequestError(KVCacheError):
    """The daemon refused the request as malformed or unsupported (HTTP 4xx)."""


class _Retryable(Exception):
    """A reply that means "try again" (429, 5xx): the daemon is busy or restarting."""


_TRANSPORT_ERRORS = (OSError, http.client.HTTPException, wire.ProtocolError, _Retryable)


@dataclass(frozen=True)
class Lease:
    """Pins held for a client until ``unpin`` or until ``ttl_s`` passes without ``renew``."""

    lease_id: str
    pinned: list[bool]
    ttl_s: float


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class _TcpHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        # Frames go out as several writes; Nagle would hold the small ones back.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connection_factory(url: str) -> Callable[[float], http.client.HTTPConnection]:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path
        if not path:
            raise ConfigError(f"{url!r}: give the socket's path, e.g. unix:///run/kvcache.sock")
        return lambda timeout: _UnixHTTPConnection(path, timeout)
    if parts.scheme == "http" and parts.hostname:
        host, port = parts.hostname, parts.port or 80
        return lambda timeout: _TcpHTTPConnection(host, port, timeout=timeout)
    raise ConfigError(f"{url!r} is not a daemon URL; use http://host:port or unix:///path")


class CacheClient:
    """Talks to one daemon. Thread-safe; connections are pooled and reused."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        tenant: str = "default",
        timeout_s: float = 2.0,
        retries: int = 1,
        backoff_s: float = 0.02,
        breaker: CircuitBreaker | None = None,
        pool_size: int = 16,
        fast_path: bool = True,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker or CircuitBreaker()
        self._connect = _connection_factory(url)
        self._headers = {wire.TENANT_HEADER: tenant}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._pool: list[http.client.HTTPConnection] = []
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self.corrupt = 0  # objects received that failed verification
        # Same node (a unix:// URL): reads go through the daemon's shared-memory fast path
        # when it offers one; any trouble there falls back to HTTP for a while.
        parts = urlsplit(url)
        self._fast_path_at = (parts.path + wire.FAST_PATH_SUFFIX
                              if fast_path and parts.scheme == "unix" else None)
        self._fast: SharedMemoryReader | None = None
        self._fast_retry_at = 0.0
        self._token, self._tenant = token, tenant

    # -- transport -----------------------------------------------------------------------
    def _take(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = self._connect(timeout)
        return conn

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._pool) < self._pool_size:
                self._pool.append(conn)
                return
        conn.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        body: Callable[[], Iterable[bytes | memoryview]] | bytes | None = None,
        content_type: str = wire.MSGPACK,
        read: Callable[[_Body], T],
        deadline: Deadline | None = None,
    ) -> T:
        """One request with retries inside ``deadline`` (default: ``timeout_s`` from now);
        ``read`` consumes a 200 answer. ``body``: bytes, or a function giving the buffers of
        a streamed body (called again on each retry)."""
        headers = dict(self._headers)

        def attempt(dl: Deadline) -> T:
            conn = self._take(dl.remaining())
            try:
                conn.timeout = dl.remaining()
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                if callable(body):
                    parts = list(body())
                    length = sum(memoryview(p).nbytes for p in parts)
                    conn.putrequest(method, path)
                    for k, v in {**headers, "Content-Type": content_type,
                                 "Content-Length": str(length)}.items():
                        conn.putheader(k, v)
                    conn.endheaders()
                    for p in parts:
                        conn.sock.settimeout(dl.remaining())
                        conn.sock.sendall(p)
                else:
                    h = headers | ({"Content-Type": content_type} if body is not None else {})
                    conn.request(method, path, body=body, headers=h)
                resp = conn.getresponse()
                if resp.status != 200:
                    _raise_for_status(resp)
                answer = _Body(resp, conn.sock, dl)
                result = read(answer)
                if not answer.at_end():
                    raise wire.ProtocolError("the reply has bytes after its end")
            except BaseException:
                conn.close()
                raise
            if resp.will_close:
                conn.close()
            else:
                self._give_back(conn)
            return result

        return call_with_retries(
            attempt,
            deadline=deadline or Deadline(self.timeout_s),
            breaker=self.breaker,
            retries=self.retries,
            backoff_s=self.backoff_s,
            retry_on=_TRANSPORT_ERRORS,
            what=f"{what} at {self.url}",
        )

    def _meta(self, method: str, path: str, what: str, body: dict[str, Any] | None = None,
              deadline: Deadline | None = None) -> dict[str, Any]:
        return self._call(
            method, wire.API + path, what=what,
            body=None if body is None else wire.pack(body),
            read=_read_map, deadline=deadline,
        )

    # -- the API -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._meta("GET", "/health", "health check")

    def lookup_prefix(self, keys: Sequence[str], num_tokens: Sequence[int] | None = None) -> int:
        """How many leading ``keys`` (chained prefix keys) the daemon holds."""
        body: dict[str, Any] = {"keys": list(keys), "mode": "prefix"}
        if num_tokens is not None:
            body["tokens"] = list(num_tokens)
        return int(self._meta("POST", "/lookup", "lookup", body)["prefix"])

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether the daemon holds each key (content keys, any order). On the same node
        the fast path's shared index answers what it can; the daemon is asked the rest."""
        fast = self._fast_reader()
        known: list[bool | None] = [None] * len(keys)
        if fast is not None:
            try:
                known = fast.exists(keys)
            except OSError as e:
                log.info("fast path of %s failed (%s); looking up over HTTP", self.url, e)
                self._drop_fast()
        ask = [key for key, k in zip(keys, known, strict=True) if k is None]
        if not ask:
            return [bool(k) for k in known]
        got = self._meta("POST", "/lookup", "lookup", {"keys": ask, "mode": "each"})
        present = got.get("present")
        if not isinstance(present, list) or len(present) != len(ask):
            raise RemoteUnavailableError(f"lookup at {self.url}: malformed answer")
        answers = iter(present)
        return [bool(next(answers)) if k is None else k for k in known]

    def get_objects(
        self, keys: Sequence[str], deadline: Deadline | None = None
    ) -> list[StoredObject | None]:
        """The objects under ``keys`` (None: the daemon does not hold it, or what came
        back failed verification)."""
        if not keys:
            return []
        dl = deadline or Deadline(self.timeout_s)
        fast = self._fast_reader()
        if fast is not None:
            try:
                got = fast.get_objects(keys, dl)
                self.corrupt += fast.corrupt
                fast.corrupt = 0
                return got
            except (OSError, wire.ProtocolError) as e:
                log.info("fast path of %s failed (%s); reading over HTTP", self.url, e)
                self._drop_fast()
        deadline = dl
        raw = self._call(
            "POST", wire.API + "/get", what="get", body=wire.pack({"keys": list(keys)}),
            read=lambda answer: _read_frames(answer, len(keys)), deadline=deadline,
        )
        out: list[StoredObject | None] = []
        for key, buf in zip(keys, raw, strict=True):
            obj = None
            if buf is not None:
                try:
                    obj = decode_object(buf)
                    check_object_key(key, obj.header)
                except CorruptObjectError as e:
                    self.corrupt += 1
                    log.warning("%s from %s failed verification: %s", key, self.url, e)
                    obj = None
            out.append(obj)
        return out

    def put_objects(self, objs: Sequence[StoredObject], deadline: Deadline | None = None, *,
                    durable: bool = False) -> int:
        """Store ``objs`` (all or none: a refused one stores nothing); returns how many.
        ``durable``: answer only once they are in the daemon's lowest tier (by default the
        daemon answers when they are in memory and writes them down in the background, so
        a crash of the daemon can lose the last moments' puts, never serve a torn one)."""
        if not objs:
            return 0

        def frames() -> Iterable[bytes | memoryview]:
            for obj in objs:
                yield from wire.frame_parts(encode_parts(obj))

        path = wire.API + "/objects" + ("?durable=1" if durable else "")
        got = self._call("PUT", path, what="put", body=frames,
                         content_type=wire.OBJECTS, read=_read_map, deadline=deadline)
        return int(got.get("stored", 0))

    def delete(self, keys: Sequence[str], *, force: bool = False) -> int:
        return int(self._meta("POST", "/delete", "delete", {"keys": list(keys), "force": force})
                   ["deleted"])

    def pin(self, keys: Sequence[str], ttl_s: float | None = None) -> Lease:
        """Pin ``keys`` under a new lease (renew it before ``ttl_s`` passes, or lose it)."""
        body: dict[str, Any] = {"keys": list(keys)}
        if ttl_s is not None:
            body["ttl"] = ttl_s
        got = self._meta("POST", "/pin", "pin", body)
        return Lease(str(got["lease"]), [bool(p) for p in got["pinned"]], float(got["ttl"]))

    def renew(self, lease_id: str, ttl_s: float | None = None) -> bool:
        body: dict[str, Any] = {"lease": lease_id}
        if ttl_s is not None:
            body["ttl"] = ttl_s
        return bool(self._meta("POST", "/renew", "renew", body)["renewed"])

    def unpin(self, lease_id: str) -> bool:
        return bool(self._meta("POST", "/unpin", "unpin", {"lease": lease_id})["released"])

    def evict(self, selection: dict[str, Any], *, dry_run: bool = False,
              force: bool = False) -> dict[str, Any]:
        """Admin eviction (``kvcache evict --server``); ``selection`` as in ``tools/admin``."""
        return self._meta("POST", "/evict", "evict",
                          {"selection": selection, "dry_run": dry_run, "force": force})

    def inspect(self, key: str | None = None, model: str | None = None) -> dict[str, Any]:
        query = "&".join(f"{k}={quote(v)}" for k, v in (("key", key), ("model", model)) if v)
        return self._meta("GET", "/inspect" + (f"?{query}" if query else ""), "inspect")

    def stats(self) -> dict[str, Any]:
        return self._meta("GET", "/stats", "stats")

    def _fast_reader(self) -> SharedMemoryReader | None:
        if self._fast_path_at is None or time.monotonic() < self._fast_retry_at:
            return None
        with self._lock:
            if self._fast is None:
                try:
                    self._fast = SharedMemoryReader(self._fast_path_at, timeout_s=self.timeout_s,
                                                    token=self._token, tenant=self._tenant)
                except (OSError, wire.ProtocolError, KeyError, ValueError) as e:
                    log.debug("no fast path at %s: %s", self._fast_path_at, e)
                    self._fast_retry_at = time.monotonic() + _FAST_PATH_RETRY_S
                    return None
            return self._fast

    def _drop_fast(self) -> None:
        with self._lock:
            if self._fast is not None:
                self._fast.close()
                self._fast = None
            self._fast_retry_at = time.monotonic() + _FAST_PATH_RETRY_S

    @property
    def uses_fast_path(self) -> bool:
        return self._fast is not None

    def close(self) -> None:
        self._drop_fast()
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            conn.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_for_status(resp: http.client.HTTPResponse) -> None:
    detail = resp.read(64 << 10)
    try:
        message = str(wire.unpack_map(detail).get("message", ""))
    except wire.ProtocolError:
        message = detail[:200].decode("utf-8", "replace")
    text = f"HTTP {resp.status}: {message}"
    if resp.status == 401:
        raise RemoteAuthError(f"the daemon refused the token ({text})")
    if resp.status == 413:
        raise ObjectTooLargeError(f"the daemon refused the body as too large ({text})")
    if resp.status == 429 or resp.status >= 500:
        raise _Retryable(text)
    raise RemoteRequestError(text)


class _Body:
    """A 200 answer's body, read in pieces each bounded by what is left of the deadline."""

    def __init__(self, resp: http.client.HTTPResponse, sock: socket.socket | None,
                 dl: Deadline) -> None:
        self.resp, self.sock, self.dl = resp, sock, dl

    def content_type(self) -> str:
        return (self.resp.getheader("Content-Type") or "").split(";")[0].strip()

    def _tick(self) -> None:
        if self.sock is not None:
            self.sock.settimeout(self.dl.remaining())

    def read(self, n: int | None) -> bytes:
        """``n`` bytes (None: the rest of the body, at most the metadata limit)."""
        want = wire.MAX_METADATA_BYTES + 1 if n is None else n
        chunks: list[bytes] = []
        got = 0
        while got < want:
            self._tick()
            piece = self.resp.read(min(_READ_PIECE, want - got))
            if not piece:
                break
            chunks.append(piece)
            got += len(piece)
        if n is not None and got < n:
            raise wire.ProtocolError(f"truncated reply: {got} of {n} bytes")
        if n is None and got > wire.MAX_METADATA_BYTES:
            raise wire.ProtocolError("metadata reply is too large")
        return b"".join(chunks)

    def read_into(self, buf: memoryview) -> None:
        filled, n = 0, buf.nbytes
        while filled < n:
            self._tick()
            got = self.resp.readinto(buf[filled : min(n, filled + _READ_PIECE)])
            if not got:
                raise wire.ProtocolError(f"truncated object: {filled} of {n} bytes")
            filled += got

    def at_end(self) -> bool:
        self._tick()
        return not self.resp.read(1)


def _expect(body: _Body, content_type: str) -> None:
    if body.content_type() != content_type:
        raise wire.ProtocolError(f"expected {content_type}, got {body.content_type() or 'none'}")


def _read_map(body: _Body) -> dict[str, Any]:
    _expect(body, wire.MSGPACK)
    return wire.unpack_map(body.read(None))


def _read_frames(body: _Body, count: int) -> list[memoryview | None]:
    """``count`` object frames, each read into its own aligned buffer."""
    _expect(body, wire.OBJECTS)
    out: list[memoryview | None] = []
    for _ in range(count):
        n = wire.frame_length(body.read(wire.FRAME_HEADER.size))
        if n == wire.MISS:
            out.append(None)
            continue
        buf = object_buffer(n)[:n]
        body.read_into(buf)
        out.append(buf)
    return out
