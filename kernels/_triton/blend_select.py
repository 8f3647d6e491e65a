"""Per-token KV deviation for blending: ``sum((fresh - cached)**2)`` over heads × head_dim
of K (plus V when ``HAS_V``), in fp32.

Grid: ``(cdiv(num_tokens, BLOCK_T),)``; each program reduces ``BLOCK_T`` contiguous token
rows of ``ROW = heads * head_dim`` elements in ``BLOCK_D`` strips.
"""

import triton
import triton.language as tl


@triton.jit
def kv_deviation_kernel(
    fresh_k_ptr,  # [tokens, ROW] contiguous
    cached_k_ptr,  # [tokens, ROW] contiguous
    fresh_v_ptr,  # [tokens, ROW] contiguous (unused unless HAS_V)
    cached_v_ptr,  # [tokens, ROW] contiguous (unused unless HAS_V)
    out_ptr,  # [tokens] fp32
    num_tokens,
    ROW: tl.constexpr,
    HAS_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    rows = t.to(tl.int64)[:, None] * ROW
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, ROW, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = t_mask[:, None] & (d < ROW)[None, :]
        off = rows + d[None, :]
        diff = (tl.load(fresh_k_ptr + off, mask=mask, other=0.0).to(tl.float32)
                - tl.load(cached_k_ptr + off, mask=mask, other=0.0).to(tl.float32))
        acc += tl.sum(diff * diff, axis=1)
        if HAS_V:
            diff = (tl.load(fresh_v_ptr + off, mask=mask, other=0.0).to(tl.float32)
                    - tl.load(cached_v_ptr + off, mask=mask, other=0.0).to(tl.float32))
            acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + t, acc, mask=t_mask)
