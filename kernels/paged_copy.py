"""Paged gather / scatter: engine KV at a list of token slots <-> canonical chunk tensors.

``paged_gather`` reads the tokens at ``slots`` from every layer of an engine cache (see
``kvcache.kernels.page_layout``) into one canonical chunk ``[layers, 2, tokens, kv_heads,
head_dim]`` (MLA ``[layers, tokens, latent_dim]``); ``paged_scatter`` writes one back.
Every layer moves in a single launch. On CUDA a *pinned* host chunk is read or written by
the kernel itself over PCIe (no staging buffer, no second copy); a pageable host chunk goes
through a device staging buffer and ``copy_``.

CUDA launches are asynchronous: synchronize the stream (or record and wait on an event)
before reading a host ``out`` of ``paged_gather`` or reusing a host ``chunk`` given to
``paged_scatter``.

Slots equal to ``-1`` are padding (as in vLLM's ``slot_mapping``): scatter skips them and
gather leaves their rows of ``out`` untouched.
"""

from __future__ import annotations

import torch

from kvcache.kernels.dispatch import Impl, as_bits, interpreting, next_pow2, use_triton
from kvcache.kernels.page_layout import PagedPlanes, check_slots
from kvcache.kvstore.errors import LayoutMismatchError


def chunk_shape(planes: PagedPlanes, num_tokens: int) -> tuple[int, ...]:
    """Canonical shape for ``num_tokens`` tokens of this engine cache."""
    if planes.num_planes == 1:
        return (planes.num_layers, num_tokens, planes.head_dim)
    return (planes.num_layers, 2, num_tokens, planes.num_heads, planes.head_dim)


def _as5d(chunk: torch.Tensor, planes: PagedPlanes) -> torch.Tensor:
    """``[layers, planes, tokens, heads, head_dim]`` view of a canonical chunk."""
    return chunk.unsqueeze(1).unsqueeze(3) if planes.num_planes == 1 else chunk


def _check_chunk(planes: PagedPlanes, chunk: torch.Tensor, num_tokens: int, what: str) -> None:
    expected = chunk_shape(planes, num_tokens)
    if tuple(chunk.shape) != expected:
        raise LayoutMismatchError(f"{what}: expected canonical shape {expected}, got "
                                  f"{tuple(chunk.shape)}")
    if chunk.dtype != planes.dtype:
        raise LayoutMismatchError(f"{what}: dtype {chunk.dtype} differs from the engine "
                                  f"cache's {planes.dtype}")
    if chunk.numel() and chunk.stride(-1) != 1:
        raise LayoutMismatchError(f"{what}: the last dim must be contiguous")


# -- torch reference ------------------------------------------------------------------------
def _token_rows(view: torch.Tensor) -> torch.Tensor | None:
    """``[N * B, heads, head_dim]`` view of a block view, or None when strides forbid it."""
    try:
        return view.view(-1, view.shape[2], view.shape[3])
    except RuntimeError:
        return None


def paged_gather_reference(
    planes: PagedPlanes, slots: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch gather. slots: int ``[T]``; out: canonical chunk (see ``chunk_shape``)
    on ``planes.device``, allocated when None. Returns ``out``."""
    num_tokens = slots.numel()
    if out is None:
        out = torch.empty(chunk_shape(planes, num_tokens), dtype=planes.dtype,
                          device=planes.device)
    # Bits, not values: fp8 has no index_copy on CPU, and a copy must not convert anything.
    dst = as_bits(_as5d(out, planes))
    keep = slots >= 0
    idx = slots.to(device=planes.device, dtype=torch.int64)[keep.to(planes.device)]
    tok = torch.arange(num_tokens, device=planes.device)[keep.to(planes.device)]
    blk, off = idx // planes.block_size, idx % planes.block_size
    for i, layer in enumerate(planes.views):
        for j, plane in enumerate(layer):
            view = as_bits(plane)
            rows = _token_rows(view)
            got = rows.index_select(0, idx) if rows is not None else view[blk, off]
            if tok.numel() == num_tokens:
                dst[i, j].copy_(got)
            else:
                dst[i, j].index_copy_(0, tok, got)
    return out


def paged_scatter_reference(planes: PagedPlanes, slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """Plain-torch scatter of canonical ``chunk`` (see ``chunk_shape``) to ``slots`` ``[T]``."""
    src = as_bits(_as5d(chunk.to(planes.device), planes))
    idx = slots.to(device=planes.device, dtype=torch.int64)
    keep: torch.Tensor | None = idx >= 0
    if bool(keep.all()):  # type: ignore[union-attr]
        keep = None  # no padding: skip a masked copy of every plane
    else:
        idx = idx[keep]
    blk, off = idx // planes.block_size, idx % planes.block_size
    for i, layer in enumerate(planes.views):
        for j, plane in enumerate(layer):
            view = as_bits(plane)
            rows = _token_rows(view)
            part = src[i, j] if keep is None else src[i, j][keep]
            if rows is not None:
                rows.index_copy_(0, idx, part)
            else:
                view[blk, off] = part


# -- Triton ---------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch(planes: PagedPlanes, slots: torch.Tensor, chunk: torch.Tensor, to_paged: bool) -> None:
    from kvcache.kernels._triton.paged_copy import paged_copy_kernel

    num_tokens = slots.numel()
    if num_tokens == 0:
        return
    c5 = _as5d(chunk, planes)
    hd = planes.num_heads * planes.head_dim
    if interpreting() and planes.device.type != "cuda":
        # ~1 ms per program in the interpreter: as few, as large programs as possible.
        block_hd = next_pow2(hd)
        block_t = min(next_pow2(num_tokens), max(1, 65536 // block_hd))
    else:
        # ~8K elements per strip keeps a 4-warp program at 64 registers of data per thread.
        block_hd = min(next_pow2(hd), 1024)
        block_t = min(next_pow2(num_tokens), max(1, 8192 // block_hd))
    grid = (_cdiv(num_tokens, block_t), planes.num_layers * planes.num_planes)
    s_block, s_off, s_head = planes.strides
    paged_copy_kernel[grid](
        as_bits(planes.base), as_bits(c5), slots, planes.plane_offsets,
        num_tokens, s_block, s_off, s_head,
        c5.stride(0), c5.stride(1), c5.stride(2), c5.stride(3),
        BLOCK_SIZE=planes.block_size, NUM_PLANES=planes.num_planes,
        NUM_HEADS=planes.num_heads, HEAD_DIM=planes.head_dim,
        BLOCK_T=block_t, BLOCK_HD=block_hd, TO_PAGED=to_paged,
        num_warps=4,
    )


def _host_direct_ok(t: torch.Tensor, planes: PagedPlanes, host_direct: bool) -> bool:
    """A pinned host tensor the kernel may address directly (CUDA unified addressing)."""
    return host_direct and planes.device.type == "cuda" and t.device.type == "cpu" \
        and t.is_pinned()


# -- launchers ------------------------------------------------------------------------------
def paged_gather(
    planes: PagedPlanes,
    slots: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    impl: Impl = "auto",
    host_direct: bool = True,
) -> torch.Tensor:
    """Gather the tokens at ``slots`` from every layer into one canonical chunk.

    planes: the engine cache (``paged_planes(layout, kv)``); slots: int32/int64 ``[T]``,
    ``-1`` = padding; out: ``[layers, 2, T, kv_heads, head_dim]`` (MLA ``[layers, T,
    latent_dim]``), last dim contiguous, on the cache's device or (CUDA caches) on the
    host — pinned is written by the kernel directly unless ``host_direct=False``.
    Allocated on the cache's device when None. Returns ``out``.
    """
    num_tokens = slots.numel()
    check_slots(slots, planes.num_slots, allow_padding=True)
    if out is None:
        out = torch.empty(chunk_shape(planes, num_tokens), dtype=planes.dtype,
                          device=planes.device)
    _check_chunk(planes, out, num_tokens, "paged_gather out")
    if not planes.uniform or not use_triton(impl, planes.device):
        if out.device == planes.device:
            return paged_gather_reference(planes, slots, out)
        out.copy_(paged_gather_reference(planes, slots))
        return out
    slots = slots.to(planes.device, non_blocking=True)
    if out.device == planes.device or _host_direct_ok(out, planes, host_direct):
        _launch(planes, slots, out, to_paged=False)
        return out
    staging = torch.empty(out.shape, dtype=out.dtype, device=planes.device)
    _launch(planes, slots, staging, to_paged=False)
    out.copy_(staging, non_blocking=out.is_pinned())
    return out


def paged_scatter(
    planes: PagedPlanes,
    slots: torch.Tensor,
    chunk: torch.Tensor,
    *,
    impl: Impl = "auto",
    host_direct: bool = True,
) -> None:
    """Write canonical ``chunk`` into every layer of the engine cache at ``slots``.

    planes: the engine cache; slots: int32/int64 ``[T]`` (``-1`` = padding, skipped);
    chunk: ``[layers, 2, T, kv_heads, head_dim]`` (MLA ``[layers, T, latent_dim]``) of the
    cache's dtype, last dim contiguous, on the cache's device or the host (pinned host
    memory is read by the kernel directly unless ``host_direct=False``).
    """
    num_tokens = slots.numel()
    check_slots(slots, planes.num_slots, allow_padding=True)
    _check_chunk(planes, chunk, num_tokens, "paged_scatter chunk")
    if not planes.uniform or not use_triton(impl, planes.device):
        paged_scatter_reference(planes, slots, chunk)
        return
    slots = slots.to(planes.device, non_blocking=True)
    if chunk.device != planes.device and not _host_direct_ok(chunk, planes, host_direct):
        chunk = chunk.to(planes.device, non_blocking=chunk.is_pinned())
    _launch(planes, slots, chunk, to_paged=True)
