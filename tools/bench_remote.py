"""``kvcache bench remote``: the cache daemon's GET/PUT beside redis-server, same run.

Measured on this machine in one run (machines are shared and noisy), for Llama-3-8B-shaped
bf16 objects of 1, 4 and 32 MiB (8, 32, 256 tokens), ``batch`` objects per request:

- **the daemon** (``kvcache serve``, a child process with a CPU tier only: redis-server
  keeps no disk copy either) over HTTP on loopback TCP and on its Unix socket;
- **the local fast path**: GETs of a ``CacheClient`` on the Unix socket that map the
  daemon's CPU pool (shared memory) and copy objects out of it (PUTs take HTTP there). A
  daemon that offers none leaves these figures reported as not available;
- **redis-server** on a free loopback port without persistence, redis-py with hiredis,
  values the same container bytes, a request one pipeline of GETs/SETs;
- **the in-process CPU tier** (``CpuTier.put``/``get`` of the same objects): the ceiling.

Objects read over HTTP and from Redis are verified (checksum, key) as a tier does; every
object written is built as a container first. Concurrent clients are spawned processes
(each with its own connection), so no figure is a GIL artefact; the CPU tier's clients are
threads of this process. GB/s = payload bytes of all requests / wall time from the common
start to the last client's end; latency is per request.

A bounded load run follows: ``load_clients`` clients (half TCP, half Unix socket with the
fast path) send mixed gets, puts and lookups for ``duration`` seconds; it reports
requests, errors, corrupt objects, misses of keys the daemon must hold, and the daemon's
resident memory at the start, middle and end (it must stay flat).

Goals: HTTP GET >= 1.2x redis-server GB/s for 4-32 MiB objects (TCP both); local fast
path GET >= 0.8x the in-process CPU tier.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import torch
from redis.utils import HIREDIS_AVAILABLE

from kvcache.kvstore.cache_client import CacheClient
from kvcache.kvstore.container import ObjectHeader, StoredObject, decode_object, encode_object
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.keys import content_key
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tier import check_object_key
from kvcache.tools.bench_store import _code_version, _machine
from kvcache.tools.serve_process import serve_process, stop_process

GB = 1e9
MiB = 1 << 20
GiB = 1 << 30
LLAMA_3_8B = KVLayout("llama-3-8b", 32, 8, 128, dtype="bfloat16")  # 128 KiB per token
GOAL_HTTP_VS_REDIS = 1.2  # HTTP GET, objects of GOAL_MIN_MIB and more
GOAL_MIN_MIB = 4
GOAL_FAST_PATH = 0.8  # local fast path GET vs the in-process CPU tier
FAST_PATH = "local fast path (shared memory)"
BACKENDS = ("http-tcp", "http-unix", "fast-path", "redis", "cpu-tier")
LABELS = {"http-tcp": "daemon HTTP/TCP", "http-unix": "daemon HTTP/unix", "fast-path": FAST_PATH,
          "redis": "redis-server", "cpu-tier": "in-process CPU tier"}
_FINGERPRINT = "be" * 16
_GET_SET, _PUT_SET, _LOAD_OWN, _LOAD_SHARED = 1, 2, 3, 4  # key families
_ANSWER_S = 600.0  # the longest a request or a client process may take


@dataclass(frozen=True)
class RemoteBenchConfig:
    """What to run. Each client repeats requests for ``window_s`` (at least
    ``min_requests``); GETs cycle through ``get_keys`` objects per size."""

    sizes_mib: tuple[int, ...] = (1, 4, 32)
    clients: tuple[int, ...] = (1, 4, 16)
    batch: int = 4
    window_s: float = 1.0
    min_requests: int = 2
    rounds: int = 2
    get_keys: int = 8
    load_clients: int = 16
    load_duration_s: float = 60.0
    load_sizes_mib: tuple[int, ...] = (1, 4)
    load_own_keys: int = 8
    daemon_capacity: int = 4 * GiB

    @classmethod
    def quick(cls, duration: float | None = None) -> RemoteBenchConfig:
        return cls(sizes_mib=(1, 4), clients=(1, 4), window_s=0.3, rounds=1,
                   load_duration_s=5.0 if duration is None else duration)

    def tokens(self, mib: int) -> int:
        return mib * MiB // LLAMA_3_8B.bytes_per_token


# -- objects, clients, requests ------------------------------------------------------------
def _key(*parts: int) -> str:
    return content_key(_FINGERPRINT, list(parts))


_payloads: dict[int, torch.Tensor] = {}
_clients: dict[tuple[str, bool], Any] = {}


def _object(key: str, tokens: int) -> StoredObject:
    """An object of ``tokens`` tokens; all of one size in a process share random KV."""
    if tokens not in _payloads:
        raw = torch.randint(0, 256, (LLAMA_3_8B.bytes_per_token * tokens,), dtype=torch.uint8)
        _payloads[tokens] = raw.view(torch.bfloat16).view(LLAMA_3_8B.chunk_shape(tokens))
    return StoredObject(ObjectHeader(key, LLAMA_3_8B, tokens), {"kv": _payloads[tokens]})


def _client(url: str, fast: bool = False) -> Any:
    """This process's client of ``url``: redis-py for redis://, else a ``CacheClient``
    (reading through the daemon's fast path on a unix:// URL if ``fast``)."""
    if (url, fast) not in _clients:
        if url.startswith("redis://"):
            host, port = url.removeprefix("redis://").split(":")
            c: Any = redis.Redis(host=host, port=int(port), socket_timeout=_ANSWER_S)
        else:
            c = CacheClient(url, timeout_s=_ANSWER_S, retries=0, fast_path=fast)
        _clients[(url, fast)] = c
    return _clients[(url, fast)]


def _request(url: str, mode: str, tokens: int, fast: bool = False
             ) -> Callable[[Sequence[str]], int]:
    """One request (``mode`` "get" or "put" of the keys given) at ``url``: returns the
    payload bytes moved; raises ``KVCacheError`` if an object did not come back."""
    c = _client(url, fast)
    is_redis = url.startswith("redis://")

    def get(keys: Sequence[str]) -> int:
        if is_redis:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.get(k)
            objs = [None if v is None else decode_object(v) for v in pipe.execute()]
            for k, o in zip(keys, objs, strict=True):
                if o is not None:
                    check_object_key(k, o.header)
        else:
            objs = c.get_objects(keys)
        got = [o.nbytes for o in objs if o is not None]
        if len(got) < len(keys):
            raise KVCacheError(f"{len(keys) - len(got)} of {len(keys)} objects missing")
        return sum(got)

    def put(keys: Sequence[str]) -> int:
        objs = [_object(k, tokens) for k in keys]
        if is_redis:
            pipe = c.pipeline(transaction=False)
            for o in objs:
                pipe.set(o.header.key, encode_object(o))
            pipe.execute()
        else:
            c.put_objects(objs)
        return sum(o.nbytes for o in objs)

    return get if mode == "get" else put


def _picker(msg: dict[str, Any]) -> Callable[[int], Sequence[str]]:
    """Request i's keys: GETs cycle through the shared keys, each client from its own
    offset; PUTs rewrite the client's own ``batch`` keys."""
    keys, batch, off = msg["keys"], msg["batch"], msg["index"] * msg["batch"]
    if msg["mode"] == "put":
        return lambda i: keys
    return lambda i: [keys[(off + i * batch + j) % len(keys)] for j in range(batch)]


def _warm_up(fn: Callable[[Sequence[str]], int], msg: dict[str, Any]) -> None:
    """Connect and touch every object once, outside the figure (a fresh mapping of the
    fast path faults its pages in on first touch)."""
    pick = _picker(msg)
    for i in range(1 if msg["mode"] == "put" else -(-len(msg["keys"]) // msg["batch"])):
        fn(pick(i))


def _timed_loop(fn: Callable[[Sequence[str]], int], pick: Callable[[int], Sequence[str]],
                start: float, stop: float, min_requests: int) -> dict[str, Any]:
    """Requests from ``start`` until ``stop`` (and at least ``min_requests``)."""
    time.sleep(max(0.0, start - time.time()))
    lat: list[float] = []
    moved = errors = i = 0
    first_error = None
    while i < min_requests or time.time() < stop:
        t0 = time.perf_counter()
        try:
            moved += fn(pick(i))
            lat.append(time.perf_counter() - t0)
        except Exception as e:  # counted and reported: one failure must not end the run
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
        i += 1
    return {"latencies": lat, "bytes": moved, "errors": errors, "end": time.time(),
            "first_error": first_error, "start": start}


# -- client processes ----------------------------------------------------------------------
def _cell_in_worker(conn: Any, msg: dict[str, Any], warmed: set[tuple[Any, ...]]) -> None:
    fn = _request(msg["url"], msg["mode"], msg["tokens"], msg["fast"])
    if (warm := (msg["url"], msg["fast"], msg["mode"], msg["tokens"])) not in warmed:
        _warm_up(fn, msg)
        warmed.add(warm)
    conn.send({"ready": True})
    go = conn.recv()
    out = _timed_loop(fn, _picker(msg), go["start"], go["stop"], msg["min_requests"])
    # A fast-path client that fell back to HTTP must not report HTTP's figure as its own.
    out["fast"] = bool(msg["fast"] and _client(msg["url"], True).uses_fast_path)
    conn.send(out)


def _load_in_worker(conn: Any, msg: dict[str, Any]) -> None:
    """Mixed gets, puts and lookups against the daemon. The client verifies every object
    it reads (``corrupt``); a key the daemon must hold that is missing counts as a miss."""
    client = CacheClient(msg["url"], timeout_s=60.0, retries=0, fast_path=True)
    rng = random.Random(msg["index"])
    sizes, shared = msg["tokens"], msg["shared"]
    own = {_key(_LOAD_OWN, msg["index"], j): sizes[j % len(sizes)]
           for j in range(msg["own_keys"])}
    written: list[str] = []
    counts = {"get": 0, "put": 0, "lookup": 0}
    errors = misses = moved = 0
    first_error = None
    client.exists(shared)  # connect before the start
    conn.send({"ready": True})
    go = conn.recv()
    time.sleep(max(0.0, go["start"] - time.time()))
    while time.time() < go["stop"]:
        r = rng.random()
        try:
            if r < 0.55:
                got = client.get_objects(rng.sample(shared + written, rng.randint(1, 4)))
                misses += sum(o is None for o in got)
                moved += sum(o.nbytes for o in got if o is not None)
            elif r < 0.85:
                objs = [_object(k, own[k]) for k in rng.sample(sorted(own), rng.randint(1, 2))]
                client.put_objects(objs)
                moved += sum(o.nbytes for o in objs)
                written += [o.header.key for o in objs if o.header.key not in written]
            else:
                keys = rng.sample(shared + sorted(own), 8)
                held = set(shared + written)
                misses += sum(k in held and not p for k, p in zip(keys, client.exists(keys),
                                                                  strict=True))
            counts["get" if r < 0.55 else "put" if r < 0.85 else "lookup"] += 1
        except Exception as e:  # counted and reported
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
    conn.send({"requests": counts, "errors": errors, "misses": misses,
               "corrupt": client.corrupt, "bytes": moved, "first_error": first_error})
    client.close()


def _worker(conn: Any) -> None:
    """A client process: answers the benchmark's commands until told to stop."""
    torch.set_num_threads(1)
    warmed: set[tuple[Any, ...]] = set()
    conn.send({"ready": True})
    while (msg := conn.recv()) is not None:
        try:
            if msg["cmd"] == "cell":
                _cell_in_worker(conn, msg, warmed)
            else:
                _load_in_worker(conn, msg)
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})


class _Workers:
    """Client processes, spawned once: spawning one (and importing torch) per figure
    would cost more than the figure."""

    def __init__(self, n: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child,), daemon=True,
                            name=f"kvcache-bench-client-{i}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self.gather(self.conns)  # all started and idle before anything is timed

    def gather(self, conns: Sequence[Any]) -> list[dict[str, Any]]:
        out = []
        for c in conns:
            if not c.poll(_ANSWER_S):
                raise KVCacheError("a benchmark client process did not answer")
            reply = c.recv()
            if "error" in reply:
                raise KVCacheError(f"a benchmark client failed: {reply['error']}")
            out.append(reply)
        return out

    def start(self, msgs: Sequence[dict[str, Any]], seconds: float) -> list[Any]:
        """Send each worker its message; once all are ready, start them together."""
        conns = self.conns[: len(msgs)]
        for c, m in zip(conns, msgs, strict=True):
            c.send(m)
        self.gather(conns)
        start = time.time() + 0.05
        for c in conns:
            c.send({"start": start, "stop": start + seconds})
        return conns

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


# -- servers -------------------------------------------------------------------------------
@contextlib.contextmanager
def _redis_server(workdir: Path) -> Iterator[tuple[str, str]]:
    """redis-server on a free loopback port, no persistence: (URL, its version)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise KVCacheError("redis-server, this benchmark's baseline, is not installed "
                           "(e.g. apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(workdir / "redis.log", "w") as log:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 10
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=port) as r:
                    version = str(r.info("server")["redis_version"])
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise KVCacheError("redis-server did not start: "
                                       f"{(workdir / 'redis.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}", version
    finally:
        stop_process(proc)


def _rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- measuring -----------------------------------------------------------------------------
def _summary(runs: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """One figure from its rounds (each a list of client replies): GB/s = bytes of all
    rounds / their summed wall times; latency percentiles over every request."""
    moved = sum(r["bytes"] for run in runs for r in run)
    wall = sum(max(r["end"] for r in run) - run[0]["start"] for run in runs)
    lat = sorted(x for run in runs for r in run for x in r["latencies"])
    errors = [r["first_error"] for run in runs for r in run if r["first_error"]]

    def pct(q: float) -> float | None:
        return round(lat[max(0, math.ceil(q * len(lat)) - 1)] * 1e3, 3) if lat else None

    return {"gbps": round(moved / max(wall, 1e-9) / GB, 4), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "requests": len(lat), "bytes": moved,
            "seconds": round(wall, 3), "errors": sum(r["errors"] for run in runs for r in run),
            "first_error": errors[0] if errors else None}


def _cpu_tier_run(tier: CpuTier, msgs: Sequence[dict[str, Any]], window_s: float
                  ) -> list[dict[str, Any]]:
    """The same requests against the in-process tier, one thread per client."""

    def get(keys: Sequence[str]) -> int:
        objs = [tier.get(k) for k in keys]
        if any(o is None for o in objs):
            raise KVCacheError("an object is missing from the CPU tier")
        return sum(o.nbytes for o in objs if o is not None)

    def put(keys: Sequence[str]) -> int:
        objs = [_object(k, msgs[0]["tokens"]) for k in keys]
        for o in objs:
            tier.put(o.header.key, o)
        return sum(o.nbytes for o in objs)

    fn = get if msgs[0]["mode"] == "get" else put
    for m in msgs:
        _warm_up(fn, m)
    start = time.time() + 0.01
    out: list[dict[str, Any]] = [{} for _ in msgs]

    def client(i: int) -> None:
        out[i] = _timed_loop(fn, _picker(msgs[i]), start, start + window_s,
                             msgs[i]["min_requests"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(msgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _everywhere(urls: dict[str, str], tier: CpuTier, keys: Sequence[str], tokens: int,
                *, delete: bool = False) -> None:
    """Store ``keys`` (or delete them) in the daemon, redis-server and the CPU tier."""
    with CacheClient(urls["http-tcp"], timeout_s=_ANSWER_S) as c:
        if delete:
            c.delete(keys, force=True)
            _client(urls["redis"]).delete(*keys)
            for k in keys:
                tier.delete(k, force=True)
            return
        c.put_objects([_object(k, tokens) for k in keys])
    _request(urls["redis"], "put", tokens)(keys)
    for k in keys:
        tier.put(k, _object(k, tokens))


def _measure(cfg: RemoteBenchConfig, workers: _Workers, urls: dict[str, str],
             tier: CpuTier) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """Every (backend, mode, MiB, clients) figure. Backends take turns, the first one
    rotating by round, so that a shared machine's drift hits them all alike."""
    cells: dict[tuple[str, str, int, int], list[list[dict[str, Any]]]] = {}
    for mib in cfg.sizes_mib:
        tokens = cfg.tokens(mib)
        get_keys = [_key(_GET_SET, tokens, j) for j in range(cfg.get_keys)]
        put_keys = [[_key(_PUT_SET, tokens, i, j) for j in range(cfg.batch)]
                    for i in range(max(cfg.clients))]
        _everywhere(urls, tier, get_keys, tokens)
        for n, mode, rnd in itertools.product(cfg.clients, ("get", "put"), range(cfg.rounds)):
            # The fast path only reads: writes take HTTP/unix, measured there.
            backends = [b for b in BACKENDS if b != "fast-path" or mode == "get"]
            for b in backends[rnd % len(backends):] + backends[: rnd % len(backends)]:
                msgs = [{"cmd": "cell", "url": urls.get(b), "fast": b == "fast-path",
                         "mode": mode, "tokens": tokens, "batch": cfg.batch, "index": i,
                         "keys": get_keys if mode == "get" else put_keys[i],
                         "min_requests": cfg.min_requests} for i in range(n)]
                run = (_cpu_tier_run(tier, msgs, cfg.window_s) if b == "cpu-tier" else
                       workers.gather(workers.start(msgs, cfg.window_s)))
                cells.setdefault((b, mode, mib, n), []).append(run)
        # One size's objects must not crowd the next's out.
        _everywhere(urls, tier, get_keys + [k for ks in put_keys for k in ks], tokens,
                    delete=True)
    out = {k: _summary(v) for k, v in cells.items()}
    for k, v in cells.items():
        if k[0] == "fast-path" and not all(r["fast"] for run in v for r in run):
            out[k]["fell_back_to_http"] = True  # no fast path: that was HTTP's figure
    return out


def _load(cfg: RemoteBenchConfig, workers: _Workers, urls: dict[str, str],
          daemon_pid: int) -> dict[str, Any]:
    sizes = [cfg.tokens(m) for m in cfg.load_sizes_mib]
    shared = [_key(_LOAD_SHARED, t, j) for t in sizes for j in range(cfg.get_keys)]
    with CacheClient(urls["http-tcp"], timeout_s=_ANSWER_S) as c:
        c.put_objects([_object(k, sizes[i // cfg.get_keys]) for i, k in enumerate(shared)])
    n = cfg.load_clients
    rss = [(0.0, _rss_mib(daemon_pid))]
    conns = workers.start([{"cmd": "load", "url": urls["http-unix" if i % 2 else "http-tcp"],
                            "index": i, "tokens": sizes, "shared": shared,
                            "own_keys": cfg.load_own_keys} for i in range(n)],
                          cfg.load_duration_s)
    start, pending = time.time(), list(conns)
    while pending:
        for c in multiprocessing.connection.wait(pending, timeout=0.5):
            pending.remove(c)
        rss.append((time.time() - start, _rss_mib(daemon_pid)))
    replies = workers.gather(conns)
    wall = time.time() - start
    rss.append((wall, _rss_mib(daemon_pid)))
    counts = {op: sum(r["requests"][op] for r in replies) for op in ("get", "put", "lookup")}
    errors = [r["first_error"] for r in replies if r["first_error"]]
    return {
        "clients": n, "duration_s": cfg.load_duration_s, "seconds": round(wall, 2),
        "transports": {"http-tcp": (n + 1) // 2, "unix (fast-path reads)": n // 2},
        "object_mib": list(cfg.load_sizes_mib), "requests": sum(counts.values()),
        "by_op": counts, "requests_per_s": round(sum(counts.values()) / wall, 1),
        "gbps": round(sum(r["bytes"] for r in replies) / wall / GB, 4),
        "errors": sum(r["errors"] for r in replies), "first_error": errors[0] if errors else None,
        "corrupt": sum(r["corrupt"] for r in replies),
        "misses": sum(r["misses"] for r in replies),
        "daemon_rss_mib": {
            "start": rss[0][1], "end": rss[-1][1], "max": max(m for _, m in rss),
            "middle": min(rss, key=lambda s: abs(s[0] - cfg.load_duration_s / 2))[1]},
    }


# -- the result ----------------------------------------------------------------------------
def _row(key: str, figure: str, baseline: str, mode: str, mib: int, n: int, batch: int,
         subject: dict[str, Any] | None, base: dict[str, Any], goal: float | None
         ) -> dict[str, Any]:
    """A figure beside its baseline; ``subject`` None: not available (value, ratio None)."""
    if subject is not None and subject.get("fell_back_to_http"):
        subject = None
    value = None if subject is None else subject["gbps"]
    ratio = None if value is None else round(value / max(base["gbps"], 1e-12), 4)
    return {
        "key": key, "figure": figure, "shape": f"{mib} MiB x{batch}/request",
        "variant": f"{n} client{'s' if n > 1 else ''}", "mode": mode, "object_mib": mib,
        "clients": n, "unit": "GB/s", "value": value, "baseline": baseline,
        "baseline_value": base["gbps"], "ratio": ratio, "goal": goal,
        "meets_goal": None if goal is None or ratio is None else ratio >= goal,
        "available": subject is not None,
        "p50_ms": None if subject is None else subject["p50_ms"],
        "p99_ms": None if subject is None else subject["p99_ms"],
        "baseline_p50_ms": base["p50_ms"], "baseline_p99_ms": base["p99_ms"],
    }


def _rows(cfg: RemoteBenchConfig, cells: dict[tuple[str, str, int, int], dict[str, Any]]
          ) -> list[dict[str, Any]]:
    rows = []
    for mode, mib, n in itertools.product(("get", "put"), cfg.sizes_mib, cfg.clients):
        c = {b: cells.get((b, mode, mib, n)) for b in BACKENDS}
        redis_, cpu = cells[("redis", mode, mib, n)], cells[("cpu-tier", mode, mib, n)]
        up, args = mode.upper(), (mode, mib, n, cfg.batch)
        goal = GOAL_HTTP_VS_REDIS if mode == "get" and mib >= GOAL_MIN_MIB else None
        rows += [
            _row(f"http_tcp_{mode}_vs_redis", f"daemon {up} HTTP/TCP", "redis-server", *args,
                 c["http-tcp"], redis_, goal),
            _row(f"http_unix_{mode}_vs_redis", f"daemon {up} HTTP/unix", "redis-server",
                 *args, c["http-unix"], redis_, None),
            _row(f"http_tcp_{mode}_vs_cpu_tier", f"daemon {up} HTTP/TCP", LABELS["cpu-tier"],
                 *args, c["http-tcp"], cpu, None),
        ]
        if mode == "get":
            rows.append(_row("fast_path_get_vs_cpu_tier", f"{FAST_PATH} GET",
                             LABELS["cpu-tier"], *args, c["fast-path"], cpu, GOAL_FAST_PATH))
    return rows


def run(quick: bool = False, duration: float | None = None,
        config: RemoteBenchConfig | None = None) -> dict[str, Any]:
    """Measure everything; return the result dict (see ``kvcache.tools.bench``).
    ``duration``: seconds of the load run (default 60; 5 with ``quick``)."""
    cfg = config or (RemoteBenchConfig.quick(duration) if quick else RemoteBenchConfig(
        load_duration_s=60.0 if duration is None else duration))
    if cfg.load_duration_s <= 0:
        raise KVCacheError(f"--duration must be > 0 seconds, got {cfg.load_duration_s:g}")
    t0, code = time.time(), _code_version()  # what the processes started below will run
    per_size = cfg.get_keys + max(cfg.clients) * cfg.batch
    tier = CpuTier(per_size * max(cfg.sizes_mib) * MiB + 64 * MiB, pin_memory=False)
    workdir = Path(tempfile.mkdtemp(prefix="kvcache-bench-remote-"))
    workers = None
    try:
        with serve_process(workdir, cfg.daemon_capacity) as (pid, tcp, unix), \
                _redis_server(workdir) as (redis_url, redis_version):
            urls = {"http-tcp": tcp, "http-unix": unix, "fast-path": unix, "redis": redis_url}
            workers = _Workers(max(*cfg.clients, cfg.load_clients))
            cells = _measure(cfg, workers, urls, tier)
            load = _load(cfg, workers, urls, pid)
    finally:
        if workers is not None:
            workers.close()
        shutil.rmtree(workdir, ignore_errors=True)
        tier.close()
    rows = _rows(cfg, cells)
    goal_rows = [r for r in rows if r["key"] == "http_tcp_get_vs_redis" and r["goal"]]
    fast_rows = [r for r in rows if r["key"] == "fast_path_get_vs_cpu_tier"]
    fast = all(r["available"] for r in fast_rows)
    notes = [] if fast else [f"{FAST_PATH}: not available (the daemon offers no "
                             "shared-memory path, or its clients fell back to HTTP)"]
    if (os.cpu_count() or 0) <= 4:
        notes.append(f"{os.cpu_count()} cores shared by the daemon, redis-server and up to "
                     f"{max(*cfg.clients, cfg.load_clients)} client processes: concurrent "
                     "figures measure contention for cores as much as the servers")
    notes += [f"errors in {b} {m} {mib} MiB x{n} clients: {c['errors']} ({c['first_error']})"
              for (b, m, mib, n), c in cells.items() if c["errors"]]
    return {
        "benchmark": "remote",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(time.time() - t0, 1),
        "machine": _machine(Path.cwd()) | {"cores": os.cpu_count()},
        "code": code,
        "goals": {"http_get_vs_redis": GOAL_HTTP_VS_REDIS, "http_get_goal_min_mib": GOAL_MIN_MIB,
                  "fast_path_get_vs_cpu_tier": GOAL_FAST_PATH},
        "http_get_vs_redis_min": min((r["ratio"] for r in goal_rows), default=None),
        "fast_path": {"available": fast, "get_vs_cpu_tier_min": min(
            (r["ratio"] for r in fast_rows if r["ratio"] is not None), default=None)},
        "figures": [{"backend": b, "mode": m, "object_mib": mib, "clients": n} | c
                    for (b, m, mib, n), c in cells.items()],
        "rows": rows,
        "load": load,
        "method": {
            "config": asdict(cfg) | {"layout": LLAMA_3_8B.to_dict()},
            "servers": f"kvcache serve (CPU tier only, {cfg.daemon_capacity / GiB:g} GiB; "
                       f"HTTP on 127.0.0.1 and a Unix socket); redis-server {redis_version} "
                       "on 127.0.0.1 (--save '' --appendonly no)",
            "clients": f"a spawned process per client (CacheClient; redis-py "
                       f"{redis.__version__}, hiredis {'on' if HIREDIS_AVAILABLE else 'OFF'});"
                       " a thread per client for the in-process CPU tier",
            "requests": f"{cfg.batch} objects per request: one get_objects/put_objects call, "
                        "or one Redis pipeline of GETs/SETs of the container bytes; reads "
                        "over HTTP and from Redis verified (checksum, key), from the fast "
                        "path and the CPU tier not (no bytes crossed a trust boundary)",
            "statistic": "GB/s = payload bytes (1e9/s) of all requests / wall time from the "
                         "common start to the last client's end, summed over rounds; p50/p99 "
                         "per request over every client and round",
            "load": "gets 55%, puts 30%, lookups 15% against the daemon, half the clients "
                    "on TCP, half on the Unix socket (reads by the fast path); misses: keys "
                    "the daemon must hold; RSS: VmRSS in /proc/PID/status",
        },
        "notes": notes,
    }


# -- presentation --------------------------------------------------------------------------
def _fig(c: dict[str, Any] | None) -> str:
    if c is None or c.get("fell_back_to_http"):
        return "n/a"
    if c["p50_ms"] is None:
        return "-"
    return f"{c['gbps']:.2f} ({c['p50_ms']:.1f}/{c['p99_ms']:.1f})"


def _ratio(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    text = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
    if r["goal"] is not None:
        text += f" (>= {r['goal']:.1f} {({True: 'ok', False: 'MISS'}).get(r['meets_goal'], '-')})"
    return text


def format_table(result: dict[str, Any]) -> str:
    """GB/s (p50/p99 ms per request) of every backend side by side with the ratios the
    goals are about, then the load run."""
    figs = {(f["backend"], f["mode"], f["object_mib"], f["clients"]): f
            for f in result["figures"]}
    ratio = {(r["key"], r["object_mib"], r["clients"]): r for r in result["rows"]}
    head = ["OP", "OBJECT", "CLIENTS", *(LABELS[b] for b in BACKENDS), "TCP/REDIS",
            "FAST/CPU TIER"]
    cells = [head]
    for mode, mib, n in sorted({k[1:] for k in figs}, key=lambda k: (k[0] != "get", k[1:])):
        cells.append([mode.upper(), f"{mib} MiB", str(n),
                      *("(HTTP/unix)" if (b, mode) == ("fast-path", "put")
                        else _fig(figs.get((b, mode, mib, n))) for b in BACKENDS),
                      _ratio(ratio.get((f"http_tcp_{mode}_vs_redis", mib, n))),
                      _ratio(ratio.get((f"fast_path_{mode}_vs_cpu_tier", mib, n)))])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    m, load = result.get("machine", {}), result["load"]
    rss = load["daemon_rss_mib"]
    out = [
        f"kvcache bench remote  {result.get('date', '')}  {m.get('hostname', '')}: "
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gib', '?')} GiB",
        "",
        f"GB/s (p50/p99 ms per request of {result['method']['config']['batch']} objects)",
        *("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
          for row in cells),
        "",
        f"goals: HTTP GET >= {GOAL_HTTP_VS_REDIS}x redis-server for {GOAL_MIN_MIB}-32 MiB "
        f"objects (TCP both); {FAST_PATH} GET >= {GOAL_FAST_PATH}x the in-process CPU tier",
        "",
        f"load: {load['clients']} clients, {load['seconds']:g} s, mixed get/put/lookup: "
        f"{load['requests']} requests ({', '.join(f'{k} {v}' for k, v in load['by_op'].items())}"
        f"), {load['requests_per_s']:g}/s, {load['gbps']:.2f} GB/s; errors {load['errors']}, "
        f"corrupt {load['corrupt']}, misses {load['misses']}; daemon RSS start/middle/end/max "
        f"{rss['start']:g}/{rss['middle']:g}/{rss['end']:g}/{rss['max']:g} MiB",
        "",
        *(f"{k}: {v}" for k, v in result.get("method", {}).items() if isinstance(v, str)),
        *(f"note: {n}" for n in result.get("notes", [])),
    ]
    return "\n".join(out)
