"""Blend selection: the deviation kernel against the reference (fp32 accumulation: tolerance
relative 1e-5 for every input dtype, as both read the same stored values), and the top-k
choice of tokens by ratio or threshold."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.blend_select import (
    kv_deviation,
    kv_deviation_reference,
    select_tokens,
    top_tokens,
)
from kvcache.kvstore.errors import LayoutMismatchError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pair(shape, dtype, seed=0, noise=0.1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cached = torch.randn(shape, generator=g)
    fresh = cached + noise * torch.randn(shape, generator=g)
    return fresh.to(dtype).to(device), cached.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens", [1, 37, 200])
@pytest.mark.parametrize("with_v", [False, True])
def test_deviation_matches_reference(dtype, head_dim, tokens, with_v):
    fk, ck = pair((tokens, 2, head_dim), dtype)
    fv, cv = pair((tokens, 2, head_dim), dtype, seed=1) if with_v else (None, None)
    got = kv_deviation(fk, ck, fv, cv, impl="triton")
    ref = kv_deviation_reference(fk, ck, fv, cv)
    assert got.dtype == torch.float32 and got.shape == (tokens,)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_the_perturbed_tokens_are_selected_in_order():
    fk, ck = pair((100, 2, 32), torch.float16, noise=0.01)
    hot = [3, 17, 42, 90, 91]
    for t in reversed(hot):  # larger deviation for later ones: order must not matter
        fk[t] += 0.5 + t / 100
    for impl in ("torch", "triton"):
        sel = select_tokens(fk, ck, ratio=0.05, impl=impl)
        assert sel.indices.tolist() == hot
        sel = select_tokens(fk, ck, threshold=5.0, impl=impl)
        assert sel.indices.tolist() == hot


def test_ratio_edges_and_ties():
    dev = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert top_tokens(dev, ratio=0.0).tolist() == []
    assert top_tokens(dev, ratio=1.0).tolist() == [0, 1, 2, 3, 4]
    assert top_tokens(dev, ratio=0.3).tolist() == [1, 2]  # ceil(1.5) = 2; ties: lowest first
    assert top_tokens(dev, threshold=3.0).tolist() == []
    assert top_tokens(torch.zeros(0), ratio=0.5).tolist() == []
    with pytest.raises(ValueError, match="exactly one"):
        top_tokens(dev, ratio=0.1, threshold=1.0)
    with pytest.raises(ValueError, match="ratio must be"):
        top_tokens(dev, ratio=1.5)


def test_bad_inputs():
    fk, ck = pair((4, 2, 8), torch.float16)
    with pytest.raises(LayoutMismatchError, match="both be"):
        kv_deviation(fk, ck[:3])
    with pytest.raises(LayoutMismatchError, match="neither"):
        kv_deviation(fk, ck, fk)
    with pytest.raises(LayoutMismatchError, match=r"dtype|one of"):
        kv_deviation(fk, ck.float())


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_matches_reference(dtype):
    fk, ck = pair((4096, 8, 128), dtype, device="cuda")
    fv, cv = pair((4096, 8, 128), dtype, seed=1, device="cuda")
    torch.testing.assert_close(kv_deviation(fk, ck, fv, cv),
                               kv_deviation_reference(fk, ck, fv, cv), atol=1e-5, rtol=1e-5)
    sel = select_tokens(fk, ck, fv, cv, ratio=0.15)
    assert sel.indices.tolist() == top_tokens(sel.deviation.cpu(), ratio=0.15).tolist()
