"""``kvcache demo`` runs quickly, reuses KV, matches a full prefill, and persists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvcache.tools import demo
from kvcache.tools.demo import format_table, run_demo

# float32 model; reuse only reorders the same arithmetic (observed ~1e-6).
MAX_LOGIT_DIFF = 1e-4


def test_run_demo_reuses_and_second_run_hits_disk(tmp_path: Path):
    first = run_demo(tmp_path, requests=2)
    for key in (
        "ttft_cold_s",
        "ttft_warm_s",
        "reused_tokens",
        "max_abs_logit_diff",
        "hits_by_tier",
        "requests",
    ):
        assert key in first
    assert first["reused_tokens"] > 0  # the chat round reuses the system prompt
    assert first["max_abs_logit_diff"] < MAX_LOGIT_DIFF
    assert first["ttft_cold_s"] > 0 and first["ttft_warm_s"] > 0
    assert "full prefill" in format_table(first)

    # A fresh store object on the same directory starts with an empty CPU tier.
    second = run_demo(tmp_path, requests=2)
    assert second["hits_by_tier"].get("disk", 0) > 0
    assert second["reused_tokens"] > first["reused_tokens"]
    assert second["max_abs_logit_diff"] < MAX_LOGIT_DIFF


def test_main_passes_cli_arguments_and_prints_json(tmp_path: Path, capsys, monkeypatch):
    seen = {}

    def fake_run_demo(store_dir, **kw):
        seen.update(store_dir=store_dir, **kw)
        return {"store_dir": str(store_dir), "reused_tokens": 1}

    # The real workload runs above; here only the CLI wiring is under test.
    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    args = argparse.Namespace(store=str(tmp_path), json=True, config=None)
    assert demo.main(args) == 0
    assert json.loads(capsys.readouterr().out) == {"store_dir": str(tmp_path), "reused_tokens": 1}
    assert seen["store_dir"] == tmp_path and seen["requests"] == demo.DEFAULT_REQUESTS
