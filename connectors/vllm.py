"""vLLM V1 connector: ``--kv-transfer-config '{"kv_connector": "KVCacheConnector",
"kv_connector_module_path": "kvcache.connectors.vllm", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {...}}'``.

A thin adapter. vLLM's scheduler-side instance translates vLLM's requests and scheduler
output for a ``PagedPlanner`` (``connectors/paged_plan.py``: what to load and save); its
worker-side instances hand the engine's pages and layer hooks to a ``PagedWorker``
(``connectors/paged_worker.py``: the copies, the store, the failures). Both share the
process's store (``connectors/engine_store.py``): embedded, or the node's daemon.

``kv_connector_extra_config`` holds kvcache config keys — nested tables or dotted keys
(``{"store.cpu.capacity": "8GiB", "connector": {"server": "unix:///run/kvcache.sock"}}``)
over ``$KVCACHE_CONFIG`` and ``KVCACHE_*`` variables; ``"config": PATH`` names a config
file instead of ``$KVCACHE_CONFIG``. Unknown keys are refused with the nearest known one.

Pages: vLLM's CPU attention backend (``vec``/``vec16`` ISAs, fp32/fp16/bf16) and CUDA
FlashAttention's ``[2, N, B, H, D]`` are read into canonical chunks (codecs apply, other
engines reuse them). CPU pages packed in a way kvcache cannot read (bf16 for AMX) are
stored as they are, whole blocks, under a layout naming that page format (lossless codecs
only; only engines with the same page format reuse them), and so are all CPU pages with
``connector.pages = "opaque"``. A model or KV dtype kvcache cannot key (other model
families, sliding windows, fp8 KV caches) stops the engine at start with the reason.
Requests whose tokens do not determine their KV — multimodal inputs, a LoRA adapter, a
cache salt, prompt embeddings — are neither looked up nor saved: they run as without
kvcache. A request turns kvcache off for itself with ``SamplingParams(extra_args=
{"kv_transfer_params": {"kvcache": {"load": False, "save": False}}})`` (either switch
alone: no reuse, or nothing of it stored); malformed switches leave the request
uncached, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvcache.connectors import engine_store
from kvcache.connectors.hf import layout_from_hf_config
from kvcache.connectors.paged_plan import PagedPlanner, RequestOps
from kvcache.connectors.paged_worker import BlockPages, PagedWorker
from kvcache.kernels.page_layout import VllmCpuLayout, VllmFlashLayout, paged_planes
from kvcache.kvstore.config import KVCacheConfig, did_you_mean
from kvcache.kvstore.errors import ConfigError, LayoutMismatchError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig as VllmKVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# vLLM's CPU attention ISAs whose pages hold plain K/V (``VllmCpuLayout``).
_PLAIN_CPU_ISAS = ("vec", "vec16")
# vLLM's CPU backend computes each step on every core: kvcache stores what it saved once
# the engine's steps pause this long (PagedWorker's quiet_s). Longer than the gap between
# back-to-back steps or requests (a few ms), short beside a request's latency.
_CPU_QUIET_S = 0.02
# kv_cache_dtype values that store K/V as plain floats (fp8 caches carry scales: not yet).
_PLAIN_KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCacheConnectorMetadata(KVConnectorMetadata):
    """One step's ops, scheduler → workers."""

    def __init__(self, ops: list[RequestOps]) -> None:
        self.ops = ops


class KVCacheConnectorStats(KVConnectorStats):
    """Counters of the workers' ``WorkerStats`` over vLLM's stats interval."""

    def reset(self) -> None:
        self.data = dict[str, Any]()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            if isinstance(v, dict):
                mine = self.data.setdefault(k, {})
                for tier, n in v.items():
                    mine[tier] = mine.get(tier, 0) + n
            else:
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for k, v in self.data.items():
            if isinstance(v, dict):
                out.update({f"{k}[{tier}]": n for tier, n in v.items()})
            else:
                out[k] = v
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


# WorkerStats counters exported to vLLM's Prometheus endpoint: name -> help.
_PROM_COUNTERS = {
    "load_tokens": "tokens written into vLLM's pages from kvcache",
    "async_loads": "loads that ran beside vLLM's steps (connector.load_mode)",
    "load_bytes": "bytes written into vLLM's pages from kvcache",
    "load_seconds": "seconds the forward pass waited for kvcache layers",
    "failed_loads": "loads that failed and were recomputed by vLLM",
    "failed_tokens": "tokens whose load failed and were recomputed",
    "save_tokens": "tokens kvcache stored",
    "save_bytes": "bytes kvcache stored (before encoding)",
    "save_seconds": "seconds the forward pass spent copying blocks out for kvcache",
    "skipped_saves": "saves skipped (too much KV waiting to be stored, or a store error)",
}


class KVCachePromMetrics(KVConnectorPromMetrics):
    """kvcache's counters as ``vllm:kvcache_*`` Prometheus counters, per engine; hits by
    tier as ``vllm:kvcache_load_tokens_by_tier{tier=...}``."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type, type],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {}
        for key, doc in _PROM_COUNTERS.items():
            metric = self._counter_cls(name=f"vllm:kvcache_{key}", documentation=doc,
                                       labelnames=labelnames)
            self._counters[key] = {i: metric.labels(*values)
                                   for i, values in per_engine_labelvalues.items()}
        self._by_tier = self._counter_cls(
            name="vllm:kvcache_load_tokens_by_tier",
            documentation="tokens loaded from kvcache, by the tier that held them",
            labelnames=[*labelnames, "tier"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        values = self.per_engine_labelvalues.get(engine_idx, [])
        for key, value in transfer_stats_data.items():
            if key in self._counters and value:
                self._counters[key][engine_idx].inc(value)
            elif key == "load_tokens_by_tier":
                for tier, n in value.items():
                    self._by_tier.labels(*values, tier).inc(n)


def vllm_layout(vllm_config: VllmConfig, config: KVCacheConfig, tp_rank: int) -> KVLayout:
    """The ``KVLayout`` of rank ``tp_rank``'s KV: the model's, as the transformers
    connector derives it (so that both key the same tokens alike), with this rank's
    share of the KV heads."""
    model = vllm_config.model_config
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    kv_dtype = model.dtype if cache_dtype == "auto" else _PLAIN_KV_DTYPES.get(cache_dtype)
    if kv_dtype is None:
        raise LayoutMismatchError(
            f"kvcache does not store {cache_dtype} KV caches yet; run vLLM with "
            "kv_cache_dtype='auto'")
    model_id = config.connector.model_id or (
        f"{model.model}@{model.revision}" if model.revision else str(model.model))
    layout = layout_from_hf_config(model.hf_config, kv_dtype, model_id)
    tp = vllm_config.parallel_config.tensor_parallel_size
    heads = layout.num_kv_heads // tp if layout.num_kv_heads >= tp else 1
    return dataclasses.replace(layout, num_kv_heads=heads, tp_rank=tp_rank, tp_size=tp)


def cpu_page_isa(vllm_config: VllmConfig, layout: KVLayout) -> str | None:
    """The ISA of vLLM's CPU attention for this model, or None on other platforms."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return str(_get_attn_isa(layout.torch_dtype, vllm_config.cache_config.block_size,
                             layout.head_dim))


def page_format(isa: str | None, pages: str, layout: KVLayout, block_size: int
                ) -> str | None:
    """None when kvcache reads vLLM's pages into canonical chunks, else the name of the
    page format stored as it is: the CPU attention's pages packed for an ISA kvcache
    cannot read (bf16 for AMX), or any CPU pages with ``connector.pages = "opaque"``."""
    if isa is None:
        if pages == "opaque":
            raise ConfigError("connector.pages = 'opaque' is for vLLM's CPU attention; "
                              "GPU pages are always read into canonical chunks")
        return None
    if pages == "auto" and isa in _PLAIN_CPU_ISAS:
        return None
    return f"vllm-cpu-{isa}-{layout.dtype}-b{block_size}"


def page_layout_of(tensor: torch.Tensor, layout: KVLayout, block_size: int,
                   isa: str | None) -> BlockPages:
    """The one-layer page layout of a vLLM KV cache tensor (the CPU attention's, whatever
    its packing, for whole-block copies); ``LayoutMismatchError`` for shapes it does not
    know."""
    h, d = layout.num_kv_heads, layout.head_dim
    if isa is not None:
        n = tensor.shape[0]
        return VllmCpuLayout(num_layers=1, num_blocks=n, block_size=block_size,
                             num_kv_heads=h, head_dim=d)
    if tensor.dim() == 5 and tensor.shape[0] == 2 and tuple(tensor.shape[2:]) == (
            block_size, h, d):
        return VllmFlashLayout(num_layers=1, num_blocks=tensor.shape[1],
                               block_size=block_size, num_kv_heads=h, head_dim=d)
    raise LayoutMismatchError(f"unknown vLLM KV cache shape {tuple(tensor.shape)} for "
                              f"{h} KV heads of {d} and blocks of {block_size}")


class KVCacheConnector(KVConnectorBase_V1):
    """kvcache as a vLLM V1 KV connector (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: VllmKVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role,
                         kv_cache_config=kv_cache_config)
        self.config = engine_store.connector_config(
            self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.chunk_size = self.config.store.chunk_size
        self.planner: PagedPlanner | None = None
        self.worker: PagedWorker | None = None
        self._layers: dict[str, int] = {}
        self._uncached: set[str] = set()  # requests kvcache leaves alone (_uncacheable)
        self._unloaded: set[int] = set()  # blocks planned for loads this worker cannot do
        self._unloaded_async: set[str] = set()  # their asynchronous loads, over at once
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning("kv_load_failure_policy is %r: a chunk that fails to load fails "
                        "its request; set it to 'recompute' to recompute those tokens",
                        self._kv_transfer_config.kv_load_failure_policy)
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        layout = vllm_layout(vllm_config, self.config, tp_rank)
        self.isa = cpu_page_isa(vllm_config, layout)
        self.layout = dataclasses.replace(
            layout, page_format=page_format(self.isa, self.config.connector.pages, layout,
                                            self.block_size))
        if self.layout.page_format is not None and role == KVConnectorRole.SCHEDULER:
            log.warning("kvcache stores vLLM's %s pages as they are (page format %s): "
                        "lossless codecs only, and only engines with this page format "
                        "can reuse them", self.layout.dtype, self.layout.page_format)
        store = engine_store.acquire(self.config)
        self.store: TieredStore | None = store
        if role == KVConnectorRole.SCHEDULER:
            _warn_if_workers_cannot_share(vllm_config, self.config)
            c = self.config.connector
            self.planner = PagedPlanner(
                self.layout, store.longest_prefix, chunk_size=self.chunk_size,
                block_size=self.block_size,
                # kv_role "kv_producer" only saves, "kv_consumer" only loads
                load=c.load and self._kv_transfer_config.is_kv_consumer,
                save=c.save and self._kv_transfer_config.is_kv_producer,
                load_mode=c.load_mode, key_scheme=self.config.store.key_scheme)
        log.info("kvcache %s connector: model %s, layout %s (rank %d of %d), store %s",
                 role.name.lower(), self.layout.model_id, self.layout.fingerprint, tp_rank,
                 self.layout.tp_size, self.config.connector.server or self.config.store.dir)

    # -- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        if len(names) != self.layout.num_layers:
            log.warning("kvcache is off: vLLM has %d KV cache layers, the model %d",
                        len(names), self.layout.num_layers)
            return
        layers = [kv_caches[name] for name in names]
        try:
            pages = page_layout_of(layers[0], self.layout, self.block_size, self.isa)
            for t in layers:
                paged_planes(pages, [t])  # each layer's tensor is of that layout
        except LayoutMismatchError as e:
            log.warning("kvcache is off: %s", e)
            return
        if self.store is None:
            return
        self._layers = {name: i for i, name in enumerate(names)}
        c = self.config.connector
        self.worker = PagedWorker(self.store, self.layout, pages, layers,
                                  chunk_size=self.chunk_size, load_timeout=c.load_timeout,
                                  max_pending_saves=c.max_pending_saves,
                                  key_scheme=self.config.store.key_scheme,
                                  quiet_s=_CPU_QUIET_S if self.isa is not None else 0.0)

    def _ops(self) -> list[RequestOps]:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCacheConnectorMetadata)
        return meta.ops

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.start_loads(self._ops())
            return
        # This worker turned kvcache off (register_kv_caches said why) but the scheduler,
        # which cannot know, planned loads: their blocks hold nothing, vLLM recomputes them.
        for op in self._ops():
            if op.load is not None:
                self._unloaded.update(op.blocks(*op.load, self.block_size))
                if op.load_async:
                    self._unloaded_async.add(op.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layers.get(layer_name)
        if self.worker is not None and i is not None:
            self.worker.load_layer(i)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        i = self._layers.get(layer_name)
        if self.worker is not None and i is not None:
            self.worker.save_layer(i, self._ops())

    def wait_for_save(self) -> None:
        if self.worker is not None:
            self.worker.end_step()

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        # Saves never hold a request's blocks (they are copied out within the step), so
        # only asynchronous loads finish here: loaded, failed or aborted.
        if self.worker is not None:
            return None, self.worker.finished_loads(finished_req_ids) or None
        out, self._unloaded_async = self._unloaded_async, set()
        return None, out or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.worker is not None:
            return self.worker.failed_blocks()
        out, self._unloaded = self._unloaded, set()
        return out

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self.worker is None:
            return None
        stats = KVCacheConnectorStats(data=self.worker.take_stats().to_dict())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return KVCacheConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type, type],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return KVCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.store is not None:
            engine_store.release(self.store)
            self.store = None

    # -- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        assert self.planner is not None
        if request.request_id in self._uncached:  # asked again: it waited, or was preempted
            return 0, False
        reason = _uncacheable(request)
        load = save = False
        if reason is None:
            try:
                load, save = request_switches(request.kv_transfer_params)
            except ConfigError as e:  # it may have meant to keep its KV out: it is left out
                reason = str(e)
                log.warning("request %s: not cached: %s", request.request_id, e)
            if not (load or save):
                reason = reason or "its kv_transfer_params turn kvcache off"
        if reason is not None:
            self._uncached.add(request.request_id)
            log.debug("request %s: not cached (%s)", request.request_id, reason)
            return 0, False
        try:
            n = self.planner.matched_tokens(request.request_id, request.prompt_token_ids or [],
                                            num_computed_tokens, load=load, save=save)
        except Exception as e:  # a lookup that fails is a miss, never an engine error
            log.warning("request %s: lookup failed: %s", request.request_id, e)
            return 0, False
        load_async = self.planner.load_async(request.request_id)
        log.debug("request %s: %d prompt tokens, %d computed by vLLM, %d from kvcache%s",
                  request.request_id, len(request.prompt_token_ids or []),
                  num_computed_tokens, n, " (asynchronous load)" if load_async else "")
        return n, load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self.planner is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else ()
        self.planner.allocated(request.request_id, num_external_tokens, block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.planner is not None
        new = [(r.req_id, r.prompt_token_ids or [], r.block_ids[0], r.num_computed_tokens)
               for r in scheduler_output.scheduled_new_reqs if r.req_id not in self._uncached]
        cached = scheduler_output.scheduled_cached_reqs
        running = [
            (rid, None if cached.new_block_ids[i] is None else cached.new_block_ids[i][0],
             rid in cached.resumed_req_ids, cached.num_computed_tokens[i])
            for i, rid in enumerate(cached.req_ids)
        ]
        ops = self.planner.plan_step(new, running, scheduler_output.num_scheduled_tokens)
        return KVCacheConnectorMetadata(ops)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        if self.planner is not None:
            self.planner.finished(request.request_id)
        self._uncached.discard(request.request_id)
        return False, None


def _warn_if_workers_cannot_share(vllm_config: VllmConfig, config: KVCacheConfig) -> None:
    """Workers in other processes than the scheduler share chunks with it only through a
    tier both can open: the disk, a remote tier or the daemon."""
    parallel = vllm_config.parallel_config
    separate = parallel.world_size > 1 or parallel.distributed_executor_backend in ("mp", "ray")
    shared = config.connector.server is not None or config.store.disk.enabled \
        or config.store.remote.url is not None
    if separate and not shared:
        log.warning("vLLM's workers run in other processes than its scheduler, and the "
                    "store has only a CPU tier: the scheduler cannot see what they store, "
                    "so nothing will be reused. Enable store.disk or use connector.server")


_SWITCHES = ("load", "save")


def request_switches(kv_transfer_params: Any) -> tuple[bool, bool]:
    """A request's own ``(load, save)`` switches, from its ``kv_transfer_params``
    (``{"kvcache": {"load": false, "save": false}}``, each switch on by default; other
    engines' entries beside ``"kvcache"`` are theirs). Raises ConfigError if malformed."""
    if not isinstance(kv_transfer_params, dict) or "kvcache" not in kv_transfer_params:
        return True, True
    mine = kv_transfer_params["kvcache"]
    where = 'kv_transfer_params["kvcache"]'
    if not isinstance(mine, dict):
        raise ConfigError(f'{where} must be a table such as {{"save": false}}, not {mine!r}')
    for key, value in mine.items():
        if key not in _SWITCHES:
            raise ConfigError(f"{where} has no switch {key!r}{did_you_mean(str(key), _SWITCHES)}"
                              f"; it takes {' and '.join(map(repr, _SWITCHES))}")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}[{key!r}] must be true or false, not {value!r}")
    return mine.get("load", True), mine.get("save", True)


def _uncacheable(request: Request) -> str | None:
    """Why a request's KV is not a function of its token ids alone, or None."""
    if request.prompt_token_ids is None:
        return "prompt embeddings"
    if request.mm_features:
        return "multimodal inputs: placeholder tokens do not identify the images"
    if request.lora_request is not None:
        return "a LoRA adapter"
    if getattr(request, "cache_salt", None):
        return "a cache salt"
    return None
