import threading

import pytest
import torch

from kvcache.kvstore.arena import ALIGNMENT, Arena
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import (
    CorruptObjectError,
    EntryPinnedError,
    ObjectTooLargeError,
    StoreFullError,
)
from tests.helpers import make_chunk, make_key

TOKENS = 8  # one object: 2*2*8*2*8 fp16 = 1 KiB


def obj_for(layout, i, tokens=TOKENS):
    header = ObjectHeader(make_key(i), layout, tokens)
    return StoredObject(header, {"kv": make_chunk(layout, tokens, i)})


def keys(*ids):
    return [make_key(i) for i in ids]


def test_arena_first_fit_and_coalescing():
    a = Arena(8 * ALIGNMENT)
    offs = [a.allocate(ALIGNMENT) for _ in range(8)]
    assert offs == [i * ALIGNMENT for i in range(8)] and a.allocate(1) is None
    a.free(offs[2], ALIGNMENT)
    a.free(offs[4], ALIGNMENT)
    assert a.allocate(2 * ALIGNMENT) is None  # free space exists but is fragmented
    a.free(offs[3], ALIGNMENT)  # coalesces 2..4 into one range
    assert a.allocate(3 * ALIGNMENT) == offs[2]
    assert a.used == 8 * ALIGNMENT


def test_put_get_roundtrip_is_exact_and_owned(layout):
    tier = CpuTier(1 << 20)
    o = obj_for(layout, 0)
    tier.put(make_key(0), o)
    got = tier.get(make_key(0))
    assert torch.equal(got.tensors["kv"], o.tensors["kv"])
    tier.delete(make_key(0))
    tier.put(make_key(1), obj_for(layout, 1))  # reuses the freed range
    assert torch.equal(got.tensors["kv"], o.tensors["kv"])  # our copy is unaffected
    assert tier.get(make_key(0)) is None


def test_exact_lru_eviction_order(layout):
    tier = CpuTier(4 * 1024)  # room for exactly 4 objects
    evicted = []
    tier.set_evict_handler(lambda k, o: evicted.append(k))
    for i in range(4):
        tier.put(make_key(i), obj_for(layout, i))
    tier.get(make_key(0))  # 0 becomes most recent: order is now 1, 2, 3, 0
    tier.put(make_key(4), obj_for(layout, 4))
    tier.put(make_key(5), obj_for(layout, 5))
    assert evicted == keys(1, 2)
    assert [tier.contains(k) for k in keys(0, 1, 2, 3, 4, 5)] == [1, 0, 0, 1, 1, 1]
    assert tier.stats().evictions == 2


def test_exact_lfu_eviction_order(layout):
    tier = CpuTier(3 * 1024, policy="lfu")
    evicted = []
    tier.set_evict_handler(lambda k, o: evicted.append(k))
    for i in range(3):
        tier.put(make_key(i), obj_for(layout, i))
    for _ in range(2):
        tier.get(make_key(0))
    tier.get(make_key(2))
    tier.put(make_key(3), obj_for(layout, 3))
    tier.put(make_key(4), obj_for(layout, 4))
    assert evicted == keys(1, 3)


def test_evict_handler_sees_the_victims_bytes(layout):
    tier = CpuTier(1024)
    seen = {}
    tier.set_evict_handler(lambda k, o: seen.setdefault(k, o.tensors["kv"].clone()))
    o = obj_for(layout, 0)
    tier.put(make_key(0), o)
    tier.put(make_key(1), obj_for(layout, 1))
    assert torch.equal(seen[make_key(0)], o.tensors["kv"])


def test_failing_evict_handler_loses_nothing(layout):
    tier = CpuTier(1024)
    tier.put(make_key(0), obj_for(layout, 0))

    def boom(k, o):
        raise OSError("disk on fire")

    tier.set_evict_handler(boom)
    with pytest.raises(OSError):
        tier.put(make_key(1), obj_for(layout, 1))
    assert tier.contains(make_key(0)) and not tier.contains(make_key(1))
    assert tier.used_bytes == 1024


def test_pinned_entries_are_never_evicted(layout):
    tier = CpuTier(2 * 1024)
    tier.put(make_key(0), obj_for(layout, 0))
    tier.put(make_key(1), obj_for(layout, 1))
    tier.set_pinned(make_key(0), True)
    tier.put(make_key(2), obj_for(layout, 2))
    assert tier.contains(make_key(0)) and not tier.contains(make_key(1))
    tier.set_pinned(make_key(2), True)
    with pytest.raises(StoreFullError, match="pinned"):
        tier.put(make_key(3), obj_for(layout, 3))
    with pytest.raises(EntryPinnedError):
        tier.delete(make_key(0))
    assert tier.delete(make_key(0), force=True)


def test_borrowed_entries_are_not_freed_under_the_reader(layout):
    tier = CpuTier(1024, busy_wait_s=0.05)
    o = obj_for(layout, 0)
    tier.put(make_key(0), o)
    with tier.borrow(make_key(0)) as view:
        with pytest.raises(StoreFullError):  # the only entry is being read
            tier.put(make_key(1), obj_for(layout, 1))
        tier.delete(make_key(0))  # unlinked now, freed when the borrow ends
        assert tier.used_bytes == 1024
        assert torch.equal(view.tensors["kv"], o.tensors["kv"])
    assert tier.used_bytes == 0
    tier.put(make_key(1), obj_for(layout, 1))


def test_too_large_object(layout):
    tier = CpuTier(512)
    with pytest.raises(ObjectTooLargeError, match="capacity"):
        tier.put(make_key(0), obj_for(layout, 0))
    assert tier.used_bytes == 0


def test_replace_keeps_pin_and_accounts_bytes(layout):
    tier = CpuTier(4096)
    tier.put(make_key(0), obj_for(layout, 0))
    tier.set_pinned(make_key(0), True)
    tier.put(make_key(0), obj_for(layout, 0, tokens=4))
    assert tier.info(make_key(0)).pinned and tier.info(make_key(0)).num_tokens == 4
    assert tier.used_bytes == 512 and tier.stats().entries == 1


def test_concurrent_readers_and_writers(layout):
    tier = CpuTier(16 * 1024)
    originals = {i: obj_for(layout, i) for i in range(40)}
    errors = []

    def writer(ids):
        for i in ids:
            tier.put(make_key(i), originals[i])

    def reader():
        for _ in range(200):
            for i in range(40):
                got = tier.get(make_key(i))
                want = originals[i].tensors["kv"]
                if got is not None and not torch.equal(got.tensors["kv"], want):
                    errors.append(i)

    threads = [threading.Thread(target=writer, args=(range(k, 40, 2),)) for k in range(2)]
    threads += [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert tier.stats().entries == 16 and tier.used_bytes == 16 * 1024


def test_put_waits_for_a_reader_instead_of_failing(layout):
    tier = CpuTier(1024)
    tier.put(make_key(0), obj_for(layout, 0))
    borrowed = threading.Event()
    done = threading.Event()

    def reader():
        with tier.borrow(make_key(0)):
            borrowed.set()
            done.wait(0.2)  # hold the only entry a little while

    t = threading.Thread(target=reader)
    t.start()
    borrowed.wait()
    tier.put(make_key(1), obj_for(layout, 1))  # waits for the reader, then evicts key 0
    t.join()
    assert tier.contains(make_key(1)) and not tier.contains(make_key(0))


@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared"])
def test_put_many_stores_a_batch_in_one_copy_with_per_object_outcomes(layout, shared,
                                                                     monkeypatch):
    tier = CpuTier(1 << 20, shared=shared)
    # Chunks one step apart in one buffer (pages of one host pool), put into an empty pool
    buf = torch.stack([make_chunk(layout, TOKENS, i) for i in range(6)])
    objs = [StoredObject(ObjectHeader(make_key(i), layout, TOKENS), {"kv": buf[i]})
            for i in range(6)]
    huge = obj_for(layout, 7, tokens=TOKENS * 2048)  # 2 MiB: more than the tier
    copies = []
    copy_ = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_",
                        lambda self, src, *a, **k: copies.append(1) or copy_(self, src, *a, **k))
    errors = tier.put_many([(make_key(i), o) for i, o in enumerate(objs)]
                           + [(make_key(7), huge), (make_key(8), objs[0])])
    monkeypatch.undo()
    assert errors[:6] == [None] * 6
    assert isinstance(errors[6], ObjectTooLargeError)
    assert isinstance(errors[7], CorruptObjectError)  # the object of another key
    # one strided copy for the six objects, plus each descriptor of a shared pool
    assert len(copies) == 1 + 6 * shared
    for i in range(6):
        assert torch.equal(tier.get(make_key(i)).tensors["kv"], buf[i])
    assert not tier.contains(make_key(7)) and not tier.contains(make_key(8))
    assert tier.stats().puts == 6
    if tier.index is not None:  # same-node readers see every object of the batch
        for i in range(6):
            found = tier.index.find(make_key(i))
            assert found is not None
    tier.close()


def test_put_many_into_a_tier_full_of_pinned_entries_changes_nothing(layout):
    tier = CpuTier(4 * 1024)
    for i in range(4):
        tier.put(make_key(i), obj_for(layout, i))
        tier.set_pinned(make_key(i), True)
    errors = tier.put_many([(make_key(i), obj_for(layout, i)) for i in (0, 9)])
    assert all(isinstance(e, StoreFullError) for e in errors)
    assert sorted(e.key for e in tier.scan()) == sorted(keys(0, 1, 2, 3))
    assert torch.equal(tier.get(make_key(0)).tensors["kv"], obj_for(layout, 0).tensors["kv"])


def test_put_many_larger_than_the_tier_keeps_what_one_by_one_puts_keep(layout):
    batch, single = CpuTier(16 * 1024), CpuTier(16 * 1024)
    items = [(make_key(i), obj_for(layout, i)) for i in range(40)]
    assert batch.put_many(items) == [None] * 40
    for key, o in items:
        single.put(key, o)
    kept = sorted(e.key for e in batch.scan())
    assert kept == sorted(e.key for e in single.scan()) and make_key(39) in kept
    for key in kept:
        assert torch.equal(batch.get(key).tensors["kv"], dict(items)[key].tensors["kv"])


def test_a_tier_first_written_in_inference_mode_takes_writes_outside_it(layout):
    tier = CpuTier(1 << 20)
    with torch.inference_mode():  # an engine's forward pass
        tier.put(make_key(0), obj_for(layout, 0))
    tier.put(make_key(1), obj_for(layout, 1))
    for i in (0, 1):
        assert torch.equal(tier.get(make_key(i)).tensors["kv"], obj_for(layout, i).tensors["kv"])


def test_a_batch_whose_evict_handler_fails_frees_what_it_reserved(layout):
    tier = CpuTier(16 * 1024)  # batches of up to 4 KiB: the three objects below are one
    for i in range(14):
        tier.put(make_key(i), obj_for(layout, i))

    def boom(k, o):
        raise OSError("disk on fire")
    tier.set_evict_handler(boom)
    # two objects fit in the free 2 KiB; the third needs an eviction, which fails
    with pytest.raises(OSError):
        tier.put_many([(make_key(i), obj_for(layout, i)) for i in (100, 101, 102)])
    assert sorted(e.key for e in tier.scan()) == sorted(keys(*range(14)))
    assert tier.used_bytes == 14 * 1024  # what was reserved for 100 and 101 is free again
    tier.set_evict_handler(None)
    assert tier.put_many([(make_key(i), obj_for(layout, i)) for i in (100, 101)]) == [None] * 2
