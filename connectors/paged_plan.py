"""Which tokens a paged engine loads from the store and saves to it, step by step.

A paged engine (vLLM; SGLang's scheduler works alike) decides in a *scheduler* what each
step computes, and runs it in *workers* that own the KV pages. ``PagedPlanner`` is the
scheduler's half, in plain data so that it can be reasoned about and tested without an
engine:

- ``matched_tokens``: how many tokens past what the engine already has the store can
  supply (``core.agreed_prefix`` over every tensor-parallel rank, ``core.reusable_tokens``:
  whole blocks, never the last prompt token); a request may turn off its own loads or
  saves;
- ``allocated``: the engine gave the request blocks for that many external tokens;
- ``load_async``: whether the request waits for its load outside the engine's steps
  (``connector.load_mode``: while the engine runs other requests, a load inside a step
  would hold all of them up; when it is idle, loading layer by layer under the prompt's
  own compute is quicker, and costs no extra step);
- ``plan_step``: per scheduled request, a ``RequestOps`` saying which tokens the workers
  load into which blocks before the forward pass, and which prompt tokens they copy out
  and save after it. A prompt is saved chunk by chunk as prefill computes it (chunked
  prefill spreads it over several steps): a chunk is saved in the step that completes it,
  the last, partial chunk in the step that computes the prompt's last token; chunks the
  store already holds are not saved again. An asynchronous load is planned in the step
  that allocated its blocks (the request is not scheduled in it); the workers report it
  done, and the engine schedules the request from there.

Preemption frees a request's blocks and recomputes it from scratch: the engine asks
``matched_tokens`` again and hands over new blocks; what was saved stays saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvcache.connectors.core import PrefixLookup, agreed_prefix, rank_layouts, reusable_tokens
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.layout import KVLayout


@dataclass
class RequestOps:
    """What the workers do for one request in one step.

    ``token_ids``: the prompt's first tokens, as many as the ops need (the workers key
    chunks with them: up to the end of the chunk a load ends in); ``block_ids``: the
    request's blocks in order, block ``i`` holding tokens ``[i * B, (i + 1) * B)``;
    ``load``: tokens ``[start, end)`` to load before the forward pass; ``save``: tokens
    ``[start, end)`` (whole chunks, the last one possibly partial) to copy out after each
    layer and store."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    load: tuple[int, int] | None = None
    save: tuple[int, int] | None = None
    load_async: bool = False  # the load runs beside the engine's steps, not inside one

    def blocks(self, start: int, end: int, block_size: int) -> list[int]:
        """The request's blocks holding tokens ``[start, end)``."""
        return self.block_ids[start // block_size : -(-end // block_size)]


@dataclass
class _Request:
    prompt: list[int]
    block_ids: list[int] = field(default_factory=list)
    local_tokens: int = 0  # what the engine had itself when it asked us (block-aligned)
    stored_tokens: int = 0  # the store holds the prompt's chunks up to here
    hit_tokens: int = 0  # what we offered the engine: tokens [0, hit) from local + store
    load: tuple[int, int] | None = None  # granted by the engine, not yet planned
    saved_to: int = 0  # chunks below are stored (or were before we saw the request)
    load_async: bool = False
    may_save: bool = True  # the planner's save switch and the request's own


class PagedPlanner:
    """The scheduler's bookkeeping for one engine (see the module docstring).

    layout: rank 0's layout (its ``tp_size`` says how many ranks must hold a chunk);
    lookup: asks the store how many leading prefix keys it holds; chunk_size: the store's;
    block_size: the engine's, which must divide ``chunk_size``; load / save: whether to
    reuse stored KV and store new KV at all; load_mode: ``connector.load_mode``;
    key_scheme: ``store.key_scheme``.
    """

    def __init__(self, layout: KVLayout, lookup: PrefixLookup, *, chunk_size: int,
                 block_size: int, load: bool = True, save: bool = True,
                 load_mode: str = "sync", key_scheme: str = "kvcache") -> None:
        if block_size <= 0 or chunk_size % block_size:
            raise ConfigError(
                f"store.chunk_size ({chunk_size}) must be a multiple of the engine's block "
                f"size ({block_size}): chunks are loaded into whole blocks")
        self.layouts = rank_layouts(layout)
        self.lookup = lookup
        self.chunk_size = chunk_size
        self.key_scheme = key_scheme
        self.block_size = block_size
        self.load_enabled = load
        self.save_enabled = save
        self.load_mode = load_mode
        self._requests: dict[str, _Request] = {}
        self._running: set[str] = set()  # scheduled in the last step, not finished
        self._async_ops: list[RequestOps] = []  # planned by ``allocated``, not yet sent

    # -- lookups -----------------------------------------------------------------------------
    def matched_tokens(self, req_id: str, prompt: Sequence[int], local_tokens: int, *,
                       load: bool = True, save: bool = True) -> int:
        """Tokens past ``local_tokens`` (what the engine holds itself, block-aligned) that
        the store can supply for this prompt; 0 if none. load / save: the request's own
        switches (a request may opt out of either), under the planner's."""
        req = self._requests.get(req_id)
        if req is None or req.prompt != list(prompt):
            req = self._requests[req_id] = _Request(list(prompt))
        req.local_tokens, req.load = local_tokens, None
        req.may_save = self.save_enabled and save
        stored, _ = agreed_prefix(self.lookup, req.prompt, self.layouts, self.chunk_size,
                                  self.key_scheme)
        req.stored_tokens = stored
        req.saved_to = max(req.saved_to, stored)
        if not (self.load_enabled and load):
            req.hit_tokens = local_tokens
            return 0
        req.hit_tokens = max(local_tokens,
                             reusable_tokens(stored, len(req.prompt), self.block_size))
        n = req.hit_tokens - local_tokens
        busy = bool(self._running - {req_id})
        req.load_async = n > 0 and (self.load_mode == "async"
                                    or (self.load_mode == "auto" and busy))
        return n

    def load_async(self, req_id: str) -> bool:
        """Whether the hit ``matched_tokens`` last offered for the request is loaded
        asynchronously (the module docstring says when)."""
        req = self._requests.get(req_id)
        return req is not None and req.load_async

    def allocated(self, req_id: str, num_external_tokens: int,
                  block_ids: Sequence[int] = ()) -> None:
        """The engine allocated blocks for ``num_external_tokens`` tokens from the store,
        starting where its own tokens end. block_ids: all the request's blocks, in order
        (an asynchronous load needs them: it is planned now)."""
        req = self._requests.get(req_id)
        if req is None or num_external_tokens <= 0:
            return
        start = req.local_tokens
        load = (start, start + num_external_tokens)
        if not req.load_async:
            req.load = load
            return
        req.block_ids = list(block_ids)
        self._async_ops.append(self._op(req_id, req, load, None, load_async=True))

    # -- steps -------------------------------------------------------------------------------
    def plan_step(
        self,
        new: Sequence[tuple[str, Sequence[int], Sequence[int], int]],
        running: Sequence[tuple[str, Sequence[int] | None, bool, int]],
        num_scheduled: dict[str, int],
    ) -> list[RequestOps]:
        """The workers' ops for one step.

        new: ``(req_id, prompt, block_ids, num_computed_tokens)`` of requests scheduled
        for the first time; running: ``(req_id, new_block_ids, resumed, num_computed_tokens)``
        of the others (``resumed``: back from preemption, ``new_block_ids`` replaces the
        block list); num_scheduled: tokens each request computes in this step.
        """
        ops, self._async_ops = self._async_ops, []
        self._running = set(num_scheduled)
        for req_id, prompt, block_ids, computed in new:
            req = self._requests.get(req_id)
            if req is None or req.prompt != list(prompt):  # never looked up (e.g. no store)
                req = _Request(list(prompt), may_save=self.save_enabled)
                self._requests[req_id] = req
            req.block_ids = list(block_ids)
            op = self._ops(req_id, req, computed + num_scheduled.get(req_id, 0))
            if op is not None:
                ops.append(op)
        for req_id, new_blocks, resumed, computed in running:
            req = self._requests.get(req_id)
            if req is None:
                continue
            if resumed:
                req.block_ids = list(new_blocks or [])
            elif new_blocks:
                req.block_ids.extend(new_blocks)
            op = self._ops(req_id, req, computed + num_scheduled.get(req_id, 0))
            if op is not None:
                ops.append(op)
        return ops

    def _ops(self, req_id: str, req: _Request, computed_after: int) -> RequestOps | None:
        load, req.load = req.load, None
        save = self._save_range(req, computed_after) if req.may_save else None
        if load is None and save is None:
            return None
        return self._op(req_id, req, load, save)

    def _op(self, req_id: str, req: _Request, load: tuple[int, int] | None,
            save: tuple[int, int] | None, *, load_async: bool = False) -> RequestOps:
        end = max(r[1] for r in (load, save) if r is not None)
        blocks = -(-end // self.block_size)
        # A load may end inside a chunk: the workers key that chunk by all its tokens.
        keyed = max(end, -(-load[1] // self.chunk_size) * self.chunk_size if load else 0)
        return RequestOps(req_id, req.prompt[:keyed], req.block_ids[:blocks], load, save,
                          load_async)

    def _save_range(self, req: _Request, computed_after: int) -> tuple[int, int] | None:
        """The prompt's chunks that are complete after this step and not stored yet."""
        n = len(req.prompt)
        done = min(computed_after, n)
        end = n if done == n else done // self.chunk_size * self.chunk_size
        start = req.saved_to
        if end <= start:
            return None
        req.saved_to = end
        return (start, end)

    def finished(self, req_id: str) -> None:
        """The request is over (finished or aborted): forget it."""
        self._requests.pop(req_id, None)
        self._running.discard(req_id)

    def tracked(self) -> int:
        """Requests being tracked (leak checks)."""
        return len(self._requests)
