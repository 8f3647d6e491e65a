"""Smoke test of ``kvcache bench store``: it runs and reports well-formed figures.

No timing assertions: benchmarks are programs, not tests (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math

from kvcache.tools import bench, bench_store, cli


def _positive_finite(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_run_tiny_reports_every_ratio(tmp_path):
    cfg = bench_store.StoreBenchConfig.tiny()
    result = bench_store.run(quick=True, workdir=tmp_path, config=cfg)

    json.dumps(result)  # JSON-ready
    for key in bench_store.HEADLINE_KEYS:
        assert _positive_finite(result[key]), (key, result[key])
    rows = result["rows"]
    # 3 CPU figures, and 4 disk figures per blob storage, for each shape.
    assert len(rows) == len(cfg.shapes) * (3 + 4 * len(cfg.blob_storages))
    for row in rows:
        for field in ("value", "baseline_value", "ratio"):
            assert _positive_finite(row[field]), (row["figure"], field, row[field])
    assert {r["variant"] for r in rows if r["key"].startswith("disk")} == {"files", "lmdb"}
    assert result["method"]["cold_cache_method"] == "fadvise"  # as the tiny config asks
    assert all(_positive_finite(v) for v in result["profile_gbps"].values())
    assert list(tmp_path.iterdir()) == []  # the scratch directory was removed


def test_table_and_plot(tmp_path):
    result = bench_store.run(workdir=tmp_path / "w", config=bench_store.StoreBenchConfig.tiny())
    table = bench.format_table(result)
    assert "CPU tier get" in table and "copy_ into fresh tensor" in table
    path = bench.plot(result, tmp_path / "out")
    if path is None:  # matplotlib is optional: the result says why there is no plot
        assert any("matplotlib" in n for n in result["notes"])
    else:
        assert path.exists()


def test_unknown_benchmark_lists_known_names(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "known benchmarks:" in (err := capsys.readouterr().err) and "store" in err


def test_cli_hands_options_to_the_benchmark(monkeypatch, capsys):
    seen = {}

    def fake_run(name, quick=False):  # only the argument plumbing is under test here
        seen["quick"] = quick
        return {"benchmark": name, "rows": [], "notes": []}

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["bench", "store", "--quick", "--json"]) == 0
    assert seen["quick"] is True
    assert json.loads(capsys.readouterr().out)["benchmark"] == "store"


def test_codecs_plot_draws_bits_against_fidelity_or_says_why_not(tmp_path):

    records = [
        {"codec": "cachegen", "level": str(i), "bits_per_element": 4.0 - i,
         "next_token_kl": 10.0 ** -i, "top1_agreement": 1.0 - 0.01 * i}
        for i in range(1, 4)
    ] + [{"codec": "raw", "level": None, "bits_per_element": 16.0, "next_token_kl": 0.0,
          "top1_agreement": 1.0}]
    result = {"benchmark": "codecs", "date": "today", "records": records, "rows": []}
    path = bench.plot(result, tmp_path)  # dispatches to the codecs benchmark's own plot
    if path is None:
        assert any("matplotlib" in n for n in result["notes"])
    else:
        assert path.name == "bench-codecs.png" and path.stat().st_size > 1000
