import pytest

from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.eviction import LFUPolicy, LRUPolicy, S3FIFOPolicy, make_policy


def test_lru_order():
    p = LRUPolicy()
    for k in "abcd":
        p.on_insert(k)
    p.on_access("a")
    p.on_remove("c")
    assert list(p.victims()) == ["b", "d", "a"]
    assert len(p) == 3


def test_lfu_order_breaks_ties_by_recency():
    p = LFUPolicy()
    for k in "abcd":
        p.on_insert(k)
    p.on_access("a")
    p.on_access("a")
    p.on_access("c")
    assert list(p.victims()) == ["b", "d", "c", "a"]
    p.on_remove("b")
    p.on_remove("d")
    assert list(p.victims()) == ["c", "a"]
    p.on_insert("e", hits=5)  # restored from an index with 5 prior hits
    assert list(p.victims()) == ["c", "a", "e"]


def test_s3fifo_evicts_one_hit_wonders_before_reused_keys():
    p = S3FIFOPolicy()
    for k in ["hot1", "hot2", *[f"cold{i}" for i in range(8)]]:
        p.on_insert(k)
    p.on_access("hot1")
    p.on_access("hot2")
    evicted = []
    for k in p.victims():
        evicted.append(k)
        p.on_remove(k)
        if len(evicted) == 8:
            break
    assert sorted(evicted) == sorted(f"cold{i}" for i in range(8))


def test_s3fifo_ghost_returns_to_main():
    p = S3FIFOPolicy()
    for k in "abc":
        p.on_insert(k)
    first = next(p.victims())
    p.on_remove(first)
    p.on_insert(first)  # seen again soon after eviction: admitted straight to main
    assert first in p._main


def test_victims_survive_removal_during_iteration():
    for p in (LRUPolicy(), LFUPolicy()):
        for k in "abc":
            p.on_insert(k)
        out = []
        for k in p.victims():
            out.append(k)
            p.on_remove(k)
        assert out == ["a", "b", "c"] and len(p) == 0


def test_unknown_policy_lists_known():
    with pytest.raises(ConfigError, match="lfu, lru, s3fifo"):
        make_policy("random")
