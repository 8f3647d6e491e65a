"""The ``Codec`` interface: canonical chunk tensor <-> named tensors + JSON parameters.

A codec's output must fit the stored-object container (``kvcache.kvstore.container``):
named tensors of plain dtypes and a JSON-serialisable parameter map. Decoding never
executes or unpickles anything; malformed input raises ``CorruptObjectError``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch

from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.layout import KVLayout


def check_layer(layout: KVLayout, layer: int) -> None:
    """``IndexError`` unless ``layer`` is one of the layout's layers."""
    if not 0 <= layer < layout.num_layers:
        raise IndexError(f"layer {layer} out of range [0, {layout.num_layers})")


class Codec(abc.ABC):
    name: str
    lossless: bool

    @abc.abstractmethod
    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: canonical ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA
        ``[layers, tokens, latent_dim]``) of ``layout.torch_dtype``. rope_start: the
        positions K was rotated at (``rope_start, ...``; None: unknown or not rotated), for
        codecs that code keys before RoPE; what they did is in their params, so decoding
        needs only the stored object. Returns (named tensors, JSON-serialisable params)."""

    @abc.abstractmethod
    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        """Layers ``layers`` of the chunk of ``num_tokens`` tokens:
        ``[len(layers), 2, tokens, kv_heads, head_dim]`` (MLA ``[len(layers), tokens,
        latent_dim]``). Codecs that store layers independently touch only their bytes."""

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
    ) -> torch.Tensor:
        """Inverse of ``encode``: the canonical chunk of ``num_tokens`` tokens."""
        return self.decode_layers(tensors, params, layout, num_tokens, range(layout.num_layers))

    def decode_layer(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layer: int,
    ) -> torch.Tensor:
        """One layer: ``[2, tokens, kv_heads, head_dim]`` (MLA ``[tokens, latent_dim]``), so
        loading can stream layer by layer."""
        check_layer(layout, layer)
        return self.decode_layers(tensors, params, layout, num_tokens, range(layer, layer + 1))[0]

    def decode_layer_into(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layer: int,
        out: torch.Tensor,
    ) -> None:
        """One layer into ``out`` (``[2, tokens, kv_heads, head_dim]``, MLA ``[tokens,
        latent_dim]``, of the layout's dtype; on any device, each K/V plane contiguous, e.g.
        a chunk's slice of a loader's buffer). Here: ``decode_layer`` on the CPU, then a
        copy (asynchronous from pinned memory: the caller keeps ``tensors`` alive until it
        is done); codecs that can decode on ``out``'s device override it."""
        part = self.decode_layer(tensors, params, layout, num_tokens, layer)
        if part.shape != out.shape or part.dtype != out.dtype:
            raise LayoutMismatchError(
                f"codec {self.name!r} decoded layer {layer} to {tuple(part.shape)} "
                f"{part.dtype}, expected {tuple(out.shape)} {out.dtype}")
        out.copy_(part, non_blocking=part.is_pinned())
