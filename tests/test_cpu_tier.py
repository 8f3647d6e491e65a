import threading

import pytest
import torch

from kvcache.kvstore.arena import ALIGNMENT, Arena
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import EntryPinnedError, ObjectTooLargeError, StoreFullError
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
