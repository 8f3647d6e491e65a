"""``cachegen``: CacheGen-style lossy codec — normalize, quantize uniformly, entropy-code.

Per layer ``l`` and plane (K or V), with ``x`` the plane ``[T, C]`` (``C = H * D``):

1. **Per-channel statistics.** ``mu_c``: each channel's mean over the chunk's tokens
   (fp16). K is scaled per channel (``sigma_c`` = mean ``|x - mu|`` over tokens, KIVI's K
   axis: K has persistent outlier channels); V per token and head (``sigma_{t,h}`` over
   ``head_dim``). Both are robust (1.25 x mean absolute deviation): an outlier becomes an
   escape instead of widening the step. Scales are stored as 8-bit log codes
   (``2^((code - 160) / 8)``, ~9% steps; the decoder uses exactly the coded value, so
   this costs no accuracy, only step choice).
2. **Uniform quantization** ``z = round((x - mu) / (step[l] * sigma))``. ``step`` comes from
   the level: smaller for early layers and for K than for V (CacheGen's layer-group bit
   allocation: early layers' and keys' errors propagate further).
3. **Escapes.** Symbols are 4-bit (``|z| <= 7``) when the step is coarse and 8-bit
   (``|z| <= 127``) when fine; a value outside that range (attention-sink tokens, rare
   outliers) is stored exactly as fp16 with its index, instead of being clipped.
4. **Entropy coding** of the symbols with zstd's Huffman literal coder, one frame per
   (layer, plane), 4-bit symbols packed in pairs (so Huffman codes symbol pairs: measured
   within 2-4% of the order-0 entropy, decoding at > 2 GB/s of symbols on one core). The
   coding tables live inside each frame: ~tens of bytes per (layer, plane) per chunk, instead
   of LMCache's 16-bit CDF per (layer, channel) per chunk (~13% of the raw chunk).

Because the statistics normalize every channel, symbols of one (layer, plane) share one
distribution, so one table per (layer, plane) is close to per-channel tables at a fraction
of the metadata. CacheGen's anchor/delta token grouping is measured by ``kvcache bench
codecs`` and not used: see ``docs/benchmarks.md``.

Tensors: ``sym`` uint8 ``[S]`` and ``sym_offsets`` int64 ``[2L + 1]`` (frames, plane
``2 * l + kv``); ``mu`` fp16 ``[L, 2, C]``; ``k_scale`` uint8 ``[L, C]``; ``v_scale`` uint8
``[L, T, H]``; ``esc_idx`` int32 ``[E]`` (index into the plane's ``T * C``, increasing per
plane), ``esc_val`` fp16 ``[E]``, ``esc_offsets`` int64 ``[2L + 1]``.
Params: ``version``, ``level``, ``k_steps``/``v_steps`` (``L`` floats), ``sym_bits``
(``2L`` of 4 or 8). Decoding uses only what is stored, so any level decodes anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zstandard

from kvcache.codecs import _check
from kvcache.codecs.base import Codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout

VERSION = 1
_LOG_BIAS = 160
_LOG_STEPS = 8  # codes per octave
# level -> (base step, in units of sigma). Lower level = finer = more bytes.
LEVEL_STEPS: dict[int, float] = {1: 0.25, 2: 0.5, 3: 0.8, 4: 1.2, 5: 1.7, 6: 2.4}
DEFAULT_LEVEL = 4
# Layer-group allocation: the first quarter of the layers quantizes finer; V coarser than K.
EARLY_FRACTION = 0.25
EARLY_MULT = 0.6
V_MULT = 1.3
_NIBBLE_MIN_STEP = 1.0  # at coarser steps 7 steps cover >= 7 sigma: escapes are rare
_MAD_TO_SIGMA = 1.2533  # sqrt(pi / 2)


def level_steps(level: int, num_layers: int) -> tuple[list[float], list[float]]:
    """Per-layer quantization steps (units of sigma) of K and V at ``level``."""
    base = LEVEL_STEPS[level]
    early = max(1, round(num_layers * EARLY_FRACTION))
    k = [base * (EARLY_MULT if i < early else 1.0) for i in range(num_layers)]
    return k, [s * V_MULT for s in k]


def _log_code(sigma: torch.Tensor) -> torch.Tensor:
    """uint8 code of ``sigma`` (0 means exactly zero)."""
    code = torch.round(torch.log2(sigma.clamp_min(1e-30)) * _LOG_STEPS) + _LOG_BIAS
    code = code.clamp(1, 255)
    return torch.where(sigma > 0, code, torch.zeros_like(code)).to(torch.uint8)


def _log_value(code: torch.Tensor) -> torch.Tensor:
    v = torch.exp2((code.float() - _LOG_BIAS) / _LOG_STEPS)
    return torch.where(code > 0, v, torch.zeros_like(v))


class CacheGenCodec(Codec):
    name = "cachegen"
    lossless = False
    levels = tuple(LEVEL_STEPS)

    def __init__(self, level: int = DEFAULT_LEVEL, zstd_level: int = 1) -> None:
        if level not in LEVEL_STEPS:
            raise ValueError(f"cachegen level must be one of {sorted(LEVEL_STEPS)}, got {level}")
        self.level = level
        self.zstd_level = zstd_level

    # -- encode ---------------------------------------------------------------------------
    def encode(
        self, chunk: torch.Tensor, layout: KVLayout
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: ``[L, 2, T, H, D]``."""
        T = _check.check_chunk(chunk, layout, self.name, mla_ok=False)
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        C = H * D
        k_steps, v_steps = level_steps(self.level, L)
        x = chunk.detach().to("cpu", torch.float32).reshape(L, 2, T, C)
        mu = x.mean(2).half()  # [L, 2, C]
        r = x - mu.float()[:, :, None]
        # Robust scales (mean |x - mu|, scaled to equal sigma on Gaussian data): one sink
        # token or outlier must not widen a whole channel's step; it becomes an escape.
        k_code = _log_code(r[:, 0].abs().mean(1) * _MAD_TO_SIGMA)  # [L, C]
        v_code = _log_code(r[:, 1].reshape(L, T, H, D).abs().mean(-1) * _MAD_TO_SIGMA)
        kst = torch.tensor(k_steps)[:, None, None]
        vst = torch.tensor(v_steps)[:, None, None, None]
        delta = torch.stack([
            (_log_value(k_code)[:, None, :] * kst).expand(L, T, C),
            (_log_value(v_code)[..., None] * vst).expand(L, T, H, D).reshape(L, T, C),
        ], 1)  # [L, 2, T, C]
        z = torch.where(delta > 0, r / delta.clamp_min(1e-30), torch.zeros_like(r)).round_()
        sym_bits = [
            4 if s >= _NIBBLE_MIN_STEP else 8
            for ks, vs in zip(k_steps, v_steps, strict=True)
            for s in (ks, vs)
        ]
        cctx = zstandard.ZstdCompressor(level=self.zstd_level)
        frames: list[bytes] = []
        esc_idx: list[torch.Tensor] = []
        esc_val: list[torch.Tensor] = []
        flat_z = z.reshape(L * 2, T * C)
        flat_x = chunk.detach().cpu().reshape(L * 2, T * C)
        for p in range(L * 2):
            zmax = 7 if sym_bits[p] == 4 else 127
            zp = flat_z[p]
            esc = (zp.abs() > zmax) | ~torch.isfinite(zp)
            idx = esc.nonzero().squeeze(1)
            esc_idx.append(idx.to(torch.int32))
            esc_val.append(flat_x[p, idx].half())
            s = (zp.masked_fill(esc, -(zmax + 1)) + (zmax + 1)).to(torch.uint8).numpy()
            if sym_bits[p] == 4:
                if s.size % 2:
                    s = np.append(s, np.uint8(0))
                s = s[0::2] | (s[1::2] << 4)
            frames.append(cctx.compress(s.tobytes()))
        tensors = {
            "sym": torch.from_numpy(np.frombuffer(b"".join(frames), np.uint8).copy()),
            "sym_offsets": torch.tensor(np.cumsum([0, *map(len, frames)]), dtype=torch.int64),
            "mu": mu,
            "k_scale": k_code,
            "v_scale": v_code,
            "esc_idx": torch.cat(esc_idx),
            "esc_val": torch.cat(esc_val),
            "esc_offsets": torch.tensor(
                np.cumsum([0, *(len(i) for i in esc_idx)]), dtype=torch.int64
            ),
        }
        params = {
            "version": VERSION, "level": self.level, "k_steps": k_steps, "v_steps": v_steps,
            "sym_bits": sym_bits,
        }
        return tensors, params

    # -- decode ---------------------------------------------------------------------------
    def _decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        T: int,
        layers: Sequence[int],
    ) -> torch.Tensor:
        """``[len(layers), 2, T, H, D]``."""
        name = self.name
        if layout.is_mla:
            raise CorruptObjectError("cachegen object for an MLA layout")
        _check.version(params, name, VERSION)
        _check.int_param(params, "level", name, tuple(LEVEL_STEPS))
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        C = H * D
        k_steps = _check.float_list(params, "k_steps", L, name)
        v_steps = _check.float_list(params, "v_steps", L, name)
        sym_bits = _check.int_list(params, "sym_bits", 2 * L, name, (4, 8))
        sym = tensors.get("sym")
        if not isinstance(sym, torch.Tensor) or sym.dtype != torch.uint8 or sym.dim() != 1:
            raise CorruptObjectError("cachegen object lacks a uint8 'sym' tensor")
        sym_off = _check.offsets(
            _check.tensor(tensors, "sym_offsets", torch.int64, (2 * L + 1,), name),
            2 * L, sym.numel(), name, "sym_offsets",
        )
        esc_idx_all = tensors.get("esc_idx")
        if not isinstance(esc_idx_all, torch.Tensor) or esc_idx_all.dtype != torch.int32 \
                or esc_idx_all.dim() != 1:
            raise CorruptObjectError("cachegen object lacks an int32 'esc_idx' tensor")
        E = esc_idx_all.numel()
        esc_val_all = _check.tensor(tensors, "esc_val", torch.float16, (E,), name)
        esc_off = _check.offsets(
            _check.tensor(tensors, "esc_offsets", torch.int64, (2 * L + 1,), name),
            2 * L, E, name, "esc_offsets",
        )
        mu = _check.tensor(tensors, "mu", torch.float16, (L, 2, C), name)
        k_code = _check.tensor(tensors, "k_scale", torch.uint8, (L, C), name)
        v_code = _check.tensor(tensors, "v_scale", torch.uint8, (L, T, H), name)
        dctx = zstandard.ZstdDecompressor()
        sym_np = sym.numpy()
        dtype = layout.torch_dtype
        out = torch.empty((len(layers), 2, T, H, D), dtype=dtype)
        n = T * C
        for i, layer in enumerate(layers):
            for kv in (0, 1):
                p = 2 * layer + kv
                bits = sym_bits[p]
                want = (n + 1) // 2 if bits == 4 else n
                frame = sym_np[sym_off[p] : sym_off[p + 1]].tobytes()
                try:
                    plain = dctx.decompress(frame, max_output_size=want)
                except zstandard.ZstdError as e:
                    raise CorruptObjectError(f"cachegen frame {p} is corrupt: {e}") from e
                if len(plain) != want:
                    raise CorruptObjectError(
                        f"cachegen frame {p} holds {len(plain)} bytes, expected {want}"
                    )
                b = torch.frombuffer(bytearray(plain), dtype=torch.uint8)
                if bits == 4:
                    s = torch.stack([b & 15, b >> 4], 1).view(-1)[:n]
                    bias = 8.0
                else:
                    s, bias = b, 128.0
                z = s.view(T, C).float().sub_(bias)
                if kv == 0:
                    delta = (_log_value(k_code[layer]) * k_steps[layer])[None, :]
                    x = z.mul_(delta)
                else:
                    delta = (_log_value(v_code[layer]) * v_steps[layer])[:, :, None]
                    x = z.view(T, H, D).mul_(delta).view(T, C)
                x.add_(mu[layer, kv].float()[None, :])
                lo, hi = esc_off[p], esc_off[p + 1]
                if hi > lo:
                    idx = esc_idx_all[lo:hi].long()
                    if int(idx.min()) < 0 or int(idx.max()) >= n:
                        raise CorruptObjectError(f"cachegen escape index out of range in {p}")
                    x.view(-1)[idx] = esc_val_all[lo:hi].float()
                out[i, kv] = x.view(T, H, D)
        return out

    def decode(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
    ) -> torch.Tensor:
        return self._decode_layers(tensors, params, layout, num_tokens, range(layout.num_layers))

    def decode_layer(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layer: int,
    ) -> torch.Tensor:
        _check.layer_index(layer, layout)
        return self._decode_layers(tensors, params, layout, num_tokens, [layer])[0]
