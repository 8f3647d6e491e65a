"""SGLang host KV pools as SGLang 0.5.23 shapes them, for the backend's tests.

SGLang's own host pool classes (``sglang.srt.mem_cache.pool_host``) cannot be built here:
they import a CUDA torchvision through SGLang's model configs, and want device K/V buffers.
What the backend reads of them is their ``kv_buffer``, ``layout``, ``page_size`` and
``dtype``; ``HostPool`` allocates ``kv_buffer`` exactly as they do:

- MHA, ``pool_host/mha.py`` ``MHATokenToKVPoolHost.init_kv_buffer`` (lines 305-318):
  layer_first ``(2, layer_num, size, head_num, head_dim)``, page_first
  ``(2, size, layer_num, head_num, head_dim)``, page_first_direct
  ``(2, page_num, layer_num, page_size, head_num, head_dim)``;
- MLA, ``pool_host/mla.py`` ``MLATokenToKVPoolHost.init_kv_buffer`` (lines 307-329):
  layer_first ``(layer_num, size, 1, kv_cache_dim)``, page_first
  ``(size, layer_num, 1, kv_cache_dim)``, page_first_direct
  ``(page_num, layer_num, page_size, 1, kv_cache_dim)``;

and ``get_data_page`` follows ``MHATokenToKVPoolHost.get_data_page`` (mha.py lines
713-725) and its MLA counterpart (mla.py ``get_data_page``).
"""

from __future__ import annotations

import torch

LAYOUTS = ("layer_first", "page_first", "page_first_direct")


class HostPool:
    def __init__(self, layout: str, *, mla: bool = False, pages: int = 16, page_size: int = 4,
                 layers: int = 2, heads: int = 2, head_dim: int = 8,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        self.layout, self.page_size, self.dtype = layout, page_size, dtype
        self.size, self.page_num, self.layer_num = pages * page_size, pages, layers
        if mla:
            dims = {"layer_first": (layers, self.size, 1, head_dim),
                    "page_first": (self.size, layers, 1, head_dim),
                    "page_first_direct": (pages, layers, page_size, 1, head_dim)}[layout]
        else:
            dims = {"layer_first": (2, layers, self.size, heads, head_dim),
                    "page_first": (2, self.size, layers, heads, head_dim),
                    "page_first_direct": (2, pages, layers, page_size, heads, head_dim)}[layout]
        g = torch.Generator().manual_seed(seed)
        self.kv_buffer = torch.randn(dims, generator=g).to(dtype)
        self.mla = mla

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        P, kv = self.page_size, self.kv_buffer
        first = self.layout == "layer_first"
        if self.layout == "page_first_direct":
            n = index // P
            page = kv[n : n + 1] if self.mla else kv[:, n : n + 1]
        elif self.mla:
            page = kv[:, index : index + P] if first else kv[index : index + P]
        else:
            page = kv[:, :, index : index + P] if self.layout == "layer_first" else \
                kv[:, index : index + P]
        return page.flatten() if flat else page

    def slots(self, pages: list[int]) -> torch.Tensor:
        """The token slots of ``pages`` (page numbers), as SGLang's host_indices."""
        P = self.page_size
        return torch.tensor([p * P + t for p in pages for t in range(P)], dtype=torch.int64)

    def token(self, slot: int) -> torch.Tensor:
        """Every layer's K and V (MLA: latent) of one token slot, in a fixed order."""
        kv, P = self.kv_buffer, self.page_size
        if self.layout == "page_first_direct":
            return kv[slot // P, :, slot % P] if self.mla else kv[:, slot // P, :, slot % P]
        if self.mla:
            return kv[:, slot] if self.layout == "layer_first" else kv[slot]
        return kv[:, :, slot] if self.layout == "layer_first" else kv[:, slot]
