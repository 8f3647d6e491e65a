"""Cutting token ids into chunks and keying them deterministically.

Keys must agree across processes and machines, so they come from blake2b over canonical
bytes (token ids as little-endian uint32), never from Python's ``hash``.

- prefix key ``d_i = H(d_{i-1} || fingerprint || tokens_i)``: names chunk i *together with
  everything before it*, so a hit on d_i implies the whole prefix matches (prefix reuse);
- content key ``H(fingerprint || tokens_i)``: names the chunk's text alone, wherever it
  appears in a prompt (blending).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kvcache.kvstore.errors import KVCacheError

DEFAULT_CHUNK_SIZE = 256
KEY_BYTES = 16
# Domain separation: a prefix key and a content key over the same bytes never collide.
_PREFIX_SEED = b"kvcache/prefix/v1"
_CONTENT_SEED = b"kvcache/content/v1"


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise KVCacheError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise KVCacheError("token ids must be in [0, 2**32)")
    return arr.astype("<u4").tobytes()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a token sequence: tokens ``[start, end)`` and its keys."""

    index: int
    start: int
    end: int
    prefix_key: str
    content_key: str

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def chunk_bounds(num_tokens: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk; the last one may be partial."""
    if chunk_size <= 0:
        raise KVCacheError(f"chunk_size must be > 0, got {chunk_size}")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def content_key(fingerprint: str, tokens: Sequence[int]) -> str:
    h = hashlib.blake2b(_CONTENT_SEED, digest_size=KEY_BYTES)
    h.update(bytes.fromhex(fingerprint))
    h.update(_token_bytes(tokens))
    return h.hexdigest()


def chunk_tokens(
    fingerprint: str, tokens: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[Chunk]:
    """Cut ``tokens`` into chunks and key each one (prefix chain and content key)."""
    data = _token_bytes(tokens)
    fp = bytes.fromhex(fingerprint)
    chunks: list[Chunk] = []
    prev = _PREFIX_SEED
    for i, (s, e) in enumerate(chunk_bounds(len(tokens), chunk_size)):
        body = data[4 * s : 4 * e]
        d = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        d.update(fp)
        d.update(body)
        digest = d.digest()
        c = hashlib.blake2b(_CONTENT_SEED, digest_size=KEY_BYTES)
        c.update(fp)
        c.update(body)
        chunks.append(Chunk(i, s, e, digest.hex(), c.hexdigest()))
        prev = digest
    return chunks


def prefix_keys(
    fingerprint: str, tokens: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[str]:
    return [c.prefix_key for c in chunk_tokens(fingerprint, tokens, chunk_size)]


def is_key(text: str) -> bool:
    """True when ``text`` looks like a key (32 lowercase hex digits)."""
    if len(text) != 2 * KEY_BYTES:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()
