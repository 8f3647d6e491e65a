"""NaN, ±inf, overflowing values and denormals through every registered codec.

For every codec name x fp16/bf16/fp32 x {one NaN, one +inf, one -inf, a mix, denormals, a
whole group non-finite}: the codec either refuses the chunk with ``UnencodableChunkError``
(none does for these sparse cases: ``REFUSES`` is empty) or its object decodes to NaN
exactly where NaN was and ±inf exactly where ±inf was (bit for bit, NaN payloads too), to
the exact value of a finite value beyond the codec's range, and to the other elements with
an error no worse than the same codec's on the chunk before the bad values were put in:
mean absolute error within ``MEAN_FACTOR`` and maximum within ``MAX_FACTOR`` of it, on the
same elements. Denormals come back within the codec's normal error (at most
``MAX_FACTOR`` times its largest error on the original chunk, plus the dtype's smallest
normal); lossless codecs give back every bit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

import pytest
import torch

from kvcache.codecs import fp8, quant
from kvcache.codecs.cachegen import CacheGenCodec
from kvcache.codecs.registry import codec_names, get_codec
from kvcache.kvstore.errors import (
    CorruptObjectError,
    LayoutMismatchError,
    UnencodableChunkError,
)
from kvcache.kvstore.layout import KVLayout, RopeSpec
from kvcache.tools.synthetic_kv import synthetic_kv

T = 20
DTYPES = ("float16", "bfloat16", "float32")
# Measured worst over every codec, dtype, case and 10 random seeds when written: 1.097
# (mean; quant-int2 when 1/8 of the values become denormals, i.e. ~0, which changes their
# groups) and 1.01 (max). The bugs these catch were 16x and NaN.
MEAN_FACTOR = 1.15
MAX_FACTOR = 1.25
REFUSES: set[str] = set()  # codecs that refuse chunks with a few non-finite values
# cachegen's other levels run the same code with other steps: slow (all 21 names ~2x time)
NAMES = [pytest.param(n, marks=pytest.mark.slow) if re.fullmatch(r"cachegen(-rans)?-\d", n)
         else n for n in codec_names()]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@cache
def _layout(dtype: str) -> KVLayout:
    # RoPE known: cachegen codes keys before it (the rotation must not smear an inf)
    return KVLayout("nonfinite", num_layers=2, num_kv_heads=2, head_dim=32, dtype=dtype,
                    rope=RopeSpec())


@cache
def _base(dtype: str) -> torch.Tensor:
    return synthetic_kv(_layout(dtype), T)


@cache
def _base_error(name: str, dtype: str) -> torch.Tensor:
    """|decoded - chunk| of the original chunk, fp32 ``[L, 2, T, H, D]``."""
    layout, chunk = _layout(dtype), _base(dtype)
    codec = get_codec(name)
    out = codec.decode(*codec.encode(chunk, layout, rope_start=3), layout, T)
    return (out.float() - chunk.float()).abs()


def _nan_with_payload(dtype: torch.dtype) -> torch.Tensor:
    """A quiet NaN that is not the default one: its bits must survive too."""
    bits = {torch.float16: 0x7E15, torch.bfloat16: 0x7FC5, torch.float32: 0x7FC01234}[dtype]
    return torch.tensor([bits], dtype=_BITS[dtype]).view(dtype)[0]


def _denormals(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).tiny
    mag = (0.05 + 0.9 * torch.rand(n, generator=g)) * tiny
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    out = (mag * sign).to(dtype)
    assert bool((out != 0).all()) and bool((out.abs() < tiny).all())
    return out


# case -> (fill the chunk in place; returns nothing). Positions: chunk [L, 2, T, H, D].
def _one_nan(c: torch.Tensor) -> None:
    c[1, 1, 3, 0, 5] = float("nan")


def _one_pos_inf(c: torch.Tensor) -> None:
    c[1, 0, 3, 0, 5] = float("inf")  # a key: cachegen rotates it with dim 5 + 16


def _one_neg_inf(c: torch.Tensor) -> None:
    c[0, 1, 7, 1, 9] = float("-inf")


def _mix(c: torch.Tensor) -> None:
    c[0, 0, 2, 1, 4] = _nan_with_payload(c.dtype)
    c[0, 0, 2, 1, 6] = float("inf")  # same key group (and cachegen rotary pair partner 20)
    c[1, 1, 11, 0, 0] = float("-inf")
    c[1, 1, 11, 0, 1] = float("nan")


def _huge(c: torch.Tensor) -> None:
    """Finite, but past the range of quant's and cachegen's fp16 statistics."""
    c[0, 1, 5, 0, 3] = 60000.0 if c.dtype == torch.float16 else -3e30
    c[1, 0, 19, 1, 31] = 40000.0


def _denormal(c: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(7)
    pick = torch.rand(c.shape, generator=g) < 1 / 8
    c[pick] = _denormals(c.dtype, int(pick.sum()), 1)
    c[1, 1, 4] = _denormals(c.dtype, c[1, 1, 4].numel(), 2).view(c[1, 1, 4].shape)


def _group(c: torch.Tensor) -> None:
    c[1, 1, 4] = float("nan")  # token 4's V, every head: a quant V group
    c[0, 0, :, 0, 7] = float("inf")  # one key channel over every token: a quant K group


CASES: dict[str, Callable[[torch.Tensor], None]] = {
    "nan": _one_nan, "+inf": _one_pos_inf, "-inf": _one_neg_inf, "mix": _mix,
    "denormal": _denormal, "group": _group,
}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))


def check_codec_keeps_bad_values(
    name: str, dtype: str, fill: Callable[[torch.Tensor], None]
) -> None:
    layout, base = _layout(dtype), _base(dtype)
    chunk = base.clone()
    fill(chunk)
    changed = (chunk.view(_BITS[chunk.dtype]) != base.view(_BITS[base.dtype]))
    tiny = torch.finfo(chunk.dtype).tiny
    denormal = changed & (chunk.abs() < tiny)
    exact = changed & ~denormal  # non-finite and out-of-range values
    codec = get_codec(name)
    if name in REFUSES:
        with pytest.raises(UnencodableChunkError):
            codec.encode(chunk, layout, rope_start=3)
        return
    before = chunk.clone()
    tensors, params = codec.encode(chunk, layout, rope_start=3)
    assert _same_bits(chunk, before), "encode changed its input"
    out = codec.decode(tensors, params, layout, T)
    assert _same_bits(codec.decode_layer(tensors, params, layout, T, 1), out[1])
    if codec.lossless:
        assert _same_bits(out, chunk)
        return
    assert _same_bits(out[exact], chunk[exact]), f"{name}: bad values not kept exactly"
    err = (out.float() - chunk.float()).abs()
    ref = _base_error(name, dtype)
    others = ~changed
    assert bool(torch.isfinite(out[others]).all()), f"{name}: a bad value smeared"
    assert err[others].mean() <= MEAN_FACTOR * ref[others].mean() + 1e-6
    assert err[others].max() <= MAX_FACTOR * ref[others].max() + 1e-6
    if denormal.any():
        assert bool(torch.isfinite(out[denormal]).all())
        assert err[denormal].max() <= MAX_FACTOR * ref.max() + tiny


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_codec_keeps_bad_values_exactly_and_the_rest_as_usual(name, dtype):
    for fill in CASES.values():
        check_codec_keeps_bad_values(name, dtype, fill)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [n for n in NAMES if n != "fp8"])  # fp8: below
def test_values_past_fp16s_range_come_back_exactly(name, dtype):
    """quant's and cachegen's statistics are fp16: a value past its range would overflow
    them (cachegen's escape came back inf). fp8's scale is fp32: such a value is just its
    head's largest (below)."""
    check_codec_keeps_bad_values(name, dtype, _huge)


def test_fp8_codes_values_past_fp16s_range_as_its_heads_largest():
    layout = _layout("bfloat16")
    chunk = _base("bfloat16").clone()
    _huge(chunk)
    out = get_codec("fp8").decode(*get_codec("fp8").encode(chunk, layout), layout, T)
    assert bool(torch.isfinite(out).all())
    for pos in ((0, 1, 5, 0, 3), (1, 0, 19, 1, 31)):
        assert abs(float(out[pos]) / float(chunk[pos]) - 1) < 2**-4


def _random_bad_values(seed: int, huge: bool) -> Callable[[torch.Tensor], None]:
    """Up to 23 elements anywhere set to NaN, ±inf, a denormal or (``huge``) a value
    past fp16's range: several may share a group, or be K pair partners."""

    def fill(c: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(1, 24, (1,), generator=g))
        where = torch.randint(0, c.numel(), (n,), generator=g).tolist()
        kinds = torch.randint(0, 5 if huge else 4, (n,), generator=g).tolist()
        big = 60000.0 if c.dtype == torch.float16 else 1e20
        values = [float("nan"), float("inf"), float("-inf"), torch.finfo(c.dtype).tiny / 3, big]
        for i, k in zip(where, kinds, strict=True):
            c.view(-1)[i] = values[k]

    return fill


@pytest.mark.parametrize("name", NAMES)
def test_random_bad_values(name):
    """A small fuzz: random positions and kinds (checked over 40 seeds when written)."""
    for seed in range(3):
        fill = _random_bad_values(seed, huge=name != "fp8")
        check_codec_keeps_bad_values(name, DTYPES[seed % 3], fill)


@pytest.mark.parametrize("name", NAMES)
def test_mostly_non_finite_chunk_is_refused_or_kept_exactly(name):
    """Escapes are for sparse values: a chunk that is mostly NaN is refused by the lossy
    codecs with a typed error naming codecs that keep it, and kept bit-exact by the
    lossless ones."""
    layout = _layout("bfloat16")
    chunk = _base("bfloat16").clone()
    chunk[:, 1] = float("nan")
    codec = get_codec(name)
    if not codec.lossless:
        with pytest.raises(UnencodableChunkError, match="'zstd'"):
            codec.encode(chunk, layout)
        return
    out = codec.decode(*codec.encode(chunk, layout), layout, T)
    assert _same_bits(out, chunk)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_layouts(dtype):
    """float8 KV: NaN (and e5m2's inf) kept exactly by the codecs that take it; quant
    refuses the layout with a typed error (it raised a bare ValueError)."""
    layout = KVLayout("nonfinite", num_layers=2, num_kv_heads=2, head_dim=32, dtype=dtype)
    chunk = _base("float32").clamp(-400, 400).to(layout.torch_dtype)
    chunk[1, 1, 3, 0, 5] = float("nan")
    chunk[0, 0, 2, 1, 6] = float("inf")  # e4m3fn has no inf: it saturates to 448
    for name in ("raw", "zstd", "fp8", "cachegen", "cachegen-rans"):
        codec = get_codec(name)
        out = codec.decode(*codec.encode(chunk, layout, rope_start=3), layout, T)
        keep = ~torch.isfinite(chunk.float())
        assert torch.equal(out[keep].view(torch.uint8), chunk[keep].view(torch.uint8)), name
        assert bool(torch.isfinite(out.float()[~keep]).all()), name
    with pytest.raises(LayoutMismatchError, match="'fp8'"):
        get_codec("quant").encode(chunk, layout)


# -- the bugs this fixed (each failed before) ---------------------------------------------------


def test_fp8_chunk_with_an_inf_decodes():
    """fp8 stored a chunk with one +inf and every read then raised (its head's scale was
    inf); now the inf comes back and its head keeps its error."""
    layout = _layout("bfloat16")
    chunk = _base("bfloat16").clone()
    chunk[1, 0, 3, 0, 5] = float("inf")
    codec = get_codec("fp8")
    out = codec.decode(*codec.encode(chunk, layout), layout, T)
    assert out[1, 0, 3, 0, 5] == float("inf")
    head = torch.ones_like(chunk, dtype=torch.bool)
    head[1, 0, 3, 0, 5] = False
    assert bool(torch.isfinite(out[head]).all())
    clean = codec.decode(*codec.encode(_base("bfloat16"), layout), layout, T)
    assert torch.equal(out[1, 0, :, 0][head[1, 0, :, 0]], clean[1, 0, :, 0][head[1, 0, :, 0]])


def test_fp8_head_of_zeros_and_a_denormal_stays_finite():
    """The head's scale (its largest value / 448) underflowed to 0 and its zeros came
    back as 0 / 0 = NaN."""
    layout = KVLayout("nonfinite", num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32")
    chunk = torch.zeros(layout.chunk_shape(4))
    chunk[0, 0, 0, 0, 0] = 1e-44
    codec = get_codec("fp8")
    out = codec.decode(*codec.encode(chunk, layout), layout, 4)
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) <= 1e-44


@pytest.mark.parametrize("name", ["quant", "quant-int8", "quant-int2", "quant-int4-hadamard"])
def test_quant_one_nan_stays_one_nan(name):
    """One NaN in a group made its scale NaN: the whole group (64 values) came back NaN."""
    layout = _layout("float16")
    chunk = _base("float16").clone()
    chunk[1, 1, 3, 0, 5] = float("nan")
    codec = get_codec(name)
    out = codec.decode(*codec.encode(chunk, layout), layout, T)
    assert int(out.isnan().sum()) == 1 and bool(out[1, 1, 3, 0, 5].isnan())


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["quant", "quant-int8", "quant-int2", "quant-int4-hadamard"])
def test_quant_inf_keeps_its_group_error(name, value):
    """One inf widened its group's range to fp16's limit: the inf came back finite and the
    group's other values with ~16x their error. Now: the inf exactly, the others as
    before it was put in (here the group is token 3's V, its 64 channels)."""
    layout = _layout("float16")
    base = _base("float16")
    chunk = base.clone()
    chunk[1, 1, 3, 0, 5] = value
    codec = get_codec(name)
    out = codec.decode(*codec.encode(chunk, layout), layout, T)
    assert out[1, 1, 3, 0, 5] == value
    clean = codec.decode(*codec.encode(base, layout), layout, T)
    group = torch.ones(2, 32, dtype=torch.bool)
    group[0, 5] = False
    err = (out[1, 1, 3][group].float() - base[1, 1, 3][group].float()).abs()
    clean_err = (clean[1, 1, 3][group].float() - base[1, 1, 3][group].float()).abs()
    assert err.max() <= MAX_FACTOR * clean_err.max() + 1e-3


def test_cachegen_nan_no_longer_smears_its_channel_and_token():
    """One NaN made its channel's mean NaN (every token of the channel came back NaN) and,
    for V, its token's scale NaN; and a bf16 value past fp16's range came back inf."""
    layout = _layout("bfloat16")
    chunk = _base("bfloat16").clone()
    chunk[1, 1, 3, 0, 5] = float("nan")
    chunk[0, 1, 6, 1, 2] = 1e6
    codec = get_codec("cachegen")
    out = codec.decode(*codec.encode(chunk, layout, rope_start=3), layout, T)
    assert int(out.isnan().sum()) == 1 and bool(out[1, 1, 3, 0, 5].isnan())
    assert out[0, 1, 6, 1, 2] == chunk[0, 1, 6, 1, 2]


def test_cachegen_does_not_rotate_an_fp32_chunk_in_place():
    """Keys were rotated back to before RoPE in the caller's own fp32 tensor."""
    layout = _layout("float32")
    chunk = _base("float32").clone()
    get_codec("cachegen").encode(chunk, layout, rope_start=3)
    assert torch.equal(chunk, _base("float32"))


# -- objects of earlier formats that decoded smeared are refused --------------------------------


def test_old_quant_objects_with_smeared_groups_are_corrupt():
    layout = _layout("float16")
    codec = get_codec("quant")
    tensors, params = codec.encode(_base("float16"), layout)
    v1 = {**params, "version": 1}
    assert torch.equal(codec.decode(tensors, v1, layout, T),
                       codec.decode(tensors, params, layout, T))
    for key, bad in (("v_scale", float("nan")), ("k_zero", -65504.0), ("k_scale", 65504.0)):
        t = dict(tensors)
        t[key] = t[key].clone()
        t[key][1, 2] = bad
        with pytest.raises(CorruptObjectError, match="not finite or saturated"):
            codec.decode(t, v1, layout, T)
        # layer 0 is untouched: its layers still decode
        codec.decode_layer(t, v1, layout, T, 0)
    assert quant.VERSION == 2


def test_old_fp8_objects_with_inf_scales_are_corrupt():
    layout = _layout("float16")
    codec = get_codec("fp8")
    tensors, params = codec.encode(_base("float16"), layout)
    v1 = {**params, "version": 1}
    assert torch.equal(codec.decode(tensors, v1, layout, T),
                       codec.decode(tensors, params, layout, T))
    t = dict(tensors, scale=tensors["scale"].clone())
    t["scale"][0, 1, 1] = float("inf")
    with pytest.raises(CorruptObjectError, match="not finite"):
        codec.decode(t, v1, layout, T)
    assert fp8.VERSION == 2


@pytest.mark.parametrize("name", ["cachegen", "cachegen-rans"])
def test_old_cachegen_objects_with_non_finite_means_are_corrupt(name):
    layout = _layout("float16")
    codec = get_codec(name)
    tensors, params = codec.encode(_base("float16"), layout, rope_start=3)
    v5 = {**params, "version": 5}
    assert torch.equal(codec.decode(tensors, v5, layout, T),
                       codec.decode(tensors, params, layout, T))
    for key in ("mu", "esc_val"):
        t = dict(tensors)
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
        with pytest.raises(CorruptObjectError, match="not finite"):
            codec.decode(t, v5, layout, T)


def test_raw_escapes_only_from_the_format_that_has_them():
    layout = _layout("float16")
    chunk = _base("float16").clone()
    _mix(chunk)
    for name, old in (("quant", 1), ("fp8", 1), ("cachegen", 5), ("cachegen-rans", 5)):
        codec = get_codec(name)
        tensors, params = codec.encode(chunk, layout, rope_start=3)
        assert {"raw_idx", "raw_val"} <= set(tensors)
        with pytest.raises(CorruptObjectError, match="raw escapes"):
            codec.decode(tensors, {**params, "version": old}, layout, T)
    # a finite chunk's objects have none: stored as before, bar the version
    for name in ("quant", "fp8", "cachegen", "cachegen-rans"):
        tensors, _ = get_codec(name).encode(_base("float16"), layout, rope_start=3)
        assert not {"raw_idx", "raw_val"} & set(tensors)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_cachegen_raw_escapes_land_in_a_slice_of_a_longer_buffer(impl):
    """The layer loader's path: raw escapes written into a chunk's strided slice, after the
    keys' rotation, by the C decoder and the lane-parallel one (the GPU's, here its torch
    reference)."""
    layout = _layout("bfloat16")
    chunk = _base("bfloat16").clone()
    _mix(chunk)
    _huge(chunk)
    codec = CacheGenCodec(entropy="rans", rans_steps=2)
    tensors, params = codec.encode(chunk, layout, rope_start=3)
    whole = codec.decode(tensors, params, layout, T)
    buf = torch.zeros((2, 2, 3 * T, 2, 32), dtype=whole.dtype)
    got = buf[:, :, T : 2 * T]
    for layer in (1, 0):
        codec.decode_into(tensors, params, layout, T, [layer], got[layer : layer + 1], impl=impl)
    bad = ~torch.isfinite(whole) | (whole.float().abs() > 2**14)
    assert int(bad.sum()) == 6 and _same_bits(got[bad], whole[bad])
    assert torch.allclose(got[~bad].float(), whole[~bad].float(), rtol=2**-7, atol=1e-6)
    assert not buf[:, :, :T].any() and not buf[:, :, 2 * T :].any()  # untouched
