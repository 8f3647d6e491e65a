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


def _decode_all(name: str, tensors, params, tokens: int = TOKENS) -> None:
    codec = get_codec(name)
    out = codec.decode(tensors, params, LAYOUT, tokens)
    assert tuple(out.shape) == LAYOUT.chunk_shape(tokens)
    codec.decode_layer(tensors, params, LAYOUT, tokens, 1)


def _mutations(tensors: dict[str, torch.Tensor], rng: random.Random):
    """Yield (label, tensors) variants: dropped, truncated, wrong dtype, flipped bytes."""
    for name in sorted(tensors):
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
