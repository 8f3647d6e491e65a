"""Which cached tokens a blended prefill recomputes: small, pluggable selection policies.

Every policy spends the same budget: ``budget_tokens(plan, ratio)`` = ``ceil(ratio ×``
the tokens the store supplies``)``. Tokens outside cached segments (a preamble, the
question, segments that missed) are always computed and never count against it, and
neither does the prompt's last token (its logits are the output).

A policy either selects before the first layer (``check_layer`` None: it needs no fresh
KV) or after computing every token through ``check_layer`` (CacheBlend's check layer),
from the per-token deviation between the fresh K/V there and the cached K/V
(``kernels.blend_select.kv_deviation``); then only the selected tokens (and the always
computed ones) go through the remaining layers.

- ``DeviationTopK`` (CacheBlend): the tokens whose K, V or both deviate most;
- ``FirstTokens`` (EPIC / LegoLink): the first tokens of every cached segment, the budget
  split in proportion to their lengths — they fix the attention sink each chunk had when
  it was prefilled alone;
- ``ChunkReuse`` (Cache-Craft-like): whole chunks, those deviating most on average,
  while they fit the budget — reuse a chunk's cache or recompute it whole;
- ``RandomTokens``: a seeded random choice (the control);
- ``FullReuse`` / ``FullPrefill``: recompute none / all of them, whatever the ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from kvcache.connectors.blend_plan import BlendPlan
from kvcache.kvstore.errors import ConfigError


def budget_tokens(plan: BlendPlan, ratio: float) -> int:
    """How many cached tokens a recompute ``ratio`` (in ``[0, 1]``) buys."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"the recompute ratio must be in [0, 1], got {ratio}")
    return math.ceil(ratio * plan.cached_tokens)


def _cached_positions(plan: BlendPlan) -> torch.Tensor:
    return torch.nonzero(plan.cached_mask()).flatten()


class BlendPolicy(Protocol):
    """name: for reports; check_layer: the layer whose fresh K/V ``select`` compares (None:
    it selects before layer 0); planes: "k", "v" or "kv", the planes compared."""

    name: str
    check_layer: int | None
    planes: str

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        """Ascending int64 positions of at most ``budget`` cached tokens to recompute.
        deviation: fp32 ``[num_tokens]`` at the check layer (None before layer 0)."""
        ...


@dataclass(frozen=True)
class FullReuse:
    name: ClassVar[str] = "full reuse"
    check_layer: ClassVar[None] = None
    planes: ClassVar[str] = "kv"

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class FullPrefill:
    name: ClassVar[str] = "full prefill"
    check_layer: ClassVar[None] = None
    planes: ClassVar[str] = "kv"

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        return _cached_positions(plan)


@dataclass(frozen=True)
class DeviationTopK:
    """CacheBlend: the ``budget`` cached tokens deviating most at ``check_layer``."""

    check_layer: int = 1
    planes: str = "kv"
    name: ClassVar[str] = "cacheblend"

    def __post_init__(self) -> None:
        _check_planes(self.planes)

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        assert deviation is not None
        cached = _cached_positions(plan)
        dev = deviation.cpu()[cached]
        # A stable descending sort: ties go to earlier tokens, deterministically.
        order = torch.sort(dev, descending=True, stable=True).indices[:budget]
        return cached[order].sort().values


@dataclass(frozen=True)
class FirstTokens:
    """EPIC / LegoLink: the first tokens of each cached segment."""

    name: ClassVar[str] = "first-k"
    check_layer: ClassVar[None] = None
    planes: ClassVar[str] = "kv"

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        spans = [s for s in plan.spans if s.cached_tokens]
        total = sum(s.cached_tokens for s in spans)
        if not total:
            return torch.zeros(0, dtype=torch.int64)
        # Largest remainders: the shares sum to the budget exactly.
        exact = [budget * s.cached_tokens / total for s in spans]
        share = [math.floor(x) for x in exact]
        for i in sorted(range(len(spans)), key=lambda i: share[i] - exact[i])[
                : budget - sum(share)]:
            share[i] += 1
        picks = [torch.arange(s.start, s.start + min(k, s.cached_tokens))
                 for s, k in zip(spans, share, strict=True)]
        return torch.cat(picks).to(torch.int64)


@dataclass(frozen=True)
class ChunkReuse:
    """Cache-Craft-like: recompute whole cached chunks, highest mean deviation at
    ``check_layer`` first, each one that still fits the budget."""

    check_layer: int = 1
    planes: str = "kv"
    name: ClassVar[str] = "chunk reuse"

    def __post_init__(self) -> None:
        _check_planes(self.planes)

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        assert deviation is not None
        dev = deviation.cpu()
        chunks: list[tuple[float, int, int]] = []
        for s in plan.spans:
            for c in s.chunks:
                if c.end <= s.cached_tokens:
                    a, b = s.start + c.start, s.start + c.end
                    chunks.append((float(dev[a:b].mean()), a, b))
        picks, left = [], budget
        for _, a, b in sorted(chunks, key=lambda c: -c[0]):
            if b - a <= left:
                picks.append(torch.arange(a, b))
                left -= b - a
        if not picks:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat(picks).sort().values.to(torch.int64)


@dataclass(frozen=True)
class RandomTokens:
    """The control: ``budget`` cached tokens drawn at random (seeded)."""

    seed: int = 0
    name: ClassVar[str] = "random"
    check_layer: ClassVar[None] = None
    planes: ClassVar[str] = "kv"

    def select(self, plan: BlendPlan, budget: int, deviation: torch.Tensor | None
               ) -> torch.Tensor:
        cached = _cached_positions(plan)
        g = torch.Generator().manual_seed(self.seed)
        return cached[torch.randperm(len(cached), generator=g)[:budget]].sort().values


def _check_planes(planes: str) -> None:
    if planes not in ("k", "v", "kv"):
        raise ConfigError(f"planes must be 'k', 'v' or 'kv', got {planes!r}")

