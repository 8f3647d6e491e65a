"""``TieredStore``: the hierarchy (CPU → disk → …) behind one get/put API.

- Lookups walk the tiers fastest first; ``longest_prefix`` answers how many leading chunk
  keys are present anywhere.
- A hit in a lower tier is promoted to the top tier.
- Eviction from a tier demotes the victim to the next tier instead of dropping it.
- Writes: *write-through* copies every new object down in a background writer thread
  (``flush()`` waits for it); *write-back* copies only when an object is evicted or on
  ``flush()``. Either way an object leaves a tier only once the tier below has it.
- Each tier has its codec; objects are transcoded when they move between tiers whose
  codecs differ.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvcache.codecs.registry import get_codec
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import (
    ConfigError,
    KVCacheError,
    LayoutMismatchError,
    StoreFullError,
)
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tier import EntryInfo, EvictHandler, Tier, TierStats

if TYPE_CHECKING:
    from kvcache.kvstore.config import StoreConfig

log = logging.getLogger(__name__)

WRITE_MODES = ("write-through", "write-back")
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise KVCacheError(f"invalid key {key!r}: keys are 32 lowercase hex digits")


def transcode(obj: StoredObject, codec_name: str) -> StoredObject:
    """``obj`` re-encoded with ``codec_name`` (``obj`` itself when it already is)."""
    h = obj.header
    if h.codec == codec_name:
        return obj
    chunk = get_codec(h.codec).decode(obj.tensors, h.codec_params, h.layout, h.num_tokens)
    codec = get_codec(codec_name)
    tensors, params = codec.encode(chunk, h.layout, rope_start=h.rope_start)
    header = ObjectHeader(
        h.key, h.layout, h.num_tokens, codec_name, params, h.rope_start, h.created_at
    )
    return StoredObject(header, tensors)


def _decode(obj: StoredObject) -> torch.Tensor:
    h = obj.header
    return get_codec(h.codec).decode(obj.tensors, h.codec_params, h.layout, h.num_tokens)


@dataclass
class StoreCounters:
    """Store-level counters (per-tier ones live in each tier's ``TierStats``)."""

    lookups: int = 0
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    expired: int = 0
    background_writes: int = 0
    write_errors: int = 0


class TieredStore:
    """Tiers fastest first, e.g. ``[CpuTier, DiskTier]``. Thread-safe."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        codecs: Sequence[str] | None = None,
        write_mode: str = "write-through",
        ttl_s: float | None = None,
        promote: bool = True,
    ) -> None:
        if not tiers:
            raise ConfigError("a TieredStore needs at least one tier")
        if write_mode not in WRITE_MODES:
            raise ConfigError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
        self.tiers = list(tiers)
        self.codecs = list(codecs) if codecs is not None else ["raw"] * len(self.tiers)
        if len(self.codecs) != len(self.tiers):
            raise ConfigError("give one codec per tier")
        for name in self.codecs:
            get_codec(name)  # fail now, with the list of known codecs, not at first put
        self.write_mode = write_mode
        self.ttl_s = ttl_s
        self.promote = promote
        self.counters = StoreCounters()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()
        self._write_error: BaseException | None = None
        for i, tier in enumerate(self.tiers[:-1]):
            tier.set_evict_handler(self._demoter(i))
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        if write_mode == "write-through" and len(self.tiers) > 1:
            self._writer = threading.Thread(
                target=self._write_loop, name="kvcache-writer", daemon=True
            )
            self._writer.start()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def open(cls, config: StoreConfig | None = None) -> TieredStore:
        """CPU tier, plus the disk tier under the configured store directory."""
        from kvcache.kvstore.config import StoreConfig

        config = config or StoreConfig()
        tiers: list[Tier] = [
            CpuTier(config.cpu.capacity, policy=config.cpu.policy, pin_memory=config.cpu.pin_memory)
        ]
        codecs = [config.cpu.codec]
        if config.disk.enabled:
            from kvcache.kvstore.disk_tier import DiskTier

            tiers.append(
                DiskTier(
                    config.disk_path,
                    config.disk.capacity,
                    policy=config.disk.policy,
                    blob_storage=config.disk.blob_storage,
                )
            )
            codecs.append(config.disk.codec)
        return cls(tiers, codecs=codecs, write_mode=config.write_mode, ttl_s=config.ttl)

    @classmethod
    def in_memory(cls, capacity_bytes: int = 1 << 30, *, policy: str = "lru") -> TieredStore:
        return cls([CpuTier(capacity_bytes, policy=policy)])

    # -- moving objects between tiers ----------------------------------------------------
    def _put_in(self, i: int, key: str, obj: StoredObject) -> None:
        tier = self.tiers[i]
        tier.put(key, transcode(obj, self.codecs[i]))
        if key in self._pinned:
            tier.set_pinned(key, True)

    def _demoter(self, i: int) -> EvictHandler:
        def demote(key: str, obj: StoredObject) -> None:
            lower = self.tiers[i + 1]
            if not lower.contains(key):
                self._put_in(i + 1, key, obj)
                self.counters.demotions += 1

        return demote

    def _write_loop(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                self._write_down(key)
            except BaseException as e:  # surfaced by flush(); the writer keeps going
                log.warning("background write of %s failed: %s", key, e)
                self.counters.write_errors += 1
                if self._write_error is None:
                    self._write_error = e
            finally:
                self._queue.task_done()

    def _write_down(self, key: str) -> None:
        """Copy ``key`` from the top tier to the one below if it is not there yet."""
        top, lower = self.tiers[0], self.tiers[1]
        if lower.contains(key):
            return
        # Copy out first (one memcpy) so the entry is referenced only briefly: holding it
        # for the whole disk write would keep it from being evicted and skew the policy.
        got = top.get(key, touch=False) if isinstance(top, CpuTier) else top.get(key)
        if got is not None:
            self._put_in(1, key, got)
            self.counters.background_writes += 1

    def flush(self) -> None:
        """Make everything written so far durable in the lowest tiers; re-raise write errors."""
        if len(self.tiers) > 1:
            if self._writer is not None:
                self._queue.join()
            else:
                for info in self.tiers[0].scan():
                    self._write_down(info.key)
        err, self._write_error = self._write_error, None
        if err is not None:
            raise KVCacheError(f"a background write failed: {err}") from err

    # -- public API ----------------------------------------------------------------------
    def put(
        self, key: str, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = 0
    ) -> None:
        """Store a chunk. chunk: ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA
        ``[layers, tokens, latent_dim]``) of ``layout.torch_dtype``, on any device."""
        check_key(key)
        num_tokens = layout.check_chunk(chunk)
        if rope_start is not None and rope_start < 0:
            raise LayoutMismatchError(f"rope_start must be >= 0 or None, got {rope_start}")
        codec = get_codec(self.codecs[0])
        tensors, params = codec.encode(chunk, layout, rope_start=rope_start)
        obj = StoredObject(
            ObjectHeader(key, layout, num_tokens, codec.name, params, rope_start), tensors
        )
        for i in range(len(self.tiers)):
            try:
                self._put_in(i, key, obj)
                break
            except StoreFullError as e:
                # A top tier full of pinned entries (or too small for this object) must
                # not lose the write: the tier below takes it directly.
                if i == len(self.tiers) - 1:
                    raise
                log.debug("%s tier cannot take %s (%s); writing it to %s", self.tiers[i].name,
                          key, e, self.tiers[i + 1].name)
        if i == 0 and self._writer is not None:
            self._queue.put(key)

    def put_many(
        self,
        items: Sequence[tuple[str, torch.Tensor]],
        layout: KVLayout,
        *,
        rope_starts: Sequence[int | None] | None = None,
    ) -> None:
        """Validate every item first so a bad one stores nothing; then put each."""
        for key, chunk in items:
            check_key(key)
            layout.check_chunk(chunk)
        for i, (key, chunk) in enumerate(items):
            self.put(key, chunk, layout, rope_start=0 if rope_starts is None else rope_starts[i])

    def expired(self, header: ObjectHeader) -> bool:
        """True when ``header``'s object is older than the store's TTL."""
        return self.ttl_s is not None and time.time() - header.created_at > self.ttl_s

    def get_objects(
        self, keys: Sequence[str], *, from_tier: int = 0
    ) -> list[StoredObject | None]:
        """Stored objects from the fastest tier holding each key, in order (None: miss).

        Each tier is asked once for all keys still missing, so a slow tier reads them
        concurrently; hits in a lower tier are promoted to the top tier. ``from_tier``
        skips the tiers above it (a caller that already asked them).
        """
        out: list[StoredObject | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        self.counters.lookups += len(keys)
        for i, tier in enumerate(self.tiers):
            if i < from_tier:
                continue
            if not pending:
                break
            got = tier.get_many([keys[j] for j in pending])
            still: list[int] = []
            for j, obj in zip(pending, got, strict=True):
                if obj is None:
                    still.append(j)
                elif self.expired(obj.header):
                    self.counters.expired += 1
                    self.delete(keys[j], force=True)
                else:
                    out[j] = obj
                    if i > 0 and self.promote:
                        self._promote(keys[j], obj)
            pending = still if i + 1 < len(self.tiers) else []
        hits = sum(o is not None for o in out)
        self.counters.hits += hits
        self.counters.misses += len(keys) - hits
        return out

    def _promote(self, key: str, obj: StoredObject) -> None:
        try:
            self._put_in(0, key, obj)
            self.counters.promotions += 1
        except KVCacheError as e:  # a full top tier must not fail the read
            log.debug("promotion of %s skipped: %s", key, e)

    def get_object(self, key: str) -> StoredObject | None:
        return self.get_objects([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """Chunks under ``keys``, decoded to ``[layers, 2, tokens, kv_heads, head_dim]``."""
        return [None if o is None else _decode(o) for o in self.get_objects(keys)]

    def get(self, key: str) -> torch.Tensor | None:
        """The chunk under ``key``, decoded to ``[layers, 2, tokens, kv_heads, head_dim]``."""
        return self.get_many([key])[0]

    def where(self, key: str) -> str | None:
        for tier in self.tiers:
            if tier.contains(key):
                return tier.name
        return None

    def contains(self, key: str) -> bool:
        return self.where(key) is not None

    def longest_prefix(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are present in some tier (prefix keys chain, so a
        missing chunk ends the usable prefix)."""
        n = 0
        for key in keys:
            if not self.contains(key):
                break
            n += 1
        return n

    def delete(self, key: str, *, force: bool = False) -> bool:
        found = False
        for tier in self.tiers:
            found = tier.delete(key, force=force) or found
        with self._lock:
            self._pinned.discard(key)
        return found

    def pin(self, key: str) -> bool:
        """Keep ``key`` in every tier that holds it (and in copies made later)."""
        with self._lock:
            self._pinned.add(key)
        found = [tier.set_pinned(key, True) for tier in self.tiers]
        return any(found)

    def unpin(self, key: str) -> bool:
        with self._lock:
            self._pinned.discard(key)
        found = [tier.set_pinned(key, False) for tier in self.tiers]
        return any(found)

    def evict_expired(self) -> int:
        """Remove every entry older than the TTL from every tier; returns how many."""
        if self.ttl_s is None:
            return 0
        now, n = time.time(), 0
        for tier in self.tiers:
            for info in tier.scan():
                if now - info.created_at > self.ttl_s and tier.delete(info.key, force=True):
                    n += 1
        self.counters.expired += n
        return n

    def scan(self) -> Iterator[EntryInfo]:
        for tier in self.tiers:
            yield from tier.scan()

    def stats(self) -> dict[str, TierStats]:
        return {tier.name: tier.stats() for tier in self.tiers}

    def summary(self) -> dict[str, Any]:
        return {
            "store": vars(self.counters) | {"write_mode": self.write_mode},
            "tiers": {name: s.to_dict() for name, s in self.stats().items()},
        }

    def close(self) -> None:
        """Flush pending writes, stop the writer and close every tier."""
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._queue.put(None)
                self._writer.join()
                self._writer = None
            for tier in self.tiers:
                tier.close()

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
