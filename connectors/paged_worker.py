"""A paged engine's worker side: KV pages ↔ canonical chunks ↔ the store, layer by layer.

``PagedWorker`` carries out the ``RequestOps`` a ``PagedPlanner`` planned for a step:

- ``start_loads`` (before the forward pass): per request a ``LayerLoader`` fetches the
  chunks (zero-copy from the CPU tier, read from lower tiers) and decodes layer after
  layer on its own thread;
- ``load_layer(i)`` (before layer ``i``'s attention): waits for layer ``i`` of every load,
  at most ``load_timeout`` seconds, and scatters it into the request's blocks;
- an asynchronous load (``RequestOps.load_async``: its request is not in the step) is
  written layer by layer by a loader thread while the engine runs its steps, within
  ``load_timeout`` in all; ``finished_loads`` reports it done (failed blocks included),
  after which the engine schedules the request;
- ``save_layer(i)`` (after layer ``i``'s attention wrote the step's KV): copies the
  blocks holding the tokens to save out of layer ``i``, whole and as they are (one
  ``index_select``) — the only cost the forward pass pays for saving;
- ``end_step`` (after the forward pass): loads that did not deliver every layer become
  failed blocks; full staging buffers go to a saver thread, which turns the copied blocks
  into canonical chunks (``paged_gather`` over the staged blocks: a page layout may
  interleave or transpose K and V, and that work stays off the forward pass), encodes
  and stores them while the engine runs the next steps -- or, with ``quiet_s`` (an
  engine computing on the CPU), once its steps pause for that long.

Failures never reach the engine: a chunk that is missing, corrupt, of another layout, a
layer that times out or fails to decode make the request's blocks from the first bad
token on *failed blocks* (``failed_blocks``), which the engine recomputes; what that
request computed in the same step attended to them, so its saves of the step are dropped.
Saves that would push the staged bytes past ``max_pending_saves`` are skipped and
counted.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import torch

from kvcache.connectors.paged_plan import RequestOps
from kvcache.kernels.page_layout import (
    VllmCpuLayout,
    VllmFlashLayout,
    VllmMlaLayout,
    paged_planes,
    slots_from_block_table,
)
from kvcache.kernels.paged_copy import chunk_shape, paged_scatter
from kvcache.kvstore import background
from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.keys import Chunk, chunk_tokens
from kvcache.kvstore.layer_loader import LayerLoader
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    """Counters since the last ``take_stats`` (the engine's stats interval)."""

    load_requests: int = 0
    async_loads: int = 0  # of them, loaded beside the engine's steps
    load_tokens: int = 0  # tokens written into the engine's pages from the store
    load_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    load_bytes: int = 0
    load_seconds: float = 0.0  # waiting for layers inside the forward pass
    failed_loads: int = 0
    failed_tokens: int = 0
    save_tokens: int = 0
    save_bytes: int = 0
    save_seconds: float = 0.0  # copying out of the pages inside the forward pass
    skipped_saves: int = 0  # over max_pending_saves, or a store error

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Load:
    op: RequestOps
    loader: LayerLoader | None
    first_token: int  # of the loader's first chunk
    start: int
    end: int  # tokens [start, end) are loaded; end < op.load[1]: the rest failed
    slots: torch.Tensor
    layers_done: int = 0
    failed: bool = False
    cancelled: bool = False  # an asynchronous load whose request was aborted


# Bytes of free staging buffers a worker keeps for its next saves.
_KEEP_STAGING = 256 << 20

# Page layouts whose layer tensors hold whole blocks along ``block_dim``.
BlockPages: TypeAlias = VllmCpuLayout | VllmFlashLayout | VllmMlaLayout


@dataclass
class _Save:
    op: RequestOps
    first_block: int  # of the request's blocks, the first one staged
    block_ids: torch.Tensor  # int64 [blocks]: the engine's blocks copied out
    staging: torch.Tensor  # [layers, *one layer's pages with len(block_ids) blocks]
    buffer: torch.Tensor  # uint8, what ``staging`` views (kept for reuse once stored)
    layers_done: int = 0


class PagedWorker:
    """One worker's (one tensor-parallel rank's) loads and saves.

    layout: this rank's ``KVLayout``; pages: the page layout of one layer (``num_layers``
    1) and layer_pages its tensor for each layer; chunk_size and key_scheme as the
    planner's (the block size is the page layout's). quiet_s: when > 0, the saver stores
    a chunk only after the engine has run no step for that long (up to half of
    ``max_pending_saves`` waiting, see ``_await_pause``).
    """

    def __init__(self, store: TieredStore, layout: KVLayout, pages: BlockPages,
                 layer_pages: Sequence[torch.Tensor], *, chunk_size: int,
                 load_timeout: float = 10.0, max_pending_saves: int = 1 << 30,
                 key_scheme: str = "kvcache", quiet_s: float = 0.0) -> None:
        if len(layer_pages) != layout.num_layers or pages.num_layers != 1:
            raise KVCacheError(f"{len(layer_pages)} layers of pages for a layout of "
                               f"{layout.num_layers} layers")
        self.store = store
        self.layout = layout
        self.pages = pages
        self.layer_pages = list(layer_pages)
        self.planes = [paged_planes(pages, [t]) for t in self.layer_pages]
        # The layout names a page format: blocks are stored and loaded as they are.
        self.opaque = layout.page_format is not None
        if self.opaque and (pages.block_dim != 0 or chunk_size % pages.block_size):
            raise KVCacheError("opaque pages need whole blocks along a layer tensor's "
                               "first dim and chunks of whole blocks")
        self.chunk_size = chunk_size
        self.key_scheme = key_scheme
        self.block_size = pages.block_size
        self.load_timeout = load_timeout
        self.max_pending_saves = max_pending_saves
        self.stats = WorkerStats()  # since the last take_stats
        self.totals = WorkerStats()  # since the start, as of the last take_stats
        self._loads: list[_Load] = []
        self._saves: list[_Save] = []
        self._failed: set[int] = set()
        self._failed_requests: set[str] = set()  # this step's: their saves are dropped
        self._lock = threading.Lock()
        self._pending_bytes = 0
        # Staging buffers stored and free, for the next saves: a fresh one is faulted in
        # page by page inside the forward pass (vLLM CPU, a 4k-token prompt's 50 MB of
        # saves: 33-51 ms of its forward pass in fresh buffers, 9-10 ms in reused ones).
        # At most _KEEP_STAGING bytes are kept.
        self._free_staging: list[torch.Tensor] = []
        self._scratch_bufs = threading.local()  # each saver thread's (_scratch)
        # Staged saves are stored on an idle-class thread: in the gaps between an engine's
        # steps, not inside them (background.py). It gets almost no CPU while a CPU engine
        # is saturated, so past half of max_pending_saves a normal thread stores them too,
        # and the cache keeps learning under sustained load.
        self._queue: queue.Queue[_Save | None] = queue.Queue()
        self._backlog = threading.Condition(self._lock)
        self._closing = False
        self.quiet_s = quiet_s
        self._in_step = False  # between a step's first layer and its end_step
        self._step_ended = time.monotonic()  # the last end_step
        if quiet_s > 0:  # the store's disk writes wait for the same pauses
            store.write_gate = self._await_pause
        self._saver = background.start(self._save_loop, "kvcache-saver", idle=True)
        self._catch_up = background.start(self._catch_up_loop, "kvcache-saver-catch-up")
        self._async_loads: dict[str, _Load | None] = {}  # in flight (None: not started)
        self._loaded: set[str] = set()  # asynchronous loads done since finished_loads
        self._load_queue: queue.Queue[_Load | None] = queue.Queue()
        self._loader = background.start(self._async_load_loop, "kvcache-async-loader")

    # -- loads -------------------------------------------------------------------------------
    def start_loads(self, ops: Sequence[RequestOps]) -> None:
        """Start the step's loads (before the forward pass)."""
        for op in ops:
            if op.load is None:
                continue
            if op.load_async:
                with self._lock:
                    self._async_loads[op.req_id] = None
            try:
                load = self._start_load(op)
            except Exception as e:  # nothing may reach the engine
                log.warning("request %s: load of tokens %s failed to start: %s",
                            op.req_id, op.load, e)
                self._fail(op, op.load[0])
                if op.load_async:
                    self._loaded_async(op.req_id)
                continue
            if op.load_async:
                with self._lock:
                    self._async_loads[op.req_id] = load
                    self.stats.async_loads += 1
                self._load_queue.put(load)
            else:
                self._loads.append(load)

    def _start_load(self, op: RequestOps) -> _Load:
        assert op.load is not None
        start, end = op.load
        chunks = self._chunks(op.token_ids, start, end)
        loader = LayerLoader(self.store, [c.prefix_key for c in chunks], self.layout,
                             device=self.planes[0].device, partial=True)
        first = chunks[0].start
        got = first + loader.num_tokens
        if got < end:
            # Chunks from the first one missing on are recomputed, from its block on.
            ok = max(start, got // self.block_size * self.block_size)
            log.info("request %s: the store holds tokens up to %d of the %d planned; "
                     "recomputing from %d", op.req_id, got, end, ok)
            self._fail(op, ok)
            end = ok
        slots = slots_from_block_table(op.block_ids, self.block_size, start, end - start)
        with self._lock:
            s = self.stats
            s.load_requests += 1
            for chunk, tier in zip(chunks, loader.tiers, strict=False):
                used = min(chunk.end, end) - max(chunk.start, start)
                if used > 0:
                    s.load_tokens_by_tier[tier] = s.load_tokens_by_tier.get(tier, 0) + used
        return _Load(op, loader, first, start, end, slots)

    def load_layer(self, i: int) -> None:
        """Write layer ``i`` of every started load into the pages (before its attention)."""
        t0 = time.perf_counter()
        self._in_step = True
        for load in self._loads:
            self._write_layer(load, i, self.load_timeout)
        with self._lock:
            self.stats.load_seconds += time.perf_counter() - t0

    def _write_layer(self, load: _Load, i: int, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for layer ``i`` of ``load`` and write it into the
        request's blocks; a failure abandons the load."""
        if load.failed or load.loader is None or load.end <= load.start:
            return
        try:
            layer = load.loader.wait_for_layer(i, timeout)
            if self.opaque:
                piece = self._write_blocks(i, load, layer)
            else:
                piece = layer[:, load.start - load.first_token : load.end - load.first_token]
                paged_scatter(self.planes[i], load.slots, piece.unsqueeze(0))
            load.layers_done = i + 1
            with self._lock:
                self.stats.load_bytes += piece.numel() * piece.element_size()
        except Exception as e:
            log.warning("request %s: layer %d of its load failed (%s); the engine "
                        "recomputes those tokens", load.op.req_id, i, e)
            self._abandon(load)

    def _async_load_loop(self) -> None:
        """The loader thread: writes asynchronous loads into the pages, one at a time."""
        while (load := self._load_queue.get()) is not None:
            deadline = time.monotonic() + self.load_timeout
            for i in range(self.layout.num_layers):
                if load.cancelled:  # aborted: its blocks go back to the engine unread
                    break
                self._write_layer(load, i, max(0.0, deadline - time.monotonic()))
            if load.cancelled:
                if load.loader is not None:
                    load.loader.close()
            else:
                self._account(load)
            self._loaded_async(load.op.req_id)

    def _loaded_async(self, req_id: str) -> None:
        with self._lock:
            self._async_loads.pop(req_id, None)
            self._loaded.add(req_id)

    def finished_loads(self, finished_req_ids: Collection[str] = ()) -> set[str]:
        """Requests whose asynchronous load is over since the last call, loaded or failed
        (their failed blocks are in ``failed_blocks`` by then). finished_req_ids: requests
        the engine aborted: their loads in flight stop at the next layer."""
        with self._lock:
            for req_id in finished_req_ids:
                load = self._async_loads.get(req_id)
                if load is not None:
                    load.cancelled = True
            out, self._loaded = self._loaded, set()
        return out

    def _write_blocks(self, i: int, load: _Load, layer: torch.Tensor) -> torch.Tensor:
        """Opaque pages: copy the loaded blocks of layer ``i`` into the request's blocks
        as they are. layer: ``[2, tokens, heads, head_dim]``, whole chunks from the
        loader's first one on, each chunk's slice holding its blocks' bytes in memory
        order (see ``_opaque_piece``). Returns the blocks written."""
        b, c, pages = self.block_size, self.chunk_size, self.layer_pages[i]
        per_chunk = [layer[:, j : j + c].contiguous().view(c // b, *pages.shape[1:])
                     for j in range(0, load.end - load.first_token, c)]
        blocks = torch.cat(per_chunk) if len(per_chunk) > 1 else per_chunk[0]
        first = (load.start - load.first_token) // b
        piece = blocks[first : first + (load.end - load.start) // b]
        dst = load.op.block_ids[load.start // b : load.end // b]
        pages.index_copy_(0, torch.tensor(dst, dtype=torch.int64, device=pages.device),
                          piece)
        return piece

    def _abandon(self, load: _Load) -> None:
        load.failed = True
        self._fail(load.op, load.start)
        if load.loader is not None:
            load.loader.close()
            load.loader = None

    def _fail(self, op: RequestOps, from_token: int) -> None:
        """The blocks holding tokens ``[from_token, load end)`` of ``op`` are unusable."""
        assert op.load is not None
        with self._lock:
            self._failed.update(op.blocks(from_token, op.load[1], self.block_size))
            if not op.load_async:  # not in the step: it computed nothing over the load
                self._failed_requests.add(op.req_id)
            self.stats.failed_loads += 1
            self.stats.failed_tokens += op.load[1] - from_token

    # -- saves -------------------------------------------------------------------------------
    def save_layer(self, i: int, ops: Sequence[RequestOps]) -> None:
        """Copy layer ``i`` of the step's tokens to save into staging (after its attention)."""
        t0 = time.perf_counter()
        self._in_step = True
        if i == 0:
            self._saves = [s for op in ops if op.save is not None
                           if (s := self._stage(op)) is not None]
        for save in self._saves:
            if save.layers_done != i:
                continue  # a layer skipped: the save is dropped in end_step
            try:
                torch.index_select(self.layer_pages[i], self.pages.block_dim, save.block_ids,
                                   out=save.staging[i])
                save.layers_done = i + 1
            except Exception as e:
                log.warning("request %s: copying layer %d out failed: %s", save.op.req_id,
                            i, e)
        with self._lock:
            self.stats.save_seconds += time.perf_counter() - t0

    def _stage(self, op: RequestOps) -> _Save | None:
        assert op.save is not None
        start, end = op.save
        first, last = start // self.block_size, -(-end // self.block_size)
        blocks = dataclasses.replace(self.pages, num_blocks=last - first)
        t = self.layer_pages[0]
        shape = (self.layout.num_layers, *blocks.layer_shape)
        nbytes = int(torch.Size(shape).numel()) * t.element_size()
        with self._lock:
            if self._pending_bytes + nbytes > self.max_pending_saves:
                self.stats.skipped_saves += 1
                log.info("request %s: not saving tokens %s: %d bytes already wait to be "
                         "stored", op.req_id, op.save, self._pending_bytes)
                return None
            self._pending_bytes += nbytes
            free = self._free_staging
            fits = [i for i, b in enumerate(free) if b.numel() >= nbytes]
            # By position: list.remove would compare tensors with ==, element by element.
            buffer = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else None
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=t.device)
        ids = torch.tensor(op.block_ids[first:last], dtype=torch.int64, device=t.device)
        staging = buffer[:nbytes].view(t.dtype).view(shape)
        return _Save(op, first, ids, staging, buffer)

    # -- end of step -------------------------------------------------------------------------
    def end_step(self) -> None:
        """After the forward pass: account for the loads, hand full staging to the saver."""
        for load in self._loads:
            self._account(load)
        self._loads = []
        with self._lock:
            failed, self._failed_requests = self._failed_requests, set()
        for save in self._saves:
            if save.op.req_id in failed:
                # This step computed its tokens over KV that did not load: never store it.
                log.info("request %s: not saving tokens %s computed over a failed load",
                         save.op.req_id, save.op.save)
            if save.layers_done == self.layout.num_layers and save.op.req_id not in failed:
                self._queue.put(save)
            else:
                self._release(save)
                with self._lock:
                    self.stats.skipped_saves += 1
        with self._backlog:
            self._in_step = False
            self._step_ended = time.monotonic()
            self._backlog.notify_all()
        self._saves = []

    def _account(self, load: _Load) -> None:
        """A load is over: a layer it did not deliver fails it; count what it loaded."""
        if load.loader is not None:
            load.loader.close()
        if load.failed or load.end <= load.start:
            return
        if load.layers_done < self.layout.num_layers:
            log.warning("request %s: only %d of %d layers were loaded; the engine "
                        "recomputes those tokens", load.op.req_id, load.layers_done,
                        self.layout.num_layers)
            self._fail(load.op, load.start)
        else:
            with self._lock:
                self.stats.load_tokens += load.end - load.start

    def failed_blocks(self) -> set[int]:
        """Blocks whose load failed since the last call (the engine recomputes them)."""
        with self._lock:
            out, self._failed = self._failed, set()
        return out

    def take_stats(self) -> WorkerStats:
        """The counters since the last call (also added to ``totals``)."""
        with self._lock:
            out, self.stats = self.stats, WorkerStats()
            for name, value in out.__dict__.items():
                if isinstance(value, dict):
                    mine = getattr(self.totals, name)
                    for k, v in value.items():
                        mine[k] = mine.get(k, 0) + v
                else:
                    setattr(self.totals, name, getattr(self.totals, name) + value)
        return out

    # -- the saver thread --------------------------------------------------------------------
    def _save_loop(self) -> None:
        while (save := self._queue.get()) is not None:
            self._store(save, self._await_pause)

    def _behind(self) -> bool:
        """More than half of ``max_pending_saves`` waits (call with ``_lock`` held)."""
        return self._pending_bytes > self.max_pending_saves // 2

    def _await_pause(self) -> None:
        """The idle saver before each chunk, and the store's writer before each object it
        copies to disk: with ``quiet_s``, wait until the engine has run no step for that
        long, or the backlog is past half, or the worker closes.

        An engine computing on the CPU keeps every core through a step; the idle class
        alone gives the saver the short gaps between back-to-back steps, and what it does
        there can reach the next step: its Python holds the GIL when preempted, and the
        engine's team threads spin between operators. In ``kvcache bench e2e`` (vLLM CPU,
        2 cores) the difference it made was inside the run-to-run noise: warm requests
        1.017x of vLLM's prefix cache alone with it, 1.028x without (docs/benchmarks.md)."""
        if self.quiet_s <= 0:
            return
        with self._backlog:
            while not (self._closing or self._behind()):
                quiet = time.monotonic() - self._step_ended
                if not self._in_step and quiet >= self.quiet_s:
                    return
                self._backlog.wait(None if self._in_step else self.quiet_s - quiet)

    def _catch_up_loop(self) -> None:
        """Store saves at normal priority while more than half of ``max_pending_saves``
        waits (and there is a save nobody is storing yet)."""
        def behind() -> bool:
            return self._closing or (self._behind() and not self._queue.empty())

        while True:
            with self._backlog:
                self._backlog.wait_for(behind)
                if self._closing:
                    return
            try:
                save = self._queue.get_nowait()
            except queue.Empty:  # the idle saver took it
                continue
            if save is None:  # close()'s, for the idle saver: hand it back
                self._queue.task_done()
                self._queue.put(None)
                return
            self._store(save)

    def _store(self, save: _Save, before_chunk: Callable[[], None] = lambda: None) -> None:
        try:
            self._store_chunks(save, before_chunk)
        except Exception as e:  # a failed save is a future miss
            log.warning("request %s: storing tokens %s failed: %s", save.op.req_id,
                        save.op.save, e)
            with self._lock:
                self.stats.skipped_saves += 1
        finally:
            self._release(save)
            self._queue.task_done()

    def _store_chunks(self, save: _Save, before_chunk: Callable[[], None]) -> None:
        assert save.op.save is not None
        start, end = save.op.save
        before_chunk()  # the conversion below is the save's largest copy
        kv = None if self.opaque else self._canonical(save)
        for chunk in self._chunks(save.op.token_ids, start, end):
            if self.opaque and chunk.num_tokens != self.chunk_size:
                continue  # pages come in whole blocks: a partial chunk is not stored
            if self.store.contains(chunk.prefix_key):
                continue
            before_chunk()
            piece = self._opaque_piece(save, chunk.start, chunk.end) if kv is None \
                else kv[:, :, chunk.start - start : chunk.end - start]
            self.store.put(chunk.prefix_key, piece, self.layout, rope_start=chunk.start)
            with self._lock:
                self.stats.save_tokens += chunk.num_tokens
                self.stats.save_bytes += piece.numel() * piece.element_size()

    def _opaque_piece(self, save: _Save, start: int, end: int) -> torch.Tensor:
        """Opaque pages: the staged blocks of tokens ``[start, end)`` (a whole chunk), as
        they are, in a tensor of the chunk's canonical shape."""
        b = self.block_size
        first = start // b - save.first_block
        blocks = save.staging[:, first : first + (end - start) // b]  # [layers, m, *block]
        return blocks.contiguous().view(self.layout.chunk_shape(end - start))

    def _canonical(self, save: _Save) -> torch.Tensor:
        """The saved tokens as one canonical tensor (``chunk_shape``: ``[layers, 2, tokens,
        kv_heads, head_dim]``, MLA ``[layers, tokens, latent]``) from the staged blocks:
        one strided copy per layer and plane (the staged blocks start at the first saved
        token: saves start on chunk, hence block, boundaries)."""
        assert save.op.save is not None
        start, end = save.op.save
        blocks = dataclasses.replace(self.pages, num_blocks=len(save.block_ids))
        nb, b = len(save.block_ids), self.block_size
        out: torch.Tensor | None = None
        for i in range(self.layout.num_layers):
            planes = paged_planes(blocks, [save.staging[i]])
            if out is None:
                shape = (self.layout.num_layers, *chunk_shape(planes, nb * b)[1:])
                out = self._scratch(shape, planes.dtype)
                out5 = out.unsqueeze(1).unsqueeze(3) if planes.num_planes == 1 else out
            for p, view in enumerate(planes.views[0]):  # [nb, B, heads, head_dim]
                out5[i, p].view(view.shape).copy_(view)
        assert out is not None and start == save.first_block * b
        return out.narrow(-3 if out.dim() == 5 else -2, 0, end - start)

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The calling saver thread's conversion buffer, reused save after save
        (``store.put`` keeps no reference to what it stores): allocating a fresh one took
        1.6 of the 5.3 ms of CPU a 3 MB chunk cost the saver, measured on its own."""
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        buf: torch.Tensor | None = getattr(self._scratch_bufs, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch_bufs.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype).view(shape)

    def _release(self, save: _Save) -> None:
        with self._lock:
            self._pending_bytes -= save.staging.numel() * save.staging.element_size()
            free = self._free_staging
            free.append(save.buffer)
            free.sort(key=torch.Tensor.numel, reverse=True)
            while sum(b.numel() for b in free) > _KEEP_STAGING:
                free.pop()  # the smallest first

    def wait_saved(self, timeout_s: float | None = None) -> bool:
        """Block until every staged save is stored (tests, shutdown); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Finish the saves already staged and the loads started, then stop."""
        with self._backlog:
            self._closing = True
            self._backlog.notify_all()
        if self.store.write_gate == self._await_pause:
            self.store.write_gate = None
        self._queue.put(None)
        self._load_queue.put(None)
        self._catch_up.join()
        self._saver.join()
        self._loader.join()

    # -- keys --------------------------------------------------------------------------------
    def _chunks(self, token_ids: Sequence[int], start: int, end: int) -> list[Chunk]:
        """The chunks that overlap tokens ``[start, end)``, each whole (a chunk is keyed by
        all its tokens: one ending past ``end`` is read whole and used in part)."""
        whole = -(-end // self.chunk_size) * self.chunk_size
        chunks = chunk_tokens(self.layout.fingerprint, token_ids[:whole], self.chunk_size,
                              self.key_scheme)
        return [c for c in chunks if c.end > start and c.start < end]
