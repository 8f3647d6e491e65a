"""Synthetic KV that exercises what real KV does to codecs: heavy tails (Student-t),
outlier K channels, per-channel offsets and an attention-sink token. Used by the codec
tests and by ``kvcache bench codecs`` for shapes the reference model does not have (a
Llama-3-8B-sized chunk); on the reference model's real KV, cachegen needs fewer bits."""

from __future__ import annotations

import torch

from kvcache.kvstore.layout import KVLayout


def synthetic_kv(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    """``[L, 2, tokens, H, D]`` of ``layout.torch_dtype``."""
    g = torch.Generator().manual_seed(seed)
    shape = layout.chunk_shape(tokens)
    u = torch.rand(shape, generator=g).clamp(1e-6, 1 - 1e-6)
    # Student-t with 4 degrees of freedom via a normal over a chi-square.
    n = torch.randn(shape, generator=g)
    chi = torch.randn((*shape, 4), generator=g).square().sum(-1) / 4
    x = n / chi.sqrt() * 0.5 + (u - 0.5) * 0.1
    x[:, 0, :, :, 1] *= 12.0  # outlier K channel in every head
    x[:, 0, :, 0, :] += 2.0  # per-channel offset of K
    x[:, :, 0] *= 8.0  # attention sink
    return x.to(layout.torch_dtype)


def nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean() / (b.float() ** 2).mean())
