"""Group quantization with bit packing (and an optional block-Hadamard rotation).

The unit of work is a *row group*: ``x`` is ``[rows, G]`` and every row is quantized on its
own, asymmetrically, to ``bits`` in {2, 4, 8} with an fp16 scale and fp16 zero (the row's
minimum): ``q = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)``. Codes are packed
little-end first, ``8 // bits`` per byte. With ``rotate`` each row is first multiplied by the
normalized ``G x G`` Hadamard matrix (SAW-INT4): outliers are spread over the group, so the
group's range — and the quantization step — shrinks.

Callers arrange KIVI's axes by choosing what a row is (K: one channel over ``G`` tokens;
V: one token over ``G`` channels). The launchers dispatch to Triton on CUDA tensors, to
the torch reference elsewhere; ``impl="triton"`` forces the kernel (CPU tests run it
through ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
import os
from functools import cache
from typing import Literal, NamedTuple

import torch

Impl = Literal["auto", "triton", "torch"]
BITS = (2, 4, 8)


class QuantizedGroups(NamedTuple):
    """packed: uint8 ``[rows, G * bits // 8]``; scale, zero: fp16 ``[rows]``."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@cache
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(torch.float32)


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized (orthogonal, symmetric) Hadamard matrix, fp32 ``[n, n]``."""
    return _hadamard_cpu(n).to(device)


def _check_group(group: int, bits: int, rotate: bool) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group < 8 or group & (group - 1):
        raise ValueError(f"group size must be a power of two >= 8, got {group}")
    if rotate and group < 16:
        raise ValueError("the Hadamard rotation needs groups of at least 16")


def _use_triton(x: torch.Tensor, impl: Impl) -> bool:
    if impl == "torch":
        return False
    if impl == "triton":
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("Triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return x.is_cuda


def _block_rows(rows: int, group: int, interpreted: bool) -> int:
    if interpreted:
        # The interpreter pays per program, not per element: few, big programs.
        return max(16, min(triton_next_pow2(rows), (1 << 16) // group))
    return max(16, 4096 // group)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# -- torch references ---------------------------------------------------------------------


def quantize_groups_reference(x: torch.Tensor, bits: int, rotate: bool = False) -> QuantizedGroups:
    """x: ``[rows, G]`` float. See the module docstring for the exact arithmetic."""
    rows, group = x.shape
    xf = x.float()
    if rotate:
        xf = xf @ hadamard_matrix(group, x.device)
    qmax = (1 << bits) - 1
    mn, mx = xf.amin(1), xf.amax(1)
    lo = mn.clamp(-65504.0, 65504.0).half().float()
    scale = ((mx - lo) / qmax).clamp(max=65504.0).half().float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.floor((xf - lo[:, None]) * inv[:, None] + 0.5).clamp(0, qmax).to(torch.int32)
    per = 8 // bits
    shifts = torch.arange(per, device=x.device, dtype=torch.int32) * bits
    packed = (q.view(rows, group // per, per) << shifts).sum(-1).to(torch.uint8)
    return QuantizedGroups(packed, scale.half(), lo.half())


def dequantize_groups_reference(
    q: QuantizedGroups, bits: int, rotate: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of ``quantize_groups_reference``: ``[rows, G]`` of ``dtype``."""
    per = 8 // bits
    rows = q.packed.shape[0]
    group = q.packed.shape[1] * per
    shifts = torch.arange(per, device=q.packed.device, dtype=torch.int32) * bits
    codes = (q.packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    x = codes.view(rows, group).float() * q.scale.float()[:, None] + q.zero.float()[:, None]
    if rotate:
        x = x @ hadamard_matrix(group, x.device)
    return x.to(dtype)


# -- launchers ----------------------------------------------------------------------------


def quantize_groups(
    x: torch.Tensor, bits: int, *, rotate: bool = False, impl: Impl = "auto"
) -> QuantizedGroups:
    """Quantize each row of ``x`` (``[rows, G]``, fp16/bf16/fp32, rows contiguous).

    Returns packed uint8 ``[rows, G * bits // 8]``, fp16 scale and zero ``[rows]``.
    """
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be a 2-D float tensor [rows, G], got {tuple(x.shape)} {x.dtype}")
    rows, group = x.shape
    _check_group(group, bits, rotate)
    if not _use_triton(x, impl) or rows == 0:
        return quantize_groups_reference(x, bits, rotate)
    from kvcache.kernels._triton.quant import quantize_groups_kernel

    if x.stride(1) != 1:
        x = x.contiguous()
    per = 8 // bits
    packed = torch.empty(rows, group // per, dtype=torch.uint8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float16, device=x.device)
    zero = torch.empty(rows, dtype=torch.float16, device=x.device)
    h = hadamard_matrix(group, x.device) if rotate else scale  # unused pointer when off
    block = _block_rows(rows, group, not x.is_cuda)
    grid = ((rows + block - 1) // block,)
    quantize_groups_kernel[grid](
        x, h, packed, scale, zero, rows, x.stride(0),
        BITS=bits, PER=per, G=group, BLOCK_R=block, HAS_ROTATION=rotate,
    )
    return QuantizedGroups(packed, scale, zero)


def dequantize_groups(
    q: QuantizedGroups,
    bits: int,
    *,
    rotate: bool = False,
    dtype: torch.dtype = torch.float16,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Inverse of ``quantize_groups``: ``[rows, G]`` of ``dtype``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    per = 8 // bits
    rows, nbytes = q.packed.shape
    group = nbytes * per
    _check_group(group, bits, rotate)
    if q.packed.dtype != torch.uint8 or q.scale.shape != (rows,) or q.zero.shape != (rows,):
        raise ValueError("packed must be uint8 [rows, G*bits/8] with scale and zero [rows]")
    if not _use_triton(q.packed, impl) or rows == 0:
        return dequantize_groups_reference(q, bits, rotate, dtype)
    from kvcache.kernels._triton.quant import dequantize_groups_kernel

    packed, scale, zero = (t.contiguous() for t in q)
    out = torch.empty(rows, group, dtype=dtype, device=packed.device)
    h = hadamard_matrix(group, packed.device) if rotate else scale
    block = _block_rows(rows, group, not packed.is_cuda)
    grid = ((rows + block - 1) // block,)
    dequantize_groups_kernel[grid](
        packed, scale, zero, h, out, rows, out.stride(0),
        BITS=bits, PER=per, G=group, BLOCK_R=block, HAS_ROTATION=rotate,
    )
    return out
