"""Bad input to the store is a typed ``KVCacheError`` saying what to fix, raised before
anything is allocated or written — never AttributeError, TypeError, RuntimeError or an OOM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import (
    ConfigError,
    InvalidKeyError,
    KVCacheError,
    LayoutMismatchError,
    ObjectTooLargeError,
)
from kvcache.kvstore.layout import KVLayout, RopeSpec
from kvcache.kvstore.tiered_store import TieredStore
from kvcache.kvstore.units import parse_size
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("test-model", 2, 2, 8, dtype="float16")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attention": "xyz"}, "unknown attention 'xyz'; use one of 'mha', 'gqa', 'mla'"),
        ({"num_layers": "4"}, "num_layers must be int, got '4'"),
        ({"num_kv_heads": True}, "num_kv_heads must be int, got True"),
        ({"head_dim": 8.0}, "head_dim must be int"),
        ({"dtype": 16}, "dtype must be str"),
        ({"rope": {"theta": "big"}}, "theta must be float, got 'big'"),
        ({"rope": {"style": "spiral"}}, "unknown rope style 'spiral'"),
        ({"rope": {"wavelength": 3}}, "not a RopeSpec"),
        ({"rope": 5}, "rope must be RopeSpec or None"),
        ({"model_id": None}, "model_id must be str"),
    ],
)
def test_bad_layouts_are_layout_errors(kwargs: dict, message: str) -> None:
    fields = {"model_id": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8} | kwargs
    with pytest.raises(LayoutMismatchError, match=message.replace("(", r"\(")):
        KVLayout(**fields)


def test_int_and_float_rope_theta_share_a_fingerprint() -> None:
    a = KVLayout("m", 2, 2, 8, rope=RopeSpec(theta=10000))
    b = KVLayout("m", 2, 2, 8, rope=RopeSpec(theta=10000.0))
    assert a.fingerprint == b.fingerprint == KVLayout("m", 2, 2, 8).fingerprint


def test_put_with_no_layout_is_a_layout_error() -> None:
    store = TieredStore.in_memory(1 << 20)
    with pytest.raises(LayoutMismatchError, match="layout must be a KVLayout, got NoneType"):
        store.put(make_key(1), make_chunk(LAYOUT, 4), None)  # type: ignore[arg-type]
    assert not store.contains(make_key(1))


@pytest.mark.parametrize("capacity", [-1, 0, 1.5, "4GiB", True])
def test_bad_cpu_capacities_are_config_errors(capacity: object) -> None:
    with pytest.raises(ConfigError, match="CPU tier capacity must be an integer > 0"):
        CpuTier(capacity)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TieredStore.in_memory(capacity)  # type: ignore[arg-type]


def test_cpu_capacity_beyond_this_machines_memory_is_refused_before_allocating() -> None:
    with pytest.raises(ConfigError, match="more than this machine's"):
        CpuTier(parse_size("1000TiB"))
    with pytest.raises(ConfigError, match=r"store\.cpu\.capacity: .* more than this machine"):
        KVCacheConfig.from_dict({"store": {"cpu": {"capacity": "1000TiB"}}})


@pytest.mark.parametrize("capacity", [0, -5, 1e30, "64GiB"])
def test_bad_disk_capacities_are_config_errors(tmp_path: Path, capacity: object) -> None:
    with pytest.raises(ConfigError, match="capacity_bytes must be an integer > 0"):
        DiskTier(tmp_path, capacity)  # type: ignore[arg-type]
    assert not (tmp_path / "index").exists()  # nothing created


@pytest.mark.parametrize(
    ("text", "message"),
    [("1.5", "not a whole number of bytes"), ("1e30", "not a size"),
     ("99999999TiB", "larger than any store"), ("-3GiB", "not a size")],
)
def test_sizes_that_mean_nothing_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_size(text)
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096


def test_huge_chunk_is_refused_before_the_codec_or_a_tier_allocates(tmp_path: Path) -> None:
    """2^31 tokens as an expanded view (no memory behind it): refused by size, never
    materialised (that would need 128 GiB)."""
    one = make_chunk(LAYOUT, 1)
    huge = one.expand(2, 2, 1 << 31, 2, 8)
    with TieredStore([CpuTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)]) as store:
        with pytest.raises(ObjectTooLargeError, match="larger than any tier"):
            store.put(make_key(1), huge, LAYOUT)
        assert not store.contains(make_key(1))
    from kvcache.kvstore.container import ObjectHeader, StoredObject

    with DiskTier(tmp_path / "e", 1 << 20) as disk:  # the tier on its own, too
        obj = StoredObject(ObjectHeader(make_key(2), LAYOUT, 1 << 31), {"kv": huge})
        with pytest.raises(ObjectTooLargeError, match="more than the disk tier's whole"):
            disk.put(make_key(2), obj)


@pytest.mark.parametrize("bad", ["xyz", "A" * 32, "0" * 31, 42, None])
def test_every_store_call_rejects_what_is_not_a_key(tmp_path: Path, bad: object) -> None:
    with TieredStore([CpuTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)]) as store:
        calls = [
            lambda: store.get(bad), lambda: store.get_many([bad]), lambda: store.contains(bad),
            lambda: store.where(bad), lambda: store.delete(bad), lambda: store.pin(bad),
            lambda: store.unpin(bad), lambda: store.longest_prefix([bad]),
            lambda: store.put(bad, make_chunk(LAYOUT, 2), LAYOUT),
        ]
        for call in calls:
            with pytest.raises(InvalidKeyError, match="keys are 32 lowercase hex digits"):
                call()


def test_bad_rope_start_and_batched_puts_store_nothing() -> None:
    store = TieredStore.in_memory(1 << 20)
    with pytest.raises(LayoutMismatchError, match="rope_start"):
        store.put(make_key(1), make_chunk(LAYOUT, 2), LAYOUT, rope_start=-1)
    with pytest.raises(LayoutMismatchError, match="one per chunk"):
        store.put_many([(make_key(1), make_chunk(LAYOUT, 2))], LAYOUT, rope_starts=[0, 2])
    with pytest.raises(KVCacheError):
        store.put_many([(make_key(1), make_chunk(LAYOUT, 2)),
                        (make_key(2), torch.zeros(3))], LAYOUT)
    assert not store.contains(make_key(1))
