"""Codecs: round trips within each codec's tolerance, per-layer decoding, the registry,
container compatibility and per-tier codecs in a TieredStore."""

from __future__ import annotations

import json

import pytest
import torch

from kvcache.codecs.cachegen import CacheGenCodec
from kvcache.codecs.quant import QuantCodec
from kvcache.codecs.registry import codec_names, get_codec
from kvcache.codecs.zstd import ZstdCodec
from kvcache.kernels.rope_shift import rope_reference
from kvcache.kvstore.container import ObjectHeader, StoredObject, decode_object, encode_object
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import LayoutMismatchError, UnknownCodecError
from kvcache.kvstore.layout import KVLayout, RopeSpec, RopeStyle
from kvcache.kvstore.tiered_store import TieredStore
from kvcache.tools.synthetic_kv import nmse, synthetic_kv
from tests.helpers import make_key

LAYOUT = KVLayout("codec-test", num_layers=4, num_kv_heads=2, head_dim=32, dtype="bfloat16")

# name -> (max K NMSE, max V NMSE, max bits per element) on synthetic_kv at 128 tokens.
TOLERANCE = {
    "raw": (0.0, 0.0, 16.0),
    "zstd": (0.0, 0.0, 16.0),
    "quant-int8": (1e-4, 1e-4, 8.6),
    "quant": (0.03, 0.02, 4.6),
    "quant-int4-hadamard": (0.01, 0.02, 4.6),
    "quant-int2": (0.35, 0.3, 3.1),
    "fp8": (2e-3, 2e-3, 8.1),
    "cachegen-1": (0.005, 0.01, 5.0),
    "cachegen": (0.1, 0.2, 3.5),
    "cachegen-6": (0.3, 0.6, 2.0),
    "cachegen-rans": (0.1, 0.2, 3.5),
}


def bits_per_element(tensors: dict[str, torch.Tensor], chunk: torch.Tensor) -> float:
    return sum(t.numel() * t.element_size() for t in tensors.values()) * 8 / chunk.numel()


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_roundtrip_within_tolerance(name):
    chunk = synthetic_kv(LAYOUT, 128)
    codec = get_codec(name)
    tensors, params = codec.encode(chunk, LAYOUT)
    json.dumps(params)  # params must fit the container's JSON header
    out = codec.decode(tensors, params, LAYOUT, 128)
    assert out.shape == chunk.shape and out.dtype == chunk.dtype
    k_tol, v_tol, max_bits = TOLERANCE[name]
    assert nmse(out[:, 0], chunk[:, 0]) <= k_tol
    assert nmse(out[:, 1], chunk[:, 1]) <= v_tol
    if codec.lossless:
        assert torch.equal(out, chunk)
    assert bits_per_element(tensors, chunk) <= max_bits
    for layer in (0, LAYOUT.num_layers - 1):
        assert torch.equal(codec.decode_layer(tensors, params, LAYOUT, 128, layer), out[layer])


@pytest.mark.parametrize(
    "name", ["zstd", "quant", "quant-int2", "fp8", "cachegen", "cachegen-rans"]
)
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_partial_chunks(name, tokens):
    chunk = synthetic_kv(LAYOUT, tokens, seed=tokens)
    codec = get_codec(name)
    tensors, params = codec.encode(chunk, LAYOUT)
    out = codec.decode(tensors, params, LAYOUT, tokens)
    assert out.shape == chunk.shape
    assert nmse(out, chunk) < 0.3


def test_zstd_byte_planes_help_and_mla_roundtrips():
    chunk = synthetic_kv(LAYOUT, 128)
    planes = bits_per_element(ZstdCodec(shuffle=True).encode(chunk, LAYOUT)[0], chunk)
    plain = bits_per_element(ZstdCodec(shuffle=False).encode(chunk, LAYOUT)[0], chunk)
    assert planes < plain
    mla = KVLayout("mla", num_layers=2, num_kv_heads=1, head_dim=8, attention="mla",
                   latent_dim=24, dtype="float16")
    x = torch.randn(mla.chunk_shape(5)).half()
    t, p = get_codec("zstd").encode(x, mla)
    assert torch.equal(get_codec("zstd").decode(t, p, mla, 5), x)
    with pytest.raises(LayoutMismatchError):
        get_codec("cachegen").encode(x, mla)


def test_cachegen_levels_trade_bytes_for_fidelity():
    chunk = synthetic_kv(LAYOUT, 128)
    sizes, errors = [], []
    for level in CacheGenCodec.levels:
        codec = CacheGenCodec(level)
        t, p = codec.encode(chunk, LAYOUT)
        sizes.append(bits_per_element(t, chunk))
        # any instance decodes any level: params carry everything
        errors.append(nmse(CacheGenCodec(1).decode(t, p, LAYOUT, 128), chunk))
    assert sizes == sorted(sizes, reverse=True)
    assert errors == sorted(errors)


def test_cachegen_symbol_width_follows_coded_size():
    """Planes whose symbols mostly fit in 4 bits are coded as 4-bit pairs plus escapes
    (smaller and ~2x faster to decode); fine steps on heavy tails keep 8-bit symbols."""
    chunk = synthetic_kv(LAYOUT, 128)
    widths = {}
    for level in (1, 3, 6):
        codec = CacheGenCodec(level)
        t, p = codec.encode(chunk, LAYOUT)
        widths[level] = p["sym_bits"]
        assert nmse(codec.decode(t, p, LAYOUT, 128), chunk) < 0.3
    assert 8 in widths[1] and set(widths[6]) == {4}
    assert widths[1].count(8) >= widths[3].count(8) >= widths[6].count(8)


def test_cachegen_keeps_8bit_rows_zstd_can_match():
    """Layer 0's V is a function of the token alone: repeated tokens repeat whole rows.
    zstd matches those in 8-bit rows, not in 4-bit bytes that pair rows t and t + T/2, so
    such a plane stays 8-bit even though nothing escapes at 4 bits."""
    chunk = synthetic_kv(LAYOUT, 128)
    rows = chunk[0, 1, :5].clone()
    chunk[0, 1] = rows.repeat(26, 1, 1)[:128] / 8  # 5 distinct tokens, small values
    codec = CacheGenCodec(4)
    tensors, params = codec.encode(chunk, LAYOUT)
    assert params["sym_bits"][1] == 8  # plane 2 * layer + kv = layer 0's V
    assert nmse(codec.decode(tensors, params, LAYOUT, 128)[0, 1], chunk[0, 1]) < 0.2


def test_cachegen_keeps_outliers_exact():
    chunk = synthetic_kv(LAYOUT, 64)
    chunk[2, 0, 10, 1, 3] = 300.0  # far outside its channel's range
    codec = CacheGenCodec(6)
    out = codec.decode(*codec.encode(chunk, LAYOUT), LAYOUT, 64)
    assert out[2, 0, 10, 1, 3] == 300.0


# -- cachegen: keys coded before RoPE ---------------------------------------------------------


def _rope_keys(pre: torch.Tensor, layout: KVLayout, start: int) -> torch.Tensor:
    """``pre`` ``[L, 2, T, H, D]`` with K rotated at positions ``start, ...`` (fp32 math),
    in the layout's dtype: what an engine caches."""
    out = pre.float().clone()
    assert layout.rope is not None
    out[:, 0] = rope_reference(out[:, 0], start, layout.rope)
    return out.to(layout.torch_dtype)


def test_cachegen_codes_keys_before_rope():
    """Keys that are one vector per head turned by position (a previous-token head's
    positional keys) are a sinusoid per channel after RoPE but a constant before it: coded
    before RoPE, the channel mean holds them and the steps (relative to each channel's
    spread) shrink to the small per-token part, so they come back far more exactly for
    about the same bits. V is untouched."""
    layout = KVLayout("rope", num_layers=2, num_kv_heads=2, head_dim=32, dtype="bfloat16")
    T, start = 128, 1000
    g = torch.Generator().manual_seed(0)
    pre = synthetic_kv(layout, T).float()
    pre[:, 0] = torch.randn(2, 1, 2, 32, generator=g) * 2 \
        + 0.05 * torch.randn(2, T, 2, 32, generator=g)
    chunk = _rope_keys(pre, layout, start)
    codec = CacheGenCodec()
    t_post, p_post = codec.encode(chunk, layout)
    t_pre, p_pre = codec.encode(chunk, layout, rope_start=start)
    assert p_post["key_rope_start"] is None and p_pre["key_rope_start"] == start
    out_post = codec.decode(t_post, p_post, layout, T)
    out_pre = codec.decode(t_pre, p_pre, layout, T)
    assert bits_per_element(t_pre, chunk) < 1.15 * bits_per_element(t_post, chunk)
    assert nmse(out_pre[:, 0], chunk[:, 0]) < nmse(out_post[:, 0], chunk[:, 0]) / 100
    assert torch.equal(out_pre[:, 1], out_post[:, 1])


@pytest.mark.parametrize("rope", [
    RopeSpec(theta=500000.0),
    RopeSpec(style=RopeStyle.GPTJ),
    RopeSpec(rotary_dim=16),  # partial rotary: dims past 16 are coded as given
    RopeSpec(scaling_type="linear", scaling_factor=4.0),
    RopeSpec(theta=500000.0, scaling_type="llama3", scaling_factor=8.0, low_freq_factor=1.0,
             high_freq_factor=4.0, original_max_position=8192),
], ids=["neox", "gptj", "partial", "linear", "llama3"])
def test_cachegen_pre_rope_roundtrip(rope):
    layout = KVLayout("rope", num_layers=3, num_kv_heads=2, head_dim=32, dtype="bfloat16",
                      rope=rope)
    T, start = 40, 77
    pre = synthetic_kv(layout, T, seed=3)
    chunk = _rope_keys(pre, layout, start)
    codec = CacheGenCodec()
    tensors, params = codec.encode(chunk, layout, rope_start=start)
    assert params["key_rope_start"] == start
    out = codec.decode(tensors, params, layout, T)
    # about the error of coding the un-rotated keys directly
    direct = codec.decode(*codec.encode(pre, layout), layout, T)
    assert nmse(out[:, 0], chunk[:, 0]) < 1.5 * nmse(direct[:, 0], pre[:, 0]) + 1e-4
    assert nmse(out[:, 1], chunk[:, 1]) == nmse(direct[:, 1], pre[:, 1])
    for layer in range(3):
        assert torch.equal(codec.decode_layer(tensors, params, layout, T, layer), out[layer])


def test_cachegen_codes_keys_as_given_without_known_rope():
    """Positions unknown, no RoPE, or a scaling ``RopeSpec`` cannot give frequencies for
    (llama3 without its parameters): keys are coded as given (and still round-trip)."""
    chunk = synthetic_kv(LAYOUT, 24)
    llama3 = KVLayout("s", num_layers=4, num_kv_heads=2, head_dim=32, dtype="bfloat16",
                      rope=RopeSpec(scaling_type="llama3", scaling_factor=8.0))
    no_rope = KVLayout("s", num_layers=4, num_kv_heads=2, head_dim=32, dtype="bfloat16",
                       rope=None)
    codec = CacheGenCodec()
    for layout, start in ((LAYOUT, None), (llama3, 5), (no_rope, 5)):
        tensors, params = codec.encode(chunk, layout, rope_start=start)
        assert params["key_rope_start"] is None
        assert nmse(codec.decode(tensors, params, layout, 24), chunk) < 0.1


def test_cachegen_keeps_non_finite_keys_exact_and_still_codes_keys_before_rope():
    """A rotation would smear an inf into its pair partner: it is rotated as a stand-in
    and written back after the keys are turned forward, so the inf comes back exactly
    where it was and its partner with the error it has without the inf."""
    layout = KVLayout("codec-test", num_layers=4, num_kv_heads=2, head_dim=32,
                      dtype="bfloat16", rope=RopeSpec())
    clean = synthetic_kv(layout, 24)
    chunk = clean.clone()
    chunk[1, 0, 5, 0, 3] = float("inf")
    codec = CacheGenCodec()
    tensors, params = codec.encode(chunk, layout, rope_start=100)
    assert params["key_rope_start"] == 100
    out = codec.decode(tensors, params, layout, 24)
    assert out[1, 0, 5, 0, 3] == float("inf")
    assert int((~torch.isfinite(out)).sum()) == 1
    ref = codec.decode(*codec.encode(clean, layout, rope_start=100), layout, 24)
    partner = (1, 0, 5, 0, 3 + 16)  # NeoX partner of dim 3 (head_dim 32)
    assert abs(float(out[partner]) - float(chunk[partner])) <= \
        1.5 * abs(float(ref[partner]) - float(clean[partner])) + 0.05


def test_cachegen_reads_version_2_objects():
    """Objects written before keys were coded pre-RoPE (format 2) still decode."""
    chunk = synthetic_kv(LAYOUT, 24)
    codec = CacheGenCodec()
    tensors, params = codec.encode(chunk, LAYOUT)
    old = {k: v for k, v in params.items() if k != "key_rope_start"} | {"version": 2}
    assert torch.equal(codec.decode(tensors, old, LAYOUT, 24),
                       codec.decode(tensors, params, LAYOUT, 24))


def test_store_hands_rope_start_to_codecs(tmp_path):
    """``put(rope_start=)`` reaches the codec, and so does a demotion's re-encode."""
    from kvcache.kvstore.disk_tier import DiskTier

    chunk = _rope_keys(synthetic_kv(LAYOUT, 32), LAYOUT, 64)
    raw_bytes = chunk.numel() * chunk.element_size()
    cpu = CpuTier(raw_bytes + 4096)
    with TieredStore([cpu, DiskTier(tmp_path / "d", 1 << 24)], codecs=["cachegen", "raw"]) \
            as store:
        store.put(make_key(0), chunk, LAYOUT, rope_start=64)
        header = cpu.header(make_key(0))
        assert header is not None and header.codec_params["key_rope_start"] == 64
    cpu = CpuTier(2 * raw_bytes)
    disk = DiskTier(tmp_path / "e", 1 << 24)
    with TieredStore([cpu, disk], codecs=["raw", "cachegen"]) as store:
        for i in range(3):  # the CPU tier holds one: the others demote to disk
            store.put(make_key(i), chunk, LAYOUT, rope_start=64 + i)
        store.flush()
        headers = [disk.header(make_key(i)) for i in range(3)]
        starts = {h.codec_params["key_rope_start"] for h in headers if h is not None}
        assert starts and starts <= {64, 65, 66}
        assert all(h.codec_params["key_rope_start"] == h.rope_start
                   for h in headers if h is not None)


def test_hadamard_rotation_helps_on_token_outliers():
    chunk = synthetic_kv(LAYOUT, 128)
    plain = QuantCodec(4, 64, rotate=False)
    rot = QuantCodec(4, 64, rotate=True)
    e_plain = nmse(plain.decode(*plain.encode(chunk, LAYOUT), LAYOUT, 128)[:, 1], chunk[:, 1])
    e_rot = nmse(rot.decode(*rot.encode(chunk, LAYOUT), LAYOUT, 128)[:, 1], chunk[:, 1])
    assert e_rot < e_plain


def test_registry_lists_known_names_on_unknown():
    assert {"raw", "zstd", "quant", "fp8", "cachegen"} <= set(codec_names())
    with pytest.raises(UnknownCodecError, match=r"known codecs: .*cachegen"):
        get_codec("cachegen-99")


@pytest.mark.parametrize("name", ["zstd", "quant", "fp8", "cachegen"])
def test_container_roundtrip_records_codec(name):
    chunk = synthetic_kv(LAYOUT, 16)
    tensors, params = get_codec(name).encode(chunk, LAYOUT)
    header = ObjectHeader(make_key(0), LAYOUT, 16, codec=name, codec_params=params)
    obj = decode_object(encode_object(StoredObject(header, tensors)))
    assert obj.header.codec == name
    out = get_codec(obj.header.codec).decode(obj.tensors, obj.header.codec_params, LAYOUT, 16)
    expected = get_codec(name).decode(tensors, params, LAYOUT, 16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("lower", ["quant", "cachegen"])
def test_store_demotes_to_disk_compressed(tmp_path, lower):
    from kvcache.kvstore.disk_tier import DiskTier

    chunks = {i: synthetic_kv(LAYOUT, 32, seed=i) for i in range(4)}
    raw_bytes = chunks[0].numel() * chunks[0].element_size()
    cpu = CpuTier(2 * raw_bytes + 4096)
    disk = DiskTier(tmp_path / "disk", 1 << 24)
    with TieredStore([cpu, disk], codecs=["raw", lower]) as store:
        for i, c in chunks.items():
            store.put(make_key(i), c, LAYOUT)
        store.flush()
        for i in chunks:
            info = disk.info(make_key(i))
            assert info is not None and info.codec == lower
            assert info.nbytes < raw_bytes / 2.5
        # The CPU tier holds two: a read of an evicted entry decodes the disk copy. Which
        # one was evicted depends on the background writer's timing (an entry it is still
        # reading is skipped), so pick whichever is gone.
        evicted = [i for i in chunks if not cpu.contains(make_key(i))]
        assert evicted
        got = store.get(make_key(evicted[0]))
        assert got is not None and nmse(got, chunks[evicted[0]]) < 0.1


# -- layer-wise and in-place decoding --------------------------------------------------------


@pytest.mark.parametrize("name", ["cachegen", "cachegen-1", "quant", "quant-int8"])
def test_decode_does_not_depend_on_torch_threads(name):
    chunk = synthetic_kv(LAYOUT, 40)
    codec = get_codec(name)
    tensors, params = codec.encode(chunk, LAYOUT)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.decode(tensors, params, LAYOUT, 40)
        torch.set_num_threads(3)
        many = codec.decode(tensors, params, LAYOUT, 40)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_cachegen_decode_into_and_odd_planes():
    # H * D * T odd: the 4-bit packing's halves differ by one symbol
    layout = KVLayout("odd", num_layers=2, num_kv_heads=1, head_dim=5, dtype="float16")
    chunk = synthetic_kv(layout, 3)
    codec = CacheGenCodec(6)
    tensors, params = codec.encode(chunk, layout)
    assert set(params["sym_bits"]) == {4}
    out = torch.full((2, *layout.chunk_shape(3)[1:]), float("nan"), dtype=torch.float16)
    codec.decode_into(tensors, params, layout, 3, [1, 0], out)
    whole = codec.decode(tensors, params, layout, 3)
    assert torch.equal(out[0], whole[1]) and torch.equal(out[1], whole[0])
    threaded = torch.empty_like(whole)
    codec.decode_into(tensors, params, layout, 3, range(2), threaded, threads=2)
    assert torch.equal(threaded, whole)
    assert nmse(whole, chunk) < 0.3
    with pytest.raises(ValueError, match="contiguous"):
        codec.decode_into(tensors, params, layout, 3, [0], out)


# -- LMCache side by side (bench) -------------------------------------------------------------


@pytest.mark.slow
def test_bench_served_chunk_load_reports_each_codec_beside_raw():
    from kvcache.tools import bench_codecs

    recs = bench_codecs._served_chunk_load(disk_gbps=1.0, repeat=1)
    assert recs[0]["codec"] == "raw" and recs[0]["vs_raw"] == 1.0
    assert [(r["codec"], r["threads"]) for r in recs[1:]] == [
        ("cachegen", 1), ("cachegen", 2), ("cachegen-1", 1), ("cachegen-1", 2),
        ("cachegen-rans", 1), ("cachegen-rans", 2), ("quant", 1),
    ]
    for r in recs[1:]:
        assert r["decode_ms"] > 0 and 1 < r["bits_per_element"] < 5
        # load = encoded bytes at 1 GB/s + decode; raw is 32 MiB at 1 GB/s
        raw_ms = 32 * 2**20 / 1e6
        assert r["vs_raw"] == pytest.approx(raw_ms / r["load_ms"])
        # at the raw-equal disk speed, the codec's load time equals raw's
        disk = r["raw_equal_disk_gb_s"] * 1e9
        enc = r["bits_per_element"] / 8 * 32 * 2**20 / 2
        assert enc / disk + r["decode_ms"] / 1e3 == pytest.approx(32 * 2**20 / disk)
