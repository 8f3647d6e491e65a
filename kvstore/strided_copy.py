"""``copy_many``: many ``dst.copy_(src)`` pairs, runs of evenly spaced ones in one copy.

Each ``copy_`` call costs a fork and join of torch's threads: ~10% of a 2 MiB page's copy
on two cores. Pages an engine allocated in one piece, and objects a store wrote in one
batch, lie one step apart in memory; a run of such pairs is one strided copy of
``[n, *shape]`` views instead of ``n`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _step(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """How many elements past ``a`` the view ``b`` starts, when ``b`` is ``a``'s like (same
    storage, shape, strides, dtype) further on; else None."""
    if (a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):
        return None
    step = int(b.storage_offset() - a.storage_offset())
    return step if step > 0 else None


def _stacked(t: torch.Tensor, n: int, step: int) -> torch.Tensor:
    """``n`` views like ``t``, ``step`` elements apart, as one: ``[n, *t.shape]``."""
    return t.as_strided((n, *t.shape), (step, *t.stride()), t.storage_offset())


def copy_many(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor]) -> None:
    """``dsts[i].copy_(srcs[i])`` for every ``i``. Consecutive pairs that lie one step
    apart on both sides, the same step each time, go in one strided copy. Distinct
    destinations must not overlap."""
    i = 0
    while i < len(dsts):
        j, steps = i + 1, None
        while j < len(dsts):
            dst, src = _step(dsts[j - 1], dsts[j]), _step(srcs[j - 1], srcs[j])
            if dst is None or src is None or (steps is not None and (dst, src) != steps):
                break
            steps, j = (dst, src), j + 1
        if steps is None:
            dsts[i].copy_(srcs[i])
        else:
            _stacked(dsts[i], j - i, steps[0]).copy_(_stacked(srcs[i], j - i, steps[1]))
        i = j
