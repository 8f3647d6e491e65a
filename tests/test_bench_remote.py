"""``kvcache bench remote --quick`` end to end: a real daemon, a real redis-server, client
processes; every figure is reported beside its baselines and the load run is clean.

No timing assertions: benchmarks are programs, not tests (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest

from kvcache.tools import bench, bench_remote, cli

pytestmark = [
    pytest.mark.slow,  # starts a daemon, redis-server and 16 client processes
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed"),
]


def _positive(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_quick_run_reports_every_figure_beside_its_baselines(capsys, tmp_path):
    assert cli.main(["bench", "remote", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = bench_remote.RemoteBenchConfig.quick()
    assert result["benchmark"] == "remote" and result["quick"] is True
    assert result["machine"]["cores"] >= 1 and result["machine"]["memory_gib"] > 0

    # Every backend measured for every (op, size, clients); the fast path only reads.
    figs = {(f["backend"], f["mode"], f["object_mib"], f["clients"]): f
            for f in result["figures"]}
    for mode, mib, n in itertools.product(("get", "put"), cfg.sizes_mib, cfg.clients):
        for backend in bench_remote.BACKENDS:
            f = figs.pop((backend, mode, mib, n), None)
            if backend == "fast-path" and mode == "put":
                assert f is None
                continue
            assert f is not None, (backend, mode, mib, n)
            assert f["errors"] == 0, f
            if not f.get("fell_back_to_http"):
                for field in ("gbps", "p50_ms", "p99_ms", "requests", "bytes"):
                    assert _positive(f[field]), (backend, mode, mib, n, field)
                assert f["p99_ms"] >= f["p50_ms"]
    assert not figs  # nothing else

    # Each figure beside its baselines: HTTP (TCP, unix) vs redis-server and vs the CPU
    # tier; the fast path vs the CPU tier, with its goal, and reported even when missing.
    rows = {(r["key"], r["object_mib"], r["clients"]): r for r in result["rows"]}
    keys = ["http_tcp_{m}_vs_redis", "http_unix_{m}_vs_redis", "http_tcp_{m}_vs_cpu_tier"]
    for mode, mib, n in itertools.product(("get", "put"), cfg.sizes_mib, cfg.clients):
        for key in [k.format(m=mode) for k in keys] + (
                ["fast_path_get_vs_cpu_tier"] if mode == "get" else []):
            r = rows.pop((key, mib, n))
            assert _positive(r["baseline_value"]), r
            assert _positive(r["baseline_p50_ms"]) and _positive(r["baseline_p99_ms"]), r
            if r["available"]:
                for field in ("value", "ratio", "p50_ms", "p99_ms"):
                    assert _positive(r[field]), (key, mib, n, field)
            else:
                assert key.startswith("fast_path") and r["value"] is None
    assert not rows
    by_key = {(r["key"], r["object_mib"]): r["goal"] for r in result["rows"]}
    assert by_key[("http_tcp_get_vs_redis", 4)] == bench_remote.GOAL_HTTP_VS_REDIS
    assert by_key[("http_tcp_get_vs_redis", 1)] is None
    assert by_key[("fast_path_get_vs_cpu_tier", 1)] == bench_remote.GOAL_FAST_PATH
    assert result["fast_path"]["available"] in (True, False)

    # The load run: requests of every kind, none failed, nothing corrupt or lost, and the
    # daemon's memory sampled at start, middle and end.
    load = result["load"]
    assert load["clients"] == cfg.load_clients and load["duration_s"] == 5.0
    assert all(_positive(v) for v in load["by_op"].values()), load
    assert load["errors"] == 0, load["first_error"]
    assert load["corrupt"] == 0 and load["misses"] == 0
    assert all(_positive(v) for v in load["daemon_rss_mib"].values())

    # The table shows every backend and the goals; the plot skips what is not available.
    table = bench.format_table(result)
    for label in bench_remote.LABELS.values():
        assert label in table
    assert "goals:" in table and "load: 16 clients" in table
    if bench.pyplot({}) is not None:
        assert bench.plot(result, tmp_path) == tmp_path / "bench-remote.png"


def test_registered_with_options(monkeypatch, capsys):
    seen = {}

    def fake_run(quick=False, duration=None):
        seen.update(quick=quick, duration=duration)
        return {"benchmark": "remote", "rows": [], "notes": []}

    monkeypatch.setattr(bench_remote, "run", fake_run)
    assert bench.run("remote", quick=True, duration=2.5)["benchmark"] == "remote"
    assert seen == {"quick": True, "duration": 2.5}
    assert cli.main(["bench", "remote", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["benchmark"] == "remote"
