"""The paged engines' scheduler side (``connectors/paged_plan.py``) and worker side
(``connectors/paged_worker.py``) over a real store and real vLLM CPU page tensors; the same
code inside a running vLLM is tested in ``tests/vllm``."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch

from kvcache.connectors.paged_plan import PagedPlanner, RequestOps
from kvcache.connectors.paged_worker import PagedWorker
from kvcache.kernels.page_layout import (
    VllmCpuLayout,
    VllmFlashLayout,
    paged_planes,
    slots_from_block_table,
)
from kvcache.kernels.paged_copy import paged_gather, paged_scatter
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.keys import chunk_tokens
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore

LAYOUT = KVLayout("paged-test", num_layers=2, num_kv_heads=2, head_dim=16, dtype="float32")
CHUNK, BLOCK = 64, 16
PROMPT = list(range(1000, 1300))  # 300 tokens: 4 full chunks and one of 44


def store_prefix(store: TieredStore, prompt: list[int], chunks: int,
                 layout: KVLayout = LAYOUT) -> None:
    for c in chunk_tokens(layout.fingerprint, prompt, CHUNK)[:chunks]:
        store.put(c.prefix_key, torch.zeros(layout.chunk_shape(c.num_tokens)), layout,
                  rope_start=c.start)


@pytest.fixture
def store():
    with TieredStore.in_memory(64 << 20) as s:
        yield s


def planner(store: TieredStore, layout: KVLayout = LAYOUT, **kw) -> PagedPlanner:
    return PagedPlanner(layout, store.longest_prefix, chunk_size=CHUNK, block_size=BLOCK, **kw)


def test_hits_are_whole_blocks_and_never_the_last_token(store):
    p = planner(store)
    store_prefix(store, PROMPT, 5)  # every chunk, the partial last one too
    assert p.matched_tokens("r", PROMPT, 0) == 288  # 299 rounded down to blocks of 16
    store_prefix(store, PROMPT[:70], 1)
    assert p.matched_tokens("s", PROMPT[:70], 0) == 64


def test_the_engines_own_tokens_are_not_offered_again(store):
    p = planner(store)
    store_prefix(store, PROMPT, 2)
    assert p.matched_tokens("r", PROMPT, 32) == 96  # 128 held, 32 already computed
    assert p.matched_tokens("r", PROMPT, 160) == 0  # the engine has more than we do
    p.allocated("r", 0)
    ops = p.plan_step([("r", PROMPT, list(range(19)), 160)], [], {"r": 140})
    assert ops[0].load is None and ops[0].save == (128, 300)


def test_a_hit_shorter_than_a_block_is_no_hit(store):
    p = PagedPlanner(LAYOUT, store.longest_prefix, chunk_size=CHUNK, block_size=CHUNK)
    short = PROMPT[:64]  # one chunk, all of the prompt: the last token must be recomputed
    store_prefix(store, short, 1)
    assert p.matched_tokens("r", short, 0) == 0


def test_chunked_prefill_saves_each_chunk_once_in_the_step_that_completes_it(store):
    p = planner(store)
    assert p.matched_tokens("r", PROMPT, 0) == 0
    blocks = list(range(100, 119))
    steps = [p.plan_step([("r", PROMPT, blocks, 0)], [], {"r": 100}),
             p.plan_step([], [("r", None, False, 100)], {"r": 100}),
             p.plan_step([], [("r", None, False, 200)], {"r": 100}),
             p.plan_step([], [("r", None, False, 300)], {"r": 1})]  # decoding
    assert [[op.save for op in ops] for ops in steps] == [[(0, 64)], [(64, 192)], [(192, 300)],
                                                         []]
    last = steps[2][0]
    assert last.token_ids == PROMPT and last.block_ids == blocks


def test_a_load_is_planned_once_into_the_blocks_vllm_gave(store):
    p = planner(store)
    store_prefix(store, PROMPT, 3)
    assert p.matched_tokens("r", PROMPT, 0) == 192
    p.allocated("r", 192)
    blocks = list(range(19))
    (op,) = p.plan_step([("r", PROMPT, blocks, 192)], [], {"r": 108})
    assert op.load == (0, 192) and op.save == (192, 300)
    (again,) = p.plan_step([], [("r", None, False, 300)], {"r": 1}) or [None]
    assert again is None


def test_a_request_turns_off_its_own_loads_or_saves(store):
    """Per request, under the planner's own switches: no reuse (but its new chunks are
    stored, and only those the store lacks), or nothing of it stored (but it reuses)."""
    p = planner(store)
    store_prefix(store, PROMPT, 3)
    blocks = list(range(19))
    assert p.matched_tokens("no-load", PROMPT, 0, load=False) == 0
    (op,) = p.plan_step([("no-load", PROMPT, blocks, 0)], [], {"no-load": 300})
    assert op.load is None and op.save == (192, 300)
    assert p.matched_tokens("no-save", PROMPT, 0, save=False) == 192
    p.allocated("no-save", 192)
    (op,) = p.plan_step([("no-save", PROMPT, blocks, 192)], [], {"no-save": 108})
    assert op.load == (0, 192) and op.save is None
    assert p.plan_step([], [("no-save", None, False, 300)], {"no-save": 1}) == []
    off = planner(store, save=False)  # a request cannot turn on what the planner has off
    assert off.matched_tokens("r", PROMPT, 0, save=True) == 192
    off.allocated("r", 192)
    (op,) = off.plan_step([("r", PROMPT, blocks, 192)], [], {"r": 108})
    assert op.save is None


def test_an_async_load_is_planned_when_allocated_and_the_request_then_runs_from_it(store):
    p = planner(store, load_mode="async")
    store_prefix(store, PROMPT, 3)
    assert p.matched_tokens("r", PROMPT, 0) == 192 and p.load_async("r")
    blocks = list(range(19))
    p.allocated("r", 192, blocks)
    # The request waits for its KV: the step that allocated it does not schedule it.
    (op,) = p.plan_step([], [], {})
    assert op.load_async and op.load == (0, 192) and op.save is None
    assert op.block_ids == blocks[:12] and op.token_ids == PROMPT[:192]
    # Once loaded it is scheduled as new from the loaded tokens: no second load.
    (op,) = p.plan_step([("r", PROMPT, blocks, 192)], [], {"r": 108})
    assert op.load is None and op.save == (192, 300) and not op.load_async


def test_auto_loads_in_the_step_when_idle_and_beside_the_steps_when_busy(store):
    p = planner(store, load_mode="auto")
    store_prefix(store, PROMPT, 3)
    assert p.matched_tokens("a", PROMPT, 0) == 192 and not p.load_async("a")
    p.allocated("a", 192, list(range(19)))
    (op,) = p.plan_step([("a", PROMPT, list(range(19)), 192)], [], {"a": 108})
    assert op.load == (0, 192) and not op.load_async
    # "a" is running: a load for "b" now would hold its step up.
    assert p.matched_tokens("b", PROMPT, 0) == 192 and p.load_async("b")
    p.finished("a")
    assert p.matched_tokens("b", PROMPT, 0) == 192 and not p.load_async("b")
    assert p.matched_tokens("c", PROMPT[::-1], 0) == 0 and not p.load_async("c")
    sync = planner(store, load_mode="sync")
    sync.plan_step([("x", PROMPT[::-1], [0], 0)], [], {"x": 10})
    assert sync.matched_tokens("b", PROMPT, 0) == 192 and not sync.load_async("b")


def test_a_load_ending_inside_a_chunk_carries_that_chunks_tokens(store):
    p = planner(store)
    store_prefix(store, PROMPT, 5)
    # A shorter prompt shares the whole chunks; its last chunk [192, 250) is another one.
    assert p.matched_tokens("r", PROMPT[:250], 0) == 192
    assert p.matched_tokens("q", PROMPT, 0) == 288
    p.allocated("q", 288)
    (op,) = p.plan_step([("q", PROMPT, list(range(19)), 288)], [], {"q": 12})
    assert op.load == (0, 288) and len(op.token_ids) == 300  # chunk [256, 300) is keyed whole


def test_preemption_gets_new_blocks_and_keeps_what_was_saved(store):
    p = planner(store)
    p.matched_tokens("r", PROMPT, 0)
    p.plan_step([("r", PROMPT, list(range(19)), 0)], [], {"r": 200})
    # preempted: vLLM asks again from scratch, then resumes it with a new block list
    assert p.matched_tokens("r", PROMPT, 0) == 0  # nothing stored yet: the saver is async
    store_prefix(store, PROMPT, 3)
    assert p.matched_tokens("r", PROMPT, 0) == 192
    p.allocated("r", 192)
    new_blocks = list(range(50, 69))
    (op,) = p.plan_step([], [("r", new_blocks, True, 192)], {"r": 108})
    assert op.block_ids == new_blocks and op.load == (0, 192) and op.save == (192, 300)


def test_finished_and_aborted_requests_are_forgotten(store):
    p = planner(store)
    for r in ("a", "b", "c"):
        p.matched_tokens(r, PROMPT, 0)
    p.finished("a")
    p.finished("b")
    p.finished("never-seen")
    assert p.tracked() == 1


def test_every_rank_must_hold_a_chunk_for_it_to_count(store):
    tp = dataclasses.replace(LAYOUT, tp_size=2)
    p = planner(store, tp)
    store_prefix(store, PROMPT, 4, tp)  # rank 0
    store_prefix(store, PROMPT, 2, dataclasses.replace(tp, tp_rank=1))
    assert p.matched_tokens("r", PROMPT, 0) == 128


def test_load_and_save_switches(store):
    store_prefix(store, PROMPT, 5)
    off = planner(store, load=False, save=False)
    assert off.matched_tokens("r", PROMPT, 0) == 0
    assert off.plan_step([("r", PROMPT, list(range(19)), 0)], [], {"r": 300}) == []


def test_chunks_must_be_whole_blocks(store):
    with pytest.raises(ConfigError, match="multiple of the engine's block size"):
        PagedPlanner(LAYOUT, store.longest_prefix, chunk_size=64, block_size=48)


# -- the worker side over real pages ---------------------------------------------------------
def pages(num_blocks: int = 40, kind: type = VllmCpuLayout):
    """vLLM pages of one layer (CPU attention's by default), a tensor per layer, and
    those tensors' planes."""
    layout = kind(num_layers=1, num_blocks=num_blocks, block_size=BLOCK, num_kv_heads=2,
                  head_dim=16)
    kv = [layout.allocate(torch.float32)[0] for _ in range(LAYOUT.num_layers)]
    return layout, kv, [paged_planes(layout, [t]) for t in kv]


@pytest.mark.parametrize("kind", [VllmCpuLayout, VllmFlashLayout])
def test_a_worker_saves_what_it_copied_out_and_loads_it_into_other_blocks(store, kind):
    layout, kv, planes = pages(kind=kind)
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    g = torch.Generator().manual_seed(0)
    src_blocks = list(range(0, 19))
    slots = slots_from_block_table(src_blocks, BLOCK, 0, 300)
    want = torch.randn(2, 2, 300, 2, 16, generator=g)
    for i in range(2):
        paged_scatter(planes[i], slots, want[i : i + 1])
    save = RequestOps("r", PROMPT, src_blocks, save=(0, 300))
    for i in range(2):
        worker.save_layer(i, [save])
    worker.end_step()
    assert worker.wait_saved(10)
    assert worker.take_stats().save_tokens == 300

    dst_blocks = list(range(20, 39))
    load = RequestOps("s", PROMPT, dst_blocks, load=(0, 288))
    worker.start_loads([load])
    for i in range(2):
        worker.load_layer(i)
    worker.end_step()
    assert worker.failed_blocks() == set()
    dst = slots_from_block_table(dst_blocks, BLOCK, 0, 288)
    for i in range(2):
        assert torch.equal(paged_gather(planes[i], dst)[0], want[i, :, :288])
    stats = worker.take_stats()
    assert stats.load_tokens == 288 and stats.load_tokens_by_tier == {"cpu": 288}
    worker.close()


def test_a_missing_chunk_fails_its_blocks_and_a_missed_layer_fails_the_load(store):
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    store_prefix(store, PROMPT, 2)  # chunks 0 and 1 only
    blocks = list(range(19))
    worker.start_loads([RequestOps("r", PROMPT, blocks, load=(0, 256))])
    worker.load_layer(0)
    worker.load_layer(1)
    worker.end_step()
    assert worker.failed_blocks() == set(blocks[8:16])  # tokens 128..256
    worker.start_loads([RequestOps("r", PROMPT, blocks, load=(0, 128))])
    worker.load_layer(0)  # layer 1's hook never ran
    worker.end_step()
    assert worker.failed_blocks() == set(blocks[:8])
    assert worker.take_stats().failed_loads == 2
    worker.close()


def _wait_loaded(worker: PagedWorker, req_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while req_id not in worker.finished_loads():
        assert time.monotonic() < deadline, f"{req_id}'s load never finished"
        time.sleep(0.005)


def test_an_async_load_fills_the_blocks_outside_the_steps_and_reports_when_done(store):
    layout, kv, planes = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    want = torch.randn(2, 2, 300, 2, 16, generator=torch.Generator().manual_seed(1))
    for c in chunk_tokens(LAYOUT.fingerprint, PROMPT, CHUNK):
        store.put(c.prefix_key, want[:, :, c.start : c.end].contiguous(), LAYOUT,
                  rope_start=c.start)
    blocks = list(range(20, 39))
    worker.start_loads([RequestOps("r", PROMPT[:256], blocks[:16], load=(0, 256),
                                   load_async=True)])
    worker.end_step()  # the step that started it neither waits for it nor accounts it
    _wait_loaded(worker, "r")
    assert worker.failed_blocks() == set()
    dst = slots_from_block_table(blocks, BLOCK, 0, 256)
    for i in range(2):
        assert torch.equal(paged_gather(planes[i], dst)[0], want[i, :, :256])
    assert worker.take_stats().load_tokens == 256
    worker.close()


def test_a_failed_async_load_reports_its_blocks_before_or_with_being_done(store):
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK, load_timeout=0.5)
    store_prefix(store, PROMPT, 2)  # chunk 2 is missing
    blocks = list(range(19))
    worker.start_loads([RequestOps("r", PROMPT[:192], blocks[:12], load=(0, 192),
                                   load_async=True)])
    _wait_loaded(worker, "r")
    assert worker.failed_blocks() == set(blocks[8:12])
    # A store that fails outright: the whole load fails, and is still reported done.
    store.close()
    worker.start_loads([RequestOps("s", PROMPT[:128], blocks[:8], load=(0, 128),
                                   load_async=True)])
    _wait_loaded(worker, "s")
    assert worker.failed_blocks() == set(blocks[:8])
    worker.close()


def test_an_aborted_requests_async_load_is_reported_done_once(store):
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    store_prefix(store, PROMPT, 4)
    worker.start_loads([RequestOps("r", PROMPT[:256], list(range(16)), load=(0, 256),
                                   load_async=True)])
    done = worker.finished_loads({"r"})  # aborted: done now or at its next layer
    if "r" not in done:
        _wait_loaded(worker, "r")
    assert worker.finished_loads() == set()
    assert worker.failed_blocks() == set()  # nothing for the engine to recompute
    worker.close()


def test_saves_past_the_staging_limit_are_skipped_not_waited_for(store):
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK,
                         max_pending_saves=64 * 2 * 2 * 2 * 16 * 4)  # one chunk's staging
    ops = [RequestOps("a", PROMPT, list(range(19)), save=(0, 64)),
           RequestOps("b", PROMPT[::-1], list(range(19)), save=(0, 64))]
    for i in range(2):
        worker.save_layer(i, ops)
    worker.end_step()
    assert worker.wait_saved(10)
    stats = worker.take_stats()
    assert stats.skipped_saves == 1 and stats.save_tokens == 64
    worker.close()


def test_a_step_whose_load_failed_saves_nothing_of_that_request(store):
    """The tokens computed in that step attended to KV that never loaded."""
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    store_prefix(store, PROMPT, 1)  # chunk 1 is missing: the load of [0, 128) fails half
    bad = RequestOps("r", PROMPT, list(range(19)), load=(0, 128), save=(128, 300))
    good = RequestOps("s", PROMPT[::-1], list(range(19, 38)), save=(0, 64))
    worker.start_loads([bad])
    for i in range(2):
        worker.load_layer(i)
        worker.save_layer(i, [bad, good])
    worker.end_step()
    assert worker.wait_saved(10)
    assert worker.failed_blocks() == set(range(4, 8))
    stats = worker.take_stats()
    assert stats.save_tokens == 64 and stats.skipped_saves == 1
    assert not store.contains(chunk_tokens(LAYOUT.fingerprint, PROMPT, CHUNK)[2].prefix_key)
    worker.close()


def test_opaque_pages_are_stored_and_loaded_as_they_are(store):
    """A page format kvcache cannot read (bf16 packed for AMX) is stored as the engine's
    bytes, whole chunks only, and loaded back bit for bit into other blocks."""
    opaque = dataclasses.replace(LAYOUT, page_format="vllm-cpu-amx-b16")
    layout, kv, _ = pages()
    g = torch.Generator().manual_seed(3)
    src = list(range(19))
    for t in kv:
        t[src] = torch.randn(t[src].shape, generator=g)
    worker = PagedWorker(store, opaque, layout, kv, chunk_size=CHUNK)
    save = RequestOps("r", PROMPT, src, save=(0, 300))
    for i in range(2):
        worker.save_layer(i, [save])
    worker.end_step()
    assert worker.wait_saved(10)
    assert worker.take_stats().save_tokens == 256  # the partial chunk [256, 300) is not
    keys = [c.prefix_key for c in chunk_tokens(opaque.fingerprint, PROMPT, CHUNK)]
    assert [store.contains(k) for k in keys] == [True] * 4 + [False]

    dst = list(range(20, 39))
    worker.start_loads([RequestOps("s", PROMPT, dst, load=(64, 240))])  # mid-chunk end
    for i in range(2):
        worker.load_layer(i)
    worker.end_step()
    assert worker.failed_blocks() == set()
    for t in kv:
        assert torch.equal(t[dst[4:15]], t[src[4:15]])  # blocks 4..14: tokens 64..240
        assert not t[dst[15]].any() and not t[dst[3]].any()
    worker.close()


def test_saves_queued_back_to_back_each_store_their_own_tokens(store):
    """The saver reuses one conversion buffer: a save must be stored before the next
    one overwrites it."""
    layout, kv, planes = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    g = torch.Generator().manual_seed(3)
    prompts, wants = [PROMPT, PROMPT[::-1]], []
    for step, prompt in enumerate(prompts):
        blocks = list(range(step * 19, step * 19 + 19))
        want = torch.randn(2, 2, 300, 2, 16, generator=g)
        for i in range(2):
            paged_scatter(planes[i], slots_from_block_table(blocks, BLOCK, 0, 300),
                          want[i : i + 1])
        op = RequestOps(f"r{step}", prompt, blocks, save=(0, 300))
        for i in range(2):
            worker.save_layer(i, [op])
        worker.end_step()  # queued; the next step's pages are written meanwhile
        wants.append(want)
    assert worker.wait_saved(10)
    for prompt, want in zip(prompts, wants, strict=True):
        for c in chunk_tokens(LAYOUT.fingerprint, prompt, CHUNK):
            assert torch.equal(store.get(c.prefix_key), want[:, :, c.start : c.end])
    worker.close()


def test_a_stored_saves_staging_is_reused_by_the_next_save(store):
    """Staging buffers go back to the worker once stored (a fresh one would be faulted in
    inside the forward pass): the next save copies into the same memory, and each save
    stores its own tokens."""
    layout, kv, planes = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    g = torch.Generator().manual_seed(4)
    buffers = []
    for step, (prompt, n) in enumerate([(PROMPT, 300), (PROMPT[::-1], 128)]):
        blocks = list(range(step * 19, step * 19 + 19))
        want = torch.randn(2, 2, n, 2, 16, generator=g)
        for i in range(2):
            paged_scatter(planes[i], slots_from_block_table(blocks, BLOCK, 0, n),
                          want[i : i + 1])
        op = RequestOps(f"r{step}", prompt, blocks, save=(0, n))
        for i in range(2):
            worker.save_layer(i, [op])
        buffers.append(worker._saves[0].buffer)
        worker.end_step()
        assert worker.wait_saved(10)
        for c in chunk_tokens(LAYOUT.fingerprint, prompt[:n], CHUNK):
            assert torch.equal(store.get(c.prefix_key), want[:, :, c.start : c.end])
    assert buffers[1] is buffers[0]
    worker.close()


def test_the_smallest_free_staging_buffer_that_fits_is_taken(store):
    """With several free buffers, a save takes the smallest that holds it (by identity:
    buffers are tensors, which ``==`` compares element by element)."""
    layout, kv, _ = pages()
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK)
    ops = [RequestOps("a", PROMPT, list(range(19)), save=(0, 300)),
           RequestOps("b", PROMPT[::-1], list(range(19, 38)), save=(0, 64))]
    for i in range(2):
        worker.save_layer(i, ops)
    big, small = (s.buffer for s in worker._saves)
    worker.end_step()
    assert worker.wait_saved(10)
    assert sorted(b.numel() for b in worker._free_staging) == [small.numel(), big.numel()]
    op = RequestOps("c", PROMPT[1:], list(range(19)), save=(0, 64))
    for i in range(2):
        worker.save_layer(i, [op])
    assert worker._saves[0].buffer is small
    assert [b is big for b in worker._free_staging] == [True]
    worker.end_step()
    assert worker.wait_saved(10)
    worker.close()


def test_saves_wait_for_idle_cpu_until_half_the_backlog_then_a_normal_thread_stores_them(
        store, monkeypatch):
    """The saver thread is in the OS's idle class: a saturated engine starves it, so once
    more than half of max_pending_saves waits, a normal-priority thread stores saves too."""
    layout, kv, _ = pages()
    one = 64 * 2 * 2 * 2 * 16 * 4  # one 64-token chunk's staging
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK,
                         max_pending_saves=3 * one)
    stored_by: dict[str, tuple[str, int]] = {}  # key -> (thread, its scheduling policy)
    saver_busy, starved = threading.Event(), threading.Event()
    put = store.put

    def observed_put(key, *args, **kw):
        me = threading.current_thread().name
        stored_by[key] = (me, os.sched_getscheduler(0) if hasattr(os, "SCHED_IDLE") else 0)
        if me == "kvcache-saver":
            saver_busy.set()
            starved.wait(10)  # as if the engine kept every core
        put(key, *args, **kw)

    monkeypatch.setattr(store, "put", observed_put)
    key = {}
    for name, prompt in (("a", PROMPT), ("b", PROMPT[::-1])):
        op = RequestOps(name, prompt, list(range(19)), save=(0, 64))
        key[name] = chunk_tokens(LAYOUT.fingerprint, prompt, CHUNK)[0].prefix_key
        for i in range(2):
            worker.save_layer(i, [op])
        worker.end_step()
        if name == "a":  # one save waiting: under half the backlog, the idle saver's
            assert saver_busy.wait(10)
    deadline = time.monotonic() + 10  # two waiting: past half, stored at normal priority
    while not store.contains(key["b"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.contains(key["b"]) and not store.contains(key["a"])
    starved.set()
    assert worker.wait_saved(10)
    assert store.contains(key["a"])
    assert [stored_by[key[n]][0] for n in "ab"] == ["kvcache-saver", "kvcache-saver-catch-up"]
    if hasattr(os, "SCHED_IDLE"):
        assert [stored_by[key[n]][1] for n in "ab"] == [os.SCHED_IDLE, os.SCHED_OTHER]
    worker.close()


def test_with_quiet_s_the_saver_stores_only_once_the_engine_steps_pause(store, monkeypatch):
    """An engine computing on the CPU: what a step saved is stored once no step has run
    for quiet_s, not while the next steps run."""
    layout, kv, _ = pages()
    quiet = 0.3
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK, quiet_s=quiet)
    put_at: dict[str, float] = {}
    put = store.put

    def timed_put(key, *args, **kw):
        put_at[key] = time.monotonic()
        put(key, *args, **kw)

    monkeypatch.setattr(store, "put", timed_put)
    op = RequestOps("a", PROMPT, list(range(19)), save=(0, 128))
    keys = [c.prefix_key for c in chunk_tokens(LAYOUT.fingerprint, PROMPT, CHUNK)[:2]]
    for i in range(2):
        worker.save_layer(i, [op])
    worker.end_step()
    for _ in range(4):  # the next steps run back to back, each longer than quiet_s
        worker.save_layer(0, [])
        time.sleep(quiet * 1.5)
        assert not put_at
        worker.end_step()
    last_step = time.monotonic()
    assert worker.wait_saved(10)
    assert all(store.contains(k) for k in keys)
    assert min(put_at.values()) >= last_step + quiet * 0.9  # a monotonic clock's slack
    worker.close()


def test_with_quiet_s_the_store_writes_to_disk_only_once_the_engine_steps_pause(tmp_path):
    """The embedded store's disk writer waits for the same pauses as the saver: what
    reached the CPU tier goes to disk between the engine's steps, not during them."""
    store = TieredStore([CpuTier(64 << 20), DiskTier(tmp_path / "disk", 64 << 20)])
    layout, kv, _ = pages()
    quiet = 0.3
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK, quiet_s=quiet)
    assert store.write_gate is not None
    worker.save_layer(0, [])  # a step is under way
    store_prefix(store, PROMPT, 1)
    key = chunk_tokens(LAYOUT.fingerprint, PROMPT, CHUNK)[0].prefix_key
    disk = store.tiers[1]
    for _ in range(3):  # the next steps run back to back, each longer than quiet_s
        time.sleep(quiet * 1.5)
        assert not disk.contains(key)
        worker.end_step()
        worker.save_layer(0, [])
    worker.end_step()
    last_step = time.monotonic()
    deadline = last_step + 10
    while not disk.contains(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disk.contains(key) and time.monotonic() >= last_step + quiet * 0.9
    worker.close()
    assert store.write_gate is None
    store.close()


def test_with_quiet_s_past_half_the_backlog_saves_are_stored_between_steps(store):
    """A CPU engine that does not pause: past half of max_pending_saves, saves are
    stored while its steps go on, until at most half waits; the rest in the next pause."""
    layout, kv, _ = pages()
    one = 64 * 2 * 2 * 2 * 16 * 4  # one 64-token chunk's staging
    worker = PagedWorker(store, LAYOUT, layout, kv, chunk_size=CHUNK, quiet_s=60,
                         max_pending_saves=3 * one)
    keys = []
    for name, prompt in (("a", PROMPT), ("b", PROMPT[::-1])):
        op = RequestOps(name, prompt, list(range(19)), save=(0, 64))
        keys.append(chunk_tokens(LAYOUT.fingerprint, prompt, CHUNK)[0].prefix_key)
        for i in range(2):
            worker.save_layer(i, [op])
        worker.end_step()
        worker.save_layer(0, [])  # the next step is under way
    deadline = time.monotonic() + 10
    while not any(store.contains(k) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(store.contains(k) for k in keys) >= 1
    worker.quiet_s = 0.01  # the engine pauses: the rest is stored
    worker.end_step()
    assert worker.wait_saved(10)
    assert all(store.contains(k) for k in keys)
    worker.close()
