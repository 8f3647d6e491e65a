"""What every engine adapter decides the same way: how much of a prompt to take from the store.

The adapters (``hf`` now; vLLM and SGLang next) differ in how they move KV between the
engine and canonical chunks. They must not differ in *which* tokens they reuse:

- a prompt's chunks are keyed by ``kvstore.keys.chunk_tokens`` (``store.key_scheme``)
  under the engine's ``KVLayout``, whose fingerprint includes the tensor-parallel rank
  and world size — each rank stores and finds its own shard;
- ``agreed_prefix``: all ranks of a request reuse the same prefix, the shortest any rank
  holds, so a rank that misses makes the request recompute from there rather than mix
  cached and recomputed KV across ranks;
- ``reusable_tokens``: never the last prompt token (the engine needs its logits), and a
  whole number of the engine's blocks (a paged engine loads into blocks; a prefix may end
  inside a chunk: the chunk is read, only its first tokens are used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.keys import DEFAULT_CHUNK_SIZE, Chunk, chunk_tokens
from kvcache.kvstore.layout import KVLayout


class PrefixLookup(Protocol):
    """How many leading ``keys`` a store holds: ``TieredStore.longest_prefix`` or a
    daemon's ``CacheClient.lookup_prefix`` (``num_tokens``: each key's token count)."""

    def __call__(self, keys: Sequence[str], *, num_tokens: Sequence[int]) -> int: ...


def reusable_tokens(found_tokens: int, num_prompt_tokens: int, block_size: int = 1) -> int:
    """How many leading prompt tokens to take from the store, given that it holds the
    first ``found_tokens`` of them: at most ``num_prompt_tokens - 1``, rounded down to a
    multiple of ``block_size`` (1 for engines without pages)."""
    if block_size <= 0:
        raise LayoutMismatchError(f"block_size must be > 0, got {block_size}")
    usable = min(found_tokens, num_prompt_tokens - 1)
    return max(0, usable // block_size * block_size)


def rank_layouts(layout: KVLayout) -> list[KVLayout]:
    """The layout of every tensor-parallel rank of ``layout``'s engine, rank order."""
    return [dataclasses.replace(layout, tp_rank=r) for r in range(layout.tp_size)]


def agreed_prefix(
    lookup: PrefixLookup,
    tokens: Sequence[int],
    layouts: Sequence[KVLayout],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_scheme: str = "kvcache",
) -> tuple[int, list[list[Chunk]]]:
    """(tokens in the leading chunks every rank's store holds, each rank's chunks).

    ``lookup`` answers for one rank's prefix keys (a ``TieredStore.longest_prefix``, or a
    daemon's ``CacheClient.lookup_prefix``). Ranks are asked in order and the search stops
    at the first rank that holds nothing.
    """
    per_rank = [chunk_tokens(layout.fingerprint, tokens, chunk_size, key_scheme)
                for layout in layouts]
    found: int | None = None
    for chunks in per_rank:
        limit = len(chunks) if found is None else found
        if limit == 0:
            break
        n = lookup([c.prefix_key for c in chunks[:limit]],
                   num_tokens=[c.num_tokens for c in chunks[:limit]])
        found = n if found is None else min(found, n)
    n = found or 0
    return (per_rank[0][n - 1].end if n else 0), per_rank
