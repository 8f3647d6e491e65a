"""``quant``: asymmetric integer quantization on KIVI's axes, 8/4/2 bits, bit-packed.

- K is quantized **per channel over groups of tokens** (KIVI: K has outlier channels, so
  each channel gets its own range); rows are ``(token group, channel)`` with ``G_k`` tokens.
- V is quantized **per token over groups of channels** (V's error is averaged by attention
  over tokens, and V has no persistent outlier channels); rows are ``(token, channel group)``.
- Optional block-Hadamard rotation inside each group (SAW-INT4).

Each group stores an fp16 scale and fp16 zero: ``bits + 32 / G`` bits per element.

Tensors (``L`` layers, ``nK = ceil(T / G_k) * H * D`` K groups, ``nV = T * H * D / G_v``):
``k_q`` uint8 ``[L, nK, G_k * bits / 8]``, ``k_scale``/``k_zero`` fp16 ``[L, nK]``,
``v_q`` uint8 ``[L, nV, G_v * bits / 8]``, ``v_scale``/``v_zero`` fp16 ``[L, nV]``.
Params: ``version``, ``bits``, ``k_group``, ``v_group``, ``rotate``. A partial last token
group of K is padded by repeating the last token (it cannot widen the range) and dropped
on decode.

Non-finite values are kept exactly (``codecs/_raw_escapes.py``): NaN, ±inf and values
beyond ``value_limit`` (``2**15``; ``2**15 / sqrt(G)`` with the rotation, which sums a
group into one element) are stored verbatim as ``raw_idx``/``raw_val``, and their groups
are quantized with a stand-in (the mean of the group's other elements), so the other
elements keep their normal error; a chunk with more than 1/16 of them is refused with
``UnencodableChunkError``. The limit keeps every scale, zero and decoded value inside
fp16's range. Denormals need nothing: they quantize like any value (a group of values
below fp16's resolution, 2^-24, decodes to within that). Format 2 (raw escapes); format 1
objects still decode, except those whose scales or zeros are non-finite or saturated at
fp16's limit (written from a chunk with NaN, inf or overflowing values, whose whole group
decoded wrong): those raise ``CorruptObjectError``, like any object that cannot decode.
float8 layouts are refused (``LayoutMismatchError``): their KV is already 8 bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kvcache.codecs import _check, _raw_escapes
from kvcache.codecs.base import Codec
from kvcache.kernels.quant import BITS, QuantizedGroups, dequantize_groups, quantize_groups
from kvcache.kvstore.errors import CorruptObjectError, LayoutMismatchError
from kvcache.kvstore.layout import KVLayout

# 2: values the groups cannot represent kept exactly as raw escapes
VERSION = 2
READABLE_VERSIONS = (1, 2)
_GROUPS = (8, 16, 32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def k_group_size(group: int, tokens: int) -> int:
    """Token group for K: ``group``, shrunk (to a power of two >= 16) for short chunks so a
    3-token tail chunk does not pay for 64 tokens of padding."""
    g = 16
    while g < group and g < tokens:
        g *= 2
    return min(g, group)


def v_group_size(group: int, channels: int) -> int:
    """Channel group for V: ``group`` if it divides the channel count, else the largest
    power of two that does."""
    g = group
    while g > 8 and channels % g:
        g //= 2
    if channels % g:
        raise LayoutMismatchError(f"quant needs kv_heads * head_dim divisible by 8, got {channels}")
    return g


def value_limit(group: int, rotate: bool) -> float:
    """Largest magnitude quantized as usual; beyond it values are raw escapes. ``2**15``
    keeps a group's zero (its minimum), scale (its range over ``2**bits - 1``) and every
    decoded value within fp16's 65504 with room for the scale's rounding; the rotation
    sums a group into one element (up to ``sqrt(G)`` times the largest), so it divides
    the limit by that."""
    return 2.0**15 / (math.sqrt(group) if rotate else 1.0)


# The largest |scale| and |zero| a decoder accepts, by format: format 2 never writes more
# than 2**15 (see ``value_limit``); format 1 clamped them to fp16's 65504 where a group held
# inf or an overflowing value, so 65504 means that group decodes wrong (65472 is the fp16
# value below it). NaN fails every bound.
_PARAM_LIMIT = {1: 65472.0, 2: 2.0**15}


def _rows(q: QuantizedGroups, layers: slice) -> QuantizedGroups:
    """The rows of ``layers`` of ``[L, n, ...]`` groups, as ``[rows, ...]``."""
    packed = q.packed[layers]
    return QuantizedGroups(
        packed.reshape(-1, packed.shape[-1]), q.scale[layers].reshape(-1),
        q.zero[layers].reshape(-1),
    )


class QuantCodec(Codec):
    name = "quant"
    lossless = False

    def __init__(self, bits: int = 4, group: int = 64, rotate: bool = False) -> None:
        if bits not in BITS or group not in _GROUPS:
            raise ValueError(f"quant: bits in {BITS}, group in {_GROUPS}")
        self.bits, self.group, self.rotate = bits, group, rotate

    # -- encode ---------------------------------------------------------------------------
    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: ``[L, 2, T, H, D]``."""
        tokens = _check.check_chunk(chunk, layout, self.name, mla_ok=False)
        if chunk.dtype not in _DTYPES:
            raise LayoutMismatchError(
                f"quant codes float16, bfloat16 and float32 KV, not {layout.dtype}; store it "
                "with 'fp8', 'cachegen', 'zstd' or 'raw'")
        L, C = layout.num_layers, layout.num_kv_heads * layout.head_dim
        gk = k_group_size(self.group, tokens)
        gv = v_group_size(self.group, C)
        if self.rotate and gv < 16:
            raise LayoutMismatchError("quant rotation needs channel groups of at least 16")
        nt = -(-tokens // gk)
        tensors, escaped = _raw_escapes.split(
            chunk, min(value_limit(gk, self.rotate), value_limit(gv, self.rotate)), self.name)
        k = chunk[:, 0].reshape(L, tokens, C)
        if nt * gk != tokens:  # repeat the last token: never widens a group's range
            k = torch.cat([k, k[:, -1:].expand(L, nt * gk - tokens, C)], 1)
        # rows: (layer, token group, channel) each holding gk tokens of one channel
        k_rows = k.view(L, nt, gk, C).permute(0, 1, 3, 2).reshape(-1, gk)
        v_rows = chunk[:, 1].reshape(-1, gv)
        if escaped is not None:
            # the same arrangement of the mask (the padding repeats the last token's)
            mk = escaped[:, 0].reshape(L, tokens, C)
            if nt * gk != tokens:
                mk = torch.cat([mk, mk[:, -1:].expand(L, nt * gk - tokens, C)], 1)
            mk = mk.view(L, nt, gk, C).permute(0, 1, 3, 2).reshape(-1, gk)
            k_rows = _raw_escapes.stand_in(k_rows, mk, 1)
            v_rows = _raw_escapes.stand_in(v_rows, escaped[:, 1].reshape(-1, gv), 1)
        kq = quantize_groups(k_rows, self.bits, rotate=self.rotate)
        vq = quantize_groups(v_rows, self.bits, rotate=self.rotate)
        for prefix, q in (("k", kq), ("v", vq)):
            tensors[f"{prefix}_q"] = q.packed.view(L, -1, q.packed.shape[1])
            tensors[f"{prefix}_scale"] = q.scale.view(L, -1)
            tensors[f"{prefix}_zero"] = q.zero.view(L, -1)
        params = {
            "version": VERSION, "bits": self.bits, "k_group": gk, "v_group": gv,
            "rotate": self.rotate,
        }
        return tensors, params

    # -- decode ---------------------------------------------------------------------------
    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        """``[len(layers), 2, T, H, D]``."""
        if layout.is_mla:
            raise CorruptObjectError("quant object for an MLA layout")
        version = _check.version(params, self.name, READABLE_VERSIONS)
        bits = _check.int_param(params, "bits", self.name, BITS)
        gk = _check.int_param(params, "k_group", self.name, _GROUPS)
        gv = _check.int_param(params, "v_group", self.name, _GROUPS)
        rotate = _check.bool_param(params, "rotate", self.name)
        if rotate and (gk < 16 or gv < 16):
            raise CorruptObjectError("quant rotation with groups under 16")
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        C, T = H * D, num_tokens
        if C % gv:
            raise CorruptObjectError(f"quant v_group {gv} does not divide {C} channels")
        nt = -(-T // gk)
        nk, nv = nt * C, T * C // gv
        per = 8 // bits
        parts = {}
        for prefix, n, g in (("k", nk, gk), ("v", nv, gv)):
            parts[prefix] = QuantizedGroups(
                _check.tensor(tensors, f"{prefix}_q", torch.uint8, (L, n, g // per), self.name),
                _check.tensor(tensors, f"{prefix}_scale", torch.float16, (L, n), self.name),
                _check.tensor(tensors, f"{prefix}_zero", torch.float16, (L, n), self.name),
            )
        sel = range(L)[layers.start : layers.stop]
        span_all = slice(sel.start, sel.stop) if len(sel) else slice(0, 0)
        for prefix in ("k", "v"):
            q = parts[prefix]
            if not (_raw_escapes.finite_within(q.scale[span_all], _PARAM_LIMIT[version])
                    and _raw_escapes.finite_within(q.zero[span_all], _PARAM_LIMIT[version])):
                raise CorruptObjectError(
                    f"quant {prefix.upper()} scales or zeros are not finite or saturated: the "
                    "object was written from a chunk with NaN, inf or overflowing values by a "
                    "format that could not keep them; put the chunk again")
        raw = _raw_escapes.parse(tensors, layout, T, self.name, readable=version >= 2)
        dtype = layout.torch_dtype
        device = parts["k"].packed.device
        out = torch.empty((len(sel), 2, T, H, D), dtype=dtype, device=device)

        def decode_span(i: int, j: int) -> None:
            """Layers ``sel[i:j]`` into ``out[i:j]``."""
            n = j - i
            span = slice(sel[i], sel[i] + n)
            k = dequantize_groups(_rows(parts["k"], span), bits, rotate=rotate, dtype=dtype)
            v = dequantize_groups(_rows(parts["v"], span), bits, rotate=rotate, dtype=dtype)
            k = k.view(n, nt, C, gk).permute(0, 1, 3, 2).reshape(n, nt * gk, H, D)[:, :T]
            out[i:j, 0] = k
            out[i:j, 1] = v.view(n, T, H, D)

        if device.type != "cpu":  # one launch per plane for the whole chunk
            decode_span(0, len(sel))
        else:
            # On the CPU, layer by layer: the dequantizer's int32/fp32 intermediates of one
            # layer stay in cache (of a whole chunk they are ~8x its size: 2.6x slower).
            for i in range(len(sel)):
                decode_span(i, i + 1)
        raw.apply(out, sel)
        return out
