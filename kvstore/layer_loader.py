"""Layer-wise pipelined loading: layer ``i + 1`` is loaded while the caller computes layer ``i``.

An engine's forward pass needs a cached prefix one layer at a time, so a load need not
finish before the first layer runs. ``LayerLoader`` works in two phases, like the tiers'
two-phase I/O:

1. *prepare* (the constructor, on the caller's thread): the objects are fetched from the
   store — borrowed zero-copy from a ``CpuTier`` top tier (the reference pins them until
   the load is over), read from lower tiers otherwise — and their headers checked, so the
   number of tokens is known before any layer is;
2. *load* (a worker thread): per layer, per chunk ``Codec.decode_layer_into`` the layer's
   slice of one output buffer on the target device (rANS-coded cachegen objects decode on
   the GPU itself; other codecs decode on the CPU and copy), optionally a RoPE shift of K
   to new positions. On CUDA the copies run on a side stream and each layer records an
   event; ``wait_for_layer(i)`` makes the caller's stream wait on it (no host sync), so
   transfer overlaps compute on the GPU. On CPU the worker thread overlaps decoding and
   copying with the caller's work.

Errors: a layer that fails to load (corrupt payload, a codec error, device out of memory)
makes ``wait_for_layer`` raise ``LayerLoadError`` for that layer and every later one, so
the request fails instead of running on garbage KV; layers returned before stay valid.
``close()`` (or leaving the ``with`` block) stops the worker, waits for copies in flight
and releases the borrowed entries. Use one loader per request; it is not reusable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvcache.codecs.registry import get_codec
from kvcache.kernels.rope_shift import rope_shift
from kvcache.kvstore.background import start as start_background
from kvcache.kvstore.container import StoredObject
from kvcache.kvstore.cpu_tier import CpuTier
from kvcache.kvstore.errors import CorruptObjectError, KVCacheError
from kvcache.kvstore.layout import KVLayout
from kvcache.kvstore.tiered_store import TieredStore

log = logging.getLogger(__name__)


class LayerLoadError(KVCacheError):
    """A layer of a pipelined load could not be produced; the request must not use it."""


class LayerLoader:
    """Per-layer canonical KV of the chunks under ``keys``, concatenated in order.

    ``wait_for_layer(i)`` returns layer ``i`` as ``[2, tokens, kv_heads, head_dim]`` (MLA
    ``[tokens, latent_dim]``) on ``device``, ``tokens`` being the sum of the loaded
    chunks' token counts.

    partial: stop at the first chunk that is missing or does not fit ``layout`` (prefix
    semantics) instead of raising ``LayerLoadError``. rope_start: rotate K to positions
    ``rope_start, rope_start + 1, ...`` from the positions each chunk was stored at (None:
    leave keys as stored). background: False loads each layer on the caller's thread
    inside ``wait_for_layer`` — the same work, serially (benchmarks compare the two).
    """

    def __init__(
        self,
        store: TieredStore,
        keys: Sequence[str],
        layout: KVLayout,
        *,
        device: torch.device | str = "cpu",
        partial: bool = False,
        rope_start: int | None = None,
        background: bool = True,
    ) -> None:
        self.layout = layout
        self._store = store
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rope_start = rope_start
        # Grad modes are per thread: the worker must write the output the way the caller
        # allocated it (an inference tensor only accepts writes in inference mode).
        self._inference = torch.is_inference_mode_enabled()
        self._borrows = contextlib.ExitStack()
        self._cond = threading.Condition()
        self._loaded = 0  # layers [0, _loaded) are ready (enqueued, on CUDA)
        self._error: tuple[int, BaseException] | None = None
        self._stop = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._events: list[Any] = []
        # partial: why the load stops before the last key (None: it does not), and whether
        # that is a chunk stored for another layout.
        self.shortfall: str | None = None
        self.layout_mismatch = False
        try:
            self._objects, self.tiers = self._fetch(store, list(keys), partial)
            self.chunk_tokens = [o.header.num_tokens for o in self._objects]
            self.num_tokens = sum(self.chunk_tokens)
            shape = layout.chunk_shape(self.num_tokens)
            self._out = torch.empty(shape, dtype=layout.torch_dtype, device=self.device)
            if self.device.type == "cuda":
                self._stream = torch.cuda.Stream(self.device)
                # The output was allocated on the caller's stream; the copies must not
                # start before that, nor the allocator reuse it while they run.
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                self._out.record_stream(self._stream)
                self._events = [torch.cuda.Event() for _ in range(layout.num_layers)]
        except BaseException:
            self._borrows.close()
            raise
        if background and self._objects:
            self._thread = start_background(self._run, "kvcache-layer-loader")
        elif not self._objects:
            self._release()

    # -- phase 1: fetch ----------------------------------------------------------------------
    def _fetch(
        self, store: TieredStore, keys: list[str], partial: bool
    ) -> tuple[list[StoredObject], list[str]]:
        top = store.tiers[0]
        objs: list[StoredObject | None] = [None] * len(keys)
        where: list[str] = [""] * len(keys)
        if isinstance(top, CpuTier):
            # Borrow: tensors view the pool and the reference keeps the entries from being
            # evicted or overwritten until the last layer has been copied out.
            for i, key in enumerate(keys):
                obj = self._borrows.enter_context(top.borrow(key))
                if obj is not None and not store.expired(obj.header):
                    objs[i], where[i] = obj, top.name
            store.counters.reads += sum(o is not None for o in objs)
            store.counters.read_hits += sum(o is not None for o in objs)
        missing = [i for i, o in enumerate(objs) if o is None]
        if missing:
            tiers = [store.where(keys[i]) for i in missing]  # before a read promotes it
            # The top tier was just asked (borrowed above): start below it.
            first = 1 if isinstance(top, CpuTier) else 0
            got = store.get_objects([keys[i] for i in missing], from_tier=first)
            for i, obj, tier in zip(missing, got, tiers, strict=True):
                objs[i], where[i] = obj, tier or "unknown"
        out: list[StoredObject] = []
        for key, obj in zip(keys, objs, strict=True):
            problem = "missing" if obj is None else self._misfit(obj)
            if problem is not None:
                if not partial:
                    raise LayerLoadError(f"chunk {key} cannot be loaded: {problem}")
                if obj is not None:
                    log.warning("chunk %s ignored: %s", key, problem)
                self.shortfall = problem
                self.layout_mismatch = obj is not None \
                    and obj.header.layout.fingerprint != self.layout.fingerprint
                break
            assert obj is not None
            out.append(obj)
        return out, where[: len(out)]

    def _misfit(self, obj: StoredObject) -> str | None:
        h = obj.header
        if h.layout.fingerprint != self.layout.fingerprint:
            return f"stored for layout {h.layout.model_id!r} ({h.layout.fingerprint}), " \
                   f"not {self.layout.model_id!r} ({self.layout.fingerprint})"
        if self.rope_start is not None and h.rope_start is None:
            return "its keys are stored without RoPE; a shift needs rotated keys"
        try:
            get_codec(h.codec)
        except (KVCacheError, ImportError) as e:  # a codec this build does not have
            return str(e)
        return None

    # -- phase 2: load -------------------------------------------------------------------------
    def _load_layer(self, i: int) -> None:
        """Decode layer ``i`` of every chunk into its slice of the output (current stream)."""
        dst = self._out[i]
        tok_dim = 0 if self.layout.is_mla else 1
        start = 0
        for obj in self._objects:
            h = obj.header
            n = h.num_tokens
            piece = dst.narrow(tok_dim, start, n)
            # Straight into the chunk's slice: codecs that decode on the GPU (cachegen-rans)
            # do it there; the others decode on the CPU and copy, asynchronously from the
            # CPU tier's pinned pool (its entries stay borrowed until the stream is done),
            # staged by the driver from pageable memory.
            try:
                get_codec(h.codec).decode_layer_into(obj.tensors, h.codec_params, h.layout, n,
                                                     i, piece)
            except CorruptObjectError as e:
                # this request fails (wait_for_layer raises); later ones must not find it
                self._store.drop_corrupt(h.key, e)
                raise
            if self.rope_start is not None and not self.layout.is_mla:
                assert self.layout.rope is not None and h.rope_start is not None
                new = self.rope_start + start
                if new != h.rope_start:
                    rope_shift(piece[0], h.rope_start, new, self.layout.rope, out=piece[0])
            start += n

    def _run(self) -> None:
        ctx = torch.cuda.stream(self._stream) if self._stream is not None \
            else contextlib.nullcontext()
        i = 0
        try:
            with ctx, torch.inference_mode(self._inference), torch.no_grad():
                for i in range(self.layout.num_layers):
                    if self._stop:
                        return
                    self._load_layer(i)
                    if self._events:
                        self._events[i].record(self._stream)
                    with self._cond:
                        self._loaded = i + 1
                        self._cond.notify_all()
        except BaseException as e:  # surfaced by wait_for_layer on the caller's thread
            log.warning("loading layer %d of %d chunks failed: %s", i, len(self._objects), e)
            with self._cond:
                self._error = (i, e)
                self._cond.notify_all()
        finally:
            self._release()

    def _release(self) -> None:
        """Copies done, then let go of the borrowed entries."""
        if self._stream is not None:
            self._stream.synchronize()
        self._borrows.close()

    # -- the caller's side -------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self._objects)

    @property
    def rope_starts(self) -> list[int | None]:
        """Each loaded chunk's stored ``rope_start``: where its keys were rotated."""
        return [o.header.rope_start for o in self._objects]

    def wait_for_layer(self, i: int, timeout_s: float | None = None) -> torch.Tensor:
        """Layer ``i`` as ``[2, tokens, kv_heads, head_dim]`` (MLA ``[tokens, latent_dim]``)
        on the target device, ready for the caller's current stream. Raises
        ``LayerLoadError`` when it failed, was cancelled by ``close()`` or timed out."""
        if not 0 <= i < self.layout.num_layers:
            raise IndexError(f"layer {i} out of range [0, {self.layout.num_layers})")
        if not self._objects:
            return self._out[i]
        if self._thread is None:
            self._load_serially(i)
        else:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            with self._cond:
                while self._loaded <= i and self._error is None and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise LayerLoadError(f"layer {i} not loaded after {timeout_s} s")
                    self._cond.wait(left)
                self._check(i)
            if self._events:
                torch.cuda.current_stream(self.device).wait_event(self._events[i])
        return self._out[i]

    def _check(self, i: int) -> None:
        if self._loaded > i:
            return
        if self._error is not None and self._error[0] <= i:
            at, e = self._error
            raise LayerLoadError(
                f"layer {i} of a {self.num_tokens}-token load is unusable: loading layer "
                f"{at} failed ({type(e).__name__}: {e})") from e
        if self._closed:
            raise LayerLoadError(f"layer {i} was not loaded: the loader was closed")

    def _load_serially(self, i: int) -> None:
        with self._cond:
            if self._error is not None or self._closed:
                self._check(i)
            todo = range(self._loaded, i + 1)
        for j in todo:
            try:
                self._load_layer(j)
            except BaseException as e:
                with self._cond:
                    self._error = (j, e)
                self._release()
                self._check(i)
            with self._cond:
                self._loaded = j + 1
        if self._loaded == self.layout.num_layers:
            self._release()

    def wait_all(self) -> torch.Tensor:
        """Every layer: ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA ``[layers, tokens,
        latent_dim]``) on the target device."""
        for i in range(self.layout.num_layers):
            self.wait_for_layer(i)
        return self._out

    def close(self) -> None:
        """Stop loading, wait for copies in flight and release borrowed entries. Layers
        already returned stay valid; later ``wait_for_layer`` calls raise."""
        with self._cond:
            self._stop = True
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._release()

    def __enter__(self) -> LayerLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
