"""Hostile input: every decoder raises ``CorruptObjectError`` — never IndexError, a crash,
a huge allocation or silently wrong shapes — on truncated, corrupted or foreign objects.

These bypass the container checksum on purpose (it would catch most of them first): the
codecs themselves must be safe on whatever tensors and params they are handed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random

import pytest
import torch

from kvcache.codecs.registry import get_codec
from kvcache.kvstore.errors import CorruptObjectError
from kvcache.kvstore.layout import KVLayout, RopeSpec
from kvcache.tools.synthetic_kv import synthetic_kv

LAYOUT = KVLayout("fuzz", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16")
TOKENS = 20
NAMES = [
    "raw", "zstd", "quant", "quant-int2", "quant-int4-hadamard", "fp8", "cachegen",
    "cachegen-rans",
]


def _encoded(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    # rope_start: cachegen codes keys before RoPE, so its rotation is fuzzed too
    return get_codec(name).encode(synthetic_kv(LAYOUT, TOKENS), LAYOUT, rope_start=5)


def _encoded_with_raw_escapes(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    chunk = synthetic_kv(LAYOUT, TOKENS)
    chunk[0, 1, 3, 1, 4] = float("nan")
    chunk[1, 0, 7, 0, 9] = float("inf")
    chunk[1, 1, 19, 1, 15] = float("-inf")
    tensors, params = get_codec(name).encode(chunk, LAYOUT, rope_start=5)
    assert tensors["raw_idx"].numel() == 3
    return tensors, params


def _decode_all(name: str, tensors, params, tokens: int = TOKENS) -> None:
    codec = get_codec(name)
    out = codec.decode(tensors, params, LAYOUT, tokens)
    assert tuple(out.shape) == LAYOUT.chunk_shape(tokens)
    codec.decode_layer(tensors, params, LAYOUT, tokens, 1)


def _mutations(tensors: dict[str, torch.Tensor], rng: random.Random, only=None):
    """Yield (label, tensors) variants: dropped, truncated, wrong dtype, flipped bytes (of
    the tensors named in ``only``, default all)."""
    for name in sorted(only or tensors):
        t = {k: v.clone() for k, v in tensors.items()}
        del t[name]
        yield f"drop {name}", t
        v = tensors[name]
        if v.numel():
            t = dict(tensors)
            t[name] = v.reshape(-1)[: v.numel() // 2].clone()
            yield f"truncate {name}", t
        t = dict(tensors)
        t[name] = v.to(torch.int16) if v.dtype != torch.int16 else v.to(torch.int32)
        yield f"dtype {name}", t
        for _ in range(3 if v.numel() else 0):
            raw = v.clone().reshape(-1).view(torch.uint8)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(raw.numel())] = rng.randrange(256)
            t = dict(tensors)
            t[name] = raw.view(v.dtype).view(v.shape)
            yield f"flip {name}", t


@pytest.mark.parametrize("name", NAMES)
def test_fuzzed_tensors_raise_typed_errors(name):
    tensors, params = _encoded(name)
    rng = random.Random(name)
    for label, t in _mutations(tensors, rng):
        try:
            _decode_all(name, t, params)
        except CorruptObjectError:
            continue
        # A flipped payload byte may still decode (lossy data has no redundancy); that
        # is the container checksum's job. Structure changes must always be caught.
        assert label.startswith("flip"), f"{name}: {label} decoded without error"


LOSSY = ["quant", "quant-int4-hadamard", "fp8", "cachegen", "cachegen-rans"]


@pytest.mark.parametrize("name", LOSSY)
def test_fuzzed_raw_escapes_raise_typed_errors(name):
    """The exact-value escapes of NaN/inf (``codecs/_raw_escapes.py``): every structural
    damage is a ``CorruptObjectError``; flipped bytes either are or still decode."""
    tensors, params = _encoded_with_raw_escapes(name)
    _decode_all(name, tensors, params)
    rng = random.Random(name)
    for label, t in _mutations(tensors, rng, only=["raw_idx", "raw_val"]):
        try:
            _decode_all(name, t, params)
        except CorruptObjectError:
            continue
        assert label.startswith("flip"), f"{name}: {label} decoded without error"


@pytest.mark.parametrize("name", LOSSY)
def test_bad_raw_escape_indices_raise_typed_errors(name):
    tensors, params = _encoded_with_raw_escapes(name)
    numel = LAYOUT.num_layers * 2 * TOKENS * LAYOUT.num_kv_heads * LAYOUT.head_dim
    val = tensors["raw_val"]
    bad = {
        "past the end": [0, 5, numel],
        "negative": [-1, 5, 9],
        "repeated": [4, 4, 9],
        "decreasing": [9, 5, 4],
        "huge": [0, 5, 1 << 62],
    }
    for label, idx in bad.items():
        t = dict(tensors, raw_idx=torch.tensor(idx, dtype=torch.int64))
        with pytest.raises(CorruptObjectError):
            _decode_all(name, t, params)
            pytest.fail(label)  # reached only when it decoded: names the case
    for label, t in {
        "2-D indices": dict(tensors, raw_idx=tensors["raw_idx"][None]),
        "fewer values": dict(tensors, raw_val=val[:2]),
        "values of another dtype": dict(tensors, raw_val=val.float()),
        "only values": {k: v for k, v in tensors.items() if k != "raw_idx"},
    }.items():
        with pytest.raises(CorruptObjectError):
            _decode_all(name, t, params)
            pytest.fail(label)


@pytest.mark.parametrize("name", NAMES)
def test_bad_params_raise_typed_errors(name):
    """Every bad value either raises ``CorruptObjectError`` or is a valid alternative
    (e.g. ``rotate`` flipped) that still decodes to the right shape: never another error."""
    tensors, params = _encoded(name)
    bad_values = [None, -1, 0, 3, 1 << 40, "x", True, [], [1.0], {}, float("nan")]
    for key in params:
        for bad in bad_values:
            p = copy.deepcopy(params)
            p[key] = bad
            with contextlib.suppress(CorruptObjectError):
                _decode_all(name, tensors, p)
    if name != "raw":  # raw objects carry no params at all (format of version 1)
        with pytest.raises(CorruptObjectError):
            _decode_all(name, tensors, {**params, "version": 999})
        with pytest.raises(CorruptObjectError):
            _decode_all(name, tensors, {})


@pytest.mark.parametrize("name", NAMES)
def test_wrong_token_count_or_layout_raises(name):
    tensors, params = _encoded(name)
    with pytest.raises(CorruptObjectError):
        _decode_all(name, tensors, params, tokens=TOKENS + 16)
    other = KVLayout("fuzz", num_layers=3, num_kv_heads=2, head_dim=16, dtype="float16")
    with pytest.raises(CorruptObjectError):
        get_codec(name).decode(tensors, params, other, TOKENS)


@pytest.mark.parametrize("source", NAMES)
@pytest.mark.parametrize("target", ["zstd", "quant", "fp8", "cachegen"])
def test_other_codecs_objects_raise(source, target):
    if get_codec(source).name == get_codec(target).name:
        return
    tensors, params = _encoded(source)
    with pytest.raises(CorruptObjectError):
        _decode_all(target, tensors, params)


def test_cachegen_pre_rope_keys_need_the_layouts_rope():
    tensors, params = _encoded("cachegen")
    assert params["key_rope_start"] == 5
    for rope in (None, RopeSpec(scaling_type="yarn", scaling_factor=4.0)):
        other = dataclasses.replace(LAYOUT, rope=rope)
        with pytest.raises(CorruptObjectError, match="RoPE"):
            get_codec("cachegen").decode(tensors, params, other, TOKENS)


def test_cachegen_escape_index_out_of_range():
    tensors, params = _encoded("cachegen-6")
    tensors = dict(tensors)
    n = 3
    tensors["esc_idx"] = torch.tensor([0, 10**6, 5], dtype=torch.int32)
    tensors["esc_val"] = torch.zeros(n, dtype=torch.float16)
    tensors["esc_offsets"] = torch.tensor([0, n, n, n, n], dtype=torch.int64)
    with pytest.raises(CorruptObjectError):
        _decode_all("cachegen", tensors, params)


def test_cachegen_escapes_must_increase_per_plane():
    tensors, params = _encoded("cachegen-6")
    tensors = dict(tensors)
    tensors["esc_val"] = torch.zeros(3, dtype=torch.float16)
    # increasing within each plane, restarting in the next: fine
    tensors["esc_idx"] = torch.tensor([4, 9, 2], dtype=torch.int32)
    tensors["esc_offsets"] = torch.tensor([0, 2, 3, 3, 3], dtype=torch.int64)
    _decode_all("cachegen", tensors, params)
    tensors["esc_offsets"] = torch.tensor([0, 3, 3, 3, 3], dtype=torch.int64)
    with pytest.raises(CorruptObjectError, match="increasing"):
        _decode_all("cachegen", tensors, params)


def test_zstd_bomb_is_bounded():
    import zstandard

    _tensors, params = _encoded("zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    frames = torch.frombuffer(bytearray(bomb * 2), dtype=torch.uint8)
    t = {"data": frames, "offsets": torch.tensor([0, len(bomb), 2 * len(bomb)])}
    with pytest.raises(CorruptObjectError):
        _decode_all("zstd", t, params)
