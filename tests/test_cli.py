"""The ``kvcache`` admin CLI: inspect, evict, stats over a real disk-tier store.

Most tests call ``main([...])`` in-process; a few run the real ``python -m`` entry point in
a subprocess (exit codes, no tracebacks, sharing a store another process holds open).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvcache.kvstore import disk_tier
from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.errors import KVCacheError, NoMatchError, StoreUnavailableError
from kvcache.kvstore.layout import KVLayout
from kvcache.tools import admin, cli
from tests.helpers import make_chunk

LAYOUT = KVLayout("test-model", 2, 2, 8, dtype="float16")
OTHER = KVLayout("other-model", 2, 2, 8, dtype="float16")
HOUR, DAY = 3600.0, 86400.0


@dataclass
class Store:
    dir: Path
    keys: dict[str, str]  # name -> key
    nbytes: dict[str, int]  # key -> container bytes
    used: int

    def args(self) -> list[str]:
        return ["--store", str(self.dir)]


# Entries by age of last access; "old" is pinned. Keys share no 4-digit hex prefix.
ENTRIES = [
    # name, layout, tokens, age (s), pinned
    ("old", LAYOUT, 4, 10 * DAY, True),
    ("week", LAYOUT, 5, 5 * DAY, False),
    ("other", OTHER, 6, 2 * DAY, False),
    ("hour", LAYOUT, 7, HOUR, False),
    ("new", LAYOUT, 8, 0.0, False),
]


def _key(i: int) -> str:
    return f"{0xA0 + i:02x}" + f"{i:x}" * 30


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A store with ENTRIES on disk, written through DiskTier with a fake clock."""
    root = tmp_path / "store"
    now = time.time()
    keys: dict[str, str] = {}
    with monkeypatch.context() as m:
        clock = [0.0]
        fake_time = types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic)
        m.setattr(disk_tier, "time", fake_time)
        with disk_tier.DiskTier(root / "disk", 1 << 20) as t:
            for i, (name, layout, tokens, age, pinned) in enumerate(ENTRIES):
                k = _key(i)
                keys[name] = k
                clock[0] = now - age
                chunk = make_chunk(layout, tokens, seed=i)
                t.put(k, StoredObject(ObjectHeader(k, layout, tokens), {"kv": chunk}))
                if pinned:
                    t.set_pinned(k, True)
            nbytes = {e.key: e.nbytes for e in t.scan()}
            used = t.used_bytes
    return Store(root, keys, nbytes, used)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def keys_in(store: Store) -> set[str]:
    cfg = KVCacheConfig.from_dict({"store": {"dir": str(store.dir)}})
    return {e["key"] for e in admin.inspect(cfg)["entries"]}


# ---------------------------------------------------------------------------- inspect


def test_inspect_table(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", *store.args())
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["KEY", "TIER", "SIZE", "TOKENS", "CODEC", "MODEL"]
    # Most recently used first; the pinned entry is marked.
    order = [line.split()[0] for line in lines[1:6]]
    assert order == [store.keys[n] for n in ("new", "hour", "other", "week", "old")]
    assert lines[5].split()[-2:] == ["yes", "prefix"]  # pinned; keyed by its prefix
    assert lines[0].rstrip().endswith("PINNED  KEYED BY")
    assert "other-model" in out
    assert "disk: 5 entries" in out


def test_inspect_json(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "inspect", *store.args())
    entries = {e["key"]: e for e in result["entries"]}
    assert set(entries) == set(store.keys.values())
    old = entries[store.keys["old"]]
    assert old["tier"] == "disk"
    assert old["bytes"] == store.nbytes[old["key"]]
    assert old["tokens"] == 4
    assert old["codec"] == "raw"
    assert old["model"] == "test-model"
    assert old["pinned"] is True
    assert old["hits"] == 0
    assert old["last_access"] == pytest.approx(time.time() - 10 * DAY, abs=60)
    assert {"created", "last_access"} <= set(old)
    disk = result["tiers"]["disk"]
    assert disk["entries"] == 5
    assert disk["bytes"] == store.used
    assert disk["capacity"] == KVCacheConfig().store.disk.capacity


def test_inspect_filter_by_model(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "inspect", *store.args(), "--model", "other-model")
    assert [e["key"] for e in result["entries"]] == [store.keys["other"]]
    assert result["tiers"]["disk"]["entries"] == 1
    code, out, _ = run(capsys, "inspect", *store.args(), "--model", "nobody")
    assert code == 0 and "no entries of model 'nobody'" in out


def test_inspect_one_key(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    k = store.keys["other"]
    result = run_json(capsys, "inspect", k, *store.args())
    assert result["entry"]["key"] == k
    assert result["header"]["layout"]["model_id"] == "other-model"
    assert result["header"]["num_tokens"] == 6
    assert result["header"]["codec"] == "raw"

    # A unique prefix is enough, and the table form shows the header too.
    code, out, _ = run(capsys, "inspect", k[:4], *store.args())
    assert code == 0
    assert k in out and '"model_id": "other-model"' in out and "header:" in out


def test_inspect_unknown_key(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", "ffff", *store.args())
    assert code == 1 and out == ""
    assert "no entry with key 'ffff'" in err


def test_store_from_environment(store: Store, capsys, monkeypatch) -> None:
    monkeypatch.setenv("KVCACHE_DIR", str(store.dir))
    assert len(run_json(capsys, "inspect")["entries"]) == 5


def test_store_from_config_file(store: Store, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KVCACHE_DIR")  # it would win over the file
    cfg = tmp_path / "kv.toml"
    cfg.write_text(f'[store]\ndir = "{store.dir}"\n[store.disk]\ncapacity = "1MiB"\n')
    result = run_json(capsys, "inspect", "--config", str(cfg))
    assert len(result["entries"]) == 5
    assert result["tiers"]["disk"]["capacity"] == 1 << 20


# ---------------------------------------------------------------------------- evict


def test_evict_by_key(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    k = store.keys["week"]
    code, out, _ = run(capsys, "evict", *store.args(), "--key", k)
    assert code == 0
    assert k in out and "removed 1 entry" in out
    assert k not in keys_in(store)
    assert len(keys_in(store)) == 4


def test_evict_by_prefix(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    k = store.keys["hour"]
    result = run_json(capsys, "evict", *store.args(), "--prefix", k[:4])
    assert [e["key"] for e in result["removed"]] == [k]
    assert result["freed_bytes"] == store.nbytes[k]
    assert result["used_bytes"] == store.used - store.nbytes[k]
    assert keys_in(store) == set(store.keys.values()) - {k}


def test_evict_by_model(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "evict", *store.args(), "--model", "other-model")
    assert [e["key"] for e in result["removed"]] == [store.keys["other"]]
    assert store.keys["other"] not in keys_in(store)


def test_evict_older_than_skips_pinned(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "evict", *store.args(), "--older-than", "3d")
    assert code == 0
    assert "removed 1 entry" in out
    assert (
        f"skipped 1 pinned entry (pass --force to remove pinned entries): {store.keys['old']}"
        in out
    )
    assert keys_in(store) == set(store.keys.values()) - {store.keys["week"]}

    result = run_json(capsys, "evict", *store.args(), "--older-than", "1d", "--force")
    assert [e["key"] for e in result["removed"]] == [store.keys["old"], store.keys["other"]]
    assert result["skipped_pinned"] == []
    assert keys_in(store) == {store.keys["hour"], store.keys["new"]}


def test_evict_to_size_in_lru_order(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    week, other = store.keys["week"], store.keys["other"]
    # Just enough that removing the two least recently used unpinned entries suffices.
    target = store.used - store.nbytes[week] - store.nbytes[other]
    result = run_json(capsys, "evict", *store.args(), "--to-size", str(target))
    assert [e["key"] for e in result["removed"]] == [week, other]
    assert [e["key"] for e in result["skipped_pinned"]] == [store.keys["old"]]
    assert result["used_bytes"] == target
    assert keys_in(store) == {store.keys[n] for n in ("old", "hour", "new")}

    # Already small enough: nothing to do, and that is not an error.
    code, out, _ = run(capsys, "evict", *store.args(), "--to-size", "1GiB")
    assert code == 0 and "removed 0 entries" in out


def test_evict_dry_run_changes_nothing(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, "evict", *store.args(), "--all", "--dry-run")
    assert result["dry_run"] is True
    assert len(result["removed"]) == 4
    assert [e["key"] for e in result["skipped_pinned"]] == [store.keys["old"]]
    assert result["used_bytes"] == store.nbytes[store.keys["old"]]
    assert keys_in(store) == set(store.keys.values())

    code, out, _ = run(
        capsys, "evict", *store.args(), "--prefix", store.keys["new"][:4], "--dry-run"
    )
    assert code == 0 and "would remove 1 entry" in out
    assert store.keys["new"] in keys_in(store)


def test_pinned_needs_force(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    old = store.keys["old"]
    code, out, _ = run(capsys, "evict", *store.args(), "--key", old)
    assert code == 1  # matched, but nothing was removed
    assert "skipped 1 pinned entry" in out
    assert old in keys_in(store)

    code, out, _ = run(capsys, "evict", *store.args(), "--key", old, "--force")
    assert code == 0 and "removed 1 entry" in out
    assert old not in keys_in(store)


def test_evict_all_force_empties_the_store(store: Store, capsys) -> None:
    result = run_json(capsys, "evict", *store.args(), "--all", "--force")
    assert len(result["removed"]) == 5
    assert result["used_bytes"] == 0
    code, _, err = run(capsys, "evict", *store.args(), "--all")
    assert code == 1 and "the disk tier is empty" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prefix", "ffff"], "no entry matches --prefix ffff"),
        (["--key", "f" * 32], f"no entry matches --key {'f' * 32}"),
        (["--model", "nobody"], "no entry matches --model nobody"),
        (["--older-than", "30d"], "no entry matches --older-than 4w2d"),
        (["--model", "other-model", "--older-than", "3d"], "--model other-model --older-than"),
    ],
)
def test_evict_no_match_exits_1(store: Store, capsys, argv: list[str], message: str) -> None:
    code, out, err = run(capsys, "evict", *store.args(), *argv)
    assert code == 1 and out == ""
    assert message in err and "nothing evicted" in err
    assert len(keys_in(store)) == 5


def test_admin_evict_raises_no_match(store: Store) -> None:
    cfg = KVCacheConfig.from_dict({"store": {"dir": str(store.dir)}})
    with pytest.raises(NoMatchError, match="no entry matches --prefix ffff"):
        admin.evict(cfg, admin.Selection(prefix="ffff"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say what to evict"),
        (["--all", "--model", "x"], "--all removes everything"),
        (["--all", "--tier", "cpu"], "the cpu tier lives inside the serving processes"),
        (["--all", "--tier", "ssd"], "unknown tier 'ssd'"),
    ],
)
def test_evict_usage_errors(store: Store, capsys, argv: list[str], message: str) -> None:
    code, _, err = run(capsys, "evict", *store.args(), *argv)
    assert code == 2
    assert err.startswith("kvcache: error: ") and message in err


def test_bad_size_and_duration_are_usage_errors(store: Store, capsys) -> None:
    code, _, err = run(capsys, "evict", *store.args(), "--to-size", "8 gigs")
    assert code == 2 and "'8 gigs' is not a size" in err
    code, _, err = run(capsys, "evict", *store.args(), "--older-than", "soon")
    assert code == 2 and "'soon' is not a duration" in err
    # No abbreviations: "--to" must not mean --to-size.
    code, _, err = run(capsys, "evict", *store.args(), "--to", "1")
    assert code == 2 and "unrecognized arguments" in err


# ---------------------------------------------------------------------------- stats


def test_stats_json(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    with disk_tier.DiskTier(store.dir / "disk", 1 << 20) as t:
        assert t.get(store.keys["new"]) is not None
        assert t.get("f" * 32) is None
    result = run_json(capsys, "stats", *store.args())
    disk = result["tiers"]["disk"]
    assert disk["entries"] == 5
    assert disk["used_bytes"] == store.used
    assert disk["puts"] == 5
    assert (disk["hits"], disk["misses"]) == (1, 1)
    assert disk["capacity_bytes"] == KVCacheConfig().store.disk.capacity
    assert result["store"]["dir"] == str(store.dir)
    assert result["store"]["chunk_size"] == 256
    assert result["store"]["disk"]["resolved_path"] == str(store.dir / "disk")


def test_stats_table(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "stats", *store.args())
    assert code == 0
    assert f"store      {store.dir}" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("TIER "))
    assert lines[header + 1].split()[:2] == ["disk", "5"]


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "command", [["inspect"], ["stats"], ["evict", "--all"], ["inspect", "abcd"]]
)
def test_missing_store_is_a_clear_error(tmp_path: Path, capsys, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    code, out, err = run(capsys, *command, "--store", str(missing))
    assert code == 2 and out == ""
    assert err == (
        f"kvcache: error: no kvcache store at {missing} (create one with "
        f"`kvcache demo --store {missing}` or point --store/KVCACHE_DIR at an existing one)\n"
    )
    assert not missing.exists()  # looking never creates a store


def test_missing_disk_dir_in_existing_store_dir(tmp_path: Path) -> None:
    cfg = KVCacheConfig.from_dict({"store": {"dir": str(tmp_path)}})
    with pytest.raises(StoreUnavailableError, match="no kvcache store at"):
        admin.stats(cfg)
    assert not (tmp_path / "disk").exists()


def test_config_errors_exit_2(store: Store, capsys, monkeypatch) -> None:
    monkeypatch.setenv("KVCACHE_CPU_CAPACTY", "1GiB")
    code, _, err = run(capsys, "stats", *store.args())
    assert code == 2
    assert "kvcache: error: unknown environment variable KVCACHE_CPU_CAPACTY" in err


def test_lazy_command_without_its_module(capsys) -> None:
    handler = cli._lazy("no_such_tool", "frobnicate")
    with pytest.raises(KVCacheError, match="`kvcache frobnicate` is not available"):
        handler(types.SimpleNamespace())


def test_help_and_version_return_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "inspect" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2  # a command is required


# ---------------------------------------------------------------------------- subprocess


def _subprocess(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    return subprocess.run(
        [sys.executable, "-m", "kvcache.tools.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


@pytest.mark.slow
def test_subprocess_inspect_while_store_is_open(store: Store) -> None:
    # A serving process holds the store open (shared): the admin command still reads it.
    with disk_tier.DiskTier(store.dir / "disk", 1 << 20):
        proc = _subprocess("inspect", "--json", env={"KVCACHE_DIR": str(store.dir)})
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["entries"]) == 5


@pytest.mark.slow
def test_subprocess_evict_while_store_is_open(store: Store) -> None:
    # The serving process keeps the store open; an admin evicts from another process, and
    # the server sees the entry gone (a miss) with its byte accounting updated.
    key = store.keys["week"]
    with disk_tier.DiskTier(store.dir / "disk", 1 << 20) as served:
        assert served.get(key) is not None
        proc = _subprocess("evict", "--store", str(store.dir), "--key", key)
        assert proc.returncode == 0, proc.stderr
        assert served.get(key) is None and not served.contains(key)
        assert served.used_bytes == store.used - store.nbytes[key]


@pytest.mark.slow
def test_subprocess_exit_codes_and_no_traceback(store: Store, tmp_path: Path) -> None:
    proc = _subprocess("evict", "--store", str(store.dir), "--prefix", "ffff")
    assert proc.returncode == 1
    assert "no entry matches --prefix ffff" in proc.stderr

    proc = _subprocess("stats", "--store", str(tmp_path / "none"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvcache: error: no kvcache store at")
    assert "Traceback" not in proc.stderr

    proc = _subprocess("evict", "--store", str(store.dir), "--key", store.keys["week"])
    assert proc.returncode == 0 and "removed 1 entry" in proc.stdout


@pytest.mark.slow
def test_subprocess_store_locked_exclusively(store: Store) -> None:
    with disk_tier.DiskTier(store.dir / "disk", 1 << 20, exclusive=True):
        proc = _subprocess("inspect", "--store", str(store.dir))
    assert proc.returncode == 2
    assert proc.stderr.startswith("kvcache: error: ") and "locked" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lmdb_blob_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Blobs inside LMDB while the CLI's config says "files": entries say where they live.
    root = tmp_path / "lmdb-store"
    with disk_tier.DiskTier(root / "disk", 1 << 20, blob_storage="lmdb") as t:
        for i in range(3):
            k = _key(i)
            t.put(k, StoredObject(ObjectHeader(k, LAYOUT, 4), {"kv": make_chunk(LAYOUT, 4, i)}))
    args = ["--store", str(root)]
    assert len(run_json(capsys, "inspect", *args)["entries"]) == 3
    assert run_json(capsys, "inspect", _key(1), *args)["header"]["num_tokens"] == 4
    assert len(run_json(capsys, "evict", *args, "--key", _key(1))["removed"]) == 1
    assert run_json(capsys, "stats", *args)["tiers"]["disk"]["entries"] == 2


# ---------------------------------------------------------------------------- truthful counters


def test_admin_evictions_are_counted_as_such(store: Store, capsys) -> None:
    assert run(capsys, "evict", *store.args(), "--model", "other-model")[0] == 0
    disk = run_json(capsys, "stats", *store.args())["tiers"]["disk"]
    assert (disk["admin_evictions"], disk["evictions"], disk["entries"]) == (1, 0, 4)


def test_cold_lookups_are_misses_and_the_hit_rate_says_so(tmp_path: Path, capsys) -> None:
    """A cold run finds nothing: every chunk it asked for is a miss (not 0 of 0), so the
    warm run after it shows 50% over the store's life, in chunks and in tokens."""
    from kvcache.kvstore.keys import chunk_tokens
    from kvcache.kvstore.tiered_store import TieredStore

    cfg = KVCacheConfig.from_dict({"store": {"dir": str(tmp_path / "s"),
                                             "cpu": {"capacity": "16MiB"}}})
    tokens = list(range(40))
    chunks = chunk_tokens(LAYOUT.fingerprint, tokens, 16)  # 16 + 16 + 8 tokens
    keys, counts = [c.prefix_key for c in chunks], [c.num_tokens for c in chunks]
    for _ in range(2):  # two processes' worth: the CPU tier starts empty each time
        with TieredStore.open(cfg.store) as s:
            n = s.longest_prefix(keys, num_tokens=counts)
            got = s.get_many(keys[:n])
            assert all(g is not None for g in got)
            for c, k in zip(chunks[n:], keys[n:], strict=True):
                s.put(k, make_chunk(LAYOUT, c.num_tokens), LAYOUT, rope_start=c.start)
    disk = run_json(capsys, "stats", "--store", str(tmp_path / "s"))["tiers"]["disk"]
    assert (disk["hits"], disk["misses"]) == (3, 3)
    assert (disk["hit_tokens"], disk["miss_tokens"]) == (40, 40)
    assert disk["hit_rate"] == 0.5
    _, out, _ = run(capsys, "stats", "--store", str(tmp_path / "s"))
    row = [line.split() for line in out.splitlines() if line.startswith("disk")][-1]
    assert row.count("50.0%") == 2  # HIT RATE and TOKEN HIT RATE


def test_readonly_flag_opens_read_only(store: Store, capsys) -> None:
    code, _, err = run(capsys, "evict", *store.args(), "--readonly", "--key", store.keys["new"])
    assert code == 2 and "read-only" in err
    assert store.keys["new"] in keys_in(store)
    assert run_json(capsys, "inspect", *store.args(), "--readonly")["entries"]


def test_inspect_of_an_entry_whose_object_vanished_says_so(store: Store, capsys) -> None:
    k = store.keys["week"]
    for f in (store.dir / "disk" / "blobs").rglob(f"{k}.*"):
        f.unlink()
    code, _, err = run(capsys, "inspect", *store.args(), k)
    assert code == 2
    assert "in the index but its object is missing" in err and "kvcache fsck" in err


def test_fsck_reports_then_repairs(store: Store, capsys) -> None:
    k = store.keys["week"]
    for f in (store.dir / "disk" / "blobs").rglob(f"{k}.*"):
        f.unlink()
    code, out, _ = run(capsys, "fsck", *store.args())
    assert code == 1 and "missing-object" in out and k in out
    assert "not fixed (run with --repair)" in out
    result = run_json(capsys, "fsck", *store.args(), "--repair")
    assert result["clean"] and result["counts"] == {"missing-object": 1}
    code, out, _ = run(capsys, "fsck", *store.args(), "--quick")
    assert code == 0 and "4 entries" in out and "no problems" in out


def test_a_damaged_index_is_an_error_with_the_repair_not_an_empty_store(
    store: Store, capsys
) -> None:
    data = store.dir / "disk" / "index" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    for command in (["inspect"], ["stats"], ["evict", "--all"]):
        code, _, err = run(capsys, *command, *store.args())
        assert code == 2 and "damaged" in err and "kvcache fsck --repair" in err, command
    result = run_json(capsys, "fsck", *store.args(), "--repair")
    assert result["rebuilt"]["recovered"] == 5 and result["clean"]
    assert keys_in(store) == set(store.keys.values())


def test_bench_options_reach_only_the_benchmark_that_takes_them(tmp_path: Path) -> None:
    from kvcache.tools import bench

    args = cli.build_parser().parse_args(
        ["bench", "codecs", "--split", "tune", "--lmcache-python", "/opt/lm/bin/python"])
    assert bench._options(args) == {"split": "tune", "lmcache_python_path": "/opt/lm/bin/python"}
    args = cli.build_parser().parse_args(["bench", "store", "--store", str(tmp_path),
                                          "--drop-caches"])
    assert bench._options(args) == {"store": tmp_path, "drop_caches": True}
    with pytest.raises(KVCacheError, match="--split does not apply to `kvcache bench store`"):
        bench.run("store", quick=True, split="tune")
    with pytest.raises(KVCacheError, match="--store does not apply to `kvcache bench transfer`"):
        bench.run("transfer", quick=True, store=tmp_path)
    args = cli.build_parser().parse_args(["bench", "e2e", "--dtype", "float32"])
    assert bench._options(args) == {"dtype": "float32"}
    with pytest.raises(KVCacheError, match="--dtype does not apply to `kvcache bench store`"):
        bench.run("store", quick=True, dtype="float32")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "e2e", "--dtype", "int8"])


def test_bench_sglang_without_sglang_says_how_to_install_it() -> None:
    from kvcache.tools import bench

    try:
        import sglang  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("sglang is installed here")
    with pytest.raises(KVCacheError, match="pip install --no-deps sglang=="):
        bench.run("sglang", quick=True)


def test_help_and_index_reading_commands_do_not_import_torch(store: Store) -> None:
    """They must start in well under a second: importing torch alone takes 1-6 s."""
    key = store.keys["new"]
    code = textwrap.dedent(f"""
        import sys
        from kvcache.tools import cli
        for argv in (["--help"], ["stats"], ["inspect"], ["inspect", {key!r}],
                     ["evict", "--key", {key!r}, "--dry-run"], ["fsck", "--quick"]):
            cli.main([*argv, "--store", {str(store.dir)!r}] if argv != ["--help"] else argv)
        print("torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
