"""The "sglang" key scheme: SGLang's page-hash chain, so that engines key tokens alike."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from kvcache.connectors.hf import HFConnector
from kvcache.connectors.paged_plan import PagedPlanner
from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.errors import ConfigError, KVCacheError
from kvcache.kvstore.keys import (
    chunk_tokens,
    page_chain_key,
    prefix_keys,
    sglang_page_hashes,
)
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from tests.test_hf_connector import build_model, full_logits, prompt

LAYOUT = KVLayout("scheme-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")
FP = LAYOUT.fingerprint


def test_page_hashes_are_sglangs():
    # SGLang 0.5.23's get_hash_str(list(range(8)), None, page_size=4), its native code.
    assert sglang_page_hashes(list(range(8)), 4) == [
        "baed642339816affb3fe8719792d0e4ce82f12db72b7373d244eaa65445800fe",
        "01414b052706d93bd0f1f1646c0e8ca2fa8ef5efd7bcc99f7a1cee8eb11ad052",
    ]
    tokens = [5, 70000, 3, 2**32 - 1, 9, 9]
    first = hashlib.sha256(struct.pack("<2I", 5, 70000)).digest()
    second = hashlib.sha256(first + struct.pack("<2I", 3, 2**32 - 1)).digest()
    # whole pages only: the last two tokens are the third page
    assert sglang_page_hashes(tokens[:5], 2) == [first.hex(), second.hex()]


def test_sglang_chunks_are_whole_pages_keyed_by_their_page_hash():
    tokens = list(range(100, 110))
    chunks = chunk_tokens(FP, tokens, 4, "sglang")
    assert [(c.start, c.end) for c in chunks] == [(0, 4), (4, 8)]  # no partial chunk
    hashes = sglang_page_hashes(tokens, 4)
    assert [c.prefix_key for c in chunks] == [page_chain_key(FP, h) for h in hashes]
    # content keys do not depend on the scheme; prefix keys do
    default = chunk_tokens(FP, tokens, 4)
    assert [c.content_key for c in chunks] == [c.content_key for c in default[:2]]
    assert not {c.prefix_key for c in chunks} & {c.prefix_key for c in default}
    # a prefix key names everything before it, and the layout
    changed = chunk_tokens(FP, [0, *tokens[1:]], 4, "sglang")
    assert all(a.prefix_key != b.prefix_key for a, b in zip(chunks, changed, strict=True))
    other = KVLayout("other-model", num_layers=2, num_kv_heads=2, head_dim=16).fingerprint
    assert prefix_keys(other, tokens, 4, "sglang")[0] != chunks[0].prefix_key


def test_bad_schemes_and_hashes_are_refused():
    with pytest.raises(KVCacheError, match="key_scheme"):
        chunk_tokens(FP, [1, 2], 2, "lmcache")
    with pytest.raises(KVCacheError, match="page hash"):
        page_chain_key(FP, "abc")
    with pytest.raises(ConfigError, match="key_scheme"):
        KVCacheConfig.from_dict({"store": {"key_scheme": "sglangg"}})


def test_a_paged_engine_finds_chunks_stored_under_page_keys():
    store = TieredStore.in_memory(1 << 24)
    tokens = list(range(1000, 1000 + 200))
    for c in chunk_tokens(FP, tokens, 64, "sglang")[:2]:
        store.put(c.prefix_key, torch.zeros(LAYOUT.chunk_shape(64)), LAYOUT)
    sglang = PagedPlanner(LAYOUT, store.longest_prefix, chunk_size=64, block_size=16,
                          key_scheme="sglang")
    assert sglang.matched_tokens("r", tokens, 0) == 128
    default = PagedPlanner(LAYOUT, store.longest_prefix, chunk_size=64, block_size=16)
    assert default.matched_tokens("r", tokens, 0) == 0


def test_transformers_reuses_whole_pages_under_the_sglang_scheme():
    model = build_model("llama")
    store = TieredStore.in_memory(1 << 24)
    conn = HFConnector(model, store, chunk_size=8, key_scheme="sglang")
    ids = prompt(8 * 3 + 5)
    first = conn.prefill(ids)
    assert first.stored_tokens == 24  # the 5 trailing tokens fill no page
    again = conn.prefill(ids)
    assert again.reused_tokens == 24
    torch.testing.assert_close(again.logits, full_logits(model, ids), atol=1e-4, rtol=1e-4)
    exact = conn.prefill(ids[:24])  # a prompt of whole pages leaves its last token
    assert exact.reused_tokens == 23
