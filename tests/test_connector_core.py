"""The reuse decisions every engine adapter shares (``kvcache.connectors.core``)."""

from __future__ import annotations

import dataclasses

import pytest

from kvcache.connectors.core import agreed_prefix, rank_layouts, reusable_tokens
from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_chunk


@pytest.mark.parametrize(
    ("found", "prompt", "block", "want"),
    [
        (512, 600, 16, 512),   # the store's prefix, already block-aligned
        (600, 600, 1, 599),    # all of it: the last token is always recomputed
        (600, 600, 16, 592),   # ... and what is left is whole blocks
        (300, 600, 32, 288),   # a prefix ending inside a block stops before it
        (0, 600, 16, 0),
        (10, 1, 1, 0),         # a one-token prompt reuses nothing
        (20, 10, 32, 0),       # less than a block
    ],
)
def test_reusable_tokens(found, prompt, block, want):
    assert reusable_tokens(found, prompt, block) == want


def test_reusable_tokens_needs_a_block_size():
    with pytest.raises(LayoutMismatchError):
        reusable_tokens(10, 20, 0)


def test_ranks_have_their_own_keys_and_agree_on_the_shortest_prefix(layout):
    tp = dataclasses.replace(layout, tp_size=2)
    ranks = rank_layouts(tp)
    assert [r.tp_rank for r in ranks] == [0, 1]
    assert ranks[0].fingerprint != ranks[1].fingerprint
    tokens = list(range(100))
    store = TieredStore.in_memory(1 << 20)
    _, per_rank = agreed_prefix(store.longest_prefix, tokens, ranks, chunk_size=16)
    assert per_rank[0][0].prefix_key != per_rank[1][0].prefix_key
    for rank, held in ((0, 5), (1, 3)):  # rank 1 lost its later chunks
        for c in per_rank[rank][:held]:
            store.put(c.prefix_key, make_chunk(ranks[rank], c.num_tokens), ranks[rank])
    found, _ = agreed_prefix(store.longest_prefix, tokens, ranks, chunk_size=16)
    assert found == per_rank[0][2].end == 48  # 3 chunks of 16: what both ranks hold
    asked = []

    def lookup(keys, *, num_tokens):
        asked.append(len(keys))
        return 0

    assert agreed_prefix(lookup, tokens, ranks, chunk_size=16)[0] == 0
    assert asked == [7]  # rank 0 holds nothing: rank 1 is not asked
