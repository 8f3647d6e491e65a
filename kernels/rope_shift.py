"""RoPE shift of cached keys: from the positions they were rotated at to new positions.

RoPE rotates each pair of a key's rotary dims by ``position * inv_freq[pair]``; rotations
compose, so a key cached at ``p_old`` becomes the key at ``p_new`` by one more rotation of
``(p_new - p_old) * inv_freq`` — no need to keep pre-RoPE keys. This is what lets a chunk
cached at one offset be reused at another (blending, non-prefix reuse).

Pairing follows ``RopeSpec.style``: NeoX rotates ``(j, j + rot/2)``, GPT-J ``(2j, 2j + 1)``;
dims past ``rotary_dim`` are left as they are. Math is fp32; keys may be fp16/bf16/fp32.

Scaled RoPE: ``linear`` scaling divides ``inv_freq`` by the factor; ``llama3`` (Llama 3.1+)
is computed when the spec carries its three parameters; other schemes (yarn, ...) need the
model's own ``inv_freq`` (e.g. ``model.model.rotary_emb.inv_freq``), passed as
``inv_freq=``. Yarn's attention factor scales cos and sin together in the model;
a shift is a pure rotation and must not apply it again, which this module never does.
"""

from __future__ import annotations

import math

import torch

from kvcache.kernels.dispatch import Impl, interpreting, next_pow2, use_triton
from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.layout import RopeSpec, RopeStyle

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rotary_dim_of(rope: RopeSpec, head_dim: int) -> int:
    rot = head_dim if rope.rotary_dim is None else rope.rotary_dim
    if rot > head_dim or rot % 2:
        raise LayoutMismatchError(f"rotary_dim {rot} must be even and <= head_dim {head_dim}")
    return rot


def rope_inv_freq(
    rope: RopeSpec, head_dim: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """fp32 ``[rotary_dim // 2]``: ``theta ** (-2j / rotary_dim)`` (``/ factor`` for linear
    scaling). Raises ``LayoutMismatchError`` for schemes whose frequencies need more than
    ``RopeSpec`` records; pass the model's ``inv_freq`` to the shift instead."""
    rot = rotary_dim_of(rope, head_dim)
    llama3 = rope.llama3_params if rope.scaling_type == "llama3" else None
    if rope.scaling_type not in (None, "default", "linear") and llama3 is None:
        raise LayoutMismatchError(
            f"RoPE scaling {rope.scaling_type!r} needs the model's own frequencies: pass "
            "inv_freq=model.model.rotary_emb.inv_freq (fp32 [rotary_dim // 2])")
    # Computed in fp64 then rounded once, as close to the exact frequencies as fp32 allows.
    j = torch.arange(0, rot, 2, dtype=torch.float64)
    inv = 1.0 / (rope.theta ** (j / rot))
    if rope.scaling_type == "linear":
        inv = inv / rope.scaling_factor
    if llama3 is not None:
        inv = _llama3_scaled(inv, rope.scaling_factor, *llama3)
    return inv.to(torch.float32).to(device)


def _llama3_scaled(
    inv: torch.Tensor, factor: float, low: float, high: float, original: int
) -> torch.Tensor:
    """Llama 3.1's frequency scaling (as transformers' ``_compute_llama3_parameters``):
    wavelengths past ``original / low`` slow down by ``factor``, those under
    ``original / high`` stay, the ones between blend linearly in ``original / wavelen``."""
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def _positions(p: torch.Tensor | int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """int64 ``[num_tokens]``; an int ``p`` means ``p, p + 1, ...``."""
    if isinstance(p, int):
        return torch.arange(p, p + num_tokens, dtype=torch.int64, device=device)
    if p.shape != (num_tokens,):
        raise ValueError(f"positions must be [{num_tokens}], got {tuple(p.shape)}")
    return p.to(device=device, dtype=torch.int64)


def _pairs(rope: RopeSpec, rot: int) -> tuple[torch.Tensor, torch.Tensor]:
    j = torch.arange(rot // 2)
    if rope.style is RopeStyle.NEOX:
        return j, j + rot // 2
    return 2 * j, 2 * j + 1


def _rotate(x: torch.Tensor, angle: torch.Tensor, rope: RopeSpec, rot: int) -> torch.Tensor:
    """x: ``[..., T, H, D]``; angle: ``[T, rot/2]`` fp32/64. Returns x rotated, x's dtype."""
    math = torch.float64 if angle.dtype == torch.float64 else torch.float32
    return rotate_cos_sin(x.to(math), angle.cos(), angle.sin(), rope.style, rot).to(x.dtype)


def rotate_cos_sin(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RopeStyle, rot: int
) -> torch.Tensor:
    """x: ``[..., T, H, D]``; cos, sin: ``[T, rot/2]`` of x's dtype (``-sin`` rotates
    back). Returns a new tensor: each pair ``(a, b)`` -> ``(a cos - b sin, b cos + a sin)``,
    dims past ``rot`` copied."""
    i1, i2 = _pairs(RopeSpec(style=style), rot)
    i1, i2 = i1.to(x.device), i2.to(x.device)
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, rot/2]
    x1, x2 = x[..., i1], x[..., i2]
    out = x.clone()
    out[..., i1] = x1 * c - x2 * s
    out[..., i2] = x2 * c + x1 * s
    return out


def rope_cos_sin(
    rope: RopeSpec, head_dim: int, start: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` ``[num_tokens, rotary_dim // 2]`` of the angles RoPE turns
    positions ``start, start + 1, ...`` by. Angles are formed in fp64 (an fp32 product
    loses ~0.01 rad at position 1e5), then rounded once. Raises ``LayoutMismatchError``
    where ``rope_inv_freq`` does."""
    freq = rope_inv_freq(rope, head_dim).double()
    pos = torch.arange(start, start + num_tokens, dtype=torch.float64)
    angle = pos[:, None] * freq[None, :]
    return angle.cos().float(), angle.sin().float()


def rope_reference(
    x: torch.Tensor,
    positions: torch.Tensor | int,
    rope: RopeSpec,
    *,
    inv_freq: torch.Tensor | None = None,
    math_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """RoPE from scratch (what a model does to fresh keys). x: ``[..., T, H, D]``;
    positions: int ``[T]`` or a start. ``math_dtype=float64`` gives an exact-as-possible
    reference for tests. Returns a new tensor of x's dtype."""
    rot = rotary_dim_of(rope, x.shape[-1])
    freq = rope_inv_freq(rope, x.shape[-1], x.device) if inv_freq is None else inv_freq
    p = _positions(positions, x.shape[-3], x.device)
    angle = p.to(math_dtype)[:, None] * freq.to(device=x.device, dtype=math_dtype)[None, :]
    return _rotate(x, angle, rope, rot)


def rope_shift_reference(
    keys: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    rope: RopeSpec,
    inv_freq: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch shift. keys: ``[..., T, H, D]``; positions: int64 ``[T]``;
    inv_freq: fp32 ``[rot/2]``. Returns a new tensor of keys' dtype."""
    rot = rotary_dim_of(rope, keys.shape[-1])
    delta = (new_positions - old_positions).to(keys.device).to(torch.float32)
    angle = delta[:, None] * inv_freq.to(device=keys.device, dtype=torch.float32)[None, :]
    return _rotate(keys, angle, rope, rot)


def _launch(
    keys: torch.Tensor, out: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
    inv_freq: torch.Tensor, rope: RopeSpec, rot: int,
) -> None:
    from kvcache.kernels._triton.rope_shift import rope_shift_kernel

    layers, tokens, heads, _ = keys.shape
    block_hp = next_pow2(heads * rot // 2)
    budget = 65536 if interpreting() and keys.device.type != "cuda" else 4096
    block_t = min(next_pow2(tokens), max(1, budget // block_hp))
    grid = (-(-tokens // block_t), layers)
    rope_shift_kernel[grid](
        keys, out, old, new, inv_freq, tokens,
        keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        NUM_HEADS=heads, ROT_DIM=rot, IS_NEOX=rope.style is RopeStyle.NEOX,
        BLOCK_T=block_t, BLOCK_HP=block_hp, num_warps=4,
    )


def rope_shift(
    keys: torch.Tensor,
    old_positions: torch.Tensor | int,
    new_positions: torch.Tensor | int,
    rope: RopeSpec,
    *,
    inv_freq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Rotate keys cached at ``old_positions`` to ``new_positions``.

    keys: ``[tokens, kv_heads, head_dim]`` or ``[layers, tokens, kv_heads, head_dim]``
    (e.g. ``chunk[:, 0]`` of a canonical chunk), fp16/bf16/fp32, head_dim contiguous;
    positions: int ``[tokens]`` or an int start (``start, start + 1, ...``);
    inv_freq: fp32 ``[rotary_dim // 2]`` (default: from ``rope``); out: like keys, may be
    ``keys`` itself (in place); allocated when None. Returns ``out``.
    """
    if keys.dim() not in (3, 4) or keys.dtype not in _DTYPES:
        raise LayoutMismatchError(
            f"keys must be [T, H, D] or [L, T, H, D] of {_DTYPES}, got {keys.dtype} "
            f"{tuple(keys.shape)}")
    if keys.stride(-1) != 1:
        raise LayoutMismatchError("keys' head_dim must be contiguous")
    rot = rotary_dim_of(rope, keys.shape[-1])
    tokens = keys.shape[-3]
    old = _positions(old_positions, tokens, keys.device)
    new = _positions(new_positions, tokens, keys.device)
    freq = rope_inv_freq(rope, keys.shape[-1], keys.device) if inv_freq is None else inv_freq
    freq = freq.to(device=keys.device, dtype=torch.float32).contiguous()
    if freq.shape != (rot // 2,):
        raise LayoutMismatchError(f"inv_freq must be [{rot // 2}], got {tuple(freq.shape)}")
    if out is None:
        out = torch.empty_like(keys)
    if out.shape != keys.shape or out.dtype != keys.dtype or out.stride(-1) != 1:
        raise LayoutMismatchError("out must have keys' shape and dtype, head_dim contiguous")
    if not use_triton(impl, keys.device):
        out.copy_(rope_shift_reference(keys, old, new, rope, freq))
        return out
    if tokens == 0:
        return out
    if rot < keys.shape[-1] and out.data_ptr() != keys.data_ptr():
        out[..., rot:] = keys[..., rot:]  # the kernel touches rotary dims only
    k4, o4 = (keys, out) if keys.dim() == 4 else (keys.unsqueeze(0), out.unsqueeze(0))
    _launch(k4, o4, old, new, freq, rope, rot)
    return out
