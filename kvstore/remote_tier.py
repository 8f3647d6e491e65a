"""``RemoteTier``: the cache daemon (``kvcache serve``) as the lowest tier of a store.

It fails open. Whatever goes wrong on the other side — the daemon down, slow, restarting,
refusing the token, answering garbage — a read is a miss and a write is skipped, each
counted in ``stats().errors``, within the request deadline; the engine above never sees an
exception from here. Two refusals do propagate because the caller can act on them: an
object larger than the daemon accepts (``ObjectTooLargeError``, as from any tier) and a
key that is not a key (``InvalidKeyError``).

Pins are leases on the daemon: ``set_pinned(key, True)`` takes one, ``False`` releases it,
and one never released expires there by itself (a client that dies leaks nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from kvcache.kvstore.cache_client import CacheClient, RemoteAuthError, RemoteRequestError
from kvcache.kvstore.errors import KVCacheError, ObjectTooLargeError
from kvcache.kvstore.fail_open import RemoteUnavailableError
from kvcache.kvstore.tier import DELETE_CAUSES, EntryInfo, Tier, TierStats

if TYPE_CHECKING:
    from kvcache.kvstore.config import RemoteTierConfig
    from kvcache.kvstore.container import ObjectHeader, StoredObject

log = logging.getLogger(__name__)
T = TypeVar("T")
# Failures of the other side: each becomes a counted miss or skipped write.
_FAIL_OPEN = (RemoteUnavailableError, RemoteAuthError, RemoteRequestError)
_STATS_MAX_AGE_S = 1.0
# The most bytes put_many sends in one request (a daemon refuses bodies over its
# server.max_body, 1GiB by default).
PUT_REQUEST_BYTES = 64 << 20


class RemoteTier(Tier):
    """A tier whose entries live in a cache daemon. Thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        tenant: str = "default",
        timeout_s: float = 2.0,
        retries: int = 1,
        name: str = "remote",
    ) -> None:
        super().__init__()
        self.name = name
        self.client = CacheClient(url, token=token, tenant=tenant, timeout_s=timeout_s,
                                  retries=retries)
        self._lock = threading.Lock()
        self._stats = TierStats(name=name, capacity_bytes=0)
        self._leases: dict[str, str] = {}  # pinned key -> lease id
        self._remote: dict[str, Any] = {}
        self._remote_at = 0.0
        self._warned: set[str] = set()
        # Known once the daemon first answers: an engine must not wait for it to start.
        self.capacity_bytes = 0

    @classmethod
    def from_config(cls, cfg: RemoteTierConfig) -> RemoteTier:
        from kvcache.kvstore.tokens import resolve_token

        assert cfg.url is not None
        return cls(cfg.url, token=resolve_token(cfg.token, cfg.token_file, what="store.remote"),
                   tenant=cfg.tenant, timeout_s=cfg.timeout, retries=cfg.retries)

    # -- failing open ----------------------------------------------------------------------
    def _try(self, what: str, fn: Callable[[], T], fallback: T) -> T:
        try:
            return fn()
        except _FAIL_OPEN as e:
            with self._lock:
                self._stats.errors += 1
            # One warning per kind of failure, not one per request of a dead daemon.
            kind = type(e).__name__
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("remote tier %s: %s failed, serving misses: %s",
                            self.client.url, what, e)
            return fallback

    def _remote_tier_stats(self) -> dict[str, Any]:
        """The daemon's summary of its own tiers (cached briefly; {} if unreachable)."""
        now = time.monotonic()
        if now - self._remote_at > _STATS_MAX_AGE_S:
            self._remote = self._try("stats", lambda: self.client.stats().get("totals", {}), {})
            self._remote_at = now
            if self._remote:
                self.capacity_bytes = int(self._remote.get("capacity_bytes", 0))
        return self._remote

    # -- Tier ------------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return self._try("lookup", lambda: self.client.exists(keys), [False] * len(keys))

    def get(self, key: str) -> StoredObject | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        corrupt_before = self.client.corrupt
        got: list[StoredObject | None] = self._try(
            "get", lambda: self.client.get_objects(keys), [None] * len(keys))
        hits = [o for o in got if o is not None]
        with self._lock:
            s = self._stats
            s.hits += len(hits)
            s.misses += len(keys) - len(hits)
            s.hit_tokens += sum(o.header.num_tokens for o in hits)
            s.bytes_read += sum(o.nbytes for o in hits)
            s.corrupt += self.client.corrupt - corrupt_before
        return got

    def put(self, key: str, obj: StoredObject) -> None:
        err = self.put_many([(key, obj)])[0]
        if err is not None:
            raise err

    def put_many(self, items: Sequence[tuple[str, StoredObject]]) -> list[KVCacheError | None]:
        """Store the objects in requests of up to ``PUT_REQUEST_BYTES``. A request the
        daemon cannot take is skipped and counted (``failed_requests``: failing open, its
        objects report None); one it refuses as too large reports ``ObjectTooLargeError``
        for each of its objects."""
        for key, obj in items:
            if obj.header.key != key:
                raise KVCacheError(f"the object of {obj.header.key} cannot be stored as {key}")
        out: list[KVCacheError | None] = [None] * len(items)
        start, size = 0, 0
        for end, (_, obj) in enumerate(items, 1):
            size += obj.nbytes
            if size < PUT_REQUEST_BYTES and end < len(items):
                continue
            send = partial(self.client.put_objects, [o for _, o in items[start:end]])
            try:
                stored = self._try("put", send, 0)
            except ObjectTooLargeError as e:
                out[start:end] = [e] * (end - start)
                stored = 0
            with self._lock:
                self._stats.puts += stored
                self._stats.bytes_written += size if stored else 0
            start, size = end, 0
        return out

    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        found = bool(self._try("delete", lambda: self.client.delete([key], force=force), 0))
        if found:
            with self._lock:
                setattr(self._stats, DELETE_CAUSES[cause],
                        getattr(self._stats, DELETE_CAUSES[cause]) + 1)
        return found

    def count_misses(self, chunks: int, tokens: int) -> None:
        with self._lock:
            self._stats.misses += chunks
            self._stats.miss_tokens += tokens

    def info(self, key: str) -> EntryInfo | None:
        got: dict[str, Any] = self._try("inspect", lambda: self.client.inspect(key=key), {})
        entry = got.get("entry")
        return None if not entry else EntryInfo(**entry["info"])

    def header(self, key: str) -> ObjectHeader | None:
        from kvcache.kvstore.container import ObjectHeader

        got: dict[str, Any] = self._try("inspect", lambda: self.client.inspect(key=key), {})
        entry = got.get("entry")
        return None if not entry else ObjectHeader.from_json(entry["header"])

    def scan(self) -> Iterator[EntryInfo]:
        got: dict[str, Any] = self._try("inspect", self.client.inspect, {})
        for entry in got.get("entries", []):
            yield EntryInfo(**entry)

    def set_pinned(self, key: str, pinned: bool) -> bool:
        if pinned:
            lease = self._try("pin", lambda: self.client.pin([key]), None)
            if lease is None or not lease.pinned[0]:
                return False
            with self._lock:
                old = self._leases.get(key)
                self._leases[key] = lease.lease_id
            if old is not None:
                self._try("unpin", lambda: self.client.unpin(old), False)
            return True
        with self._lock:
            lease_id = self._leases.pop(key, None)
        if lease_id is None:
            return self.contains(key)
        self._try("unpin", lambda: self.client.unpin(lease_id), False)
        return True

    def stats(self) -> TierStats:
        remote = self._remote_tier_stats()
        with self._lock:
            s = TierStats(**self._stats.to_dict())
        s.used_bytes = int(remote.get("used_bytes", 0))
        s.entries = int(remote.get("entries", 0))
        s.capacity_bytes = self.capacity_bytes
        return s

    @property
    def used_bytes(self) -> int:
        return int(self._remote_tier_stats().get("used_bytes", 0))

    @property
    def failed_requests(self) -> int:
        """Requests that failed open so far (``stats().errors``, without asking the
        daemon anything): a caller compares it before and after its own requests."""
        with self._lock:
            return self._stats.errors

    def close(self) -> None:
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease_id in leases:
            self._try("unpin", partial(self.client.unpin, lease_id), False)
        self.client.close()
