"""Engine page layouts as data: shapes, block views that alias engine memory, the plane
description the kernels use, and slot mappings."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.page_layout import (
    SglangLayerFirstLayout,
    SglangPageFirstLayout,
    VllmFlashLayout,
    VllmMlaLayout,
    check_slots,
    paged_planes,
    slots_from_block_table,
)
from kvcache.kvstore.errors import LayoutMismatchError


def test_vllm_shapes_and_views_alias_the_engine_tensors():
    nhd = VllmFlashLayout(num_layers=2, num_blocks=3, block_size=4, num_kv_heads=2, head_dim=8)
    hnd = VllmFlashLayout(2, 3, 4, 2, 8, hnd=True)
    assert nhd.layer_shape == (2, 3, 4, 2, 8) and hnd.layer_shape == (2, 3, 2, 4, 8)
    for layout in (nhd, hnd):
        kv = layout.allocate(torch.float16)
        views = layout.block_views(kv)
        assert [len(v) for v in views] == [2, 2]
        views[1][1][2, 3, 1, 5] = 7.0  # layer 1, V, block 2, offset 3, head 1, dim 5
        where = (1, 2, 3, 1, 5) if layout is nhd else (1, 2, 1, 3, 5)
        assert kv[1][where] == 7.0 and kv[1].count_nonzero() == 1


def test_mla_and_sglang_shapes():
    mla = VllmMlaLayout(3, 5, 16, latent_dim=576)
    assert (mla.layer_shape, mla.num_slots, mla.has_v) == ((5, 16, 576), 80, False)
    lf = SglangLayerFirstLayout(2, num_pages=6, num_kv_heads=4, head_dim=8, page_size=2)
    k, v = lf.allocate(torch.bfloat16)  # type: ignore[misc]
    assert len(k) == len(v) == 2 and k[0].shape == (12, 4, 8)
    pf = SglangPageFirstLayout(2, num_pages=6, num_kv_heads=4, head_dim=8, page_size=2)
    t = pf.allocate(torch.float16)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 6, 2, 2, 4, 8)
    pf.block_views(t)[1][0][4, 1, 3, 2] = 1.0
    assert t[0, 4, 1, 1, 3, 2] == 1.0


def test_planes_describe_every_layer_with_one_stride_set():
    layout = VllmFlashLayout(3, 4, 2, 2, 8)
    kv = layout.allocate(torch.float16)
    planes = paged_planes(layout, kv)
    assert (planes.num_layers, planes.num_planes, planes.num_slots) == (3, 2, 8)
    assert planes.strides == (2 * 2 * 8, 2 * 8, 8)
    base = kv[0].data_ptr()
    for i, t in enumerate(kv):
        for j in (0, 1):
            off = int(planes.plane_offsets[2 * i + j])
            assert base + 2 * off == t[j].data_ptr()
    hnd = VllmFlashLayout(1, 4, 2, 2, 8, hnd=True)
    assert paged_planes(hnd, hnd.allocate(torch.float16)).strides == (2 * 2 * 8, 8, 2 * 8)


def test_mismatched_layers_are_refused():
    layout = VllmFlashLayout(2, 4, 2, 2, 8)
    kv = layout.allocate(torch.float16)
    with pytest.raises(LayoutMismatchError, match="every layer must match"):
        paged_planes(layout, [kv[0], kv[1].float()])
    strided = torch.zeros(2, 4, 2, 2, 16, dtype=torch.float16)[..., :8]
    with pytest.raises(LayoutMismatchError, match="one stride set"):
        paged_planes(layout, [kv[0], strided])
    with pytest.raises(LayoutMismatchError, match="SGLang k_buffer"):
        SglangLayerFirstLayout(2, 4, 2, 8).block_views(kv)


def test_slots_from_block_table():
    slots = slots_from_block_table([7, 2, 5], block_size=4, start=3, num_tokens=6)
    assert slots.tolist() == [7 * 4 + 3, 2 * 4, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 5 * 4]
    with pytest.raises(ValueError, match="blocks"):
        slots_from_block_table([0], 4, 2, 5)
    check_slots(torch.tensor([0, -1, 3]), 4, allow_padding=True)
    with pytest.raises(ValueError, match="slots must lie"):
        check_slots(torch.tensor([0, -1]), 4, allow_padding=False)
    with pytest.raises(ValueError, match="int32/int64"):
        check_slots(torch.tensor([0.0]), 4, allow_padding=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vllm_cpu_layout_k_transposed_then_v_per_block_and_head(dtype):
    from kvcache.kernels.page_layout import VllmCpuLayout
    from kvcache.kernels.paged_copy import paged_gather, paged_scatter

    layout = VllmCpuLayout(num_layers=2, num_blocks=3, block_size=32, num_kv_heads=2,
                           head_dim=16)
    kv = layout.allocate(dtype)
    planes = paged_planes(layout, kv)
    assert not planes.uniform
    slots = torch.tensor([5, 40, 95, 0, -1, 64])
    chunk = torch.randn(2, 2, 6, 2, 16).to(dtype)
    paged_scatter(planes, slots, chunk)
    # The engine's memory, read the way vLLM's CPU kernels lay it out.
    for layer in range(2):
        t = kv[layer]
        for i, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            blk, off = divmod(slot, 32)
            for h in range(2):
                head = t[blk, h].reshape(-1)  # 2 * B * D elements: K^T [D, B] then V [B, D]
                k = head[: 32 * 16].reshape(16, 32)[:, off]
                v = head[32 * 16 :].reshape(32, 16)[off]
                assert torch.equal(k, chunk[layer, 0, i, h])
                assert torch.equal(v, chunk[layer, 1, i, h])
    got = paged_gather(planes, slots)
    keep = slots >= 0
    assert torch.equal(got[:, :, keep], chunk[:, :, keep])
