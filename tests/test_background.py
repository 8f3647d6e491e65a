"""Background threads run torch operators on their own thread, not on an OpenMP team that
would compete with the engine's (``kvstore/background.py``)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from kvcache.connectors.engine_store import open_engine_store
from kvcache.kvstore import background
from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.tiered_store import TieredStore

pytestmark = pytest.mark.skipif(not background._openmp_runtimes(),
                                reason="no OpenMP runtime loaded (torch without OpenMP)")


def _threads_seen_by(start: object) -> list[int]:
    seen: list[int] = []

    def work() -> None:
        torch.randn(1 << 20).add_(1)  # a parallel operator first: torch's lazy setup
        seen.append(torch.get_num_threads())

    if start is threading.Thread:
        t = threading.Thread(target=work)
        t.start()
    else:
        t = background.start(work, "kvcache-test")
    t.join()
    return seen


def test_a_background_thread_runs_torch_ops_alone_and_leaves_the_others_alone() -> None:
    n = torch.get_num_threads()
    torch.set_num_threads(n)  # as engines do: torch then gives every new thread n
    assert _threads_seen_by(background.start) == [1]
    assert _threads_seen_by(threading.Thread) == [n]
    assert torch.get_num_threads() == n


def test_a_background_thread_is_a_named_daemon_that_runs_its_target() -> None:
    got: list[int] = []
    t = background.start(got.append, "kvcache-test", (7,))
    t.join(5)
    assert got == [7] and t.daemon and t.name == "kvcache-test"


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no idle scheduling class here")
def test_an_idle_thread_runs_in_the_idle_class_and_the_others_keep_theirs() -> None:
    policies: list[int] = []

    def policy() -> None:
        policies.append(os.sched_getscheduler(0))

    for idle in (True, False):
        background.start(policy, "kvcache-test", idle=idle).join(5)
    assert policies == [os.SCHED_IDLE, os.SCHED_OTHER]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own is untouched


def _policy_of(thread: threading.Thread, want: int) -> int:
    """``thread``'s scheduling class once it has set it (it does so as it starts)."""
    deadline = time.monotonic() + 5
    while (got := os.sched_getscheduler(thread.native_id)) != want \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no idle scheduling class here")
def test_an_engines_store_writes_down_in_the_idle_class_and_a_daemons_does_not(tmp_path):
    def config(name: str) -> KVCacheConfig:
        return KVCacheConfig().with_overrides({
            "store.dir": str(tmp_path / name), "store.cpu.capacity": "16MiB",
            "store.disk.capacity": "64MiB"})

    engine = open_engine_store(config("engine"))  # what a connector opens: embedded
    daemon = TieredStore.open(config("daemon").store)  # what `kvcache serve` opens
    try:
        assert engine._writer is not None and daemon._writer is not None
        assert _policy_of(engine._writer, os.SCHED_IDLE) == os.SCHED_IDLE
        assert _policy_of(daemon._writer, os.SCHED_OTHER) == os.SCHED_OTHER
    finally:
        engine.close()
        daemon.close()
