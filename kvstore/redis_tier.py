"""``RedisTier``: a tier in Redis, Redis Cluster or Valkey, shared by every process and node
that points at it.

- One value per chunk: the checksummed container, sent as its parts (header, then the
  tensors' own memory) without joining them. Every value read is verified (checksum, and
  that it is the object of the key asked for); one that fails is deleted, counted in
  ``corrupt`` and is a miss. A value over ``proto-max-bulk-len`` is refused before sending.
- A batch is one round trip per server: ``MGET`` on one server; on a cluster one pipeline
  per master, keys grouped by the slot map (``MGET`` cannot span slots).
- Fails open: a server down, slow, restarting or answering errors costs a miss or a
  skipped write, counted in ``errors``, never an exception. A request has one ``timeout_s``
  budget, retries included: each socket wait is half of one try's share of it, and a retry
  starts only if a whole try still fits. A ``CircuitBreaker`` refuses requests for
  ``reset_s`` after repeated failures (a dead server costs no connects), then lets one
  trial through: recovery is automatic. (A cluster's slot map is refreshed after a
  failure; the refresh asks nodes in turn, each within the socket timeouts.)
- Redis evicts by its own ``maxmemory-policy`` and cannot pin: ``set_pinned`` only says
  whether the key exists. ``capacity_bytes`` is the masters' ``maxmemory`` (0: unset);
  ``used_bytes``/``entries`` are their ``used_memory`` and key count — what ``maxmemory``
  is compared with; bytes this process wrote would miss other writers, expiry and
  evictions. Give the cache a database of its own.
- ``scan``/``info``/``header`` read each value's first bytes (``GETRANGE``), an access
  for Redis's LRU.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from kvcache.kvstore.container import (
    ObjectHeader,
    StoredObject,
    decode_object,
    encode_object,
    encode_parts,
    read_header_unverified,
)
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    KVCacheError,
    ObjectTooLargeError,
)
from kvcache.kvstore.fail_open import (
    CircuitBreaker,
    Deadline,
    DeadlineExceededError,
    RemoteUnavailableError,
    call_with_retries,
)
from kvcache.kvstore.tier import DELETE_CAUSES, EntryInfo, Tier, TierStats, check_object_key

if TYPE_CHECKING:
    from kvcache.kvstore.config import RemoteTierConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_VALUE = 512 << 20  # Redis's default proto-max-bulk-len, when CONFIG is disabled
_HEAD_BYTES = 4096  # first read of a header; longer headers take a second GETRANGE
_SCAN_COUNT = 500
_FIGURES_TTL_S = 1.0  # INFO figures are reused this long (stats/used_bytes are polled)
_INLINE_BYTES = 64 << 10  # value parts below this are copied into the command buffer
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def _import_redis() -> Any:
    try:
        import redis
        import redis.backoff
        import redis.cluster
        import redis.retry
    except ImportError:
        raise ConfigError("the Redis tier needs redis-py: pip install 'kvcache[redis]'") from None
    return redis


class _Value:
    """A container as the buffers ``encode_parts`` made; packed without joining them."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self.parts = parts
        self.nbytes = sum(memoryview(p).nbytes for p in parts)

    def __repr__(self) -> str:  # redis-py logs command arguments
        return f"<kvcache object of {self.nbytes} bytes>"


@functools.cache
def _packer_hook_exists() -> bool:
    from redis.connection import AbstractConnection

    return hasattr(AbstractConnection, "_construct_command_packer")


@functools.cache
def _connection_classes() -> tuple[type, type]:
    """redis-py connection classes (plain, TLS) whose packer sends a ``_Value``'s parts
    straight from the tensors' memory (the stock packers would join them: two copies)."""
    from redis.connection import Connection, PythonRespSerializer, SSLConnection

    class Serializer(PythonRespSerializer):
        def pack(self, *args: Any) -> list[Any]:
            if not any(isinstance(a, _Value) for a in args):
                return list(super().pack(*args))
            out: list[Any] = []
            buf = bytearray(b"*%d\r\n" % len(args))
            for a in args:
                if not isinstance(a, _Value):
                    b = self.encode(a)
                    buf += b"$%d\r\n%b\r\n" % (len(b), b)
                    continue
                buf += b"$%d\r\n" % a.nbytes
                for part in a.parts:
                    if memoryview(part).nbytes < _INLINE_BYTES:
                        buf += part
                    else:
                        out += [buf, part]
                        buf = bytearray()
                buf += b"\r\n"
            return [*out, buf]

    class PartsPacking:
        def _construct_command_packer(self, packer: Any) -> Any:
            c: Any = self
            return packer or Serializer(c._buffer_cutoff, c.encoder.encode)

    plain = type("KVCacheConnection", (PartsPacking, Connection), {})
    tls = type("KVCacheSSLConnection", (PartsPacking, SSLConnection), {})
    return plain, tls


def _cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str]:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]`` → nodes, and the
    ``user:password@`` part as written."""
    rest = url.split("://", 1)[1]
    cred, at, rest = rest.rpartition("@")
    rest, _, db = rest.partition("/")
    if db not in ("", "0"):
        raise ConfigError(f"{url!r}: Redis Cluster has only database 0")
    nodes = []
    for part in filter(None, rest.split(",")):
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "6379")
        try:
            nodes.append((host, int(port)))
        except ValueError:
            raise ConfigError(f"{url!r}: {part!r} is not host:port") from None
    if not nodes:
        raise ConfigError(f"{url!r} names no node; use redis+cluster://host:port[,host:port]")
    return nodes, cred + at


class RedisTier(Tier):
    """Objects in Redis (``redis://``, ``rediss://``) or Redis Cluster (``redis+cluster://``)
    under ``key_prefix`` + key, expiring after ``ttl_s`` when it is set."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, retries: int = 1,
                 ttl_s: float | None = None, name: str = "redis", key_prefix: str = "kvcache:",
                 breaker: CircuitBreaker | None = None) -> None:
        super().__init__()
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in ("redis", "rediss", "redis+cluster"):
            raise ConfigError(f"{url!r} is not a Redis URL; use redis://host:port/db, "
                              "rediss://... or redis+cluster://host:port[,host:port]")
        if timeout_s <= 0 or retries < 0 or (ttl_s is not None and ttl_s <= 0):
            raise ConfigError("a Redis tier needs timeout_s > 0, retries >= 0, ttl_s > 0")
        self._redis = redis = _import_redis()
        e = redis.exceptions
        # Transport failures: retried, counted against the breaker. Any other RedisError
        # is the server refusing a command (out of memory, wrong type): it is alive.
        self._transport: tuple[type[BaseException], ...] = (
            e.ConnectionError, e.TimeoutError, e.ClusterError, e.RedisClusterException,
            e.AskError, e.TryAgainError, e.InvalidResponse, OSError)
        self._fails = (RemoteUnavailableError, e.RedisError)  # what fails open
        self.name, self.key_prefix, self.url = name, key_prefix, url
        self.timeout_s, self.retries, self.ttl_s = timeout_s, retries, ttl_s
        self._where = url.rsplit("@", 1)[-1]  # for logs: no password
        self.breaker = breaker or CircuitBreaker(failures=3, reset_s=2.0)
        self.capacity_bytes = 0
        self._try_s = timeout_s / (retries + 1)
        self._backoff_s = min(0.05, self._try_s / 10)
        plain, tls = _connection_classes()
        kw: dict[str, Any] = {
            "socket_timeout": self._try_s / 2, "socket_connect_timeout": self._try_s / 2}
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)  # ours, in the deadline
        self._cluster_mode = scheme == "redis+cluster"
        self._client: Any = None
        if self._cluster_mode:
            nodes, cred = _cluster_nodes(url)
            (h, p), others = nodes[0], nodes[1:]
            # Given a URL, redis-py builds each node's pool with our connection class.
            self._cluster_args = dict(
                url=f"redis://{cred}{h}:{p}", connection_class=plain, retry=no_retry,
                startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in others], **kw)
        else:  # from_url does not connect; the cluster client does, so it is made lazily
            self._client = redis.Redis.from_url(
                url, connection_class=tls if scheme == "rediss" else plain,
                retry=no_retry, **kw)
        self._lock = threading.Lock()  # counters
        self._connect_lock = threading.Lock()
        self._closed = self._topology_stale = self._down = False
        self._max_value: int | None = None
        self._figures: tuple[int, int, int] = (0, 0, 0)  # used_memory, maxmemory, keys
        self._figures_at: float | None = None
        self._stats = TierStats(self.name, 0)
        self._server_figures()  # capacity_bytes now if the server answers (fails open)

    @classmethod
    def from_config(cls, cfg: RemoteTierConfig, store_ttl: float | None) -> RedisTier:
        """The tier ``store.remote`` describes; its ``ttl`` defaults to the store's. A
        tenant other than ``default`` gets its own key namespace."""
        if cfg.url is None:
            raise ConfigError("store.remote.url is not set; use redis://host:port/db")
        prefix = "kvcache:" if cfg.tenant == "default" else f"kvcache:{cfg.tenant}:"
        return cls(cfg.url, timeout_s=cfg.timeout, retries=cfg.retries, key_prefix=prefix,
                   ttl_s=cfg.ttl if cfg.ttl is not None else store_ttl)

    # -- requests ------------------------------------------------------------------------
    def _rkey(self, key: str) -> str:
        return self.key_prefix + key

    def _connected(self, deadline: Deadline) -> Any:
        """The client; on a cluster made on first use and its slot map refreshed after a
        failure (within this try: a thread waiting for another's refresh shares it)."""
        if self._closed:
            raise RemoteUnavailableError(f"the {self.name} tier is closed")
        if not self._cluster_mode:
            return self._client
        if not self._connect_lock.acquire(timeout=deadline.remaining()):
            raise DeadlineExceededError("waited for the cluster's slot map")
        try:
            if self._client is None:
                self._client = self._redis.cluster.RedisCluster(**self._cluster_args)
            elif self._topology_stale:
                self._client.nodes_manager.initialize()
            self._topology_stale = False
            return self._client
        finally:
            self._connect_lock.release()

    def _request(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` within one deadline, retried, guarded by the breaker. Raises
        ``RemoteUnavailableError`` (no answer) or ``RedisError`` (a refusal)."""
        tries = 0

        def attempt(deadline: Deadline) -> T:
            nonlocal tries
            tries += 1
            if tries > 1 and deadline.remaining() < self._try_s:
                raise DeadlineExceededError(f"no time left to retry {what}")
            self._connected(deadline)
            try:
                return fn()
            except self._transport:
                self._topology_stale = self._cluster_mode
                raise

        result = call_with_retries(
            attempt, deadline=Deadline(self.timeout_s), breaker=self.breaker,
            retries=self.retries, backoff_s=self._backoff_s,
            retry_on=(*self._transport, RemoteUnavailableError), what=f"redis {what}")
        if self._down:
            self._down = False
            log.info("%s tier: %s answers again", self.name, self._where)
        return result

    def _failed(self, what: str, e: BaseException, *, misses: int = 0, count: bool = True) -> None:
        """A request that fails open: counted, logged once per outage."""
        with self._lock:
            self._stats.errors += count
            self._stats.misses += misses
        if not self._down:
            self._down = True
            log.warning("%s tier: %s failed, serving misses until %s answers: %s",
                        self.name, what, self._where, e)
        else:
            log.debug("%s tier: %s failed: %s", self.name, what, e)

    def _nodes(self) -> list[Any]:
        """A client per master (one, unless a cluster)."""
        c = self._client
        if not self._cluster_mode:
            return [c]
        return [c.get_redis_connection(n) for n in c.get_primaries()]

    def _by_node(self, rkeys: Sequence[str]) -> list[tuple[Any, list[int]]]:
        """(client, indexes of ``rkeys``) per server holding them, from the slot map."""
        c = self._client
        if not self._cluster_mode:
            return [(c, list(range(len(rkeys))))]
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, rk in enumerate(rkeys):
            node = c.nodes_manager.get_node_from_slot(c.keyslot(rk))
            groups.setdefault(node.name, (c.get_redis_connection(node), []))[1].append(i)
        return list(groups.values())

    def _pipelined(self, rkeys: Sequence[str], queue: Callable[[Any, str, int], None],
                   per_key: int = 1) -> list[list[Any]]:
        """One pipeline per server: ``queue(pipe, rkey, i)`` adds ``per_key`` commands; each
        key's replies (a refused command's reply is its exception). A redirect or cluster
        error fails the try: the retry uses a fresh slot map."""
        out: list[list[Any]] = [[] for _ in rkeys]
        for node, idx in self._by_node(rkeys):
            pipe = node.pipeline(transaction=False)
            for i in idx:
                queue(pipe, rkeys[i], i)
            replies = pipe.execute(raise_on_error=False)
            for r in replies:
                if isinstance(r, self._transport):
                    raise r
            for n, i in enumerate(idx):
                out[i] = replies[n * per_key : (n + 1) * per_key]
        return out

    def _on_key(self, what: str, key: str, command: str) -> int | None:
        """``command`` (EXISTS, DEL) on ``key``'s server; None if it failed (counted)."""
        rk = self._rkey(key)
        try:
            return int(self._request(
                what, lambda: self._by_node([rk])[0][0].execute_command(command, rk)))
        except self._fails as e:
            self._failed(what, e)
            return None

    def _read_figures(self) -> tuple[int, int, int]:
        """(used_memory, maxmemory or 0, keys) summed over the masters, and the largest
        value all accept (proto-max-bulk-len; Redis's default if CONFIG is disabled)."""
        used = cap = keys = 0
        unlimited, limits = False, []
        for node in self._nodes():
            pipe = node.pipeline(transaction=False)
            pipe.config_get("proto-max-bulk-len").info("memory").dbsize()
            replies = pipe.execute(raise_on_error=False)
            for r in replies:
                if isinstance(r, self._transport):
                    raise r
            # A command the server refuses (renamed, ACL) leaves its figure unknown.
            conf, mem, n = (r if isinstance(r, dict | int) else {} for r in replies)
            limit = next(iter(conf.values()), None) if isinstance(conf, dict) else None
            limits.append(int(limit) if limit is not None else DEFAULT_MAX_VALUE)
            m = int(mem.get("maxmemory", 0)) if isinstance(mem, dict) else 0
            used += int(mem.get("used_memory", 0)) if isinstance(mem, dict) else 0
            keys += n if isinstance(n, int) else 0
            cap, unlimited = cap + m, unlimited or m == 0
        self._max_value = min(limits)
        self._figures = (used, 0 if unlimited else cap, keys)
        self.capacity_bytes = self._figures[1]
        return self._figures

    def _server_figures(self, max_age_s: float = _FIGURES_TTL_S) -> tuple[int, int, int]:
        """``_read_figures`` at most ``max_age_s`` old; the last known ones while the
        servers do not answer (polling them is not a failed request)."""
        now = time.monotonic()
        if self._figures_at is None or now - self._figures_at >= max_age_s:
            try:
                self._request("info", self._read_figures)
            except self._fails as e:
                self._failed("INFO", e, count=False)
            self._figures_at = now
        return self._figures

    # -- Tier ----------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        return bool(self._on_key("contains", key, "EXISTS"))

    def get(self, key: str) -> StoredObject | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        """Verified objects (tensors view the reply's bytes, which nothing else holds)."""
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]

        def fetch() -> list[Any]:
            if not self._cluster_mode:
                return list(self._client.mget(rkeys))
            return [r[0] for r in self._pipelined(rkeys, lambda p, rk, i: p.get(rk))]

        try:
            values = self._request("get", fetch)
        except self._fails as e:
            self._failed("get", e, misses=len(keys))
            return [None] * len(keys)
        out: list[StoredObject | None] = []
        bad: list[str] = []
        for key, data in zip(keys, values, strict=True):
            obj = None
            if isinstance(data, bytes):
                try:
                    obj = decode_object(data)
                    check_object_key(key, obj.header)
                except CorruptObjectError as e:
                    log.warning("%s tier: dropping %s: %s", self.name, key, e)
                    bad.append(key)
                    obj = None
            out.append(obj)
        with self._lock:
            for obj, data in zip(out, values, strict=True):
                if obj is None:
                    self._stats.misses += 1
                else:
                    self._stats.hits += 1
                    self._stats.hit_tokens += obj.header.num_tokens
                    self._stats.bytes_read += len(data)
            self._stats.corrupt += len(bad)
        for key in bad:
            self._on_key("delete", key, "DEL")
        return out

    def put(self, key: str, obj: StoredObject) -> None:
        err = self.put_many([(key, obj)])[0]
        if err is not None:
            raise err

    def put_many(self, items: Sequence[tuple[str, StoredObject]]) -> list[KVCacheError | None]:
        """Store every object, one pipeline per server. ``ObjectTooLargeError`` for each
        (nothing sent) if one is over the servers' limit; a failure skips the writes
        (counted, failing open: they report None)."""
        for key, obj in items:
            check_object_key(key, obj.header)
        out: list[KVCacheError | None] = [None] * len(items)
        if not items:
            return out
        rkeys = [self._rkey(key) for key, _ in items]
        # A redis-py without the packer hook gets joined bytes (one copy more, still right).
        values: list[_Value | bytes] = [
            _Value(encode_parts(obj)) if _packer_hook_exists() else encode_object(obj)
            for _, obj in items]
        sizes = [v.nbytes if isinstance(v, _Value) else len(v) for v in values]
        px = None if self.ttl_s is None else max(1, round(self.ttl_s * 1000))

        def send() -> list[list[Any]]:
            if self._max_value is None:
                self._read_figures()
            limit = self._max_value or DEFAULT_MAX_VALUE
            for key, size in zip(rkeys, sizes, strict=True):
                if size > limit:
                    raise ObjectTooLargeError(
                        f"{key}: a value of {size} bytes is over the Redis server's "
                        f"limit of {limit} bytes (proto-max-bulk-len); store smaller chunks "
                        "or raise proto-max-bulk-len")
            return self._pipelined(rkeys, lambda p, rk, i: p.set(rk, values[i], px=px))

        try:
            replies = self._request("put", send)
        except ObjectTooLargeError as e:
            return [e] * len(items)
        except self._fails as e:
            self._failed("put", e)
            return out
        refused = [r[0] for r in replies if isinstance(r[0], Exception)]
        with self._lock:
            self._stats.errors += len(refused)
            self._stats.puts += len(items) - len(refused)
            self._stats.bytes_written += sum(
                size for size, r in zip(sizes, replies, strict=True)
                if not isinstance(r[0], Exception))
        if refused:
            log.warning("%s tier: %d writes refused: %s", self.name, len(refused), refused[0])
        return out

    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        counter = DELETE_CAUSES[cause]
        found = bool(self._on_key("delete", key, "DEL"))
        if found:
            with self._lock:
                setattr(self._stats, counter, getattr(self._stats, counter) + 1)
        return found

    def count_misses(self, chunks: int, tokens: int) -> None:
        with self._lock:
            self._stats.misses += chunks
            self._stats.miss_tokens += tokens

    def _infos(self, keys: Sequence[str]) -> list[tuple[ObjectHeader, EntryInfo] | None]:
        """Header and entry of each key from its first bytes (None: absent or corrupt,
        which is deleted and counted). Raises like ``_request``."""
        rkeys = [self._rkey(k) for k in keys]

        def queue(p: Any, rk: str, i: int) -> None:
            p.object("idletime", rk)  # first: GETRANGE counts as an access
            p.strlen(rk)
            p.getrange(rk, 0, _HEAD_BYTES - 1)

        rows = self._request("header", lambda: self._pipelined(rkeys, queue, 3))
        out: list[tuple[ObjectHeader, EntryInfo] | None] = []
        now = time.time()
        for key, rk, (idle, size, head) in zip(keys, rkeys, rows, strict=True):
            if not isinstance(size, int) or size == 0 or not isinstance(head, bytes):
                out.append(None)
                continue
            try:
                h = read_header_unverified(self._reader(rk, head, size), size)
                check_object_key(key, h)
            except CorruptObjectError as e:
                log.warning("%s tier: dropping %s: %s", self.name, key, e)
                with self._lock:
                    self._stats.corrupt += 1
                self._on_key("delete", key, "DEL")
                out.append(None)
                continue
            seen = now - idle if isinstance(idle, int) else h.created_at
            out.append((h, EntryInfo(key, self.name, size, h.num_tokens, h.codec,
                                     h.layout.model_id, h.created_at, seen,
                                     keying=h.keying)))
        return out

    def _reader(self, rk: str, head: bytes, size: int) -> Callable[[int, int], bytes]:
        """``read_at`` over a value of ``size`` bytes whose first bytes are ``head``: a
        header longer than them costs one more GETRANGE."""
        def read_at(o: int, n: int) -> bytes:
            nonlocal head
            if o + n > len(head) and len(head) < size:
                head = self._request("header", lambda: self._by_node([rk])[0][0].getrange(
                    rk, 0, o + n - 1))
            return bytes(head[o : o + n])

        return read_at

    def _info_of(self, key: str) -> tuple[ObjectHeader, EntryInfo] | tuple[None, None]:
        try:
            return self._infos([key])[0] or (None, None)
        except self._fails as e:
            self._failed("header", e)
            return None, None

    def info(self, key: str) -> EntryInfo | None:
        return self._info_of(key)[1]

    def header(self, key: str) -> ObjectHeader | None:
        return self._info_of(key)[0]

    def scan(self) -> Iterator[EntryInfo]:
        """SCAN of our prefix on every master; a server that stops answering ends its
        part of the listing (counted). Each page is one request with its own deadline."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.key_prefix) + "*"
        infos: list[EntryInfo] = []
        try:
            nodes = self._request("scan", self._nodes)
        except self._fails as e:
            self._failed("scan", e)
            return iter(infos)
        for node in nodes:
            cursor = 0
            while True:
                try:
                    cursor, found = self._request("scan", functools.partial(
                        node.scan, cursor, match=pattern, count=_SCAN_COUNT))
                    names = [k.decode(errors="replace")[len(self.key_prefix) :] for k in found]
                    got = self._infos([k for k in names if _KEY_RE.match(k)])
                except self._fails as e:
                    self._failed("scan", e)
                    break
                infos += [g[1] for g in got if g is not None]
                if cursor == 0:
                    break
        return iter(infos)

    def set_pinned(self, key: str, pinned: bool) -> bool:
        """Redis cannot pin (its maxmemory-policy evicts what it likes): whether it exists."""
        return bool(self._on_key("contains", key, "EXISTS"))

    @property
    def used_bytes(self) -> int:
        return self._server_figures()[0]

    def stats(self) -> TierStats:
        used, cap, keys = self._server_figures(0.0)
        with self._lock:
            s = TierStats(**self._stats.to_dict())
        s.used_bytes, s.capacity_bytes, s.entries = used, cap, keys
        return s

    def close(self) -> None:
        with self._connect_lock:
            self._closed = True
            client = self._client
        if client is not None:
            client.close()
