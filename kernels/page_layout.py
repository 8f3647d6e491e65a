"""Engine page layouts as data: where each token's K/V lives in a serving engine's cache.

Each layout is a small frozen dataclass naming the engine's tensors and their shapes. Its
one job is to turn the engine's tensors into *block views*: per layer and per K/V plane a
view ``[num_blocks, block_size, heads, head_dim]`` of the engine's memory (no copy). Both
the torch reference (indexing those views) and the Triton kernels (one base pointer, a
table of per-plane element offsets and the views' shared strides, see ``PagedPlanes``)
work from them, so a new engine layout is a new ``block_views`` and nothing else.

A token's *slot* is ``block_id * block_size + offset_in_block``, as in vLLM's
``slot_mapping``; SGLang's token-level ``out_cache_loc`` is the same thing with pages of
``page_size`` tokens. ``slots_from_block_table`` turns a block table into slots.

Layouts (``L`` layers, ``H`` KV heads, ``D`` head dim, ``N`` blocks of ``B`` tokens):

===============================  ===========================================================
``VllmFlashLayout`` (NHD)        per layer ``[2, N, B, H, D]`` (vLLM FlashAttention)
``VllmFlashLayout(hnd=True)``    per layer ``[2, N, H, B, D]`` (FlashInfer's HND order)
``VllmMlaLayout``                per layer ``[N, B, latent_dim]`` (one latent plane, no V)
``VllmCpuLayout``                per layer ``[N, H, B, 2 * D]`` (vLLM's CPU attention backend:
                                 per block and head, K stored transposed ``[D, B]`` then V
                                 ``[B, D]``; bf16 on AMX CPUs is packed otherwise and is
                                 not this layout)
``SglangLayerFirstLayout``       K and V per layer, each ``[N * B, H, D]``
                                 (``MHATokenToKVPool.k_buffer`` / ``v_buffer``)
``SglangPageFirstLayout``        one tensor ``[2, N, L, B, H, D]`` (HiCache ``page_first``;
                                 ``B == 1`` is ``[2, slots, L, H, D]``)
===============================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import torch

from kvcache.kvstore.errors import LayoutMismatchError

# What each layout's ``block_views`` takes: a list of per-layer tensors (vLLM), a
# (K list, V list) pair (SGLang layer-first) or one tensor (SGLang page-first).
EngineKV: TypeAlias = (
    torch.Tensor | Sequence[torch.Tensor] | tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]
)


def _check(t: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise LayoutMismatchError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise LayoutMismatchError(f"{what}: expected shape {shape}, got {tuple(t.shape)}")


def _layers(kv: EngineKV, n: int, what: str) -> list[torch.Tensor]:
    if isinstance(kv, torch.Tensor) or len(kv) != n:
        got = "one tensor" if isinstance(kv, torch.Tensor) else f"{len(kv)} tensors"
        raise LayoutMismatchError(f"{what}: expected a sequence of {n} per-layer tensors, "
                                  f"got {got}")
    return list(kv)  # type: ignore[arg-type]


class PageLayout(Protocol):
    """What every engine layout provides (the dataclasses below)."""

    @property
    def num_layers(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    @property
    def num_slots(self) -> int: ...

    @property
    def num_heads(self) -> int:
        """KV heads per token (1 for MLA)."""

    @property
    def head_dim(self) -> int:
        """Elements per head (the latent dim for MLA)."""

    @property
    def has_v(self) -> bool:
        """False for MLA: one latent plane per layer, canonical ``[L, T, latent]``."""

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EngineKV:
        """Zeroed engine tensors of this layout (tests and benchmarks)."""

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        """Per layer, per plane (K, V; MLA: one) views ``[N, B, heads, head_dim]``."""


@dataclass(frozen=True)
class _VllmPages:
    """What vLLM's K/V page layouts share: one tensor per layer, ``N`` blocks of ``B``
    tokens, ``H`` KV heads of ``D`` elements; a subclass gives ``layer_shape`` and
    ``block_views``."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads

    @property
    def has_v(self) -> bool:
        return True

    @property
    def layer_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def block_dim(self) -> int:
        """The dim of a layer's tensor that indexes blocks (copying blocks out whole)."""
        raise NotImplementedError

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EngineKV:
        return [torch.zeros(self.layer_shape, dtype=dtype, device=device)
                for _ in range(self.num_layers)]


@dataclass(frozen=True)
class VllmFlashLayout(_VllmPages):
    """vLLM FlashAttention-style paged cache: per layer ``[2, N, B, H, D]`` (NHD), or
    ``[2, N, H, B, D]`` with ``hnd=True``. K is index 0 of the leading axis."""

    hnd: bool = False

    @property
    def layer_shape(self) -> tuple[int, ...]:
        n, b, h, d = self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim
        return (2, n, h, b, d) if self.hnd else (2, n, b, h, d)

    @property
    def block_dim(self) -> int:
        return 1

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        out = []
        for i, t in enumerate(_layers(kv, self.num_layers, "vLLM kv_caches")):
            _check(t, self.layer_shape, f"vLLM kv_caches[{i}]")
            # HND: swap heads and block offset back; a strided view, not a copy.
            planes = [t[j].transpose(1, 2) if self.hnd else t[j] for j in (0, 1)]
            out.append(planes)
        return out


@dataclass(frozen=True)
class VllmMlaLayout:
    """vLLM MLA paged cache: per layer ``[N, B, latent_dim]`` (compressed KV + rope key)."""

    num_layers: int
    num_blocks: int
    block_size: int
    latent_dim: int

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_heads(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return self.latent_dim

    @property
    def has_v(self) -> bool:
        return False

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.block_size, self.latent_dim)

    @property
    def block_dim(self) -> int:
        return 0

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EngineKV:
        return [torch.zeros(self.layer_shape, dtype=dtype, device=device)
                for _ in range(self.num_layers)]

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        out = []
        for i, t in enumerate(_layers(kv, self.num_layers, "vLLM MLA kv_caches")):
            _check(t, self.layer_shape, f"vLLM MLA kv_caches[{i}]")
            out.append([t.unsqueeze(2)])  # [N, B, 1, latent]
        return out


@dataclass(frozen=True)
class VllmCpuLayout(_VllmPages):
    """vLLM's CPU attention backend (``cpu_attn``, ISAs ``vec``/``vec16``): per layer
    ``[N, H, B, 2 * D]``. Within one (block, head) the first ``B * D`` elements hold K
    transposed (``[D, B]``: element ``d * B + b``), the next ``B * D`` hold V plainly
    (``[B, D]``). Checked against vLLM's own ``cpu_attn_reshape_and_cache`` in
    ``tests/vllm``. The views are strided (K's head_dim is not contiguous), so copies take
    the torch path; the Triton kernels need ``paged_planes(...).uniform``."""

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_kv_heads, self.block_size, 2 * self.head_dim)

    @property
    def block_dim(self) -> int:
        return 0

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        n, h, b, d = self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim
        out = []
        for i, t in enumerate(_layers(kv, self.num_layers, "vLLM CPU kv_caches")):
            _check(t, self.layer_shape, f"vLLM CPU kv_caches[{i}]")
            if not t.is_contiguous():
                raise LayoutMismatchError(f"vLLM CPU kv_caches[{i}] must be contiguous")
            per_block, per_head = h * b * 2 * d, b * 2 * d
            base = t.storage_offset()
            # [N, B, H, D] views: K's element (n, b, h, d) at n*H*B*2D + h*B*2D + d*B + b,
            # V's at the same head's start + B*D + b*D + d.
            k = t.as_strided((n, b, h, d), (per_block, 1, per_head, b), base)
            v = t.as_strided((n, b, h, d), (per_block, d, per_head, 1), base + b * d)
            out.append([k, v])
        return out


@dataclass(frozen=True)
class _SglangPages:
    """What both SGLang pools share: ``num_pages`` pages of ``page_size`` token slots."""

    num_layers: int
    num_pages: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 1

    @property
    def block_size(self) -> int:
        return self.page_size

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads

    @property
    def has_v(self) -> bool:
        return True


@dataclass(frozen=True)
class SglangLayerFirstLayout(_SglangPages):
    """SGLang ``MHATokenToKVPool``: per layer a K and a V buffer, each ``[N * B, H, D]``
    indexed by token slot; ``page_size`` (``B``) only groups slots into pages.
    Engine KV: ``(k_buffers, v_buffers)``, two sequences of ``num_layers`` tensors."""

    @property
    def buffer_shape(self) -> tuple[int, ...]:
        return (self.num_slots, self.num_kv_heads, self.head_dim)

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EngineKV:
        def one() -> list[torch.Tensor]:
            return [torch.zeros(self.buffer_shape, dtype=dtype, device=device)
                    for _ in range(self.num_layers)]
        return (one(), one())

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        if isinstance(kv, torch.Tensor) or len(kv) != 2:
            raise LayoutMismatchError("SGLang layer-first KV is a (k_buffers, v_buffers) pair")
        ks = _layers(kv[0], self.num_layers, "SGLang k_buffer")
        vs = _layers(kv[1], self.num_layers, "SGLang v_buffer")
        out = []
        for i, (k, v) in enumerate(zip(ks, vs, strict=True)):
            _check(k, self.buffer_shape, f"SGLang k_buffer[{i}]")
            _check(v, self.buffer_shape, f"SGLang v_buffer[{i}]")
            shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
            out.append([k.view(shape), v.view(shape)])
        return out


@dataclass(frozen=True)
class SglangPageFirstLayout(_SglangPages):
    """SGLang HiCache page-first host pool: one tensor ``[2, N, L, B, H, D]`` so that a
    page's KV for every layer is contiguous (``B == 1``: ``[2, slots, L, H, D]``)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, self.num_pages, self.num_layers, self.page_size, self.num_kv_heads,
                self.head_dim)

    def allocate(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> EngineKV:
        return torch.zeros(self.shape, dtype=dtype, device=device)

    def block_views(self, kv: EngineKV) -> list[list[torch.Tensor]]:
        if not isinstance(kv, torch.Tensor):
            raise LayoutMismatchError("SGLang page-first KV is one tensor [2, N, L, B, H, D]")
        _check(kv, self.shape, "SGLang page-first KV")
        return [[kv[j, :, i] for j in (0, 1)] for i in range(self.num_layers)]


# -- what the kernels see ---------------------------------------------------------------
@dataclass(frozen=True)
class PagedPlanes:
    """Every (layer, plane) of an engine cache as one base tensor plus element offsets.

    ``base``: the first plane's view; ``plane_offsets``: int64 ``[layers * planes]``,
    the element offset of each plane's first element from ``base``'s (planes of one
    layer adjacent); ``strides``: ``(block, offset_in_block, head)`` element strides
    shared by every plane (head_dim is contiguous). ``views`` keeps the block views
    ``[layers][planes]`` of ``[N, B, heads, head_dim]`` for the torch reference.
    ``uniform``: the planes share one stride set with a contiguous head_dim, which the
    Triton kernels need (False for vLLM's CPU layout: those copies take the torch path,
    and ``plane_offsets``/``strides`` are not meaningful).
    """

    views: list[list[torch.Tensor]]
    base: torch.Tensor
    plane_offsets: torch.Tensor
    strides: tuple[int, int, int]
    num_layers: int
    num_planes: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_dim: int
    uniform: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def paged_planes(layout: PageLayout, kv: EngineKV) -> PagedPlanes:
    """Validate ``kv`` against ``layout`` and describe it for the kernels.

    Raises ``LayoutMismatchError`` when a tensor has the wrong shape, the planes differ in
    dtype, device or strides, or head_dim is not contiguous (layouts whose planes are
    strided by design, ``VllmCpuLayout``, are described with ``uniform=False``).
    """
    views = layout.block_views(kv)
    if isinstance(layout, VllmCpuLayout):
        first = views[0][0]
        n, b, h, d = first.shape
        return PagedPlanes(views=views, base=first,
                           plane_offsets=torch.zeros(0, dtype=torch.int64),
                           strides=(0, 0, 0), num_layers=len(views), num_planes=2,
                           num_blocks=int(n), block_size=int(b), num_heads=int(h),
                           head_dim=int(d), uniform=False)
    first = views[0][0]
    itemsize = first.element_size()
    strides = tuple(first.stride())
    offsets = []
    for i, planes in enumerate(views):
        for j, v in enumerate(planes):
            if v.dtype != first.dtype or v.device != first.device:
                raise LayoutMismatchError(
                    f"layer {i} plane {j} is {v.dtype} on {v.device}, layer 0 is "
                    f"{first.dtype} on {first.device}: every layer must match")
            if tuple(v.stride()) != strides:
                raise LayoutMismatchError(
                    f"layer {i} plane {j} has strides {tuple(v.stride())}, layer 0 has "
                    f"{strides}: the kernels need one stride set for all layers")
            delta = v.data_ptr() - first.data_ptr()
            if delta % itemsize:
                raise LayoutMismatchError(f"layer {i} plane {j} is not {itemsize}-byte aligned")
            offsets.append(delta // itemsize)
    if strides[3] != 1:
        raise LayoutMismatchError(f"head_dim must be contiguous (stride 1), got {strides[3]}")
    n, b, h, d = first.shape
    return PagedPlanes(
        views=views,
        base=first,
        plane_offsets=torch.tensor(offsets, dtype=torch.int64, device=first.device),
        strides=(int(strides[0]), int(strides[1]), int(strides[2])),
        num_layers=len(views),
        num_planes=len(views[0]),
        num_blocks=int(n),
        block_size=int(b),
        num_heads=int(h),
        head_dim=int(d),
    )


# -- slot mappings -----------------------------------------------------------------------
def slots_from_block_table(
    block_table: torch.Tensor | Sequence[int], block_size: int, start: int, num_tokens: int
) -> torch.Tensor:
    """Slots of tokens ``[start, start + num_tokens)`` of one sequence.

    block_table: ``[num_seq_blocks]`` block ids, the i-th holding the sequence's tokens
    ``[i * block_size, (i + 1) * block_size)``. Returns int64 ``[num_tokens]`` slots
    ``block_table[t // block_size] * block_size + t % block_size``.
    """
    table = torch.as_tensor(block_table, dtype=torch.int64)
    if start < 0 or num_tokens < 0:
        raise ValueError(f"start and num_tokens must be >= 0, got {start}, {num_tokens}")
    end = start + num_tokens
    if end > table.numel() * block_size:
        raise ValueError(
            f"tokens up to {end} need {-(-end // block_size)} blocks; the block table has "
            f"{table.numel()}")
    t = torch.arange(start, end, dtype=torch.int64, device=table.device)
    return table[t // block_size] * block_size + t % block_size


def check_slots(slots: torch.Tensor, num_slots: int, *, allow_padding: bool) -> None:
    """Raise ``ValueError`` unless ``slots`` is int32/int64 ``[T]`` within ``[0, num_slots)``
    (``-1`` padding allowed when ``allow_padding``). Reads values: host tensors only."""
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot mapping must be int32/int64 [T], got {slots.dtype} "
                         f"{tuple(slots.shape)}")
    if slots.numel() == 0 or slots.is_cuda:
        return  # checking CUDA values would synchronize the stream
    lo, hi = int(slots.min()), int(slots.max())
    if hi >= num_slots or lo < (-1 if allow_padding else 0):
        raise ValueError(f"slots must lie in [0, {num_slots})"
                         + (" or be -1 (padding)" if allow_padding else "")
                         + f", got range [{lo}, {hi}]")
