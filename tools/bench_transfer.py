"""``kvcache bench transfer``: paged gather/scatter and pipelined loading beside plain copies.

Every figure is a ratio against a baseline measured in the same run on the same bytes:

- **gather / scatter** (per engine layout): paged engine KV at a sequence's slots (blocks
  shuffled over a pool 4× larger) ↔ one canonical chunk, all layers. CPU: the torch path
  (the one ``impl="auto"`` runs there) beside ``torch.Tensor.copy_`` of the same bytes
  between contiguous tensors. CUDA: the Triton kernel writing straight into / reading
  straight from pinned host memory (gather → D2H, H2D → scatter), and the same through a
  device staging buffer, beside a contiguous pinned ``copy_`` of the same bytes.
- **pipelined load**: a Llama-3-8B-shaped prefix in the CPU tier (pinned when CUDA is
  present) loaded with ``LayerLoader`` while a stand-in "compute" (a matmul sized to take
  about as long as one layer's transfer) runs per layer, beside the same load done serially
  (``background=False``) and beside the ideal ``max(transfer, compute)``.

Subject and baseline alternate round by round (which goes first flips); figures are
medians over rounds. Goals (CUDA only): gather/scatter ≥ 0.8× the contiguous copy for
≥ 2 MiB per layer; pipelined time ≤ 1.1× max(transfer, compute).
"""

from __future__ import annotations

import datetime
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache.kernels.page_layout import (
    PageLayout,
    SglangLayerFirstLayout,
    SglangPageFirstLayout,
    VllmFlashLayout,
    VllmMlaLayout,
    paged_planes,
    slots_from_block_table,
)
from kvcache.kernels.paged_copy import chunk_shape, paged_gather, paged_scatter
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.keys import content_key
from kvcache.kvstore.layer_loader import LayerLoader
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore
from kvcache.tools.bench_store import _code_version, _machine

GB = 1e9
MiB = 1 << 20
GOAL_COPY = 0.8
GOAL_PIPELINE = round(1 / 1.1, 3)
LLAMA_3_8B = KVLayout("llama-3-8b", 32, 8, 128, dtype="bfloat16")


@dataclass(frozen=True)
class TransferBenchConfig:
    """tokens: per gather/scatter (one sequence); prefix_chunks × chunk_tokens: the
    pipelined prefix. Llama-3-8B bf16 is 32 KiB per token per layer of K+V."""

    tokens: int = 512  # 1 MiB per layer (K and V), 32 MiB in all
    block_size: int = 16
    prefix_chunks: int = 4
    chunk_tokens: int = 256
    rounds: int = 7
    warmup: int = 2
    # CPU runs: torch intra-op threads (None: leave torch's default). One thread by default:
    # on a shared 2-core machine each of the per-plane ops' OpenMP barrier waits for a core
    # a neighbour holds (measured: 64 1 MiB index_selects 0.26 GB/s with 2 threads, 3.4 GB/s
    # with 1, beside a 32 MiB copy_ at 2.8 and 4.3), which measures the neighbours.
    cpu_threads: int | None = 1
    layouts: tuple[str, ...] = ("vllm-nhd", "vllm-hnd", "vllm-mla", "sglang-layer-first",
                                "sglang-page-first")
    kv: KVLayout = field(default=LLAMA_3_8B)

    @classmethod
    def quick(cls) -> TransferBenchConfig:
        return cls(tokens=256, prefix_chunks=2, chunk_tokens=128, rounds=5, warmup=1)

    @classmethod
    def tiny(cls) -> TransferBenchConfig:
        """Smoke test: a second or two; the numbers mean nothing."""
        return cls(tokens=40, block_size=4, prefix_chunks=2, chunk_tokens=16, rounds=2,
                   warmup=1, kv=KVLayout("tiny", 2, 2, 32, dtype="float16"))

    @classmethod
    def gpu(cls) -> TransferBenchConfig:
        # 2 MiB per layer: the size the goal is stated for.
        return cls(tokens=1024, prefix_chunks=8, chunk_tokens=256)


def make_layout(kind: str, cfg: TransferBenchConfig) -> PageLayout:
    kv, b = cfg.kv, cfg.block_size
    blocks = 4 * -(-cfg.tokens // b)
    if kind in ("vllm-nhd", "vllm-hnd"):
        return VllmFlashLayout(kv.num_layers, blocks, b, kv.num_kv_heads, kv.head_dim,
                               hnd=kind == "vllm-hnd")
    if kind == "vllm-mla":
        # DeepSeek-V3's 576-wide latent, at this config's layer count.
        return VllmMlaLayout(kv.num_layers, blocks, b, 576 if kv.head_dim >= 64 else 40)
    if kind == "sglang-layer-first":
        return SglangLayerFirstLayout(kv.num_layers, blocks * b, kv.num_kv_heads, kv.head_dim)
    if kind == "sglang-page-first":
        return SglangPageFirstLayout(kv.num_layers, blocks, kv.num_kv_heads, kv.head_dim, b)
    raise ValueError(f"unknown layout {kind!r}")


# -- timing --------------------------------------------------------------------------------
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], cuda: bool) -> float:
    _sync(cuda)
    t0 = time.perf_counter()
    fn()
    _sync(cuda)
    return time.perf_counter() - t0


def _paired(rounds: int, a: Callable[[], float], b: Callable[[], float]
            ) -> tuple[list[float], list[float]]:
    sa: list[float] = []
    sb: list[float] = []
    for r in range(rounds):
        if r % 2:
            sb.append(b())
            sa.append(a())
        else:
            sa.append(a())
            sb.append(b())
    return sa, sb


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def _row(key: str, figure: str, baseline: str, shape: str, variant: str | None,
         nbytes: int, subject_s: Sequence[float], baseline_s: Sequence[float],
         goal: float | None) -> dict[str, Any]:
    """GB/s of both (from seconds per round); ratio = median of per-round ratios."""
    ratio = statistics.median(b / max(s, 1e-12) for s, b in zip(subject_s, baseline_s,
                                                                strict=True))
    return {
        "key": key, "figure": figure, "shape": shape, "variant": variant, "unit": "GB/s",
        "value": _sig(nbytes / statistics.median(subject_s) / GB),
        "baseline": baseline,
        "baseline_value": _sig(nbytes / statistics.median(baseline_s) / GB),
        "ratio": _sig(ratio), "goal": goal,
        "meets_goal": None if goal is None else ratio >= goal,
        "samples_s": [round(x, 6) for x in subject_s],
        "baseline_samples_s": [round(x, 6) for x in baseline_s],
    }


# -- gather / scatter ----------------------------------------------------------------------
def _bench_copy(kind: str, cfg: TransferBenchConfig, device: torch.device) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    layout = make_layout(kind, cfg)
    dtype = cfg.kv.torch_dtype
    kv = layout.allocate(dtype, device)
    planes = paged_planes(layout, kv)
    for view in (v for layer in planes.views for v in layer):
        view.copy_(torch.randn(view.shape, device=device).to(dtype))
    g = torch.Generator().manual_seed(0)
    table = torch.randperm(layout.num_slots // layout.block_size, generator=g)
    slots = slots_from_block_table(table, layout.block_size, 0, cfg.tokens).to(device)
    shape = chunk_shape(planes, cfg.tokens)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    per_layer = nbytes / layout.num_layers / MiB
    label = f"{cfg.kv.model_id} {cfg.tokens} tok ({per_layer:g} MiB/layer)"
    if kind == "vllm-mla":
        label = f"MLA latent {planes.head_dim}, {cfg.tokens} tok ({per_layer:g} MiB/layer)"
    rows = []
    if not cuda:
        chunk = torch.empty(shape, dtype=dtype)
        src = torch.randn(shape).to(dtype)
        dst = torch.empty_like(src)
        copy = lambda: _seconds(lambda: dst.copy_(src), False)  # noqa: E731
        gather = lambda: _seconds(lambda: paged_gather(planes, slots, chunk), False)  # noqa: E731
        scatter = lambda: _seconds(lambda: paged_scatter(planes, slots, src), False)  # noqa: E731
        for _ in range(cfg.warmup):
            copy(), gather(), scatter()
        rows.append(_row("cpu_gather_vs_copy", "gather (torch)", "copy_ contiguous", label,
                         kind, nbytes, *_paired(cfg.rounds, gather, copy), None))
        rows.append(_row("cpu_scatter_vs_copy", "scatter (torch)", "copy_ contiguous", label,
                         kind, nbytes, *_paired(cfg.rounds, scatter, copy), None))
        return rows
    host = torch.empty(shape, dtype=dtype, pin_memory=True)
    dev = torch.randn(shape, device=device).to(dtype)
    d2h = lambda: _seconds(lambda: host.copy_(dev, non_blocking=True), True)  # noqa: E731
    h2d = lambda: _seconds(lambda: dev.copy_(host, non_blocking=True), True)  # noqa: E731
    subjects = {
        "gather->D2H direct": lambda: _seconds(lambda: paged_gather(planes, slots, host), True),
        "gather->D2H staged": lambda: _seconds(
            lambda: paged_gather(planes, slots, host, host_direct=False), True),
        "H2D->scatter direct": lambda: _seconds(
            lambda: paged_scatter(planes, slots, host), True),
        "H2D->scatter staged": lambda: _seconds(
            lambda: paged_scatter(planes, slots, host, host_direct=False), True),
    }
    goal = GOAL_COPY if per_layer >= 2 else None
    for name, fn in subjects.items():
        base, base_name = (d2h, "D2H copy_ contiguous") if "D2H" in name \
            else (h2d, "H2D copy_ contiguous")
        for _ in range(cfg.warmup):
            fn(), base()
        key = "gpu_gather_d2h_vs_copy" if "D2H" in name else "gpu_h2d_scatter_vs_copy"
        rows.append(_row(key, name, base_name, label, kind, nbytes,
                         *_paired(cfg.rounds, fn, base), goal if "direct" in name else None))
    return rows


# -- pipelined load ------------------------------------------------------------------------
def _bench_pipeline(
    cfg: TransferBenchConfig, device: torch.device, stand_in: str
) -> list[dict[str, Any]]:
    """stand_in: "matmul" (compute on the device) or "sleep" (CPU runs only: the host idles
    per layer as it would while an accelerator computes, so the loader has a free core)."""
    cuda = device.type == "cuda"
    kv = cfg.kv
    nbytes = kv.bytes_per_token * cfg.chunk_tokens * cfg.prefix_chunks
    store = TieredStore([CpuTier(nbytes + 64 * MiB, pin_memory=cuda)])
    src = torch.randn(kv.chunk_shape(cfg.chunk_tokens)).to(kv.torch_dtype)
    keys = [content_key("00" * 16, [9, i]) for i in range(cfg.prefix_chunks)]
    for k in keys:
        store.put(k, src, kv)

    def load(background: bool, compute: Callable[[], object] | None) -> float:
        def body() -> None:
            with LayerLoader(store, keys, kv, device=device, background=background) as ld:
                for i in range(kv.num_layers):
                    ld.wait_for_layer(i)
                    if compute is not None:
                        compute()
        return _seconds(body, cuda)

    # A stand-in for one layer's forward: matmuls adding up to about one layer's transfer,
    # measured once warm (the first loads also pay for faulting in fresh host memory).
    for _ in range(2):
        load(False, None)
    per_layer = statistics.median(load(False, None) for _ in range(3)) / kv.num_layers
    # One product per layer whose row count is scaled to the time (many small ones would
    # measure Python and GIL hand-offs with the loader thread instead).
    k = 1024 if cuda else 512
    a = torch.randn(256, k, device=device)
    b = torch.randn(k, k, device=device)
    # Timed over 20 back-to-back products: one alone on a GPU is mostly launch and sync.
    t = statistics.median(_seconds(lambda: [a @ b for _ in range(20)], cuda)
                          for _ in range(5)) / 20
    a = torch.randn(max(1, round(256 * per_layer / max(t, 1e-9))), k, device=device)

    def compute() -> None:
        if stand_in == "sleep":
            time.sleep(per_layer)
        else:
            a @ b

    def compute_all() -> None:
        for _ in range(kv.num_layers):
            compute()

    transfer = lambda: load(False, None)  # noqa: E731
    compute_only = lambda: _seconds(compute_all, cuda)  # noqa: E731
    serial = lambda: load(False, compute)  # noqa: E731
    pipelined = lambda: load(True, compute)  # noqa: E731
    for _ in range(cfg.warmup):
        pipelined(), serial()
    p_s, s_s = _paired(cfg.rounds, pipelined, serial)
    ideal = [max(x, y) for x, y in zip(*_paired(cfg.rounds, transfer, compute_only),
                                       strict=True)]
    label = f"{kv.model_id} prefix {cfg.prefix_chunks}x{cfg.chunk_tokens} tok " \
            f"({nbytes / MiB:g} MiB)"
    where = "cuda" if cuda else "cpu"
    variant = f"{where}, {stand_in}"
    store.close()
    return [
        _row(f"{where}_pipelined_vs_serial", "pipelined load + compute",
             "serial load + compute", label, variant, nbytes, p_s, s_s, None),
        _row(f"{where}_pipelined_vs_ideal", "pipelined load + compute",
             "max(transfer, compute)", label, variant, nbytes, p_s, ideal,
             GOAL_PIPELINE if cuda else None),
    ]


def run(quick: bool = False, config: TransferBenchConfig | None = None) -> dict[str, Any]:
    """Measure everything; return the result dict (see ``kvcache.tools.bench``)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if config is not None:
        cfg = config
    elif cuda and not quick:
        cfg = TransferBenchConfig.gpu()
    else:
        cfg = TransferBenchConfig.quick() if quick else TransferBenchConfig()
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    if not cuda and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        for kind in cfg.layouts:
            rows += _bench_copy(kind, cfg, device)
        for stand_in in ("matmul",) if cuda else ("matmul", "sleep"):
            rows += _bench_pipeline(cfg, device, stand_in)
    finally:
        torch.set_num_threads(threads)
    notes = []
    if not cuda:
        notes.append("no CUDA device: CPU figures only (torch path); the GPU goals apply to "
                     "CUDA runs")
    by_key: dict[str, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault(r["key"], {})[str(r["variant"])] = r["ratio"]
    return {
        "benchmark": "transfer",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": _machine(pathlib.Path.cwd()),
        "code": _code_version(),
        "ratios": by_key,
        "goals": {"gpu_copy": GOAL_COPY, "gpu_pipeline": GOAL_PIPELINE},
        "rows": rows,
        "method": {
            "config": {"tokens": cfg.tokens, "block_size": cfg.block_size,
                       "prefix_chunks": cfg.prefix_chunks, "chunk_tokens": cfg.chunk_tokens,
                       "rounds": cfg.rounds, "layout": cfg.kv.to_dict(),
                       "torch_threads": None if cuda else cfg.cpu_threads or threads},
            "statistic": "GB/s from the median seconds per round (1e9 bytes/s of canonical "
                         "KV); ratio = median of per-round baseline/subject time ratios",
            "copy": "gather/scatter of all layers at a sequence's slots over shuffled "
                    "blocks (pool 4x the sequence) vs copy_ of the same bytes between "
                    "contiguous tensors (CUDA: pinned host <-> device)",
            "pipeline": "LayerLoader from the CPU tier with a stand-in compute per layer "
                        "sized to one layer's transfer: a matmul on the device, or (CPU "
                        "runs) a sleep, the host idling as while an accelerator computes; "
                        "serial = background=False (load layer i, then compute it); ideal = "
                        "max(transfer alone, compute alone) per round",
        },
        "notes": notes,
    }
