"""Level controller on synthetic links."""

from __future__ import annotations

import pytest

from kvcache.codecs.controller import RECOMPUTE, ChunkOptions, LevelCost, plan_levels

MB = 1_000_000
GBIT = 1e9


def chunk(recompute_s: float = 0.5) -> ChunkOptions:
    """Three levels, best first: 8 MB, 4 MB, 2 MB."""
    return ChunkOptions(
        [LevelCost("l1", 8 * MB, 0.002), LevelCost("l2", 4 * MB, 0.002),
         LevelCost("l3", 2 * MB, 0.002)],
        recompute_s=recompute_s,
    )


def test_fast_link_takes_best_level():
    plan = plan_levels([chunk()] * 4, 100 * GBIT, budget_s=1.0)
    assert [d.level for d in plan.decisions] == ["l1"] * 4
    assert plan.meets_budget


def test_slower_links_take_smaller_levels():
    # 4 chunks at 10 Gbit/s: l1 = 6.4 ms each; budget 15 ms forces smaller levels
    plan = plan_levels([chunk()] * 4, 10 * GBIT, budget_s=0.015)
    levels = [d.level for d in plan.decisions]
    assert "l1" not in levels and plan.meets_budget
    plan = plan_levels([chunk()] * 4, 10 * GBIT, budget_s=0.03)
    assert plan.decisions[0].level == "l1" and plan.meets_budget


def test_recompute_when_even_the_smallest_level_is_slower():
    # 100 Mbit/s: 2 MB takes 0.16 s; prefill takes 0.05 s
    plan = plan_levels([chunk(recompute_s=0.05)] * 3, 0.1 * GBIT, budget_s=10.0)
    assert [d.level for d in plan.decisions] == [RECOMPUTE] * 3


def test_adapts_to_a_bandwidth_trace():
    trace = [100 * GBIT, 1 * GBIT, 100 * GBIT, 100 * GBIT]
    plan = plan_levels([chunk(recompute_s=1.0)] * 4, trace, budget_s=0.05)
    levels = [d.level for d in plan.decisions]
    assert levels[0] == "l1"
    assert levels[1] == "l3"  # the dip: only the smallest level keeps the budget in reach
    assert levels[3] == "l1"


def test_infeasible_budget_takes_fastest_options():
    plan = plan_levels([chunk(recompute_s=0.2)] * 2, 1 * GBIT, budget_s=0.001)
    assert [d.level for d in plan.decisions] == ["l3", "l3"]
    assert not plan.meets_budget


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        plan_levels([chunk()], [1e9, 1e9], 1.0)
    with pytest.raises(ValueError):
        plan_levels([chunk()], 0.0, 1.0)
