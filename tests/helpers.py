"""Small builders shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvcache.kvstore.keys import content_key
from kvcache.kvstore.layout import KVLayout


def make_key(i: int) -> str:
    """A valid, distinct key for test entry ``i``."""
    return content_key("00" * 16, [i])


def make_chunk(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Random canonical chunk ``[layers, 2, num_tokens, kv_heads, head_dim]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layout.chunk_shape(num_tokens), generator=g).to(layout.torch_dtype)


def page_cached(path: Path) -> bool:
    """Whether at least half of the file at ``path`` is in the page cache."""
    from kvcache.kvstore import blob_files

    fd = os.open(path, os.O_RDONLY)
    try:
        return blob_files._mostly_cached(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
