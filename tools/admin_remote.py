"""``kvcache inspect|evict|stats --server URL``: the admin commands through a running daemon.

They return what their local twins in ``kvcache.tools.admin`` return, where the two mean
the same, so the CLI prints both alike; the daemon's own view adds tenants and leases.
"""

from __future__ import annotations

from typing import Any

from kvcache.kvstore.cache_client import CacheClient
from kvcache.kvstore.errors import KVCacheError, NoMatchError
from kvcache.kvstore.fail_open import CircuitBreaker, RemoteUnavailableError
from kvcache.kvstore.tier import EntryInfo
from kvcache.tools.admin import Selection, entry_dict

ADMIN_TIMEOUT_S = 30.0


def connect(url: str, token: str | None) -> CacheClient:
    # An administrator wants the daemon's answer or its error, not a silent miss: no
    # retries, a long deadline, and a breaker that never opens.
    return CacheClient(url, token=token, timeout_s=ADMIN_TIMEOUT_S, retries=0,
                       breaker=CircuitBreaker(failures=1 << 30))


def _call(client: CacheClient, fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except RemoteUnavailableError as e:
        raise KVCacheError(f"cannot reach the daemon: {e}") from None


def inspect(client: CacheClient, *, model: str | None = None) -> dict[str, Any]:
    got = _call(client, client.inspect, model=model)
    stats = _call(client, client.stats)
    return {
        "store": client.url,
        "entries": [entry_dict(EntryInfo(**e)) for e in got["entries"]],
        "tiers": {name: {"entries": s["entries"], "bytes": s["used_bytes"],
                         "used_bytes": s["used_bytes"], "capacity": s["capacity_bytes"],
                         "path": client.url}
                  for name, s in stats["tiers"].items()},
    }


def inspect_entry(client: CacheClient, key: str) -> dict[str, Any]:
    got = _call(client, client.inspect, key=key)
    if not got.get("entry"):
        raise NoMatchError(f"no entry {key} in the daemon at {client.url}")
    return {"entry": entry_dict(EntryInfo(**got["entry"]["info"])),
            "header": got["entry"]["header"]}


def evict(client: CacheClient, selection: Selection, *, dry_run: bool = False,
          force: bool = False) -> dict[str, Any]:
    """Per tier: the local ``evict``'s report (``store`` is the daemon's URL)."""
    fields = {k: v for k, v in vars(selection).items() if v not in (None, False)}
    got = _call(client, client.evict, fields, dry_run=dry_run, force=force)
    tiers = got["tiers"]
    if not any(t["removed"] or t["skipped_pinned"] for t in tiers.values()) and not (
            selection.to_size is not None and not selection.filters()):
        raise NoMatchError(f"no entry matches {selection.describe()} in the daemon at "
                           f"{client.url}; nothing evicted")
    return {name: {"store": client.url, "tier": name, **t} for name, t in tiers.items()}


def stats(client: CacheClient) -> dict[str, Any]:
    return dict(_call(client, client.stats)) | {"server_url": client.url}
