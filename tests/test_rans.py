"""Lane-interleaved rANS (``kernels/rans.py``): the C coder against the numpy/torch
references, the Triton decode (interpreted on CPU, and on a GPU when there is one) against
the torch reference, the end-of-block check, and cachegen objects coded with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvcache.codecs import cachegen
from kvcache.codecs.cachegen import CacheGenCodec
from kvcache.codecs.registry import get_codec
from kvcache.kernels import cpu_native, rans
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout, RopeSpec
from kvcache.tools.synthetic_kv import nmse, synthetic_kv

needs_c = pytest.mark.skipif(cpu_native.library() is None, reason="no C compiler")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _planes(P: int, n: int, seed: int = 0, spread: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.laplace(0, spread, (P, n))), -100, 100).astype(np.int8)


def _freq(sym: np.ndarray) -> np.ndarray:
    counts = np.stack([np.bincount(s.astype(np.int64) + 128, minlength=256) for s in sym])
    return rans.quantize_counts(counts)


def _as_torch(coded: rans.Coded) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(coded.words.view(np.int16)),
            torch.from_numpy(coded.states.view(np.int32)))


def test_quantized_tables_sum_to_m_and_keep_every_symbol():
    counts = np.zeros((3, 256), np.int64)
    counts[0, 128] = 10**9
    counts[0, [0, 5, 255]] = 1  # rarer than 1/M: still codable
    counts[1, 100:200] = np.arange(1, 101)
    freq = rans.quantize_counts(counts)  # row 2 is empty
    assert (freq.sum(1) == rans.M).all()
    assert ((freq > 0) == (counts > 0))[:2].all()
    assert freq[2, 128] == rans.M
    lut = rans.lut_of(freq)
    assert lut.shape == (3, rans.M)
    # every slot of a row names a symbol with its frequency and cumulative frequency
    cum = np.cumsum(freq[1]) - freq[1]
    e = lut[1].astype(np.int64) & 0xFFFFFFFF
    s = e & 0xFF
    assert ((e >> 8 & 0xFFF) + 1 == freq[1][s]).all() and (e >> 20 == cum[s]).all()


@needs_c
@pytest.mark.parametrize(("n", "steps"), [(1, 1), (31, 2), (3000, 8), (4096, 4), (5000, 3)])
def test_c_encoder_matches_the_reference_and_round_trips(n, steps):
    sym = _planes(3, n, seed=n)
    sym[2] = 7  # one symbol only: frequency M, states never move
    freq = _freq(sym)
    c, ref = rans.encode(sym, freq, steps), rans.encode_reference(sym, freq, steps)
    for a, b in zip(c, ref, strict=True):
        assert np.array_equal(a, b)
    nb = rans.num_blocks(n, steps)
    assert c.states.shape == (3 * nb, rans.LANES) and len(c.offsets) == 3 * nb + 1
    lut = rans.lut_of(freq)
    out = np.empty(n, np.int8)
    for p in range(3):
        for simd in (True, False):  # the AVX-512 block decoder (where built) and plain C
            out[:] = 0
            assert rans.decode_plane(c.words, c.offsets[p * nb:], c.states[p * nb:], n,
                                     steps, lut[p], out, simd=simd)
            assert np.array_equal(out, sym[p])
    words, states = _as_torch(c)
    z, ok = rans.decode_reference(words, states, c.offsets, [2 * nb, 0], [n, n], steps,
                                  torch.from_numpy(lut[[2, 0]]))
    assert ok and torch.equal(z, torch.from_numpy(sym[[2, 0]]))


@needs_c
def test_planes_of_different_lengths_code_as_separately_coded_blocks_back_to_back():
    """The encoder's fallback without a C compiler concatenates per-plane encodes: the
    same bytes as the C encoder over planes of any lengths."""
    a, b = _planes(1, 3000, seed=1)[0], _planes(1, 700, seed=2)[0]
    freq = np.concatenate([_freq(a[None]), _freq(b[None])])
    c = rans.encode([a, b], freq, steps=8)
    ref = rans._concat([rans.encode_reference(a[None], freq[:1], 8),
                        rans.encode_reference(b[None], freq[1:], 8)])
    for x, y in zip(c, ref, strict=True):
        assert np.array_equal(x, y)
    first = rans.first_blocks([3000, 700], 8)
    assert list(first) == [0, 12, 15] and len(c.offsets) == 16


def test_reference_codes_near_the_entropy():
    n = 1 << 16
    sym = _planes(1, n, spread=1.0)
    freq = _freq(sym)
    coded = rans.encode_reference(sym, freq, steps=1024)
    p = np.bincount(sym[0].astype(np.int64) + 128) / n
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * n
    bits = coded.words.size * 16 + coded.states.size * 32
    assert entropy < bits < entropy * 1.02


@needs_c
def test_a_changed_word_or_state_fails_the_end_of_block_check():
    n, steps = 2048, 16
    sym = _planes(1, n)
    freq = _freq(sym)
    coded = rans.encode(sym, freq, steps)
    lut = rans.lut_of(freq)
    nb = rans.num_blocks(n, steps)
    out = np.empty(n, np.int8)
    for field, at in [("words", 17), ("states", 40)]:
        bad = rans.Coded(*(a.copy() for a in coded))
        getattr(bad, field).reshape(-1)[at] ^= 0x5A5A
        for simd in (True, False):
            assert not rans.decode_plane(bad.words, bad.offsets, bad.states, n, steps, lut[0],
                                         out, simd=simd)
        words, states = _as_torch(bad)
        _, ok = rans.decode_reference(words, states, bad.offsets, [0], [n], steps,
                                      torch.from_numpy(lut))
        assert not ok
    # a block claiming fewer words than it reads is caught and never read past
    short = coded.offsets.copy()
    short[1:] -= np.minimum(short[1:], 3)
    short[1:nb] = np.maximum(short[1:nb], short[:nb - 1])
    for simd in (True, False):
        assert not rans.decode_plane(coded.words, short, coded.states, n, steps, lut[0], out,
                                     simd=simd)
    # ... and one whose words end early: the last block's masked loads stop at the array's
    # end (a vector load past it could fault)
    tail = coded.words[: coded.offsets[-1] - 2].copy()
    for simd in (True, False):
        assert not rans.decode_plane(tail, np.minimum(coded.offsets, tail.size),
                                     coded.states, n, steps, lut[0], out, simd=simd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_decode_dequant_matches_the_torch_reference(dtype):
    """Interpreted on CPU (TRITON_INTERPRET=1); few blocks, few steps: ~1 ms a step."""
    T, H, D, steps = 24, 2, 8, 4
    C, n, Q = H * D, T * H * D, 4
    sym = _planes(Q, n, seed=3)
    freq = _freq(sym)
    coded = rans.encode_reference(sym, freq, steps)
    words, states = _as_torch(coded)
    planes = [2, 3, 0, 1]  # layers decoded out of order
    nb = rans.num_blocks(n, steps)
    first, ns = [p * nb for p in planes], [n] * Q
    lut = torch.from_numpy(rans.lut_of(freq[planes]))
    g = torch.Generator().manual_seed(0)
    mu, kd = torch.randn(Q, C, generator=g), torch.rand(Q // 2, C, generator=g)
    vd = torch.rand(Q // 2, T, H, generator=g)
    outs = {}
    for impl in ("torch", "triton"):
        out = torch.full((Q, n), float("nan"), dtype=dtype)
        assert rans.decode_dequant(words, states, coded.offsets, first, ns, steps, lut, mu,
                                   kd, vd, D, out, impl=impl)
        outs[impl] = out.float()
    z = torch.from_numpy(sym[planes]).float().view(2, 2, T, C)
    want = torch.stack([mu.view(2, 2, C)[:, 0, None] + z[:, 0] * kd[:, None],
                        mu.view(2, 2, C)[:, 1, None] + z[:, 1] * vd.repeat_interleave(D, -1)],
                       1).view(Q, n).to(dtype).float()
    assert torch.equal(outs["torch"], want)
    # the interpreter truncates fp32 -> bf16 stores (1 ulp); fp32 and fp16 are exact
    tol = 2 ** -7 * want.abs() if dtype == torch.bfloat16 else torch.zeros_like(want)
    assert ((outs["triton"] - want).abs() <= tol).all()
    # a corrupt word: the kernel reports it (and reads nothing outside the block)
    bad = words.clone()
    bad[5] ^= 0x1234
    out = torch.empty(Q, n, dtype=dtype)
    assert not rans.decode_dequant(bad, states, coded.offsets, first, ns, steps, lut, mu, kd,
                                   vd, D, out, impl="triton")


# -- cachegen objects coded with rANS ------------------------------------------------------

ROPE_LAYOUT = KVLayout("rans-rope", num_layers=2, num_kv_heads=2, head_dim=8,
                       dtype="bfloat16", rope=RopeSpec(theta=10000.0))


@pytest.mark.parametrize("rope_start", [None, 7])
def test_cachegen_rans_decoders_agree(rope_start):
    """C per plane (auto), the torch reference and the Triton kernel give one chunk."""
    chunk = synthetic_kv(ROPE_LAYOUT, 40, seed=2)
    chunk[1, 0, 3, 1, 2] = 30000.0  # an outlier: escapes (|z| > 127) in its channel
    codec = CacheGenCodec(entropy="rans", rans_steps=2)
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=rope_start)
    assert params["entropy"] == "rans" and params["key_rope_start"] == rope_start
    assert tensors["esc_idx"].numel() >= 1
    whole = codec.decode(tensors, params, ROPE_LAYOUT, 40)
    assert nmse(whole, chunk) < 0.1
    for impl in ("torch", "triton"):
        out = torch.empty((1, *whole.shape[1:]), dtype=whole.dtype)
        codec.decode_into(tensors, params, ROPE_LAYOUT, 40, [1], out, impl=impl)
        # bf16 stores: the interpreter truncates where the CPU rounds (1 ulp)
        assert torch.allclose(out[0].float(), whole[1].float(), rtol=2 ** -7, atol=0)
    # layers out of order: their blocks are not back to back and are gathered
    out = torch.empty_like(whole)
    codec.decode_into(tensors, params, ROPE_LAYOUT, 40, [1, 0], out, impl="torch")
    assert torch.allclose(out.float(), whole[[1, 0]].float(), rtol=2 ** -7, atol=0)


def test_cachegen_rans_is_the_same_quantizer_with_another_entropy_coder():
    layout = KVLayout("rans-big", num_layers=2, num_kv_heads=4, head_dim=32, dtype="bfloat16")
    chunk = synthetic_kv(layout, 256, seed=1)
    huff, rns = get_codec("cachegen"), get_codec("cachegen-rans")
    th, ph = huff.encode(chunk, layout)
    tr, pr = rns.encode(chunk, layout)
    assert ph["level"] == pr["level"] and ph["k_steps"] == pr["k_steps"]
    a, b = huff.decode(th, ph, layout, 256), rns.decode(tr, pr, layout, 256)
    # identical where neither escaped (escapes are exact values in either)
    same = (a == b).float().mean()
    assert same > 0.99
    assert abs(nmse(a, chunk) - nmse(b, chunk)) < 0.01 * nmse(a, chunk)


def test_cachegen_rans_corrupt_stream_is_a_typed_error():
    chunk = synthetic_kv(ROPE_LAYOUT, 40)
    codec = get_codec("cachegen-rans")
    tensors, params = codec.encode(chunk, ROPE_LAYOUT)
    bad = dict(tensors, words=tensors["words"].clone())
    bad["words"][3] ^= 0x0F0F
    with pytest.raises(CorruptObjectError, match="did not decode as coded"):
        codec.decode(bad, params, ROPE_LAYOUT, 40)
    freq = dict(tensors, rans_freq=tensors["rans_freq"].clone())
    freq["rans_freq"][0] += 1
    with pytest.raises(CorruptObjectError, match="sum"):
        codec.decode(freq, params, ROPE_LAYOUT, 40)
    with pytest.raises(CorruptObjectError, match="lo > hi"):
        codec.decode(tensors, {**params, "rans_lo": [5] * 4, "rans_hi": [4] * 4},
                     ROPE_LAYOUT, 40)


def test_cachegen_rans_range_trades_table_entries_for_escapes():
    from kvcache.codecs._cachegen_rans import value_range

    counts = np.zeros(256, np.int64)
    counts[128 - 3 : 128 + 4] = 1000
    counts[128 + 90] = 1  # one far outlier: 87 table entries cost more than an escape
    counts[128 - 4] = 1  # a neighbour: one more entry is cheaper than escaping it
    assert value_range(counts, escape_bytes=6) == (-4, 3)


def _layer0_from_tokens(layout: KVLayout, T: int, vocab: int, seed: int) -> torch.Tensor:
    """A chunk whose layer 0 is what a model computes there: K and V functions of the
    token alone (keys as given, not rotated), ``vocab`` distinct tokens."""
    chunk = synthetic_kv(layout, T, seed=seed)
    table = synthetic_kv(layout, vocab, seed=seed + 1)[0]  # [2, vocab, H, D]
    tokens = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))
    chunk[0] = table[:, tokens]
    chunk[0, 1, 5, 0, 3] = 30000.0  # an escape inside a repeated row: coded exactly
    return chunk


ROWS_LAYOUT = KVLayout("rans-rows", num_layers=2, num_kv_heads=2, head_dim=16,
                       dtype="bfloat16")


def _escaped(tensors: dict[str, torch.Tensor], planes: int, n: int) -> torch.Tensor:
    """bool ``[planes, n]``: where an object stores exact values."""
    mask = torch.zeros(planes, n, dtype=torch.bool)
    off = tensors["esc_offsets"]
    for p in range(planes):
        mask[p, tensors["esc_idx"][off[p] : off[p + 1]].long()] = True
    return mask


def test_cachegen_rans_codes_repeated_rows_once():
    T, vocab = 64, 8
    chunk = _layer0_from_tokens(ROWS_LAYOUT, T, vocab, seed=5)
    codec = CacheGenCodec(entropy="rans", rans_steps=4)
    tensors, params = codec.encode(chunk, ROWS_LAYOUT)
    distinct = [len(torch.unique(chunk[0, kv].reshape(T, -1), dim=0)) for kv in (0, 1)]
    assert distinct == [8, 9]  # the changed V row is a row of its own
    assert params["rans_rows"] == [*distinct, T, T]
    assert tensors["row_map"].shape == (2 * T,)
    whole = codec.decode(tensors, params, ROWS_LAYOUT, T)
    # the quantizer's values, row for row: equal to Huffman cachegen's wherever neither
    # stores an exact value
    huff = CacheGenCodec()
    th, ph = huff.encode(chunk, ROWS_LAYOUT)
    ref = huff.decode(th, ph, ROWS_LAYOUT, T)
    n = T * ROWS_LAYOUT.num_kv_heads * ROWS_LAYOUT.head_dim
    exact = (_escaped(tensors, 4, n) | _escaped(th, 4, n)).view(whole.shape)
    assert torch.equal(whole[~exact], ref[~exact])
    assert whole[0, 1, 5, 0, 3] == 30000.0
    # the lane-parallel decoders expand rows the same way (and scale V rows by their
    # first token's scales, which the encoder made sure are every copy's)
    for impl in ("torch", "triton"):
        out = torch.empty_like(whole)
        codec.decode_into(tensors, params, ROWS_LAYOUT, T, [0, 1], out, impl=impl)
        assert torch.allclose(out.float(), whole.float(), rtol=2 ** -7, atol=0)
    # fewer bytes than coding every row
    flat = dict(tensors, words=tensors["words"])
    jittered = chunk.clone()
    jittered[0] += 0.3 * torch.randn(jittered[0].shape, generator=torch.Generator().manual_seed(1))
    tj, pj = codec.encode(jittered, ROWS_LAYOUT)
    assert pj["rans_rows"] == [T] * 4 and tj["row_map"].numel() == 0
    assert flat["words"].numel() < 0.8 * tj["words"].numel()


@pytest.mark.parametrize("name", ["cachegen", "cachegen-rans"])
def test_a_repeated_tokens_keys_are_coded_as_one_despite_rope_rounding(name, monkeypatch):
    """Layer 0 as a model stores it: keys rotated at their positions and rounded to bf16.
    Before RoPE a repeated token's keys then differ by that rounding; the codec codes
    them as one row (rANS: a row map; Huffman: zstd's matches), at no loss a bf16 key
    would notice."""
    T, start = 128, 40
    chunk = _layer0_from_tokens(ROPE_LAYOUT, T, vocab=6, seed=11)
    k = chunk[0, 0].float()  # [T, H, D], the same for every copy of a token
    # channels with a large mean and little spread, as real keys have: steps finer than
    # bf16's rounding there
    k[..., :4] = 3.0 + 0.002 * k[..., :4]
    rotation = cachegen._Rotation.of(ROPE_LAYOUT, start, T)
    chunk[0, 0] = rotation.apply(k[None])[0].to(chunk.dtype)
    back = rotation.apply(chunk[0, 0].float()[None], inverse=True)[0]
    assert not torch.equal(back, k)  # rounding: copies no longer agree exactly
    codec = get_codec(name)
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=start)
    if name == "cachegen-rans":
        # the 6 tokens, and the row whose V has an outlier (its V scales differ)
        assert params["rans_rows"][:2] == [7, 7]
    # against the same chunk coded without snapping: fewer bytes, about the same error
    monkeypatch.setattr(cachegen, "_snap_repeated_keys", lambda *a: None)
    tu, pu = codec.encode(chunk, ROPE_LAYOUT, rope_start=start)
    if name == "cachegen-rans":
        assert pu["rans_rows"][0] == T

    def k_error(t, p):
        got = codec.decode(t, p, ROPE_LAYOUT, T)[0, 0].float()
        return float((got - chunk[0, 0].float()).norm() / chunk[0, 0].float().norm())

    def size(t):
        return sum(v.numel() * v.element_size() for v in t.values())

    assert size(tensors) < 0.9 * size(tu)  # layer 0 of 2: 713 -> 297 bytes of K symbols
    assert k_error(tensors, params) < 1.1 * k_error(tu, pu)


def test_cachegen_rans_bad_row_maps_are_typed_errors():
    T = 64
    chunk = _layer0_from_tokens(ROWS_LAYOUT, T, vocab=8, seed=5)
    codec = get_codec("cachegen-rans")
    tensors, params = codec.encode(chunk, ROWS_LAYOUT)
    rows = params["rans_rows"]
    assert rows[0] < T
    for row_map in ([1] + [0] * (T - 1),  # row 1 before row 0
                    [0, 2] + [0] * (T - 2),  # skips row 1
                    [0] * T,  # rows it claims to code go unused
                    [0, -1] + [0] * (T - 2)):
        bad = dict(tensors, row_map=tensors["row_map"].clone())
        bad["row_map"][:T] = torch.tensor(row_map, dtype=torch.int16)
        with pytest.raises(CorruptObjectError, match="row map"):
            codec.decode(bad, params, ROWS_LAYOUT, T)
    for coded_rows in (T + 1, 0):
        with pytest.raises(CorruptObjectError):
            codec.decode(tensors, {**params, "rans_rows": [coded_rows, *rows[1:]]},
                         ROWS_LAYOUT, T)
    with pytest.raises(CorruptObjectError):
        codec.decode(dict(tensors, row_map=tensors["row_map"][1:]), params, ROWS_LAYOUT, T)


def test_format_4_rans_objects_decode():
    chunk = synthetic_kv(ROPE_LAYOUT, 40)
    codec = get_codec("cachegen-rans")
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=1)
    assert params["rans_rows"] == [40] * 4  # nothing repeats: as format 4 coded it
    v4 = {k: v for k, v in params.items() if k != "rans_rows"} | {"version": 4}
    t4 = {k: v for k, v in tensors.items() if k != "row_map"}
    assert torch.equal(codec.decode(t4, v4, ROPE_LAYOUT, 40),
                       codec.decode(tensors, params, ROPE_LAYOUT, 40))


@pytest.mark.parametrize("impl", ["auto", "torch", "triton"])
@pytest.mark.parametrize("rope_start", [None, 4])
def test_cachegen_decodes_into_a_slice_of_a_longer_buffer(impl, rope_start):
    """What the layer loader does: a chunk's layer straight into its tokens' slice."""
    T = 24
    chunk = _layer0_from_tokens(ROPE_LAYOUT, T, vocab=5, seed=8)
    codec = CacheGenCodec(entropy="rans", rans_steps=2)
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=rope_start)
    whole = codec.decode(tensors, params, ROPE_LAYOUT, T)
    buf = torch.full((2, 2, 3 * T, 2, 8), float("nan"), dtype=whole.dtype)
    for layer in (1, 0):
        piece = buf[layer].narrow(1, T, T)
        codec.decode_layer_into(tensors, params, ROPE_LAYOUT, T, layer, piece) \
            if impl == "auto" else \
            codec.decode_into(tensors, params, ROPE_LAYOUT, T, [layer], piece[None], impl=impl)
    got = buf[:, :, T : 2 * T]
    assert torch.allclose(got.float(), whole.float(), rtol=2 ** -7, atol=0)
    assert buf[:, :, :T].isnan().all() and buf[:, :, 2 * T :].isnan().all()  # untouched
    # several layers into planes that are not evenly spaced (every other layer of a
    # longer buffer) go through a buffer
    out = torch.full((4, *buf.shape[1:]), float("nan"), dtype=whole.dtype)[::2, :, T : 2 * T]
    codec.decode_into(tensors, params, ROPE_LAYOUT, T, [0, 1], out,
                      impl="torch" if impl == "auto" else impl)
    assert torch.allclose(out.float(), whole.float(), rtol=2 ** -7, atol=0)
    with pytest.raises(ValueError, match="contiguous planes"):
        codec.decode_into(tensors, params, ROPE_LAYOUT, T, [0], buf[:1, :, T : 2 * T, :, :4])


@needs_cuda
def test_cachegen_rans_decodes_on_the_gpu():
    chunk = _layer0_from_tokens(ROPE_LAYOUT, 256, vocab=40, seed=4)  # row maps too
    codec = get_codec("cachegen-rans")
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=3)
    assert params["rans_rows"][1] < 256
    cpu = codec.decode(tensors, params, ROPE_LAYOUT, 256)
    out = torch.empty(cpu.shape, dtype=cpu.dtype, device="cuda")
    codec.decode_into(tensors, params, ROPE_LAYOUT, 256, [0, 1], out)
    assert torch.allclose(out.cpu().float(), cpu.float(), rtol=2 ** -7, atol=1e-6)


def test_format_3_objects_decode_as_huffman():
    chunk = synthetic_kv(ROPE_LAYOUT, 40)
    codec = get_codec("cachegen")
    tensors, params = codec.encode(chunk, ROPE_LAYOUT, rope_start=2)
    assert params["version"] == cachegen.VERSION and params["entropy"] == "huffman"
    v3 = {k: v for k, v in params.items() if k != "entropy"} | {"version": 3}
    assert torch.equal(codec.decode(tensors, v3, ROPE_LAYOUT, 40),
                       codec.decode(tensors, params, ROPE_LAYOUT, 40))
    # a version 3 object cannot claim another entropy coder
    with pytest.raises(CorruptObjectError):
        codec.decode(tensors, {**v3, "entropy": "rans"} | {"version": 4}, ROPE_LAYOUT, 40)
