"""SGLang HiCache storage backend: kvcache as SGLang's L3 (host memory → kvcache).

Run SGLang with::

    --enable-hierarchical-cache --hicache-mem-layout page_first
    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvcache",
        "module_path": "kvcache.connectors.sglang", "class_name": "KVCacheHiCacheStorage",
        "interface_v1": 1, "model_path": "/path/to/model", ...kvcache config keys...}'

``interface_v1: 1`` makes SGLang move pages through ``batch_get_v1``/``batch_set_v1``: one
strided copy between SGLang's host pool and kvcache's CPU tier, no intermediate page. The
other keys (besides ``backend_name``, ``module_path``, ``class_name`` and SGLang's own
``prefetch_*``, ``hicache_storage_pass_prefix_keys`` and ``tp_lcm_size``) are kvcache config
keys, nested or dotted, as the vLLM connector takes them (``connectors/engine_store.py``),
plus ``model_path``: the model directory or hub id whose ``config.json`` gives the layout
(defaults to SGLang's served model name). Unknown keys are refused with the nearest known
one. With ``connector.server`` the store is the node's ``kvcache serve`` daemon.

Keys. SGLang hands a backend page hashes, never tokens: page ``i`` of a request is
``h_i = sha256(h_{i-1} || tokens_i)``. Each page is stored as one kvcache object under
``page_chain_key(layout fingerprint, h_i)`` (``kvstore/keys.py``), which names the page's
tokens and all before them, for this model and layout. Pages are not gathered into larger
chunks: SGLang does not say where in a request a page sits unless asked to
(``hicache_storage_pass_prefix_keys``), and a page stored alone is found by any request
that shares its prefix. vLLM and transformers key their chunks the same way under
``store.key_scheme = "sglang"`` with ``store.chunk_size`` equal to SGLang's ``--page-size``
and the same ``connector.model_id``: then each engine loads what the others stored.

Tensor parallelism: MHA pages hold this rank's KV heads, so the layout (and every key)
names the rank. MLA KV is the same on every rank: it is keyed once (rank 0 of 1), only
SGLang's storage writer (rank 0) stores it, and every rank reads it.

Failures never reach SGLang's prefetch and write-back threads: a page that cannot be
read or written is a miss (``False``), logged and counted in ``get_stats``/``stats``; a
daemon that is down answers misses within ``store.remote.timeout``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

from kvcache.connectors import engine_store
from kvcache.connectors.hf import layout_from_hf_config
from kvcache.connectors.sglang_pages import HostPages
from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import (
    ConfigError,
    KVCacheError,
    LayoutMismatchError,
    StoreUnavailableError,
)
from kvcache.kvstore.keys import page_chain_key
from kvcache.kvstore.layout import AttentionKind, KVLayout, dtype_names
from kvcache.kvstore.remote_tier import RemoteTier
from kvcache.kvstore.strided_copy import copy_many

log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(level: int, msg: str, *args: Any) -> None:
    """Log ``msg`` once per process (each rank's backend would repeat it)."""
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg, *args)

# Extra-config keys SGLang reads itself (some it removes before we see them, some not).
_SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1",
                "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
                "hicache_storage_pass_prefix_keys", "tp_lcm_size")
T = TypeVar("T")
# Pages smaller than this (tokens) are mostly per-object cost (kvcache bench sglang).
SMALL_PAGE = 16


@dataclasses.dataclass
class SGLangStats:
    """What the backend did since it started. ``*_pages`` count SGLang pages; a failed
    page is one that could not be read or written (a miss to SGLang)."""

    exists_calls: int = 0
    exists_pages: int = 0
    exists_hit_pages: int = 0
    get_pages: int = 0
    get_hit_pages: int = 0
    get_bytes: int = 0
    get_seconds: float = 0.0
    set_pages: int = 0
    set_skipped_pages: int = 0  # already stored (by this engine or another): not rewritten
    set_bytes: int = 0
    set_seconds: float = 0.0
    failed_gets: int = 0
    failed_sets: int = 0
    errors: int = 0  # calls that raised inside kvcache (answered as misses)


def sglang_layout(storage_config: HiCacheStorageConfig, pages: HostPages,
                  dtype: torch.dtype, config: KVCacheConfig, model_path: str | None
                  ) -> KVLayout:
    """The ``KVLayout`` of this rank's pages. MHA: the model's layout as the transformers
    and vLLM connectors derive it from ``model_path``'s config (so that all three key the
    same tokens alike), with this rank's share of the KV heads. MLA: rank-replicated latent
    vectors. ``LayoutMismatchError`` when the pool and the model disagree."""
    # Each of these ranks holds a slice of every page that the layout could not name.
    for name in ("pp_size", "attn_cp_size", "dcp_size"):
        if getattr(storage_config, name, 1) > 1:
            raise LayoutMismatchError(
                f"kvcache does not store SGLang pages split by {name} > 1 yet "
                "(pipeline, attention context or decode context parallelism)")
    model_id = config.connector.model_id or model_path or storage_config.model_name
    if not model_id:
        raise ConfigError("name the model: set model_path or connector.model_id in "
                          "--hicache-storage-backend-extra-config")
    if dtype not in dtype_names():
        raise LayoutMismatchError(
            f"kvcache does not store SGLang's {dtype} KV pools yet (fp8 and fp4 KV caches "
            "are kept as bytes); run SGLang with --kv-cache-dtype auto")
    if pages.is_mla:
        return KVLayout(model_id=model_id, num_layers=pages.num_layers, num_kv_heads=1,
                        head_dim=pages.head_dim, dtype=dtype_names()[dtype],
                        attention=AttentionKind.MLA, latent_dim=pages.head_dim, rope=None)
    tp = storage_config.tp_size
    if model_path is None:
        _log_once(logging.WARNING, "kvcache: no model_path in the extra config, so the "
                  "layout has no RoPE parameters; SGLang engines share these pages, vLLM "
                  "and transformers do not")
        return KVLayout(model_id=model_id, num_layers=pages.num_layers,
                        num_kv_heads=pages.num_heads, head_dim=pages.head_dim,
                        dtype=dtype_names()[dtype], rope=None,
                        tp_rank=storage_config.tp_rank, tp_size=tp)
    from transformers import AutoConfig

    layout = layout_from_hf_config(AutoConfig.from_pretrained(model_path), dtype, model_id)
    heads = layout.num_kv_heads // tp if layout.num_kv_heads >= tp else 1
    if (layout.num_layers, heads, layout.head_dim) != (pages.num_layers, pages.num_heads,
                                                       pages.head_dim):
        raise LayoutMismatchError(
            f"SGLang's host pool holds {pages.num_layers} layers of {pages.num_heads} heads "
            f"x {pages.head_dim}, the config of {model_path} {layout.num_layers} layers of "
            f"{heads} heads x {layout.head_dim} per rank of {tp} (a speculative decoding "
            "draft's layers in the same pool are not supported yet)")
    return dataclasses.replace(layout, num_kv_heads=heads, tp_rank=storage_config.tp_rank,
                               tp_size=tp)


class KVCacheHiCacheStorage(HiCacheStorage):
    """The backend (see the module docstring). SGLang creates it as
    ``cls(storage_config, kwargs)`` and then calls ``register_mem_pool_host``."""

    def __init__(self, storage_config: HiCacheStorageConfig,
                 kwargs: dict[str, Any] | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        for key in _SGLANG_KEYS:
            extra.pop(key, None)
        self.model_path: str | None = extra.pop("model_path", None)
        self.config = engine_store.connector_config(extra)
        self.storage_config = storage_config
        # MLA KV is the same on every rank: one rank (SGLang's storage writer) stores it.
        self.writes = storage_config.is_storage_writer
        self.store = engine_store.acquire(self.config)
        self._closed = False
        self.pages: HostPages | None = None
        self.layout: KVLayout | None = None
        self.counters = SGLangStats()
        self._reported = SGLangStats()  # the counters as of the last get_stats
        self._lock = threading.Lock()  # counters: prefetch and write-back threads share them
        self._warned: set[str] = set()

    # -- set-up -------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        if not isinstance(mem_pool_host.kv_buffer, torch.Tensor):
            raise LayoutMismatchError(
                f"kvcache reads SGLang host pools with one K/V buffer; "
                f"{type(mem_pool_host).__name__} keeps K and V apart (K and V of different "
                "head sizes): not supported yet")
        self.pages = HostPages(mem_pool_host.kv_buffer, mem_pool_host.layout,
                               mem_pool_host.page_size, self.storage_config.is_mla_model)
        self.layout = sglang_layout(self.storage_config, self.pages, mem_pool_host.dtype,
                                    self.config, self.model_path)
        if (self.pages.is_mla and self.storage_config.tp_size > 1
                and self.config.connector.server is None):
            _log_once(logging.WARNING, "kvcache: MLA pages are stored by rank 0 only; with an "
                      "embedded store the other ranks (other processes) see them once they "
                      "reach the disk tier, and SGLang uses the smallest rank's hits. Set "
                      "connector.server (the node's kvcache serve) to share one cache")
        if self.pages.page_size < SMALL_PAGE:
            _log_once(logging.WARNING, "kvcache stores each SGLang page as one object, and "
                      "pages of %d tokens cost more in bookkeeping than in copying; run "
                      "SGLang with --page-size 64 (or at least %d)", self.pages.page_size,
                      SMALL_PAGE)
        log.info("kvcache HiCache backend: model %s, layout %s (rank %d of %d), %s pages of "
                 "%d tokens, store %s", self.layout.model_id, self.layout.fingerprint,
                 self.layout.tp_rank, self.layout.tp_size, self.pages.layout,
                 self.pages.page_size, self.config.connector.server or self.config.store.dir)

    def on_host_pools_registered(self) -> None:
        """Refuse models with pools besides KV (Mamba or sliding-window state, DSA
        indexers, a speculative draft's KV): kvcache cannot hold their pages, so every
        prefix would miss while its KV pages were written for nothing."""
        others = sorted(str(name) for name in getattr(self, "registered_pools", {})
                        if str(name) != str(PoolName.KV))
        if others:
            raise ConfigError(
                f"kvcache stores SGLang's KV pool only; this model also has the pools "
                f"{', '.join(others)}, whose pages kvcache cannot hold: use another "
                "--hicache-storage-backend for it")

    def close(self) -> None:
        """Release the store (SGLang calls this when it detaches the backend)."""
        if not self._closed:
            self._closed = True
            engine_store.release(self.store)

    # -- keys ---------------------------------------------------------------------------
    def _ready(self) -> tuple[HostPages, KVLayout]:
        if self.pages is None or self.layout is None:
            raise KVCacheError("SGLang has not registered its host pool with kvcache yet")
        return self.pages, self.layout

    def _keys(self, page_hashes: Sequence[str]) -> list[str]:
        _, layout = self._ready()
        return [page_chain_key(layout.fingerprint, h) for h in page_hashes]

    def _guard(self, what: str, n: int, fallback: T, fn: Callable[[], T]) -> T:
        """``fn()``, or ``fallback`` (misses for SGLang) when it raises: SGLang's storage
        threads must never see an exception from a backend."""
        try:
            return fn()
        except Exception as e:  # every failure is a miss, by contract
            with self._lock:
                self.counters.errors += 1
                if what.startswith("get"):
                    self.counters.failed_gets += n
                elif what.startswith("set"):
                    self.counters.failed_sets += n
            if isinstance(e, KVCacheError):
                log.warning("kvcache %s of %d pages failed: %s", what, n, e)
            else:
                log.exception("kvcache %s of %d pages failed", what, n)
            return fallback

    # -- the zero-copy page API (interface_v1) ------------------------------------------
    def batch_exists(self, keys: list[str],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages the store holds: one lookup (one round trip to a
        daemon), whatever the number of pages."""
        def run() -> int:
            pages, _ = self._ready()
            n = self.store.longest_prefix(self._keys(keys),
                                          num_tokens=[pages.page_size] * len(keys))
            with self._lock:
                self.counters.exists_calls += 1
                self.counters.exists_pages += len(keys)
                self.counters.exists_hit_pages += n
            return n
        return self._guard("lookup", 0, 0, run)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read ``keys``' pages into the host pool at ``host_indices`` (token slots,
        ``len(keys) * page_size`` of them, page by page)."""
        return self._guard("get", len(keys), [False] * len(keys),
                           lambda: self._get_into(keys, self._slots(keys, host_indices)))

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` under ``keys``."""
        def run() -> list[bool]:
            pages, _ = self._ready()
            slots = self._slots(keys, host_indices)
            return self._put([pages.chunk_view(s) for s in slots], keys, extra_info)
        return self._guard("set", len(keys), [False] * len(keys), run)

    def _slots(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[int]:
        """Each page's first token slot."""
        pages, _ = self._ready()
        p = pages.page_size
        if host_indices.numel() != len(keys) * p:
            raise LayoutMismatchError(
                f"{host_indices.numel()} host slots for {len(keys)} pages of {p} tokens")
        return host_indices.reshape(-1)[::p].tolist()

    def _get_into(self, keys: Sequence[str], slots: Sequence[int]) -> list[bool]:
        pages, _ = self._ready()
        return self._read(keys, [pages.chunk_view(s) for s in slots])

    def _read(self, keys: Sequence[str], targets: Sequence[torch.Tensor]) -> list[bool]:
        """Decode ``keys``' objects into ``targets`` (canonical chunk views). Lent from a
        CPU tier on top, so a hit there costs one copy; from below or from a daemon, the
        object is fetched, then decoded into place."""
        pages, layout = self._ready()
        t0 = time.perf_counter()
        ckeys = self._keys(keys)
        done = [False] * len(keys)
        top = self.store.tiers[0]
        below, from_tier = list(range(len(keys))), 0
        if isinstance(top, CpuTier):
            # Pages read from below are not promoted into the CPU tier: SGLang's host pool
            # is the cache above kvcache, a second copy here would only cost a copy.
            loans = self.store.lend(ckeys, below=False)
            try:
                lent = [(i, self._chunk(top.lent_object(loan), targets[i], layout))
                        for i, loan in enumerate(loans) if loan is not None]
                placed = [(i, chunk) for i, chunk in lent if chunk is not None]
                copy_many([targets[i] for i, _ in placed], [chunk for _, chunk in placed])
                for i, _ in placed:
                    done[i] = True
            finally:
                for loan in loans:
                    if loan is not None:
                        top.release(loan)
            below = [i for i, loan in enumerate(loans) if loan is None]
            from_tier = 1
        if below:
            objs = self.store.get_objects([ckeys[i] for i in below], from_tier=from_tier,
                                          promote=False)
            for i, obj in zip(below, objs, strict=True):
                if obj is not None:
                    done[i] = self._place(obj, targets[i], layout)
        hits = sum(done)
        with self._lock:
            c = self.counters
            c.get_pages += len(keys)
            c.get_hit_pages += hits
            c.get_bytes += hits * pages.page_bytes
            c.get_seconds += time.perf_counter() - t0
            c.failed_gets += len(keys) - hits
        return done

    def _place(self, obj: Any, target: torch.Tensor, layout: KVLayout) -> bool:
        """Write ``obj``'s chunk into ``target``; False (a miss) if ``_chunk`` finds none."""
        chunk = self._chunk(obj, target, layout)
        if chunk is None:
            return False
        target.copy_(chunk)
        return True

    def _chunk(self, obj: Any, target: torch.Tensor, layout: KVLayout) -> torch.Tensor | None:
        """``obj``'s chunk (a view, for ``raw``), or None (a miss) if it is not one page of
        this layout or cannot be decoded."""
        if ((obj.header.layout is not layout and obj.header.layout != layout)
                or obj.header.num_tokens != target.shape[layout.token_dim]):
            self._warn_once("shape", "kvcache: an object under an SGLang page key holds %d "
                            "tokens of layout %s, not one page of %s; treated as a miss",
                            obj.header.num_tokens, obj.header.layout.fingerprint,
                            layout.fingerprint)
            return None
        return self.store.decode(obj)

    def _put(self, chunks: Sequence[torch.Tensor], keys: Sequence[str],
             extra_info: HiCacheStorageExtraInfo | None) -> list[bool]:
        """Store canonical chunk views under ``keys``' page keys. A page whose put fails
        is a False; the others are stored."""
        pages, layout = self._ready()
        if not self.writes:  # not the storage writer of rank-replicated (MLA) KV
            return [True] * len(keys)
        t0 = time.perf_counter()
        # Where the pages sit, when SGLang says (hicache_storage_pass_prefix_keys).
        first = None
        if extra_info is not None and extra_info.prefix_keys is not None:
            first = len(extra_info.prefix_keys) * pages.page_size
        ckeys = self._keys(keys)
        starts = [None if first is None else first + i * pages.page_size
                  for i in range(len(keys))]
        # Pages already stored (by this engine or another) are not written again.
        out = self.store.contains_many(ckeys)
        todo = [i for i, held in enumerate(out) if not held]
        # One batch: the CPU tier takes it under one lock, runs of pages in one strided
        # copy; a daemon in a few requests. A daemon that cannot take them fails open
        # (counted, not reported per page): compare the count.
        top = self.store.tiers[0]
        remote = top if isinstance(top, RemoteTier) else None
        errors_before = remote.failed_requests if remote is not None else 0
        try:
            errors = self.store.put_many([(ckeys[i], chunks[i]) for i in todo], layout,
                                         rope_starts=[starts[i] for i in todo])
        except KVCacheError as e:  # bad input: nothing stored
            errors = [e] * len(todo)
        if remote is not None and remote.failed_requests != errors_before:
            errors = [err or StoreUnavailableError("the daemon did not answer")
                      for err in errors]
        for i, err in zip(todo, errors, strict=True):
            out[i] = err is None
        if any(errors):
            log.warning("kvcache could not store %d of %d SGLang pages: %s",
                        sum(map(bool, errors)), len(todo), next(e for e in errors if e))
        stored = sum(out[i] for i in todo)
        with self._lock:
            c = self.counters
            c.set_pages += stored
            c.set_skipped_pages += len(keys) - len(todo)
            c.set_bytes += stored * pages.page_bytes
            c.set_seconds += time.perf_counter() - t0
            c.failed_sets += len(todo) - stored
        return out

    # -- the multi-pool API (v2): kvcache stores the KV pool ----------------------------
    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None
                        ) -> PoolTransferResult:
        others = [t for t in pool_transfers or [] if t.name != PoolName.KV]
        for t in others:
            self._warn_once(str(t.name), "kvcache stores SGLang's KV pool only; the %s "
                            "pool's pages are misses", t.name)
        n = self.batch_exists(keys, extra_info)
        # A prefix needs every pool's pages: without the other pools' there is none.
        return PoolTransferResult(0 if others else n, {str(t.name): 0 for t in others})

    def batch_get_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None
                     ) -> dict[str, list[bool]]:
        return self._per_pool(transfers, extra_info, self.batch_get_v1)

    def batch_set_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None
                     ) -> dict[str, list[bool]]:
        return self._per_pool(transfers, extra_info, self.batch_set_v1)

    def _per_pool(self, transfers: list[PoolTransfer], extra_info: Any,
                  kv_op: Callable[..., list[bool]]) -> dict[str, list[bool]]:
        out: dict[str, list[bool]] = {}
        for t in transfers:
            keys = list(t.keys or [])
            if t.name == PoolName.KV and t.host_indices is not None:
                out[str(t.name)] = kv_op(keys, t.host_indices, extra_info)
            else:
                self._warn_once(str(t.name), "kvcache stores SGLang's KV pool only; the %s "
                                "pool's pages are misses", t.name)
                out[str(t.name)] = [False] * len(keys)
        return out

    # -- the page-copy API (without interface_v1): SGLang's flat data pages -------------
    def get(self, key: str, target_location: Any | None = None,
            target_sizes: Any | None = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[torch.Tensor | None]:
        """Each page as SGLang's flat data page (into ``target_locations`` when given)."""
        def run() -> list[torch.Tensor | None]:
            pages, _ = self._ready()
            flats = list(target_locations) if target_locations is not None else [
                torch.empty(pages.page_shape, dtype=pages.kv_buffer.dtype).view(-1)
                for _ in keys]
            done = self._read(keys, [pages.flat_view(f) for f in flats])
            return [f if ok else None for f, ok in zip(flats, done, strict=True)]
        return self._guard("get", len(keys), [None] * len(keys), run)

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None,
                  target_locations: Any | None = None, target_sizes: Any | None = None
                  ) -> bool:
        """Store SGLang's flat data pages ``values`` under ``keys``; True if all were."""
        def run() -> bool:
            pages, _ = self._ready()
            if values is None or len(values) != len(keys):
                raise LayoutMismatchError(f"{len(keys)} keys need as many flat pages")
            return all(self._put([pages.flat_view(v) for v in values], keys, None))
        return self._guard("set", len(keys), False, run)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        """SGLang's "clear storage": removes this model's entries (its ``model_id``) from
        every tier, those other engines stored for the same model included (they share
        them); other models' entries stay. ``kvcache evict`` removes more selectively."""
        def run() -> None:
            _, layout = self._ready()
            keys = {e.key for e in self.store.scan() if e.model_id == layout.model_id}
            removed = sum(self.store.delete(k, force=True, cause="admin") for k in keys)
            log.info("kvcache removed %d entries of %s on SGLang's clear", removed,
                     layout.model_id)
        self._guard("clear", 0, None, run)

    # -- observability ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """This backend's counters and the store's per-tier figures."""
        with self._lock:
            out: dict[str, Any] = dataclasses.asdict(self.counters)
        out["tiers"] = {name: dataclasses.asdict(s) for name, s in self.store.stats().items()}
        return out

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics``: pages and GB/s of the reads and writes since the
        last call. SGLang asks on every scheduler step, so this reads the backend's own
        counters only (no tier, no daemon); ``stats()`` has the tiers' figures. None
        where SGLang's metrics do not import (or on any error)."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics

            metrics = StorageMetrics()
            pages_read, pages_written, read_bw, write_bw = self.metrics_since_last()
            metrics.prefetch_pgs.extend(pages_read)
            metrics.backup_pgs.extend(pages_written)
            metrics.prefetch_bandwidth.extend(read_bw)
            metrics.backup_bandwidth.extend(write_bw)
            return metrics
        except Exception:  # metrics must never fail SGLang's step
            return None

    def metrics_since_last(self) -> tuple[list[int], list[int], list[float], list[float]]:
        """(pages read, pages written, read GB/s, write GB/s) since the last call, each a
        list of one figure or empty when nothing moved, as ``StorageMetrics`` holds them."""
        with self._lock:
            c, last = dataclasses.replace(self.counters), self._reported
            self._reported = c
        out: tuple[list[int], list[int], list[float], list[float]] = ([], [], [], [])
        for pages, nbytes, secs, pg_out, bw_out in (
                (c.get_hit_pages - last.get_hit_pages, c.get_bytes - last.get_bytes,
                 c.get_seconds - last.get_seconds, out[0], out[2]),
                (c.set_pages - last.set_pages, c.set_bytes - last.set_bytes,
                 c.set_seconds - last.set_seconds, out[1], out[3])):
            if pages:
                pg_out.append(pages)
                bw_out.append(nbytes / secs / 1e9 if secs > 0 else 0.0)
        return out

    def _warn_once(self, what: str, msg: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(msg, *args)
