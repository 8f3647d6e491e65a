"""The ``Tier`` interface: one level of the hierarchy (CPU pool, local disk, remote).

A tier stores ``StoredObject``s under string keys within a byte capacity. It owns its
bytes and its eviction *policy* (``kvcache.kvstore.eviction``), but not the decision of
what happens to a victim: before a victim's space is reused the tier calls the eviction
handler the ``TieredStore`` installed, which may demote it to the next tier. Pinned
entries and entries with readers in flight are never chosen as victims.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kvcache.kvstore.errors import CorruptObjectError, KVCacheError

if TYPE_CHECKING:  # the container imports torch; admin commands read tiers without it
    from kvcache.kvstore.container import ObjectHeader, StoredObject

# Why an entry was removed other than to make room, and the ``TierStats`` counter of each:
# an API ``delete``, the store's TTL, an administrator (``kvcache evict``).
DELETE_CAUSES = {"delete": "deletes", "ttl": "expired", "admin": "admin_evictions"}

# Called with (key, object) for each victim, before its bytes are released. The object's
# tensors may view the tier's memory: copy what must outlive the call.
EvictHandler = Callable[[str, "StoredObject"], None]


@dataclass
class EntryInfo:
    """What ``scan``/``info`` report about one entry (no tensor bytes)."""

    key: str
    tier: str
    nbytes: int
    num_tokens: int
    codec: str
    model_id: str
    created_at: float
    last_access: float
    hits: int = 0
    pinned: bool = False
    keying: str = "prefix"  # ObjectHeader.keying

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_object_key(key: str, header: ObjectHeader) -> None:
    """``CorruptObjectError`` unless ``header`` is the header of ``key``'s object.

    Checksums prove bytes are intact, not that they are the bytes asked for: a blob copied
    over another's name, or an index key that lost a bit, holds a valid object of another
    key. Every read path compares the key in the object with the key it was asked for.
    """
    if header.key != key:
        raise CorruptObjectError(f"the object stored under {key} is the object of {header.key}")


@dataclass
class TierStats:
    """Counters of one tier (``entries``/``used_bytes`` are current; the disk tier's are
    lifetime counters shared by every process, the CPU tier's count since it was made).

    A chunk asked of this tier is a hit when the tier served it and a miss when it did not
    (the request fell through to the next tier, or to recomputation); a prefix lookup
    counts the chunks it cannot serve — the first missing one and every one after it — as
    misses in every tier. ``*_tokens`` count the same events in tokens where they are
    known. Removals by cause: ``evictions`` to make room, ``expired`` by the TTL,
    ``admin_evictions`` by ``kvcache evict``, ``deletes`` by the API, ``corrupt`` objects
    that failed verification. ``errors``: requests a remote tier could not complete (server
    down, slow or answering garbage), each a miss or a skipped write. ``damage``: why the
    tier serves nothing, if it is damaged.
    """

    name: str
    capacity_bytes: int
    used_bytes: int = 0
    entries: int = 0
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    expired: int = 0
    admin_evictions: int = 0
    deletes: int = 0
    corrupt: int = 0
    errors: int = 0
    opened_at: float = field(default_factory=time.time)
    damage: str | None = None

    @property
    def hit_rate(self) -> float | None:
        """hits / (hits + misses), None before any chunk was asked of this tier."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tier(abc.ABC):
    """One level of storage. Implementations are thread-safe."""

    name: str
    capacity_bytes: int

    def __init__(self) -> None:
        self._evict_handler: EvictHandler | None = None

    def set_evict_handler(self, handler: EvictHandler | None) -> None:
        self._evict_handler = handler

    @abc.abstractmethod
    def contains(self, key: str) -> bool: ...

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """``contains`` of each key. Remote tiers override this to ask once for all."""
        return [self.contains(k) for k in keys]

    @abc.abstractmethod
    def get(self, key: str) -> StoredObject | None:
        """The object under ``key`` (tensors owned by the caller), or None on a miss.

        A corrupt object counts as a miss: it is removed and counted in ``stats().corrupt``.
        """

    def get_many(self, keys: Sequence[str]) -> list[StoredObject | None]:
        """``get`` of each key, in order. Tiers with slow I/O override this to overlap
        the reads (a queue of reads keeps a disk busier than one read at a time)."""
        return [self.get(k) for k in keys]

    @abc.abstractmethod
    def put(self, key: str, obj: StoredObject) -> None:
        """Store ``obj`` under ``key``, evicting as needed; replaces an existing entry.

        Raises ``ObjectTooLargeError`` if it cannot fit even in an empty tier and
        ``StoreFullError`` if pinned or in-use entries leave no room. On error nothing
        already stored is lost (victims were handed to the evict handler first).
        """

    def put_many(self, items: Sequence[tuple[str, StoredObject]]) -> list[KVCacheError | None]:
        """``put`` of each item; what kept each out (None: stored). Tiers override this to
        take a batch at once (one lock and few copies, one request)."""
        out: list[KVCacheError | None] = []
        for key, obj in items:
            try:
                self.put(key, obj)
                out.append(None)
            except KVCacheError as e:
                out.append(e)
        return out

    @abc.abstractmethod
    def delete(self, key: str, *, force: bool = False, cause: str = "delete") -> bool:
        """Remove ``key``; False if absent. Raises ``EntryPinnedError`` if pinned and not
        force. ``cause`` (a ``DELETE_CAUSES`` name) picks the counter it is reported under."""

    @abc.abstractmethod
    def count_misses(self, chunks: int, tokens: int) -> None:
        """Count chunks asked of this tier that a lookup found nowhere (see ``TierStats``)."""

    @abc.abstractmethod
    def info(self, key: str) -> EntryInfo | None: ...

    @abc.abstractmethod
    def header(self, key: str) -> ObjectHeader | None:
        """The stored header of ``key`` without decoding its tensors (None if absent)."""

    @abc.abstractmethod
    def scan(self) -> Iterator[EntryInfo]:
        """Every entry, in no particular order (a snapshot; safe to delete while iterating)."""

    @abc.abstractmethod
    def set_pinned(self, key: str, pinned: bool) -> bool:
        """Pin (never evict) or unpin ``key``; False if absent."""

    @abc.abstractmethod
    def stats(self) -> TierStats: ...

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the tier must not be used afterwards."""

    def __enter__(self) -> Tier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
