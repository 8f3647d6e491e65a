"""CacheBlend: plans (``connectors/blend_plan.py``), selection policies
(``blend_policy.py``) and the blended prefill of the transformers connector
(``blend.py``, ``hf_blend.py``), on the reference model and a real store."""

from __future__ import annotations

import math

import pytest
import torch

from kvcache.connectors.blend import blend_prefill
from kvcache.connectors.blend_plan import (
    MISS_BOUNDARY,
    MISS_LAYOUT,
    MISS_LOAD,
    MISS_NOT_STORED,
    MISS_TOO_SHORT,
    BlendPlan,
    SegmentError,
    check_segments,
    plan_all_cached,
    plan_blend,
    segment_chunks,
    segments_by_separator,
)
from kvcache.connectors.blend_policy import (
    ChunkReuse,
    DeviationTopK,
    FirstTokens,
    FullPrefill,
    FullReuse,
    RandomTokens,
    budget_tokens,
)
from kvcache.connectors.hf import (
    HFConnector,
    cache_kwarg,
    cache_to_canonical,
    canonical_to_cache,
    output_cache,
)
from kvcache.connectors.hf_blend import PlanChangedError, SegmentLoads
from kvcache.kvstore.layer_loader import LayerLoader
from kvcache.kvstore.tiered_store import TieredStore
from kvcache.tools.fidelity import independent_chunks_kv, segments_apart_kv
from kvcache.tools.refmodel import load_reference_model

CHUNK = 64


@pytest.fixture(scope="module")
def model():
    return load_reference_model()[0]


@pytest.fixture
def store():
    with TieredStore.in_memory(256 << 20) as s:
        yield s


@pytest.fixture
def conn(model, store):
    return HFConnector(model, store, chunk_size=CHUNK, model_id="blend-test")


def text(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


# A RAG-shaped prompt: preamble, three documents, question.
PRE, DOCS, QUESTION = text(20, 1), [text(150, 2), text(90, 3), text(130, 4)], text(25, 5)


def rag(order: tuple[int, ...] = (0, 1, 2), preamble: list[int] = PRE
        ) -> tuple[list[int], list[tuple[int, int]]]:
    tokens, spans = list(preamble), []
    for i in order:
        spans.append((len(tokens), len(tokens) + len(DOCS[i])))
        tokens += DOCS[i]
    return tokens + QUESTION, spans


def whole_plan(tokens: list[int], spans: list[tuple[int, int]]) -> BlendPlan:
    """A plan whose every segment is cached (what the store would say if it held them)."""
    return plan_all_cached(tokens, spans, chunk_size=CHUNK)


def full_prefill(model, tokens):
    out = model(input_ids=torch.tensor([tokens]), use_cache=True)
    return out.logits[:, -1:].float(), cache_to_canonical(output_cache(out), 0, len(tokens))


# -- plans ------------------------------------------------------------------------------------
def test_separators_start_segments_and_bad_spans_are_refused():
    assert segments_by_separator([5, 1, 2, 9, 1, 3, 1, 4], [1]) == [(1, 4), (4, 6), (6, 8)]
    assert segments_by_separator([7, 7, 7, 1], [7, 7]) == [(0, 4)]
    assert segments_by_separator([5, 6], [1]) == []
    assert check_segments([(10, 20), (0, 5)], 30) == [(0, 5), (10, 20)]
    for bad in ([(0, 0)], [(5, 40)], [(0, 10), (5, 15)], [(-1, 3)], [("a", 2)]):
        with pytest.raises(SegmentError):
            check_segments(bad, 30)
    with pytest.raises(SegmentError):
        segments_by_separator([1, 2], [])


def test_a_segment_is_keyed_by_its_own_tokens_wherever_it_sits(conn):
    a, spans_a = rag((0, 1, 2))
    b, spans_b = rag((2, 0, 1), preamble=text(33, 9))
    ka = segment_chunks(conn.layout.fingerprint, a[spans_a[0][0] : spans_a[0][1]], CHUNK)
    kb = segment_chunks(conn.layout.fingerprint, b[spans_b[1][0] : spans_b[1][1]], CHUNK)
    assert [c.key for c in ka] == [c.key for c in kb] and len(ka) == 3
    # Chunk j's key covers the segment up to it: a segment that differs early differs after.
    other = segment_chunks(conn.layout.fingerprint, [0, *DOCS[0][1:]], CHUNK)
    assert all(x.key != y.key for x, y in zip(ka, other, strict=True))


def test_the_plan_says_why_each_segment_missed(conn, store):
    tokens, spans = rag()
    conn.blend(tokens, spans[:1])  # stores document 0
    conn.blend(DOCS[1], [(0, len(DOCS[1]))])  # stores document 1 alone
    longer = DOCS[1] + text(80, 6)  # its first chunk matches, the rest does not
    t2 = PRE + longer + DOCS[2] + DOCS[0] + QUESTION
    a = len(PRE) + len(longer)
    s2 = [(20, a), (a, a + 130), (a + 130, a + 280), (len(t2) - 10, len(t2) - 2)]
    plan = plan_blend(store.longest_prefix, store.where, conn.layout.fingerprint, t2, s2,
                      chunk_size=CHUNK)
    segs = [s for s in plan.spans if s.is_segment]
    assert [s.reason for s in segs] == [MISS_BOUNDARY, MISS_NOT_STORED, None, MISS_TOO_SHORT]
    assert segs[0].cached_tokens == CHUNK and segs[2].cached_tokens == 150
    assert segs[2].tier == "cpu" and segs[1].tier is None
    assert plan.missed_tokens() == {MISS_BOUNDARY: len(longer) - CHUNK, MISS_NOT_STORED: 130,
                                    MISS_TOO_SHORT: 8}
    assert (plan.spans[0].start, plan.spans[0].end) == (0, 20)  # the preamble: computed
    assert not plan.spans[0].is_segment and plan.spans[0].reason is None


def test_chunks_that_cannot_be_loaded_are_computed_and_say_why(conn, store, model):
    tokens, spans = rag()
    conn.blend(tokens, spans)
    fp = conn.layout.fingerprint
    keys1 = [c.key for c in segment_chunks(fp, DOCS[1], CHUNK)]
    keys2 = [c.key for c in segment_chunks(fp, DOCS[2], CHUNK)]
    # Another layout's object under document 1's first key.
    other = HFConnector(model, store, chunk_size=CHUNK, model_id="another").layout
    store.put(keys1[0], torch.zeros(other.chunk_shape(CHUNK)), other, rope_start=0)
    t2, s2 = rag((2, 1, 0))
    plan = plan_blend(store.longest_prefix, store.where, fp, t2, s2, chunk_size=CHUNK)
    store.delete(keys2[1])  # vanished between the lookup and the load
    loads = SegmentLoads(store, conn.layout, plan, device=model.device)
    try:
        with pytest.raises(PlanChangedError) as changed:
            loads(2)  # the first layer a blend asks for
    finally:
        loads.close()
    by_start = {s.start: s for s in changed.value.plan.spans}
    doc2, doc1 = by_start[s2[0][0]], by_start[s2[1][0]]
    assert (doc2.cached_tokens, doc2.reason) == (CHUNK, MISS_LOAD)
    assert (doc1.cached_tokens, doc1.reason) == (0, MISS_LAYOUT)
    assert plan.spans[2].cached_tokens == 90  # what the lookup had said
    r = conn.blend(t2, s2, store=False)
    assert r.plan.missed_tokens() == {MISS_BOUNDARY: 130 - CHUNK, MISS_LAYOUT: 90}
    logits, _ = full_prefill(model, t2)
    assert torch.isfinite(r.logits).all() and r.logits.shape == logits.shape


# -- policies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.15, 0.3, 1.0])
def test_every_policy_spends_the_same_budget(ratio):
    tokens, spans = rag()
    plan = whole_plan(tokens, spans)
    budget = budget_tokens(plan, ratio)
    assert budget == math.ceil(ratio * 370)
    dev = torch.rand(len(tokens), generator=torch.Generator().manual_seed(0))
    cached = plan.cached_mask()
    for policy in (DeviationTopK(), FirstTokens(), RandomTokens(3)):
        picked = policy.select(plan, budget, dev)
        assert len(picked) == budget, policy.name
        assert bool(cached[picked].all()) and torch.equal(picked, picked.sort().values)
    chunks = ChunkReuse().select(plan, budget, dev)
    assert len(chunks) <= budget and bool(cached[chunks].all())
    assert len(FullReuse().select(plan, budget, dev)) == 0
    assert len(FullPrefill().select(plan, budget, dev)) == plan.cached_tokens
    top = DeviationTopK().select(plan, budget, dev)
    rest = cached.clone()
    rest[top] = False
    if budget and rest.any():
        assert dev[top].min() >= dev[rest].max()
    first = FirstTokens().select(plan, budget, dev)
    for s, e in spans:  # each segment's share starts at its first token
        mine = first[(first >= s) & (first < e)]
        assert torch.equal(mine, torch.arange(s, s + len(mine)))


def test_ratios_outside_0_1_are_refused():
    tokens, spans = rag()
    with pytest.raises(ValueError):
        budget_tokens(whole_plan(tokens, spans), 1.5)


# -- the blended prefill ------------------------------------------------------------------------
def _blend(model, tokens, spans, policy, ratio, kv=None):
    kv = segments_apart_kv(model, tokens, spans) if kv is None else kv
    plan = whole_plan(tokens, spans)
    return blend_prefill(model, torch.tensor(tokens), plan, lambda i: kv[i], policy, ratio)


@pytest.mark.parametrize("policy", [FullPrefill(), DeviationTopK(check_layer=1)])
def test_recomputing_everything_is_the_full_prefill(model, policy):
    tokens, spans = rag()
    logits, exact = full_prefill(model, tokens)
    out = _blend(model, tokens, spans, policy, 1.0)
    assert torch.allclose(out.logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(cache_to_canonical(out.cache, 0, len(tokens)), exact, atol=1e-4)
    assert len(out.recomputed) == 370 and out.computed == len(tokens) - 370


def test_recomputing_nothing_is_the_cached_chunks_concatenated(model):
    tokens, spans = rag(preamble=[])  # cached documents first, then the question
    kv = segments_apart_kv(model, tokens, spans)
    out = _blend(model, tokens, spans, FullReuse(), 0.0, kv)
    n = spans[-1][1]
    got = cache_to_canonical(out.cache, 0, len(tokens))
    assert torch.equal(got[:, :, :n], kv[:, :, :n])  # the cached K/V, untouched
    # The question fed on top of the concatenated cache by the model's own forward:
    cache = canonical_to_cache(kv[:, :, :n], model.config, model.device, model.dtype)
    ref = model(input_ids=torch.tensor([tokens[n:]]), use_cache=True,
                position_ids=torch.arange(n, len(tokens))[None], **{cache_kwarg(model): cache})
    assert torch.allclose(out.logits, ref.logits[:, -1:].float(), atol=1e-4)
    assert len(out.recomputed) == 0


def test_a_recomputed_token_sees_earlier_kv_and_never_later_kv(model):
    """The mask: spoiling the cached KV of the last document changes nothing computed
    before it; spoiling the first document's changes what comes after it."""
    tokens, spans = rag()
    kv = segments_apart_kv(model, tokens, spans)
    base = _blend(model, tokens, spans, RandomTokens(1), 0.3, kv)
    later = kv.clone()
    s, e = spans[2]
    later[1:, :, s:e] += 3.0  # layers past the first: layer 0 is never cached-only here
    spoiled = _blend(model, tokens, spans, RandomTokens(1), 0.3, later)
    before = cache_to_canonical(base.cache, 0, s)
    assert torch.equal(before, cache_to_canonical(spoiled.cache, 0, s))
    assert not torch.allclose(base.logits, spoiled.logits)
    earlier = kv.clone()
    earlier[1:, :, spans[0][0] : spans[0][1]] += 3.0
    moved = _blend(model, tokens, spans, RandomTokens(1), 0.3, earlier)
    rec = base.recomputed[base.recomputed >= spans[1][0]]
    a = cache_to_canonical(base.cache, 0, len(tokens))[2:, :, rec]
    b = cache_to_canonical(moved.cache, 0, len(tokens))[2:, :, rec]
    assert not torch.allclose(a, b)


def test_sdpa_and_eager_attention_blend_alike(model):
    tokens, spans = rag()
    kv = segments_apart_kv(model, tokens, spans)
    sdpa = _blend(model, tokens, spans, DeviationTopK(), 0.15, kv)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        eager = _blend(model, tokens, spans, DeviationTopK(), 0.15, kv)
    finally:
        model.config._attn_implementation = impl
    assert torch.equal(sdpa.recomputed, eager.recomputed)
    assert torch.allclose(sdpa.logits, eager.logits, atol=1e-4)


def test_keys_loaded_elsewhere_are_rotated_as_if_computed_there(conn, store, model):
    seg = DOCS[0]
    conn.blend(seg, [(0, len(seg))])  # stored prefilled alone at positions 0..149
    keys = [c.key for c in segment_chunks(conn.layout.fingerprint, seg, CHUNK)]
    with LayerLoader(store, keys, conn.layout, rope_start=37) as loader:
        moved = loader.wait_all()
    there = independent_chunks_kv(model, [text(37, 0), seg])[:, :, 37:]
    assert loader.rope_starts == [0, 64, 128]
    assert torch.allclose(moved, there, atol=2e-4)


# -- the connector ------------------------------------------------------------------------------
def test_documents_reused_in_another_order_after_another_preamble(conn, store, model):
    tokens, spans = rag()
    first = conn.blend(tokens, spans)
    assert first.reused_tokens == 0 and first.stored_tokens == 370
    t2, s2 = rag((2, 0, 1), preamble=text(33, 9))
    r = conn.blend(t2, s2, ratio=0.15)
    assert r.plan.cached_tokens == 370 and r.hits_by_tier == {"cpu": 3 + 3 + 2}
    assert r.recomputed_tokens == budget_tokens(r.plan, 0.15) and r.stored_tokens == 0
    assert r.reused_tokens == 370 - r.recomputed_tokens
    assert r.computed_tokens == 33 + 25
    assert [s.shift for s in r.plan.spans if s.is_segment] == [
        s2[0][0] - spans[2][0], s2[1][0] - spans[0][0], s2[2][0] - spans[1][0]]
    # Its cache goes on in generate like any other: the next token, then decoding.
    nxt = int(r.logits.argmax())
    gen = model.generate(torch.tensor([[*t2, nxt]]), max_new_tokens=3, do_sample=False,
                         **{cache_kwarg(model): r.cache})
    assert gen.shape == (1, len(t2) + 4)
    stats = conn.blend_stats
    assert stats.blends == 2 and stats.segments == 6 and stats.segments_reused == 3
    assert stats.recomputed_tokens == r.recomputed_tokens
    assert stats.missed_tokens[MISS_NOT_STORED] == 370


def test_separator_segments(conn):
    sep = [1, 2]
    tokens = PRE + sep + DOCS[0] + sep + DOCS[1] + QUESTION
    r = conn.blend(tokens, separator=sep)
    segs = [s for s in r.plan.spans if s.is_segment]
    assert [(s.start, s.end) for s in segs] == [(20, 172), (172, len(tokens))]
    with pytest.raises(SegmentError):
        conn.blend(tokens)


def test_segment_entries_say_so_on_disk_in_inspect_and_after_an_index_rebuild(model, tmp_path):
    from kvcache.kvstore.config import KVCacheConfig
    from kvcache.tools.admin import fsck, inspect

    cfg = KVCacheConfig().with_overrides({"store.dir": str(tmp_path / "store")})
    tokens, spans = rag()
    with TieredStore.open(cfg.store) as store:
        conn = HFConnector(model, store, chunk_size=CHUNK, model_id="blend-test")
        conn.blend(tokens, spans)  # 8 segment chunks
        conn.prefill(tokens)  # and the prompt's prefix chunks
        store.flush()
        assert {i.keying for i in store.tiers[0].scan()} == {"prefix", "segment"}
    listed = inspect(cfg)["entries"]
    assert sorted(e["keying"] for e in listed).count("segment") == 8
    assert sum(e["keying"] == "prefix" for e in listed) == -(-len(tokens) // CHUNK)
    (tmp_path / "store" / "disk" / "index" / "data.mdb").unlink()
    fsck(cfg, repair=True)
    assert sum(e["keying"] == "segment" for e in inspect(cfg)["entries"]) == 8


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_llama_family_decoders_blend_exactly_at_the_ends(family):
    """Qwen2 (biased Q/K/V) and Mistral built from configs: recomputing everything is
    their own prefill, recomputing nothing keeps the cached K/V."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    torch.manual_seed(0)
    cfg = cls(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    tokens, spans = rag()
    logits, exact = full_prefill(m, tokens)
    kv = segments_apart_kv(m, tokens, spans)
    full = _blend(m, tokens, spans, DeviationTopK(check_layer=1), 1.0, kv)
    assert torch.allclose(full.logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(cache_to_canonical(full.cache, 0, len(tokens)), exact, atol=1e-4)
    none = _blend(m, tokens, spans, FullReuse(), 0.0, kv)
    got = cache_to_canonical(none.cache, 0, len(tokens))
    for s, e in spans:
        assert torch.equal(got[:, :, s:e], kv[:, :, s:e])


def test_the_models_own_attention_is_back_after_a_blend_and_serves_forwards_during_one(
        model):
    """The recomputed tokens' attention is switched in for the blend's layer calls only;
    a forward of the same model meanwhile (another thread) runs the model's own."""
    import threading

    from kvcache.connectors import blend as blend_module

    impl = model.config._attn_implementation
    tokens, spans = rag()
    kv = segments_apart_kv(model, tokens, spans)
    seen: list[torch.Tensor] = []
    started = threading.Event()
    real = blend_module._blocked_attention

    def forward_inside(*args, **kwargs):
        if kwargs.get("kvcache_rows") is not None and not started.is_set():
            started.set()  # while the switch is on: an ordinary forward, another thread
            t = threading.Thread(target=lambda: seen.append(
                model(input_ids=torch.tensor([tokens[:50]])).logits))
            t.start()
            t.join()
        return real(*args, **kwargs)

    blend_module._blocked_attention = forward_inside
    try:
        _blend(model, tokens, spans, RandomTokens(0), 0.2, kv)
    finally:
        blend_module._blocked_attention = real
    assert model.config._attn_implementation == impl
    assert blend_module._switched == {}
    ref = model(input_ids=torch.tensor([tokens[:50]])).logits
    assert torch.allclose(seen[0], ref, atol=1e-5)
