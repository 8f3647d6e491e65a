"""``cachegen``: CacheGen-style lossy codec — normalize, quantize uniformly, entropy-code.

Per layer ``l`` and plane (K or V), with ``x`` the plane ``[T, C]`` (``C = H * D``):

0. **Keys before RoPE** (KVQuant's pre-RoPE keys). When the caller says which positions
   the keys were rotated at (``rope_start``) and the layout's RoPE frequencies are known,
   K is rotated back by each token's angle before coding and forward again after
   decoding. RoPE spins every rotary pair at its own speed, so a channel of rotated keys
   mixes the key's content with the position: per-channel statistics widen, and a key that
   is the same at every position (the positional keys of previous-token heads) becomes a
   sinusoid that costs bits and loses precision. Un-rotated, it is a constant the channel
   mean stores exactly. On the reference model this alone took next-token KL at the
   default level from 0.028 to 0.012 at equal bits (``docs/benchmarks.md``). Any rotation
   round-trips exactly (the decoder turns keys by the same angles, from
   ``key_rope_start`` and the layout), so a layout whose RoPE frequencies ``RopeSpec``
   does not give (yarn; llama3 without its three parameters) is simply coded after RoPE
   (``key_rope_start`` null).
1. **Per-channel statistics.** ``mu_c``: each channel's mean over the chunk's tokens
   (fp16). K is scaled per channel (``sigma_c`` = mean ``|x - mu|`` over tokens, KIVI's K
   axis: K has persistent outlier channels); V per token and head (``sigma_{t,h}`` over
   ``head_dim``). Both are robust (1.25 x mean absolute deviation): an outlier becomes an
   escape instead of widening the step. Scales are stored as 8-bit log codes
   (``2^((code - 160) / 8)``, ~9% steps; the decoder uses exactly the coded value, so
   this costs no accuracy, only step choice).
2. **Uniform quantization** ``z = round((x - mu) / (step[l] * sigma))``. ``step`` comes from
   the level: half as large for K in the first ``ceil(10/32)`` of the layers (CacheGen's
   layer-group allocation as LMCache configures it for 32-layer models: 32 bins for the
   first 10 layers' keys, 16 after; early layers' errors propagate through every later
   layer), and V's ``V_MULT`` times K's (errors in keys move attention itself; KIVI,
   KVQuant and KVTuner all find keys the more sensitive).
3. **Escapes.** Symbols are 4-bit (``|z| <= 7``) or 8-bit (``|z| <= 127``), chosen per
   plane by coded size (escapes included), with a 5% preference for 4-bit: two symbols per
   byte halve the entropy decoder's work (most of the decode time), and Huffman codes
   symbol pairs more tightly than single skewed symbols, so 4-bit wins unless fine steps
   make escapes common, or the plane repeats whole rows (layer 0's V is a function of the
   token alone) that zstd matches in 8-bit rows but not in 4-bit pairs of rows. A value
   outside the range (attention-sink tokens, rare outliers) is stored exactly as fp16 with
   its index, instead of being clipped.
4. **Entropy coding** of the symbols with zstd's Huffman literal coder, one frame per
   (layer, plane), 4-bit symbols packed two per byte (so Huffman codes symbol pairs:
   measured within 2-4% of the order-0 entropy, decoding at > 2 GB/s of symbols on one
   core). The coding tables live inside each frame: ~tens of bytes per (layer, plane) per
   chunk, instead of LMCache's 16-bit CDF per (layer, channel) per chunk (~13% of the raw
   chunk).

   ``entropy="rans"`` (``cachegen-rans``) codes the same symbols (as bytes) with
   lane-interleaved rANS instead (``kernels/rans.py``): one frequency table per
   (layer, plane) over the value range worth a table entry (the rest are escapes), 32
   independent lanes per block, so a GPU decodes every lane at once (Triton, fused with
   the dequantisation). A plane whose rows repeat codes each distinct row once, with a
   row map. 7% smaller than Huffman on KV without repeated rows, larger where zstd's
   matches find partial ones, and ~1.3x slower to decode on a CPU: for GPU-loaded tiers.
5. **Repeated tokens.** Layer 0's K and V are functions of the token alone, so every
   repeated token repeats their rows. V's repeat exactly; K's went through RoPE at
   another position in the KV's dtype and back, so a copy whose V row (symbols and
   scales) repeats an earlier row's takes that row's K symbols when it is within two
   roundings of the dtype on every channel (``_snap_repeated_keys``). Either coder then
   codes the row once: 9% fewer bits at every level on the reference model, at unchanged
   fidelity.

6. **Values the statistics cannot hold** (NaN, ±inf, ``|x| > 2**14``) are raw escapes
   (``codecs/_raw_escapes.py``): stored verbatim, written back last (after the keys'
   rotation, so never into a pair partner), and coded as their channel's mean over the
   other tokens (a zero symbol that moves no statistic). Before format 6 one NaN made its
   channel's mean NaN and one inf its token's V scale inf (the channel or token smeared).
   ``2**14`` keeps means, escapes (pre-RoPE keys are up to ``sqrt(2)`` times larger) and
   decoded values inside fp16's range. Denormals come back within the normal error.

Because the statistics normalize every channel, symbols of one (layer, plane) share one
distribution, so one table per (layer, plane) is close to per-channel tables at a fraction
of the metadata. CacheGen's anchor/delta token grouping is measured by ``kvcache bench
codecs`` (``anchor_delta``) and not used: it costs bits at equal NMSE on our KV, see
``docs/benchmarks.md``.

Decoding is a few whole-plane torch ops per plane (no per-element Python) on reused
scratch buffers, written straight into the output; ``decode_into`` fills a caller's buffer
(a fresh 32 MiB output costs ~10-16 ms of page faults on our VMs), optionally layers on
several threads.

Tensors: ``sym`` uint8 ``[S]`` and ``sym_offsets`` int64 ``[2L + 1]`` (frames, plane
``2 * l + kv``; a frame holds the plane's ``z`` in two's complement: 8-bit planes one per
byte, 4-bit planes ``z[:half]`` in the low and ``z[half:]`` in the high nibbles,
``half = ceil(T * C / 2)``, so unpacking is two shifts per contiguous half); ``mu`` fp16
``[L, 2, C]``; ``k_scale`` uint8 ``[L, C]``; ``v_scale`` uint8 ``[L, T, H]``; ``esc_idx``
int32 ``[E]`` (index into the plane's ``T * C``, increasing per plane), ``esc_val`` fp16
``[E]``, ``esc_offsets`` int64 ``[2L + 1]``; ``raw_idx`` int64 and ``raw_val`` (layout
dtype) ``[R]`` when the chunk held values of step 6.
rANS objects hold ``words`` int16 ``[W]``, ``states`` int32 ``[NB, 32]``,
``block_offsets`` int64 ``[NB + 1]`` (plane ``p``: ``rans_rows[p] * C`` symbols in
``ceil(rans_rows[p] * C / (32 * rans_steps))`` blocks, planes back to back), ``rans_freq``
int16 (each plane's table over ``rans_lo[p] .. rans_hi[p]``, summing to 4096) and
``row_map`` int16 (``T`` entries per plane coded in fewer than ``T`` rows: each token's
coded row, in first-occurrence order) instead of ``sym``/``sym_offsets``.
Params: ``version``, ``level``, ``entropy`` (``"huffman"`` or ``"rans"``; version 4),
``k_steps``/``v_steps`` (``L`` floats), ``sym_bits`` (Huffman: ``2L`` of 4 or 8),
``rans_steps``/``rans_lo``/``rans_hi``/``rans_rows`` (rANS), ``key_rope_start`` (int: K was coded
before RoPE and is rotated to positions ``key_rope_start, ...`` on decoding, with the
layout's frequencies; null: as given). Decoding uses only what is stored, so any level
decodes anywhere. Versions 2 (before pre-RoPE keys), 3 (Huffman only), 4 (rANS
without row maps) and 5 (no raw escapes) still decode, except objects whose means or
escapes are not finite: older versions wrote those for chunks with NaN, inf or values
beyond fp16's range, which decoded smeared; they raise ``CorruptObjectError``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
import zstandard

from kvcache.codecs import _cachegen_rans, _check, _raw_escapes
from kvcache.codecs.base import Codec, check_layer
from kvcache.kernels import cpu_native, rans
from kvcache.kernels.dispatch import IMPLS, Impl
from kvcache.kernels.rope_shift import rope_cos_sin, rotary_dim_of, rotate_cos_sin
from kvcache.kvstore.errors import CorruptObjectError, LayoutMismatchError
from kvcache.kvstore.layout import KVLayout, RopeSpec, RopeStyle

# 2: two's-complement symbols, 4-bit planes packed by halves; 3: keys coded before RoPE;
# 4: the entropy coder is a param (zstd's Huffman, or lane-interleaved rANS for GPUs);
# 5: rANS planes may code their distinct rows only, with a row map; 6: values beyond the
# statistics' range (NaN, inf, |x| > 2**14) kept exactly as raw escapes
VERSION = 6
READABLE_VERSIONS = (2, 3, 4, 5, 6)
# See step 6 of the module docstring: the largest magnitude coded as usual.
_VALUE_LIMIT = 2.0**14
ENTROPY_CODERS = ("huffman", "rans")
_LOG_BIAS = 160
_LOG_STEPS = 8  # codes per octave
# level -> (base step, in units of sigma). Lower level = finer = more bytes.
LEVEL_STEPS: dict[int, float] = {1: 0.25, 2: 0.5, 3: 0.7, 4: 1.0, 5: 1.7, 6: 2.4}
# Chosen on the tuning split of the reference model's fidelity set (text it never saw,
# python -m kvcache.tools.refmodel.tune_codecs): the coarsest step whose top-1 agreement's
# 90% interval clears 0.97 there, at 4.5x fewer bits than int8 per token (docs/benchmarks.md).
DEFAULT_LEVEL = 3
# Layer-group allocation (CacheGen's, as LMCache sets it for 32-layer models: keys of the
# first 10 layers get 32 bins, later ones 16): K steps halve in the first ceil(10/32) of
# the layers; V steps are V_MULT times K's.
EARLY_FRACTION = 10 / 32
EARLY_MULT = 0.5
V_MULT = 1.6
_ESCAPE_BYTES = 6  # int32 index + fp16 value
# A plane is coded with 8-bit symbols only when that is this much smaller than 4-bit ones
# with their escapes: 4-bit planes halve the entropy decoder's work (zstd's Huffman
# decoder runs per byte, and it is most of the decode time).
NIBBLE_PREFERENCE = 1.05
_MAD_TO_SIGMA = 1.2533  # sqrt(pi / 2)


def level_steps(level: int, num_layers: int) -> tuple[list[float], list[float]]:
    """Per-layer quantization steps (units of sigma) of K and V at ``level``."""
    base = LEVEL_STEPS[level]
    early = math.ceil(num_layers * EARLY_FRACTION)
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


def _pack(z: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 symbols ``[n]`` -> uint8 bytes: two's complement, so decoding an 8-bit plane is
    a reinterpretation; 4-bit planes put ``z[:half]`` in the low and ``z[half:]`` in the
    high nibbles (``half = ceil(n / 2)``), so unpacking is two shifts per contiguous half
    instead of an interleave."""
    u = z.view(torch.uint8)
    if bits == 8:
        return u
    n = u.numel()
    half = (n + 1) // 2
    low = u[:half] & 15
    low[: n - half] |= u[half:] << 4
    return low


class _CodedPlane(NamedTuple):
    bits: int
    frame: bytes
    idx: torch.Tensor  # int64 [E]: positions stored as escapes

    @property
    def cost(self) -> int:
        return len(self.frame) + _ESCAPE_BYTES * self.idx.numel()


def _code_plane(z: torch.Tensor, bits: int, cctx: zstandard.ZstdCompressor) -> _CodedPlane:
    """One plane's rounded steps ``z`` ``[n]`` (fp32) as ``bits``-bit symbols: the zstd
    frame and the positions that do not fit (or are not finite) and become escapes."""
    zmax = 7 if bits == 4 else 127
    esc = (z.abs() > zmax) | ~torch.isfinite(z)
    # escapes get the one code no in-range value uses; decode overwrites them
    sym = z.masked_fill(esc, -(zmax + 1)).to(torch.int8)
    frame = cctx.compress(_pack(sym, bits).numpy().tobytes())
    return _CodedPlane(bits, frame, esc.nonzero().squeeze(1))


def _code_huffman(
    flat_z: torch.Tensor, zstd_level: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[torch.Tensor]]:
    """Planes ``[P, n]`` of rounded steps -> zstd (Huffman) frames: tensors, params and
    each plane's escaped positions."""
    cctx = zstandard.ZstdCompressor(level=zstd_level)
    frames: list[bytes] = []
    escapes: list[torch.Tensor] = []
    sym_bits: list[int] = []
    for zp in flat_z:
        # 8-bit only when clearly smaller: 4-bit planes decode ~2x faster. Always
        # compared, even when nothing escapes: zstd also finds repeated rows (layer 0's
        # V depends only on the token), which 4-bit pairs of rows hide
        nib, byte = (_code_plane(zp, bits, cctx) for bits in (4, 8))
        bits, frame, idx = byte if byte.cost * NIBBLE_PREFERENCE < nib.cost else nib
        sym_bits.append(bits)
        frames.append(frame)
        escapes.append(idx)
    tensors = {
        "sym": torch.from_numpy(np.frombuffer(b"".join(frames), np.uint8).copy()),
        "sym_offsets": torch.tensor(np.cumsum([0, *map(len, frames)]), dtype=torch.int64),
    }
    return tensors, {"entropy": "huffman", "sym_bits": sym_bits}, escapes


@dataclass(frozen=True)
class _Rotation:
    """RoPE angles of a chunk's tokens: keys are coded rotated back by them."""

    cos: torch.Tensor  # fp32 [T, R]
    sin: torch.Tensor  # fp32 [T, R]
    neox: bool
    rot: int  # rotary dims (2R); dims past it are not rotated

    @classmethod
    def of(cls, layout: KVLayout, start: int, T: int) -> _Rotation:
        """Raises ``LayoutMismatchError`` when the layout's RoPE frequencies are unknown."""
        if layout.rope is None:
            raise LayoutMismatchError(f"layout {layout.model_id!r} has no RoPE")
        return _rotation(layout.rope, layout.head_dim, start, T)

    def apply(self, k: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """k: fp32 ``[..., T, H, D]`` -> a new tensor rotated forward (or back)."""
        style = RopeStyle.NEOX if self.neox else RopeStyle.GPTJ
        return rotate_cos_sin(k, self.cos, -self.sin if inverse else self.sin, style, self.rot)


@lru_cache(maxsize=32)
def _rotation(rope: RopeSpec, head_dim: int, start: int, T: int) -> _Rotation:
    """Cached: the table costs ~60 us to build, a third of a small chunk's decode, and
    prefix chunks of a model keep the same few starts. Never mutated."""
    cos, sin = rope_cos_sin(rope, head_dim, start, T)
    return _Rotation(cos, sin, rope.style is RopeStyle.NEOX, rotary_dim_of(rope, head_dim))


def _encoder_rotation(layout: KVLayout, rope_start: int | None, T: int) -> _Rotation | None:
    """The rotation keys are coded under, or None to code them as given: positions
    unknown, no RoPE, or a scaled RoPE whose frequencies ``RopeSpec`` cannot give."""
    if rope_start is None or layout.rope is None:
        return None
    try:
        return _Rotation.of(layout, rope_start, T)
    except LayoutMismatchError:
        return None


def _snap_repeated_keys(
    z: torch.Tensor, x: torch.Tensor, v_code: torch.Tensor, eps: float
) -> None:
    """z ``[L, 2, T, C]`` symbols of x ``[L, 2, T, C]`` (keys before RoPE); v_code
    ``[L, T, H]``; eps: the relative precision of the dtype the KV came in.

    In layer 0 K and V are functions of the token alone, so a repeated token repeats
    their rows, which the entropy coders then code once (zstd's matches; rANS row maps).
    V's rows repeat exactly, but K's have been through RoPE at another position, rounded
    to the KV's dtype, and back: copies differ by that rounding, and channels with little
    spread have steps finer than it, so their symbols differ and the row does not repeat.
    Rows whose V (symbols and scales) repeats an earlier row's take that row's K symbols
    when every channel is within two roundings (``2 * eps * max |x|`` of the row) of it:
    the copies are the same keys as far as their dtype can tell."""
    L, _, T, _ = z.shape
    for layer in range(L):
        v_key = np.concatenate([z[layer, 1].numpy().view(np.uint8).reshape(T, -1),
                                v_code[layer].numpy().reshape(T, -1)], axis=1)
        reps, row_map = _cachegen_rans.distinct_rows(v_key)
        if reps.size == T:
            continue
        ref = torch.from_numpy(reps[row_map])
        rows = torch.nonzero(ref != torch.arange(T))[:, 0]
        k, k_ref = x[layer, 0, rows], x[layer, 0, ref[rows]]
        near = (k - k_ref).abs().amax(1) <= 2 * eps * k_ref.abs().amax(1)
        rows = rows[near]
        z[layer, 0, rows] = z[layer, 0, ref[rows]]


@dataclass(frozen=True)
class _Parsed:
    """A validated object, ready for per-layer decoding; CPU tensors."""

    T: int
    H: int
    D: int
    sym: memoryview  # every frame, back to back (zero-copy view of 'sym')
    sym_off: list[int]  # [2L + 1]
    sym_bits: list[int]  # [2L]
    k_steps: list[float]
    v_steps: list[float]
    mu: torch.Tensor  # fp16 [L, 2, C]
    k_code: torch.Tensor  # uint8 [L, C]
    v_code: torch.Tensor  # uint8 [L, T, H]
    esc_idx: torch.Tensor  # int32 [E], checked to lie in [0, T * C)
    esc_val: torch.Tensor  # fp32 [E] (stored as fp16)
    esc_off: list[int]  # [2L + 1]
    rotation: _Rotation | None  # keys were coded before RoPE
    rans: _cachegen_rans.RansStream | None  # entropy "rans" (then sym is empty and sym_bits all 8)
    raw: _raw_escapes.RawEscapes  # written last, after the keys' rotation


# _log_value of every code: decoding looks scales up instead of recomputing exp2
_LOG_VALUES = _log_value(torch.arange(256).to(torch.uint8))


@dataclass(frozen=True)
class _Factors:
    """``x = mu + z * delta`` factors of the layers being decoded (``i``: their position),
    computed for all of them in a few vectorised ops instead of several small ops per plane."""

    mu: torch.Tensor  # fp32 [nl, 2, C]
    k_delta: torch.Tensor  # fp32 [nl, C]
    v_delta: torch.Tensor  # fp32 [nl, T, H, 1]

    @classmethod
    def of(cls, p: _Parsed, layers: Sequence[int]) -> _Factors:
        sel = torch.tensor(list(layers), dtype=torch.int64)
        k_steps = torch.tensor(p.k_steps)[sel]
        v_steps = torch.tensor(p.v_steps)[sel]
        return cls(
            p.mu[sel].float(),
            _LOG_VALUES[p.k_code[sel].long()].mul_(k_steps[:, None]),
            _LOG_VALUES[p.v_code[sel].long()].mul_(v_steps[:, None, None])[..., None],
        )

_scratch = threading.local()


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="cachegen-decode")


def _decode_run(
    p: _Parsed, f: _Factors, jobs: list[tuple[int, int]], out: torch.Tensor
) -> None:
    for i, layer in jobs:
        _decode_layer_into(p, f, i, layer, out[i])


def _buffers(n: int) -> tuple[zstandard.ZstdDecompressor, torch.Tensor, memoryview, torch.Tensor]:
    """This thread's zstd context (creating one costs ~50 us), int8 symbols (as a tensor
    and as a writable memoryview the decompressor fills directly) and fp32 values for
    planes of ``n`` elements, reused across planes and calls: they stay in cache and never
    page-fault."""
    if getattr(_scratch, "n", -1) < n:
        _scratch.dctx = zstandard.ZstdDecompressor()
        _scratch.z = torch.empty(n, dtype=torch.int8)
        _scratch.zmem = memoryview(_scratch.z.numpy())
        _scratch.x = torch.empty(n, dtype=torch.float32)
        _scratch.n = n
    return _scratch.dctx, _scratch.z[:n], _scratch.zmem[:n], _scratch.x[:n]


def _inflate_into(
    dctx: zstandard.ZstdDecompressor, frame: memoryview, target: memoryview, plane: int
) -> None:
    """Decompress ``frame`` straight into ``target`` (no intermediate bytes object: zstd
    decodes a whole single-segment frame into the caller's buffer), which it must fill
    exactly."""
    try:
        with dctx.stream_reader(frame) as reader:
            got = 0
            while got < len(target):
                k = reader.readinto(target[got:])
                if not k:
                    break
                got += k
            # reading past the expected size is bounded to one byte: a frame that claims
            # more (corrupt or hostile) is refused without inflating it
            extra = reader.read(1)
    except zstandard.ZstdError as e:
        raise CorruptObjectError(f"cachegen frame {plane} is corrupt: {e}") from e
    if got != len(target) or extra:
        raise CorruptObjectError(
            f"cachegen frame {plane} holds {'more than ' if extra else ''}"
            f"{got} bytes, expected {len(target)}"
        )


def _decode_layer_into(p: _Parsed, f: _Factors, i: int, layer: int, out: torch.Tensor) -> None:
    """Decode ``layer`` (position ``i`` in ``f``) into ``out`` ``[2, T, H, D]`` (contiguous).

    Per plane: zstd (Huffman) straight into the int8 scratch ``z``, then, with the C
    kernel (``kernels/cpu_native.py``), unpack + ``mu + z * delta`` + cast into ``out`` in
    one pass (~2.5x faster on one core). Without it: 4-bit symbols unpacked in place with
    two shifts per half (see ``_pack``) -> fp32 scratch -> ``mu + z * delta`` in place ->
    one cast-copy into ``out`` (~1.6x faster than letting ``addcmul`` widen int8 itself or
    write bf16 directly: both take torch's slow mixed-dtype loops). Then the plane's
    escapes. Keys coded before RoPE get their escapes (pre-RoPE values) before the
    rotation: the C kernel does both per token row in the same pass; the torch path
    decodes into the fp32 scratch, sets them there, and rotates into ``out``.
    """
    T, H, D = p.T, p.H, p.D
    C = H * D
    n = T * C
    dctx, z, zmem, x = _buffers(n)
    native = cpu_native.library_for(out.dtype)
    for kv in (0, 1):
        pl = 2 * layer + kv
        bits = p.sym_bits[pl]
        if p.rans is not None:
            p.rans.symbols_into(pl, n, z)
        else:
            frame = p.sym[p.sym_off[pl] : p.sym_off[pl + 1]]
            _inflate_into(dctx, frame, zmem[: (n + 1) // 2] if bits == 4 else zmem, pl)
        rotate = p.rotation if kv == 0 else None
        esc = p.esc_idx[p.esc_off[pl] : p.esc_off[pl + 1]]
        val = p.esc_val[p.esc_off[pl] : p.esc_off[pl + 1]]
        if native is not None and rotate is not None:
            # one pass: unpack + mu + z * delta + escapes + rotation + cast
            cpu_native.dequant_plane_rope(native, z, bits, f.mu[i, 0], f.k_delta[i], esc, val,
                                          rotate.cos, rotate.sin, rotate.neox, x, out[0])
            continue
        if native is not None:
            # one pass: unpack + mu + z * delta + cast, then the escapes
            delta, group = (f.k_delta[i], 0) if kv == 0 else (f.v_delta[i], D)
            target = out[kv].view(T, C)
            cpu_native.dequant_plane(native, z, bits, f.mu[i, kv], delta, group, target)
        else:
            target = x.view(T, C)
            _dequant_torch(z, bits, f, i, kv, (T, H, D), x)
        if esc.numel():
            target.view(-1).index_put_((esc.long(),), val.to(target.dtype))
        if native is None:
            out[kv].copy_(x.view(T, H, D) if rotate is None else rotate.apply(x.view(T, H, D)))


def _plane_rows(out: torch.Tensor) -> torch.Tensor | None:
    """``out`` ``[nl, 2, T, H, D]`` with contiguous planes as ``[2 * nl, T * H * D]`` (a
    view), or None when its planes are not evenly spaced."""
    nl, _, T, H, D = out.shape
    if nl > 1 and out.stride(0) != 2 * out.stride(1):
        return None
    return out.as_strided((2 * nl, T * H * D), (out.stride(1), 1))


def _decode_rans_lanes(
    p: _Parsed, f: _Factors, layers: Sequence[int], out: torch.Tensor, impl: Impl
) -> None:
    """The lane-parallel path of rANS objects (GPU; any device with ``impl``): every
    selected plane's blocks decoded and dequantised by one kernel (``rans.decode_dequant``)
    into ``out`` (or a buffer: fp32 when keys are to be rotated), then planes coded as
    distinct rows expanded, the escapes set in one indexed write, and K rotated into
    ``out``. Only the selected planes' blocks are sent to the device."""
    s = p.rans
    assert s is not None
    dev = out.device
    T, H, D = p.T, p.H, p.D
    C, n, nl = H * D, p.T * H * D, len(layers)
    planes = [2 * layer + kv for layer in layers for kv in (0, 1)]
    view = _plane_rows(out) if p.rotation is None else None
    buf = view if view is not None else torch.empty(
        2 * nl, n, device=dev, dtype=out.dtype if p.rotation is None else torch.float32)
    words, states, offsets, first, ns = s.selection(planes)
    maps = {q: s.maps[pl] for q, pl in enumerate(planes) if pl in s.maps}
    v_delta = f.v_delta[..., 0].clone()  # [nl, T, H]
    for q in (q for q in maps if q % 2):
        # a distinct V row is dequantised once, with the scales of its first token (the
        # encoder codes rows as one only where those match)
        reps = torch.from_numpy(_cachegen_rans.first_rows(maps[q]))
        v_delta[q // 2, : len(reps)] = v_delta[q // 2, reps]
    ok = rans.decode_dequant(
        words.to(dev, non_blocking=True), states.to(dev, non_blocking=True), offsets, first,
        ns, s.steps, torch.from_numpy(rans.lut_of(s.freq[planes])).to(dev, non_blocking=True),
        f.mu.reshape(nl * 2, C).to(dev), f.k_delta.to(dev), v_delta.to(dev), D, buf, impl,
    )
    if not ok:
        raise CorruptObjectError("cachegen rANS blocks did not decode as coded")
    for q, row_map in maps.items():
        _cachegen_rans.expand_rows(buf[q].view(T, C), torch.from_numpy(row_map).to(dev),
                                   s.rows[planes[q]])
    spans = [(q, p.esc_off[pl], p.esc_off[pl + 1]) for q, pl in enumerate(planes)]
    idx = torch.cat([p.esc_idx[a:b].long() for _, a, b in spans])
    if idx.numel():
        which = torch.cat([torch.full((b - a,), q, dtype=torch.long) for q, a, b in spans])
        val = torch.cat([p.esc_val[a:b] for _, a, b in spans])
        buf[which.to(dev), idx.to(dev)] = val.to(dev, buf.dtype)
    if p.rotation is not None:
        r = p.rotation
        k = buf.view(nl, 2, T, H, D)[:, 0]
        style = RopeStyle.NEOX if r.neox else RopeStyle.GPTJ
        out[:, 0] = rotate_cos_sin(k, r.cos.to(dev), r.sin.to(dev), style, r.rot)
        out[:, 1] = buf.view(nl, 2, T, H, D)[:, 1]
    elif view is None:
        out.copy_(buf.view(out.shape))


def _dequant_torch(
    z: torch.Tensor, bits: int, f: _Factors, i: int, kv: int, shape: tuple[int, int, int],
    x: torch.Tensor,
) -> None:
    """Torch path of one plane: symbols ``z`` (int8 scratch, 4-bit pairs in ``z[:half]``)
    -> ``x`` (fp32 ``[T * C]``) = ``mu + z * delta``."""
    T, H, D = shape
    n = T * H * D
    half = (n + 1) // 2
    if bits == 4:
        # the packed bytes are in z[:half]; high nibbles (z[half:]) are taken out first,
        # then the low ones in place; arithmetic shifts sign-extend the two's-complement
        # nibbles
        torch.bitwise_right_shift(z[: n - half], 4, out=z[half:])
        z[:half].bitwise_left_shift_(4).bitwise_right_shift_(4)
    x.copy_(z)
    if kv == 0:
        xv = x.view(T, H * D)
        torch.addcmul(f.mu[i, 0], xv, f.k_delta[i], out=xv)
    else:
        xv = x.view(T, H, D)
        torch.addcmul(f.mu[i, 1].view(H, D), xv, f.v_delta[i], out=xv)


class CacheGenCodec(Codec):
    name = "cachegen"
    lossless = False
    levels = tuple(LEVEL_STEPS)

    def __init__(
        self, level: int = DEFAULT_LEVEL, zstd_level: int = 1, entropy: str = "huffman",
        rans_steps: int = rans.DEFAULT_STEPS,
    ) -> None:
        if level not in LEVEL_STEPS:
            raise ValueError(f"cachegen level must be one of {sorted(LEVEL_STEPS)}, got {level}")
        if entropy not in ENTROPY_CODERS:
            raise ValueError(f"cachegen entropy must be one of {ENTROPY_CODERS}, got {entropy!r}")
        if not 1 <= rans_steps <= _cachegen_rans.MAX_STEPS:
            raise ValueError(
                f"rans_steps must be in [1, {_cachegen_rans.MAX_STEPS}], got {rans_steps}")
        self.level = level
        self.zstd_level = zstd_level
        self.entropy = entropy
        self.rans_steps = rans_steps

    # -- encode ---------------------------------------------------------------------------
    def encode(
        self, chunk: torch.Tensor, layout: KVLayout, *, rope_start: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """chunk: ``[L, 2, T, H, D]``; rope_start: K was rotated at positions
        ``rope_start, ...`` (None: unknown, keys are coded as given)."""
        T = _check.check_chunk(chunk, layout, self.name, mla_ok=False)
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        C = H * D
        k_steps, v_steps = level_steps(self.level, L)
        raw, escaped = _raw_escapes.split(chunk.detach(), _VALUE_LIMIT, self.name)
        # a copy even of an fp32 CPU chunk: x is rotated in place below
        x = chunk.detach().to("cpu", torch.float32, copy=True).reshape(L, 2, T, C)
        if escaped is not None:  # stand-ins before the rotation would smear an inf
            x = _raw_escapes.stand_in(x, escaped.cpu().reshape(L, 2, T, C), 2)
        rotation = _encoder_rotation(layout, rope_start, T)
        if rotation is not None:
            x[:, 0] = rotation.apply(x[:, 0].view(L, T, H, D), inverse=True).view(L, T, C)
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
        _snap_repeated_keys(z, x, v_code, torch.finfo(layout.torch_dtype).eps)
        flat_z = z.reshape(L * 2, T * C)
        flat_x = x.reshape(L * 2, T * C)  # escapes are exact values of what was coded
        if self.entropy == "rans":
            # V's per-token scales must match for V rows to be coded once (K's are per
            # channel)
            tags = [None if kv == 0 else v_code[layer].numpy()
                    for layer in range(L) for kv in (0, 1)]
            tensors, extra, escapes = _cachegen_rans.code_planes(
                flat_z, self.rans_steps, _ESCAPE_BYTES, C, tags
            )
        else:
            tensors, extra, escapes = _code_huffman(flat_z, self.zstd_level)
        esc_idx = [idx.to(torch.int32) for idx in escapes]
        esc_val = [flat_x[p, idx].half() for p, idx in enumerate(escapes)]
        tensors |= {k: v.cpu() for k, v in raw.items()} | {
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
            "key_rope_start": None if rotation is None else rope_start, **extra,
        }
        return tensors, params

    # -- decode ---------------------------------------------------------------------------
    def _parse(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        T: int,
    ) -> _Parsed:
        """Validate everything once, before any layer is decoded."""
        name = self.name
        if layout.is_mla:
            raise CorruptObjectError("cachegen object for an MLA layout")
        version = _check.version(params, name, READABLE_VERSIONS)
        rotation = None
        if version >= 3 and params.get("key_rope_start") is not None:
            start = _check.int_param(params, "key_rope_start", name, hi=1 << 40)
            try:
                rotation = _Rotation.of(layout, start, T)
            except LayoutMismatchError as e:
                raise CorruptObjectError(f"{name} keys were coded before a RoPE this "
                                         f"layout cannot give: {e}") from e
        _check.int_param(params, "level", name, tuple(LEVEL_STEPS))
        L, H, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        C = H * D
        k_steps = _check.float_list(params, "k_steps", L, name)
        v_steps = _check.float_list(params, "v_steps", L, name)
        entropy = params.get("entropy", "huffman") if version >= 4 else "huffman"
        if entropy not in ENTROPY_CODERS:
            raise CorruptObjectError(f"{name} entropy coder {entropy!r} is not one of "
                                     f"{ENTROPY_CODERS}")
        stream = None
        sym: torch.Tensor | None
        if entropy == "rans":
            stream = _cachegen_rans.parse(tensors, params, 2 * L, T, C, name, version)
            sym, sym_off, sym_bits = torch.empty(0, dtype=torch.uint8), [], [8] * (2 * L)
        else:
            sym_bits = _check.int_list(params, "sym_bits", 2 * L, name, (4, 8))
            sym = tensors.get("sym")
            if not isinstance(sym, torch.Tensor) or sym.dtype != torch.uint8 \
                    or sym.dim() != 1:
                raise CorruptObjectError("cachegen object lacks a uint8 'sym' tensor")
            sym_off = _check.offsets(
                _check.tensor(tensors, "sym_offsets", torch.int64, (2 * L + 1,), name),
                2 * L, sym.numel(), name, "sym_offsets",
            )
        esc_idx = tensors.get("esc_idx")
        if not isinstance(esc_idx, torch.Tensor) or esc_idx.dtype != torch.int32 \
                or esc_idx.dim() != 1:
            raise CorruptObjectError("cachegen object lacks an int32 'esc_idx' tensor")
        E = esc_idx.numel()
        esc_val = _check.tensor(tensors, "esc_val", torch.float16, (E,), name)
        esc_off = _check.offsets(
            _check.tensor(tensors, "esc_offsets", torch.int64, (2 * L + 1,), name),
            2 * L, E, name, "esc_offsets",
        )
        mu = _check.tensor(tensors, "mu", torch.float16, (L, 2, C), name)
        k_code = _check.tensor(tensors, "k_scale", torch.uint8, (L, C), name)
        v_code = _check.tensor(tensors, "v_scale", torch.uint8, (L, T, H), name)
        if E and (int(esc_idx.min()) < 0 or int(esc_idx.max()) >= T * C):
            raise CorruptObjectError("cachegen escape index out of range")
        if not (_raw_escapes.finite_within(mu, 65504.0)
                and _raw_escapes.finite_within(esc_val, 65504.0)):
            # format 6 never writes these; older formats did for chunks with NaN, inf or
            # values beyond fp16's range, and decoded their channels or tokens smeared
            raise CorruptObjectError(
                f"{name} means or escapes are not finite: the object was written from a "
                "chunk with NaN, inf or overflowing values by a format that could not keep "
                "them; put the chunk again")
        raw = _raw_escapes.parse(tensors, layout, T, name, readable=version >= 6)
        if E > 1:
            # increasing within each plane (the C kernel merges them row by row); numpy:
            # torch's per-op overhead made this 10% of a small chunk's decode
            idx = esc_idx.cpu().numpy()
            ok = idx[1:] > idx[:-1]
            ok[[o - 1 for o in esc_off[1:-1] if 0 < o < E]] = True  # a new plane starts
            if not ok.all():
                raise CorruptObjectError("cachegen escape indices are not increasing per plane")
        return _Parsed(
            T, H, D, sym.cpu().contiguous().numpy().data, sym_off, sym_bits, k_steps, v_steps,
            mu.cpu(), k_code.cpu(), v_code.cpu(), esc_idx.cpu().contiguous(),
            esc_val.cpu().float(), esc_off, rotation, stream, raw,
        )

    def decode_into(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: Sequence[int],
        out: torch.Tensor,
        threads: int = 1,
        impl: Impl = "auto",
    ) -> torch.Tensor:
        """Decode ``layers`` into ``out`` (``[len(layers), 2, T, H, D]`` of the layout's
        dtype, on the CPU or a GPU, each ``[T, H, D]`` plane contiguous: a whole buffer, or
        a chunk's slice of a longer one along tokens), e.g. a buffer reused across chunks.

        On a GPU, rANS-coded objects decode there (one Triton kernel: entropy decode +
        dequantisation; then escapes and the keys' rotation as tensor ops); Huffman-coded
        ones decode on the CPU and are copied. ``impl`` picks the rANS decoder:
        ``"auto"`` (the kernel for CUDA outputs, C per plane on the CPU), ``"triton"``
        (the kernel; on CPU tensors only under ``TRITON_INTERPRET=1``) or ``"torch"`` (the
        vectorised torch reference); Huffman objects ignore it.

        ``threads > 1`` decodes layers on that many threads (zstd and torch release the
        GIL): 25 -> 18 ms for a Llama-3-8B chunk with 2 on our 2-vCPU VM when its second
        core was free. Use it with torch's intra-op threads at 1: otherwise every
        whole-plane op starts its own OpenMP team and they oversubscribe the cores (on that
        VM, with torch at 2 threads: 76 ms with the pool, and 2.1 s even without it).
        """
        expected = (len(layers), *layout.chunk_shape(num_tokens)[1:])
        if tuple(out.shape) != expected or out.dtype != layout.torch_dtype \
                or out.device.type not in ("cpu", "cuda") \
                or (out.numel() and not out[0, 0].is_contiguous()):
            raise ValueError(f"out must be a {expected} {layout.dtype} tensor with "
                             "contiguous planes")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        parsed = self._parse(tensors, params, layout, num_tokens)
        factors = _Factors.of(parsed, layers)
        if parsed.rans is not None and (out.device.type == "cuda" or impl != "auto"):
            _decode_rans_lanes(parsed, factors, layers, out, impl)
            parsed.raw.apply(out, layers)
            return out
        if out.device.type != "cpu":
            staged = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.decode_into(tensors, params, layout, num_tokens, layers, staged, threads)
            return out.copy_(staged, non_blocking=True)
        jobs = list(enumerate(layers))
        workers = min(threads, len(jobs))
        if workers <= 1:
            _decode_run(parsed, factors, jobs, out)
        else:
            # one future per worker, layers interleaved (early 8-bit layers cost more)
            futures = [
                _pool(workers).submit(_decode_run, parsed, factors, jobs[w::workers], out)
                for w in range(workers)
            ]
            for f in futures:
                f.result()
        parsed.raw.apply(out, layers)
        return out

    def decode_layer_into(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layer: int,
        out: torch.Tensor,
    ) -> None:
        """``decode_into`` of one layer: rANS objects decode on ``out``'s GPU."""
        check_layer(layout, layer)
        self.decode_into(tensors, params, layout, num_tokens, [layer], out.unsqueeze(0))

    def decode_layers(
        self,
        tensors: Mapping[str, torch.Tensor],
        params: Mapping[str, Any],
        layout: KVLayout,
        num_tokens: int,
        layers: range,
    ) -> torch.Tensor:
        out = torch.empty(
            (len(layers), *layout.chunk_shape(num_tokens)[1:]), dtype=layout.torch_dtype
        )
        return self.decode_into(tensors, params, layout, num_tokens, list(layers), out)

