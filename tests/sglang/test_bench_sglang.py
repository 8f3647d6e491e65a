"""``kvcache bench sglang`` runs end to end on a small configuration and reports each figure
beside its baseline. No timing is asserted: the figures live in the benchmark's output
and docs/benchmarks.md.

Runs in a venv with sglang (``.ci/run``'s SGLang stage); skipped elsewhere.
"""

from __future__ import annotations

import pytest

pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                    reason="needs sglang (the CI's SGLang stage)")

from kvcache.tools.bench import format_table
from kvcache.tools.bench_sglang import LAYOUTS, run


@pytest.mark.slow
def test_every_figure_is_measured_beside_its_baseline():
    result = run(quick=True)
    variants = [(r["figure"], r["variant"]) for r in result["rows"]]
    for layout in LAYOUTS:
        assert ("set", f"cpu {layout}") in variants and ("get", f"cpu {layout}") in variants
    assert {("get", "disk cold"), ("get", "disk warm"), ("set", "disk page_first"),
            ("get", "daemon page_first"), ("set", "daemon page_first")} <= \
        set(variants)
    for r in result["rows"]:
        assert r["value"] > 0 and r["baseline_value"] > 0 and r["ratio"] > 0
        assert r["baseline"] in ("copy_", "copy_ per page", "HiCacheFile")
    table = format_table(result)
    assert "HiCacheFile" in table and "copy_" in table
