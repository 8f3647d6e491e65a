"""Blend token selection (CacheBlend): which tokens' cached KV deviates most from the KV
the model computes when it sees the whole new context.

At a check layer the engine has, for every token of the blended prompt, K (and V) freshly
computed and the cached K (and V) of the reused chunks (already RoPE-shifted to the new
positions). The tokens with the largest deviation are recomputed through the remaining
layers; the rest reuse the cache. ``kv_deviation`` gives the per-token deviation (squared
L2 over heads × head_dim, K plus V, fp32); ``select_tokens`` picks the top ``ratio`` of
tokens or every token above ``threshold``, as indices in token order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcache.kernels.dispatch import Impl, interpreting, next_pow2, use_triton
from kvcache.kvstore.errors import LayoutMismatchError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class BlendSelection:
    """indices: int64 ``[k]``, ascending token indices to recompute; deviation: fp32
    ``[tokens]``, the per-token deviation they were chosen by."""

    indices: torch.Tensor
    deviation: torch.Tensor


def _check(fresh: torch.Tensor, cached: torch.Tensor, what: str) -> None:
    if fresh.shape != cached.shape or fresh.dim() != 3:
        raise LayoutMismatchError(f"fresh and cached {what} must both be [tokens, heads, "
                                  f"head_dim], got {tuple(fresh.shape)} and "
                                  f"{tuple(cached.shape)}")
    if fresh.dtype not in _DTYPES or cached.dtype != fresh.dtype:
        raise LayoutMismatchError(f"{what} must be one of {_DTYPES} on both sides, got "
                                  f"{fresh.dtype} and {cached.dtype}")
    if fresh.device != cached.device:
        raise LayoutMismatchError(f"fresh and cached {what} are on {fresh.device} and "
                                  f"{cached.device}")


def kv_deviation_reference(
    fresh_k: torch.Tensor,
    cached_k: torch.Tensor,
    fresh_v: torch.Tensor | None = None,
    cached_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch. All inputs ``[tokens, kv_heads, head_dim]``; returns fp32 ``[tokens]``."""
    dev = (fresh_k.float() - cached_k.float()).square().sum(dim=(1, 2))
    if fresh_v is not None and cached_v is not None:
        dev += (fresh_v.float() - cached_v.float()).square().sum(dim=(1, 2))
    return dev


def kv_deviation(
    fresh_k: torch.Tensor,
    cached_k: torch.Tensor,
    fresh_v: torch.Tensor | None = None,
    cached_v: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Per-token ``sum((fresh - cached)**2)`` of K, plus V when both V are given.

    fresh_k, cached_k (fresh_v, cached_v): ``[tokens, kv_heads, head_dim]`` fp16/bf16/fp32
    at the check layer, cached K already at the fresh positions. Returns fp32 ``[tokens]``.
    """
    _check(fresh_k, cached_k, "K")
    has_v = fresh_v is not None or cached_v is not None
    if has_v:
        if fresh_v is None or cached_v is None:
            raise LayoutMismatchError("give both fresh_v and cached_v, or neither")
        _check(fresh_v, cached_v, "V")
        if fresh_v.shape != fresh_k.shape:
            raise LayoutMismatchError("K and V must have the same shape")
    if not use_triton(impl, fresh_k.device):
        return kv_deviation_reference(fresh_k, cached_k, fresh_v, cached_v)
    from kvcache.kernels._triton.blend_select import kv_deviation_kernel

    tokens = fresh_k.shape[0]
    row = fresh_k.shape[1] * fresh_k.shape[2]
    out = torch.empty(tokens, dtype=torch.float32, device=fresh_k.device)
    if tokens == 0:
        return out
    fk, ck = fresh_k.contiguous(), cached_k.contiguous()
    fv, cv = (fresh_v.contiguous(), cached_v.contiguous()) if has_v else (fk, ck)  # type: ignore[union-attr]
    if interpreting() and fresh_k.device.type != "cuda":
        block_d = next_pow2(row)
        block_t = min(next_pow2(tokens), max(1, 65536 // block_d))
    else:
        block_d = min(next_pow2(row), 512)
        block_t = 16
    grid = (-(-tokens // block_t),)
    kv_deviation_kernel[grid](fk, ck, fv, cv, out, tokens, ROW=row, HAS_V=has_v,
                              BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out


def top_tokens(
    deviation: torch.Tensor, *, ratio: float | None = None, threshold: float | None = None
) -> torch.Tensor:
    """Ascending int64 indices of the ``ceil(ratio * tokens)`` largest deviations, or of
    every deviation ``> threshold``. deviation: fp32 ``[tokens]``. Exactly one of ratio
    (in ``[0, 1]``) and threshold must be given; ties are broken towards lower indices."""
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio= and threshold=")
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        k = min(deviation.numel(), math.ceil(ratio * deviation.numel()))
        # A stable descending sort makes ties deterministic (topk's are not).
        order = torch.sort(deviation, descending=True, stable=True).indices
        return order[:k].sort().values
    assert threshold is not None
    return torch.nonzero(deviation > threshold).flatten()


def select_tokens(
    fresh_k: torch.Tensor,
    cached_k: torch.Tensor,
    fresh_v: torch.Tensor | None = None,
    cached_v: torch.Tensor | None = None,
    *,
    ratio: float | None = None,
    threshold: float | None = None,
    impl: Impl = "auto",
) -> BlendSelection:
    """``kv_deviation`` then ``top_tokens``: the tokens to recompute.

    fresh_k, cached_k (fresh_v, cached_v): ``[tokens, kv_heads, head_dim]``.
    """
    dev = kv_deviation(fresh_k, cached_k, fresh_v, cached_v, impl=impl)
    return BlendSelection(top_tokens(dev, ratio=ratio, threshold=threshold), dev)
