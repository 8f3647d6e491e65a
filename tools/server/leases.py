"""Pins as leases: a client pins the chunks it is about to read for a limited time.

LMCache's users lost cache capacity to pins taken by lookups whose retrieval never came.
Here every pin belongs to a lease with an expiry; a client renews it while it works and
releases it when done, and a client that dies simply lets it run out. A key stays pinned
in the store while any live lease holds it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class _Lease:
    keys: list[str]
    expires_at: float


class LeaseTable:
    """Leases over a store's ``pin``/``unpin``. Thread-safe.

    ``pin(key) -> bool`` pins a key the store holds (False: it holds none);
    ``unpin(key)`` releases it. Each key is pinned once however many leases hold it.
    """

    def __init__(
        self,
        pin: Callable[[str], bool],
        unpin: Callable[[str], object],
        *,
        default_ttl_s: float,
        max_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pin, self._unpin = pin, unpin
        self.default_ttl_s, self.max_ttl_s = default_ttl_s, max_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._holders: dict[str, int] = {}  # key -> live leases holding it
        self.granted = 0
        self.expired = 0
        self.released = 0

    def ttl(self, requested: float | None) -> float:
        """The lease time to grant: the default, or what was asked within (0, max]."""
        if requested is None:
            return self.default_ttl_s
        if isinstance(requested, bool) or not isinstance(requested, (int, float)) \
                or not 0 < requested <= self.max_ttl_s:
            raise ValueError(f"ttl must be a number of seconds in (0, {self.max_ttl_s:g}]")
        return float(requested)

    def grant(self, keys: Sequence[str], ttl_s: float) -> tuple[str, list[bool]]:
        """A new lease pinning each key the store holds; (lease id, pinned per key)."""
        lease_id = secrets.token_hex(16)
        pinned: list[bool] = []
        held: list[str] = []
        with self._lock:
            for key in keys:
                ok = self._holders.get(key, 0) > 0 or bool(self._pin(key))
                if not ok:  # the store remembers pins of absent keys: forget this one
                    self._unpin(key)
                if ok and key not in held:
                    self._holders[key] = self._holders.get(key, 0) + 1
                    held.append(key)
                pinned.append(ok)
            if held:  # a lease that pins nothing is not kept (renewing it answers False)
                self._leases[lease_id] = _Lease(held, self._clock() + ttl_s)
                self.granted += 1
        return lease_id, pinned

    def renew(self, lease_id: str, ttl_s: float) -> bool:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.expires_at <= self._clock():
                return False
            lease.expires_at = self._clock() + ttl_s
            return True

    def _drop(self, lease: _Lease) -> None:
        for key in lease.keys:
            left = self._holders.get(key, 0) - 1
            if left > 0:
                self._holders[key] = left
                continue
            self._holders.pop(key, None)
            self._unpin(key)

    def release(self, lease_id: str) -> bool:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return False
            self._drop(lease)
            self.released += 1
            return True

    def expire(self) -> int:
        """Release every lease past its expiry; returns how many."""
        now = self._clock()
        with self._lock:
            dead = [i for i, lease in self._leases.items() if lease.expires_at <= now]
            for lease_id in dead:
                self._drop(self._leases.pop(lease_id))
            self.expired += len(dead)
        return len(dead)

    def forget(self, key: str) -> None:
        """``key`` left the store (deleted, evicted by an admin): no lease pins it now."""
        with self._lock:
            self._holders.pop(key, None)
            for lease in self._leases.values():
                if key in lease.keys:
                    lease.keys.remove(key)

    @property
    def active(self) -> int:
        return len(self._leases)

    @property
    def pinned_keys(self) -> int:
        return len(self._holders)

    def release_all(self) -> None:
        with self._lock:
            for lease in self._leases.values():
                self._drop(lease)
            self._leases.clear()
