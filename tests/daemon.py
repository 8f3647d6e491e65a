"""Cache daemons for the tests: in-process (a thread with its own event loop) or as a
``kvcache serve`` subprocess, on a free loopback port; the objects the process-level tests
store, and readers of a daemon's ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from kvcache.kvstore.config import KVCacheConfig, ServerConfig, StoreConfig
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from kvcache.tools.server.app import CacheServer
from tests.helpers import make_chunk, make_key

TOKEN = "test-token-0123456789abcdef"


class ThreadDaemon:
    """``CacheServer`` over ``store`` on 127.0.0.1:<free port>, served from a thread."""

    def __init__(self, store: TieredStore, cfg: ServerConfig, token: str | None = None) -> None:
        self.store = store
        self.server = CacheServer(store, cfg, token=token)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = ""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test daemon did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.server.app(), handle_signals=False, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self.server.web_server = self._runner.server
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.server.close()


def store_config(path: Path, **cpu: object) -> StoreConfig:
    cfg = StoreConfig(dir=path)
    if cpu:
        cfg = dataclasses.replace(cfg, cpu=dataclasses.replace(cfg.cpu, **cpu))
    return cfg


class ProcessDaemon:
    """``kvcache serve`` as a child process (``kill`` sends a signal; ``wait`` reaps it)."""

    def __init__(self, store_dir: Path, *args: str, port: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.store_dir = store_dir
        self.args = args
        cmd = [sys.executable, "-m", "kvcache.tools.cli", "serve", "--store", str(store_dir),
               "--port", str(port), *args]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
        full_env.update(env or {})
        # stderr to a file: a pipe nobody reads would block a chatty daemon when full
        self.log_path = store_dir.parent / f"daemon-{os.getpid()}-{id(self)}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stderr()/stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     env=full_env, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        m = re.search(r"listening on (http://\S+)", line)
        if m is None:
            self.proc.kill()
            self.proc.wait()
            err = self.stderr()
            raise RuntimeError(f"kvcache serve did not start: {line!r} {err[-2000:]}")
        self.url = m.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.local_url = f"http://127.0.0.1:{self.port}"  # whatever address it bound

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        """What the daemon logged so far."""
        self._log.flush()
        return self.log_path.read_text()

    def close(self) -> None:
        """Kill it if it still runs, and reap it."""
        if self.alive():
            self.kill()
        self.wait()
        self._log.close()

    def stop(self) -> int:
        self.kill(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.kill()
            return self.wait()


@contextlib.contextmanager
def thread_daemon(tmp_path: Path, *, token: str | None = None, **server: object
                  ) -> Iterator[ThreadDaemon]:
    store = TieredStore.open(store_config(tmp_path / "store", capacity="64MiB"))
    d = ThreadDaemon(store, dataclasses.replace(KVCacheConfig().server, **server), token=token)
    try:
        yield d
    finally:
        d.stop()
        store.close()


# -- for the process-level tests ---------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
LAYOUT = KVLayout("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
TOKENS = 16  # 2 KiB objects: these tests are about faults, not bandwidth
# Small tiers: a daemon starts in about a second and the tests stay within a small disk.
SMALL_STORE = {"KVCACHE_CPU_CAPACITY": "64MiB", "KVCACHE_DISK_CAPACITY": "256MiB"}


@contextlib.contextmanager
def daemon(store_dir: Path, *args: str, port: int = 0,
           env: dict[str, str] | None = None) -> Iterator[ProcessDaemon]:
    """A ``kvcache serve`` process on small tiers, always reaped."""
    d = ProcessDaemon(store_dir, *args, port=port, env=SMALL_STORE | (env or {}))
    try:
        yield d
    finally:
        d.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ``KVCACHE_*`` variables (they would configure the child)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env | extra


def make_obj(i: int, seed: int) -> StoredObject:
    """The object of entry ``i`` (key ``make_key(i)``) holding the chunk of ``seed``."""
    return StoredObject(ObjectHeader(make_key(i), LAYOUT, TOKENS),
                        {"kv": make_chunk(LAYOUT, TOKENS, seed)})


def holds(obj: StoredObject | None, i: int, seeds: list[int] | tuple[int, ...]) -> bool:
    """Whether ``obj`` is entry ``i``'s object and holds the chunk of one of ``seeds``."""
    return (obj is not None and obj.header.key == make_key(i)
            and any(torch.equal(obj.tensors["kv"], make_chunk(LAYOUT, TOKENS, s))
                    for s in seeds))


def metrics(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The daemon's ``/metrics`` as sample name -> [(labels, value)]."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def metric(url: str, name: str) -> float:
    return sum(v for _, v in metrics(url).get(name, []))


def lookups(url: str) -> float:
    """Lookups the daemon answered over HTTP."""
    return sum(v for labels, v in metrics(url).get("kvcache_requests_total", [])
               if labels["endpoint"] == "/v1/lookup")


def server_errors(url: str) -> dict[str, float]:
    """5xx answers the daemon counted, by endpoint."""
    out: dict[str, float] = {}
    for labels, v in metrics(url).get("kvcache_requests_total", []):
        if labels["status"].startswith("5") and v:
            out[labels["endpoint"]] = out.get(labels["endpoint"], 0) + v
    return out
