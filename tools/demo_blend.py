"""``kvcache demo --blend``: reusing documents anywhere in the prompt, against full prefill.

A RAG workload on the demo's model: a pool of documents; each request is a preamble, four
documents drawn from the pool in a shuffled order, and a question. Every request is
prefilled twice in the same run: in full (the baseline) and through ``HFConnector.blend``
(CacheBlend, 15% of the cached tokens recomputed), which finds the documents earlier
requests stored wherever they sit now. Reported per request: TTFT of both, the tokens
reused and recomputed, and how far the blended next-token distribution is from the full
prefill's (KL, and whether their top tokens agree). The first requests find few
documents stored; later ones find most.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from kvcache.tools.demo import VOCAB, _full_prefill, _model, _store_config

DOCUMENTS = 8
DOCUMENT_TOKENS = 384
DOCUMENTS_PER_REQUEST = 4
PREAMBLE_TOKENS = 32
QUESTION_TOKENS = 24
RATIO = 0.15


def _workload(requests: int, seed: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    g = torch.Generator().manual_seed(seed + 2)
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    docs = [tokens(DOCUMENT_TOKENS) for _ in range(DOCUMENTS)]
    out = []
    for _ in range(requests):
        ids, spans = tokens(PREAMBLE_TOKENS), []
        for d in rng.sample(range(DOCUMENTS), DOCUMENTS_PER_REQUEST):
            spans.append((len(ids), len(ids) + DOCUMENT_TOKENS))
            ids += docs[d]
        out.append((ids + tokens(QUESTION_TOKENS), spans))
    return out


def run_blend_demo(store_dir: Path | None, *, requests: int = 8, seed: int = 0,
                   config_file: str | None = None) -> dict[str, Any]:
    """Run the workload (module docstring) against the configured store (or
    ``store_dir``); a JSON-able summary with one row per request."""
    from kvcache.connectors.blend_policy import DeviationTopK
    from kvcache.connectors.hf import HFConnector
    from kvcache.kvstore.tiered_store import TieredStore

    if requests <= 0:
        raise ValueError(f"requests must be > 0, got {requests}")
    config = _store_config(store_dir, config_file)
    model, model_id = _model(seed)
    workload = _workload(requests, seed)
    _full_prefill(model, workload[0][0])  # first-call overheads belong to neither side
    rows = []
    with TieredStore.open(config) as store:
        conn = HFConnector(model, store, chunk_size=config.chunk_size, model_id=model_id)
        for ids, spans in workload:
            ref, full_s = _full_prefill(model, ids)
            r = conn.blend(ids, spans, policy=DeviationTopK(check_layer=1), ratio=RATIO)
            logp, logq = torch.log_softmax(ref[0, -1], -1), torch.log_softmax(r.logits[0, -1],
                                                                            -1)
            rows.append({
                "prompt_tokens": len(ids), "reused_tokens": r.reused_tokens,
                "recomputed_tokens": r.recomputed_tokens, "computed_tokens": r.computed_tokens,
                "ttft_full_s": full_s, "ttft_blend_s": r.ttft_s, "store_s": r.store_s,
                "kl": max(0.0, float((logp.exp() * (logp - logq)).sum())),  # rounding
                "top1_agrees": bool(ref.argmax() == r.logits.argmax()),
                "missed": r.plan.missed_tokens(), "hits_by_tier": r.hits_by_tier,
            })
        stats = conn.blend_stats
    warm = [r for r in rows if r["reused_tokens"]]
    return {
        "store_dir": str(config.dir), "model_id": model_id, "ratio": RATIO,
        "policy": "cacheblend (check layer 1)", "requests": rows,
        "segments": stats.segments, "segments_reused": stats.segments_reused,
        "missed_tokens": stats.missed_tokens,
        "ttft_full_s": sum(r["ttft_full_s"] for r in warm) / len(warm) if warm else None,
        "ttft_blend_s": sum(r["ttft_blend_s"] for r in warm) / len(warm) if warm else None,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"kvcache demo --blend: {result['model_id']}, {result['policy']}, "
             f"{result['ratio']:.0%} recomputed, store {result['store_dir']}",
             f"{'#':>3} {'prompt':>6} {'reused':>6} {'recomp':>6} {'computed':>8} "
             f"{'full ms':>8} {'blend ms':>8} {'KL':>8} top-1"]
    for i, r in enumerate(result["requests"], 1):
        lines.append(f"{i:>3} {r['prompt_tokens']:>6} {r['reused_tokens']:>6} "
                     f"{r['recomputed_tokens']:>6} {r['computed_tokens']:>8} "
                     f"{1e3 * r['ttft_full_s']:>8.1f} {1e3 * r['ttft_blend_s']:>8.1f} "
                     f"{r['kl']:>8.4f} {'same' if r['top1_agrees'] else 'differs'}")
    if result["ttft_blend_s"]:
        lines.append(f"TTFT of requests that reused documents: full prefill "
                     f"{1e3 * result['ttft_full_s']:.1f} ms, blended "
                     f"{1e3 * result['ttft_blend_s']:.1f} ms "
                     f"({result['ttft_full_s'] / result['ttft_blend_s']:.1f}x)")
    missed = ", ".join(f"{k} {v}" for k, v in result["missed_tokens"].items() if v) or "none"
    lines.append(f"documents reused: {result['segments_reused']} of {result['segments']}; "
                 f"tokens not reused, by reason: {missed}")
    return "\n".join(lines)
