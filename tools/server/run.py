"""``kvcache serve``: run the daemon in the foreground until SIGTERM or SIGINT.

Foreground by design (systemd, containers and supervisors manage the process; an example
unit is in ``docs/operations.md``): logs go to stderr, as text or one JSON object per
line (``--log-format json``), and with ``Type=notify`` systemd is told when the daemon is
ready and when it stops. Shutdown is graceful: stop accepting, let requests in flight
finish (up to ``SHUTDOWN_GRACE_S``), release leases, flush write-back, close the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from kvcache.kvstore import wire
from kvcache.kvstore.background import serial_torch_ops
from kvcache.kvstore.config import KVCacheConfig, ServerConfig
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.tokens import resolve_token
from kvcache.tools.server.app import CacheServer
from kvcache.tools.server.fast_path import FastPath

log = logging.getLogger("kvcache.server")
SHUTDOWN_GRACE_S = 10.0
_LEASE_SWEEP_S = 1.0
_TTL_SWEEP_S = 60.0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class RateLimitFilter(logging.Filter):
    """At most one record per ``interval_s``, without its traceback, saying how many were
    dropped since: aiohttp logs every malformed request from any peer with a traceback,
    and a peer must not be able to flood the daemon's log."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last = 0.0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._dropped += 1
            return False
        self._last = now
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
            record.args = ()
        record.exc_info = None
        if self._dropped:
            record.msg = f"{record.getMessage()} ({self._dropped} more like it not logged)"
            record.args = ()
            self._dropped = 0
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.server").addFilter(RateLimitFilter())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) about a state change; nothing without it."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


def server_config(cfg: KVCacheConfig, *, host: str | None = None, port: int | None = None,
                  socket_path: str | None = None) -> ServerConfig:
    """The server section with command-line overrides applied and validated."""
    changes: dict[str, object] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if socket_path is not None:
        changes["socket"] = Path(socket_path)
    return dataclasses.replace(cfg.server, **changes) if changes else cfg.server


def serve(cfg: KVCacheConfig, server_cfg: ServerConfig,
          on_ready: Callable[[list[str]], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT. ``on_ready`` gets the URLs listened on."""
    token = resolve_token(server_cfg.token, server_cfg.token_file, what="server")
    if not is_loopback(server_cfg.host) and token is None:
        raise ConfigError(
            f"server.host {server_cfg.host!r} is not a loopback address: anyone who can reach "
            "it could write to and evict from the cache. Set server.token (or token_file, "
            "or KVCACHE_SERVER_TOKEN), or listen on 127.0.0.1")
    from kvcache.kvstore.tiered_store import TieredStore

    # With a Unix socket, same-node clients read the CPU tier from shared memory.
    store = TieredStore.open(cfg.store, shared_cpu=server_cfg.socket is not None)
    server = CacheServer(store, server_cfg, token=token)
    stale = server.release_stale_pins()
    if stale:
        log.info("released %d pin(s) a previous run left behind (pins are leases of "
                 "running clients)", stale)
    serial_torch_ops()  # the event loop's thread too (CacheServer says why)
    try:
        asyncio.run(_run(server, server_cfg, on_ready))
    finally:
        server.leases.release_all()
        server.close()
        store.close()  # flushes write-back and closes the index
        log.info("stopped")


async def _housekeeping(server: CacheServer, fast: FastPath | None) -> None:
    loop = asyncio.get_running_loop()
    last_ttl = time.monotonic()
    while True:
        await asyncio.sleep(_LEASE_SWEEP_S)
        if fast is not None and fast.expire():
            log.warning("fast-path loans expired unreturned; their readers get misses")
        n = server.leases.expire()
        if n:
            log.info("%d lease(s) expired unrenewed; their pins are released", n)
        if time.monotonic() - last_ttl >= _TTL_SWEEP_S:
            last_ttl = time.monotonic()
            await loop.run_in_executor(None, server.store.evict_expired)


async def _run(server: CacheServer, cfg: ServerConfig,
               on_ready: Callable[[list[str]], None] | None) -> None:
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    server.web_server = runner.server
    tcp = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await tcp.start()
    urls = []
    for sock in tcp._server.sockets if tcp._server is not None else []:  # type: ignore[attr-defined]
        host, port = sock.getsockname()[:2]
        urls.append(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    fast: FastPath | None = None
    if cfg.socket is not None:
        with contextlib.suppress(FileNotFoundError):
            cfg.socket.unlink()  # a stale socket of a daemon that died
        await web.UnixSite(runner, str(cfg.socket)).start()
        os.chmod(cfg.socket, 0o660)
        urls.append(f"unix://{cfg.socket}")
        cpu = server.store.tiers[0]
        assert isinstance(cpu, CpuTier)
        fast = FastPath(server, cpu, Path(str(cfg.socket) + wire.FAST_PATH_SUFFIX))
        await fast.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    chores = asyncio.create_task(_housekeeping(server, fast))
    log.info("listening on %s (tiers: %s)", ", ".join(urls),
             ", ".join(t.name for t in server.store.tiers))
    if on_ready is not None:
        on_ready(urls)
    _sd_notify("READY=1")
    try:
        await stop.wait()
    finally:
        log.info("stopping: finishing requests in flight")
        _sd_notify("STOPPING=1")
        server.stopping = True
        chores.cancel()
        if fast is not None:
            await fast.stop()
        await runner.cleanup()
        if cfg.socket is not None:
            with contextlib.suppress(FileNotFoundError):
                cfg.socket.unlink()


def main(args: object) -> int:
    """``kvcache serve`` (arguments parsed by ``kvcache.tools.cli``)."""
    cfg = KVCacheConfig.load(getattr(args, "config", None))
    if getattr(args, "store", None) is not None:
        cfg = dataclasses.replace(cfg, store=cfg.store.with_dir(args.store))  # type: ignore[attr-defined]
    server_cfg = server_config(cfg, host=getattr(args, "host", None),
                               port=getattr(args, "port", None),
                               socket_path=getattr(args, "socket", None))
    setup_logging(cfg.log_level, getattr(args, "log_format", "text"))

    def ready(urls: list[str]) -> None:
        # One line on stdout for scripts and tests (logs go to stderr).
        print(f"kvcache serve: listening on {' '.join(urls)}", flush=True)

    serve(cfg, server_cfg, on_ready=ready)
    return 0
