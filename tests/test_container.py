import json
import struct

import pytest
import safetensors.torch
import torch

from kvcache.kvstore.container import (
    ObjectHeader,
    StoredObject,
    decode_header,
    decode_object,
    encode_object,
    read_object,
)
from kvcache.kvstore.errors import CorruptObjectError
from tests.helpers import make_chunk


@pytest.fixture
def obj(layout):
    tensors = {
        "kv": make_chunk(layout, 7),
        "scale": torch.arange(6, dtype=torch.float32).view(2, 3),
        "codes": torch.arange(5, dtype=torch.uint8),
    }
    header = ObjectHeader("ab" * 16, layout, 7, "raw", {"level": 3}, rope_start=512)
    return StoredObject(header, tensors)


def test_roundtrip_is_exact(obj):
    data = encode_object(obj)
    back = decode_object(data)
    assert back.header == obj.header
    assert set(back.tensors) == set(obj.tensors)
    for name, t in obj.tensors.items():
        assert torch.equal(back.tensors[name], t)
        assert back.tensors[name].dtype == t.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_dtypes_roundtrip(layout, dtype):
    t = torch.randn(3, 4).to(dtype)
    o = StoredObject(ObjectHeader("cd" * 16, layout, 1), {"x": t})
    assert torch.equal(decode_object(encode_object(o)).tensors["x"].view(torch.uint8),
                       t.view(torch.uint8))


def test_is_a_real_safetensors_file(obj):
    """Any safetensors reader can open it: no custom code is needed to inspect an object."""
    data = encode_object(obj)
    loaded = safetensors.torch.load(data)
    assert torch.equal(loaded["kv"], obj.tensors["kv"])
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    assert json.loads(meta["kvcache"])["rope_start"] == 512


def test_every_single_byte_flip_is_detected(obj):
    data = encode_object(obj)
    # Flip every byte of the header and a spread of payload bytes.
    (n,) = struct.unpack("<Q", data[:8])
    positions = list(range(0, 8 + n)) + list(range(8 + n, len(data), 97))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        with pytest.raises(CorruptObjectError):
            decode_object(bytes(bad))


def test_truncation_is_detected(obj):
    data = encode_object(obj)
    for cut in (0, 4, 8, 50, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptObjectError):
            decode_object(data[:cut])


def test_foreign_files_are_rejected(obj):
    plain = safetensors.torch.save({"x": torch.zeros(3)})
    with pytest.raises(CorruptObjectError):
        decode_object(plain)
    with pytest.raises(CorruptObjectError):
        decode_object(b"\x00" * 64)
    with pytest.raises(CorruptObjectError):
        decode_object(json.dumps({"a": 1}).encode())


def test_future_version_is_refused_with_a_clear_message(obj):
    from kvcache.kvstore import container

    header = obj.header.to_json() | {"version": container.FORMAT_VERSION + 1}
    with pytest.raises(CorruptObjectError, match="version"):
        ObjectHeader.from_json(header)


def test_decode_header_does_not_build_tensors(obj):
    header, table = decode_header(encode_object(obj))
    assert header == obj.header
    assert table["kv"]["shape"] == list(obj.tensors["kv"].shape)


def _dribble(data: bytes, step: int):
    """A stream that returns at most ``step`` bytes per read, like a slow pipe."""
    pos = 0

    def readinto(buf) -> int:
        nonlocal pos
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        return n

    return readinto


@pytest.mark.parametrize("step", [3, 64, 1 << 30])
def test_read_object_hashes_while_reading(obj, step):
    data = encode_object(obj)
    back = read_object(_dribble(data, step), len(data))
    assert back.header == obj.header
    assert torch.equal(back.tensors["kv"], obj.tensors["kv"])
    back.tensors["kv"].add_(1)  # the buffer is ours: writable


def test_read_object_detects_corruption_and_truncation(obj):
    data = encode_object(obj)
    for pos in (3, 40, len(data) - 5):
        bad = bytearray(data)
        bad[pos] ^= 1
        with pytest.raises(CorruptObjectError):
            read_object(_dribble(bytes(bad), 1000), len(bad))
    with pytest.raises(CorruptObjectError, match="truncated"):
        read_object(_dribble(data[:-10], 1000), len(data))
    with pytest.raises(CorruptObjectError):
        read_object(_dribble(data[:5], 1000), 5)


def test_segment_keying_round_trips_and_prefix_headers_are_unchanged(obj):
    import dataclasses

    assert "keying" not in obj.header.to_json()  # what prefix objects always wrote
    seg = StoredObject(dataclasses.replace(obj.header, keying="segment"), obj.tensors)
    assert seg.header.to_json()["keying"] == "segment"
    assert decode_object(encode_object(seg)).header.keying == "segment"
    assert decode_object(encode_object(obj)).header.keying == "prefix"
    bad = seg.header.to_json() | {"keying": "sideways"}
    with pytest.raises(CorruptObjectError):
        ObjectHeader.from_json(bad)


def test_index_records_take_an_optional_keying_and_nothing_else():
    from kvcache.kvstore.index_format import BadRecordError, decode_record, pack

    rec = {"nbytes": 10, "num_tokens": 4, "codec": "raw", "model_id": "m", "created_at": 1.0,
           "last_access": 1.0, "hits": 0, "pinned": False, "loc": "lmdb", "blob": None,
           "id": "x"}
    assert "keying" not in decode_record(pack(rec))
    assert decode_record(pack(rec | {"keying": "segment"}))["keying"] == "segment"
    for bad in (rec | {"keying": "sideways"}, rec | {"keying": 3}, rec | {"extra": 1}):
        with pytest.raises(BadRecordError):
            decode_record(pack(bad))
