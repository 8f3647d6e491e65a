"""``kvcache bench sglang``: SGLang's page transfers through kvcache's HiCache backend.

SGLang moves pages between its host pool and its storage backend in batches of up to 128
pages (``STORAGE_BATCH_SIZE``). This benchmark times those calls on host pools shaped as
SGLang's (``connectors/sglang_pages.py``) for a Llama-3-8B rank at tensor parallelism 4
(32 layers, 2 KV heads of 128, bf16: 32 KiB per token), each figure beside its baseline
measured in the same run:

- CPU tier (kvcache embedded, no disk tier), each host layout: ``batch_set_v1`` and
  ``batch_get_v1`` of 128 pages beside a plain ``copy_`` of the same number of bytes
  between two contiguous tensors (memcpy: no strided pages, no bookkeeping; goal ≥ 0.8x),
  and beside ``copy_`` page by page between contiguous tensors (what any per-page
  transfer pays on top of memcpy: a call per page), which leaves kvcache's own cost.
  The batch is stored at once and read into slots allocated at once, so kvcache copies
  runs of pages in one strided copy; *scattered pages* reads into the same slots in a
  random page order (a fragmented host pool), where it copies page by page.
- page size: the same get at SGLang page sizes of 16, 64 and 256 tokens. kvcache stores
  each SGLang page as one object (``connectors/sglang.py`` says why), so small pages pay
  per-object costs; this shows how much.
- daemon: the same calls through a ``kvcache serve`` daemon on a Unix socket (its CPU
  tier), beside ``copy_``: what engines sharing one node's cache pay.
- disk: ``batch_get_v1`` from kvcache's disk tier, cold (the store reopened, so its CPU
  tier is empty, and its files evicted from the page cache) and warm (files in the page
  cache), beside SGLang's own ``file`` backend (``HiCacheFile``) on the same disk, cold
  and warm alike, through the calls SGLang makes for it (``batch_get`` into flat pages,
  then each flat page into the host pool; its flat buffers are allocated outside the
  timing, which favours it). Goal: ≥ 1.0x. And the write: kvcache's ``batch_set_v1``
  until the pages are on disk (``flush``) beside ``HiCacheFile.batch_set`` of the flat
  pages SGLang hands it (written to the page cache, not synced).

Each round times kvcache and then its baseline, so that a shared machine's drift hits
both; GB/s (the pages' bytes) from the median seconds, the ratio the median of the
rounds' paired ratios. Runs where sglang
is installed (``pip install --no-deps sglang==0.5.23`` and its light dependencies, as in
``.ci/run``'s SGLang stage); elsewhere it says so.
"""

from __future__ import annotations

import datetime
import gc
import shutil
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.keys import sglang_page_hashes
from kvcache.tools.cold_cache import CacheDropper, files_under

GOAL_CPU = 0.8  # batch_get_v1 / set from the CPU tier vs a plain copy_ of the same bytes
GOAL_DISK = 1.0  # batch_get_v1 from disk vs HiCacheFile on the same disk
LAYOUTS = ("page_first", "layer_first", "page_first_direct")


@dataclass(frozen=True)
class Config:
    layers: int = 32
    kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 64
    batch_pages: int = 128
    page_sizes: tuple[int, ...] = (16, 64, 256)
    rounds: int = 5

    @classmethod
    def quick(cls) -> Config:
        return cls(layers=4, kv_heads=2, head_dim=64, page_size=16, batch_pages=32,
                   page_sizes=(16, 64), rounds=2)

    def page_bytes(self, page_size: int | None = None) -> int:
        p = self.page_size if page_size is None else page_size
        return 2 * self.layers * p * self.kv_heads * self.head_dim * 2  # bf16

    def shape(self, page_size: int | None = None) -> str:
        p = self.page_size if page_size is None else page_size
        mib = self.batch_pages * self.page_bytes(p) / (1 << 20)
        return f"{self.batch_pages} pages x {p} tok ({mib:.0f} MiB)"


def _need_sglang() -> Any:
    try:
        from sglang.srt.mem_cache import hicache_storage
    except ImportError:
        raise KVCacheError(
            "`kvcache bench sglang` needs sglang: pip install --no-deps sglang==0.5.23 "
            "orjson psutil pybase64 requests pillow starlette msgspec pyzmq IPython") from None
    return hicache_storage


def _paired(op: Callable[[], Any], base: Callable[[], Any], rounds: int,
            op_before: Callable[[], Any] | None = None,
            base_before: Callable[[], Any] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of ``op()`` and of ``base()``, alternating round by round so that a shared
    machine's drift hits both (``*_before()`` untimed before each), after one untimed
    round of each (first touches, allocator warm-up)."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds + 1):
        for fn, before, out in ((op, op_before, times[0]), (base, base_before, times[1])):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            if r:
                out.append(time.perf_counter() - t0)
    return times


class _Bench:
    def __init__(self, cfg: Config, workdir: Path) -> None:
        self.cfg, self.workdir = cfg, workdir
        self.hs = _need_sglang()
        self.rows: list[dict[str, Any]] = []
        self._seed = 0

    # -- pieces ----------------------------------------------------------------------------
    def storage_config(self, extra: dict[str, Any]) -> Any:
        return self.hs.HiCacheStorageConfig(
            tp_rank=0, tp_size=4, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
            model_name="bench-llama-8b", extra_config=extra)

    def pool(self, layout: str, page_size: int) -> Any:
        """A host pool of two batches of pages (random bf16), as SGLang's looks to us."""
        from kvcache.connectors.sglang_pages import HostPages

        c = self.cfg
        pages = HostPages.allocate(layout, is_mla=False, num_pages=2 * c.batch_pages,
                                   page_size=page_size, num_layers=c.layers,
                                   num_heads=c.kv_heads, head_dim=c.head_dim,
                                   dtype=torch.bfloat16)
        pages.kv_buffer.normal_()
        return types.SimpleNamespace(kv_buffer=pages.kv_buffer, layout=layout,
                                     page_size=page_size, dtype=torch.bfloat16, pages=pages)

    def backend(self, pool: Any, store_dir: Path, *, disk: bool, server: str | None = None
                ) -> Any:
        from kvcache.connectors.sglang import KVCacheHiCacheStorage

        batch = self.cfg.batch_pages * self.cfg.page_bytes(pool.page_size)
        extra = {"store.dir": str(store_dir), "store.disk.enabled": disk,
                 "store.cpu.capacity": 2 * batch + (64 << 20),
                 "connector.model_id": "bench-llama-8b", "connector.server": server}
        b = KVCacheHiCacheStorage(self.storage_config(extra), {})
        b.register_mem_pool_host(pool)
        return b

    def keys(self) -> list[str]:
        """Fresh page hashes of one batch."""
        self._seed += 1
        tokens = [(self._seed * 7919 + i) % 50000 for i in range(self.cfg.batch_pages)]
        return sglang_page_hashes(tokens, 1)

    def slots(self, pool: Any, second: bool, scattered: bool = False) -> torch.Tensor:
        """One batch's token slots: the pool's first or second half, page by page in
        order, or (``scattered``) its pages in a random order, as a fragmented host pool
        hands them out: no run of pages for kvcache to copy at once."""
        n, p = self.cfg.batch_pages, pool.page_size
        first = n if second else 0
        pages = torch.arange(first, first + n, dtype=torch.int64)
        if scattered:
            pages = pages[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
        return (pages[:, None] * p + torch.arange(p, dtype=torch.int64)).reshape(-1)

    def copier(self, nbytes: int) -> Callable[[], Any]:
        """A plain ``copy_`` of ``nbytes`` between two contiguous tensors."""
        src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch outside the timing
        return lambda: dst.copy_(src)

    def page_copier(self, page_bytes: int) -> Callable[[], Any]:
        """``copy_`` of one batch page by page, each between contiguous tensors: the
        per-call cost any per-page transfer pays, without kvcache's bookkeeping."""
        src = [torch.empty(page_bytes, dtype=torch.uint8).random_(0, 255)
               for _ in range(self.cfg.batch_pages)]
        dst = [torch.empty_like(t) for t in src]

        def copy() -> None:
            for d, t in zip(dst, src, strict=True):
                d.copy_(t)
        copy()
        return copy

    def row(self, figure: str, shape: str, variant: str | None, nbytes: int,
            times: tuple[list[float], list[float]], baseline: str, goal: float | None
            ) -> None:
        """GB/s from median seconds; the ratio is the median of the rounds' paired ratios."""
        ours, base = times
        self.rows.append({
            "figure": figure, "shape": shape, "variant": variant, "unit": "GB/s",
            "value": nbytes / statistics.median(ours) / 1e9, "baseline": baseline,
            "baseline_value": nbytes / statistics.median(base) / 1e9,
            "ratio": statistics.median(b / o for o, b in zip(ours, base, strict=True)),
            "goal": goal})

    # -- figures ---------------------------------------------------------------------------
    def set_get(self, b: Any, pool: Any, variant: str, baselines: list[tuple[Any, ...]],
                figures: tuple[str, ...] = ("set", "get"), scattered: bool = False) -> None:
        """Rows for ``batch_set_v1`` (new keys each round) and ``batch_get_v1`` (into the
        pool's other half, ``scattered`` or in order) of one batch, beside each of
        ``baselines`` (name, copy, goal)."""
        c, p = self.cfg, pool.page_size
        nbytes = c.batch_pages * c.page_bytes(p)
        keys: list[str] = []

        def fresh() -> None:
            for k in b._keys(keys):
                b.store.delete(k)
            keys[:] = self.keys()

        def put() -> None:
            assert all(b.batch_set_v1(keys, self.slots(pool, False)))

        def get() -> None:
            assert all(b.batch_get_v1(keys, self.slots(pool, True, scattered)))
        if "set" in figures:
            for name, copy, goal in baselines:
                self.row("set", c.shape(p), variant, nbytes,
                         _paired(put, copy, c.rounds, fresh), name, goal)
        fresh()
        put()
        for name, copy, goal in baselines:
            self.row("get", c.shape(p), variant, nbytes, _paired(get, copy, c.rounds), name,
                     goal)

    def cpu(self, layout: str, page_size: int, figures: tuple[str, ...],
            scattered: bool = False) -> None:
        c = self.cfg
        pool = self.pool(layout, page_size)
        nbytes = c.batch_pages * c.page_bytes(page_size)
        d = Path(tempfile.mkdtemp(dir=self.workdir))
        b = self.backend(pool, d, disk=False)
        try:
            baselines = [("copy_", self.copier(nbytes), GOAL_CPU),
                         ("copy_ per page", self.page_copier(c.page_bytes(page_size)), None)]
            variant = (f"cpu {layout}, scattered pages" if scattered else f"cpu {layout}"
                       if "set" in figures else f"cpu {layout}, page size")
            self.set_get(b, pool, variant, baselines, figures, scattered)
        finally:
            b.close()
            shutil.rmtree(d, ignore_errors=True)

    def daemon(self) -> None:
        """Through ``kvcache serve`` on a Unix socket (CPU tier), as engines on one node
        share it: puts in a few requests, gets read from the daemon's shared memory."""
        from kvcache.tools.serve_process import serve_process

        c = self.cfg
        pool = self.pool("page_first", c.page_size)
        nbytes = c.batch_pages * c.page_bytes()
        d = Path(tempfile.mkdtemp(dir=self.workdir))
        with serve_process(d, 4 * nbytes + (256 << 20)) as (_, _, unix):
            b = self.backend(pool, d / "client", disk=False, server=unix)
            try:
                self.set_get(b, pool, "daemon page_first",
                             [("copy_", self.copier(nbytes), None)])
            finally:
                b.close()

    def disk(self) -> None:
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        c = self.cfg
        pool = self.pool("page_first", c.page_size)
        pages = pool.pages
        nbytes = c.batch_pages * c.page_bytes()
        dropper = CacheDropper("fadvise")
        ours_dir, file_dir = (Path(tempfile.mkdtemp(dir=self.workdir)) for _ in range(2))
        file_backend = HiCacheFile(self.storage_config({}), file_path=str(file_dir))
        src = self.slots(pool, False).reshape(-1, c.page_size)[:, 0].tolist()
        dst = self.slots(pool, True).reshape(-1, c.page_size)[:, 0].tolist()
        flats = [torch.empty(pages.page_shape, dtype=torch.bfloat16).view(-1) for _ in src]
        try:
            # writes
            ours_keys: list[str] = []
            file_keys: list[str] = []
            b = self.backend(pool, ours_dir, disk=True)

            def ours_set() -> None:
                ours_keys[:] = self.keys()
                assert all(b.batch_set_v1(ours_keys, self.slots(pool, False)))
                b.store.flush()

            def file_set() -> None:
                file_keys[:] = self.keys()
                data = [pages.page(s).flatten() for s in src]  # get_data_page(i, flat=True)
                assert file_backend.batch_set(file_keys, data)
            self.row("set", c.shape(), "disk page_first", nbytes,
                     _paired(ours_set, file_set, c.rounds), "HiCacheFile", None)
            b.close()

            # reads: one batch each, cold (evicted, store reopened) and warm
            def file_get() -> None:
                got = file_backend.batch_get(file_keys, flats)
                for s, flat in zip(dst, got, strict=True):
                    assert flat is not None
                    pages.page(s).copy_(flat.view(pages.page_shape))  # set_from_flat_data_page

            held: list[Any] = []

            def reopen() -> None:
                while held:
                    held.pop().close()
                held.append(self.backend(pool, ours_dir, disk=True))

            def ours_get() -> None:
                assert all(held[-1].batch_get_v1(ours_keys, self.slots(pool, True)))

            def evict_ours() -> None:
                reopen()
                gc.collect()
                dropper.drop(files_under(ours_dir))

            def evict_file() -> None:
                dropper.drop(files_under(file_dir))
            for variant, ours_before, file_before in (
                    ("disk cold", evict_ours, evict_file), ("disk warm", reopen, None)):
                self.row("get", c.shape(), variant, nbytes,
                         _paired(ours_get, file_get, c.rounds, ours_before, file_before),
                         "HiCacheFile", GOAL_DISK)
            while held:
                held.pop().close()
        finally:
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(file_dir, ignore_errors=True)


def run(quick: bool = False) -> dict[str, Any]:
    from kvcache.tools.bench_store import _code_version, _machine

    cfg = Config.quick() if quick else Config()
    workdir = Path(tempfile.mkdtemp(prefix="kvcache-bench-sglang-"))
    try:
        bench = _Bench(cfg, workdir)
        for layout in LAYOUTS:
            bench.cpu(layout, cfg.page_size, ("set", "get"))
        for layout in LAYOUTS:
            bench.cpu(layout, cfg.page_size, ("get",), scattered=True)
        for p in cfg.page_sizes:
            bench.cpu("page_first", p, ("get",))
        bench.daemon()
        bench.disk()
        machine = _machine(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cpu_gets = [r["ratio"] for r in bench.rows
                if r["figure"] == "get" and r["variant"] in {f"cpu {x}" for x in LAYOUTS}]
    cold = next(r["ratio"] for r in bench.rows if r["variant"] == "disk cold")
    return {
        "benchmark": "sglang",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine,
        "code": _code_version(),
        "config": asdict(cfg),
        "method": {
            "copy_": "dst.copy_(src) of two contiguous uint8 tensors of the batch's bytes",
            "timing": f"{cfg.rounds} rounds per figure, each timing kvcache then its "
                      "baseline; GB/s from the median seconds, the ratio the median of the "
                      "rounds' paired ratios",
            "cold": CacheDropper("fadvise").description,
        },
        "notes": [
            "kvcache stores one object per SGLang page; SGLang's page size sets the object "
            "size (the page-size rows)",
        ],
        "rows": bench.rows,
        "cpu_get_vs_copy_min": min(cpu_gets),
        "disk_cold_get_vs_hicachefile": cold,
    }
