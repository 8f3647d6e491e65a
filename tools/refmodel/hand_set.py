"""The cached K/V planes of the reference model that its copy circuit sets by hand.

``copy_circuit.install_copy_circuit`` writes every row of the K and V projections of KV
head 0 in layers 0 and 1 (and holds them fixed while the rest trains), so those four
cached planes are functions the circuit chose, not learned ones:

- layer 0, KV head 0, **K**: one constant vector (from the constant "bias" dimension),
  rotated by RoPE — before RoPE, the same vector at every position;
- layer 0, KV head 0, **V**: the token's fixed random 28-dim code;
- layer 1, KV head 0, **K**: the previous three tokens' codes on the slowest RoPE pairs
  (the induction head's keys);
- layer 1, KV head 0, **V**: the token's code again.

They are far more fragile than trained heads (docs/reference-model.md), and a codec that
happens to store the first one exactly (pre-RoPE coding: a constant per channel) gains on
them more than on any real model. So codec fidelity is also reported with these planes
kept exact (``keep_planes_exact``) and only the trained planes coded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig

    from kvcache.tools.refmodel.copy_circuit import CopyCircuit

K, V = 0, 1
# (layer, 0 = K / 1 = V, KV head)
HAND_SET_KV_PLANES: tuple[tuple[int, int, int], ...] = ((0, K, 0), (0, V, 0), (1, K, 0), (1, V, 0))


def hand_set_planes(circuit: CopyCircuit, config: LlamaConfig) -> list[tuple[int, int, int]]:
    """The ``(layer, kv, head)`` planes whose projection rows the circuit sets in full."""
    hd = int(config.head_dim or config.hidden_size // config.num_attention_heads)
    out = []
    for layer in range(int(config.num_hidden_layers)):
        for kv, proj in ((K, "k_proj"), (V, "v_proj")):
            mask = circuit.masks.get(f"model.layers.{layer}.self_attn.{proj}.weight")
            if mask is None:
                continue
            for head in range(int(config.num_key_value_heads or config.num_attention_heads)):
                if bool(mask[head * hd : (head + 1) * hd].all()):
                    out.append((layer, kv, head))
    return out


def keep_planes_exact(
    candidate: torch.Tensor,
    exact: torch.Tensor,
    planes: tuple[tuple[int, int, int], ...] = HAND_SET_KV_PLANES,
) -> torch.Tensor:
    """A copy of ``candidate`` with ``planes`` taken from ``exact``; both
    ``[layers, 2, T, kv_heads, head_dim]``."""
    if candidate.shape != exact.shape:
        raise ValueError(
            f"candidate KV {tuple(candidate.shape)} does not match exact {tuple(exact.shape)}"
        )
    out = candidate.clone()
    for layer, kv, head in planes:
        out[layer, kv, :, head] = exact[layer, kv, :, head].to(out.dtype)
    return out
