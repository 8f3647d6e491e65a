"""``raw``: the identity codec, zero-copy.

The chunk is stored as one tensor, in the order its memory already has:

- ``"kv"``: the canonical chunk, ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA
  ``[layers, tokens, latent_dim]``);
- ``"kv_by_token"``: the same values with each token's layers together, ``[2, tokens,
  layers, kv_heads, head_dim]`` (MLA ``[tokens, layers, latent_dim]``), for chunks that
  are views of token-major memory such as SGLang's ``page_first`` host pool. Storing them
  canonically would make both the write and a read back into such memory a transposition
  that moves a head's few hundred bytes at a time (on a 2-core x86 VM it ran at ~0.7x a
  plain copy, against ~1x for the same bytes in order).

Decoding returns a canonical view of either, so every reader (any engine, any layout,
transcoding into another codec) sees the same chunk; only the cost of copying it
differs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout

CANONICAL, BY_TOKEN = "kv", "kv_by_token"


def _by_token_shape(layout: KVLayout, num_tokens: int) -> tuple[int, ...]:
    """The shape of ``"kv_by_token"`` for a chunk of ``num_tokens`` tokens."""
    s = layout.chunk_shape(num_tokens)
    return (s[1], s[0], s[2]) if layout.is_mla else (s[1], s[2], s[0], s[3], s[4])


def _to_by_token(chunk: torch.Tensor, mla: bool) -> torch.Tensor:
    """chunk: canonical ``[L, 2, T, H, D]`` (MLA ``[L, T, latent]``) -> a view of it as
    ``[2, T, L, H, D]`` (MLA ``[T, L, latent]``)."""
    return chunk.transpose(0, 1) if mla else chunk.permute(1, 2, 0, 3, 4)


def _to_canonical(by_token: torch.Tensor, mla: bool) -> torch.Tensor:
    """Inverse of ``_to_by_token``: a view."""
    return by_token.transpose(0, 1) if mla else by_token.permute(2, 0, 1, 3, 4)


def _stored_tensor(chunk: torch.Tensor, layout: KVLayout) -> tuple[str, torch.Tensor]:
    """How ``raw`` stores ``chunk`` (canonical, of ``layout``): (name, view). By token
    when the chunk's memory runs token by token (each K/V plane of it), else canonical.
    Engine-specific page formats are stored as they come."""
    if layout.page_format is None and _runs_by_token(tuple(chunk.shape), chunk.stride(),
                                                     layout.is_mla):
        return BY_TOKEN, _to_by_token(chunk, layout.is_mla)
    return CANONICAL, chunk


@functools.lru_cache(maxsize=256)
def _runs_by_token(shape: tuple[int, ...], stride: tuple[int, ...], mla: bool) -> bool:
    """Whether a canonical chunk of this shape and these strides lies token by token in
    memory (each K/V plane contiguous), not canonically. Remembered: an engine hands every
    page of its pool with the same strides, and the tensor ops that ask cost microseconds
    a page."""
    if _contiguous(shape, stride):
        return False
    order = (1, 0, 2) if mla else (1, 2, 0, 3, 4)  # canonical -> by token
    shape, stride = tuple(shape[i] for i in order), tuple(stride[i] for i in order)
    return _contiguous(shape, stride) if mla else _contiguous(shape[1:], stride[1:])


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """``Tensor.is_contiguous`` from a shape and strides."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        name, tensor = _stored_tensor(chunk, layout)
        return {name: tensor}, {}

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        return canonical_view(tensors, layout, num_tokens)[layers.start : layers.stop]


def canonical_view(tensors: Mapping[str, torch.Tensor], layout: KVLayout, num_tokens: int
                   ) -> torch.Tensor:
    """A raw object's one tensor as the canonical chunk (a view); ``CorruptObjectError``
    unless the object holds exactly one tensor of its layout's shape and dtype."""
    name = BY_TOKEN if BY_TOKEN in tensors else CANONICAL
    kv = tensors.get(name)
    expected = (_by_token_shape(layout, num_tokens) if name == BY_TOKEN
                else layout.chunk_shape(num_tokens))
    if (kv is None or len(tensors) != 1 or tuple(kv.shape) != expected
            or kv.dtype != layout.torch_dtype):
        got = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        raise CorruptObjectError(
            f"raw object does not hold one {expected} {layout.dtype} tensor {name!r} "
            f"(got {got})")
    return _to_canonical(kv, layout.is_mla) if name == BY_TOKEN else kv
