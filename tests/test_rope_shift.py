"""RoPE shift: the kernel against the torch reference, and both against rotating from
scratch: ``shift(rope(k, p_old), p_old -> p_new) ≈ rope(k, p_new)``.

Tolerances: fp32 math inside; the from-scratch comparison allows the fp32 angle error at
positions up to ~2.2k (~3e-4 rad × |k| <= 5) plus one rounding of the storage dtype on
input and output. Kernel vs reference: fp32 1e-5; fp16 one ulp; bf16 one ulp (the
interpreter truncates fp32 -> bf16 stores).
"""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.rope_shift import rope_inv_freq, rope_reference, rope_shift
from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.layout import RopeSpec, RopeStyle

FROM_SCRATCH_TOL = {
    torch.float32: dict(atol=3e-3, rtol=1e-3),
    torch.float16: dict(atol=6e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
KERNEL_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def keys_at(shape, old, rope, dtype, seed=0, device="cpu"):
    """(pre-RoPE fp64 keys, the same keys rotated at ``old`` in ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    return k, rope_reference(k, old, rope, math_dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("style", [RopeStyle.NEOX, RopeStyle.GPTJ], ids=lambda s: s.value)
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("layers", [None, 2])  # [T, H, D] and [L, T, H, D]
def test_shift_equals_rotating_from_scratch(dtype, head_dim, style, partial, layers):
    rope = RopeSpec(theta=10000.0, style=style, rotary_dim=head_dim // 2 if partial else None)
    tokens, heads = 37, 2
    shape = (tokens, heads, head_dim) if layers is None else (layers, tokens, heads, head_dim)
    g = torch.Generator().manual_seed(1)
    old = torch.randint(0, 2048, (tokens,), generator=g)
    new = old + torch.randint(-300, 300, (tokens,), generator=g).clamp(min=-int(old.min()))
    k, cached = keys_at(shape, old, rope, dtype)

    got = rope_shift(cached, old, new, rope, impl="triton")
    ref = rope_shift(cached, old, new, rope, impl="torch")
    torch.testing.assert_close(got, ref, **KERNEL_TOL[dtype])
    expected = rope_reference(k, new, rope, math_dtype=torch.float64).to(dtype)
    torch.testing.assert_close(got, expected, **FROM_SCRATCH_TOL[dtype])
    if partial:  # dims past rotary_dim are not touched at all
        assert torch.equal(got[..., head_dim // 2:], cached[..., head_dim // 2:])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_in_place_on_a_canonical_chunk_with_int_starts(impl):
    """K of a canonical [L, 2, T, H, D] chunk is a strided view: shift it in place."""
    rope = RopeSpec()
    k, cached_k = keys_at((2, 20, 2, 32), 100, rope, torch.float16)
    chunk = torch.stack([cached_k, torch.ones_like(cached_k)], dim=1)
    rope_shift(chunk[:, 0], 100, 5, rope, out=chunk[:, 0], impl=impl)
    expected = rope_reference(k, 5, rope, math_dtype=torch.float64).half()
    torch.testing.assert_close(chunk[:, 0], expected, **FROM_SCRATCH_TOL[torch.float16])
    assert torch.equal(chunk[:, 1], torch.ones_like(chunk[:, 1]))  # V untouched


def test_zero_shift_is_identity_and_shifts_compose():
    rope = RopeSpec(style=RopeStyle.GPTJ)
    _, cached = keys_at((16, 2, 64), 0, rope, torch.float32)
    same = rope_shift(cached, 7, 7, rope, impl="triton")
    torch.testing.assert_close(same, cached, atol=0, rtol=0)
    there = rope_shift(rope_shift(cached, 0, 300, rope, impl="triton"), 300, 50, rope,
                       impl="triton")
    torch.testing.assert_close(there, rope_shift(cached, 0, 50, rope), atol=1e-4, rtol=1e-4)


def test_linear_scaling_and_explicit_inv_freq():
    scaled = RopeSpec(theta=500000.0, scaling_type="linear", scaling_factor=4.0)
    plain = RopeSpec(theta=500000.0)
    torch.testing.assert_close(rope_inv_freq(scaled, 64) * 4, rope_inv_freq(plain, 64))
    llama3 = RopeSpec(theta=500000.0, scaling_type="llama3", scaling_factor=8.0)
    with pytest.raises(LayoutMismatchError, match="inv_freq="):
        rope_inv_freq(llama3, 64)
    _, cached = keys_at((8, 1, 64), 0, plain, torch.float32)
    # With the model's frequencies given, any scheme shifts.
    got = rope_shift(cached, 0, 9, llama3, inv_freq=rope_inv_freq(plain, 64), impl="triton")
    torch.testing.assert_close(got, rope_shift(cached, 0, 9, plain), atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    rope = RopeSpec()
    with pytest.raises(LayoutMismatchError, match="keys must be"):
        rope_shift(torch.zeros(4, 8), 0, 1, rope)
    with pytest.raises(ValueError, match="positions must be"):
        rope_shift(torch.zeros(4, 1, 8), torch.arange(3), 1, rope)
    with pytest.raises(LayoutMismatchError, match="rotary_dim"):
        rope_shift(torch.zeros(4, 1, 8), 0, 1, RopeSpec(rotary_dim=16))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("style", [RopeStyle.NEOX, RopeStyle.GPTJ], ids=lambda s: s.value)
def test_cuda_matches_reference(dtype, style):
    rope = RopeSpec(style=style, rotary_dim=96)
    k, cached = keys_at((4, 300, 8, 128), 1000, rope, dtype, device="cuda")
    got = rope_shift(cached, 1000, 0, rope)
    torch.testing.assert_close(got, rope_shift(cached, 1000, 0, rope, impl="torch"),
                               **KERNEL_TOL[dtype])
    torch.testing.assert_close(got, rope_reference(k, 0, rope, math_dtype=torch.float64)
                               .to(dtype), **FROM_SCRATCH_TOL[dtype])
