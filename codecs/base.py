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

from kvcache.kvstore.layout import KVLayout


class Codec(abc.ABC):
    name: str
    lossless: bool

    @abc.abstractmethod
    def encode(
        self, chunk: torch.Tensor, layout: KVLayout
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: canonical ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA
        ``[layers, tokens, latent_dim]``) of ``layout.torch_dtype``.
        Returns (named tensors, JSON-serialisable params)."""

    @abc.abstractmethod
    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
    ) -> torch.Tensor:
        """Inverse of ``encode``: the canonical chunk of ``num_tokens`` tokens."""

    def decode_layer(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layer: int,
    ) -> torch.Tensor:
        """One layer of the chunk: ``[2, tokens, kv_heads, head_dim]`` (MLA
        ``[tokens, latent_dim]``), so loading can stream layer by layer.

        This default decodes the whole chunk; codecs whose layers are stored independently
        override it to touch only that layer's bytes.
        """
        return self.decode(tensors, params, layout, num_tokens)[layer]

