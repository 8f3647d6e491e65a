"""Lane-interleaved rANS decode fused with cachegen's dequantisation. Format, launcher and
torch reference: ``kernels/rans.py``.

Grid: one program per block; its ``LANES`` lanes are one vector. Each step every lane
looks its state's low bits up in the plane's table (symbol, frequency, cumulative), steps
its state, and the lanes whose state fell below ``RANS_L`` take the next words of the
block's stream in lane order (a prefix sum over the lanes). The step's ``LANES``
consecutive symbols are dequantised (``mu + z * delta``) and stored side by side. Integer
state math is int64 (the states are uint32); values fp32, cast once on store. Every load
is masked to the block's words and the stores to its symbols, so a hostile object can
only produce wrong values, which the end-of-block check (``status``) reports.
"""

import triton
import triton.language as tl


@triton.jit
def rans_dequant_kernel(
    words_ptr,  # int16 [W]: uint16 words
    states_ptr,  # int32 [NB, LANES]: uint32 final encoder states
    meta_ptr,  # int64 [NBs, META]: word start, word end, symbols, q, out offset, position, block
    lut_ptr,  # int32 [Q, 2^SCALE_BITS]: sym | (freq - 1) << 8 | cum << 20
    mu_ptr,  # fp32 [Q, C]
    delta_ptr,  # fp32: K's [Q / 2, C] (per channel), then V's [Q / 2, T, H] (token, head)
    out_ptr,  # bf16/fp16/fp32, plane q's symbol k at out offset + k
    status_ptr,  # int32 [NBs]: 1 when the block decoded as it was coded
    T, C, H, D, V_BASE,  # V_BASE = (Q / 2) * C: where V's deltas start
    LANES: tl.constexpr, SCALE_BITS: tl.constexpr, RANS_L: tl.constexpr,
    META: tl.constexpr,
):
    pid = tl.program_id(0)
    m = meta_ptr + pid * META
    w_pos = tl.load(m + 0)
    w_end = tl.load(m + 1)
    nsym = tl.load(m + 2)
    q = tl.load(m + 3)
    out_base = tl.load(m + 4)
    pos0 = tl.load(m + 5)
    block = tl.load(m + 6)
    layer = q // 2
    # delta of position (t, c): K at layer * C + c; V at V_BASE + (layer * T + t) * H + c // D
    is_k = 1 - q % 2
    lanes = tl.arange(0, LANES)
    x = tl.load(states_ptr + block * LANES + lanes).to(tl.int64) & 0xFFFFFFFF
    lut_row = lut_ptr + q * (1 << SCALE_BITS)
    steps = (nsym + LANES - 1) // LANES
    for s in range(0, steps):
        k = s * LANES + lanes
        valid = k < nsym
        slot = x & ((1 << SCALE_BITS) - 1)
        e = tl.load(lut_row + slot).to(tl.int64)
        freq = ((e >> 8) & 0xFFF) + 1
        cum = (e >> 20) & 0xFFF
        x = tl.where(valid, freq * (x >> SCALE_BITS) + slot - cum, x)
        need = valid & (x < RANS_L)
        ni = need.to(tl.int32)
        wp = w_pos + tl.cumsum(ni, axis=0) - ni
        w = tl.load(words_ptr + wp, mask=need & (wp < w_end), other=0).to(tl.int64) & 0xFFFF
        x = tl.where(need, (x << 16) | w, x)
        w_pos += tl.sum(ni, axis=0)
        z = ((e & 0xFF) - 128).to(tl.float32)
        pos = pos0 + k
        c = pos % C
        t = pos // C
        d_idx = is_k * (layer * C + c) + (1 - is_k) * (V_BASE + (layer * T + t) * H + c // D)
        mu = tl.load(mu_ptr + q * C + c, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + d_idx, mask=valid, other=0.0)
        tl.store(out_ptr + out_base + k, (mu + z * delta).to(out_ptr.dtype.element_ty),
                 mask=valid)
    ok = (tl.sum((x != RANS_L).to(tl.int32), axis=0) == 0) & (w_pos == w_end)
    tl.store(status_ptr + pid, ok.to(tl.int32))
