"""Hugging Face transformers adapter: ``DynamicCache`` ↔ canonical chunks ↔ the store.

The adapter only translates. Which tier holds a chunk, eviction and promotion are the
store's business; the connector asks the store four questions (``longest_prefix``,
``where``, ``get_many``, ``contains``) and hands it chunks with ``put``.

transformers caches keys *after* RoPE, so every chunk is put with
``rope_start=chunk.start``: the positions its keys were rotated at. Prefix reuse puts
them back at exactly those positions, so no shift is needed here.

With a ``TieredStore`` the prefix is loaded layer by layer through ``LayerLoader``: CPU-tier
chunks are read zero-copy, and layer ``i + 1`` is decoded and copied to the model's device
while layer ``i`` is appended to the ``DynamicCache``. Other ``ChunkStore``s go through
``get_many``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import xxhash

from kvcache.connectors.blend import BlendStats
from kvcache.connectors.core import reusable_tokens
from kvcache.connectors.hf_layerwise_cache import LayerwiseCache
from kvcache.kvstore.errors import KVCacheError, LayoutMismatchError
from kvcache.kvstore.keys import DEFAULT_CHUNK_SIZE, Chunk, chunk_tokens
from kvcache.kvstore.layer_loader import LayerLoader, LayerLoadError
from kvcache.kvstore.layout import AttentionKind, KVLayout, RopeSpec, RopeStyle, dtype_names
from kvcache.kvstore.tiered_store import TieredStore

if TYPE_CHECKING:
    from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput

    from kvcache.connectors.blend import BlendResult
    from kvcache.connectors.blend_policy import BlendPolicy

log = logging.getLogger(__name__)

# Model families whose KV is a plain per-layer [kv_heads, seq, head_dim] K/V pair with
# NeoX-style (rotate-halves) RoPE applied to keys before caching.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class ChunkStore(Protocol):
    """The part of ``TieredStore`` the connector uses (any store with these methods works)."""

    def put(
        self, key: str, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = 0
    ) -> None: ...

    def get_many(self, keys: Sequence[str]) -> list[torch.Tensor | None]: ...

    def longest_prefix(
        self, keys: Sequence[str], *, num_tokens: Sequence[int] | None = None
    ) -> int: ...

    def where(self, key: str) -> str | None: ...

    def contains(self, key: str) -> bool: ...


# -- layout ------------------------------------------------------------------------------
def _rope_from_config(config: PretrainedConfig, head_dim: int) -> RopeSpec:
    # transformers 5 keeps everything in ``rope_parameters``; 4.x configs (still found in
    # checkpoints) have ``rope_theta`` + ``rope_scaling`` + ``partial_rotary_factor``.
    params: Mapping[str, Any] = getattr(config, "rope_parameters", None) or {}
    scaling: Mapping[str, Any] = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    factor = params.get("factor", scaling.get("factor", 1.0))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    rotary_dim = None
    if partial is not None and float(partial) != 1.0:
        rotary_dim = int(head_dim * float(partial))
    llama3: dict[str, Any] = {}
    if rope_type == "llama3":
        # with them the frequencies are known: shifts and pre-RoPE coding need no inv_freq
        low, high, original = (
            params.get(k, scaling.get(k))
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        )
        if None not in (low, high, original):
            llama3 = {"low_freq_factor": float(low), "high_freq_factor": float(high),
                      "original_max_position": int(original)}
    return RopeSpec(
        theta=float(theta),
        style=RopeStyle.NEOX,
        rotary_dim=rotary_dim,
        scaling_type=None if rope_type in (None, "default") else str(rope_type),
        scaling_factor=float(factor) if factor is not None else 1.0,
        **llama3,
    )


def _check_full_attention(config: PretrainedConfig) -> None:
    """Raise unless every layer attends to the whole prefix.

    A sliding-window layer's ``DynamicCache`` keeps only the last ``window - 1`` tokens, so
    the KV of a prompt longer than the window cannot be cut into prefix chunks (the early
    chunks are gone) and a cached prefix could not be rebuilt into such a cache.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [t for t in layer_types if t != "full_attention"]
    max_pos = getattr(config, "max_position_embeddings", None)
    # Mistral has no layer_types: its window applies to all layers when set. A window at
    # least as long as the longest sequence never binds, which is plain full attention.
    window_binds = window is not None and (max_pos is None or window < max_pos)
    if sliding or (window_binds and not layer_types):
        kinds = sorted(set(sliding)) or ["sliding_attention"]
        raise LayoutMismatchError(
            f"{config.model_type} config uses {', '.join(kinds)} layers (window={window}): "
            "their cache keeps only the last window tokens, so it is not prefix-reusable "
            "chunk by chunk. Use a config with sliding_window=None (or use_sliding_window="
            "False) to cache this model."
        )


def layout_from_hf_config(
    config: PretrainedConfig, dtype: torch.dtype | str, model_id: str
) -> KVLayout:
    """The ``KVLayout`` of a Llama / Qwen2 / Mistral model's KV cache.

    ``model_id`` names the weights (e.g. the hub id plus revision): it is part of every key,
    so two models whose KV has the same shape never share chunks. Raises
    ``LayoutMismatchError`` for unsupported families and sliding-window configs.
    """
    config = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LayoutMismatchError(
            f"model_type {model_type!r} is not supported by the transformers connector; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_full_attention(config)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if isinstance(dtype, torch.dtype):
        if dtype not in dtype_names():
            raise LayoutMismatchError(
                f"unsupported KV dtype {dtype}; use one of {sorted(dtype_names().values())}"
            )
        dtype = dtype_names()[dtype]
    return KVLayout(
        model_id=model_id,
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        attention=AttentionKind.GQA if kv_heads < heads else AttentionKind.MHA,
        rope=_rope_from_config(config, head_dim),
    )


# -- engine-independent helpers (tokens → chunks → keys → lookup) ----------------------
def token_list(input_ids: torch.Tensor | Sequence[int]) -> list[int]:
    """Flat token ids from ``[T]``, ``[1, T]`` or a sequence of ints."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise LayoutMismatchError(
                    f"the transformers connector handles batch size 1, got input_ids of "
                    f"shape {tuple(input_ids.shape)}; call it once per sequence"
                )
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise LayoutMismatchError(f"input_ids must be [T] or [1, T], got {input_ids.dim()}-D")
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def cached_prefix(
    store: ChunkStore, chunks: Sequence[Chunk], layout: KVLayout
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Fetch the longest run of leading ``chunks`` the store can serve.

    Returns the chunk tensors ``[layers, 2, chunk.num_tokens, kv_heads, head_dim]`` (in
    order, possibly fewer than the lookup promised: a chunk evicted or found corrupt between
    lookup and read ends the prefix there) and the number of hits per tier name.
    """
    keys = [c.prefix_key for c in chunks]
    n = store.longest_prefix(keys, num_tokens=[c.num_tokens for c in chunks])
    # Ask where before reading: a read promotes a lower-tier hit to the top tier.
    tiers = [store.where(k) for k in keys[:n]]
    got = store.get_many(keys[:n]) if n else []
    out: list[torch.Tensor] = []
    hits: dict[str, int] = {}
    for chunk, tensor, tier in zip(chunks[:n], got, tiers, strict=True):
        if tensor is None:
            break
        try:
            layout.check_chunk(tensor, chunk.num_tokens)
        except LayoutMismatchError as e:
            # Never serve bytes that do not fit; recomputing from here is always correct.
            log.warning("chunk %s ignored: %s", chunk.prefix_key, e)
            break
        out.append(tensor)
        name = tier or "unknown"
        hits[name] = hits.get(name, 0) + 1
    return out, hits


# -- DynamicCache ↔ canonical chunks ---------------------------------------------------
def _cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each ``[1, kv_heads, seq, head_dim]``."""
    layers = []
    for i, layer in enumerate(cache.layers):
        # Linear-attention / dummy layers have no K/V; only full-attention layers reach here.
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.dim() != 4:
            raise LayoutMismatchError(f"cache layer {i} holds no [batch, heads, seq, dim] KV")
        if k.shape[0] != 1:
            raise LayoutMismatchError(
                f"the transformers connector handles batch size 1, got a cache of batch "
                f"{k.shape[0]}; store each sequence separately"
            )
        layers.append((k, v))
    return layers


def cache_to_canonical(cache: DynamicCache, start: int, end: int) -> torch.Tensor:
    """Tokens ``[start, end)`` of ``cache`` as ``[layers, 2, end - start, kv_heads, head_dim]``.

    cache: per layer K/V of shape ``[1, kv_heads, seq, head_dim]`` with ``seq >= end``.
    """
    parts = [torch.stack((k[0, :, start:end], v[0, :, start:end])) for k, v in _cache_layers(cache)]
    # [layers, 2, kv_heads, T, head_dim] → [layers, 2, T, kv_heads, head_dim]
    return torch.stack(parts).permute(0, 1, 3, 2, 4).contiguous()


def canonical_to_cache(
    kv: torch.Tensor, config: PretrainedConfig, device: torch.device, dtype: torch.dtype
) -> DynamicCache:
    """A ``DynamicCache`` holding ``kv`` ``[layers, 2, T, kv_heads, head_dim]``: per layer
    K/V ``[1, kv_heads, T, head_dim]`` on ``device``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    per_layer = kv.to(device=device, dtype=dtype).permute(0, 1, 3, 2, 4).unsqueeze(2)
    for i in range(per_layer.shape[0]):
        # Views [1, kv_heads, T, head_dim]: update() concatenates onto an empty tensor, which
        # is the one copy that lays them out contiguously; copying here would be a second.
        cache.update(per_layer[i, 0], per_layer[i, 1], i)
    return cache


# -- transformers' cache argument ------------------------------------------------------
def cache_kwarg(model: PreTrainedModel) -> str:
    """The name ``model.forward`` takes its KV cache under: ``cache`` since transformers
    5.24, ``past_key_values`` before (5.24 still accepts it, with a FutureWarning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: ModelOutput) -> DynamicCache:
    """The cache a forward pass returned (``out.cache``, or ``out.past_key_values`` before
    transformers 5.24), read without the old name's FutureWarning."""
    # a field test, not hasattr: reading the old name is what warns
    names = getattr(type(out), "__dataclass_fields__", {})
    cache: DynamicCache = getattr(out, "cache" if "cache" in names else "past_key_values")
    return cache


# -- the connector ---------------------------------------------------------------------
@dataclass
class PrefillResult:
    """Outcome of ``HFConnector.prefill``.

    logits: ``[1, 1, vocab]`` next-token logits at the last prompt position, float32: what
    ``model(input_ids, logits_to_keep=1).logits`` gives (``logits[:, -1]`` is ``[1, vocab]``).
    cache: the prompt's full ``DynamicCache`` (layers ``[1, kv_heads, T, head_dim]``),
    ready for decoding. ``hits_by_tier``: chunks served per tier name. ``ttft_s``: lookup,
    load and the forward pass (time to first token); storing new chunks comes after it
    and is timed in ``store_s``.
    """

    logits: torch.Tensor
    cache: DynamicCache
    reused_tokens: int
    computed_tokens: int
    hits_by_tier: dict[str, int] = field(default_factory=dict)
    ttft_s: float = 0.0
    stored_tokens: int = 0
    store_s: float = 0.0


class HFConnector:
    """Prefix reuse for a transformers causal LM (batch size 1, ``DynamicCache``).

    ``model_id`` names the weights in every key. By default it is the checkpoint the model
    was loaded from (name and revision); a model built from a config in code has none, so
    its id is a hash of its config and weights (see ``weights_model_id``). ``key_scheme``:
    ``store.key_scheme`` (``"sglang"`` to share chunks with SGLang engines).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        store: ChunkStore,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        model_id: str | None = None,
        key_scheme: str = "kvcache",
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        if model_id is None:
            model_id = _model_id_of(model)
        self.model = model
        self._cache_kwarg = cache_kwarg(model)
        self.store = store
        self.chunk_size = chunk_size
        self.key_scheme = key_scheme
        self.dtype: torch.dtype = model.dtype
        self.device: torch.device = model.device
        self.layout = layout_from_hf_config(model.config, self.dtype, model_id)
        self.blend_stats = BlendStats()  # over this connector's ``blend`` calls

    def chunks(self, input_ids: torch.Tensor | Sequence[int]) -> list[Chunk]:
        """The prompt's chunks and their keys. input_ids: ``[T]`` or ``[1, T]``."""
        return chunk_tokens(self.layout.fingerprint, token_list(input_ids), self.chunk_size,
                            self.key_scheme)

    def store_kv(
        self,
        input_ids: torch.Tensor | Sequence[int],
        cache: DynamicCache,
        *,
        start_chunk: int = 0,
    ) -> int:
        """Put the prompt's chunks from ``start_chunk`` on that the store lacks.

        input_ids: ``[T]`` or ``[1, T]``; cache: per layer ``[1, kv_heads, S, head_dim]``
        with ``S >= T`` holding (at least) the prompt's KV. A partial last chunk is stored
        too (not under the "sglang" key scheme: it keys whole chunks only). Returns how
        many tokens were newly stored.
        """
        chunks = self.chunks(input_ids)
        if not chunks:
            return 0
        layers = _cache_layers(cache)
        if len(layers) != self.layout.num_layers:
            raise LayoutMismatchError(
                f"cache has {len(layers)} layers, layout of {self.layout.model_id!r} has "
                f"{self.layout.num_layers}"
            )
        seq = min(k.shape[2] for k, _ in layers)
        if seq < chunks[-1].end:
            raise LayoutMismatchError(
                f"cache holds {seq} tokens but the prompt has {chunks[-1].end}; pass the "
                "cache of this prompt (a sliding-window cache cannot be stored)"
            )
        todo = [c for c in chunks[start_chunk:] if not self.store.contains(c.prefix_key)]
        with torch.no_grad():
            for c in todo:
                kv = cache_to_canonical(cache, c.start, c.end)
                self.store.put(c.prefix_key, kv, self.layout, rope_start=c.start)
        return sum(c.num_tokens for c in todo)

    def _load(
        self, chunks: Sequence[Chunk], num_prompt_tokens: int, stack: contextlib.ExitStack
    ) -> tuple[DynamicCache | None, int, dict[str, int]]:
        """The cached prefix, its length and hits per tier. A layer-wise load stays open in
        ``stack`` so its later layers can arrive during the forward pass."""
        if isinstance(self.store, TieredStore):
            return self._load_layerwise(self.store, chunks, num_prompt_tokens, stack)
        tensors, hits = cached_prefix(self.store, chunks, self.layout)
        if not tensors:
            return None, 0, hits
        kv = torch.cat(tensors, dim=2)  # [layers, 2, P, kv_heads, head_dim]
        reuse = reusable_tokens(kv.shape[2], num_prompt_tokens)
        if reuse <= 0:
            return None, 0, hits
        cache = canonical_to_cache(kv[:, :, :reuse], self.model.config, self.device, self.dtype)
        return cache, reuse, hits

    def _load_layerwise(
        self, store: TieredStore, chunks: Sequence[Chunk], num_prompt_tokens: int,
        stack: contextlib.ExitStack,
    ) -> tuple[DynamicCache | None, int, dict[str, int]]:
        """The cached prefix as a ``LayerwiseCache``: layer 0 is loaded now, the others
        while the model computes the layers before them."""
        keys = [c.prefix_key for c in chunks]
        n = store.longest_prefix(keys, num_tokens=[c.num_tokens for c in chunks])
        if n == 0:
            return None, 0, {}
        loader = stack.enter_context(
            LayerLoader(store, keys[:n], self.layout, device=self.device, partial=True)
        )
        # Prefix keys hash the tokens, so only a corrupt header could disagree; never
        # serve bytes that do not fit.
        sizes = [c.num_tokens for c in chunks[: loader.num_chunks]]
        if loader.chunk_tokens != sizes:
            log.warning("cached chunk sizes %s do not match the prompt's %s",
                        loader.chunk_tokens, sizes)
            return None, 0, {}
        hits: dict[str, int] = {}
        for tier in loader.tiers:
            hits[tier] = hits.get(tier, 0) + 1
        reuse = reusable_tokens(loader.num_tokens, num_prompt_tokens)
        if reuse <= 0:
            return None, 0, hits
        try:
            return LayerwiseCache(self.model.config, loader, reuse), reuse, hits
        except LayerLoadError as e:
            # Recomputing is always correct; a half-loaded cache never is.
            log.warning("loading a cached prefix failed, recomputing it: %s", e)
            return None, 0, {}

    def load_prefix(
        self, input_ids: torch.Tensor | Sequence[int]
    ) -> tuple[DynamicCache | None, int]:
        """The longest cached prefix of the prompt as a ``DynamicCache`` and its length.

        input_ids: ``[T]`` or ``[1, T]``. The cache's layers are ``[1, kv_heads, P, head_dim]``
        with ``P <= T - 1``: at least one token is always left to prefill. ``(None, 0)``
        on a miss.
        """
        with contextlib.ExitStack() as stack:
            tokens = token_list(input_ids)
            cache, reuse, _ = self._load(self.chunks(tokens), len(tokens), stack)
            if isinstance(cache, LayerwiseCache):
                try:
                    cache.fill_all()  # the caller uses it outside our forward pass
                except LayerLoadError as e:
                    log.warning("loading a cached prefix failed: %s", e)
                    return None, 0
        return cache, reuse

    def _forward(self, tokens: list[int], cache: DynamicCache | None, reuse: int) -> Any:
        """Run the model on ``tokens[reuse:]`` after a cache holding ``tokens[:reuse]``."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([tokens[reuse:]], dtype=torch.long, device=self.device)
        # Positions continue after the reused prefix: the cached keys were rotated at
        # 0..reuse-1, the new ones must be rotated at reuse..T-1.
        positions = torch.arange(reuse, len(tokens), device=self.device).unsqueeze(0)
        return self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )

    def prefill(self, input_ids: torch.Tensor | Sequence[int]) -> PrefillResult:
        """Prefill a prompt, reusing its cached prefix, and store the chunks it computed.

        input_ids: ``[T]`` or ``[1, T]`` with ``T >= 1``.
        """
        tokens = token_list(input_ids)
        if not tokens:
            raise ValueError("prefill needs at least one token")
        chunks = self.chunks(tokens)
        t0 = time.perf_counter()
        with torch.inference_mode(), contextlib.ExitStack() as stack:
            cache, reuse, hits = self._load(chunks, len(tokens), stack)
            try:
                out = self._forward(tokens, cache, reuse)
            except LayerLoadError as e:
                # A layer of the prefix failed to load mid-forward: recompute the request
                # from scratch rather than attend to a half-loaded prefix.
                log.warning("loading a cached prefix failed, recomputing it: %s", e)
                cache, reuse, hits = None, 0, {}
                out = self._forward(tokens, None, 0)
            logits = out.logits[:, -1:].float()  # [1, 1, vocab]
            prompt_cache = output_cache(out)  # the prefix and the computed tokens
        ttft = time.perf_counter() - t0
        # Chunks wholly inside the reused prefix came from the store; the rest may be new
        # (store_kv still skips any another request stored meanwhile).
        t1 = time.perf_counter()
        try:
            stored = self.store_kv(tokens, prompt_cache, start_chunk=reuse // self.chunk_size)
        except KVCacheError as e:
            # Caching is best effort: the logits are computed, a full store must not fail
            # the request. The next request with this prefix recomputes what is missing.
            log.warning("storing the KV of a %d-token prompt failed: %s", len(tokens), e)
            stored = 0
        return PrefillResult(
            logits=logits,
            cache=prompt_cache,
            reused_tokens=reuse,
            computed_tokens=len(tokens) - reuse,
            hits_by_tier=hits,
            ttft_s=ttft,
            stored_tokens=stored,
            store_s=time.perf_counter() - t1,
        )


    def blend(
        self,
        input_ids: torch.Tensor | Sequence[int],
        segments: Sequence[tuple[int, int]] | None = None,
        *,
        separator: Sequence[int] | None = None,
        policy: BlendPolicy | None = None,
        ratio: float = 0.15,
        store: bool = True,
    ) -> BlendResult:
        """Prefill a prompt reusing its cached segments wherever they sit (CacheBlend),
        recomputing ``ratio`` of the cached tokens, and store the segments it computed.

        input_ids: ``[T]`` or ``[1, T]``; segments: the ``(start, end)`` spans of the
        documents (or tool outputs, memories) in it, or separator: token ids that begin
        each one; tokens outside them are computed. policy: which cached tokens to
        recompute (``blend_policy``; default ``DeviationTopK()``, CacheBlend's). The
        result's ``plan`` says what each segment reused and why the rest missed; its
        ``cache`` continues in ``generate``. See ``connectors/blend.py``.
        """
        from kvcache.connectors.hf_blend import blend

        return blend(self, input_ids, segments, separator, policy, ratio, store)


def _model_id_of(model: PreTrainedModel) -> str:
    """The checkpoint name (and revision) a model was loaded from, for its KV keys; for a
    model that names no checkpoint, ``weights_model_id``."""
    config = model.config
    name = getattr(config, "_name_or_path", "") or ""
    if not name:
        return weights_model_id(model)
    revision = getattr(config, "_commit_hash", None)
    return f"{name}@{revision}" if revision else str(name)


def weights_model_id(model: PreTrainedModel) -> str:
    """An id for a model built in code: ``<model_type>-weights-<hash>`` over its config and
    every tensor of its ``state_dict`` (names, dtypes, shapes and bytes).

    Two random models of one config differ only in their weights, so a name cannot tell
    them apart and a shared name would serve one model's KV to the other: the weights
    themselves must be in the key. Config fields count too (an ``rms_norm_eps`` changes the
    KV); a field that does not (``use_cache``) only costs misses. Reads every weight once
    (each copied to CPU memory in turn); pass ``model_id=`` to skip that.
    """
    config = model.config
    fields = {
        k: v
        for k, v in config.to_dict().items()
        # private fields and the library version change nothing the KV depends on
        if not k.startswith("_") and k != "transformers_version"
    }
    h = xxhash.xxh3_128()
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.device.type == "meta":
                raise LayoutMismatchError(
                    f"{name} has no data yet (meta device), so the model's KV cannot be "
                    "keyed by its weights: load them first or pass model_id=... naming them"
                )
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy().data)
    return f"{config.model_type}-weights-{h.hexdigest()}"
