"""A damaged index never takes the store down, and ``fsck`` rebuilds it from the objects.

Damage is done to the real files the way it happens: bits flipped, a page zeroed, the
file cut short or emptied, blob files removed or left behind by a writer killed with
SIGKILL. Opens that could crash the interpreter (LMDB maps the file: a truncated one used
to SIGBUS) run in a subprocess whose exit status is checked.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.disk_tier import DiskTier
from kvcache.kvstore.errors import DiskFullError, StoreCorruptError
from kvcache.kvstore.fsck import fsck
from kvcache.kvstore.index_format import check_index_file
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.writer_lease import WriterLease
from tests.helpers import make_chunk, make_key

LAYOUT = KVLayout("test-model", 2, 2, 8, dtype="float16")
N = 40
CAP = 1 << 22


def obj(i: int) -> StoredObject:
    k = make_key(i)
    return StoredObject(ObjectHeader(k, LAYOUT, 8), {"kv": make_chunk(LAYOUT, 8, i)})


def build(path: Path, storage: str = "files", n: int = N) -> None:
    with DiskTier(path, CAP, blob_storage=storage) as t:
        for i in range(n):
            t.put(make_key(i), obj(i))


def data_mdb(path: Path) -> Path:
    return path / "index" / "data.mdb"


PROBE = textwrap.dedent("""
    import json, sys
    from kvcache.kvstore.disk_tier import DiskTier
    from kvcache.kvstore.errors import KVCacheError
    from tests.test_index_recovery import CAP, N, obj
    from tests.helpers import make_key
    storage = sys.argv[1]
    for task in sys.argv[2:]:
        path, exclusive = task.rsplit(":", 1)
        out = {"wrong": 0, "served": 0}
        with DiskTier(path, CAP, blob_storage=storage, exclusive=exclusive == "x") as t:
            out["damage"] = t.damage
            for e in t.scan():
                o = t.get(e.key)
                out["wrong"] += o is not None and o.header.key != e.key
            for i in range(N):
                o = t.get(make_key(i))
                out["served"] += o is not None
                out["wrong"] += o is not None and o.header.key != make_key(i)
            try:
                t.put(make_key(1000), obj(1000))
                out["put"] = "ok"
            except KVCacheError as e:
                out["put"] = type(e).__name__
            out["stats_damage"] = t.stats().damage
        print(json.dumps(out), flush=True)
""")


def probe(storage: str, *opens: tuple[Path, bool]) -> list[dict]:
    """Open each tier in turn ((path, exclusive)) in one fresh process; its exit status
    must be 0 (no SIGBUS, no abort, no traceback) and nothing it serves may be another
    key's object."""
    import json

    tasks = [f"{p}:{'x' if exclusive else 's'}" for p, exclusive in opens]
    r = subprocess.run(
        [sys.executable, "-c", PROBE, storage, *tasks],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )
    outs = [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]
    assert r.returncode == 0, (r.returncode, tasks[len(outs)], r.stderr[-2000:])
    assert all(o["wrong"] == 0 for o in outs), outs
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["files", "lmdb"])
def test_truncated_index_opens_damaged_then_repairs_itself_exclusively(
    tmp_path: Path, storage: str
) -> None:
    build(tmp_path, storage)
    f = data_mdb(tmp_path)
    os.truncate(f, f.stat().st_size // 2)  # used to SIGBUS every opener
    assert "truncated" in (check_index_file(f) or "")
    shared, repaired = probe(storage, (tmp_path, False), (tmp_path, True))
    assert shared["served"] == 0 and shared["put"] == "StoreCorruptError"
    assert "kvcache fsck --repair" in shared["damage"] == shared["stats_damage"]
    assert repaired["damage"] is None and repaired["put"] == "ok"
    # files: every object is back; lmdb: the objects lived in the cut-off file itself
    assert repaired["served"] == (N if storage == "files" else 0)


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_emptied_index_is_never_silently_a_new_empty_store(tmp_path: Path, damage: str) -> None:
    build(tmp_path)
    if damage == "empty":
        os.truncate(data_mdb(tmp_path), 0)
    else:
        data_mdb(tmp_path).unlink()
    with DiskTier(tmp_path, CAP) as t:
        assert t.damage is not None and "blobs/ holds objects" in t.damage
        assert t.get(make_key(0)) is None and list(t.scan()) == []
        with pytest.raises(StoreCorruptError, match="fsck --repair"):
            t.put(make_key(0), obj(0))
    report = fsck(tmp_path, capacity_bytes=CAP, repair=True)
    assert report.rebuilt == {"recovered": N, "unreadable": 0, "superseded": 0}
    assert report.clean
    with DiskTier(tmp_path, CAP) as t:
        assert t.damage is None
        assert all(t.get(make_key(i)) is not None for i in range(N))
        assert t.used_bytes == sum(e.nbytes for e in t.scan())


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["files", "lmdb"])
def test_random_damage_never_crashes_or_serves_wrong_data(tmp_path: Path, storage: str) -> None:
    """Bit flips, zeroed pages and truncations anywhere in data.mdb: every opener exits
    cleanly, serves only right-key objects, and an exclusive open leaves a usable store."""
    base = tmp_path / "base"
    build(base, storage)
    data = data_mdb(base).read_bytes()
    rng = random.Random(7)
    opens = []
    for trial in range(12):
        d = tmp_path / f"t{trial}"
        shutil.copytree(base, d)
        buf = bytearray(data)
        kind = ("bit", "zero", "trunc")[trial % 3]
        if kind == "bit":
            for _ in range(3):
                pos = rng.randrange(len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "zero":
            page = rng.randrange(2, len(buf) // 4096)
            buf[page * 4096 : (page + 1) * 4096] = bytes(4096)
        else:
            del buf[rng.randrange(4096, len(buf)) :]
        data_mdb(d).write_bytes(bytes(buf))
        opens += [(d, False), (d, True)]
    outs = probe(storage, *opens)
    assert [o["put"] for o in outs[1::2]] == ["ok"] * 12, outs


def test_damaged_records_are_dropped_and_counted(tmp_path: Path) -> None:
    build(tmp_path, n=4)
    with DiskTier(tmp_path, CAP) as t, t.index.env.begin(write=True) as txn:
        txn.put(make_key(1).encode(), b"\xc1garbage", db=t.index.entries)  # msgpack error
        txn.put(make_key(2).encode(), b"\x81\x01\x02", db=t.index.entries)  # int map key
        txn.put(b"\xff\xfe", b"\x80", db=t.index.entries)  # key not UTF-8
    with DiskTier(tmp_path, CAP) as t:  # dropped while opening, not a traceback
        s = t.stats()
        assert s.corrupt == 3 and s.entries == 2
        assert t.get(make_key(1)) is None and t.get(make_key(0)) is not None
        assert t.used_bytes == sum(e.nbytes for e in t.scan())


def test_fsck_finds_every_kind_of_problem_and_repair_fixes_them(tmp_path: Path) -> None:
    build(tmp_path, n=6)
    with DiskTier(tmp_path, CAP) as t:
        recs = {}
        with t.index.read() as txn:
            for i in range(6):
                recs[i] = t.index.get_rec(txn, make_key(i))
        t.blob_path(recs[0]["blob"]).unlink()  # missing-object
        raw = bytearray(t.blob_path(recs[1]["blob"]).read_bytes())
        raw[-3] ^= 0xFF
        t.blob_path(recs[1]["blob"]).write_bytes(bytes(raw))  # corrupt-object
        shutil.copyfile(t.blob_path(recs[3]["blob"]), t.blob_path(recs[2]["blob"]))  # wrong-key
        orphan = t.blob_path(recs[4]["blob"]).with_name(f"{make_key(99)}.deadbeef0000-0.kvo")
        shutil.copyfile(t.blob_path(recs[4]["blob"]), orphan)  # orphan, writer dead
        with t.index.env.begin(write=True) as txn:
            txn.put(b"used_bytes", b"\xc1", db=t.index.meta)  # counter
            txn.put(b"zz-bad", b"\x01", db=t.index.entries)  # bad-record
    report = fsck(tmp_path, capacity_bytes=CAP)
    kinds = report.counts()
    assert kinds == {"missing-object": 1, "corrupt-object": 1, "wrong-key": 1, "orphan": 1,
                     "counter": 1, "bad-record": 1}, report.problems
    assert not report.clean and "writer dead" in next(
        p.detail for p in report.problems if p.kind == "orphan")
    assert next(p.detail for p in report.problems if p.kind == "counter").startswith(
        "recorded unreadable")
    fixed = fsck(tmp_path, capacity_bytes=CAP, repair=True)
    assert fixed.clean and fixed.repaired
    again = fsck(tmp_path, capacity_bytes=CAP)
    assert again.problems == [] and again.entries == 3
    with DiskTier(tmp_path, CAP) as t:
        assert {e.key for e in t.scan()} == {make_key(i) for i in (3, 4, 5)}
        assert not orphan.exists()


@pytest.mark.slow
def test_fsck_repair_needs_the_store_to_itself(tmp_path: Path) -> None:
    build(tmp_path, n=2)
    with DiskTier(tmp_path, CAP):
        code = ("from kvcache.kvstore.fsck import fsck; "
                f"fsck({str(tmp_path)!r}, capacity_bytes={CAP}, repair=True)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0 and "StoreUnavailableError" in r.stderr
        assert "locked by another process" in r.stderr


# -- orphans ----------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys
    from kvcache.kvstore.disk_tier import DiskTier
    from tests.test_index_recovery import CAP, obj
    from tests.helpers import make_key
    t = DiskTier(sys.argv[1], CAP)
    real = t._write
    def die_before_commit(fn, grow_hint=0):  # the file is written and renamed: die now
        print("renamed", flush=True)
        sys.stdin.read()
    t._write = die_before_commit
    t.put(make_key(int(sys.argv[2])), obj(int(sys.argv[2])))
""")


@pytest.mark.slow
def test_orphans_of_a_killed_writer_are_reclaimed_at_the_next_open(tmp_path: Path) -> None:
    build(tmp_path, n=2)
    before = sorted((tmp_path / "blobs").rglob("*.kvo"))
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "7"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).parent.parent)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "renamed"
        with DiskTier(tmp_path, CAP) as t:  # the writer is alive: its file is kept
            assert len(sorted((tmp_path / "blobs").rglob("*.kvo"))) == len(before) + 1
            assert len(list(t.scan())) == 2
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    report = fsck(tmp_path, capacity_bytes=CAP)
    assert report.counts() == {"orphan": 1} and "writer dead" in report.problems[0].detail
    with DiskTier(tmp_path, CAP):  # a shared open, seconds later: reclaimed at once
        assert sorted((tmp_path / "blobs").rglob("*.kvo")) == before
    assert not any((tmp_path / "writers").glob("*.lease"))


def test_a_starting_writer_is_never_taken_for_a_dead_one(tmp_path: Path) -> None:
    lease = WriterLease(tmp_path)
    try:
        from kvcache.kvstore.writer_lease import reap_dead_leases, writer_alive

        assert writer_alive(tmp_path, lease.token)
        assert reap_dead_leases(tmp_path) == 0
        assert writer_alive(tmp_path, lease.token)
    finally:
        lease.release()
    assert not writer_alive(tmp_path, lease.token)


# -- full disks -------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_lmdb_blobs_on_a_full_disk_raise_disk_full(small_fs: Path) -> None:
    with DiskTier(small_fs / "s", 1 << 28, blob_storage="lmdb") as t:
        stored = []
        with pytest.raises(DiskFullError, match="free disk space"):
            for i in range(1000):
                k = make_key(i)
                t.put(k, StoredObject(ObjectHeader(k, LAYOUT, 4000),
                                      {"kv": make_chunk(LAYOUT, 4000, i)}))
                stored.append(k)
        assert stored and all(t.get(k) is not None for k in stored)
        assert {e.key for e in t.scan()} == set(stored)


@pytest.mark.slow
def test_opening_a_new_store_on_a_full_disk_is_a_typed_error(small_fs: Path) -> None:
    with open(small_fs / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
        except OSError:
            pass
    code = ("from kvcache.kvstore.disk_tier import DiskTier; "
            f"DiskTier({str(small_fs / 'new')!r}, 1 << 20)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-1000:])  # a traceback, not a SIGBUS
    assert "DiskFullError" in r.stderr or "StoreUnavailableError" in r.stderr



def test_lmdb_rebuild_salvages_every_readable_object(tmp_path: Path) -> None:
    """A damaged index that can still be mapped (here: its format record unreadable)
    gives back every object stored in it."""
    build(tmp_path, "lmdb")
    with DiskTier(tmp_path, CAP, blob_storage="lmdb") as t, \
            t.index.env.begin(write=True) as txn:
        txn.put(b"format", b"\xc1", db=t.index.meta)
    with DiskTier(tmp_path, CAP, blob_storage="lmdb") as t:
        assert t.damage is not None and "format record" in t.damage
    report = fsck(tmp_path, capacity_bytes=CAP, blob_storage="lmdb", repair=True)
    assert report.rebuilt == {"recovered": N, "unreadable": 0, "superseded": 0}
    with DiskTier(tmp_path, CAP, blob_storage="lmdb") as t:
        assert all(t.get(make_key(i)) is not None for i in range(N))


def test_a_full_tier_sweeps_dead_writers_orphans_before_evicting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcache.kvstore import disk_tier

    with DiskTier(tmp_path / "probe", CAP) as probe:
        probe.put(make_key(0), obj(0))
        one = probe.used_bytes
    with DiskTier(tmp_path / "s", 2 * one) as t:
        t.put(make_key(0), obj(0))
        shard = next((tmp_path / "s" / "blobs").iterdir())
        orphan = shard / f"{make_key(9)}.deadbeef0000-1.kvo"  # no such writer is alive
        orphan.write_bytes(b"left by a killed writer")
        t.put(make_key(1), obj(1))  # not full yet: no sweep
        assert orphan.exists()
        monkeypatch.setattr(disk_tier, "_SWEEP_INTERVAL_S", 0.0)
        t.put(make_key(2), obj(2))  # full: sweeps, then evicts
        assert not orphan.exists()


COMMITTER = textwrap.dedent("""
    import sys, time
    from kvcache.kvstore.disk_tier import DiskTier
    from tests.test_index_recovery import CAP, obj
    from tests.helpers import make_key
    with DiskTier(sys.argv[1], CAP, blob_storage=sys.argv[2]) as t:
        print("ready", flush=True)
        deadline = time.monotonic() + float(sys.argv[3])
        i = 0
        while time.monotonic() < deadline:
            t.put(make_key(i % 200), obj(i % 200))
            if i % 3 == 0:
                t.delete(make_key((i * 7) % 200))
            i += 1
""")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["files", "lmdb"])
def test_an_index_being_written_is_never_taken_for_a_damaged_one(
    tmp_path: Path, storage: str
) -> None:
    """The open-time check walks a file another process keeps committing to: pages of the
    tree it walks may be reused under it. That must never read as damage (a read-only or
    shared open would then serve nothing until repaired)."""
    build(tmp_path, storage)
    root = str(Path(__file__).parents[1])
    writer = subprocess.Popen([sys.executable, "-c", COMMITTER, str(tmp_path), storage, "4"],
                              cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        problems = [p for _ in range(300) if (p := check_index_file(data_mdb(tmp_path)))]
    finally:
        assert writer.wait(timeout=60) == 0
    assert problems == []
