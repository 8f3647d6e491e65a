"""``kvcache bench blend --quick`` runs end to end and reports what it measured. No figure
is asserted (they live in docs/benchmarks.md), only that each is there, beside its
baseline, and consistent with the others."""

from __future__ import annotations

import pytest

from kvcache.tools.bench_blend import RATIOS, format_table, plot, run


@pytest.mark.slow
def test_quick_blend_bench_reports_every_strategy_and_both_tiers(tmp_path):
    result = run(quick=True)
    q = result["quality"]
    assert q["tune_prompts"] >= 1 and q["eval_prompts"] >= 1
    strategies = {r["strategy"] for r in q["rows"]}
    assert strategies == {"full reuse", "full prefill", "cacheblend", "first-k",
                          "chunk reuse", "random"}
    for name in ("cacheblend", "first-k", "chunk reuse", "random"):
        assert sorted(r["ratio"] for r in q["rows"] if r["strategy"] == name) == list(RATIOS)
    for r in q["rows"]:
        assert r["gap_ci"][0] <= r["gap"] <= r["gap_ci"][1]
    prefill = next(r for r in q["rows"] if r["strategy"] == "full prefill")
    assert abs(prefill["gap"]) < 1e-4 and prefill["top1"] == 1.0
    assert q["full_reuse_penalty"]["gap"] > 0
    for t in result["ttft"]:
        assert t["full_prefill_s"] > 0 and t["blend_cpu_s"] > 0 and t["blend_disk_s"] > 0
        assert set(t["hits_cpu"]) == {"cpu"} and set(t["hits_disk"]) == {"disk"}
    table = format_table(result)
    assert "recovered by cacheblend" in table and "from disk" in table
    path = plot(result, tmp_path)
    assert path is not None and path.stat().st_size > 1000
