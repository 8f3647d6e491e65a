"""Triton kernels: asymmetric integer quantization of row groups with bit packing and an
optional block-Hadamard rotation. Launchers and torch references: ``kernels/quant.py``.

Each program handles ``BLOCK_R`` rows of ``G`` elements (one quantization group per row).
Arithmetic is fp32 whatever the input dtype (bf16 arithmetic is wrong in the interpreter,
and fp32 keeps the GPU and CPU paths bit-comparable).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def quantize_groups_kernel(
    x_ptr, h_ptr, q_ptr, scale_ptr, zero_ptr,
    R, stride_xr,
    BITS: tl.constexpr, PER: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_ROTATION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, G)
    rmask = rows < R
    x = tl.load(
        x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=rmask[:, None], other=0.0
    ).to(tl.float32)
    if HAS_ROTATION:
        h = tl.load(h_ptr + cols[:, None] * G + cols[None, :])
        x = tl.dot(x, h, input_precision="ieee")
    mn = tl.min(x, axis=1)
    mx = tl.max(x, axis=1)
    qmax = (1 << BITS) - 1
    # Scale and zero are stored as fp16: quantize against the rounded values so that
    # decoding reproduces exactly what encoding assumed.
    lo = tl.minimum(tl.maximum(mn, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    scale = tl.minimum((mx - lo) / qmax, 65504.0).to(tl.float16).to(tl.float32)
    inv = tl.where(scale > 0, 1.0 / tl.maximum(scale, 1e-30), 0.0)
    q = tl.floor((x - lo[:, None]) * inv[:, None] + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), qmax).to(tl.int32)
    q3 = tl.reshape(q, (BLOCK_R, G // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    packed = tl.sum(q3 << shifts[None, None, :], axis=2)
    pcols = tl.arange(0, G // PER)
    tl.store(
        q_ptr + rows[:, None] * (G // PER) + pcols[None, :], packed.to(tl.uint8),
        mask=rmask[:, None],
    )
    tl.store(scale_ptr + rows, scale.to(tl.float16), mask=rmask)
    tl.store(zero_ptr + rows, lo.to(tl.float16), mask=rmask)


@triton.jit
def dequantize_groups_kernel(
    q_ptr, scale_ptr, zero_ptr, h_ptr, out_ptr,
    R, stride_or,
    BITS: tl.constexpr, PER: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_ROTATION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, G)
    rmask = rows < R
    byte = tl.load(
        q_ptr + rows[:, None] * (G // PER) + (cols // PER)[None, :], mask=rmask[:, None], other=0
    ).to(tl.int32)
    q = (byte >> ((cols % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    lo = tl.load(zero_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    x = q.to(tl.float32) * scale[:, None] + lo[:, None]
    if HAS_ROTATION:
        # The normalized Hadamard matrix is symmetric and orthogonal: its own inverse.
        h = tl.load(h_ptr + cols[:, None] * G + cols[None, :])
        x = tl.dot(x, h, input_precision="ieee")
    tl.store(
        out_ptr + rows[:, None] * stride_or + cols[None, :],
        x.to(out_ptr.dtype.element_ty), mask=rmask[:, None],
    )


__all__ = ["dequantize_groups_kernel", "quantize_groups_kernel", "triton"]
