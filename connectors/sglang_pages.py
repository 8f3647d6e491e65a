"""SGLang's host KV pool as kvcache reads it: one page's tokens as a canonical chunk view.

SGLang's HiCache keeps KV in a host pool (``kv_buffer``) whose axes depend on its
``--hicache-mem-layout``. Pages start at token slots that are multiples of the page size;
a page's slots are consecutive. The shapes below are those of SGLang 0.5.23's host pools
(``sglang/srt/mem_cache/pool_host/mha.py``, ``MHATokenToKVPoolHost.init_kv_buffer``,
lines 305-318, and ``get_data_page`` / ``set_from_flat_data_page``, lines 713-767;
``pool_host/mla.py``, ``MLATokenToKVPoolHost.init_kv_buffer``, lines 307-329), where
``size`` is the pool's token slots and ``L`` its layers:

=====================  ================================  ==============================
layout                 MHA ``kv_buffer``                 MLA ``kv_buffer``
=====================  ================================  ==============================
``layer_first``        ``[2, L, size, H, D]``            ``[L, size, 1, latent]``
``page_first``         ``[2, size, L, H, D]``            ``[size, L, 1, latent]``
``page_first_direct``  ``[2, size/P, L, P, H, D]``       ``[size/P, L, P, 1, latent]``
=====================  ================================  ==============================

``page(start)`` is the slice SGLang's ``get_data_page(start, flat=False)`` returns (its
flattened form is the "flat data page" of SGLang's non-zero-copy calls), and
``canonical(page)`` a view of it in kvcache's chunk order, ``[L, 2, P, H, D]`` (MLA
``[L, P, latent]``): copying into or out of that view moves a page in one strided copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from kvcache.kvstore.errors import LayoutMismatchError

HOST_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@dataclass(frozen=True)
class HostPages:
    """kv_buffer: the host pool's tensor (shapes in the module docstring); layout: its
    ``--hicache-mem-layout``; page_size: tokens per page; is_mla: one latent vector per
    token and layer (no K/V planes, no heads)."""

    kv_buffer: torch.Tensor
    layout: str
    page_size: int
    is_mla: bool

    def __post_init__(self) -> None:
        if self.layout not in HOST_LAYOUTS:
            raise LayoutMismatchError(
                f"kvcache reads SGLang host pools of layouts {', '.join(HOST_LAYOUTS)}, not "
                f"{self.layout!r}; run SGLang with --hicache-mem-layout page_first (or "
                "layer_first, page_first_direct)")
        if self.page_size <= 0:
            raise LayoutMismatchError(f"page_size must be > 0, got {self.page_size}")
        dims = 5 if self.is_mla else 6
        if self.layout != "page_first_direct":
            dims -= 1
        if self.kv_buffer.dim() != dims:
            kind = "MLA" if self.is_mla else "MHA"
            raise LayoutMismatchError(
                f"an SGLang {kind} host pool of layout {self.layout} has {dims} dims, this "
                f"kv_buffer {tuple(self.kv_buffer.shape)}")
        if not self.is_mla and self.kv_buffer.shape[0] != 2:
            raise LayoutMismatchError(
                f"an MHA host pool holds K and V along dim 0, got {tuple(self.kv_buffer.shape)}")
        if self.layout == "page_first_direct":
            p = self.kv_buffer.shape[3] if not self.is_mla else self.kv_buffer.shape[2]
            if p != self.page_size:
                raise LayoutMismatchError(
                    f"page_first_direct pool of {p}-token pages, not {self.page_size}")

    @classmethod
    def allocate(cls, layout: str, *, is_mla: bool, num_pages: int, page_size: int,
                 num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype
                 ) -> HostPages:
        """A zeroed pool of ``num_pages`` pages shaped as SGLang shapes it."""
        slots, L, P, H, D = num_pages * page_size, num_layers, page_size, num_heads, head_dim
        if is_mla:
            dims = {"layer_first": (L, slots, 1, D), "page_first": (slots, L, 1, D),
                    "page_first_direct": (num_pages, L, P, 1, D)}
        else:
            dims = {"layer_first": (2, L, slots, H, D), "page_first": (2, slots, L, H, D),
                    "page_first_direct": (2, num_pages, L, P, H, D)}
        if layout not in dims:
            raise LayoutMismatchError(f"unknown SGLang host layout {layout!r}")
        return cls(torch.zeros(dims[layout], dtype=dtype), layout, page_size, is_mla)

    # -- geometry --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        s = self.kv_buffer.shape
        if self.is_mla:
            return s[1] if self.layout != "layer_first" else s[0]
        return s[1] if self.layout == "layer_first" else s[2]

    @property
    def num_heads(self) -> int:
        """KV heads (1 for MLA)."""
        return 1 if self.is_mla else self.kv_buffer.shape[-2]

    @property
    def head_dim(self) -> int:
        """Elements per token, layer and head (MLA: the latent width)."""
        return self.kv_buffer.shape[-1]

    @property
    def num_slots(self) -> int:
        """Token slots in the pool."""
        s = self.kv_buffer.shape
        if self.layout == "page_first_direct":
            return (s[1] if not self.is_mla else s[0]) * self.page_size
        if self.is_mla:
            return s[1] if self.layout == "layer_first" else s[0]
        return s[2] if self.layout == "layer_first" else s[1]

    @cached_property
    def page_shape(self) -> tuple[int, ...]:
        """The shape of ``page(start)``: SGLang's flat data page unflattened."""
        L, P, H, D = self.num_layers, self.page_size, self.num_heads, self.head_dim
        if self.is_mla:
            return {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D),
                    "page_first_direct": (1, L, P, 1, D)}[self.layout]
        return {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                "page_first_direct": (2, 1, L, P, H, D)}[self.layout]

    @cached_property
    def page_bytes(self) -> int:
        n = 1
        for d in self.page_shape:
            n *= d
        return n * self.kv_buffer.element_size()

    # -- views -----------------------------------------------------------------------------
    def _check_start(self, start: int) -> None:
        P = self.page_size
        if start % P or not 0 <= start <= self.num_slots - P:
            raise LayoutMismatchError(
                f"token slot {start} does not start a page of {P} slots in a pool of "
                f"{self.num_slots}")

    def page(self, start: int) -> torch.Tensor:
        """The host-order view of the page whose first token slot is ``start``."""
        self._check_start(start)
        P = self.page_size
        kv = self.kv_buffer
        if self.layout == "page_first_direct":
            return kv[start // P : start // P + 1] if self.is_mla else \
                kv[:, start // P : start // P + 1]
        if self.is_mla:
            return kv[:, start : start + P] if self.layout == "layer_first" else \
                kv[start : start + P]
        return kv[:, :, start : start + P] if self.layout == "layer_first" else \
            kv[:, start : start + P]

    def canonical(self, page: torch.Tensor) -> torch.Tensor:
        """``page`` (of ``page_shape``) viewed as a kvcache chunk: ``[L, 2, P, H, D]``, MLA
        ``[L, P, latent]``. A view: writing into it writes the page."""
        if tuple(page.shape) != self.page_shape:
            raise LayoutMismatchError(
                f"an SGLang {self.layout} page is {self.page_shape}, got {tuple(page.shape)}")
        if self.is_mla:
            if self.layout == "layer_first":
                return page[:, :, 0]
            if self.layout == "page_first":
                return page[:, :, 0].transpose(0, 1)
            return page[0, :, :, 0]
        if self.layout == "layer_first":
            return page.transpose(0, 1)
        if self.layout == "page_first":
            return page.permute(2, 0, 1, 3, 4)
        return page[:, 0].transpose(0, 1)

    def chunk_view(self, start: int) -> torch.Tensor:
        """``canonical(page(start))``, made in one step: a batch asks for 128 of them."""
        self._check_start(start)
        shape, stride, first, step = self._chunk_geometry
        return self.kv_buffer.as_strided(shape, stride,
                                         first + start // self.page_size * step)

    @cached_property
    def _chunk_geometry(self) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
        """The first page's canonical view (shape, strides, offset) and how many elements
        further on each next page's starts: a page's place is linear in its first slot."""
        first = self.canonical(self.page(0))
        offset, step = int(first.storage_offset()), 0
        if self.num_slots >= 2 * self.page_size:
            step = int(self.canonical(self.page(self.page_size)).storage_offset()) - offset
        return tuple(first.shape), first.stride(), offset, step

    def flat_view(self, flat: torch.Tensor) -> torch.Tensor:
        """SGLang's flat data page (1-D, contiguous) as a canonical chunk view."""
        if flat.dim() != 1 or flat.numel() * flat.element_size() != self.page_bytes:
            raise LayoutMismatchError(
                f"a flat SGLang page is 1-D with {self.page_bytes} bytes, got "
                f"{tuple(flat.shape)} of {flat.dtype}")
        return self.canonical(flat.view(self.kv_buffer.dtype).view(self.page_shape))
