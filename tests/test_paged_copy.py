"""Paged gather / scatter: the Triton kernel (interpreted on CPU, native on CUDA) against
the torch reference, for every engine layout × dtype × head_dim × block_size, full and
partial chunks. The copies move bits, so every comparison is exact."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.dispatch import as_bits
from kvcache.kernels.page_layout import (
    SglangLayerFirstLayout,
    SglangPageFirstLayout,
    VllmFlashLayout,
    VllmMlaLayout,
    paged_planes,
)
from kvcache.kernels.paged_copy import (
    chunk_shape,
    paged_gather,
    paged_gather_reference,
    paged_scatter,
    paged_scatter_reference,
)
from kvcache.kvstore.errors import LayoutMismatchError

LAYERS, HEADS = 2, 2
DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_layout(kind: str, block_size: int, head_dim: int, num_blocks: int = 6):
    if kind == "vllm-nhd":
        return VllmFlashLayout(LAYERS, num_blocks, block_size, HEADS, head_dim)
    if kind == "vllm-hnd":
        return VllmFlashLayout(LAYERS, num_blocks, block_size, HEADS, head_dim, hnd=True)
    if kind == "vllm-mla":
        return VllmMlaLayout(LAYERS, num_blocks, block_size, latent_dim=head_dim + 16)
    if kind == "sglang-layer-first":
        return SglangLayerFirstLayout(LAYERS, num_blocks, HEADS, head_dim, page_size=block_size)
    return SglangPageFirstLayout(LAYERS, num_blocks, HEADS, head_dim, page_size=block_size)


KINDS = ["vllm-nhd", "vllm-hnd", "vllm-mla", "sglang-layer-first", "sglang-page-first"]


def random_like(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=g).to(t.dtype).to(t.device)


def filled(layout, dtype, device="cpu", seed=0):
    """Engine KV of ``layout`` with random contents."""
    g = torch.Generator().manual_seed(seed)
    kv = layout.allocate(dtype, device)
    for layer in layout.block_views(kv):
        for v in layer:
            v.copy_(random_like(v, g))
    return kv


def some_slots(layout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    """A sequence's slots over shuffled blocks, starting mid-block (a partial chunk)."""
    g = torch.Generator().manual_seed(seed)
    b = layout.block_size
    table = torch.randperm(layout.num_slots // b, generator=g)
    start = b // 2
    t = torch.arange(start, start + num_tokens)
    return table[t // b] * b + t % b


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(as_bits(a.contiguous()).cpu(), as_bits(b.contiguous()).cpu())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 128])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_tokens", [16, 37])  # whole blocks / a partial chunk
def test_triton_matches_reference(kind, dtype, head_dim, block_size, num_tokens):
    layout = make_layout(kind, block_size, head_dim, num_blocks=max(4, 96 // block_size))
    kv = filled(layout, dtype)
    planes = paged_planes(layout, kv)
    slots = some_slots(layout, num_tokens)

    ref = paged_gather_reference(planes, slots)
    got = paged_gather(planes, slots, impl="triton")
    assert got.shape == chunk_shape(planes, num_tokens)
    bits_equal(got, ref)

    # Scatter new content back to the same slots: the touched tokens change, others not.
    new = random_like(ref, torch.Generator().manual_seed(7))
    kv_ref = filled(layout, dtype)
    paged_scatter_reference(paged_planes(layout, kv_ref), slots, new)
    paged_scatter(planes, slots, new, impl="triton")
    for a, b in zip(layout.block_views(kv), layout.block_views(kv_ref), strict=True):
        for x, y in zip(a, b, strict=True):
            bits_equal(x, y)
    bits_equal(paged_gather(planes, slots, impl="triton"), new)


def test_reference_agrees_with_plain_indexing():
    """The reference itself, against hand-written indexing of the NHD and HND tensors."""
    nhd = make_layout("vllm-nhd", 4, 8)
    kv = filled(nhd, torch.float32)
    slots = torch.tensor([5, 0, 23, 9])
    got = paged_gather(paged_planes(nhd, kv), slots)
    for i, t in enumerate(kv):
        for s_i, s in enumerate(slots.tolist()):
            torch.testing.assert_close(got[i, :, s_i], t[:, s // 4, s % 4], atol=0, rtol=0)
    hnd = make_layout("vllm-hnd", 4, 8)
    kv_h = hnd.allocate(torch.float32)
    for a, b in zip(kv_h, kv, strict=True):
        a.copy_(b.transpose(2, 3))
    torch.testing.assert_close(paged_gather(paged_planes(hnd, kv_h), slots), got, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_padding_slots_are_skipped(impl):
    layout = make_layout("vllm-nhd", 4, 16)
    kv = filled(layout, torch.float16)
    planes = paged_planes(layout, kv)
    before = [t.clone() for t in kv]
    slots = torch.tensor([3, -1, 7, -1], dtype=torch.int32)
    chunk = torch.ones(chunk_shape(planes, 4), dtype=torch.float16)
    paged_scatter(planes, slots, chunk, impl=impl)
    for a, b in zip(kv, before, strict=True):
        assert torch.equal(a[:, 0, 3], torch.ones_like(a[:, 0, 3]))
        assert torch.equal(a[:, 1, 3], torch.ones_like(a[:, 1, 3]))  # slot 7
        a, b = a.clone(), b.clone()
        a[:, 0, 3], a[:, 1, 3] = b[:, 0, 3], b[:, 1, 3]
        assert torch.equal(a, b)  # nothing else was written
    out = torch.full(chunk_shape(planes, 4), 5.0, dtype=torch.float16)
    paged_gather(planes, slots, out, impl=impl)
    assert torch.equal(out[:, :, 1], torch.full_like(out[:, :, 1], 5.0))  # untouched
    assert torch.equal(out[:, :, 0], torch.ones_like(out[:, :, 0]))


def test_gather_into_a_strided_out_and_an_empty_slot_list():
    layout = make_layout("sglang-page-first", 1, 16, num_blocks=12)
    kv = filled(layout, torch.float16)
    planes = paged_planes(layout, kv)
    slots = torch.tensor([4, 2, 9])
    big = torch.zeros(LAYERS, 2, 8, HEADS, 16, dtype=torch.float16)
    paged_gather(planes, slots, big[:, :, 2:5], impl="triton")
    bits_equal(big[:, :, 2:5], paged_gather_reference(planes, slots))
    empty = paged_gather(planes, slots[:0], impl="triton")
    assert empty.shape == (LAYERS, 2, 0, HEADS, 16)


def test_bad_inputs_say_what_is_wrong():
    layout = make_layout("vllm-nhd", 4, 8)
    kv = filled(layout, torch.float16)
    planes = paged_planes(layout, kv)
    with pytest.raises(ValueError, match="slots must lie in"):
        paged_gather(planes, torch.tensor([0, layout.num_slots]))
    with pytest.raises(LayoutMismatchError, match="canonical shape"):
        paged_gather(planes, torch.tensor([0, 1]), torch.empty(LAYERS, 2, 3, HEADS, 8,
                                                               dtype=torch.float16))
    with pytest.raises(LayoutMismatchError, match="dtype"):
        paged_scatter(planes, torch.tensor([0]), torch.zeros(LAYERS, 2, 1, HEADS, 8))
    with pytest.raises(LayoutMismatchError, match="expected shape"):
        paged_planes(layout, [kv[0], kv[1][:, :2]])
    with pytest.raises(LayoutMismatchError, match="per-layer tensors"):
        paged_planes(layout, kv[:1])


# -- CUDA ---------------------------------------------------------------------------------
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("host", ["device", "pinned", "pageable"])
def test_cuda_gather_scatter_with_host_buffers(kind, dtype, host):
    layout = make_layout(kind, 16, 128, num_blocks=64)
    kv = filled(layout, dtype, device="cuda")
    planes = paged_planes(layout, kv)
    slots = some_slots(layout, 300).cuda()
    ref = paged_gather_reference(planes, slots)
    shape = chunk_shape(planes, 300)
    if host == "device":
        out = torch.empty(shape, dtype=dtype, device="cuda")
    else:
        out = torch.empty(shape, dtype=dtype, pin_memory=host == "pinned")
    paged_gather(planes, slots, out)
    torch.cuda.synchronize()
    bits_equal(out, ref)
    new = random_like(ref, torch.Generator().manual_seed(3))
    src = new.to(out.device)
    if host == "pinned":
        src = src.pin_memory()
    paged_scatter(planes, slots, src)
    torch.cuda.synchronize()
    bits_equal(paged_gather_reference(planes, slots), new)
