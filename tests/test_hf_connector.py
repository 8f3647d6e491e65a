"""The transformers connector: reused prefixes give the logits of a full prefill.

Tiny random Llama / Qwen2 / Mistral models (2 layers, hidden 64, 4 heads, 2 KV heads) in
float32, chunks of 16 tokens and prompts of 57-70 tokens, so every prompt has full chunks
and a partial last one. Reuse and full prefill run the same float32 math in a different
order, so logits agree to ATOL/RTOL below (observed differences are ~1e-7).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from kvcache.connectors.hf import HFConnector, layout_from_hf_config, output_cache
from kvcache.kvstore.config import CpuTierConfig, DiskTierConfig, StoreConfig
from kvcache.kvstore.errors import LayoutMismatchError, StoreFullError
from kvcache.kvstore.layout import RopeStyle
from kvcache.kvstore.tiered_store import TieredStore

CHUNK = 16
ATOL, RTOL = 1e-4, 1e-4  # float32: reuse only reorders the same arithmetic
TINY = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
FAMILIES = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, **kw}),
    # Mistral's default 4096-token window binds below max_position_embeddings: disable it.
    "mistral": lambda **kw: MistralConfig(**{**TINY, "sliding_window": None, **kw}),
}


def build_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](**kw)).to(dtype).eval()


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Reference: ``[1, 1, vocab]`` last-position logits of a prefill without any cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[:, -1:].float()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return request.param, build_model(request.param)


def disk_store(path: Path, **kw) -> TieredStore:
    return TieredStore.open(StoreConfig(dir=path, chunk_size=CHUNK, **kw))


# -- layout ------------------------------------------------------------------------------
def test_layout_from_config_reads_shape_and_rope():
    layout = layout_from_hf_config(FAMILIES["llama"](), torch.float32, "m")
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim) == (2, 2, 16)
    assert layout.dtype == "float32" and layout.attention.value == "gqa"
    assert layout.rope is not None and layout.rope.style is RopeStyle.NEOX
    assert layout.rope.theta == 10000.0 and layout.rope.scaling_type is None

    # Qwen2 has no head_dim field: hidden / heads.
    q = layout_from_hf_config(FAMILIES["qwen2"](num_key_value_heads=4), torch.bfloat16, "q")
    assert q.head_dim == 16 and q.attention.value == "mha" and q.dtype == "bfloat16"

    scaled = LlamaConfig(
        **TINY,
        rope_parameters={
            "rope_type": "linear",
            "rope_theta": 5e5,
            "factor": 4.0,
            "partial_rotary_factor": 0.5,
        },
    )
    r = layout_from_hf_config(scaled, torch.float16, "m").rope
    assert r is not None
    assert (r.theta, r.scaling_type, r.scaling_factor, r.rotary_dim) == (5e5, "linear", 4.0, 8)


def test_llama3_rope_frequencies_match_the_model():
    """Llama 3.1's scaled RoPE: the layout records its parameters, so the frequencies (for
    shifts and pre-RoPE coding) equal the model's own without passing them."""
    from kvcache.kernels.rope_shift import rope_inv_freq, rope_shift

    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = build_model("llama", rope_parameters=params)
    layout = layout_from_hf_config(model.config, torch.float32, "m")
    r = layout.rope
    assert r is not None and r.llama3_params == (1.0, 4.0, 8192)
    want = model.model.rotary_emb.inv_freq.float()
    # head_dim 16 at theta 5e5 has wavelengths below, inside and above the blended band
    torch.testing.assert_close(rope_inv_freq(r, 16), want, rtol=1e-6, atol=0)
    keys = torch.randn(5, 2, 16)
    # fp32 angles of ~900 rad: ~1e-4 apart for frequencies one rounding apart
    torch.testing.assert_close(rope_shift(keys, 3, 900, r),
                               rope_shift(keys, 3, 900, r, inv_freq=want), rtol=0, atol=3e-4)


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=32, max_window_layers=1),
        MistralConfig(**TINY, sliding_window=32),
    ],
    ids=["qwen2-hybrid-sliding", "mistral-sliding"],
)
def test_sliding_window_configs_are_refused(config: PretrainedConfig):
    with pytest.raises(LayoutMismatchError, match="not prefix-reusable"):
        layout_from_hf_config(config, torch.float32, "m")


def test_unsupported_family_is_refused():
    with pytest.raises(LayoutMismatchError, match="supported: llama, mistral, qwen2"):
        layout_from_hf_config(GPT2Config(), torch.float32, "gpt2")


def test_unnamed_models_are_keyed_by_their_weights():
    """A model built from a config names no checkpoint: its id hashes config and weights,
    so the same weights agree (in any process) and other weights never share chunks."""
    store = TieredStore.in_memory(1 << 24)
    ids = prompt(48)
    a = HFConnector(build_model("llama"), store, chunk_size=CHUNK)
    assert a.layout.model_id.startswith("llama-weights-")
    a.prefill(ids)
    same = HFConnector(build_model("llama"), store, chunk_size=CHUNK)
    assert same.layout.model_id == a.layout.model_id
    assert same.prefill(ids).reused_tokens == 47
    # same config, other seed: only the weights differ
    other_weights = HFConnector(build_model("llama", seed=1), store, chunk_size=CHUNK)
    # same weights, another config field the KV depends on
    other_eps = HFConnector(build_model("llama", rms_norm_eps=1e-3), store, chunk_size=CHUNK)
    for other in (other_weights, other_eps):
        assert other.layout.model_id != a.layout.model_id
        assert other.prefill(ids).reused_tokens == 0
    # one weight changed in place after construction is a new id for a new connector
    model = build_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] += 1
    assert HFConnector(model, store, chunk_size=CHUNK).layout.model_id != a.layout.model_id


def test_named_checkpoint_is_keyed_by_name_and_revision():
    model = build_model("llama")
    model.config._name_or_path = "org/tiny"
    model.config._commit_hash = "abc123"
    assert HFConnector(model, TieredStore.in_memory(1 << 20)).layout.model_id == "org/tiny@abc123"


def test_weights_on_the_meta_device_need_a_model_id():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(FAMILIES["llama"]())
    with pytest.raises(LayoutMismatchError, match="model_id"):
        HFConnector(model, TieredStore.in_memory(1 << 20))
    assert HFConnector(model, TieredStore.in_memory(1 << 20), model_id="m").layout.model_id == "m"


# -- reuse from each tier ----------------------------------------------------------------
def test_reuse_from_cpu_matches_full_prefill(family_model):
    family, model = family_model
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id=family)
    ids = prompt(57)  # 3 full chunks + 9 tokens
    first = conn.prefill(ids)
    assert (first.reused_tokens, first.computed_tokens, first.stored_tokens) == (0, 57, 57)
    # what model(input_ids, logits_to_keep=1).logits gives: [batch, 1, vocab]
    assert first.logits.shape == (1, 1, TINY["vocab_size"])
    torch.testing.assert_close(first.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)

    # An extension of the prompt: the 3 full chunks match; the partial chunk's key named
    # tokens 48..57 only, so chunk 48..64 is new.
    longer = ids + prompt(13, seed=2)
    res = conn.prefill(longer)
    assert (res.reused_tokens, res.computed_tokens) == (48, 22)
    assert res.hits_by_tier == {"cpu": 3}
    assert res.stored_tokens == 22
    torch.testing.assert_close(res.logits, full_logits(model, longer), atol=ATOL, rtol=RTOL)
    # The returned cache is the whole prompt's, ready for decoding.
    assert res.cache.get_seq_length() == len(longer)


@pytest.mark.parametrize("n", [57, 64])
def test_fully_cached_prompt_still_computes_one_token(n: int):
    model = build_model("llama")
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    ids = prompt(n)
    conn.prefill(ids)
    res = conn.prefill(ids)
    assert (res.reused_tokens, res.computed_tokens, res.stored_tokens) == (n - 1, 1, 0)
    torch.testing.assert_close(res.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)
    cache, reused = conn.load_prefix(ids)
    assert reused == n - 1 and cache is not None and cache.get_seq_length() == n - 1


def test_prompt_sharing_part_of_a_chunk_reuses_only_whole_chunks():
    model = build_model("llama")
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    stored = prompt(64)
    conn.prefill(stored)
    # Shares 40 tokens: chunks 0..16 and 16..32 match, chunk 32..48 differs after token 40.
    other = stored[:40] + prompt(25, seed=3)
    res = conn.prefill(other)
    assert res.reused_tokens == 32
    torch.testing.assert_close(res.logits, full_logits(model, other), atol=ATOL, rtol=RTOL)


def test_reuse_from_disk_only(family_model, tmp_path: Path):
    family, model = family_model
    ids = prompt(61)
    with disk_store(tmp_path) as store:
        conn = HFConnector(model, store, chunk_size=CHUNK, model_id=family)
        conn.prefill(ids)
        store.flush()  # write-through is asynchronous: wait until the disk tier has it all
        cpu = store.tiers[0]
        for c in conn.chunks(ids):
            assert store.where(c.prefix_key) == "cpu"
            cpu.delete(c.prefix_key)
            assert store.where(c.prefix_key) == "disk"
        res = conn.prefill([*ids, 5])
    assert res.reused_tokens == 48 and res.hits_by_tier == {"disk": 3}
    torch.testing.assert_close(res.logits, full_logits(model, [*ids, 5]), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_reuse_from_a_cachegen_disk_tier(tmp_path: Path):
    """A lossy disk tier: each chunk's keys are coded before RoPE at the positions the
    connector stored them at, and the reused prefix gives nearly the full prefill's
    logits."""
    from kvcache.tools.synthetic_kv import nmse

    model = build_model("llama")
    ids = prompt(61)
    exact = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    exact.prefill(ids)
    with disk_store(tmp_path, disk=DiskTierConfig(codec="cachegen-1")) as store:
        conn = HFConnector(model, store, chunk_size=CHUNK, model_id="m")
        conn.prefill(ids)
        store.flush()
        disk = store.tiers[1]
        for c in conn.chunks(ids):
            header = disk.header(c.prefix_key)
            assert header is not None and header.codec == "cachegen-1"
            assert header.codec_params["key_rope_start"] == c.start == header.rope_start
            store.tiers[0].delete(c.prefix_key)
        res = conn.prefill([*ids, 5])
        # keys come back at the positions they were cached at (this random model's logits
        # barely depend on its keys, so compare the keys themselves)
        for c in conn.chunks(ids):
            got, want = store.get(c.prefix_key), exact.store.get(c.prefix_key)
            assert got is not None and want is not None
            assert nmse(got[:, 0], want[:, 0]) < 0.01
    assert res.reused_tokens == 48 and res.hits_by_tier == {"disk": 3}
    full = full_logits(model, [*ids, 5])
    assert int(res.logits.argmax()) == int(full.argmax())
    assert float((res.logits - full).abs().max()) < 0.02 * float(full.abs().max())


@pytest.mark.slow
def test_reuse_with_a_cpu_tier_smaller_than_the_prompt(tmp_path: Path):
    # A CPU tier holds at least 1 MiB: heads of 1024 make a chunk 512 KiB, so it holds two.
    model = build_model("llama", head_dim=1024)
    chunk_bytes = 2 * 2 * CHUNK * 2 * 1024 * 4  # layers * K/V * tokens * kv_heads * dim * fp32
    ids = prompt(64)
    with disk_store(tmp_path, cpu=CpuTierConfig(capacity=2 * chunk_bytes)) as store:
        conn = HFConnector(model, store, chunk_size=CHUNK, model_id="m")
        conn.prefill(ids)
        res = conn.prefill([*ids, 7])
    assert res.reused_tokens == 64
    assert res.hits_by_tier.get("disk", 0) >= 2  # evicted chunks were demoted, not dropped
    torch.testing.assert_close(res.logits, full_logits(model, [*ids, 7]), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_reopened_store_in_another_process_serves_the_prefix(tmp_path: Path):
    """A separate process fills the store and exits; this one reopens the directory."""
    ids = prompt(70)
    writer = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hf_connector import CHUNK, build_model, disk_store
        from kvcache.connectors.hf import HFConnector
        with disk_store(__import__("pathlib").Path({str(tmp_path)!r})) as store:
            res = HFConnector(build_model("qwen2"), store, chunk_size=CHUNK,
                              model_id="qwen2").prefill({ids!r})
        assert res.stored_tokens == {len(ids)}, res
        """
    )
    subprocess.run([sys.executable, "-c", writer], check=True, timeout=120)

    model = build_model("qwen2")
    longer = [*ids, 9, 8, 7]
    with disk_store(tmp_path) as store:
        conn = HFConnector(model, store, chunk_size=CHUNK, model_id="qwen2")
        res = conn.prefill(longer)
    assert res.reused_tokens == 64 and res.hits_by_tier == {"disk": 4}
    torch.testing.assert_close(res.logits, full_logits(model, longer), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_reopened_store_in_process(tmp_path: Path):
    model = build_model("mistral")
    ids = prompt(50)
    with disk_store(tmp_path) as store:
        HFConnector(model, store, chunk_size=CHUNK, model_id="mistral").prefill(ids)
    with disk_store(tmp_path) as store:
        res = HFConnector(model, store, chunk_size=CHUNK, model_id="mistral").prefill(ids)
    assert (res.reused_tokens, res.computed_tokens) == (49, 1)
    assert res.hits_by_tier == {"disk": 4}
    torch.testing.assert_close(res.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)


# -- safety ------------------------------------------------------------------------------
def test_another_models_kv_is_never_reused():
    store = TieredStore.in_memory(1 << 24)
    ids = prompt(48)
    a = HFConnector(build_model("llama"), store, chunk_size=CHUNK, model_id="a")
    a.prefill(ids)
    others = [
        # same shapes, other weights: only the model id tells them apart
        HFConnector(build_model("llama", seed=1), store, chunk_size=CHUNK, model_id="b"),
        # same id, other KV shape
        HFConnector(
            build_model("llama", num_key_value_heads=4), store, chunk_size=CHUNK, model_id="a"
        ),
        # same shapes, other family and RoPE base
        HFConnector(
            build_model("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            store,
            chunk_size=CHUNK,
            model_id="a",
        ),
    ]
    for other in others:
        assert other.layout.fingerprint != a.layout.fingerprint
        cache, reused = other.load_prefix(ids)
        assert (cache, reused) == (None, 0)
        assert other.prefill(ids).reused_tokens == 0


class _VanishingStore:
    """Delegates to a store, but chunk ``lost`` disappears between lookup and read."""

    def __init__(self, store: TieredStore, lost: int) -> None:
        self.store, self.lost = store, lost

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def get_many(self, keys):
        got = self.store.get_many(keys)
        return [None if i == self.lost else t for i, t in enumerate(got)]


def test_chunk_vanishing_after_lookup_shortens_the_prefix():
    model = build_model("llama")
    store = TieredStore.in_memory(1 << 24)
    ids = prompt(60)
    HFConnector(model, store, chunk_size=CHUNK, model_id="m").prefill(ids)
    conn = HFConnector(model, _VanishingStore(store, lost=2), chunk_size=CHUNK, model_id="m")
    res = conn.prefill(ids)
    assert res.reused_tokens == 32 and res.hits_by_tier == {"cpu": 2}
    torch.testing.assert_close(res.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)


class _FullStore(_VanishingStore):
    """Every put fails as a full store's would."""

    def put(self, key, chunk, layout, *, rope_start=0):
        raise StoreFullError("full")


def test_a_failing_store_does_not_fail_the_prefill(caplog):
    model = build_model("llama")
    conn = HFConnector(
        model, _FullStore(TieredStore.in_memory(1 << 20), lost=-1), chunk_size=CHUNK, model_id="m"
    )
    ids = prompt(40)
    res = conn.prefill(ids)
    assert (res.reused_tokens, res.stored_tokens) == (0, 0)
    assert "storing the KV" in caplog.text
    torch.testing.assert_close(res.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)


def test_batches_are_refused():
    model = build_model("llama")
    conn = HFConnector(model, TieredStore.in_memory(1 << 20), chunk_size=CHUNK, model_id="m")
    with pytest.raises(LayoutMismatchError, match="batch size 1"):
        conn.prefill(torch.zeros(2, 8, dtype=torch.long))


def test_store_kv_skips_present_chunks_and_honours_start_chunk():
    model = build_model("llama")
    store = TieredStore.in_memory(1 << 24)
    conn = HFConnector(model, store, chunk_size=CHUNK, model_id="m")
    ids = prompt(40)
    with torch.inference_mode():
        cache = output_cache(model(input_ids=torch.tensor([ids])))
    assert conn.store_kv(ids, cache, start_chunk=1) == 24  # chunks 16..32 and 32..40
    assert [store.contains(c.prefix_key) for c in conn.chunks(ids)] == [False, True, True]
    assert conn.store_kv(torch.tensor([ids]), cache) == 16  # only chunk 0 was missing
    stored = store.get(conn.chunks(ids)[1].prefix_key)
    assert stored is not None and stored.shape == (2, 2, 16, 2, 16)
    # canonical [layers, 2, tokens, kv_heads, head_dim] vs the cache's [1, heads, seq, dim]
    torch.testing.assert_close(
        stored[1, 0], cache.layers[1].keys[0, :, 16:32].transpose(0, 1), atol=0, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kv_round_trips_exactly(dtype: torch.dtype):
    model = build_model("llama", dtype=dtype)
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    assert conn.layout.dtype == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    ids = prompt(50)
    first = conn.prefill(ids)
    cache, reused = conn.load_prefix([*ids, 3])  # the partial chunk 48..50 does not match
    assert reused == 48 and cache is not None
    for loaded, full in zip(cache.layers, first.cache.layers, strict=True):
        assert loaded.keys.dtype == dtype
        torch.testing.assert_close(loaded.keys, full.keys[:, :, :48], atol=0, rtol=0)
        torch.testing.assert_close(loaded.values, full.values[:, :, :48], atol=0, rtol=0)
    # Half-precision attention over a split prefix may round differently from one pass
    # (observed: identical on these tiny models); allow a few half-precision ulps.
    res = conn.prefill([*ids, 3])
    torch.testing.assert_close(res.logits, full_logits(model, [*ids, 3]), atol=2e-2, rtol=2e-2)


def test_prefix_layers_arrive_while_the_model_computes(monkeypatch):
    """Layer i of the reused prefix is waited for only when the forward pass reaches
    layer i, so later layers load while earlier ones compute."""
    from kvcache.kvstore.layer_loader import LayerLoader

    model = build_model("llama", num_hidden_layers=4)
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    ids = prompt(50)
    conn.prefill(ids)
    events: list[tuple[str, int]] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: events.append(("compute", i)))
    real_wait = LayerLoader.wait_for_layer

    def wait(self, i, *a, **kw):
        events.append(("wait", i))
        return real_wait(self, i, *a, **kw)

    monkeypatch.setattr(LayerLoader, "wait_for_layer", wait)
    res = conn.prefill(ids + prompt(5, seed=3))
    assert res.reused_tokens == 48
    assert events[0] == ("wait", 0)  # masks are sized from layer 0 before layer 0 runs
    for i in range(1, 4):
        assert events.index(("compute", i)) < events.index(("wait", i))
    torch.testing.assert_close(res.logits, full_logits(model, ids + prompt(5, seed=3)),
                               atol=ATOL, rtol=RTOL)


def test_a_layer_failing_mid_forward_recomputes_the_request(monkeypatch, caplog):
    from kvcache.kvstore.layer_loader import LayerLoader, LayerLoadError

    model = build_model("llama", num_hidden_layers=4)
    conn = HFConnector(model, TieredStore.in_memory(1 << 24), chunk_size=CHUNK, model_id="m")
    ids = prompt(50)
    conn.prefill(ids)
    real_wait = LayerLoader.wait_for_layer

    def wait(self, i, *a, **kw):
        if i == 2:
            raise LayerLoadError("layer 2: injected read failure")
        return real_wait(self, i, *a, **kw)

    monkeypatch.setattr(LayerLoader, "wait_for_layer", wait)
    res = conn.prefill(ids)
    assert (res.reused_tokens, res.computed_tokens) == (0, 50)
    assert "recomputing" in caplog.text
    torch.testing.assert_close(res.logits, full_logits(model, ids), atol=ATOL, rtol=RTOL)
