"""Smoke test of ``kvcache bench store``: it runs and reports well-formed figures.

No timing assertions: benchmarks are programs, not tests (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.layout import KVLayout
from kvcache.tools import bench, bench_store, cli, cold_cache
from tests.helpers import page_cached

LAYOUT = KVLayout("test-model", 2, 2, 64, dtype="float16")


def _positive_finite(x: object) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_run_tiny_reports_every_ratio(tmp_path):
    cfg = bench_store.StoreBenchConfig.tiny()
    result = bench_store.run(quick=True, store=tmp_path, config=cfg)

    json.dumps(result)  # JSON-ready
    direct = result["disk_cold_get_vs_direct_read"] is not None  # refused O_DIRECT: a note
    assert direct or any("O_DIRECT" in n for n in result["notes"])
    for key in bench_store.HEADLINE_KEYS:
        if key != "disk_cold_get_vs_direct_read" or direct:
            assert _positive_finite(result[key]), (key, result[key])
    rows = result["rows"]
    # 3 CPU figures, and 4 disk figures (+1 beside O_DIRECT reads) per blob storage.
    assert len(rows) == len(cfg.shapes) * (3 + (4 + direct) * len(cfg.blob_storages))
    for row in rows:
        for field in ("value", "baseline_value", "ratio"):
            assert _positive_finite(row[field]), (row["figure"], field, row[field])
    assert {r["variant"] for r in rows if r["key"].startswith("disk")} == {"files", "lmdb"}
    assert result["method"]["cold_cache_method"] == "fadvise"  # the default
    assert all(_positive_finite(v) for v in result["profile_gbps"].values())
    assert list(tmp_path.iterdir()) == []  # the scratch directory was removed


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def tiny_quick(monkeypatch):
    """``--quick`` runs the smoke-test configuration, so the CLI can be driven for real."""
    monkeypatch.setattr(bench_store.StoreBenchConfig, "quick",
                        classmethod(lambda cls: cls.tiny()))


def test_store_option_runs_the_disk_part_inside_that_directory(
    tmp_path, monkeypatch, capsys, tiny_quick
):
    """--store DIR: the disk figures are measured in a scratch directory under DIR (so on
    DIR's disk); the store's own entries are untouched and nothing is left behind."""
    store = tmp_path / "store"
    with DiskTier(store / "disk", 64 << 20) as tier:
        obj = StoredObject(ObjectHeader("cd" * 16, LAYOUT, 4),
                           {"kv": torch.ones(LAYOUT.chunk_shape(4), dtype=torch.float16)})
        tier.put("cd" * 16, obj)
    (store / "notes.txt").write_text("mine")
    before = _snapshot(store)

    roots: list[Path] = []
    measure_disk = bench_store._bench_disk

    def spy(shape, cfg, storage, root, *args, **kwargs):  # the real benchmark, observed
        roots.append(root)
        assert root.is_dir()
        return measure_disk(shape, cfg, storage, root, *args, **kwargs)

    monkeypatch.setattr(bench_store, "_bench_disk", spy)
    assert cli.main(["bench", "store", "--quick", "--json", "--store", str(store)]) == 0
    result = json.loads(capsys.readouterr().out)

    assert roots and all(r.parent == store for r in roots)
    assert not roots[0].exists()
    assert _snapshot(store) == before
    assert str(store) in result["method"]["scratch_dir"]
    with DiskTier(store / "disk", 64 << 20) as tier:
        back = tier.get("cd" * 16)
        assert back is not None and torch.equal(back.tensors["kv"], obj.tensors["kv"])


def test_store_option_must_name_an_existing_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        bench_store.run(store=tmp_path / "nope", config=bench_store.StoreBenchConfig.tiny())
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fake_drop_caches(tmp_path, monkeypatch) -> Path:
    """Points the dropper at a file of ours instead of the host's /proc/sys/vm/drop_caches."""
    path = tmp_path / "drop_caches"
    path.write_text("0\n")
    monkeypatch.setattr(cold_cache.CacheDropper, "DROP_CACHES", path)
    return path


def test_the_host_page_cache_is_left_alone_by_default(tmp_path, fake_drop_caches):
    assert cold_cache.CacheDropper().method == "fadvise"
    store = tmp_path / "store"
    store.mkdir()
    result = bench_store.run(store=store, config=bench_store.StoreBenchConfig.tiny())
    assert result["method"]["cold_cache_method"] == "fadvise"
    assert "exactly the files" in result["method"]["cold_cache"]
    assert fake_drop_caches.read_text() == "0\n"  # never written


def test_drop_caches_only_when_asked_and_allowed(
    tmp_path, fake_drop_caches, monkeypatch, capsys, tiny_quick
):
    dropper = cold_cache.CacheDropper("drop_caches")
    assert "whole host" in dropper.description
    dropper.drop([])
    assert fake_drop_caches.read_text() == "1\n"

    fake_drop_caches.write_text("0\n")
    store = tmp_path / "store"
    store.mkdir()
    assert cli.main(["bench", "store", "--quick", "--json", "--store", str(store),
                     "--drop-caches"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["cold_cache_method"] == "drop_caches"
    assert fake_drop_caches.read_text() == "1\n"

    # Not writable (not root): refused. A missing file stands for it, since root may
    # write a read-only file anyway.
    monkeypatch.setattr(cold_cache.CacheDropper, "DROP_CACHES", tmp_path / "no" / "file")
    with pytest.raises(ConfigError, match="root"):
        cold_cache.CacheDropper("drop_caches")
    assert cli.main(["bench", "store", "--quick", "--store", str(store),
                     "--drop-caches"]) == 2  # refused before any work
    assert "root" in capsys.readouterr().err
    assert list(store.iterdir()) == []
    with pytest.raises(ConfigError, match="cold-cache method"):
        cold_cache.CacheDropper("everything")


def test_fadvise_dropper_evicts_exactly_the_given_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        p.write_bytes(b"x" * (2 << 20))  # dirty: the dropper must flush before evicting
    if not (page_cached(a) and page_cached(b)):
        pytest.skip("this file system does not keep written files in the page cache")
    cold_cache.CacheDropper().drop([a])
    if page_cached(a):
        pytest.skip("this file system keeps files in the page cache (tmpfs?)")
    assert page_cached(b)


def test_table_and_plot(tmp_path):
    (tmp_path / "w").mkdir()
    result = bench_store.run(store=tmp_path / "w", config=bench_store.StoreBenchConfig.tiny())
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

    def fake_run(name, quick=False, **options):  # only the argument plumbing is under test
        seen["quick"] = quick
        return {"benchmark": name, "rows": [], "notes": []}

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["bench", "store", "--quick", "--json"]) == 0
    assert seen["quick"] is True
    assert json.loads(capsys.readouterr().out)["benchmark"] == "store"


def test_codecs_plot_draws_bits_against_fidelity_or_says_why_not(tmp_path):

    def record(codec, level, bits, kl, top1):  # the fields bench_codecs' records carry
        return {"codec": codec, "level": level, "bits_per_element": bits,
                "next_token_kl": kl, "top1_agreement": top1,
                "top1_agreement_ci90": [top1 - 0.01, min(1.0, top1 + 0.01)],
                "excl_circuit": {"next_token_kl": kl / 2, "top1_agreement": top1}}

    records = [record("cachegen", str(i), 4.0 - i, 10.0 ** -i, 1.0 - 0.01 * i)
               for i in range(1, 4)] + [record("raw", None, 16.0, 0.0, 1.0)]
    result = {"benchmark": "codecs", "date": "today", "records": records, "rows": []}
    path = bench.plot(result, tmp_path)  # dispatches to the codecs benchmark's own plot
    if path is None:
        assert any("matplotlib" in n for n in result["notes"])
    else:
        assert path.name == "bench-codecs.png" and path.stat().st_size > 1000
