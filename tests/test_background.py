"""Background threads run torch operators on their own thread, not on an OpenMP team that
would compete with the engine's (``kvstore/background.py``)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from kvcache.kvstore import background

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
