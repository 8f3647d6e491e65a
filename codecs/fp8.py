"""``fp8``: float8 e4m3 with one fp32 scale per (layer, K/V, head).

The scale maps each head's absolute maximum over the chunk to e4m3's largest finite value
(448), so nothing saturates; e4m3's 3 mantissa bits then give ~6% relative error per
element whatever its magnitude. 8 bits per element plus 32 bits per head per chunk.

Non-finite values are kept exactly (``codecs/_raw_escapes.py``): NaN and ±inf (and, in
fp32 chunks, values beyond ``2**126``, where ``448 * scale`` could round past fp32's
largest value) are stored verbatim and coded as 0 in ``q``, and each head's scale comes
from its other values, so they keep their normal error; a chunk with more than 1/16 of
them is refused with ``UnencodableChunkError``. Denormals keep e4m3's relative error down
to its own subnormals (``2**-9`` of the scale): below that they decode as 0; a scale is
never below fp32's smallest normal, so a head of zeros and denormals cannot turn into NaN.

Tensors: ``q`` float8_e4m3fn ``[L, 2, T, H, D]``, ``scale`` fp32 ``[L, 2, H]``, and
``raw_idx``/``raw_val`` when there are raw escapes. Params: ``version`` (2: raw escapes;
format 1 objects still decode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kvcache.codecs import _check, _raw_escapes
from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout

# 2: raw escapes
VERSION = 2
READABLE_VERSIONS = (1, 2)
E4M3_MAX = 448.0
# beyond it, 448 * scale could round past fp32's largest value: such values are raw escapes
_VALUE_LIMIT = 2.0**126
_MIN_SCALE = torch.finfo(torch.float32).tiny


class Fp8Codec(Codec):
    name = "fp8"
    lossless = False

    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: ``[L, 2, T, H, D]``."""
        _check.check_chunk(chunk, layout, self.name, mla_ok=False)
        tensors, escaped = _raw_escapes.split(chunk, _VALUE_LIMIT, self.name)
        x = chunk.float()
        if escaped is not None:
            x = x.masked_fill(escaped, 0.0)  # 0 never widens a head's range
        amax = x.abs().amax(dim=(2, 4))  # [L, 2, H]
        # a head of denormals would give a scale that underflows to 0 (and 0 / 0 = NaN)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)) \
            .clamp_min(_MIN_SCALE)
        q = (x / scale[:, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
        tensors |= {"q": q.to(torch.float8_e4m3fn), "scale": scale}
        return tensors, {"version": VERSION}

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        q, scale, raw = self._parts(tensors, params, layout, num_tokens)
        sel = slice(layers.start, layers.stop)
        out = (q[sel].float() * scale[sel][:, :, None, :, None]).to(layout.torch_dtype)
        raw.apply(out, range(layout.num_layers)[sel])
        return out

    def _parts(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor, _raw_escapes.RawEscapes]:
        if layout.is_mla:
            raise CorruptObjectError("fp8 object for an MLA layout")
        version = _check.version(params, self.name, READABLE_VERSIONS)
        shape = layout.chunk_shape(num_tokens)
        q = _check.tensor(tensors, "q", torch.float8_e4m3fn, shape, self.name)
        scale = _check.tensor(
            tensors, "scale", torch.float32, (layout.num_layers, 2, layout.num_kv_heads), self.name
        )
        if not _raw_escapes.finite_within(scale, _VALUE_LIMIT):
            # format 1 wrote such scales for chunks with an inf (every value of the head
            # decoded wrong); format 2 never does
            raise CorruptObjectError("fp8 scales are not finite: the object was written from "
                                     "a chunk with inf by a format that could not keep it; "
                                     "put the chunk again")
        raw = _raw_escapes.parse(tensors, layout, num_tokens, self.name, readable=version >= 2)
        return q, scale, raw
