"""Level controller: per chunk, which encoding level to load — or recompute from text.

CacheGen's streaming controller, as pure policy (no bytes touched). Chunks are fetched in
order over a link whose bandwidth is re-estimated before each chunk. For chunk ``i`` with
``R`` seconds of the budget left, it picks the best-quality level whose load time
``nbytes / bandwidth + decode_s`` still leaves room for every later chunk at that chunk's
*cheapest* option (at the current estimate). If nothing fits, it takes the fastest option,
so the overshoot is as small as it can be. A chunk is recomputed from text when prefilling
it is faster than even its smallest level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RECOMPUTE = "recompute"


@dataclass(frozen=True)
class LevelCost:
    """One stored encoding of a chunk: its size and its decode time on this machine."""

    level: str
    nbytes: int
    decode_s: float = 0.0

    def load_s(self, bandwidth_bps: float) -> float:
        return self.nbytes * 8 / bandwidth_bps + self.decode_s


@dataclass(frozen=True)
class ChunkOptions:
    """A chunk's available levels, **best quality first**, and its prefill time from text."""

    levels: Sequence[LevelCost]
    recompute_s: float


@dataclass(frozen=True)
class Decision:
    level: str  # a LevelCost.level, or RECOMPUTE
    est_s: float


@dataclass(frozen=True)
class Plan:
    decisions: list[Decision]
    total_s: float
    budget_s: float

    @property
    def meets_budget(self) -> bool:
        return self.total_s <= self.budget_s * (1 + 1e-9)


def _cheapest(chunk: ChunkOptions, bw: float) -> tuple[str, float]:
    """The fastest option of ``chunk`` at ``bw`` (ties go to loading, not recomputing)."""
    options = [(c.level, c.load_s(bw)) for c in chunk.levels]
    options.append((RECOMPUTE, chunk.recompute_s))
    return min(options, key=lambda o: o[1])


def plan_levels(
    chunks: Sequence[ChunkOptions],
    bandwidth_bps: float | Sequence[float],
    budget_s: float,
) -> Plan:
    """Choose a level (or ``RECOMPUTE``) per chunk.

    ``bandwidth_bps``: one link estimate (bits/s), or one per chunk — the estimate
    available when that chunk is requested (CacheGen re-estimates from the last chunk's
    throughput).
    """
    bws = (
        [float(bandwidth_bps)] * len(chunks)
        if isinstance(bandwidth_bps, (int, float))
        else [float(b) for b in bandwidth_bps]
    )
    if len(bws) != len(chunks):
        raise ValueError("give one bandwidth estimate per chunk, or one for all")
    if any(b <= 0 for b in bws) or budget_s < 0:
        raise ValueError("bandwidths must be > 0 and the budget >= 0")
    decisions: list[Decision] = []
    left = budget_s
    for i, chunk in enumerate(chunks):
        if not chunk.levels:
            raise ValueError(f"chunk {i} has no levels")
        bw = bws[i]
        smallest = min(c.load_s(bw) for c in chunk.levels)
        if chunk.recompute_s < smallest:
            choice = Decision(RECOMPUTE, chunk.recompute_s)
        else:
            rest = sum(_cheapest(c, bw)[1] for c in chunks[i + 1 :])
            fitting = [c for c in chunk.levels if c.load_s(bw) + rest <= left]
            if fitting:
                choice = Decision(fitting[0].level, fitting[0].load_s(bw))
            else:
                level, t = min(((c.level, c.load_s(bw)) for c in chunk.levels),
                               key=lambda o: o[1])
                choice = Decision(level, t)
        decisions.append(choice)
        left -= choice.est_s
    total = sum(d.est_s for d in decisions)
    return Plan(decisions, total, budget_s)
