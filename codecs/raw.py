"""``raw``: the identity codec. The chunk is stored as one tensor ``"kv"``, zero-copy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout


class RawCodec(Codec):
    name = "raw"
    lossless = True

    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"kv": chunk}, {}

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        kv = tensors.get("kv")
        expected = layout.chunk_shape(num_tokens)
        if kv is None or tuple(kv.shape) != expected or kv.dtype != layout.torch_dtype:
            got = None if kv is None else (tuple(kv.shape), kv.dtype)
            raise CorruptObjectError(
                f"raw object does not hold a {expected} {layout.dtype} chunk (got {got})"
            )
        return kv[layers.start : layers.stop]
