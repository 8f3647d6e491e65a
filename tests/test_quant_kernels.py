"""Quantize/dequantize kernels: Triton (interpreted on CPU, native on CUDA) against the
torch reference. Codes must match exactly except for rare rounding ties (fp32 summation
order in the rotation); dequantized values then agree within one quantization step."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.quant import (
    QuantizedGroups,
    dequantize_groups,
    dequantize_groups_reference,
    hadamard_matrix,
    quantize_groups,
    quantize_groups_reference,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _codes(q: QuantizedGroups, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=q.packed.device, dtype=torch.int32) * bits
    return ((q.packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)).flatten(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 64, 128])
@pytest.mark.parametrize("rotate", [False, True])
def test_triton_matches_reference(device, dtype, bits, group, rotate):
    g = torch.Generator().manual_seed(bits * 1000 + group)
    rows = 77  # not a multiple of the block: exercises the row mask
    x = (torch.randn(rows, group, generator=g) * 3).to(dtype)
    x[5, 3] = 40.0  # an outlier
    x[9] = 1.5  # a constant row: scale 0
    x = x.to(device)
    tri = quantize_groups(x, bits, rotate=rotate, impl="triton")
    ref = quantize_groups_reference(x, bits, rotate)
    torch.testing.assert_close(tri.scale, ref.scale, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(tri.zero, ref.zero, rtol=1e-3, atol=1e-4)
    mismatch = (_codes(tri, bits) - _codes(ref, bits)).abs()
    assert int(mismatch.max()) <= 1 and float((mismatch > 0).float().mean()) < 0.01
    out_tri = dequantize_groups(tri, bits, rotate=rotate, dtype=dtype, impl="triton")
    out_ref = dequantize_groups_reference(tri, bits, rotate, dtype)
    # fp32 -> bf16 stores truncate in the interpreter: allow one bf16 ulp.
    ulp = 2**-7 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out_tri.float(), out_ref.float(), rtol=ulp, atol=1e-3)
    # round trip error bounded by half a step (plus rotation / storage rounding)
    step = ref.scale.float()[:, None]
    err = (out_ref.float() - x.float()).abs()
    bound = step * (0.5 if not rotate else 0.5 * group**0.5) + x.float().abs() * ulp + 1e-3
    assert bool((err <= bound + 1e-2).all())


def test_hadamard_is_orthogonal_and_launcher_validates():
    h = hadamard_matrix(64)
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(4, 24), 4)
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(4, 8), 4, rotate=True)
    with pytest.raises(ValueError):
        quantize_groups(torch.zeros(4, 64), 3)


def test_auto_dispatch_uses_reference_on_cpu():
    x = torch.randn(8, 32)
    a = quantize_groups(x, 4)
    b = quantize_groups_reference(x, 4)
    assert torch.equal(a.packed, b.packed)
