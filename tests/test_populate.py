"""The CPU tier commits its pool ahead of use (``store.cpu.populate``), without touching
what is written into the pool meanwhile."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import pytest
import torch

from kvcache.kvstore.config import StoreConfig
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.populate import PAGE
from kvcache.kvstore.tiered_store import TieredStore
from tests.helpers import make_chunk, make_key

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise populate is Linux's")

MiB = 1 << 20


def resident_fraction(t: torch.Tensor) -> float:
    """The share of ``t``'s whole pages that are in memory (``mincore``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    start = -(-t.data_ptr() // PAGE) * PAGE
    n = (t.data_ptr() + t.numel() * t.element_size() - start) // PAGE
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * PAGE), vec) == 0
    return sum(b & 1 for b in vec) / n


@pytest.mark.parametrize("shared", [False, True], ids=["private", "memfd"])
def test_the_pool_is_committed_ahead_of_use(shared):
    tier = CpuTier(256 * MiB, populate=True, shared=shared)
    try:
        assert tier._populator is not None and tier._populator.done.wait(60)
        assert resident_fraction(tier._pool) > 0.99
    finally:
        tier.close()
    lazy = CpuTier(256 * MiB, shared=shared)
    try:
        assert lazy._populator is None and resident_fraction(lazy._pool) < 0.5
    finally:
        lazy.close()


def test_objects_written_while_populating_are_kept(layout):
    chunks = [make_chunk(layout, 64, seed=i) for i in range(32)]
    with TieredStore([CpuTier(512 * MiB, populate=True)]) as store:
        for i, c in enumerate(chunks):
            store.put(make_key(i), c, layout)
        assert store.tiers[0]._populator.done.wait(60)
        for i, c in enumerate(chunks):
            assert torch.equal(store.get(make_key(i)), c)


def test_close_stops_population_at_once():
    tier = CpuTier(2048 * MiB, populate=True)
    tier.close()  # joins the thread: returns after one step at most
    assert tier._populator.done.is_set()


def test_the_config_switches_it(tmp_path):
    on = TieredStore.open(StoreConfig(dir=tmp_path / "a", cpu={"capacity": "64MiB"}))
    off = TieredStore.open(StoreConfig(dir=tmp_path / "b", cpu={"capacity": "64MiB",
                                                               "populate": False}))
    try:
        assert on.tiers[0]._populator is not None and off.tiers[0]._populator is None
    finally:
        on.close()
        off.close()
