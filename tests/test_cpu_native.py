"""The C kernels of kernels/cpu_native.py against their torch reference, and cachegen's
native decode path against its torch path."""

from __future__ import annotations

import pytest
import torch

from kvcache.codecs import cachegen
from kvcache.kernels import cpu_native
from kvcache.kvstore.layout import KVLayout
from kvcache.tools.synthetic_kv import nmse, synthetic_kv


@pytest.fixture
def lib():
    native = cpu_native.library()
    if native is None:
        pytest.skip("no working C compiler here")
    return native


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("per_token_group", [0, 4])
@pytest.mark.parametrize("T", [1, 6, 7])  # 7 * 12 / 2 puts the halves' seam mid-row
def test_dequant_plane_matches_reference(lib, dtype, bits, per_token_group, T):
    if cpu_native.library_for(dtype) is None:
        pytest.skip(f"this compiler has no {dtype} conversion")
    C = 12
    n = T * C
    g = torch.Generator().manual_seed(T * 10 + bits)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    z = torch.randint(lo, hi, (n,), generator=g, dtype=torch.int8)
    sym = cachegen._pack(z, bits).view(torch.int8).contiguous()
    mu = torch.randn(C, generator=g)
    delta = torch.rand(n // per_token_group if per_token_group else C, generator=g) + 0.01
    got = torch.full((T, C), float("nan"), dtype=dtype)
    want = torch.empty(T, C, dtype=dtype)
    cpu_native.dequant_plane(lib, sym, bits, mu, delta, per_token_group, got)
    cpu_native.dequant_plane_reference(sym, bits, mu, delta, per_token_group, want)
    d = delta.repeat_interleave(per_token_group) if per_token_group else delta.repeat(T)
    terms = mu.repeat(T).abs() + (z.float() * d).abs()
    # the C loop may fuse the multiply-add (one rounding less): the results differ by at
    # most one rounding of the output dtype, relative to the terms' size
    eps = torch.finfo(dtype).eps
    assert ((got.float() - want.float()).view(-1).abs() <= 2 * eps * terms).all()


def test_cachegen_native_decode_matches_torch_path(lib, monkeypatch):
    layout = KVLayout("native", num_layers=3, num_kv_heads=2, head_dim=16, dtype="bfloat16")
    chunk = synthetic_kv(layout, 33)  # odd token count: the 4-bit seam falls mid-row
    for level in (1, 4):
        codec = cachegen.CacheGenCodec(level)
        tensors, params = codec.encode(chunk, layout)
        native = codec.decode(tensors, params, layout, 33)
        monkeypatch.setattr(cachegen.cpu_native, "library", lambda: None)
        torch_path = codec.decode(tensors, params, layout, 33)
        monkeypatch.undo()
        # one bf16 rounding apart at most (the C loop may fuse the multiply-add)
        scale = torch.finfo(torch.bfloat16).eps * 2 * (chunk.float().abs() + 1)
        assert ((native.float() - torch_path.float()).abs() <= scale).all()
        assert nmse(native, chunk) < 0.2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("neox,rot", [(True, 16), (False, 16), (True, 8)])
def test_dequant_plane_rope_matches_reference(lib, dtype, bits, neox, rot):
    if cpu_native.library_for(dtype) is None:
        pytest.skip(f"this compiler has no {dtype} conversion")
    T, H, D = 7, 3, 16  # 7 * 48 / 2 puts the 4-bit halves' seam mid-row
    n = T * H * D
    g = torch.Generator().manual_seed(rot + bits)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    z = torch.randint(lo, hi, (n,), generator=g, dtype=torch.int8)
    sym = cachegen._pack(z, bits).view(torch.int8).contiguous()
    mu = torch.randn(H * D, generator=g)
    delta = torch.rand(H * D, generator=g) + 0.01
    esc_idx = torch.tensor([0, 5, 47, 48, 100, n - 1], dtype=torch.int32)  # row ends too
    esc_val = torch.randn(6, generator=g) * 30
    angle = torch.rand(T, rot // 2, generator=g) * 6.3
    cos, sin = angle.cos(), angle.sin()
    got = torch.full((T, H, D), float("nan"), dtype=dtype)
    want = torch.empty(T, H, D, dtype=dtype)
    args = (sym, bits, mu, delta, esc_idx, esc_val, cos, sin, neox)
    cpu_native.dequant_plane_rope(lib, *args, torch.empty(H * D), got)
    cpu_native.dequant_plane_rope_reference(*args, want)
    # one rounding of the output dtype apart at most (the C loop may fuse multiply-adds)
    pre = mu.abs().repeat(T) + (z.float() * delta.repeat(T)).abs()
    pre[esc_idx.long()] = esc_val.abs()
    scale = 4 * torch.finfo(dtype).eps * (pre.view(T, H, D).amax(-1, keepdim=True) + 1)
    assert ((got.float() - want.float()).abs() <= scale).all()


def test_cachegen_native_pre_rope_decode_matches_torch_path(lib, monkeypatch):
    layout = KVLayout("native", num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
    chunk = synthetic_kv(layout, 33)
    codec = cachegen.CacheGenCodec()
    tensors, params = codec.encode(chunk, layout, rope_start=300)
    assert params["key_rope_start"] == 300
    native = codec.decode(tensors, params, layout, 33)
    monkeypatch.setattr(cachegen.cpu_native, "library", lambda: None)
    torch_path = codec.decode(tensors, params, layout, 33)
    scale = torch.finfo(torch.bfloat16).eps * 2 * (chunk.float().abs() + 1)
    assert ((native.float() - torch_path.float()).abs() <= scale).all()
    assert nmse(native, chunk) < 0.2


def test_library_is_optional(monkeypatch, tmp_path):
    cpu_native.library.cache_clear()
    try:
        monkeypatch.setenv("KVCACHE_NATIVE", "0")
        assert cpu_native.library() is None
        cpu_native.library.cache_clear()
        monkeypatch.setenv("KVCACHE_NATIVE", "1")
        monkeypatch.setenv("CC", "/bin/false")  # a compiler that always fails
        monkeypatch.setenv("KVCACHE_DIR", str(tmp_path / "fresh"))
        assert cpu_native.library() is None
        assert not list((tmp_path / "fresh").rglob("*.so"))  # nothing half-built left
    finally:
        cpu_native.library.cache_clear()
