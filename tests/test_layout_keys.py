import subprocess
import sys

import pytest
import torch

from kvcache.kvstore.errors import KVCacheError, LayoutMismatchError
from kvcache.kvstore.keys import chunk_bounds, chunk_tokens, content_key, is_key, prefix_keys
from kvcache.kvstore.layout import AttentionKind, KVLayout, RopeSpec


def test_chunk_shapes_and_bytes(layout):
    assert layout.chunk_shape(5) == (2, 2, 5, 2, 8)
    assert layout.bytes_per_token == 2 * 2 * 2 * 8 * 2
    llama = KVLayout("llama-3-8b", 32, 8, 128)
    assert llama.bytes_per_token == 128 * 1024  # BENCHMARKS.md: 128 KiB per token
    mla = KVLayout("ds", 4, 1, 64, attention=AttentionKind.MLA, latent_dim=576)
    assert mla.chunk_shape(3) == (4, 3, 576)


def test_fingerprint_is_stable_and_sensitive(layout):
    same = KVLayout("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
    assert same.fingerprint == layout.fingerprint
    for other in (
        KVLayout("test-model", 2, 2, 8, dtype="bfloat16"),
        KVLayout("other-model", 2, 2, 8, dtype="float16"),
        KVLayout("test-model", 2, 2, 8, dtype="float16", tp_rank=1, tp_size=2),
        KVLayout("test-model", 2, 2, 8, dtype="float16", rope=RopeSpec(theta=5e5)),
        KVLayout("test-model", 2, 2, 8, dtype="float16", rope=None),
    ):
        assert other.fingerprint != layout.fingerprint


def test_layout_roundtrips_through_dict(layout):
    assert KVLayout.from_dict(layout.to_dict()) == layout


def test_llama3_rope_params_keep_older_layouts_keys():
    """The llama3 fields came after layouts were first keyed: unset, they are left out of
    the dict (so fingerprints, and every stored key, are unchanged); set, they count."""
    plain = KVLayout("m", 2, 2, 8, rope=RopeSpec(theta=5e5, scaling_type="llama3"))
    assert set(plain.to_dict()["rope"]) == {
        "theta", "style", "rotary_dim", "scaling_type", "scaling_factor"}
    full = KVLayout("m", 2, 2, 8, rope=RopeSpec(
        theta=5e5, scaling_type="llama3", scaling_factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position=8192))
    assert full.fingerprint != plain.fingerprint
    assert KVLayout.from_dict(full.to_dict()) == full
    for bad in (dict(low_freq_factor=1.0),  # not all three
                dict(scaling_type="linear", low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position=8192),
                dict(scaling_type="llama3", low_freq_factor=4.0, high_freq_factor=1.0,
                     original_max_position=8192)):
        with pytest.raises(LayoutMismatchError):
            RopeSpec(**bad)


def test_page_format_keeps_canonical_layouts_keys_and_sets_opaque_ones_apart(tmp_path):
    """Unset, the field is left out of the dict (fingerprints unchanged); set, the layout
    is another one, and even a store whose tiers quantize keeps such chunks exact."""
    from kvcache.kvstore.config import StoreConfig
    from kvcache.kvstore.tiered_store import TieredStore

    plain = KVLayout("m", 2, 2, 8, dtype="float32")
    assert "page_format" not in plain.to_dict()
    pages = KVLayout("m", 2, 2, 8, dtype="float32", page_format="vllm-cpu-amx-b32")
    assert pages.fingerprint != plain.fingerprint
    assert KVLayout.from_dict(pages.to_dict()) == pages
    cfg = StoreConfig.from_dict({"dir": str(tmp_path), "cpu": {"codec": "quant"},
                                 "disk": {"codec": "cachegen"}})
    chunk = torch.randn(pages.chunk_shape(32))
    with TieredStore.open(cfg) as store:
        store.put("0" * 32, chunk, pages)
        store.flush()
        assert store.get_object("0" * 32).header.codec == "raw"
        assert store.tiers[1].get("0" * 32).header.codec == "raw"  # written down raw too
        assert torch.equal(store.get("0" * 32), chunk)
        store.put("1" * 32, chunk, plain)  # canonical chunks do get the tier's codec
        assert store.get_object("1" * 32).header.codec == "quant"


def test_fingerprint_and_keys_agree_across_processes(layout):
    code = (
        "from kvcache.kvstore.layout import KVLayout;"
        "from kvcache.kvstore.keys import prefix_keys;"
        "l=KVLayout('test-model',num_layers=2,num_kv_heads=2,head_dim=8,dtype='float16');"
        "print(l.fingerprint, *prefix_keys(l.fingerprint, list(range(40)), 16))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123"},
    ).stdout.split()
    assert out == [layout.fingerprint, *prefix_keys(layout.fingerprint, list(range(40)), 16)]


def test_bad_layouts_are_rejected():
    with pytest.raises(LayoutMismatchError, match="dtype"):
        KVLayout("m", 2, 2, 8, dtype="int3")
    with pytest.raises(LayoutMismatchError, match="num_layers"):
        KVLayout("m", 0, 2, 8)
    with pytest.raises(LayoutMismatchError, match="tp_rank"):
        KVLayout("m", 2, 2, 8, tp_rank=2, tp_size=2)
    with pytest.raises(LayoutMismatchError, match="latent_dim"):
        KVLayout("m", 2, 1, 8, attention="mla")


def test_check_chunk(layout):
    assert layout.check_chunk(torch.zeros(layout.chunk_shape(3), dtype=torch.float16)) == 3
    with pytest.raises(LayoutMismatchError, match="dtype"):
        layout.check_chunk(torch.zeros(layout.chunk_shape(3)))
    with pytest.raises(LayoutMismatchError, match="shape"):
        layout.check_chunk(torch.zeros(2, 3, 3, 2, 8, dtype=torch.float16))
    with pytest.raises(LayoutMismatchError, match="shape"):
        layout.check_chunk(torch.zeros(layout.chunk_shape(0), dtype=torch.float16))


def test_chunking_keeps_partial_last_chunk(layout):
    assert chunk_bounds(600, 256) == [(0, 256), (256, 512), (512, 600)]
    chunks = chunk_tokens(layout.fingerprint, list(range(600)))
    assert [c.num_tokens for c in chunks] == [256, 256, 88]
    assert all(is_key(c.prefix_key) and is_key(c.content_key) for c in chunks)


def test_prefix_keys_chain_and_content_keys_do_not(layout):
    fp = layout.fingerprint
    a = chunk_tokens(fp, [1] * 16 + [2] * 16, 16)
    b = chunk_tokens(fp, [9] * 16 + [2] * 16, 16)
    # Same second chunk text: same content key, different prefix key.
    assert a[1].content_key == b[1].content_key == content_key(fp, [2] * 16)
    assert a[1].prefix_key != b[1].prefix_key
    # Prefix keys of a common prefix agree, whatever follows.
    c = chunk_tokens(fp, [1] * 16 + [3] * 5, 16)
    assert c[0].prefix_key == a[0].prefix_key
    assert a[0].prefix_key != a[0].content_key


def test_bad_token_ids():
    with pytest.raises(KVCacheError):
        prefix_keys("00" * 16, [-1, 2])
    with pytest.raises(KVCacheError):
        chunk_bounds(10, 0)
