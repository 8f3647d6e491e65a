"""Paged engine KV <-> canonical chunk copies, every layer in one launch.

Grid: ``(cdiv(num_tokens, BLOCK_T), num_layers * NUM_PLANES)``. Each program moves
``BLOCK_T`` tokens of one (layer, plane) in ``BLOCK_HD``-element strips of the flattened
``heads * head_dim`` row. Elements are copied as raw integers of the same width (the
launcher reinterprets bf16/fp8 tensors), so no value is ever converted.
"""

import triton
import triton.language as tl


@triton.jit
def paged_copy_kernel(
    paged_ptr,  # base of the engine planes (element type = canonical's)
    chunk_ptr,  # canonical chunk [layers, planes, tokens, heads, head_dim] (strided)
    slot_ptr,  # [num_tokens] int32/int64 slots; < 0 marks padding (scatter skips it)
    plane_off_ptr,  # [layers * planes] int64 element offsets of each plane from paged_ptr
    num_tokens,
    stride_block,
    stride_offset,
    stride_head,
    chunk_stride_layer,
    chunk_stride_plane,
    chunk_stride_token,
    chunk_stride_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_PLANES: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    TO_PAGED: tl.constexpr,  # False: gather (paged -> chunk); True: scatter
):
    pid_t = tl.program_id(0)
    pid_lp = tl.program_id(1)
    layer = pid_lp // NUM_PLANES
    plane = pid_lp % NUM_PLANES
    plane_off = tl.load(plane_off_ptr + pid_lp)

    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=t_mask, other=-1).to(tl.int64)
    t_mask = t_mask & (slot >= 0)
    slot = tl.maximum(slot, 0)
    # int64 throughout: engine pools exceed 2**31 elements.
    paged_tok = (plane_off + (slot // BLOCK_SIZE) * stride_block
                 + (slot % BLOCK_SIZE) * stride_offset)
    chunk_tok = (layer.to(tl.int64) * chunk_stride_layer + plane.to(tl.int64) * chunk_stride_plane
                 + t.to(tl.int64) * chunk_stride_token)

    for hd0 in range(0, NUM_HEADS * HEAD_DIM, BLOCK_HD):
        hd = hd0 + tl.arange(0, BLOCK_HD)
        head = hd // HEAD_DIM
        d = hd % HEAD_DIM
        mask = t_mask[:, None] & (hd < NUM_HEADS * HEAD_DIM)[None, :]
        paged = paged_tok[:, None] + (head.to(tl.int64) * stride_head + d)[None, :]
        chunk = chunk_tok[:, None] + (head.to(tl.int64) * chunk_stride_head + d)[None, :]
        if TO_PAGED:
            x = tl.load(chunk_ptr + chunk, mask=mask)
            tl.store(paged_ptr + paged, x, mask=mask)
        else:
            x = tl.load(paged_ptr + paged, mask=mask)
            tl.store(chunk_ptr + chunk, x, mask=mask)
