"""Tenants: namespaces that share one daemon, each with a byte quota and its own counters.

Tenants share one key space: keys are hashes of the tokens, so a tenant that finds a key
already holds its text, and one tenant's prefix serves another (KVShare-style sharing).
What a tenant owns is what it wrote: a quota bounds those bytes, and a put beyond it
removes that tenant's own oldest writes first, never another tenant's entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TenantStats:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    quota_evictions: int = 0
    used_bytes: int = 0
    # key -> bytes, oldest write first
    owned: OrderedDict[str, int] = field(default_factory=OrderedDict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["owned"]
        d["entries"] = len(self.owned)
        asked = self.hits + self.misses
        d["hit_rate"] = self.hits / asked if asked else None
        return d


class TenantBook:
    """Per-tenant ownership, quotas and counters. Thread-safe."""

    def __init__(self, quota_bytes: int | None) -> None:
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._tenants: dict[str, TenantStats] = {}

    def _get(self, tenant: str) -> TenantStats:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = TenantStats()
        return t

    def over_quota(self, tenant: str, sizes: dict[str, int]) -> list[str]:
        """Keys of ``tenant`` to remove, oldest first, so that writing ``sizes`` (key ->
        bytes) keeps it within its quota. Raises ``ValueError`` when the batch alone is
        larger than the quota."""
        if self.quota_bytes is None:
            return []
        incoming = sum(sizes.values())
        if incoming > self.quota_bytes:
            raise ValueError(
                f"a batch of {incoming} bytes is larger than the tenant quota of "
                f"{self.quota_bytes} bytes")
        with self._lock:
            t = self._get(tenant)
            used = t.used_bytes - sum(t.owned.get(k, 0) for k in sizes)
            victims: list[str] = []
            for key, nbytes in t.owned.items():
                if used + incoming <= self.quota_bytes:
                    break
                if key in sizes:
                    continue
                victims.append(key)
                used -= nbytes
            return victims

    def wrote(self, tenant: str, key: str, nbytes: int) -> None:
        with self._lock:
            for other in self._tenants.values():  # the latest writer owns a key
                old = other.owned.pop(key, None)
                if old is not None:
                    other.used_bytes -= old
            t = self._get(tenant)
            t.owned[key] = nbytes
            t.used_bytes += nbytes
            t.puts += 1
            t.bytes_in += nbytes

    def removed(self, key: str, *, quota: bool = False, tenant: str | None = None) -> None:
        with self._lock:
            for name, t in self._tenants.items():
                old = t.owned.pop(key, None)
                if old is not None:
                    t.used_bytes -= old
                    if quota and name == tenant:
                        t.quota_evictions += 1

    def read(self, tenant: str, hits: int, misses: int, nbytes: int) -> None:
        with self._lock:
            t = self._get(tenant)
            t.hits += hits
            t.misses += misses
            t.bytes_out += nbytes

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: t.to_dict() for name, t in self._tenants.items()}
