"""Rotate cached keys by ``new_pos - old_pos``: RoPE rotations compose, so rotating a key
rotated at ``p_old`` by ``p_new - p_old`` gives the key rotated at ``p_new``.

Grid: ``(cdiv(num_tokens, BLOCK_T), num_layers)``; each program rotates ``BLOCK_T`` tokens
× every (head, rotary pair) of one layer. Math in fp32 whatever the storage dtype (bf16
arithmetic is also wrong in the interpreter).
"""

import triton
import triton.language as tl


@triton.jit
def rope_shift_kernel(
    in_ptr,  # [layers, tokens, heads, head_dim] keys (strided, head_dim contiguous)
    out_ptr,  # same shape (may alias in_ptr: each element is read before it is written)
    old_pos_ptr,  # [tokens] int64
    new_pos_ptr,  # [tokens] int64
    inv_freq_ptr,  # [ROT_DIM // 2] fp32
    num_tokens,
    in_stride_layer,
    in_stride_token,
    in_stride_head,
    out_stride_layer,
    out_stride_token,
    out_stride_head,
    NUM_HEADS: tl.constexpr,
    ROT_DIM: tl.constexpr,
    IS_NEOX: tl.constexpr,  # pairs (j, j + ROT_DIM/2); else GPT-J pairs (2j, 2j + 1)
    BLOCK_T: tl.constexpr,
    BLOCK_HP: tl.constexpr,  # power of two >= NUM_HEADS * ROT_DIM / 2
):
    pid_t = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    HALF: tl.constexpr = ROT_DIM // 2

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    old = tl.load(old_pos_ptr + t, mask=t_mask, other=0)
    new = tl.load(new_pos_ptr + t, mask=t_mask, other=0)
    # The difference is small and exact in int64; only then is it made fp32.
    delta = (new - old).to(tl.float32)

    hp = tl.arange(0, BLOCK_HP)
    hp_mask = hp < NUM_HEADS * HALF
    head = (hp // HALF).to(tl.int64)
    j = hp % HALF
    if IS_NEOX:
        i1 = j
        i2 = j + HALF
    else:
        i1 = 2 * j
        i2 = 2 * j + 1
    inv_freq = tl.load(inv_freq_ptr + j, mask=hp_mask, other=0.0)
    angle = delta[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle)

    mask = t_mask[:, None] & hp_mask[None, :]
    t64 = t.to(tl.int64)
    src = (layer * in_stride_layer + t64[:, None] * in_stride_token
           + (head * in_stride_head)[None, :])
    dst = (layer * out_stride_layer + t64[:, None] * out_stride_token
           + (head * out_stride_head)[None, :])
    x1 = tl.load(in_ptr + src + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptr + src + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    tl.store(out_ptr + dst + i1[None, :], y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + dst + i2[None, :], y2.to(out_ptr.dtype.element_ty), mask=mask)
