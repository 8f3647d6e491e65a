"""kvcache's background threads, made to stay out of an engine's way on the CPU.

An engine computing on the CPU (vLLM's CPU backend, transformers) runs each operator on an
OpenMP team of one thread per core, whose threads wait for each other at the operator's
end. A torch operator called from *another* thread of the process (kvcache's saver, its
disk writer, a loader) gets an OpenMP team of its own, as large: the two teams
oversubscribe the cores, and a team thread that the kernel preempts holds its whole team
at the barrier while the other cores sit idle. Measured inside vLLM on a 2-core machine:
storing a request's last chunk (3-5 ms of the saver's time) left the engine's cores idle
for 60-90 ms of core time during the next ~250 ms request, which took 20-50 ms longer;
with the saver's operators on its own thread, the idle time and the delay were gone.

``start`` runs a background thread whose torch operators stay on that thread: OpenMP's
thread count is a per-thread setting, so the engine's own teams are left as they are.
``torch.set_num_threads`` is not used: it also changes process-wide state (the count
PyTorch gives the threads it starts later, the XNNPACK pool).

Work that can wait -- storing what an engine saved, copying objects down to disk -- runs
on ``start(..., idle=True)`` threads, in the OS's idle scheduling class (Linux
``SCHED_IDLE``): the kernel gives them a core only when nothing else wants it, and takes
it back the moment an engine thread wakes. An engine computing on the CPU keeps every
core busy while it runs a step (its team threads spin at their barriers between
operators), so that work moves to the gaps between steps instead of stretching them; on
a GPU node, where the engine leaves most cores idle, it runs at once as before. Such a
thread gets almost no CPU while the engine is saturated: its owner must bound what waits
for it (``PagedWorker`` stores saves at normal priority past half its backlog; the
store's writer is backed by the write-down an eviction makes). The class is one-way: an
unprivileged thread cannot leave it again, hence a thread per priority.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from collections.abc import Callable
from typing import Any

# OpenMP runtimes torch and its libraries load: GNU, Intel, LLVM.
_OPENMP_LIBRARY = re.compile(r"lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")


@functools.cache
def _openmp_runtimes() -> tuple[Any, ...]:
    """The ``omp_set_num_threads`` of every OpenMP runtime loaded in this process (each
    keeps its own settings); none where the process's mappings cannot be read."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return ()
    found = []
    for path in sorted(p for p in paths if _OPENMP_LIBRARY.search(os.path.basename(p))):
        try:
            fn = ctypes.CDLL(path).omp_set_num_threads  # the loaded copy: same handle
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_int]
        fn.restype = None
        found.append(fn)
    return tuple(found)


def serial_torch_ops() -> None:
    """Make torch operators called from the calling thread run on it alone (no OpenMP
    team). Only this thread's setting changes."""
    import torch

    # torch sets a thread's OpenMP thread count once, lazily, on its first operator (to
    # the process's torch.set_num_threads value): have it do that now, then override it.
    torch.get_num_threads()
    for set_num_threads in _openmp_runtimes():
        set_num_threads(1)


def idle_priority() -> bool:
    """Move the calling thread into the OS's idle scheduling class (Linux ``SCHED_IDLE``:
    it runs only on CPU time no other thread wants), for good. False where the OS has no
    such class or refuses; the thread then keeps its priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):
        return False
    return True


def _serial(target: Callable[..., object], idle: bool) -> Callable[..., None]:
    @functools.wraps(target)
    def run(*args: Any) -> None:
        serial_torch_ops()
        if idle:
            idle_priority()
        target(*args)

    return run


def start(target: Callable[..., object], name: str, args: tuple[Any, ...] = (), *,
          idle: bool = False) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` with serial torch operators; with
    ``idle``, in the OS's idle scheduling class (``idle_priority``), for work that can
    wait."""
    thread = threading.Thread(target=_serial(target, idle), args=args, name=name,
                              daemon=True)
    thread.start()
    return thread
