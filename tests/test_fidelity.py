"""Fidelity metrics on the reference model: perfect for the exact cache, worse under noise
and for chunks computed apart; the evaluation set is fixed; bootstrap intervals; the copy
circuit's hand-set planes."""

from __future__ import annotations

import pytest
import torch

from kvcache.connectors.hf import canonical_to_cache
from kvcache.tools.fidelity import (
    FidelityResult,
    bootstrap_interval,
    evaluate_candidates,
    exact_kv,
    independent_chunks_kv,
    measure_fidelity,
)
from kvcache.tools.refmodel import load_reference_model
from kvcache.tools.refmodel.evalset import (
    QUICK_PER_KIND,
    RAG_CHUNKS,
    build_evalset,
    evalset_hash,
)
from kvcache.tools.refmodel.hand_set import (
    HAND_SET_KV_PLANES,
    hand_set_planes,
    keep_planes_exact,
)


@pytest.fixture(scope="module")
def model():
    return load_reference_model()[0]


@pytest.fixture(scope="module")
def prompts():
    return build_evalset(quick=True)


def _noisy(kv: torch.Tensor, rel: float, seed: int = 0) -> torch.Tensor:
    """``kv`` plus Gaussian noise of ``rel`` times each layer's K/V RMS."""
    g = torch.Generator().manual_seed(seed)
    rms = kv.pow(2).mean(dim=(2, 3, 4), keepdim=True).sqrt()
    return kv + rel * rms * torch.randn(kv.shape, generator=g)


def test_evalset_is_deterministic_and_shaped(prompts):
    assert evalset_hash(build_evalset(quick=True)) == evalset_hash(prompts)
    full = build_evalset()
    assert [p.name for p in full[:QUICK_PER_KIND]] == [p.name for p in prompts[:QUICK_PER_KIND]]
    assert {p.kind for p in prompts} == {"prefix", "rag"}
    for p in full:
        assert p.boundaries[0] == 0 and len(p.continuation) >= 2
        if p.kind == "rag":
            assert len(p.chunks) == RAG_CHUNKS
            files = [s.split("@")[0] for s in p.sources]
            assert len(set(files)) == RAG_CHUNKS  # chunks from different files
            assert p.boundaries[-1] > 256  # the quoted chunk lies far back


def test_exact_cache_is_perfect(model, prompts):
    p = prompts[0]
    ctx, cont = p.context_tensor(), p.continuation_tensor()
    exact = exact_kv(model, ctx)
    assert exact.shape == (
        model.config.num_hidden_layers,
        2,
        ctx.shape[0],
        model.config.num_key_value_heads,
        model.config.head_dim,
    )
    r = measure_fidelity(model, ctx, cont, exact.clone(), exact=exact)
    assert r.k_nmse == (0.0,) * model.config.num_hidden_layers
    assert r.v_nmse == (0.0,) * model.config.num_hidden_layers
    assert r.kl_mean == 0.0 and r.kl_max == 0.0
    assert r.top1_agreement == 1.0
    assert r.bpb_gap == 0.0 and r.candidate_bpb == r.exact_bpb
    # A DynamicCache candidate is accepted and left untouched.
    cache = canonical_to_cache(exact, model.config, model.device, model.dtype)
    r2 = measure_fidelity(model, ctx, cont, cache)
    assert r2.kl_max == 0.0 and r2.top1_agreement == 1.0
    assert cache.layers[0].keys.shape[2] == ctx.shape[0]


def test_metrics_degrade_with_injected_noise(model, prompts):
    p = prompts[0]
    ctx, cont = p.context_tensor(), p.continuation_tensor()
    exact = exact_kv(model, ctx)
    results: list[FidelityResult] = [
        measure_fidelity(model, ctx, cont, _noisy(exact, rel), exact=exact)
        for rel in (0.05, 0.5, 2.0)
    ]
    nmse = [r.k_nmse_mean for r in results]
    kl = [r.kl_mean for r in results]
    assert nmse[0] == pytest.approx(0.05**2, rel=0.2)
    assert nmse[0] < nmse[1] < nmse[2]
    assert 0.0 < kl[0] < kl[1] < kl[2]
    assert results[0].top1_agreement >= results[2].top1_agreement
    assert results[2].top1_agreement < 1.0
    assert abs(results[0].bpb_gap) < results[2].bpb_gap


def test_chunks_computed_apart_lose_cross_chunk_attention(model, prompts):
    rag = [p for p in prompts if p.kind == "rag"]
    pairs = [(p.chunk_tensors(), p.continuation_tensor()) for p in rag]

    def apart(model, chunks, exact):
        return independent_chunks_kv(model, chunks)

    summary = evaluate_candidates(model, pairs, apart)
    assert summary.prompts == len(rag)
    # Layer 0's KV depends on each token alone, so it barely moves; deeper layers do.
    assert summary.k_nmse[0] < 1e-8
    assert max(summary.k_nmse[1:]) > 1e-3
    assert summary.kl_mean > 0.0
    assert summary.top1_agreement <= 1.0


# -- bootstrap intervals ----------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(200, generator=g) * 2.0 + 5.0).tolist()
    lo, hi = bootstrap_interval(xs)
    assert bootstrap_interval(xs) == (lo, hi)  # same values, same interval
    mean = sum(xs) / len(xs)
    assert lo < mean < hi
    # a 90% interval of a mean is about mean +- 1.645 standard errors
    se = float(torch.tensor(xs, dtype=torch.float64).std()) / len(xs) ** 0.5
    assert hi - lo == pytest.approx(2 * 1.645 * se, rel=0.15)
    # wider at higher confidence, narrower with more windows
    lo99, hi99 = bootstrap_interval(xs, confidence=0.99)
    assert lo99 < lo and hi < hi99
    lo_few, hi_few = bootstrap_interval(xs[:20])
    assert hi_few - lo_few > hi - lo


def test_bootstrap_interval_edge_cases():
    assert bootstrap_interval([0.97] * 10) == pytest.approx((0.97, 0.97))
    assert bootstrap_interval([3.0]) == (3.0, 3.0)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=1.0)


# -- the copy circuit's hand-set planes -------------------------------------------------------


def test_keep_planes_exact_restores_only_the_named_planes():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(4, 2, 8, 2, 4, generator=g)
    cand = exact + 0.1
    out = keep_planes_exact(cand, exact)
    for layer in range(4):
        for kv in range(2):
            for head in range(2):
                same = torch.equal(out[layer, kv, :, head], exact[layer, kv, :, head])
                assert same == ((layer, kv, head) in HAND_SET_KV_PLANES)
    assert torch.equal(cand, exact + 0.1)  # the candidate itself is untouched
    with pytest.raises(ValueError, match="does not match"):
        keep_planes_exact(cand[:, :, :4], exact)


@pytest.mark.slow
def test_hand_set_planes_are_the_ones_the_circuit_writes():
    from kvcache.tools.refmodel.copy_circuit import install_copy_circuit
    from kvcache.tools.refmodel.model import build_model, reference_config

    torch.manual_seed(0)
    fresh = build_model(reference_config())
    circuit = install_copy_circuit(fresh, seed=0)
    assert tuple(hand_set_planes(circuit, fresh.config)) == HAND_SET_KV_PLANES
