"""Blended prefill for transformers Llama-family models: cached segments anywhere in the
prompt, the few tokens that need it recomputed, with an exact causal mask.

``blend_prefill`` runs the model's decoder layers itself, one at a time:

1. every token's hidden state goes in at layer 0 — except that a policy deciding before
   layer 0 (``check_layer`` None) keeps only the tokens it recomputes plus those always
   computed (outside cached segments, and the last token);
2. a layer computes Q/K/V for the tokens still in flight (``rows``) and writes their K/V
   over the cached K/V of that layer (the cached keys were rotated to their positions in
   this prompt when loaded), then attends from each of them to *every* earlier token's
   K/V — cached or fresh — by position (token ``p`` sees keys ``0..p``; queries go a
   block at a time, each block reading the keys up to its last position, so the work
   follows the causal triangle as in a prefill), then its MLP;
3. after ``check_layer`` (which every token went through) the policy compares the fresh
   K/V there with the cached K/V, picks the tokens to recompute, and the others leave the
   computation: their K/V in later layers stays the cached one.

Only Q/K/V projections, attention and MLP of the tokens in flight are computed, so the
cost past the check layer scales with the recompute ratio. The layers themselves are the
model's own modules (norms, projections, RoPE, attention implementation), so recomputing
every token is the model's own prefill, and recomputing none leaves the cached K/V
exactly as loaded. The result is a ``DynamicCache`` of the whole prompt that ``generate``
continues from.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvcache.connectors.blend_plan import MISS_REASONS, BlendPlan
from kvcache.connectors.blend_policy import BlendPolicy, budget_tokens
from kvcache.kernels.blend_select import kv_deviation
from kvcache.kvstore.errors import LayoutMismatchError

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

# Layer i's cached K/V for the whole prompt: [2, num_tokens, kv_heads, head_dim] in the
# model's dtype and device (anything where the plan has no cached token: it is computed).
CachedLayer = Callable[[int], torch.Tensor]


@dataclass
class BlendOutput:
    """logits: fp32 ``[1, 1, vocab]`` at the last prompt token; cache: the prompt's KV
    (per layer ``[1, kv_heads, T, head_dim]``); recomputed: ascending int64 positions of
    the cached tokens that were recomputed; computed: how many tokens were computed
    because nothing was cached for them."""

    logits: torch.Tensor
    cache: DynamicCache
    recomputed: torch.Tensor
    computed: int


class _RowsCache:
    """What the attention modules see as their cache: per layer the whole prompt's K/V
    (``[1, kv_heads, T, head_dim]``), into which ``update`` writes the fresh K/V of the
    tokens in flight (``rows``) and returns the whole."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.rows: torch.Tensor | None = None  # None: every token

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is None or k is None or v is None:
            self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
            return key_states, value_states
        k[:, :, self.rows] = key_states
        v[:, :, self.rows] = value_states
        return k, v


def _decoder(model: PreTrainedModel) -> Any:
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, p) for p in parts) \
            or not hasattr(model, "lm_head"):
        raise LayoutMismatchError(
            f"blending runs Llama-family decoders (Llama, Qwen2, Mistral); "
            f"{type(model).__name__} is not one")
    return inner


def _causal_mask(n: int, model: PreTrainedModel, device: torch.device
                 ) -> torch.Tensor | None:
    """The model's own attention over all ``n`` tokens: SDPA needs no mask (causal), as
    in the model's own forward; eager attention adds one."""
    if getattr(model.config, "_attn_implementation", "eager") == "sdpa":
        return None
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    neg = torch.full((), torch.finfo(model.dtype).min, dtype=model.dtype, device=device)
    return torch.where(allowed, torch.zeros((), dtype=model.dtype, device=device), neg)[
        None, None]


# Queries of the tokens in flight attend a block at a time; a block reads the keys up to
# its last token's position only, so the cost follows the causal triangle, as a causal
# prefill's does, instead of every query reading every key.
_QUERY_BLOCK = 256
_BLOCKED = "kvcache_blend"
# Per model config (by id) switched to _BLOCKED: the attention it had before, and how
# many layer calls are inside the switch (blends in several threads may overlap). A
# forward that is not a blend's, running meanwhile, goes to the model's own attention.
_switched: dict[int, tuple[str, int]] = {}
_switch_lock = threading.Lock()


def _blocked_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``). query ``[1, heads, S,
    head_dim]`` of the tokens at positions ``kvcache_rows`` (int64 ``[S]``, ascending);
    key/value ``[1, kv_heads, T, head_dim]``, every token's. Each query sees keys up to
    its position. Returns ``[1, S, heads, head_dim]``."""
    rows = kwargs.pop("kvcache_rows", None)
    if rows is None:  # another forward of this model, while a blend runs
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = _switched.get(id(module.config), ("sdpa", 0))[0]
        # "eager" is each model file's own function, not a registered one.
        eager = sys.modules[type(module).__module__].eager_attention_forward
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager) if impl != "eager" else eager
        return fn(module, query, key, value, attention_mask,
                  scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    keys = torch.arange(key.shape[2], device=query.device)
    for s in range(0, query.shape[2], _QUERY_BLOCK):
        pos = rows[s : s + _QUERY_BLOCK]
        end = int(pos[-1]) + 1
        mask = keys[None, :end] <= pos[:, None]  # [block, end]
        out[:, :, s : s + _QUERY_BLOCK] = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s : s + _QUERY_BLOCK], key[:, :, :end], value[:, :, :end],
            attn_mask=mask[None, None], scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _blocked_attention_on(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention is ``_blocked_attention`` inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(_BLOCKED, _blocked_attention)
    config = model.config
    with _switch_lock:
        own, users = _switched.get(id(config), (config._attn_implementation or "sdpa", 0))
        _switched[id(config)] = (own, users + 1)
        config._attn_implementation = _BLOCKED
    try:
        yield
    finally:
        with _switch_lock:
            own, users = _switched[id(config)]
            if users == 1:  # the last one out restores the model's own
                del _switched[id(config)]
                config._attn_implementation = own
            else:
                _switched[id(config)] = (own, users - 1)


def _cache_kwarg(layer: torch.nn.Module) -> str:
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def blend_prefill(model: PreTrainedModel, input_ids: torch.Tensor, plan: BlendPlan,
                  cached_layer: CachedLayer, policy: BlendPolicy, ratio: float
                  ) -> BlendOutput:
    """Prefill ``input_ids`` (int64 ``[T]``) reusing the cached tokens of ``plan`` (module
    docstring). cached_layer(i): layer ``i``'s cached K/V (``CachedLayer``), asked once for
    each layer from the check layer on (from layer 0 for a policy without one), in order;
    policy and ratio: which cached tokens to recompute (``blend_policy``)."""
    inner = _decoder(model)
    device = model.device
    n = plan.num_tokens
    if input_ids.dim() != 1 or input_ids.shape[0] != n or n == 0:
        raise LayoutMismatchError(f"input_ids must be [{n}] (the plan's tokens), got "
                                  f"{tuple(input_ids.shape)}")
    layers = list(inner.layers)
    check = policy.check_layer
    if check is not None and not 0 <= check < len(layers):
        raise LayoutMismatchError(f"check layer {check} is not one of the model's "
                                  f"{len(layers)} layers")
    cached = plan.cached_mask().to(device)
    always = ~cached
    always[n - 1] = True  # the last token's logits are the output
    budget = budget_tokens(plan, ratio)

    def in_flight(recompute: torch.Tensor) -> torch.Tensor:
        """Positions computed from here on: ``recompute`` and the always computed."""
        mask = always.clone()
        mask[recompute.to(device)] = True
        return torch.nonzero(mask).flatten()

    positions = torch.arange(n, device=device)[None]
    hidden = inner.embed_tokens(input_ids.to(device)[None])  # [1, T, hidden]
    cos, sin = inner.rotary_emb(hidden, positions)
    recomputed = torch.zeros(0, dtype=torch.int64)
    rows: torch.Tensor | None = None  # None: every token is in flight
    if check is None:
        recomputed = policy.select(plan, budget, None)
        rows = in_flight(recomputed)
        hidden = hidden[:, rows]
    kv = _RowsCache(len(layers))
    kwarg = _cache_kwarg(layers[0])
    for i, layer in enumerate(layers):
        # Layers before the check layer compute every token and need no cached K/V: the
        # loads may still be on their way.
        needed = rows is not None or i == check
        layer_kv = cached_layer(i) if needed else None  # [2, T, kv_heads, head_dim]
        kv.rows = rows
        if rows is None:  # every token: the model's own causal attention
            out = layer(hidden, attention_mask=_causal_mask(n, model, device),
                        position_ids=positions, use_cache=True, position_embeddings=(cos, sin),
                        **{kwarg: kv})
        else:  # the others keep the cached K/V of this layer
            assert layer_kv is not None
            kv.keys[i], kv.values[i] = (
                layer_kv[p].transpose(0, 1)[None].clone(memory_format=torch.contiguous_format)
                for p in (0, 1))
            with _blocked_attention_on(model):
                out = layer(hidden, attention_mask=None, position_ids=positions[:, rows],
                            use_cache=True, position_embeddings=(cos[:, rows], sin[:, rows]),
                            kvcache_rows=rows, **{kwarg: kv})
        hidden = out[0] if isinstance(out, tuple) else out
        if i == check:
            assert layer_kv is not None
            dev = _deviation(kv, i, layer_kv, policy.planes)
            recomputed = policy.select(plan, budget, dev)
            rows = in_flight(recomputed)
            hidden = hidden[:, rows]
    logits = model.lm_head(inner.norm(hidden[:, -1:])).float()  # [1, 1, vocab]
    return BlendOutput(logits, _to_dynamic_cache(model, kv), recomputed.cpu(),
                       int((~cached).sum()))


def _deviation(kv: _RowsCache, i: int, cached: torch.Tensor, planes: str) -> torch.Tensor:
    """fp32 ``[T]``: per token, how far layer ``i``'s fresh K/V (every token computed)
    are from the cached ones (``cached``: ``[2, T, kv_heads, head_dim]``), on ``planes``."""
    fresh_k, fresh_v = kv.keys[i], kv.values[i]
    assert fresh_k is not None and fresh_v is not None
    fresh = {"k": fresh_k[0].transpose(0, 1), "v": fresh_v[0].transpose(0, 1)}
    old = {"k": cached[0], "v": cached[1]}
    args = [t for p in planes for t in (fresh[p], old[p].to(fresh[p].dtype))]
    return kv_deviation(*args)


def _to_dynamic_cache(model: PreTrainedModel, kv: _RowsCache) -> DynamicCache:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(zip(kv.keys, kv.values, strict=True)):
        assert k is not None and v is not None
        cache.update(k, v, i)
    return cache


@dataclass
class BlendResult:
    """Outcome of ``HFConnector.blend``.

    logits: fp32 ``[1, 1, vocab]`` at the last prompt token; cache: the prompt's
    ``DynamicCache``, ready for ``generate``; plan: what the store held of each segment
    and why the rest missed (after loading); reused_tokens: tokens whose cached KV was kept
    in every layer; recomputed_tokens: cached tokens recomputed past the check layer;
    computed_tokens: tokens nothing was cached for; ttft_s: lookup, loads and the forward
    pass; stored_tokens / store_s: segments stored afterwards and the time it took.
    """

    logits: torch.Tensor
    cache: DynamicCache
    plan: BlendPlan
    policy: str
    ratio: float
    reused_tokens: int
    recomputed_tokens: int
    computed_tokens: int
    hits_by_tier: dict[str, int] = field(default_factory=dict)
    ttft_s: float = 0.0
    stored_tokens: int = 0
    store_s: float = 0.0


@dataclass
class BlendStats:
    """Counters over a connector's blends."""

    blends: int = 0
    segments: int = 0
    segments_reused: int = 0  # wholly or in part
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    computed_tokens: int = 0
    missed_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MISS_REASONS, 0))

    def add(self, r: BlendResult) -> None:
        self.blends += 1
        segments = [s for s in r.plan.spans if s.is_segment]
        self.segments += len(segments)
        self.segments_reused += sum(1 for s in segments if s.cached_tokens)
        self.reused_tokens += r.reused_tokens
        self.recomputed_tokens += r.recomputed_tokens
        self.computed_tokens += r.computed_tokens
        for reason, n in r.plan.missed_tokens().items():
            self.missed_tokens[reason] = self.missed_tokens.get(reason, 0) + n
