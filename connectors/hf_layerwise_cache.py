"""``LayerwiseCache``: a ``DynamicCache`` whose reused prefix arrives layer by layer.

The model's forward pass calls ``update(k, v, layer_idx)`` once per attention layer, in
order. This cache fills layer ``i``'s prefix from a ``LayerLoader`` only at that moment, so
the loader keeps loading (and decoding) layer ``i + 1`` while the model computes layer
``i`` — the pipelined load of CacheGen/LMCache, with transformers' own forward pass.

Layer 0 is filled up front: transformers sizes its attention masks from layer 0's length
before the first layer runs.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from kvcache.kvstore.layer_loader import LayerLoader


class LayerwiseCache(DynamicCache):
    """Prefix of ``reuse`` tokens served by ``loader``; layers ``[1, kv_heads, T, head_dim]``.

    A failed layer load raises ``LayerLoadError`` out of the forward pass: the caller
    recomputes the request rather than attend to a half-loaded prefix.
    """

    def __init__(self, config: Any, loader: LayerLoader, reuse: int) -> None:
        super().__init__(config=config)
        self._loader = loader
        self._reuse = reuse
        self._filled = [False] * loader.layout.num_layers
        self._fill(0)

    def _fill(self, layer_idx: int) -> None:
        kv = self._loader.wait_for_layer(layer_idx)[:, : self._reuse]  # [2, P, H, D]
        k, v = kv.permute(0, 2, 1, 3).unsqueeze(1)  # each [1, kv_heads, P, head_dim]
        # The first update of a layer copies out of the loader's buffer (freed when the
        # loader closes), so the cache owns its bytes afterwards.
        super().update(k, v, layer_idx)
        self._filled[layer_idx] = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx < len(self._filled) and not self._filled[layer_idx]:
            self._fill(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def fully_loaded(self) -> bool:
        return all(self._filled)

    def fill_all(self) -> None:
        """Load every layer not filled yet (e.g. before using the cache outside a forward)."""
        for i, done in enumerate(self._filled):
            if not done:
                self._fill(i)
