"""Small C kernels for hot CPU loops that torch can only run as several passes.

Eager torch runs ``x = mu + z * delta`` over int8 symbols as widen -> fused multiply-add ->
cast to bf16: three passes over the plane, each through torch's per-op dispatch. A C loop
does it in one pass (the compiler vectorises it) and writes bf16 directly, and it runs
without the GIL (``ctypes`` releases it), so several threads can decode layers at once.

The source below is compiled once per machine with the system C compiler (``cc``, or
``$CC``) into ``$KVCACHE_DIR/native/`` (default ``~/.cache/kvcache/native``), keyed by a
hash of the source, the flags and the CPU, and loaded with ``ctypes``: no build step at
install time and no Python headers. Where no compiler works, ``library()`` returns None and
callers keep their torch path (``KVCACHE_NATIVE=0`` forces that). Every kernel here has a
torch reference that tests compare it with.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kvcache.kernels.rope_shift import rotate_cos_sin
from kvcache.kvstore.config import ENV_NATIVE, default_store_dir
from kvcache.kvstore.layout import RopeStyle

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* float -> bfloat16 bits, round to nearest even (torch's rounding; inputs are finite) */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* float -> float16 bits, round to nearest even (finite inputs; overflow -> inf). Compilers
 * without _Float16 (gcc < 12 on x86) still build the rest: Python asks kvc_has_f16(). */
#ifdef __FLT16_MAX__
int kvc_has_f16(void) { return 1; }
static inline uint16_t f16_bits(float f) {
    _Float16 h = (_Float16)f;
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}
#else
int kvc_has_f16(void) { return 0; }
static inline uint16_t f16_bits(float f) { (void)f; return 0x7e00u; /* never called */ }
#endif

enum { FULL, LOW, HIGH };      /* where a row's symbols sit in the bytes */
enum { BF16, F16, F32 };       /* output dtype */

static inline __attribute__((always_inline)) int8_t sym_at(const int8_t *s, int64_t c,
                                                           int mode) {
    return mode == FULL ? s[c] : mode == LOW ? (int8_t)(s[c] << 4) >> 4 : s[c] >> 4;
}

static inline __attribute__((always_inline)) void put(void *out, int64_t i, float v,
                                                      int kind) {
    if (kind == BF16) ((uint16_t *)out)[i] = bf16_bits(v);
    else if (kind == F16) ((uint16_t *)out)[i] = f16_bits(v);
    else ((float *)out)[i] = v;
}

/* One row (token) of C values; mode/kind/per-channel are compile-time constants at every
 * call site, so each instance is a branch-free loop the compiler vectorises. */
static inline __attribute__((always_inline)) void row(
        const int8_t *s, int mode, const float *mu, const float *dk, const float *dv,
        int64_t C, int64_t D, void *out, int64_t base, int kind) {
    if (dk) {
        for (int64_t c = 0; c < C; c++)
            put(out, base + c, mu[c] + (float)sym_at(s, c, mode) * dk[c], kind);
    } else {
        for (int64_t h = 0; h < C / D; h++) {
            const float d = dv[h];
            for (int64_t e = h * D; e < (h + 1) * D; e++)
                put(out, base + e, mu[e] + (float)sym_at(s, e, mode) * d, kind);
        }
    }
}

#define ROW_KIND(src, mode, dk, dv, ob)                                        \
    switch (out_kind) {                                                        \
    case BF16: row(src, mode, mu, dk, dv, C, D, out, ob, BF16); break;         \
    case F16: row(src, mode, mu, dk, dv, C, D, out, ob, F16); break;           \
    default: row(src, mode, mu, dk, dv, C, D, out, ob, F32); break;            \
    }
#define ROW(src, mode, ob)                                                     \
    if (per_token_group) { ROW_KIND(src, mode, (const float *)0, dv, ob) }    \
    else { ROW_KIND(src, mode, delta, (const float *)0, ob) }

/* Row t of a plane (symbols t * C ..., see kvc_dequant_plane) into out[ob .. ob + C). */
static inline __attribute__((always_inline)) void plane_row(
        const int8_t *sym, int bits, int64_t t, int64_t C, int64_t half, const float *mu,
        const float *delta, int64_t per_token_group, void *out, int64_t ob, int out_kind) {
    const int64_t D = per_token_group ? per_token_group : C;
    const int64_t i0 = t * C, i1 = i0 + C;
    const float *dv = per_token_group ? delta + i0 / per_token_group : 0;
    if (bits == 8) { ROW(sym + i0, FULL, ob) }
    else if (i1 <= half) { ROW(sym + i0, LOW, ob) }
    else if (i0 >= half) { ROW(sym + i0 - half, HIGH, ob) }
    else {  /* the row the two halves meet in (odd T * C / 2 boundary) */
        for (int64_t c = 0; c < C; c++) {
            const int64_t i = i0 + c;
            const int8_t z = i < half ? (int8_t)(sym[i] << 4) >> 4 : sym[i - half] >> 4;
            const float d = per_token_group ? dv[c / per_token_group] : delta[c];
            const float v = mu[c] + (float)z * d;
            if (out_kind == BF16) put(out, ob + c, v, BF16);
            else if (out_kind == F16) put(out, ob + c, v, F16);
            else put(out, ob + c, v, F32);
        }
    }
}

/*
 * One plane of cachegen symbols -> values: out[t, c] = mu[c] + z[t, c] * delta, with
 * delta = delta[c] (per_token_group == 0: K, per channel) or delta[(t * C + c) / group]
 * (V: per token and head, group = head_dim, which divides C). Symbols are int8 (bits 8)
 * or 4-bit pairs (bits 4): byte i holds z[i] in its low and z[i + half] in its high
 * nibble, half = ceil(n / 2), two's complement. out_kind: 0 bf16, 1 fp16, 2 fp32.
 */
void kvc_dequant_plane(const int8_t *sym, int bits, int64_t T, int64_t C,
                       const float *mu, const float *delta, int64_t per_token_group,
                       void *out, int out_kind) {
    const int64_t half = (T * C + 1) / 2;
    for (int64_t t = 0; t < T; t++)
        plane_row(sym, bits, t, C, half, mu, delta, per_token_group, out, t * C, out_kind);
}

/* One row of a rotation: pairs (i1[j], i2[j]) = (j, j + R) (NeoX) or (2j, 2j + 1) (GPT-J). */
static inline __attribute__((always_inline)) void rot_row(
        const float *x, const float *c, const float *s, int64_t R, int64_t D, int neox,
        void *out, int64_t base, int kind) {
    for (int64_t j = 0; j < R; j++) {
        const int64_t i1 = neox ? j : 2 * j, i2 = neox ? j + R : 2 * j + 1;
        const float a = x[i1], b = x[i2];
        put(out, base + i1, a * c[j] - b * s[j], kind);
        put(out, base + i2, b * c[j] + a * s[j], kind);
    }
    for (int64_t i = 2 * R; i < D; i++) put(out, base + i, x[i], kind);
}

#define ROT_KIND(neox)                                                         \
    switch (out_kind) {                                                        \
    case BF16: rot_row(xr, c, s, R, D, neox, out, b, BF16); break;             \
    case F16: rot_row(xr, c, s, R, D, neox, out, b, F16); break;               \
    default: rot_row(xr, c, s, R, D, neox, out, b, F32); break;                \
    }

/*
 * A K plane coded before RoPE -> rotated values, in one pass: per token row t,
 * mu[c] + z[t, c] * delta[c] (see kvc_dequant_plane, per-channel delta) into row_buf
 * (C fp32, stays in L1), the row's escapes written over it (esc_idx: plane indices,
 * increasing; esc_val: their exact pre-RoPE values), then every head's rotary pairs turned
 * by the token's angle: (a, b) -> (a cos - b sin, b cos + a sin), cos/sin [T, R]
 * (R = rotary_dim / 2), pairs (j, j + R) if neox else (2j, 2j + 1); dims past 2R copied.
 * out: [T, H, D] of out_kind. Escapes out of order are skipped, never read out of bounds.
 */
void kvc_dequant_plane_rope(const int8_t *sym, int bits, int64_t T, int64_t H, int64_t D,
                            const float *mu, const float *delta, const int32_t *esc_idx,
                            const float *esc_val, int64_t n_esc, int64_t R, int neox,
                            const float *cos, const float *sin, float *row_buf, void *out,
                            int out_kind) {
    const int64_t C = H * D, half = (T * C + 1) / 2;
    int64_t e = 0;
    for (int64_t t = 0; t < T; t++) {
        const int64_t i0 = t * C, i1 = i0 + C;
        plane_row(sym, bits, t, C, half, mu, delta, 0, row_buf, 0, F32);
        for (; e < n_esc && esc_idx[e] < i1; e++)
            if (esc_idx[e] >= i0) row_buf[esc_idx[e] - i0] = esc_val[e];
        const float *c = cos + t * R, *s = sin + t * R;
        for (int64_t h = 0; h < H; h++) {
            const int64_t b = i0 + h * D;
            const float *xr = row_buf + h * D;
            if (neox) { ROT_KIND(1) } else { ROT_KIND(0) }
        }
    }
}

/*
 * Lane-interleaved rANS (kernels/rans.py has the format and the numpy/torch references).
 * A block of nsym symbols: symbol k belongs to lane k % RANS_LANES; each lane is a 32-bit
 * state in [RANS_L, 2^32), probabilities out of 2^RANS_SCALE, 16-bit renormalisation
 * (at most one word per symbol); the lanes share the block's word stream in (step, lane)
 * order. lut: per slot (x mod 2^RANS_SCALE), sym | (freq - 1) << 8 | cum << 20, sym being
 * the int8 value + 128.
 */
#define RANS_LANES 32
#define RANS_SCALE 12
#define RANS_L (1u << 16)

/* The partial last step of a block (symbols k0 .. nsym, one lane after another) from states
 * x with the block's words read up to p, then the end-of-block check: 1 when every lane
 * ends at RANS_L having read exactly words[w0 .. w1). Inlined: as a call it cost the plain
 * loop ~5%. */
static inline __attribute__((always_inline)) int
rans_decode_tail(const uint16_t *restrict words, int64_t w0, int64_t w1,
                 uint32_t *restrict x, int64_t p, int64_t k0, int64_t nsym,
                 const uint32_t *restrict lut, int8_t *restrict out) {
    const int64_t last = w1 > w0 ? w1 - 1 : -1;
    for (; k0 < nsym; k0 += RANS_LANES) {
        const int64_t m = nsym - k0 < RANS_LANES ? nsym - k0 : RANS_LANES;
        for (int64_t j = 0; j < m; j++) {
            uint32_t s = x[j];
            const uint32_t slot = s & ((1u << RANS_SCALE) - 1), e = lut[slot];
            out[k0 + j] = (int8_t)((int)(e & 0xffu) - 128);
            s = (((e >> 8) & 0xfffu) + 1) * (s >> RANS_SCALE) + slot - (e >> 20);
            const int need = s < RANS_L;
            const uint32_t w = last < 0 ? 0u : words[p < w1 ? p : last];
            x[j] = need ? (s << 16) | (p < w1 ? w : 0u) : s;
            p += need;
        }
    }
    int ok = p == w1;
    for (int j = 0; j < RANS_LANES; j++) ok &= x[j] == RANS_L;
    return ok;
}

/* Decode one block into out[0 .. nsym). Returns 1 when every lane ends at RANS_L having
 * read exactly words[w0 .. w1) (the block decoded as it was coded), else 0; never reads
 * outside [w0, w1). */
static int rans_decode_block(const uint16_t *restrict words, int64_t w0, int64_t w1,
                             const uint32_t *restrict state, int64_t nsym,
                             const uint32_t *restrict lut, int8_t *restrict out) {
    uint32_t x[RANS_LANES];
    memcpy(x, state, sizeof x);
    int64_t p = w0;
    /* branch-free renormalisation (a lane reads a word on ~1 symbol in 8, too rarely and
     * irregularly to predict): every symbol loads a word from a valid address and keeps
     * it only when needed; words[w1 - 1] stands in past the end (0 when there is none) */
    const int64_t last = w1 > w0 ? w1 - 1 : -1;
    int64_t k0 = 0;
    if (last >= 0) {
        /* full steps in separate passes over the lanes, each a loop the compiler turns
         * into vector code (gathers from the table and the words) */
        for (; k0 + RANS_LANES <= nsym; k0 += RANS_LANES) {
            uint32_t need[RANS_LANES], pos[RANS_LANES];
            int8_t sym[RANS_LANES];
            for (int j = 0; j < RANS_LANES; j++) {
                const uint32_t s = x[j], slot = s & ((1u << RANS_SCALE) - 1), e = lut[slot];
                sym[j] = (int8_t)((int)(e & 0xffu) - 128);
                x[j] = (((e >> 8) & 0xfffu) + 1) * (s >> RANS_SCALE) + slot - (e >> 20);
                need[j] = x[j] < RANS_L;
            }
            memcpy(out + k0, sym, RANS_LANES);
            uint32_t at = 0;
            for (int j = 0; j < RANS_LANES; j++) { pos[j] = at; at += need[j]; }
            for (int j = 0; j < RANS_LANES; j++) {
                const int64_t q = p + pos[j];
                const uint32_t w = words[q < w1 ? q : last];
                x[j] = need[j] ? (x[j] << 16) | (q < w1 ? w : 0u) : x[j];
            }
            p += at;
        }
    }
    return rans_decode_tail(words, w0, w1, x, p, k0, nsym, lut, out);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
int kvc_has_rans_simd(void) { return 1; }

/* One step of 16 lanes: symbols out, states stepped, the lanes that fall below RANS_L
 * take the next words from *p in lane order (an expand), words at or past w1 reading 0. */
static inline __m512i rans_step16(__m512i x, const uint32_t *restrict lut,
                                  const uint16_t *restrict words, int64_t *p, int64_t w1,
                                  int8_t *restrict out) {
    const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32((1 << RANS_SCALE) - 1));
    const __m512i e = _mm512_i32gather_epi32(slot, (const void *)lut, 4);
    _mm_storeu_si128((__m128i *)out,
                     _mm_xor_si128(_mm512_cvtepi32_epi8(e), _mm_set1_epi8((char)0x80)));
    const __m512i freq = _mm512_add_epi32(
        _mm512_and_si512(_mm512_srli_epi32(e, 8), _mm512_set1_epi32(0xfff)),
        _mm512_set1_epi32(1));
    x = _mm512_sub_epi32(
        _mm512_add_epi32(_mm512_mullo_epi32(freq, _mm512_srli_epi32(x, RANS_SCALE)), slot),
        _mm512_srli_epi32(e, 20));
    const __mmask16 need = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(RANS_L));
    const int64_t left = w1 - *p;
    const __mmask16 have = left >= 16 ? (__mmask16)0xffff
                         : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
    /* masked: never reads outside the block's words (a corrupt stream asks for more) */
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(have, words + *p));
    x = _mm512_mask_or_epi32(x, need, _mm512_slli_epi32(x, 16),
                             _mm512_maskz_expand_epi32(need, w));
    *p += _mm_popcnt_u32(need);
    return x;
}

/* rans_decode_block with AVX-512: two vectors of 16 lanes per step (~5x faster). */
static int rans_decode_block_simd(const uint16_t *restrict words, int64_t w0, int64_t w1,
                                  const uint32_t *restrict state, int64_t nsym,
                                  const uint32_t *restrict lut, int8_t *restrict out) {
    uint32_t x[RANS_LANES];
    __m512i lo = _mm512_loadu_si512(state), hi = _mm512_loadu_si512(state + 16);
    int64_t p = w0, k0 = 0;
    for (; k0 + RANS_LANES <= nsym; k0 += RANS_LANES) {
        lo = rans_step16(lo, lut, words, &p, w1, out + k0);
        hi = rans_step16(hi, lut, words, &p, w1, out + k0 + 16);
    }
    _mm512_storeu_si512(x, lo);
    _mm512_storeu_si512(x + 16, hi);
    return rans_decode_tail(words, w0, w1, x, p, k0, nsym, lut, out);
}

/* Two whole blocks of nsym (a multiple of RANS_LANES) symbols at once: their steps are
 * independent, so the CPU overlaps one block's gather latency with the other's work.
 * Returns how many of the two did not decode as coded. */
static int rans_decode_pair_simd(const uint16_t *restrict words, const int64_t *offsets,
                                 const uint32_t *restrict state, int64_t nsym,
                                 const uint32_t *restrict lut, int8_t *restrict out) {
    const int64_t w1a = offsets[1], w1b = offsets[2];
    int64_t pa = offsets[0], pb = offsets[1];
    __m512i alo = _mm512_loadu_si512(state), ahi = _mm512_loadu_si512(state + 16);
    __m512i blo = _mm512_loadu_si512(state + 32), bhi = _mm512_loadu_si512(state + 48);
    int8_t *outb = out + nsym;
    for (int64_t k0 = 0; k0 < nsym; k0 += RANS_LANES) {
        alo = rans_step16(alo, lut, words, &pa, w1a, out + k0);
        blo = rans_step16(blo, lut, words, &pb, w1b, outb + k0);
        ahi = rans_step16(ahi, lut, words, &pa, w1a, out + k0 + 16);
        bhi = rans_step16(bhi, lut, words, &pb, w1b, outb + k0 + 16);
    }
    const __m512i l = _mm512_set1_epi32(RANS_L);
    const int oka = pa == w1a && _mm512_cmpneq_epi32_mask(alo, l) == 0
                    && _mm512_cmpneq_epi32_mask(ahi, l) == 0;
    const int okb = pb == w1b && _mm512_cmpneq_epi32_mask(blo, l) == 0
                    && _mm512_cmpneq_epi32_mask(bhi, l) == 0;
    return !oka + !okb;
}
#else
int kvc_has_rans_simd(void) { return 0; }
#define rans_decode_block_simd rans_decode_block
#endif

/* One plane of n symbols in blocks of RANS_LANES * steps: block b's words are
 * words[offsets[b] .. offsets[b + 1]), its states state[b * RANS_LANES ...]. simd: use
 * the AVX-512 block decoder where it was compiled in (kvc_has_rans_simd; the same
 * result). Returns the number of blocks that did not decode as coded (0: all good). */
int64_t kvc_rans_decode_plane(const uint16_t *words, const int64_t *offsets,
                              const uint32_t *state, int64_t n, int64_t steps,
                              const uint32_t *lut, int8_t *out, int simd) {
    const int64_t B = RANS_LANES * steps;
    int64_t bad = 0, b = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; simd && (b + 2) * B <= n; b += 2)  /* whole blocks two at a time */
        bad += rans_decode_pair_simd(words, offsets + b, state + b * RANS_LANES, B, lut,
                                     out + b * B);
#endif
    for (; b * B < n; b++) {
        const int64_t nsym = n - b * B < B ? n - b * B : B;
        bad += !(simd ? rans_decode_block_simd : rans_decode_block)(
            words, offsets[b], offsets[b + 1], state + b * RANS_LANES, nsym, lut, out + b * B);
    }
    return bad;
}

/* Encode one plane (the inverse of kvc_rans_decode_plane). freq/cum: [256] by sym + 128;
 * every symbol present must have freq > 0. words: capacity n (one word per symbol at
 * most), filled block after block in decoding order; scratch: n uint16. Writes each
 * block's final states and its word count; returns the words written. */
int64_t kvc_rans_encode_plane(const int8_t *sym, int64_t n, int64_t steps,
                              const uint32_t *freq, const uint32_t *cum, uint16_t *words,
                              uint16_t *scratch, uint32_t *state, int64_t *block_words) {
    const int64_t B = RANS_LANES * steps;
    int64_t total = 0;
    for (int64_t b = 0; b * B < n; b++) {
        const int64_t nsym = n - b * B < B ? n - b * B : B;
        const int8_t *s = sym + b * B;
        uint32_t *x = state + b * RANS_LANES;
        for (int j = 0; j < RANS_LANES; j++) x[j] = RANS_L;
        int64_t cnt = 0;  /* words emitted, in reverse decoding order */
        for (int64_t k = nsym - 1; k >= 0; k--) {
            const int j = (int)(k % RANS_LANES);
            const uint32_t v = (uint32_t)((int)s[k] + 128), f = freq[v];
            uint32_t xs = x[j];
            if ((uint64_t)xs >= ((uint64_t)f << (32 - RANS_SCALE))) {
                scratch[cnt++] = (uint16_t)(xs & 0xffffu);
                xs >>= 16;
            }
            x[j] = ((xs / f) << RANS_SCALE) + xs % f + cum[v];
        }
        for (int64_t i = 0; i < cnt; i++) words[total + i] = scratch[cnt - 1 - i];
        block_words[b] = cnt;
        total += cnt;
    }
    return total;
}
"""
# -O3 vectorises the loop; -march=native is safe because the cache key includes the CPU.
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-strict-aliasing"]
OUT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(_SOURCE)
        so = Path(tmp) / target.name
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(so), str(src)],
            check=True, capture_output=True, timeout=120,
        )
        so.replace(target)  # atomic: concurrent builders each publish a whole file


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where there is no working C compiler."""
    if os.environ.get(ENV_NATIVE, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.blake2b(
        "\0".join([_SOURCE, " ".join(_FLAGS), compiler, _cpu_id()]).encode(), digest_size=8
    ).hexdigest()
    target = default_store_dir() / "native" / f"kvcache-kernels-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    fn = lib.kvc_dequant_plane
    fn.restype = None
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
    ]
    fn = lib.kvc_dequant_plane_rope
    fn.restype = None
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int,
    ]
    fn = lib.kvc_rans_decode_plane
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    fn = lib.kvc_rans_encode_plane
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    for name in ("kvc_has_f16", "kvc_has_rans_simd"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    return lib


def library_for(dtype: torch.dtype) -> ctypes.CDLL | None:
    """``library()`` if its kernels can write ``dtype``, else None."""
    lib = library()
    if lib is None or dtype not in OUT_KINDS:
        return None
    if dtype == torch.float16 and not lib.kvc_has_f16():
        return None
    return lib


def dequant_plane(
    lib: ctypes.CDLL,
    sym: torch.Tensor,
    bits: int,
    mu: torch.Tensor,
    delta: torch.Tensor,
    per_token_group: int,
    out: torch.Tensor,
) -> None:
    """``out`` ``[T, C]`` (contiguous; bf16, fp16 or fp32) = ``mu`` ``[C]`` + z * delta.

    sym: int8, ``[T * C]`` symbols (``bits`` 8) or ``[ceil(T * C / 2)]`` 4-bit pairs
    (``bits`` 4, low nibbles ``z[:half]``, high ``z[half:]``). delta: fp32 ``[C]`` when
    ``per_token_group`` is 0, else ``[T * C / per_token_group]`` (one per token and head).
    All contiguous CPU tensors; the caller checks shapes (this is the inner loop).
    """
    T, C = out.shape
    lib.kvc_dequant_plane(
        sym.data_ptr(), bits, T, C, mu.data_ptr(), delta.data_ptr(), per_token_group,
        out.data_ptr(), OUT_KINDS[out.dtype],
    )


def dequant_plane_reference(
    sym: torch.Tensor, bits: int, mu: torch.Tensor, delta: torch.Tensor,
    per_token_group: int, out: torch.Tensor,
) -> None:
    """Torch reference of ``dequant_plane`` (same arguments), fp32 math."""
    T, C = out.shape
    n = T * C
    if bits == 8:
        z = sym[:n].float()
    else:
        half = (n + 1) // 2
        low = torch.bitwise_right_shift(torch.bitwise_left_shift(sym[:half], 4), 4)
        high = torch.bitwise_right_shift(sym[: n - half], 4)
        z = torch.cat([low, high]).float()
    d = delta.repeat_interleave(per_token_group)[:n] if per_token_group else delta.repeat(T)
    out.copy_((mu.repeat(T) + z * d).view(T, C))


def dequant_plane_rope(
    lib: ctypes.CDLL,
    sym: torch.Tensor,
    bits: int,
    mu: torch.Tensor,
    delta: torch.Tensor,
    esc_idx: torch.Tensor,
    esc_val: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    neox: bool,
    row_buf: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``out`` ``[T, H, D]`` (contiguous; bf16, fp16 or fp32) = the K plane
    ``mu + z * delta`` (as ``dequant_plane`` with a per-channel delta fp32 ``[C]``), with
    the escapes ``esc_idx`` (int32 ``[E]``, increasing plane indices) set to ``esc_val``
    (fp32 ``[E]``), then rotated by RoPE angles: ``cos``/``sin`` fp32 ``[T, R]``,
    ``R = rotary_dim / 2``, pairs ``(j, j + R)`` if ``neox`` else ``(2j, 2j + 1)``.
    row_buf: fp32 scratch of at least ``H * D``. All contiguous CPU tensors; the caller
    checks shapes (this is the inner loop)."""
    T, H, D = out.shape
    lib.kvc_dequant_plane_rope(
        sym.data_ptr(), bits, T, H, D, mu.data_ptr(), delta.data_ptr(), esc_idx.data_ptr(),
        esc_val.data_ptr(), esc_idx.numel(), cos.shape[1], int(neox), cos.data_ptr(),
        sin.data_ptr(), row_buf.data_ptr(), out.data_ptr(), OUT_KINDS[out.dtype],
    )


def dequant_plane_rope_reference(
    sym: torch.Tensor, bits: int, mu: torch.Tensor, delta: torch.Tensor,
    esc_idx: torch.Tensor, esc_val: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    neox: bool, out: torch.Tensor,
) -> None:
    """Torch reference of ``dequant_plane_rope`` (same arguments but the scratch)."""
    T, H, D = out.shape
    x = torch.empty(T, H * D)
    dequant_plane_reference(sym, bits, mu, delta, 0, x)
    x.view(-1)[esc_idx.long()] = esc_val
    style = RopeStyle.NEOX if neox else RopeStyle.GPTJ
    out.copy_(rotate_cos_sin(x.view(T, H, D), cos, sin, style, 2 * cos.shape[1]))
