"""Reuse fidelity: how far a candidate KV cache of a context is from the exact one, and what
that does to the model's predictions of what follows.

One entry point, ``measure_fidelity``, serves every lossy or approximate way of obtaining a
context's KV: a codec round trip (same positions, lossy values), CacheBlend-style blending
(chunks computed apart and partly recomputed), or no reuse at all (the exact cache: every
figure is then exactly perfect, because the same arithmetic runs twice).

Shapes: canonical KV is ``[num_layers, 2, T, num_kv_heads, head_dim]`` (K then V), as in
``kvcache.connectors.hf``. Batch size is 1 everywhere. ``T`` is the context length and
``C`` the continuation length.

What is compared against the exact full prefill of ``context + continuation``:
- per-layer K and V normalised MSE ``‖cand − exact‖² / ‖exact‖²`` over the context's KV;
- the continuation is fed on top of the candidate cache (positions ``T .. T+C-1``); the
  ``C`` next-token distributions are compared with the exact cache's by
  ``KL(exact ‖ candidate)`` (nats, mean and max over positions) and top-1 agreement;
- continuation loss in bits per byte on the ``C − 1`` byte targets ``continuation[1:]``
  (the first continuation token is input, not predicted: its distribution comes from the
  context's last position, whose logits a cache does not hold), and its relative gap
  ``(candidate − exact) / exact``.

Over a set of windows, ``bootstrap_interval`` gives a figure's percentile bootstrap
interval (resampling windows), seeded so that the same figures give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcache.connectors.hf import (
    cache_kwarg,
    cache_to_canonical,
    canonical_to_cache,
    output_cache,
)

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

LN2 = math.log(2.0)
# Ids below this are bytes (the reference model's byte-level vocabulary); bits per byte
# counts only byte targets. Other vocabularies: pass ``byte_vocab=None`` (bits per token).
BYTE_VOCAB = 256


@dataclass(frozen=True)
class FidelityResult:
    """Figures for one (context, continuation, candidate). Perfect: zeros, 1.0, gap 0."""

    k_nmse: tuple[float, ...]  # per layer
    v_nmse: tuple[float, ...]  # per layer
    kl_mean: float  # nats, mean over the C continuation positions
    kl_max: float
    top1_agreement: float  # fraction of the C positions whose argmax matches exact
    exact_bpb: float  # continuation loss with the exact cache
    candidate_bpb: float
    bpb_gap: float  # (candidate_bpb - exact_bpb) / exact_bpb
    context_tokens: int
    continuation_tokens: int

    @property
    def k_nmse_mean(self) -> float:
        return sum(self.k_nmse) / len(self.k_nmse)

    @property
    def v_nmse_mean(self) -> float:
        return sum(self.v_nmse) / len(self.v_nmse)


def _ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[T]`` int64 from ``[T]``, ``[1, T]`` or a list."""
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise ValueError(f"token ids must be [T] or [1, T], got shape {tuple(t.shape)}")
    return t


@torch.no_grad()
def exact_kv(model: PreTrainedModel, context_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The full-prefill KV of the context: ``[layers, 2, T, kv_heads, head_dim]``."""
    ids = _ids(context_ids).to(model.device)
    out = model(input_ids=ids[None], use_cache=True)
    return cache_to_canonical(output_cache(out), 0, ids.shape[0])


@torch.no_grad()
def independent_chunks_kv(
    model: PreTrainedModel, chunks: Sequence[torch.Tensor | Sequence[int]]
) -> torch.Tensor:
    """KV of chunks each prefilled on its own, at the positions they hold in the prompt.

    The context is the concatenation of ``chunks``; chunk ``i`` attends only to itself (no
    cross-chunk attention), which is what reusing separately cached chunks without any
    recomputation gives — CacheBlend's "full reuse" end of the scale. Returns
    ``[layers, 2, sum(len(chunk)), kv_heads, head_dim]``.
    """
    parts = []
    offset = 0
    for chunk in chunks:
        ids = _ids(chunk).to(model.device)
        n = ids.shape[0]
        pos = torch.arange(offset, offset + n, device=model.device)[None]
        out = model(input_ids=ids[None], position_ids=pos, use_cache=True)
        parts.append(cache_to_canonical(output_cache(out), 0, n))
        offset += n
    return torch.cat(parts, dim=2)


@torch.no_grad()
def segments_apart_kv(
    model: PreTrainedModel, context: Sequence[int], segments: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """``[layers, 2, T, kv_heads, head_dim]`` of ``context``: each ``(start, end)`` segment's
    KV computed alone at its positions in the context (what a store of independently
    prefilled segments supplies to a blend), zeros elsewhere."""
    kv: torch.Tensor | None = None
    for s, e in segments:
        out = model(input_ids=torch.tensor([list(context[s:e])], device=model.device),
                    use_cache=True, position_ids=torch.arange(s, e, device=model.device)[None])
        part = cache_to_canonical(output_cache(out), 0, e - s)
        if kv is None:
            kv = part.new_zeros((*part.shape[:2], len(context), *part.shape[3:]))
        kv[:, :, s:e] = part
    if kv is None:
        raise ValueError("no segments")
    return kv


@torch.no_grad()
def continuation_logits(
    model: PreTrainedModel, kv: torch.Tensor, continuation_ids: torch.Tensor | Sequence[int]
) -> torch.Tensor:
    """Float64 logits ``[C, vocab]`` of the continuation fed on top of context KV ``kv``.

    kv: ``[layers, 2, T, kv_heads, head_dim]``; it is copied into a fresh cache, so the
    caller's tensor is never modified. Row ``i`` is the distribution of the token after
    ``continuation[i]``.
    """
    ids = _ids(continuation_ids).to(model.device)
    cache = canonical_to_cache(kv, model.config, model.device, model.dtype)
    t = kv.shape[2]
    pos = torch.arange(t, t + ids.shape[0], device=model.device)
    out = model(input_ids=ids[None], cache_position=pos, use_cache=True,
                **{cache_kwarg(model): cache})
    return out.logits[0].double().cpu()


def _nmse(cand: torch.Tensor, ref: torch.Tensor) -> float:
    ref64 = ref.double()
    denom = float(ref64.pow(2).sum())
    return float((cand.double() - ref64).pow(2).sum()) / max(denom, 1e-300)


def kv_nmse(candidate: torch.Tensor, exact: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-layer K and V normalised MSE; both ``[layers, 2, T, kv_heads, head_dim]``."""
    if candidate.shape != exact.shape:
        raise ValueError(
            f"candidate KV {tuple(candidate.shape)} does not match exact {tuple(exact.shape)}"
        )
    k = [_nmse(candidate[i, 0], exact[i, 0]) for i in range(exact.shape[0])]
    v = [_nmse(candidate[i, 1], exact[i, 1]) for i in range(exact.shape[0])]
    return k, v


def continuation_bpb(
    logits: torch.Tensor, continuation_ids: torch.Tensor, byte_vocab: int | None = BYTE_VOCAB
) -> float:
    """Bits per byte of ``continuation[1:]`` under ``logits[:-1]`` ``[C, vocab]``.

    Only targets below ``byte_vocab`` count (specials stand for no bytes); with
    ``byte_vocab=None`` every target counts and the figure is bits per token.
    """
    targets = continuation_ids[1:].to(logits.device)
    nats = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="none")
    keep = (
        targets < byte_vocab
        if byte_vocab is not None
        else torch.ones_like(targets, dtype=torch.bool)
    )
    n = int(keep.sum())
    if n == 0:
        raise ValueError("the continuation has no byte targets after its first token")
    return float(nats[keep].sum()) / n / LN2


def measure_fidelity(
    model: PreTrainedModel,
    context_ids: torch.Tensor | Sequence[int],
    continuation_ids: torch.Tensor | Sequence[int],
    candidate: torch.Tensor | DynamicCache,
    *,
    exact: torch.Tensor | None = None,
    exact_logits: torch.Tensor | None = None,
    byte_vocab: int | None = BYTE_VOCAB,
) -> FidelityResult:
    """Compare a candidate context KV with the exact one (see the module docstring).

    context_ids: ``[T]``; continuation_ids: ``[C]``, ``C >= 2``; candidate: canonical
    ``[layers, 2, T, kv_heads, head_dim]`` or a ``DynamicCache`` holding (at least) the
    context's ``T`` tokens per layer ``[1, kv_heads, >=T, head_dim]``. ``exact`` and
    ``exact_logits`` (``[C, vocab]`` from ``continuation_logits``) may be passed to reuse
    them across candidates of the same prompt.
    """
    ctx = _ids(context_ids)
    cont = _ids(continuation_ids)
    if cont.shape[0] < 2:
        raise ValueError("the continuation needs at least 2 tokens (one input, one target)")
    t = ctx.shape[0]
    cand_kv = (
        candidate if isinstance(candidate, torch.Tensor) else cache_to_canonical(candidate, 0, t)
    )
    if exact is None:
        exact = exact_kv(model, ctx)
    if cand_kv.shape[2] != t:
        raise ValueError(f"candidate KV holds {cand_kv.shape[2]} tokens, the context {t}")
    k, v = kv_nmse(cand_kv, exact)
    if exact_logits is None:
        exact_logits = continuation_logits(model, exact, cont)
    cand_logits = continuation_logits(model, cand_kv, cont)
    logp_exact = torch.log_softmax(exact_logits, dim=-1)
    logp_cand = torch.log_softmax(cand_logits, dim=-1)
    kl = (logp_exact.exp() * (logp_exact - logp_cand)).sum(-1).clamp_min(0.0)  # [C]
    top1 = (exact_logits.argmax(-1) == cand_logits.argmax(-1)).double().mean()
    exact_bpb = continuation_bpb(exact_logits, cont, byte_vocab)
    cand_bpb = continuation_bpb(cand_logits, cont, byte_vocab)
    return FidelityResult(
        k_nmse=tuple(k),
        v_nmse=tuple(v),
        kl_mean=float(kl.mean()),
        kl_max=float(kl.max()),
        top1_agreement=float(top1),
        exact_bpb=exact_bpb,
        candidate_bpb=cand_bpb,
        bpb_gap=(cand_bpb - exact_bpb) / exact_bpb,
        context_tokens=t,
        continuation_tokens=int(cont.shape[0]),
    )


# A way of producing a candidate context KV: (model, context chunks, exact KV) → candidate.
# ``chunks`` are the prompt's context pieces (one piece for a plain prefix prompt), ``[n_i]``
# each; ``exact`` is ``[layers, 2, T, kv_heads, head_dim]`` (what a codec would compress).
CandidateFn = Callable[["PreTrainedModel", Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FidelitySummary:
    """Means over prompts of ``FidelityResult`` figures (per-layer NMSE averaged too)."""

    prompts: int
    k_nmse: tuple[float, ...]
    v_nmse: tuple[float, ...]
    kl_mean: float
    kl_max: float
    top1_agreement: float
    exact_bpb: float
    candidate_bpb: float
    bpb_gap: float  # of the pooled means: (candidate_bpb - exact_bpb) / exact_bpb


def summarize(results: Sequence[FidelityResult]) -> FidelitySummary:
    if not results:
        raise ValueError("no results to summarize")
    n = len(results)
    layers = len(results[0].k_nmse)

    def mean(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs)

    exact_bpb = mean([r.exact_bpb for r in results])
    cand_bpb = mean([r.candidate_bpb for r in results])
    return FidelitySummary(
        prompts=n,
        k_nmse=tuple(mean([r.k_nmse[i] for r in results]) for i in range(layers)),
        v_nmse=tuple(mean([r.v_nmse[i] for r in results]) for i in range(layers)),
        kl_mean=mean([r.kl_mean for r in results]),
        kl_max=max(r.kl_max for r in results),
        top1_agreement=mean([r.top1_agreement for r in results]),
        exact_bpb=exact_bpb,
        candidate_bpb=cand_bpb,
        bpb_gap=(cand_bpb - exact_bpb) / exact_bpb,
    )


def bootstrap_interval(
    values: Sequence[float],
    *,
    confidence: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one figure per window).

    Windows are resampled with replacement ``resamples`` times with a fixed seed, so the
    same values always give the same interval. The interval is over windows only: windows
    cut from one file are not independent, so treat it as a lower bound on the
    uncertainty. For a paired comparison of two candidates on the same windows, pass the
    per-window differences.
    """
    if not values:
        raise ValueError("no values to bootstrap")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)
    means = x[idx].mean(1)
    tail = (1.0 - confidence) / 2
    q = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(q[0]), float(q[1])


def evaluate_candidates(
    model: PreTrainedModel,
    prompts: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor]],
    candidate_fn: CandidateFn,
) -> FidelitySummary:
    """Run ``candidate_fn`` on every prompt ``(context chunks, continuation)`` and summarize.

    For the reference evaluation set: ``[(p.chunk_tensors(), p.continuation_tensor())
    for p in kvcache.tools.refmodel.evalset.build_evalset()]``.
    """
    results = []
    for chunks, cont in prompts:
        ctx = torch.cat([_ids(c) for c in chunks])
        exact = exact_kv(model, ctx)
        cand = candidate_fn(model, chunks, exact)
        results.append(measure_fidelity(model, ctx, cont, cand, exact=exact))
    return summarize(results)
