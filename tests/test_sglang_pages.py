"""``HostPages``: SGLang host-pool pages viewed as kvcache chunks, element by element.

The expected indexing follows SGLang 0.5.23's host pools (see ``connectors/sglang_pages.py``
for the lines): a token slot ``s`` of layer ``l`` is ``kv[0|1, l, s]`` (layer_first),
``kv[0|1, s, l]`` (page_first), ``kv[0|1, s // P, l, s % P]`` (page_first_direct); MLA drops
the K/V axis and has one head.
"""

from __future__ import annotations

import pytest
import torch

from kvcache.connectors.sglang_pages import HOST_LAYOUTS, HostPages
from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.strided_copy import copy_many

L, H, D, P, PAGES = 3, 2, 4, 8, 5


def pool(layout: str, mla: bool) -> HostPages:
    slots = PAGES * P
    shapes = {
        (False, "layer_first"): (2, L, slots, H, D),
        (False, "page_first"): (2, slots, L, H, D),
        (False, "page_first_direct"): (2, PAGES, L, P, H, D),
        (True, "layer_first"): (L, slots, 1, D),
        (True, "page_first"): (slots, L, 1, D),
        (True, "page_first_direct"): (PAGES, L, P, 1, D),
    }
    kv = torch.arange(torch.Size(shapes[mla, layout]).numel(), dtype=torch.float32)
    return HostPages(kv.view(shapes[mla, layout]), layout, P, mla)


def element(pages: HostPages, plane: int, layer: int, slot: int) -> torch.Tensor:
    """``[heads, dim]`` (MLA ``[dim]``) of one token slot, indexed as SGLang does."""
    kv, lay = pages.kv_buffer, pages.layout
    if pages.is_mla:
        if lay == "layer_first":
            return kv[layer, slot, 0]
        if lay == "page_first":
            return kv[slot, layer, 0]
        return kv[slot // P, layer, slot % P, 0]
    if lay == "layer_first":
        return kv[plane, layer, slot]
    if lay == "page_first":
        return kv[plane, slot, layer]
    return kv[plane, slot // P, layer, slot % P]


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", HOST_LAYOUTS)
def test_a_page_reads_as_a_canonical_chunk(layout, mla):
    pages = pool(layout, mla)
    assert (pages.num_layers, pages.num_heads, pages.head_dim, pages.num_slots) == \
        (L, 1 if mla else H, D, PAGES * P)
    start = 3 * P
    chunk = pages.chunk_view(start)
    assert chunk.shape == ((L, P, D) if mla else (L, 2, P, H, D))
    for layer in range(L):
        for t in range(P):
            if mla:
                assert torch.equal(chunk[layer, t], element(pages, 0, layer, start + t))
            else:
                for plane in range(2):
                    assert torch.equal(chunk[layer, plane, t],
                                       element(pages, plane, layer, start + t))
    for start in range(0, PAGES * P, P):  # every page: the same view canonical() makes
        got, want = pages.chunk_view(start), pages.canonical(pages.page(start))
        assert (got.shape, got.stride(), got.storage_offset()) == \
            (want.shape, want.stride(), want.storage_offset())


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", HOST_LAYOUTS)
def test_writing_the_view_writes_only_that_page(layout, mla):
    pages = pool(layout, mla)
    before = pages.kv_buffer.clone()
    pages.chunk_view(P).fill_(-1)
    changed = (pages.kv_buffer != before).reshape(-1).sum().item()
    assert changed == pages.page_bytes // 4
    assert torch.equal(pages.page(P).reshape(-1), torch.full((changed,), -1.0))


@pytest.mark.parametrize("layout", HOST_LAYOUTS)
def test_a_flat_page_is_sglangs_get_data_page(layout):
    pages = pool(layout, False)
    flat = pages.page(2 * P).flatten()  # get_data_page(index, flat=True)
    assert torch.equal(pages.flat_view(flat), pages.chunk_view(2 * P))
    with pytest.raises(LayoutMismatchError, match="flat"):
        pages.flat_view(flat[1:])


def test_bad_pools_and_slots_are_refused():
    with pytest.raises(LayoutMismatchError, match="page_head"):
        HostPages(torch.zeros(2, 4, 2, 8, 3, 4), "page_head", P, False)
    with pytest.raises(LayoutMismatchError, match="dims"):
        HostPages(torch.zeros(2, L, 40, H), "layer_first", P, False)
    with pytest.raises(LayoutMismatchError, match="pages"):
        HostPages(torch.zeros(2, 5, L, 4, H, D), "page_first_direct", P, False)
    pages = pool("page_first", False)
    for bad in (3, -P, PAGES * P):
        with pytest.raises(LayoutMismatchError, match="does not start a page"):
            pages.page(bad)



def stored_batch(like: torch.Tensor, n: int, mla: bool, by_token: bool) -> list[torch.Tensor]:
    """``n`` chunks shaped as ``like``, back to back in one buffer (objects the store wrote
    in one batch), each canonical or, as ``raw`` stores page_first pages, by token."""
    if not by_token:
        return list(torch.randn(n, *like.shape).unbind(0))
    order = (1, 0, 2) if mla else (1, 2, 0, 3, 4)  # canonical -> by token
    back = [order.index(i) for i in range(len(order))]
    buf = torch.randn(n, *[like.shape[i] for i in order])
    return [buf[i].permute(*back) for i in range(n)]


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", HOST_LAYOUTS)
@pytest.mark.parametrize("by_token", [False, True], ids=["canonical", "by-token"])
@pytest.mark.parametrize(("host", "objects", "calls"), [
    ([0, 1, 2, 4, 3], [0, 1, 2, 3, 4], 3),  # a run of three, then a gap, then backwards
    ([0, 1, 2], [0, 2, 4], 1),  # one step on each side, not the same step
    ([1, 2, 3], [0, 2, 3], 2),  # the objects' step changes
])
def test_copy_many_merges_runs_and_equals_a_copy_per_page(layout, mla, by_token, host,
                                                           objects, calls, monkeypatch):
    got, want = pool(layout, mla), pool(layout, mla)
    chunks = stored_batch(got.chunk_view(0), 5, mla, by_token)
    for p, o in zip(host, objects, strict=True):
        want.chunk_view(p * P).copy_(chunks[o])
    made = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda self, src, *a, **k: made.append(1) or copy_(self, src, *a, **k))
    copy_many([got.chunk_view(p * P) for p in host], [chunks[o] for o in objects])
    monkeypatch.undo()
    assert len(made) == calls
    assert torch.equal(got.kv_buffer, want.kv_buffer)
