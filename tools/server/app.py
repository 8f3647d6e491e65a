"""The daemon's HTTP API over one ``TieredStore`` (wire format: ``kvstore/wire.py``).

Every request passes one middleware that authorises it (a bearer token for writes, pins,
evictions and admin; for reads too under ``read_auth = "token"``), bounds it (requests in
flight per client, a timeout), times it and maps every error to a status with a msgpack
``{"error", "message"}`` body — so that no input, however malformed, does more than fail
its own request. Store calls block (disk I/O, codecs) and run on a thread pool, off the
event loop. A batch put reads and verifies every object before it stores any.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from kvcache.kvstore import wire
from kvcache.kvstore.background import serial_torch_ops
from kvcache.kvstore.config import TENANT_RE, ServerConfig
from kvcache.kvstore.container import StoredObject, decode_object, encode_parts
from kvcache.kvstore.cpu_tier import CpuTier, Loan
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    EntryPinnedError,
    InvalidKeyError,
    KVCacheError,
    LayoutMismatchError,
    ObjectTooLargeError,
    StoreFullError,
    UnknownCodecError,
)
from kvcache.kvstore.tiered_store import TieredStore, check_key
from kvcache.kvstore.tokens import token_matches
from kvcache.tools.admin import Selection, evict_from
from kvcache.tools.server.leases import LeaseTable
from kvcache.tools.server.metrics import CONTENT_TYPE as METRICS_TYPE
from kvcache.tools.server.metrics import ServerMetrics
from kvcache.tools.server.tenants import TenantBook

log = logging.getLogger("kvcache.server")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_WRITE_PIECE = 1 << 20  # response writes this size wait for the socket to drain


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Errors a request can cause, and the status each gets (most specific first).
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ObjectTooLargeError, 413),
    (StoreFullError, 507),
    (EntryPinnedError, 409),
    (wire.ProtocolError, 400),
    (InvalidKeyError, 400),
    (LayoutMismatchError, 400),
    (CorruptObjectError, 400),
    (UnknownCodecError, 400),
    (ConfigError, 400),
    (ValueError, 400),
)


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(status=status, body=wire.pack({"error": kind, "message": message}),
                        content_type=wire.MSGPACK)


def _ok(body: dict[str, Any]) -> web.Response:
    return web.Response(body=wire.pack(body), content_type=wire.MSGPACK)


class CacheServer:
    """The daemon's state and handlers; ``app()`` builds the aiohttp application."""

    def __init__(self, store: TieredStore, cfg: ServerConfig, *, token: str | None,
                 io_threads: int = 8) -> None:
        self.store, self.cfg, self.token = store, cfg, token
        self.leases = LeaseTable(store.pin, store.unpin, default_ttl_s=cfg.lease_ttl,
                                 max_ttl_s=cfg.max_lease_ttl)
        self.tenants = TenantBook(cfg.tenant_quota)
        self.metrics = ServerMetrics(store, self.leases, self.tenants, self._open_connections)
        self.started_at = time.time()
        self.stopping = False
        self.web_server: web.Server | None = None  # set by the runner, for connection counts
        # The daemon shares the node's cores with the engines it serves: its copies run on
        # the thread that asks for them, never on an OpenMP team (kvstore/background.py).
        self._executor = ThreadPoolExecutor(io_threads, thread_name_prefix="kvcache-io",
                                            initializer=serial_torch_ops)
        self._in_flight: dict[str, int] = {}
        # path -> who may call it: "open", "read" (token if read_auth = token), "write"/"admin"
        self._routes: dict[tuple[str, str], tuple[Handler, str]] = {
            ("GET", "/healthz"): (self.healthz, "open"),
            ("GET", "/metrics"): (self.prometheus, "open"),
            ("GET", wire.API + "/health"): (self.health, "open"),
            ("POST", wire.API + "/lookup"): (self.lookup, "read"),
            ("POST", wire.API + "/get"): (self.get, "read"),
            ("PUT", wire.API + "/objects"): (self.put, "write"),
            ("POST", wire.API + "/delete"): (self.delete, "write"),
            ("POST", wire.API + "/pin"): (self.pin, "write"),
            ("POST", wire.API + "/renew"): (self.renew, "write"),
            ("POST", wire.API + "/unpin"): (self.unpin, "write"),
            ("POST", wire.API + "/evict"): (self.evict, "admin"),
            ("GET", wire.API + "/inspect"): (self.inspect, "admin"),
            ("GET", wire.API + "/stats"): (self.stats, "admin"),
        }

    def release_stale_pins(self) -> int:
        """Unpin what the store holds pinned (the disk tier keeps pins across restarts):
        pins here belong to leases, and no lease outlives the daemon that granted it."""
        stale = {info.key for info in self.store.scan() if info.pinned}
        for key in stale:
            self.store.unpin(key)
        return len(stale)

    def app(self) -> web.Application:
        # client_max_size bounds request.read(), i.e. metadata bodies; object bodies stream.
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=wire.MAX_METADATA_BYTES)
        for (method, path), (handler, _) in self._routes.items():
            app.router.add_route(method, path, handler)
        return app

    def _open_connections(self) -> int:
        return len(self.web_server.connections) if self.web_server is not None else 0

    async def _io(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(fn, *args, **kw))

    async def lend(self, keys: list[str]) -> list[Loan | None]:
        """``store.lend(keys)`` off the event loop. Should the request be cancelled (client
        gone, timeout) while the loans are being taken, they go back once taken: a loan
        nobody returns would keep its entry from ever being evicted."""
        top = self.store.tiers[0]
        assert isinstance(top, CpuTier)
        if all(top.contains(k) for k in keys):
            # All in memory: lending is a lock and a dict lookup per key, cheaper than a
            # trip through the thread pool (which promoting from disk needs).
            return self.store.lend(keys)
        fut = asyncio.get_running_loop().run_in_executor(self._executor, self.store.lend, keys)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def give_back(f: asyncio.Future[list[Loan | None]]) -> None:
                if not f.cancelled() and f.exception() is None:
                    for loan in f.result():
                        if loan is not None:
                            top.release(loan)

            fut.add_done_callback(give_back)
            raise

    # -- the one middleware ----------------------------------------------------------------
    def _authorised(self, request: web.Request, access: str) -> bool:
        if self.token is None or access == "open":
            return True
        if access == "read" and self.cfg.read_auth == "open":
            return True
        return token_matches(self.token, request.headers.get("Authorization"))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = self._routes.get((request.method, request.path))
        endpoint = request.path if route is not None else "other"
        peer = request.remote or "local"
        start = time.perf_counter()
        status, kind = 500, "internal"
        try:
            if route is not None and not self._authorised(request, route[1]):
                raise HttpError(401, "a valid bearer token is required for this request")
            if self._in_flight.get(peer, 0) >= self.cfg.max_client_requests:
                raise HttpError(429, f"more than {self.cfg.max_client_requests} requests in "
                                     "flight from this client")
            self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
            try:
                resp = await asyncio.wait_for(handler(request), self.cfg.request_timeout)
            finally:
                self._in_flight[peer] -= 1
                if not self._in_flight[peer]:
                    del self._in_flight[peer]
            status, kind = resp.status, ""
            return resp
        except HttpError as e:
            status, kind = e.status, {401: "unauthorized", 429: "busy", 413: "too_large",
                                      415: "content_type"}.get(e.status, "bad_request")
            return _error(status, kind, str(e))
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 of client_max_size
            status, kind = e.status, e.reason.lower().replace(" ", "_")
            return _error(status, kind, e.reason)
        except asyncio.TimeoutError:
            status, kind = 503, "timeout"
            return _error(status, kind, f"request took over {self.cfg.request_timeout:g}s")
        except (KVCacheError, ValueError) as e:
            status = next((s for cls, s in _STATUS if isinstance(e, cls)), 500)
            kind = type(e).__name__
            if status == 500:
                log.error("%s %s failed: %s", request.method, request.path, e)
            return _error(status, kind, str(e))
        except (ConnectionResetError, asyncio.CancelledError):
            status, kind = 499, "client_gone"
            raise
        except Exception as e:  # a bug must fail its request, not the daemon
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal", f"{type(e).__name__}: {e}")
        finally:
            m = self.metrics
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status)).inc()
            if kind:
                m.errors.labels(endpoint, kind).inc()

    # -- request helpers -------------------------------------------------------------------
    async def _meta(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != wire.MSGPACK:
            raise HttpError(415, f"send {wire.MSGPACK}, not {request.content_type}")
        return wire.unpack_map(await request.read())

    def _tenant(self, request: web.Request) -> str:
        tenant = request.headers.get(wire.TENANT_HEADER, "default")
        if not TENANT_RE.match(tenant):
            raise wire.ProtocolError(f"{wire.TENANT_HEADER} must be 1-64 letters, digits, '.', "
                                     "'_' or '-'")
        return tenant

    def _keys(self, body: dict[str, Any]) -> list[str]:
        keys = wire.key_list(body, limit=self.cfg.max_batch)
        for key in keys:
            check_key(key)
        return keys

    # -- endpoints -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        if self.stopping:
            return web.Response(status=503, text="stopping\n")
        return web.Response(text="ok\n")

    async def prometheus(self, request: web.Request) -> web.Response:
        body = await self._io(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})

    async def health(self, request: web.Request) -> web.Response:
        return _ok({"status": "stopping" if self.stopping else "ok",
                    "uptime_s": time.time() - self.started_at,
                    "tiers": [t.name for t in self.store.tiers]})

    async def lookup(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        keys = self._keys(body)
        mode = body.get("mode", "prefix")
        if mode == "prefix":
            tokens = body.get("tokens")
            if tokens is not None and (not isinstance(tokens, list) or not all(
                    type(t) is int and t >= 0 for t in tokens)):
                raise wire.ProtocolError("'tokens' must be a list of token counts")
            n = await self._io(self.store.longest_prefix, keys, num_tokens=tokens)
            return _ok({"prefix": n})
        if mode == "each":
            present = await self._io(lambda: [self.store.contains(k) for k in keys])
            return _ok({"present": present})
        raise wire.ProtocolError(f"mode must be 'prefix' or 'each', not {mode!r}")

    async def get(self, request: web.Request) -> web.StreamResponse:
        keys = self._keys(await self._meta(request))
        tenant = self._tenant(request)
        top = self.store.tiers[0]

        # CPU-tier entries are lent and sent from the pool itself (no copy); the loans hold
        # them until the answer is written.
        loans: list[Loan | None] = []
        try:
            if isinstance(top, CpuTier):
                loans = await self.lend(keys)
                objs = [None if lo is None else top.lent_object(lo) for lo in loans]
            else:
                objs = await self._io(self.store.get_objects, keys)
            found = await self._io(
                lambda: [None if o is None else encode_parts(o) for o in objs])
            sizes = [sum(memoryview(p).nbytes for p in parts) if parts else 0
                     for parts in found]
            self.tenants.read(tenant, sum(p is not None for p in found),
                              sum(p is None for p in found), sum(sizes))
            resp = web.StreamResponse(headers={"Content-Type": wire.OBJECTS})
            resp.content_length = sum(wire.FRAME_HEADER.size + n for n in sizes)
            await resp.prepare(request)
            for parts in found:
                if parts is None:
                    await resp.write(wire.FRAME_HEADER.pack(wire.MISS))
                    continue
                for part in wire.frame_parts(parts):
                    mv = memoryview(part).cast("B")
                    for at in range(0, mv.nbytes, _WRITE_PIECE):
                        await resp.write(mv[at : at + _WRITE_PIECE])
            await resp.write_eof()
            return resp
        finally:
            for loan in loans:
                if loan is not None:
                    top.release(loan)

    async def _read_objects(self, request: web.Request) -> list[StoredObject]:
        """Every frame of a put body, verified; ``HttpError``/``ProtocolError`` on the first
        problem (nothing is stored by then)."""
        if request.content_type != wire.OBJECTS:
            raise HttpError(415, f"send {wire.OBJECTS}, not {request.content_type}")
        limit = self.cfg.max_body
        if request.content_length is not None and request.content_length > limit:
            raise HttpError(413, f"body of {request.content_length} bytes is over the "
                                 f"{limit}-byte limit")
        objs: list[StoredObject] = []
        total = 0
        while True:
            try:
                head = await request.content.readexactly(wire.FRAME_HEADER.size)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise wire.ProtocolError("truncated frame header") from None
                return objs
            n = wire.frame_length(head)
            total += wire.FRAME_HEADER.size + n
            if n == wire.MISS or total > limit:
                raise HttpError(413, f"body is over the {limit}-byte limit")
            if len(objs) == self.cfg.max_batch:
                raise wire.ProtocolError(f"more than {self.cfg.max_batch} objects in one put")
            try:
                data = await request.content.readexactly(n)
            except asyncio.IncompleteReadError as e:
                raise wire.ProtocolError(
                    f"truncated object: {len(e.partial)} of {n} bytes") from None
            objs.append(await self._io(self._verified, data))

    def _verified(self, data: bytes) -> StoredObject:
        """A received container, checksum verified and checked as the store would take it."""
        obj = decode_object(data)
        self.store.check_object(obj)
        return obj

    async def put(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        objs = await self._read_objects(request)
        sizes = {o.header.key: o.nbytes for o in objs}
        try:
            victims = self.tenants.over_quota(tenant, sizes)
        except ValueError as e:
            raise HttpError(413, str(e)) from None

        durable = request.query.get("durable") in ("1", "true")

        def store() -> int:
            for key in victims:
                if self.store.delete(key, force=True):
                    self.leases.forget(key)
                self.tenants.removed(key, quota=True, tenant=tenant)
            for obj in objs:
                self.store.put_object(obj)
                self.tenants.wrote(tenant, obj.header.key, obj.nbytes)
            if durable:  # answer once the objects are on disk: a crash cannot lose them
                try:
                    self.store.flush_keys([obj.header.key for obj in objs])
                except KVCacheError as e:
                    raise HttpError(503, f"stored in memory, but writing to disk failed: {e}"
                                    ) from None
            return len(objs)

        return _ok({"stored": await self._io(store)})

    async def delete(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        keys, force = self._keys(body), bool(body.get("force", False))

        def remove() -> int:
            n = 0
            for key in keys:
                if self.store.delete(key, force=force):
                    n += 1
                self.leases.forget(key)
                self.tenants.removed(key)
            return n

        return _ok({"deleted": await self._io(remove)})

    async def pin(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        keys, ttl = self._keys(body), self.leases.ttl(body.get("ttl"))
        lease_id, pinned = await self._io(self.leases.grant, keys, ttl)
        return _ok({"lease": lease_id, "pinned": pinned, "ttl": ttl})

    def _lease_id(self, body: dict[str, Any]) -> str:
        lease_id = body.get("lease")
        if not isinstance(lease_id, str):
            raise wire.ProtocolError("'lease' must be a lease id string")
        return lease_id

    async def renew(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        ttl = self.leases.ttl(body.get("ttl"))
        return _ok({"renewed": self.leases.renew(self._lease_id(body), ttl), "ttl": ttl})

    async def unpin(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        return _ok({"released": await self._io(self.leases.release, self._lease_id(body))})

    async def evict(self, request: web.Request) -> web.Response:
        body = await self._meta(request)
        raw = body.get("selection")
        if not isinstance(raw, dict):
            raise wire.ProtocolError("'selection' must be a map of filters")
        try:
            selection = Selection(**raw)
        except TypeError as e:
            raise wire.ProtocolError(f"bad selection: {e}") from None
        dry_run, force = bool(body.get("dry_run")), bool(body.get("force"))

        def run() -> dict[str, Any]:
            tiers = {}
            for tier in self.store.tiers:
                if getattr(tier, "readonly", False):
                    continue
                report = evict_from(tier, selection, dry_run=dry_run, force=force)
                report.pop("matched")
                tiers[tier.name] = report
                if not dry_run:
                    for entry in report["removed"]:
                        self.leases.forget(entry["key"])
                        self.tenants.removed(entry["key"])
            return {"selection": selection.describe(), "dry_run": dry_run, "tiers": tiers}

        return _ok(await self._io(run))

    async def inspect(self, request: web.Request) -> web.Response:
        key, model = request.query.get("key"), request.query.get("model")

        def look() -> dict[str, Any]:
            if key is not None:
                check_key(key)
                for tier in self.store.tiers:
                    info, header = tier.info(key), tier.header(key)
                    if info is not None and header is not None:
                        return {"entry": {"info": info.to_dict(), "header": header.to_json()}}
                return {"entry": None}
            entries = [i for i in self.store.scan() if model is None or i.model_id == model]
            entries.sort(key=lambda i: i.last_access, reverse=True)
            return {"entries": [i.to_dict() for i in entries]}

        return _ok(await self._io(look))

    def summary(self) -> dict[str, Any]:
        tiers = {name: s.to_dict() | {"hit_rate": s.hit_rate}
                 for name, s in self.store.stats().items()}
        # The lowest tier holds every entry (the ones above hold copies of its hottest).
        lowest = tiers[self.store.tiers[-1].name]
        return {
            "store": vars(self.store.counters) | {"write_mode": self.store.write_mode},
            "tiers": tiers,
            "totals": {k: lowest[k] for k in ("used_bytes", "capacity_bytes", "entries")},
            "tenants": self.tenants.snapshot(),
            "leases": {"active": self.leases.active, "pinned_keys": self.leases.pinned_keys,
                       "granted": self.leases.granted, "expired": self.leases.expired},
            "server": {"uptime_s": time.time() - self.started_at,
                       "open_connections": self._open_connections()},
        }

    async def stats(self, request: web.Request) -> web.Response:
        return _ok(await self._io(self.summary))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
