"""``TieredStore``: the hierarchy (CPU → disk → …) behind one get/put API.

- Lookups walk the tiers fastest first; ``longest_prefix`` answers how many leading chunk
  keys are present anywhere.
- A hit in a lower tier is promoted to the top tier.
- Eviction from a tier demotes the victim to the next tier instead of dropping it.
- Writes: *write-through* copies every new object down in a background writer thread
  (``flush()`` waits for it); *write-back* copies only when an object is evicted or on
  ``flush()``. Either way an object leaves a tier only once the tier below has it.
- Overwrites: a put of a key that is already stored replaces it in *every* tier. The new
  object lands in the top tier at once and is marked dirty until it has been copied down
  (by the writer, an eviction or ``flush()``), which replaces the older copies below; until
  then reads in this process get the new object from the top tier. Under write-back an
  older copy on disk can therefore outlive a crash before ``flush()``, as any write-back
  cache's can; under write-through it is replaced within moments.
- Each tier has its codec; objects are transcoded when they move between tiers whose
  codecs differ.
- Integrity: every object handed out is the object of the key asked for, and one that
  cannot be decoded is a counted miss removed from every tier — never an exception
  to the caller and never another key's KV.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvcache.codecs.raw import canonical_view
from kvcache.codecs.registry import get_codec
from kvcache.kvstore import background
from kvcache.kvstore.container import KEYINGS, ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier, Loan
from kvcache.kvstore.errors import (
    ConfigError,
    CorruptObjectError,
    InvalidKeyError,
    KVCacheError,
    LayoutMismatchError,
    ObjectTooLargeError,
    StoreCorruptError,
    StoreFullError,
    UnencodableChunkError,
)
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tier import EntryInfo, EvictHandler, Tier, TierStats, check_object_key

if TYPE_CHECKING:
    from kvcache.kvstore.config import RemoteTierConfig, StoreConfig

log = logging.getLogger(__name__)

WRITE_MODES = ("write-through", "write-back")
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise InvalidKeyError(f"invalid key {key!r}: keys are 32 lowercase hex digits "
                              "(kvcache.kvstore.keys.chunk_tokens / content_key make them)")


def codec_for(layout: KVLayout, codec_name: str) -> str:
    """The codec a tier configured with ``codec_name`` uses for ``layout``'s chunks: a
    lossy codec would quantize an engine's opaque pages along the wrong axes, so those
    are stored with ``raw``."""
    if layout.page_format is not None and not get_codec(codec_name).lossless:
        return "raw"
    return codec_name


def transcode(obj: StoredObject, codec_name: str) -> StoredObject:
    """``obj`` re-encoded with ``codec_name`` (``obj`` itself when it already is)."""
    h = obj.header
    codec_name = codec_for(h.layout, codec_name)
    if h.codec == codec_name:
        return obj
    chunk = get_codec(h.codec).decode(obj.tensors, h.codec_params, h.layout, h.num_tokens)
    codec = get_codec(codec_name)
    tensors, params = codec.encode(chunk, h.layout, rope_start=h.rope_start)
    return StoredObject(dataclasses.replace(h, codec=codec_name, codec_params=params), tensors)


def _decode(obj: StoredObject) -> torch.Tensor:
    h = obj.header
    return get_codec(h.codec).decode(obj.tensors, h.codec_params, h.layout, h.num_tokens)


def _writable(tier: Tier) -> bool:
    return not getattr(tier, "readonly", False)


def _largest_object(tiers: Sequence[Tier]) -> float:
    """The largest object some writable tier could hold. A remote tier's capacity is 0
    until its server tells (a Redis without maxmemory never does): no bound known there."""
    caps = [t.capacity_bytes for t in tiers if _writable(t)]
    return math.inf if 0 in caps else max(caps)


def open_remote_tier(cfg: RemoteTierConfig, *, store_ttl: float | None = None) -> Tier:
    """The tier ``cfg.url`` names: the cache daemon (http, unix) or Redis (redis*)."""
    if cfg.url is not None and cfg.url.startswith("redis"):
        from kvcache.kvstore.redis_tier import RedisTier

        return RedisTier.from_config(cfg, store_ttl)
    from kvcache.kvstore.remote_tier import RemoteTier

    return RemoteTier.from_config(cfg)


@dataclass
class StoreCounters:
    """Store-level counters of this process (per-tier ones live in each ``TierStats``).

    ``lookups``: prefix lookups (``longest_prefix``); of the chunks they asked about,
    ``lookup_hit_chunks`` could be reused and ``lookup_miss_chunks`` could not (the first
    missing chunk and every chunk after it), likewise in tokens where the caller gave
    token counts. ``reads``: chunks asked of ``get*``; ``read_hits`` / ``read_misses``.
    ``corrupt``: objects that could not be used (wrong key, undecodable) and were removed.
    """

    lookups: int = 0
    lookup_hit_chunks: int = 0
    lookup_miss_chunks: int = 0
    lookup_hit_tokens: int = 0
    lookup_miss_tokens: int = 0
    reads: int = 0
    read_hits: int = 0
    read_misses: int = 0
    promotions: int = 0
    demotions: int = 0
    expired: int = 0
    corrupt: int = 0
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
        idle_writer: bool = False,
    ) -> None:
        """``idle_writer``: copy down on an idle-class thread (``background``; an eviction
        writes what it has not), for a store inside an engine, not a daemon's (starved
        by busy engines, it could hold the GIL its request threads wait for)."""
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
        # key -> created_at of its object put into the top tier and not yet copied below
        self._dirty: dict[str, float] = {}
        # keys being copied down now (how many copies), and those deleted meanwhile
        self._writing: dict[str, int] = {}
        self._deleted_while_written: set[str] = set()
        self._last_stamp = 0.0
        self._write_error: BaseException | None = None
        for i, tier in enumerate(self.tiers[:-1]):
            tier.set_evict_handler(self._demoter(i))
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        # The writer calls it before each copy down (a CPU engine's PagedWorker: its pauses).
        self.write_gate: Callable[[], None] | None = None
        if write_mode == "write-through" and len(self.tiers) > 1:
            self._writer = background.start(self._write_loop, "kvcache-writer",
                                            idle=idle_writer)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def open(cls, config: StoreConfig | None = None, *, shared_cpu: bool = False,
             idle_writer: bool = False) -> TieredStore:
        """CPU tier, plus the disk tier under the configured store directory, plus the
        remote tier ``store.remote.url`` names. ``shared_cpu``: the CPU pool in shared
        memory (the daemon's same-node fast path); ``idle_writer`` as in ``__init__``.

        ``config``: the store section; by default the one ``kvcache`` itself uses —
        defaults ← ``$KVCACHE_CONFIG`` ← ``KVCACHE_*`` variables (``KVCacheConfig.load``).
        """
        from kvcache.kvstore.config import KVCacheConfig

        config = config or KVCacheConfig.load().store
        tiers: list[Tier] = [
            CpuTier(config.cpu.capacity, policy=config.cpu.policy,
                    pin_memory=config.cpu.pin_memory, shared=shared_cpu)
        ]
        codecs = [config.cpu.codec]
        if config.disk.enabled:
            from kvcache.kvstore.disk_tier import DiskTier

            tiers.append(DiskTier(config.disk_path, config.disk.capacity,
                                  policy=config.disk.policy, readonly=config.readonly,
                                  blob_storage=config.disk.blob_storage,
                                  create=not config.readonly))
            codecs.append(config.disk.codec)
        if config.remote.url is not None:
            tiers.append(open_remote_tier(config.remote, store_ttl=config.ttl))
            codecs.append(config.remote.codec)
        return cls(tiers, codecs=codecs, write_mode=config.write_mode, ttl_s=config.ttl,
                   idle_writer=idle_writer)

    @classmethod
    def in_memory(cls, capacity_bytes: int = 1 << 30, *, policy: str = "lru") -> TieredStore:
        return cls([CpuTier(capacity_bytes, policy=policy)])

    # -- moving objects between tiers ----------------------------------------------------
    def _put_in(self, i: int, key: str, obj: StoredObject) -> None:
        err = self._put_many_in(i, [obj])[0]
        if err is not None:
            raise err

    def _put_many_in(self, i: int, objs: Sequence[StoredObject]) -> list[KVCacheError | None]:
        """Put each object into tier ``i`` in its codec; what kept each out (None: in)."""
        tier = self.tiers[i]
        out: list[KVCacheError | None] = [None] * len(objs)
        ready: list[tuple[int, StoredObject]] = []
        for j, obj in enumerate(objs):
            try:
                ready.append((j, transcode(obj, self.codecs[i])))
            except KVCacheError as e:
                out[j] = e
        results = tier.put_many([(o.header.key, o) for _, o in ready])
        for (j, o), err in zip(ready, results, strict=True):
            out[j] = err
            if err is None and o.header.key in self._pinned:
                tier.set_pinned(o.header.key, True)
        return out

    def _stamp(self) -> float:
        """A creation time, strictly increasing within this store: it names the version
        of an object (``_dirty``), so two puts of one key never share one."""
        with self._lock:
            self._last_stamp = max(time.time(), self._last_stamp + 1e-6)
            return self._last_stamp

    def _demoter(self, i: int) -> EvictHandler:
        def demote(key: str, obj: StoredObject) -> None:
            lower = self.tiers[i + 1]
            if not _writable(lower):
                return
            with self._lock:
                mark = self._dirty.get(key) if i == 0 else None
            if mark is not None and obj.header.created_at != mark:
                return  # an older copy than the one being put: that one is copied down
            if mark is None and lower.contains(key):
                return  # the tier below has this version already
            try:
                self._put_in(i + 1, key, obj)
            except (CorruptObjectError, UnencodableChunkError) as e:
                # cannot be decoded, or the lower tier's codec refuses it: it leaves the
                # store now, older copies below included (they are not this version)
                self.drop_corrupt(key, e)
                return
            self.counters.demotions += 1
            self._clean(key, mark)

        return demote

    def _clean(self, key: str, mark: float | None) -> None:
        """``key``'s top copy has reached the tier below, unless it was put again since."""
        if mark is not None:
            with self._lock:
                if self._dirty.get(key) == mark:
                    del self._dirty[key]

    def _write_loop(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                if (gate := self.write_gate) is not None:
                    gate()
                self._write_down(key)
            except BaseException as e:  # surfaced by flush(); the writer keeps going
                log.warning("background write of %s failed: %s", key, e)
                self.counters.write_errors += 1
                if self._write_error is None:
                    self._write_error = e
            finally:
                self._queue.task_done()

    def _write_down(self, key: str) -> None:
        """Copy ``key``'s dirty top-tier object to the tiers below (replacing older copies).
        A ``delete`` while it copies removes the copy it made."""
        with self._lock:
            mark = self._dirty.get(key)
            if mark is None or not _writable(self.tiers[1]):
                return
            self._writing[key] = self._writing.get(key, 0) + 1
        try:
            self._copy_down(key, mark)
        finally:
            with self._lock:
                left = self._writing.pop(key) - 1
                deleted = key in self._deleted_while_written
                if left:
                    self._writing[key] = left
                else:
                    self._deleted_while_written.discard(key)
            if deleted:
                for tier in self.tiers[1:]:
                    if _writable(tier):
                        tier.delete(key, force=True)

    def _copy_down(self, key: str, mark: float) -> None:
        top = self.tiers[0]
        # Copy out first (one memcpy) so the entry is referenced only briefly: holding it
        # for the whole disk write would keep it from being evicted and skew the policy.
        got = top.get(key, touch=False) if isinstance(top, CpuTier) else top.get(key)
        if got is None or got.header.created_at != mark:
            return  # evicted since (the demotion copied it down), or not landed yet
        try:
            self._put_in(1, key, got)
            # Deeper tiers never see new objects directly; replace any older copy.
            for j in range(2, len(self.tiers)):
                if _writable(self.tiers[j]) and self.tiers[j].contains(key):
                    self._put_in(j, key, got)
            self.counters.background_writes += 1
        except UnencodableChunkError as e:
            # The lower tiers' codec refuses it: it stays where it is, and no older copy
            # below may outlive it.
            log.warning("%s stays in the %s tier only: %s", key, top.name, e)
            for tier in self.tiers[1:]:
                if _writable(tier):
                    tier.delete(key, force=True)
        self._clean(key, mark)

    def flush(self) -> None:
        """Make everything written so far durable in the lowest tiers; re-raise write errors."""
        if len(self.tiers) > 1:
            if self._writer is not None:
                self._queue.join()
            else:
                with self._lock:
                    dirty = list(self._dirty)
                for key in dirty:
                    self._write_down(key)
        err, self._write_error = self._write_error, None
        if err is not None:
            raise KVCacheError(f"a background write failed: {err}") from err

    def flush_keys(self, keys: Sequence[str]) -> None:
        """Copy these keys' top-tier objects down now (what ``flush`` does for everything,
        without waiting for other writes queued meanwhile). Raises what the write raises."""
        if len(self.tiers) > 1:
            for key in keys:
                self._write_down(key)  # a no-op for a key already written down

    # -- public API ----------------------------------------------------------------------
    def put(
        self, key: str, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = 0,
        keying: str = "prefix",
    ) -> None:
        """Store a chunk (replacing what ``key`` held, in every tier). chunk: ``[layers, 2,
        tokens, kv_heads, head_dim]`` (MLA ``[layers, tokens, latent_dim]``) of
        ``layout.torch_dtype``, on any device; keying: how ``key`` names it
        (``ObjectHeader.keying``). The store keeps no reference to ``chunk``. Raises a
        ``KVCacheError`` and stores nothing on bad input (``InvalidKeyError``,
        ``LayoutMismatchError``, ``ObjectTooLargeError``, ``UnencodableChunkError`` from the
        codec)."""
        self._place(self._encode(key, chunk, layout, rope_start, keying))

    def _encode(self, key: str, chunk: torch.Tensor, layout: KVLayout, rope_start: int | None,
                keying: str) -> StoredObject:
        """``chunk`` as the top tier's object (``put``'s checks first)."""
        check_key(key)
        if not isinstance(layout, KVLayout):
            raise LayoutMismatchError(
                f"layout must be a KVLayout, got {type(layout).__name__}; build one with "
                "KVLayout(model_id, num_layers, num_kv_heads, head_dim, dtype=...)"
            )
        num_tokens = layout.check_chunk(chunk)
        if rope_start is not None and (not isinstance(rope_start, int) or rope_start < 0):
            raise LayoutMismatchError(f"rope_start must be an int >= 0 or None, got {rope_start!r}")
        if keying not in KEYINGS:
            raise InvalidKeyError(f"keying must be one of {KEYINGS}, got {keying!r}")
        raw = chunk.numel() * chunk.element_size()
        largest = _largest_object(self.tiers)
        if raw > largest:
            # Refused before the codec runs: encoding it would allocate all of it.
            raise ObjectTooLargeError(
                f"a chunk of {num_tokens} tokens ({raw} bytes) is larger than any tier "
                f"({largest} bytes); store smaller chunks (store.chunk_size) or raise the "
                "tiers' capacity"
            )
        codec = get_codec(codec_for(layout, self.codecs[0]))
        tensors, params = codec.encode(chunk, layout, rope_start=rope_start)
        return StoredObject(
            ObjectHeader(key, layout, num_tokens, codec.name, params, rope_start, self._stamp(),
                         keying),
            tensors,
        )

    def put_object(self, obj: StoredObject) -> None:
        """Store an already encoded object under its header's key (what a cache daemon
        receives). Its ``created_at`` is restamped: overwrites are ordered by this store's
        clock, not by the sender's. Raises like ``put`` on bad input and stores nothing."""
        self.check_object(obj)
        self._place(StoredObject(dataclasses.replace(obj.header, created_at=self._stamp()),
                                 obj.tensors))

    def check_object(self, obj: StoredObject) -> None:
        """The checks ``put_object`` makes before storing anything (a batch checks every
        object first, so that a bad one stores none)."""
        header = obj.header
        check_key(header.key)
        if header.rope_start is not None and header.rope_start < 0:
            raise LayoutMismatchError(f"rope_start must be >= 0 or None, got {header.rope_start}")
        get_codec(header.codec)  # an unknown codec is refused, not stored undecodable
        if not isinstance(header.num_tokens, int) or header.num_tokens <= 0:
            raise LayoutMismatchError(f"an object holds > 0 tokens, not {header.num_tokens!r}")
        if header.codec == "raw":
            try:
                canonical_view(obj.tensors, header.layout, header.num_tokens)
            except CorruptObjectError as e:
                raise LayoutMismatchError(f"the object says {header.num_tokens} tokens: {e}") \
                    from None
        largest = _largest_object(self.tiers)
        if obj.nbytes > largest:
            raise ObjectTooLargeError(
                f"an object of {obj.nbytes} bytes is larger than any tier ({largest} bytes)")

    def _place(self, obj: StoredObject) -> None:
        err = self._place_many([obj])[0]
        if err is not None:
            raise err

    def _place_many(self, objs: Sequence[StoredObject]) -> list[KVCacheError | None]:
        """Put each object into the top tier that takes it and queue its copy down;
        returns what kept each out (None: stored). Keys are distinct."""
        keys = [o.header.key for o in objs]
        marked = len(self.tiers) > 1 and _writable(self.tiers[1])
        with self._lock:
            # Marked before they land: an eviction of one must already know to copy it down.
            before = [self._dirty.get(key) for key in keys]
            if marked:
                for key, obj in zip(keys, objs, strict=True):
                    self._dirty[key] = obj.header.created_at
        out: list[KVCacheError | None] = [None] * len(objs)
        landed: list[int | None] = [None] * len(objs)
        try:
            pending = list(range(len(objs)))
            for i, tier in enumerate(self.tiers):
                if not pending:
                    break
                if not _writable(tier):
                    continue
                errors = self._put_many_in(i, [objs[j] for j in pending])
                retry = []
                for j, err in zip(pending, errors, strict=True):
                    if err is None:
                        landed[j] = i
                    elif isinstance(err, StoreFullError) and i < len(self.tiers) - 1:
                        # A top tier full of pinned entries (or too small for this object)
                        # must not lose the write: the tier below takes it directly.
                        log.debug("%s tier cannot take %s (%s); writing it to the next tier",
                                  tier.name, keys[j], err)
                        retry.append(j)
                    else:
                        out[j] = err
                pending = retry
            assert not pending, "the lowest tier is read-only"
        finally:
            with self._lock:
                for key, obj, old, at in zip(keys, objs, before, landed, strict=True):
                    if marked and self._dirty.get(key) == obj.header.created_at and at != 0:
                        if old is None or at is not None:
                            del self._dirty[key]
                        else:
                            self._dirty[key] = old  # nothing stored: the old mark stands
            for key, top in zip(keys, landed, strict=True):
                if top is None:
                    continue
                for tier in self.tiers[:top]:  # an older copy above must not shadow it
                    tier.delete(key, force=True)
                if top == 0 and self._writer is not None:
                    self._queue.put(key)
        return out

    def put_many(
        self,
        items: Sequence[tuple[str, torch.Tensor]],
        layout: KVLayout,
        *,
        rope_starts: Sequence[int | None] | None = None,
    ) -> list[KVCacheError | None]:
        """Store chunks as ``put`` does, in one batch; returns what kept each out (None:
        stored), such as a full store. Bad input (``put``'s checks, for every item) raises
        and stores nothing. A key given twice stores its last chunk. Each tier takes its
        part of the batch at once (``Tier.put_many``): the CPU tier in one hold of its lock
        and few copies, a daemon in a few requests."""
        if not isinstance(layout, KVLayout):
            raise LayoutMismatchError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if rope_starts is not None and len(rope_starts) != len(items):
            raise LayoutMismatchError(
                f"{len(rope_starts)} rope_starts for {len(items)} chunks; give one per chunk")
        starts = [0] * len(items) if rope_starts is None else list(rope_starts)
        objs = [self._encode(key, chunk, layout, start, "prefix")
                for (key, chunk), start in zip(items, starts, strict=True)]
        last = {obj.header.key: j for j, obj in enumerate(objs)}
        todo = sorted(last.values())
        errors = self._place_many([objs[j] for j in todo])
        done = dict(zip(todo, errors, strict=True))
        return [done[last[obj.header.key]] for obj in objs]

    def expired(self, header: ObjectHeader) -> bool:
        """True when ``header``'s object is older than the store's TTL."""
        return self.ttl_s is not None and time.time() - header.created_at > self.ttl_s

    def get_objects(
        self, keys: Sequence[str], *, from_tier: int = 0, promote: bool = True
    ) -> list[StoredObject | None]:
        """Stored objects from the fastest tier holding each key, in order (None: miss).

        Each tier is asked once for all keys still missing, so a slow tier reads them
        concurrently; hits in a lower tier are promoted to the top tier (if the store
        promotes and ``promote``: a caller whose engine caches what it reads itself may
        skip the copy). ``from_tier`` skips the tiers above it (a caller that already
        asked them).
        """
        for key in keys:
            check_key(key)
        out: list[StoredObject | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for i, tier in enumerate(self.tiers):
            if i < from_tier:
                continue
            if not pending:
                break
            try:
                got = tier.get_many([keys[j] for j in pending])
            except StoreCorruptError:  # a damaged tier: everything it holds is a miss
                got = [None] * len(pending)
            still: list[int] = []
            for j, obj in zip(pending, got, strict=True):
                if obj is None:
                    still.append(j)
                    continue
                try:  # whatever a tier hands out is checked, remote ones included
                    check_object_key(keys[j], obj.header)
                except CorruptObjectError as e:
                    self.drop_corrupt(keys[j], e)
                    still.append(j)
                    continue
                if self.expired(obj.header):
                    self.counters.expired += 1
                    self.delete(keys[j], force=True, cause="ttl")
                else:
                    out[j] = obj
                    if i > 0 and self.promote and promote:
                        self._promote(keys[j], obj)
            pending = still if i + 1 < len(self.tiers) else []
        hits = sum(o is not None for o in out)
        self.counters.reads += len(keys)
        self.counters.read_hits += hits
        self.counters.read_misses += len(keys) - hits
        return out

    def lend(self, keys: Sequence[str], *, below: bool = True) -> list[Loan | None]:
        """The top tier's entries of ``keys``, lent in place (None: a miss). Keys held only
        below are promoted first, or left as None with ``below=False`` (for the caller to
        read with ``get_objects(from_tier=1)``). The top tier must be a ``CpuTier``; every
        loan must go back through ``self.tiers[0].release``. What a daemon serves without
        a copy."""
        top = self.tiers[0]
        if not isinstance(top, CpuTier):
            raise ConfigError("lending needs a CPU tier on top")
        for key in keys:
            check_key(key)
        loans: list[Loan | None] = []
        for key in keys:
            loan = top.lend(key)
            if loan is not None and self.expired(loan.header):
                top.release(loan)
                self.counters.expired += 1
                self.delete(key, force=True, cause="ttl")
                loan = None
            loans.append(loan)
        missing = [i for i, loan in enumerate(loans) if loan is None]
        self.counters.reads += len(keys) - len(missing)
        self.counters.read_hits += len(keys) - len(missing)
        if missing and below:  # counted by get_objects
            got = self.get_objects([keys[i] for i in missing], from_tier=1)
            for i, obj in zip(missing, got, strict=True):
                if obj is not None:  # promoted (unless the top tier had no room)
                    loans[i] = top.lend(keys[i], touch=False)
        return loans

    def drop_corrupt(self, key: str, e: Exception) -> None:
        """``key``'s object cannot be used (``e`` says why): remove it from every tier and
        count it, so later lookups stop finding it."""
        log.warning("dropping %s: %s", key, e)
        self.counters.corrupt += 1
        for tier in self.tiers:
            try:
                tier.delete(key, force=True)
            except KVCacheError as err:  # a read-only or damaged tier keeps its copy
                log.debug("could not remove %s from the %s tier: %s", key, tier.name, err)

    def _promote(self, key: str, obj: StoredObject) -> None:
        try:
            self._put_in(0, key, obj)
            self.counters.promotions += 1
        except KVCacheError as e:  # a full top tier must not fail the read
            log.debug("promotion of %s skipped: %s", key, e)

    def get_object(self, key: str) -> StoredObject | None:
        return self.get_objects([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """Chunks under ``keys``, decoded to ``[layers, 2, tokens, kv_heads, head_dim]``;
        None for a miss (including an object that fails to decode: it is removed)."""
        out: list[torch.Tensor | None] = []
        for obj in self.get_objects(keys):
            out.append(None if obj is None else self.decode(obj))
        return out

    def decode(self, obj: StoredObject) -> torch.Tensor | None:
        """``obj``'s chunk, or None (counted, removed) if it cannot be decoded."""
        try:
            return _decode(obj)
        except CorruptObjectError as e:
            self.drop_corrupt(obj.header.key, e)
            self.counters.read_hits -= 1
            self.counters.read_misses += 1
            return None

    def get(self, key: str) -> torch.Tensor | None:
        """The chunk under ``key``, decoded to ``[layers, 2, tokens, kv_heads, head_dim]``."""
        return self.get_many([key])[0]

    def where(self, key: str) -> str | None:
        check_key(key)
        for tier in self.tiers:
            if tier.contains(key):
                return tier.name
        return None

    def contains(self, key: str) -> bool:
        return self.where(key) is not None

    def longest_prefix(
        self, keys: Sequence[str], *, num_tokens: Sequence[int] | None = None
    ) -> int:
        """How many leading ``keys`` are present in some tier (prefix keys chain, so a
        missing chunk ends the usable prefix). Counts the lookup: the chunks it cannot
        serve are misses in every tier; ``num_tokens`` (one count per key) adds tokens."""
        if num_tokens is not None and len(num_tokens) != len(keys):
            raise LayoutMismatchError(
                f"{len(num_tokens)} token counts for {len(keys)} keys; give one per key")
        n = self._present_prefix(keys)
        tokens = list(num_tokens) if num_tokens is not None else [0] * len(keys)
        missed, missed_tokens = len(keys) - n, sum(tokens[n:])
        c = self.counters
        c.lookups += 1
        c.lookup_hit_chunks += n
        c.lookup_miss_chunks += missed
        c.lookup_hit_tokens += sum(tokens[:n])
        c.lookup_miss_tokens += missed_tokens
        if missed:
            for tier in self.tiers:
                tier.count_misses(missed, missed_tokens)
        return n

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Which of ``keys`` some tier holds, asking each tier once about the keys the
        tiers above it lack. Not counted as lookups."""
        for key in keys:
            check_key(key)
        present = [False] * len(keys)
        for tier in self.tiers:
            missing = [i for i, held in enumerate(present) if not held]
            if not missing:
                break
            for i, held in zip(missing, tier.contains_many([keys[i] for i in missing]),
                               strict=True):
                present[i] = held
        return present

    def _present_prefix(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` some tier holds, asking each tier once about the keys
        the tiers above it lack (one round trip to a remote tier, not one per key)."""
        for key in keys:
            check_key(key)
        present = [False] * len(keys)
        for tier in self.tiers:
            n = present.index(False) if False in present else len(keys)
            missing = [i for i in range(n, len(keys)) if not present[i]]
            if not missing:
                break
            for i, held in zip(missing, tier.contains_many([keys[i] for i in missing]),
                               strict=True):
                present[i] = held
        return present.index(False) if False in present else len(keys)

    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        """Remove ``key`` from every tier; ``cause`` as in ``Tier.delete``."""
        check_key(key)
        # Before the tiers: a copy down that finishes between their deletes and this
        # would otherwise bring the key back below.
        with self._lock:
            self._pinned.discard(key)
            self._dirty.pop(key, None)
            if key in self._writing:  # a copy down under way must not bring it back
                self._deleted_while_written.add(key)
        found = False
        for tier in self.tiers:
            if _writable(tier):
                found = tier.delete(key, force=force, cause=cause) or found
        return found

    def pin(self, key: str) -> bool:
        """Keep ``key`` in every tier that holds it (and in copies made later)."""
        check_key(key)
        with self._lock:
            self._pinned.add(key)
        found = [tier.set_pinned(key, True) for tier in self.tiers if _writable(tier)]
        return any(found)

    def unpin(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            self._pinned.discard(key)
        found = [tier.set_pinned(key, False) for tier in self.tiers if _writable(tier)]
        return any(found)

    def evict_expired(self) -> int:
        """Remove every entry older than the TTL from every tier; returns how many."""
        if self.ttl_s is None:
            return 0
        now, n = time.time(), 0
        for tier in self.tiers:
            if not _writable(tier):
                continue
            for info in tier.scan():
                if now - info.created_at > self.ttl_s and \
                        tier.delete(info.key, force=True, cause="ttl"):
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
        self.write_gate = None
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
