"""Cutting token ids into chunks and keying them deterministically.

Keys must agree across processes and machines, so they come from blake2b over canonical
bytes (token ids as little-endian uint32), never from Python's ``hash``.

- prefix key ``d_i = H(d_{i-1} || fingerprint || tokens_i)``: names chunk i *together with
  everything before it*, so a hit on d_i implies the whole prefix matches (prefix reuse);
- content key ``H(fingerprint || tokens_i)``: names the chunk's text alone, wherever it
  appears in a prompt (blending).

Key schemes (``store.key_scheme``) choose how prefix keys are chained:

- ``"kvcache"`` (the default): the blake2b chain above; a partial last chunk is keyed too;
- ``"sglang"``: SGLang's page-hash chain, so that SGLang's HiCache backend
  (``connectors/sglang.py``), which sees only SGLang's page hashes and never the tokens,
  keys the same tokens alike. SGLang hashes page ``i`` as ``sha256(h_{i-1} || tokens_i)``
  (tokens as little-endian uint32, no ``h_{-1}``); chunk ``i``, one page of ``chunk_size``
  tokens, is keyed ``H(fingerprint || h_i)`` (``page_chain_key``). SGLang stores whole
  pages only, so trailing tokens that do not fill a chunk are not keyed.
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
_PAGE_CHAIN_SEED = b"kvcache/sglang-page/v1"
KEY_SCHEMES = ("kvcache", "sglang")


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


def sglang_page_hashes(tokens: Sequence[int], page_size: int) -> list[str]:
    """SGLang's page hashes of ``tokens`` (hex sha256, one per whole page of ``page_size``
    tokens), as SGLang's ``get_hash_str(tokens, None, page_size)`` computes them for a
    request without a cache namespace (no LoRA ``extra_key``, no ``cache_salt``)."""
    if page_size <= 0:
        raise KVCacheError(f"page_size must be > 0, got {page_size}")
    data = _token_bytes(tokens)
    out: list[str] = []
    prior = b""
    for s in range(0, len(tokens) // page_size * page_size, page_size):
        prior = hashlib.sha256(prior + data[4 * s : 4 * (s + page_size)]).digest()
        out.append(prior.hex())
    return out


def page_chain_key(fingerprint: str, page_hash: str) -> str:
    """The prefix key of the page SGLang hashes ``page_hash`` (64 hex digits), for the
    layout of ``fingerprint``: the tokens it names and everything before them."""
    try:
        digest = bytes.fromhex(page_hash)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise KVCacheError(f"not an SGLang page hash (64 hex digits): {page_hash!r}")
    h = hashlib.blake2b(_PAGE_CHAIN_SEED, digest_size=KEY_BYTES)
    h.update(bytes.fromhex(fingerprint))
    h.update(digest)
    return h.hexdigest()


def chunk_tokens(
    fingerprint: str, tokens: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_scheme: str = "kvcache",
) -> list[Chunk]:
    """Cut ``tokens`` into chunks and key each one (prefix chain and content key) under
    ``key_scheme`` (see the module docstring)."""
    if key_scheme not in KEY_SCHEMES:
        raise KVCacheError(f"key_scheme must be one of {KEY_SCHEMES}, got {key_scheme!r}")
    data = _token_bytes(tokens)
    fp = bytes.fromhex(fingerprint)
    bounds = chunk_bounds(len(tokens), chunk_size)
    page_hashes: list[str] = []
    if key_scheme == "sglang":
        page_hashes = sglang_page_hashes(tokens, chunk_size)
        bounds = bounds[: len(page_hashes)]
    chunks: list[Chunk] = []
    prev = _PREFIX_SEED
    for i, (s, e) in enumerate(bounds):
        body = data[4 * s : 4 * e]
        if page_hashes:
            prefix = page_chain_key(fingerprint, page_hashes[i])
        else:
            d = hashlib.blake2b(prev, digest_size=KEY_BYTES)
            d.update(fp)
            d.update(body)
            prev = d.digest()
            prefix = prev.hex()
        c = hashlib.blake2b(_CONTENT_SEED, digest_size=KEY_BYTES)
        c.update(fp)
        c.update(body)
        chunks.append(Chunk(i, s, e, prefix, c.hexdigest()))
    return chunks


def prefix_keys(
    fingerprint: str, tokens: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE,
    key_scheme: str = "kvcache",
) -> list[str]:
    return [c.prefix_key for c in chunk_tokens(fingerprint, tokens, chunk_size, key_scheme)]


def is_key(text: str) -> bool:
    """True when ``text`` looks like a key (32 lowercase hex digits)."""
    if len(text) != 2 * KEY_BYTES:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return text == text.lower()
