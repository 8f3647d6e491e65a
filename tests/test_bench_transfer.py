"""Smoke test of ``kvcache bench transfer``: it runs and reports well-formed figures.

No timing assertions: benchmarks are programs, not tests (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math

from kvcache.tools import bench, bench_transfer, cli


def test_tiny_run_reports_every_figure_beside_its_baseline():
    cfg = bench_transfer.TransferBenchConfig.tiny()
    result = bench_transfer.run(config=cfg)
    json.dumps(result)
    rows = result["rows"]
    # CPU: gather + scatter per layout, then pipelined vs serial and vs ideal, for a
    # matmul and a sleep as the per-layer compute.
    assert len(rows) == 2 * len(cfg.layouts) + 4
    assert {r["variant"] for r in rows[:-4]} == set(cfg.layouts)
    for r in rows:
        for f in ("value", "baseline_value", "ratio"):
            assert math.isfinite(r[f]) and r[f] > 0, (r["figure"], f)
    table = bench.format_table(result)
    assert "gather (torch)" in table and "max(transfer, compute)" in table


def test_registered_with_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(bench_transfer, "run",
                        lambda quick=False: {"benchmark": "transfer", "rows": [], "notes": []})
    assert cli.main(["bench", "transfer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["benchmark"] == "transfer"
