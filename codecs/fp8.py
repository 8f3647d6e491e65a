"""``fp8``: float8 e4m3 with one fp32 scale per (layer, K/V, head).

The scale maps each head's absolute maximum over the chunk to e4m3's largest finite value
(448), so nothing saturates; e4m3's 3 mantissa bits then give ~6% relative error per
element whatever its magnitude. 8 bits per element plus 32 bits per head per chunk.

Tensors: ``q`` float8_e4m3fn ``[L, 2, T, H, D]``, ``scale`` fp32 ``[L, 2, H]``.
Params: ``version``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvcache.codecs import _check
from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout

VERSION = 1
E4M3_MAX = 448.0


class Fp8Codec(Codec):
    name = "fp8"
    lossless = False

    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: ``[L, 2, T, H, D]``."""
        _check.check_chunk(chunk, layout, self.name, mla_ok=False)
        x = chunk.float()
        amax = x.abs().amax(dim=(2, 4))  # [L, 2, H]
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        q = (x / scale[:, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
        return {"q": q.to(torch.float8_e4m3fn), "scale": scale}, {"version": VERSION}

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        q, scale = self._parts(tensors, params, layout, num_tokens)
        sel = slice(layers.start, layers.stop)
        return (q[sel].float() * scale[sel][:, :, None, :, None]).to(layout.torch_dtype)

    def _parts(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layout.is_mla:
            raise CorruptObjectError("fp8 object for an MLA layout")
        _check.version(params, self.name, VERSION)
        shape = layout.chunk_shape(num_tokens)
        q = _check.tensor(tensors, "q", torch.float8_e4m3fn, shape, self.name)
        scale = _check.tensor(
            tensors, "scale", torch.float32, (layout.num_layers, 2, layout.num_kv_heads), self.name
        )
        if not bool(torch.isfinite(scale).all()):
            raise CorruptObjectError("fp8 scales are not finite")
        return q, scale
