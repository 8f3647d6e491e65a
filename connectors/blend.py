"""Blended prefill for transformers Llama-family models: cached segments anywhere in the
prompt, the few tokens that need it recomputed, with an exact causal mask.

``blend_prefill`` runs the model's decoder layers itself, one at a time:

1. every token's hidden state goes in at layer 0 — except that a policy deciding before
   layer 0 (``check_layer`` None) keeps only the tokens it recomputes plus those always
   computed (outside cached segments, and the last token);
2. a layer computes Q/K/V for the tokens still in flight (``rows``) and writes their K/V
   over the cached K/V of that layer (the cached keys were rotated to their positions in
   this prompt when loaded), then attends from each of them to *every* earlier token's
   K/V — cached or fresh — through a mask built from positions (token ``p`` sees keys
   ``0..p``), then its MLP;
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

import inspect
from collections.abc import Callable
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


def _mask(rows: torch.Tensor | None, n: int, model: PreTrainedModel, device: torch.device
          ) -> torch.Tensor | None:
    """The attention mask of the tokens in flight over all ``n`` keys: row ``q`` (the
    token at position ``rows[q]``) sees keys ``0..rows[q]``. SDPA takes it as bool (and
    no mask at all for a plain causal prefill, as the model's own forward does); eager
    attention adds it."""
    impl = getattr(model.config, "_attn_implementation", "eager")
    pos = torch.arange(n, device=device) if rows is None else rows
    allowed = torch.arange(n, device=device)[None, :] <= pos[:, None]  # [q, n]
    if impl == "sdpa":
        return None if rows is None else allowed[None, None]
    neg = torch.finfo(model.dtype).min
    zero = torch.zeros((), dtype=model.dtype, device=device)
    return torch.where(allowed, zero, torch.full((), neg, dtype=model.dtype, device=device)
                       )[None, None]


def _cache_kwarg(layer: torch.nn.Module) -> str:
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def blend_prefill(model: PreTrainedModel, input_ids: torch.Tensor, plan: BlendPlan,
                  cached_layer: CachedLayer, policy: BlendPolicy, ratio: float
                  ) -> BlendOutput:
    """Prefill ``input_ids`` (int64 ``[T]``) reusing the cached tokens of ``plan`` (module
    docstring). cached_layer(i): layer ``i``'s cached K/V (``CachedLayer``), asked once per
    layer in order; policy and ratio: which cached tokens to recompute
    (``blend_policy``)."""
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

    ids = input_ids.to(device)[None]
    hidden = inner.embed_tokens(ids)  # [1, T, hidden]
    positions = torch.arange(n, device=device)[None]
    cos, sin = inner.rotary_emb(hidden, positions)
    recomputed = torch.zeros(0, dtype=torch.int64)
    rows: torch.Tensor | None = None  # None: every token is in flight

    def keep(chosen: torch.Tensor) -> torch.Tensor:
        mask = always.clone()
        mask[chosen.to(device)] = True
        return torch.nonzero(mask).flatten()

    if check is None:
        recomputed = policy.select(plan, budget, None)
        rows = keep(recomputed)
        hidden = hidden[:, rows]
    kv = _RowsCache(len(layers))
    kwarg = _cache_kwarg(layers[0])
    for i, layer in enumerate(layers):
        layer_kv = cached_layer(i)  # [2, T, kv_heads, head_dim]
        if rows is not None:  # the tokens out of flight keep the cached K/V
            kv.keys[i], kv.values[i] = (
                layer_kv[p].transpose(0, 1)[None].clone(memory_format=torch.contiguous_format)
                for p in (0, 1))
        kv.rows = rows
        sel = slice(None) if rows is None else rows
        out = layer(hidden, attention_mask=_mask(rows, n, model, device),
                    position_ids=positions[:, sel], use_cache=True,
                    position_embeddings=(cos[:, sel], sin[:, sel]), **{kwarg: kv})
        hidden = out[0] if isinstance(out, tuple) else out
        if i == check:
            fresh_k, fresh_v = kv.keys[i], kv.values[i]
            assert fresh_k is not None and fresh_v is not None
            f = {"k": fresh_k[0].transpose(0, 1), "v": fresh_v[0].transpose(0, 1)}
            c = {"k": layer_kv[0], "v": layer_kv[1]}
            planes = list(policy.planes)
            dev = kv_deviation(f[planes[0]], c[planes[0]].to(f[planes[0]].dtype),
                               *((f["v"], c["v"].to(f["v"].dtype)) if len(planes) == 2
                                 else ()))
            recomputed = policy.select(plan, budget, dev)
            rows = keep(recomputed)
            hidden = hidden[:, rows]
    last = inner.norm(hidden[:, -1:])
    logits = model.lm_head(last).float()  # [1, 1, vocab]
    return BlendOutput(logits, _to_dynamic_cache(model, kv), recomputed.cpu(),
                       int((~cached).sum()))


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
