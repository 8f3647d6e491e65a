"""``CpuTier``: objects in one preallocated host pool (pinned when CUDA is present).

Each object occupies one contiguous range of the pool, so storing it is one copy in and
reading it one copy out. Readers hold a reference on the entry while they copy, outside
the tier's lock, so many readers copy at once and eviction never frees bytes under them
(two-phase I/O as in vLLM's kv_offload: ``borrow`` = prepare + complete).

Bytes in this tier never cross a disk or a network, so no checksum is computed here:
integrity is checked where they do. With ``shared=True`` (the cache daemon's fast path)
the pool is a memfd that same-node clients map read-only; ``lend`` hands them an entry's
place in it, held like a borrow until the loan is returned.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache.kvstore.arena import Arena, align_up
from kvcache.kvstore.config import physical_memory
from kvcache.kvstore.container import ObjectHeader, StoredObject
from kvcache.kvstore.errors import (
    ConfigError,
    EntryPinnedError,
    KVCacheError,
    ObjectTooLargeError,
    StoreFullError,
)
from kvcache.kvstore.eviction import make_policy
from kvcache.kvstore.shm_index import SharedIndex, describe, lock_free_reads_supported, slots_for
from kvcache.kvstore.strided_copy import copy_many
from kvcache.kvstore.tier import DELETE_CAUSES, EntryInfo, Tier, TierStats, check_object_key


@dataclass
class _Slot:
    """Where one named tensor of an object lives, relative to the object's offset."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    rel: int
    nbytes: int

    strides: tuple[int, ...] = field(init=False)  # in the pool it is contiguous

    def __post_init__(self) -> None:
        out, n = [], 1
        for d in reversed(self.shape):
            out.append(n)
            n *= d
        self.strides = tuple(reversed(out))


@dataclass
class _Entry:
    header: ObjectHeader
    offset: int
    size: int
    slots: list[_Slot]
    last_access: float = field(default_factory=time.time)
    hits: int = 0
    pinned: bool = False
    refs: int = 0  # readers copying out right now
    removed: bool = False  # deleted/replaced while readers held it: free on last release
    desc_size: int = 0  # shared pools: the descriptor's bytes, right after the tensors
    published: bool = False  # in the shared index


@dataclass(frozen=True)
class Loan:
    """An entry lent out of a shared pool: where its tensors are, until ``release``."""

    header: ObjectHeader
    offset: int
    size: int
    slots: list[_Slot]
    _entry: _Entry


def slot_rows(slots: list[_Slot]) -> list[list[Any]]:
    """Where an object's tensors lie, as sent to same-node readers."""
    return [[s.name, str(s.dtype).removeprefix("torch."), list(s.shape), s.rel, s.nbytes]
            for s in slots]


def _plan(obj: StoredObject) -> tuple[list[_Slot], int]:
    slots, rel = [], 0
    for name, t in obj.tensors.items():
        n = t.numel() * t.element_size()
        slots.append(_Slot(name, t.dtype, tuple(t.shape), rel, n))
        rel += align_up(n)
    return slots, max(rel, 1)


def check_memory_capacity(capacity_bytes: int) -> None:
    """``ConfigError`` unless ``capacity_bytes`` is a positive int this machine can hold."""
    if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool) \
            or capacity_bytes <= 0:
        raise ConfigError(f"CPU tier capacity must be an integer > 0 bytes, got {capacity_bytes!r}")
    total = physical_memory()
    if total is not None and capacity_bytes > total:
        raise ConfigError(
            f"CPU tier capacity {capacity_bytes} bytes is more than this machine's "
            f"{total} bytes of memory; lower store.cpu.capacity"
        )


class CpuTier(Tier):
    name = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        *,
        policy: str = "lru",
        pin_memory: bool | None = None,
        busy_wait_s: float = 2.0,
        shared: bool = False,
    ) -> None:
        super().__init__()
        check_memory_capacity(capacity_bytes)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available() and not shared
        self._arena = Arena(capacity_bytes)
        self.capacity_bytes = self._arena.capacity
        self.pool_fd: int | None = None
        self._mmap: mmap.mmap | None = None
        # Shared pools on machines where it is safe: the lock-free index of their entries.
        self.index: SharedIndex | None = None
        self._unpublished = 0  # entries the index has no room for
        # torch.empty (and a fresh memfd) do not touch the pages: memory is committed as
        # objects arrive.
        try:
            if shared:
                self.pool_fd = os.memfd_create("kvcache-cpu-pool", os.MFD_CLOEXEC)
                os.ftruncate(self.pool_fd, self.capacity_bytes)
                self._mmap = mmap.mmap(self.pool_fd, self.capacity_bytes)
                self._pool = torch.frombuffer(self._mmap, dtype=torch.uint8)
                if lock_free_reads_supported():
                    self.index = SharedIndex.create(slots_for(self.capacity_bytes))
            else:
                self._pool = torch.empty(
                    self.capacity_bytes, dtype=torch.uint8, pin_memory=pin_memory
                )
        except (RuntimeError, OSError) as e:  # out of memory, or pinned memory refused
            raise ConfigError(
                f"cannot allocate the CPU tier's {capacity_bytes} bytes ({e}); lower "
                "store.cpu.capacity"
            ) from None
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # the pool viewed as each dtype
        self._policy = make_policy(policy)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        # Signalled when a reader lets go of an entry: a put that found only entries being
        # copied out waits (up to busy_wait_s) for one instead of failing.
        self._released = threading.Condition(self._lock)
        self._busy_wait_s = busy_wait_s
        self._stats = TierStats(self.name, self.capacity_bytes)

    # -- helpers -------------------------------------------------------------------------
    def _views(self, e: _Entry) -> dict[str, torch.Tensor]:
        """``e``'s tensors, viewing the pool: one ``as_strided`` each (a batch makes
        hundreds) on the pool viewed as their dtype (offsets are 256-byte aligned)."""
        views = {}
        for s in e.slots:
            pool = self._typed.get(s.dtype)
            if pool is None:
                with torch.inference_mode(False):  # kept: not an inference-mode tensor
                    pool = self._typed[s.dtype] = self._pool.view(s.dtype)
            views[s.name] = pool.as_strided(s.shape, s.strides,
                                            (e.offset + s.rel) // pool.element_size())
        return views

    def _drop(self, key: str, e: _Entry) -> None:
        """Unlink ``e`` (lock held); its bytes are freed now or by the last reader."""
        del self._entries[key]
        self._policy.on_remove(key)
        if self.index is not None:  # before the bytes can be reused: readers must see it
            self.index.withdraw(key)
            if not e.published:
                self._count_unpublished(-1)
        e.removed = True
        if e.refs == 0:
            self._arena.free(e.offset, e.size + e.desc_size)

    def _count_unpublished(self, change: int) -> None:
        """The entries the index lacks, counted where its readers see it (lock held)."""
        assert self.index is not None
        self._unpublished += change
        self.index.set_unpublished(self._unpublished)

    def _release(self, e: _Entry) -> None:
        with self._released:
            e.refs -= 1
            if e.refs == 0:
                if e.removed:
                    self._arena.free(e.offset, e.size + e.desc_size)
                self._released.notify_all()

    def _make_room(self, size: int, protect: str) -> int:
        """Allocate ``size`` bytes, evicting victims in policy order (lock held)."""
        deadline: float | None = None
        while True:
            offset = self._arena.allocate(size)
            if offset is not None:
                return offset
            busy = False
            for victim in self._policy.victims():
                e = self._entries.get(victim)
                if e is None or e.pinned or victim == protect:
                    continue
                if e.refs:
                    busy = True
                    continue
                if self._evict_handler is not None:
                    # Demote before the bytes are reused; if this raises, nothing was lost.
                    self._evict_handler(victim, StoredObject(e.header, self._views(e)))
                self._drop(victim, e)
                self._stats.evictions += 1
                offset = self._arena.allocate(size)
                if offset is not None:
                    return offset
            if busy:
                # Readers copy out in microseconds to milliseconds: wait for one to finish.
                deadline = deadline or time.monotonic() + self._busy_wait_s
                remaining = deadline - time.monotonic()
                if remaining > 0 and self._released.wait(remaining):
                    continue
            raise StoreFullError(
                f"CPU tier full: {size} bytes needed, {self.capacity_bytes - self._arena.used} "
                f"free and every remaining entry is pinned or being read; unpin entries or "
                f"raise store.cpu.capacity"
            )

    # -- Tier ----------------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    @contextlib.contextmanager
    def _borrowed(self, key: str, touch: bool = True) -> Iterator[_Entry | None]:
        """Hold a reference on ``key``'s entry while the block runs. ``touch``: count it as
        a hit and tell the policy (internal copies, e.g. write-through, do not)."""
        e = self._acquire(key, touch)
        if e is None:
            yield None
            return
        try:
            yield e
        finally:
            self._release(e)

    def _acquire(self, key: str, touch: bool) -> _Entry | None:
        """``key``'s entry with a reference taken (None: a miss)."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.header.key != key:
                # put checks this; whatever let it in, it is never served: a counted miss
                self._drop(key, e)
                self._stats.corrupt += 1
                e = None
            if e is None:
                self._stats.misses += touch
            elif not touch:
                e.refs += 1
            else:
                e.refs += 1
                e.hits += 1
                e.last_access = time.time()
                self._policy.on_access(key)
                self._stats.hits += 1
                self._stats.hit_tokens += e.header.num_tokens
                self._stats.bytes_read += e.size
        return e

    def lend(self, key: str, *, touch: bool = True) -> Loan | None:
        """``key``'s place in the pool, held (never evicted, never reused) until
        ``release(loan)``: a same-node client copies it out of its own mapping, a daemon
        sends it from there. ``touch`` as in ``get``."""
        e = self._acquire(key, touch)
        return None if e is None else Loan(e.header, e.offset, e.size, e.slots, e)

    def touch(self, keys: list[str]) -> int:
        """Count reads that same-node clients made without asking (through the shared
        index) as hits, so the policy sees them; returns the bytes they read."""
        nbytes = 0
        with self._lock:
            now = time.time()
            for key in keys:
                e = self._entries.get(key)
                if e is None:
                    continue
                e.hits += 1
                e.last_access = now
                self._policy.on_access(key)
                self._stats.hits += 1
                self._stats.hit_tokens += e.header.num_tokens
                self._stats.bytes_read += e.size
                nbytes += e.size
        return nbytes

    def release(self, loan: Loan) -> None:
        self._release(loan._entry)

    def lent_object(self, loan: Loan) -> StoredObject:
        """The lent entry as tensors viewing the pool (valid until ``release``)."""
        return StoredObject(loan.header, self._views(loan._entry))

    @contextlib.contextmanager
    def borrow(self, key: str) -> Iterator[StoredObject | None]:
        """Zero-copy read: tensors view the pool and stay valid until the block exits."""
        with self._borrowed(key) as e:
            yield None if e is None else StoredObject(e.header, self._views(e))

    def get(self, key: str, *, touch: bool = True) -> StoredObject | None:
        with self._borrowed(key, touch) as e:
            if e is None:
                return None
            # One memcpy of the whole object, then views into the private copy.
            buf = self._pool[e.offset : e.offset + e.size].clone()
            tensors = {
                s.name: buf[s.rel : s.rel + s.nbytes].view(s.dtype).view(s.shape)
                for s in e.slots
            }
            return StoredObject(e.header, tensors)

    def put(self, key: str, obj: StoredObject) -> None:
        err = self.put_many([(key, obj)])[0]
        if err is not None:
            raise err

    def put_many(self, items: Sequence[tuple[str, StoredObject]]) -> list[KVCacheError | None]:
        """Store each object under its key, replacing what the key held; returns what kept
        each one out (None: stored). Room for a batch is made under one hold of the lock,
        its bytes copied outside it (tensors one step apart on both sides, such as pages
        of one host pool going into one run of the pool, in one strided copy:
        ``copy_many``), then the batch is published. Batches are at most a quarter of the
        pool, so a put larger than the tier still evicts its own first objects, as
        one-by-one puts would."""
        out: list[KVCacheError | None] = [None] * len(items)
        batch: list[tuple[int, str, StoredObject, _Entry, bytes]] = []
        size = 0
        for i, (key, obj) in enumerate(items):
            try:
                check_object_key(key, obj.header)
                entry, desc = self._planned(obj)
            except KVCacheError as e:
                out[i] = e
                continue
            if batch and size + entry.size + entry.desc_size > self.capacity_bytes // 4:
                self._put_batch(batch, out)
                batch, size = [], 0
            batch.append((i, key, obj, entry, desc))
            size += entry.size + entry.desc_size
        if batch:
            self._put_batch(batch, out)
        return out

    def _planned(self, obj: StoredObject) -> tuple[_Entry, bytes]:
        """``obj``'s entry, not yet placed (``offset`` -1), and its descriptor's bytes."""
        slots, size = _plan(obj)
        desc = b"" if self.index is None else describe(obj.header.to_json(), slot_rows(slots))
        total = align_up(size) + len(desc) if desc else size
        if align_up(total) > self.capacity_bytes:
            raise ObjectTooLargeError(
                f"object of {total} bytes exceeds the CPU tier's capacity of "
                f"{self.capacity_bytes} bytes; raise store.cpu.capacity"
            )
        # refs=1: reserved but unpublished, not in the policy, so nobody evicts it mid-copy
        return _Entry(obj.header, -1, size, slots, refs=1, desc_size=total - size), desc

    def _put_batch(self, batch: list[tuple[int, str, StoredObject, _Entry, bytes]],
                   out: list[KVCacheError | None]) -> None:
        placed = []
        try:
            with self._lock:
                for i, key, obj, e, desc in batch:
                    try:
                        e.offset = self._make_room(e.size + e.desc_size, protect=key)
                    except StoreFullError as err:
                        out[i] = err
                        continue
                    placed.append((key, obj, e, desc))
            dsts, srcs = [], []
            for _, obj, e, _ in placed:
                views = self._views(e)
                dsts += [views[s.name] for s in e.slots]
                srcs += [obj.tensors[s.name] for s in e.slots]
            copy_many(dsts, srcs)
            for _, _, e, desc in placed:
                if desc:
                    end = e.offset + e.size + e.desc_size
                    self._pool[end - len(desc) : end].copy_(
                        torch.frombuffer(bytearray(desc), dtype=torch.uint8))
        except BaseException:  # e.g. an evict handler's error: what was reserved is freed
            with self._lock:
                for _, _, e, _ in placed:
                    self._arena.free(e.offset, e.size + e.desc_size)
            raise
        with self._lock:
            for key, _, e, desc in placed:
                old = self._entries.get(key)
                if old is not None:
                    e.pinned = old.pinned
                    self._drop(key, old)
                e.refs = 0
                self._entries[key] = e
                self._policy.on_insert(key)
                self._stats.puts += 1
                self._stats.bytes_written += e.size
                if self.index is not None:  # the bytes are in place: now readers may see them
                    end = e.offset + e.size + e.desc_size
                    e.published = self.index.publish(key, e.offset, e.size, end - len(desc),
                                                     len(desc))
                    if not e.published:
                        self._count_unpublished(+1)

    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        counter = DELETE_CAUSES[cause]
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            if e.pinned and not force:
                raise EntryPinnedError(f"entry {key} is pinned; unpin it or pass force")
            self._drop(key, e)
            setattr(self._stats, counter, getattr(self._stats, counter) + 1)
            return True

    def count_misses(self, chunks: int, tokens: int) -> None:
        with self._lock:
            self._stats.misses += chunks
            self._stats.miss_tokens += tokens

    def _info(self, key: str, e: _Entry) -> EntryInfo:
        h = e.header
        return EntryInfo(
            key=key,
            tier=self.name,
            nbytes=e.size,
            num_tokens=h.num_tokens,
            codec=h.codec,
            model_id=h.layout.model_id,
            created_at=h.created_at,
            last_access=e.last_access,
            hits=e.hits,
            pinned=e.pinned,
            keying=h.keying,
        )

    def info(self, key: str) -> EntryInfo | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else self._info(key, e)

    def header(self, key: str) -> ObjectHeader | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.header

    def scan(self) -> Iterator[EntryInfo]:
        with self._lock:
            infos = [self._info(k, e) for k, e in self._entries.items()]
        return iter(infos)

    def set_pinned(self, key: str, pinned: bool) -> bool:
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            e.pinned = pinned
            return True

    @property
    def used_bytes(self) -> int:
        return self._arena.used

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**self._stats.to_dict())
            s.used_bytes = self._arena.used
            s.entries = len(self._entries)
            return s

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._pool = torch.empty(0, dtype=torch.uint8)
            self._typed.clear()
            self._mmap = None  # unmapped once no tensor views it any more
            if self.index is not None:
                self.index.close()
                self.index = None
            if self.pool_fd is not None:
                os.close(self.pool_fd)
                self.pool_fd = None
