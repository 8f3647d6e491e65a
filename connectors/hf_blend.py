"""Blending through the transformers connector: plan a prompt's segments, load the cached
ones layer by layer at their positions in this prompt, run ``blend_prefill``, and store
the segments it had to compute.

What is stored for a segment is its KV prefilled *alone* (attending only to itself), at
the positions it holds in the prompt that stored it: a content key must name KV that the
segment's tokens alone determine, and KV computed after some other preamble would not be.
Storing costs one extra forward pass over each new segment, after the first token is out
(``BlendResult.store_s``), like storing a prefix.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from kvcache.connectors.blend import BlendOutput, BlendResult, blend_prefill
from kvcache.connectors.blend_plan import (
    MISS_LAYOUT,
    MISS_LOAD,
    MISS_TOO_SHORT,
    BlendPlan,
    SegmentError,
    SegmentPlan,
    plan_blend,
    segment_chunks,
    segments_by_separator,
)
from kvcache.connectors.blend_policy import BlendPolicy, DeviationTopK
from kvcache.connectors.hf import HFConnector, cache_to_canonical, output_cache, token_list
from kvcache.kvstore import background
from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.layer_loader import LayerLoader, LayerLoadError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class _SpanFailed(KVCacheError):
    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"loading segment {index} failed: {error}")
        self.index = index


class PlanChangedError(KVCacheError):
    """Loading found less than the lookup did (a chunk gone since, or of another layout):
    the blend must run on ``plan``."""

    def __init__(self, plan: BlendPlan) -> None:
        super().__init__("the store holds less than it said a moment ago")
        self.plan = plan


class SegmentLoads:
    """The plan's cached spans, each a ``LayerLoader`` rotating its keys to the span's
    positions; calling it gives one layer of the whole prompt's cached K/V
    (``blend.CachedLayer``).

    The loaders are prepared (objects fetched: read from disk or the daemon, borrowed from
    the CPU tier) on a thread of their own, so that the layers a blend computes for every
    token before its check layer — which need no cached K/V — overlap the reads. The first
    call waits for them. If loading finds less than the plan says, that call raises
    ``PlanChangedError`` with what it found (source positions come with it).
    """

    def __init__(self, store: TieredStore, layout: KVLayout, plan: BlendPlan, *,
                 device: torch.device, timeout_s: float | None = None) -> None:
        self.layout = layout
        self.device = device
        self.timeout_s = timeout_s
        self.plan = plan
        self._planned = [s.cached_tokens for s in plan.spans]
        self.loaders: list[tuple[int, SegmentPlan, LayerLoader]] = []
        self.tiers: dict[str, int] = {}
        self._stack = contextlib.ExitStack()
        self._error: BaseException | None = None
        self._ready = False
        self._thread = background.start(self._prepare, "kvcache-blend-loads", (store,))

    def _prepare(self, store: TieredStore) -> None:
        try:
            plan = self.plan
            for i, span in enumerate(plan.spans):
                if not span.cached_tokens:
                    continue
                loader = self._stack.enter_context(LayerLoader(
                    store, span.cached_keys, self.layout, device=self.device, partial=True,
                    rope_start=span.start))
                got = loader.num_tokens
                changes: dict[str, object] = {
                    "source_start": loader.rope_starts[0] if got else None}
                if got < span.cached_tokens:
                    log.info("segment at %d: %d of its %d cached tokens loaded (%s)",
                             span.start, got, span.cached_tokens, loader.shortfall)
                    changes.update(cached_tokens=got, reason=MISS_LAYOUT
                                   if loader.layout_mismatch else MISS_LOAD)
                plan = plan.with_span(i, **changes)
                if got:
                    self.loaders.append((i, plan.spans[i], loader))
                    for tier in loader.tiers:
                        self.tiers[tier] = self.tiers.get(tier, 0) + 1
            self.plan = plan
        except BaseException as e:  # surfaced by the first call
            self._error = e

    def _wait_ready(self) -> None:
        if self._ready:
            return
        self._thread.join()
        self._ready = True
        if self._error is not None:
            raise KVCacheError(f"preparing the segments' loads failed: {self._error}"
                               ) from self._error
        if [s.cached_tokens for s in self.plan.spans] != self._planned:
            raise PlanChangedError(self.plan)

    def __call__(self, layer: int) -> torch.Tensor:
        self._wait_ready()
        shape = (2, self.plan.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        # Rows of tokens nothing is cached for are computed (written) before any use.
        out = torch.empty(shape, dtype=self.layout.torch_dtype, device=self.device)
        for i, span, loader in self.loaders:
            try:
                kv = loader.wait_for_layer(layer, self.timeout_s)
            except LayerLoadError as e:
                raise _SpanFailed(i, e) from e
            out[:, span.start : span.start + span.cached_tokens] = kv
        return out

    def close(self) -> None:
        """Wait for the preparing thread, then let go of every loader."""
        self._thread.join()
        self._stack.close()


def run_blend(model: PreTrainedModel, store: TieredStore, layout: KVLayout,
              input_ids: torch.Tensor, plan: BlendPlan, policy: BlendPolicy, ratio: float,
              *, timeout_s: float | None = None) -> tuple[BlendOutput, BlendPlan, dict[str, int]]:
    """Load the plan's cached spans and blend. If loading finds less than the lookup did,
    or a span's layers fail to load mid-way, the blend runs again on what is there (the
    failed span computed): never on half-loaded KV."""
    while True:
        loads = SegmentLoads(store, layout, plan, device=model.device, timeout_s=timeout_s)
        try:
            out = blend_prefill(model, input_ids, plan, loads, policy, ratio)
            return out, loads.plan, loads.tiers
        except PlanChangedError as e:
            plan = e.plan
        except _SpanFailed as e:
            log.warning("%s; computing that segment instead", e)
            plan = loads.plan.with_span(e.index, cached_tokens=0, reason=MISS_LOAD)
        finally:
            loads.close()


@torch.no_grad()
def store_segments(model: PreTrainedModel, store: TieredStore, layout: KVLayout,
                   tokens: Sequence[int], spans: Sequence[SegmentPlan], chunk_size: int
                   ) -> int:
    """Prefill each segment alone at its positions and store the chunks the store lacks
    (module docstring). Returns the tokens newly stored."""
    stored = 0
    for span in spans:
        seg = list(tokens[span.start : span.end])
        chunks = [c for c in segment_chunks(layout.fingerprint, seg, chunk_size)
                  if not store.contains(c.key)]
        if not chunks:
            continue
        ids = torch.tensor([seg], dtype=torch.long, device=model.device)
        positions = torch.arange(span.start, span.end, device=model.device)[None]
        out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        for c in chunks:
            kv = cache_to_canonical(cache, c.start, c.end)
            store.put(c.key, kv, layout, rope_start=span.start + c.start, keying="segment")
            stored += c.num_tokens
    return stored


def segments_to_store(plan: BlendPlan) -> list[SegmentPlan]:
    """The segments worth storing: long enough, and not all in the store."""
    return [s for s in plan.spans if s.is_segment and s.reason not in (None, MISS_TOO_SHORT)]


def blend_result(out: BlendOutput, plan: BlendPlan, policy: BlendPolicy, ratio: float,
                 tiers: dict[str, int], ttft_s: float) -> BlendResult:
    recomputed = int(out.recomputed.numel())
    return BlendResult(
        logits=out.logits, cache=out.cache, plan=plan, policy=policy.name, ratio=ratio,
        reused_tokens=plan.cached_tokens - recomputed, recomputed_tokens=recomputed,
        computed_tokens=out.computed, hits_by_tier=tiers, ttft_s=ttft_s)


def blend(connector: HFConnector, input_ids: torch.Tensor | Sequence[int],
          segments: Sequence[tuple[int, int]] | None, separator: Sequence[int] | None,
          policy: BlendPolicy | None, ratio: float, store: bool) -> BlendResult:
    """``HFConnector.blend`` (see there)."""
    tokens = token_list(input_ids)
    if not tokens:
        raise SegmentError("blending needs at least one token")
    if (segments is None) == (separator is None):
        raise SegmentError("give the segments' (start, end) spans or a separator, not both")
    spans = segments if segments is not None else \
        segments_by_separator(tokens, separator or ())
    if not isinstance(connector.store, TieredStore):
        raise KVCacheError("blending loads layer by layer: it needs a TieredStore, got "
                           f"{type(connector.store).__name__}")
    policy = policy or DeviationTopK()
    t0 = time.perf_counter()
    with torch.inference_mode():
        plan = plan_blend(connector.store.longest_prefix, connector.store.where,
                          connector.layout.fingerprint, tokens, spans,
                          chunk_size=connector.chunk_size)
        out, plan, tiers = run_blend(connector.model, connector.store, connector.layout,
                                     torch.tensor(tokens), plan, policy, ratio)
    result = blend_result(out, plan, policy, ratio, tiers, time.perf_counter() - t0)
    if store:
        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                result.stored_tokens = store_segments(
                    connector.model, connector.store, connector.layout, tokens,
                    segments_to_store(plan), connector.chunk_size)
        except KVCacheError as e:  # best effort, like storing a prefix
            log.warning("storing the segments of a %d-token prompt failed: %s",
                        len(tokens), e)
        result.store_s = time.perf_counter() - t1
    connector.blend_stats.add(result)
    log.debug("blend of %d tokens (%s, ratio %.2f): %d reused, %d recomputed, %d computed; "
              "missed %s", len(tokens), policy.name, ratio, result.reused_tokens,
              result.recomputed_tokens, result.computed_tokens, plan.missed_tokens())
    return result
