"""Eviction policies: small strategies that order keys, never touching bytes.

A tier tells its policy what happened (insert, access, remove) and asks it for victims in
order. The tier skips victims it may not evict (pinned, in use) and keeps asking, so a
policy never needs to know about pins.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterator

from kvcache.kvstore.errors import ConfigError


class EvictionPolicy(abc.ABC):
    """Orders the keys of one tier for eviction. Not thread-safe: the tier locks."""

    name: str

    @abc.abstractmethod
    def on_insert(self, key: str, hits: int = 0) -> None:
        """``key`` entered the tier (``hits``: prior accesses, when restoring an index)."""

    @abc.abstractmethod
    def on_access(self, key: str) -> None: ...

    @abc.abstractmethod
    def on_remove(self, key: str) -> None: ...

    @abc.abstractmethod
    def victims(self) -> Iterator[str]:
        """Keys in the order they should be evicted (first = evict first).

        The iterator sees a snapshot: the tier may remove keys while iterating.
        """

    @abc.abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first. O(1) per event."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def on_insert(self, key: str, hits: int = 0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties broken least-recently-used first. O(1) per event.

    Frequency buckets hold keys in recency order (the classic O(1) LFU of Shah et al.).
    """

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._min = 0

    def _bucket_add(self, key: str, f: int) -> None:
        self._buckets.setdefault(f, OrderedDict())[key] = None

    def _bucket_drop(self, key: str, f: int) -> None:
        b = self._buckets[f]
        del b[key]
        if not b:
            del self._buckets[f]

    def on_insert(self, key: str, hits: int = 0) -> None:
        if key in self._freq:
            self._bucket_drop(key, self._freq[key])
        f = max(1, hits + 1)
        self._freq[key] = f
        self._bucket_add(key, f)
        self._min = min(self._min, f) if self._min else f

    def on_access(self, key: str) -> None:
        f = self._freq.get(key)
        if f is None:
            return
        self._bucket_drop(key, f)
        self._freq[key] = f + 1
        self._bucket_add(key, f + 1)
        if self._min == f and f not in self._buckets:
            self._min = f + 1

    def on_remove(self, key: str) -> None:
        f = self._freq.pop(key, None)
        if f is not None:
            self._bucket_drop(key, f)
            if self._min == f and f not in self._buckets:
                self._min = min(self._buckets, default=0)

    def victims(self) -> Iterator[str]:
        out: list[str] = []
        for f in sorted(self._buckets):
            out.extend(self._buckets[f])
        return iter(out)

    def __len__(self) -> int:
        return len(self._freq)


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO, a ghost list.

    New keys enter the small queue (10% of entries); a key evicted from it that was hit
    again is promoted to main, otherwise it becomes a ghost. A ghost that returns enters
    main directly. Main evicts FIFO, re-inserting keys that were hit (frequency capped at
    3, decremented on reinsertion). One-hit wonders therefore leave quickly.
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1) -> None:
        self._small: OrderedDict[str, None] = OrderedDict()
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, None] = OrderedDict()
        self._freq: dict[str, int] = {}
        self._small_ratio = small_ratio

    def on_insert(self, key: str, hits: int = 0) -> None:
        self.on_remove(key)
        self._freq[key] = min(hits, 3)
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def on_access(self, key: str) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def on_remove(self, key: str) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def _remember_ghost(self, key: str) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._freq), 16):
            self._ghost.popitem(last=False)

    def victims(self) -> Iterator[str]:
        """Yields the next victim, rotating the queues as S3-FIFO does between yields."""
        budget = 4 * (len(self._freq) + 1)  # each key moves at most a few times
        while self._freq and budget > 0:
            budget -= 1
            small_target = max(1, int(self._small_ratio * len(self._freq)))
            if self._small and (len(self._small) >= small_target or not self._main):
                key = next(iter(self._small))
                if self._freq[key] > 0:
                    del self._small[key]
                    self._freq[key] = 0
                    self._main[key] = None
                    continue
                self._remember_ghost(key)
                yield key
                # The tier may not have evicted it (pinned): move it behind the others.
                if key in self._small:
                    self._small.move_to_end(key)
                    self._ghost.pop(key, None)
            elif self._main:
                key = next(iter(self._main))
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main.move_to_end(key)
                    continue
                yield key
                if key in self._main:
                    self._main.move_to_end(key)
            else:
                return

    def __len__(self) -> int:
        return len(self._freq)


_POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "s3fifo": S3FIFOPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown eviction policy {name!r}; known policies: {', '.join(sorted(_POLICIES))}"
        ) from None


def policy_names() -> list[str]:
    return sorted(_POLICIES)
