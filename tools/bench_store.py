"""``kvcache bench store``: tier throughput beside a plain copy or read of the same bytes.

Every figure is a ratio against a baseline measured in the same run, with the same sizes
and allocation pattern, because the machines are shared and noisy:

- CPU tier ``put`` vs ``copy_`` into a preallocated (already touched) pool;
  ``get`` (allocates its output) vs ``copy_`` into a freshly allocated tensor;
  ``borrow`` + ``copy_`` into a preallocated tensor vs ``copy_`` between preallocated tensors.
- Disk tier ``put`` (+ fsync of what it wrote) vs a sequential write (+ fsync) of the same
  bytes to one file in the same directory; cold ``get`` vs a cold sequential read of that
  file into fresh tensors (and, for context, vs what the disk gives ``O_DIRECT`` reads with
  several requests in flight); warm ``get`` vs the same read warm.

Cold means the benchmark's own files were evicted from the page cache (fsync, then
``posix_fadvise(POSIX_FADV_DONTNEED)`` on exactly those files). Dropping the whole host's
page cache (``/proc/sys/vm/drop_caches``) happens only when asked for (``drop_caches``,
root only): it slows down everything else running on the machine.

The disk part runs in a temporary directory inside ``store`` (the disk to measure, e.g. a
store's directory), removed afterwards; nothing else there is touched.

Subject and baseline alternate round by round (which one goes first flips) so slow drift
of a shared machine hits both; figures are medians over rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from kvcache.kvstore.container import ObjectHeader, StoredObject, decode_object, encode_object
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.keys import content_key
from kvcache.kvstore.layout import KVLayout
from kvcache.tools.cold_cache import (
    COLD_CACHE_METHODS,
    DIRECT_IN_FLIGHT,
    DIRECT_REQUEST,
    CacheDropper,
    direct_reader,
    dirs_under,
    files_under,
    fsync_paths,
)

GB = 1e9
MiB = 1 << 20
# Published goals (docs/BENCHMARKS.md); figures without one are reported for context.
GOALS: dict[str, float] = {
    "cpu_get_vs_copy": 0.8,
    "cpu_put_vs_copy": 0.8,
    "cpu_borrow_vs_copy": 0.8,
    "disk_cold_get_vs_read": 0.9,
    "disk_cold_get_many_vs_read": 0.9,
}
HEADLINE_KEYS = (
    "cpu_get_vs_copy",
    "cpu_put_vs_copy",
    "cpu_borrow_vs_copy",
    "disk_put_vs_write",
    "disk_cold_get_vs_read",
    "disk_cold_get_vs_direct_read",
    "disk_cold_get_many_vs_read",
    "disk_warm_get_vs_read",
)


LLAMA_3_8B = KVLayout("llama-3-8b", 32, 8, 128, dtype="bfloat16")  # 128 KiB per token
LLAMA_3_2_1B = KVLayout("llama-3.2-1b", 16, 8, 64, dtype="bfloat16")  # 32 KiB per token


@dataclass(frozen=True)
class BenchShape:
    """One chunk size: ``cpu_chunks`` distinct source chunks; ``disk_chunks`` objects on disk."""

    label: str
    layout: KVLayout
    num_tokens: int
    cpu_chunks: int
    disk_chunks: int

    @property
    def nbytes(self) -> int:
        return self.layout.bytes_per_token * self.num_tokens

    @property
    def name(self) -> str:
        return f"{self.label} {self.num_tokens} tok ({self.nbytes / MiB:g} MiB)"


@dataclass(frozen=True)
class StoreBenchConfig:
    """What to run. The first shape is the headline one (top-level JSON ratios)."""

    shapes: tuple[BenchShape, ...]
    rounds: int = 7  # measured rounds of the CPU figures
    cpu_round_bytes: int = 2 << 30  # each CPU round repeats its pass until it moved this
    disk_rounds: int = 3  # measured rounds of each disk figure (each evicts its files)
    warmup: int = 2
    blob_storages: tuple[str, ...] = ("files", "lmdb")
    # "fadvise": evict only the benchmark's own files; "drop_caches": drop the page cache
    # of the whole host before each cold pass (root only; see ``CacheDropper``).
    cold_cache: str = "fadvise"

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ConfigError("StoreBenchConfig.shapes is empty; give at least one shape")
        for s in self.shapes:
            if s.cpu_chunks < 1 or s.disk_chunks < 1 or s.num_tokens < 1:
                raise ConfigError(f"shape {s.label!r}: chunks and num_tokens must be >= 1")
        if self.cold_cache not in COLD_CACHE_METHODS:
            raise ConfigError(
                f"cold_cache must be one of {', '.join(COLD_CACHE_METHODS)}, "
                f"got {self.cold_cache!r}"
            )
        if self.rounds < 1 or self.disk_rounds < 1 or self.warmup < 0:
            raise ConfigError("rounds and disk_rounds must be >= 1 and warmup >= 0")

    @property
    def disk_bytes(self) -> int:
        """Peak disk use: the tier's objects plus the baseline file, one shape at a time."""
        return max(2 * s.disk_chunks * s.nbytes for s in self.shapes)

    @classmethod
    def full(cls) -> StoreBenchConfig:
        return cls(
            shapes=(
                # 1 GiB of distinct chunks per shape: more than the LLC (480 MiB reported
                # on our VMs), so copies run at memory speed as in a large CPU tier.
                BenchShape("llama-3-8b", LLAMA_3_8B, 256, cpu_chunks=32, disk_chunks=32),
                BenchShape("llama-3.2-1b", LLAMA_3_2_1B, 64, cpu_chunks=512, disk_chunks=256),
            ),
            disk_rounds=5,
        )

    @classmethod
    def quick(cls) -> StoreBenchConfig:
        """Seconds, not minutes, even on a busy 2-core machine: the 32 MiB chunk the disk
        goal is about and one small chunk, a few of each, few rounds, and only the default
        blob storage (``files``; the full run measures ``lmdb`` too)."""
        return cls(
            shapes=(
                BenchShape("llama-3-8b", LLAMA_3_8B, 256, cpu_chunks=4, disk_chunks=4),
                BenchShape("llama-3.2-1b", LLAMA_3_2_1B, 16, cpu_chunks=32, disk_chunks=16),
            ),
            rounds=3,
            cpu_round_bytes=32 << 20,
            disk_rounds=2,
            warmup=1,
            blob_storages=("files",),
        )

    @classmethod
    def tiny(cls) -> StoreBenchConfig:
        """For the smoke test: seconds, a few MiB; the numbers mean nothing."""
        layout = KVLayout("tiny", 2, 2, 64, dtype="float16")  # 1 KiB per token
        return cls(
            shapes=(BenchShape("tiny", layout, 64, cpu_chunks=2, disk_chunks=3),),
            rounds=2,
            cpu_round_bytes=0,
            disk_rounds=1,
            warmup=1,
        )


# -- timing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """A collection inside a timed section would be charged to whichever side ran it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _gbps(nbytes: int, fn: Callable[[], object]) -> float:
    with _no_gc():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return nbytes / max(dt, 1e-9) / GB


@dataclass
class Figure:
    """A subject and its baseline, each as GB/s samples (one per round)."""

    key: str
    figure: str
    baseline: str
    shape: str
    samples: list[float]
    baseline_samples: list[float]
    variant: str | None = None  # e.g. the blob storage

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    @property
    def baseline_value(self) -> float:
        return statistics.median(self.baseline_samples)

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios: the two sides of a round ran seconds apart, so
        pairing them cancels the slow drift of a shared machine better than a ratio of
        medians would."""
        return statistics.median(
            s / b for s, b in zip(self.samples, self.baseline_samples, strict=True)
        )

    def row(self) -> dict[str, Any]:
        goal = GOALS.get(self.key)
        return {
            "key": self.key,
            "figure": self.figure,
            "shape": self.shape,
            "variant": self.variant,
            "unit": "GB/s",
            "value": round(self.value, 3),
            "baseline": self.baseline,
            "baseline_value": round(self.baseline_value, 3),
            "ratio": round(self.ratio, 3),
            "goal": goal,
            "meets_goal": None if goal is None else self.ratio >= goal,
            "samples": [round(x, 3) for x in self.samples],
            "baseline_samples": [round(x, 3) for x in self.baseline_samples],
        }


def _rotated(rounds: int, *sides: Callable[[], float]) -> list[list[float]]:
    """Run every side (a subject, then its baselines) once per round, ``rounds`` times;
    which side goes first rotates round by round. Each returns GB/s."""
    out: list[list[float]] = [[] for _ in sides]
    for r in range(rounds):
        for i in range(len(sides)):
            j = (r + i) % len(sides)
            out[j].append(sides[j]())
    return out


def _interleaved(
    rounds: int, subject: Callable[[], float], baseline: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """``_rotated`` for a subject and one baseline: which goes first flips every round."""
    s, b = _rotated(rounds, subject, baseline)
    return s, b


# -- data ------------------------------------------------------------------------------------


def _sources(shape: BenchShape, seed: int) -> list[torch.Tensor]:
    """``cpu_chunks`` distinct chunks ``[layers, 2, tokens, kv_heads, head_dim]``.

    Distinct memory, same random content: throughput does not depend on the values, and
    generating gigabytes of random numbers would dominate the run.
    """
    g = torch.Generator().manual_seed(seed)
    dims = shape.layout.chunk_shape(shape.num_tokens)
    first = torch.randn(dims, generator=g).to(shape.layout.torch_dtype)
    return [first] + [first.clone() for _ in range(shape.cpu_chunks - 1)]


def _objects(shape: BenchShape, srcs: list[torch.Tensor], n: int, tag: int) -> list[StoredObject]:
    objs = []
    for i in range(n):
        key = content_key("00" * 16, [tag, i])
        header = ObjectHeader(key, shape.layout, shape.num_tokens)
        objs.append(StoredObject(header, {"kv": srcs[i % len(srcs)]}))
    return objs


def _bytes_of(t: torch.Tensor) -> memoryview:
    return t.reshape(-1).view(torch.uint8).numpy().data


# -- CPU tier --------------------------------------------------------------------------------


def _bench_cpu(shape: BenchShape, cfg: StoreBenchConfig, tag: int) -> list[Figure]:
    srcs = _sources(shape, seed=tag)
    objs = _objects(shape, srcs, shape.cpu_chunks, tag)
    keys = [o.header.key for o in objs]
    n, size = len(objs), shape.nbytes
    passes = max(1, -(-cfg.cpu_round_bytes // (n * size)))
    total = passes * n * size
    # Room for one extra object: a put of an existing key allocates before freeing the
    # old copy, and eviction would be a different benchmark.
    tier = CpuTier((n + 2) * (size + 4096), pin_memory=False)
    # The baseline's destinations are touched up front, as the tier's pool is after the
    # warm-up rounds (the first put into fresh pool pages pays their page faults).
    pool = torch.zeros(n * size, dtype=torch.uint8)
    pool_views = [pool[i * size : (i + 1) * size].view(srcs[0].dtype).view(srcs[0].shape)
                  for i in range(n)]
    dsts = [torch.zeros_like(srcs[0]) for _ in range(n)]

    def put() -> float:
        def body() -> None:
            for _ in range(passes):
                for k, o in zip(keys, objs, strict=True):
                    tier.put(k, o)
        return _gbps(total, body)

    def copy_into_pool() -> float:
        def body() -> None:
            for _ in range(passes):
                for v, o in zip(pool_views, objs, strict=True):
                    v.copy_(o.tensors["kv"])
        return _gbps(total, body)

    def get() -> float:
        def body() -> None:
            for _ in range(passes):
                for k in keys:
                    out = tier.get(k)
                    assert out is not None
                    del out  # freed before the next get, like the baseline's tensor
        return _gbps(total, body)

    def copy_fresh() -> float:
        def body() -> None:
            for _ in range(passes):
                for v in pool_views:
                    out = torch.empty_like(v)
                    out.copy_(v)
                    del out
        return _gbps(total, body)

    def borrow() -> float:
        def body() -> None:
            for _ in range(passes):
                for k, d in zip(keys, dsts, strict=True):
                    with tier.borrow(k) as obj:
                        assert obj is not None
                        d.copy_(obj.tensors["kv"])
        return _gbps(total, body)

    def copy_prealloc() -> float:
        def body() -> None:
            for _ in range(passes):
                for v, d in zip(pool_views, dsts, strict=True):
                    d.copy_(v)
        return _gbps(total, body)

    warm_passes, passes = passes, 1  # warm-up: one pass over every chunk is enough
    for _ in range(cfg.warmup + 1):  # +1: the first put round commits the pool's pages
        put()
        copy_into_pool()
        get()
        copy_fresh()
        borrow()
        copy_prealloc()
    passes = warm_passes
    got = tier.get(keys[0])
    assert got is not None and torch.equal(got.tensors["kv"], srcs[0]), "CPU tier corrupted data"

    label = shape.name
    figs = [
        Figure("cpu_put_vs_copy", "CPU tier put", "copy_ into preallocated pool", label,
               *_interleaved(cfg.rounds, put, copy_into_pool)),
        Figure("cpu_get_vs_copy", "CPU tier get (allocates)", "copy_ into fresh tensor",
               label, *_interleaved(cfg.rounds, get, copy_fresh)),
        Figure("cpu_borrow_vs_copy", "CPU tier borrow + copy_", "copy_ into preallocated",
               label, *_interleaved(cfg.rounds, borrow, copy_prealloc)),
    ]
    tier.close()
    return figs


# -- disk tier -------------------------------------------------------------------------------


def _bench_disk(
    shape: BenchShape,
    cfg: StoreBenchConfig,
    storage: str,
    root: Path,
    dropper: CacheDropper,
    tag: int,
    notes: list[str],
) -> list[Figure]:
    from kvcache.kvstore.disk_tier import DiskTier

    srcs = _sources(shape, seed=tag)
    objs = _objects(shape, srcs, shape.disk_chunks, tag)
    keys = [o.header.key for o in objs]
    size = shape.nbytes
    total = size * len(objs)
    src_bytes = [_bytes_of(o.tensors["kv"]) for o in objs]
    tier_dir = root / f"tier-{storage}"
    base = root / "baseline.bin"  # same directory, same file system as the tier
    # Container headers add ~1 KiB per object; the slack keeps eviction out of the figures.
    capacity = total + total // 4 + 64 * MiB
    tier = DiskTier(tier_dir, capacity, blob_storage=storage, exclusive=True)

    def reopen() -> None:
        nonlocal tier
        tier.close()
        tier = DiskTier(tier_dir, capacity, blob_storage=storage, exclusive=True)

    def put() -> float:
        for k in keys:
            tier.delete(k)
        # The deletes' journal commit must not land in the timed section (a directory's
        # fsync commits it; no host-wide sync).
        fsync_paths(dirs_under(tier_dir))

        def body() -> None:
            for k, o in zip(keys, objs, strict=True):
                tier.put(k, o)
            # Durable like the baseline: blob files are not fsynced by the tier by default.
            fsync_paths(files_under(tier_dir))
        return _gbps(total, body)

    def write() -> float:
        base.unlink(missing_ok=True)
        fsync_paths([root])

        def body() -> None:
            with open(base, "wb", buffering=0) as f:
                for b in src_bytes:
                    f.write(b)
                os.fsync(f.fileno())
        return _gbps(total, body)

    def get_all() -> None:
        for k in keys:
            out = tier.get(k)
            assert out is not None
            del out

    def get_batch() -> None:
        # How a connector loads a prefix: one get_many, whose reads the tier overlaps.
        outs = tier.get_many(keys)
        assert all(o is not None for o in outs)
        del outs

    def read_all() -> None:
        with open(base, "rb", buffering=0) as f:
            for _ in range(len(objs)):
                out = torch.empty(size, dtype=torch.uint8)
                f.readinto(_bytes_of(out))
                del out

    def cold_get() -> float:
        tier.close()  # unmaps LMDB, whose mapped pages no eviction can drop
        dropper.drop(files_under(tier_dir))
        reopen()  # reads the (small) index: a serving process has it warm anyway
        return _gbps(total, get_all)

    def cold_get_many() -> float:
        tier.close()
        dropper.drop(files_under(tier_dir))
        reopen()
        return _gbps(total, get_batch)

    def cold_read() -> float:
        dropper.drop([base])
        return _gbps(total, read_all)

    for _ in range(max(cfg.warmup, 1)):
        put()
        write()
    got = tier.get(keys[0])
    assert got is not None and torch.equal(got.tensors["kv"], srcs[0]), "disk tier corrupted data"
    del got
    direct_read = direct_reader(base)

    label = shape.name
    figs = [Figure("disk_put_vs_write", "disk tier put + fsync",
                   "sequential write + fsync", label,
                   *_interleaved(cfg.disk_rounds, put, write), variant=storage)]
    if direct_read is None:
        if "O_DIRECT" not in " ".join(notes):
            notes.append("no O_DIRECT read figure: the file system refuses O_DIRECT")
        gets, reads = _interleaved(cfg.disk_rounds, cold_get, cold_read)
    else:
        gets, reads, directs = _rotated(cfg.disk_rounds, cold_get, cold_read,
                                        lambda: _gbps(total, direct_read))
    figs.append(Figure("disk_cold_get_vs_read", "disk tier get, cold",
                       "sequential read, cold", label, gets, reads, variant=storage))
    if direct_read is not None:
        figs.append(Figure("disk_cold_get_vs_direct_read", "disk tier get, cold",
                           f"O_DIRECT read, {DIRECT_IN_FLIGHT} x {DIRECT_REQUEST // MiB} MiB "
                           "in flight", label, gets, directs, variant=storage))
    figs.append(Figure("disk_cold_get_many_vs_read", "disk tier get_many, cold",
                       "sequential read, cold", label,
                       *_interleaved(cfg.disk_rounds, cold_get_many, cold_read),
                       variant=storage))
    get_all()  # both warm now: the tier's objects and the baseline file are cached
    read_all()
    figs.append(Figure("disk_warm_get_vs_read", "disk tier get, warm",
                       "sequential read, warm", label,
                       *_interleaved(max(cfg.rounds, 3),
                                     lambda: _gbps(total, get_all),
                                     lambda: _gbps(total, read_all)), variant=storage))
    tier.close()
    shutil.rmtree(tier_dir, ignore_errors=True)
    base.unlink(missing_ok=True)
    return figs


# -- where the time goes ---------------------------------------------------------------------


def _profile(shape: BenchShape, cfg: StoreBenchConfig) -> dict[str, float]:
    """GB/s of the steps a get/put is made of, on warm memory, for the headline shape."""
    src = _sources(BenchShape(shape.label, shape.layout, shape.num_tokens, 1, 1), seed=99)[0]
    obj = _objects(shape, [src], 1, tag=99)[0]
    data = encode_object(obj)
    size = shape.nbytes
    dst = torch.zeros_like(src)
    reps = max(cfg.rounds, 3)

    def med(fn: Callable[[], object]) -> float:
        fn()
        return round(statistics.median(_gbps(size, fn) for _ in range(reps)), 3)

    return {
        "copy_prealloc": med(lambda: dst.copy_(src)),
        "copy_fresh_alloc": med(lambda: torch.empty_like(src).copy_(src)),
        "alloc_and_touch": med(lambda: torch.empty(size, dtype=torch.uint8).fill_(0)),
        "bytearray_alloc_and_touch": med(lambda: bytearray(size)),
        "xxh3_128": med(lambda: xxhash.xxh3_128_hexdigest(data)),
        "encode_object": med(lambda: encode_object(obj)),
        "decode_object": med(lambda: decode_object(data)),
        "bytearray_copy": med(lambda: bytearray(data)),
    }


# -- the run ---------------------------------------------------------------------------------


def _machine(workdir: Path) -> dict[str, Any]:
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    cpu = None
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = None
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = round(int(line.split()[1]) / (1 << 20), 1)
    mount, fstype = None, None
    best = ""
    for line in (read("/proc/mounts") or "").splitlines():
        dev, mnt, fs, *_ = line.split()
        if str(workdir).startswith(mnt) and len(mnt) >= len(best):
            best, mount, fstype = mnt, dev, fs
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "workdir": str(workdir),
        "workdir_device": mount,
        "workdir_fs": fstype,
        "transparent_hugepage": read("/sys/kernel/mm/transparent_hugepage/enabled"),
    }


def _code_version() -> dict[str, Any]:
    """Which code was measured: the commit, and the tracked files changed since."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"git_head": None, "modified": None}
    return {"git_head": head or None,
            "modified": [line[3:] for line in dirty if line.strip()]}


DEFAULT_STORE = Path.home() / ".cache" / "kvcache-bench"


def run(
    quick: bool = False,
    store: Path | None = None,
    config: StoreBenchConfig | None = None,
    *,
    drop_caches: bool = False,
) -> dict[str, Any]:
    """Measure everything; return the result dict (see ``kvcache.tools.bench``).

    ``store``: an existing directory on the disk to measure (a store's directory, say);
    the disk part runs in a temporary subdirectory of it and removes it afterwards,
    touching nothing else there. Default: ``~/.cache/kvcache-bench`` (created).
    ``drop_caches``: make reads cold by dropping the whole host's page cache (root only)
    instead of evicting just the benchmark's files.
    """
    cfg = config or (StoreBenchConfig.quick() if quick else StoreBenchConfig.full())
    if drop_caches:
        cfg = dataclasses.replace(cfg, cold_cache="drop_caches")
    dropper = CacheDropper(cfg.cold_cache)  # refuses drop_caches without root, up front
    if store is None:
        parent = DEFAULT_STORE
        parent.mkdir(parents=True, exist_ok=True)
    else:
        parent = Path(store)
        if not parent.is_dir():
            raise ConfigError(
                f"--store {parent}: no such directory; give an existing directory on the "
                "disk to measure (the benchmark works in a temporary subdirectory of it)"
            )
    free = shutil.disk_usage(parent).free
    if free < cfg.disk_bytes + 1024 * MiB:
        raise ConfigError(
            f"the benchmark needs {cfg.disk_bytes / GB:.1f} GB free under {parent} and "
            f"{free / GB:.1f} GB are; free space or pass --store on another disk"
        )
    # Not /dev/shm: the disk figures must hit the disk the tier would really use. A hidden
    # name, so that a listing of the store does not take it for one of its own entries.
    root = Path(tempfile.mkdtemp(prefix=".kvcache-bench-", dir=parent))
    t_start = time.time()
    figures: list[Figure] = []
    notes: list[str] = []
    try:
        from kvcache.kvstore import disk_tier  # noqa: F401 - present in this build?
        disk_ok = True
    except ImportError as e:
        disk_ok = False
        notes.append(f"disk tier not measured: {e}")
    try:
        for i, shape in enumerate(cfg.shapes):
            figures += _bench_cpu(shape, cfg, tag=2 * i)
        if disk_ok:
            for i, shape in enumerate(cfg.shapes):
                for storage in cfg.blob_storages:
                    figures += _bench_disk(shape, cfg, storage, root, dropper, tag=2 * i + 1,
                                           notes=notes)
        profile = _profile(cfg.shapes[0], cfg)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    head = cfg.shapes[0].name
    head_storage = cfg.blob_storages[0] if cfg.blob_storages else None
    ratios: dict[str, dict[str, float]] = {}
    for f in figures:
        where = f.shape if f.variant is None else f"{f.shape} / {f.variant}"
        ratios.setdefault(f.key, {})[where] = round(f.ratio, 3)
    result: dict[str, Any] = {
        "benchmark": "store",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(time.time() - t_start, 1),
        "machine": _machine(parent),
        "code": _code_version(),
        "headline": {"shape": head, "blob_storage": head_storage},
    }
    for key in HEADLINE_KEYS:
        match = [f for f in figures if f.key == key and f.shape == head
                 and f.variant in (None, head_storage)]
        result[key] = round(match[0].ratio, 3) if match else None
    result["goals"] = GOALS
    result["ratios"] = ratios
    result["rows"] = [f.row() for f in figures]
    result["profile_gbps"] = profile
    result["method"] = {
        "shapes": [
            {"name": s.name, "layout": s.layout.to_dict(), "num_tokens": s.num_tokens,
             "chunk_bytes": s.nbytes, "cpu_chunks": s.cpu_chunks, "disk_chunks": s.disk_chunks}
            for s in cfg.shapes
        ],
        "rounds": cfg.rounds,
        "disk_rounds": cfg.disk_rounds,
        "warmup": cfg.warmup,
        "statistic": "median GB/s over rounds (1e9 bytes/s of chunk payload); subject and "
                     "baselines take turns, which goes first rotates every round; the ratio "
                     "is the median of the per-round ratios",
        "scratch_dir": f"a temporary subdirectory of {parent}, removed afterwards",
        "cold_cache": dropper.description,
        "cold_cache_method": dropper.method,
        "cpu": "put: N puts into a tier whose pool pages were committed during warm-up, vs "
               "copy_ into a preallocated, touched pool; get: tier.get (fresh buffer) vs "
               "torch.empty_like + copy_; borrow: zero-copy view + copy_ into a preallocated "
               "tensor vs copy_ between preallocated tensors",
        "disk": "put: N puts then fsync of every file under the tier directory, vs one "
                "sequential write + fsync of the same bytes; get: N gets (read, xxh3 verify, "
                "decode, one get at a time) vs a buffered sequential read of one file of the "
                "same bytes into fresh N chunk-sized tensors, and vs O_DIRECT reads of that "
                f"file with {DIRECT_IN_FLIGHT} requests of {DIRECT_REQUEST // MiB} MiB in "
                "flight into reused memory (about what the disk gives); all in the same "
                "directory; the tier is reopened after each eviction",
        "profile": "GB/s of single steps on warm memory for the headline shape "
                   "(encode/decode/xxh3 are single-threaded)",
    }
    result["notes"] = notes
    return result
