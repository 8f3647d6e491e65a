"""The store an engine's connector uses: embedded, or the node's daemon — one per process.

An engine creates its connector more than once per process (vLLM: a scheduler-side and a
worker-side instance, in one process unless the workers are separate processes). They
must share one store: two embedded stores over one directory would be two LMDB handles
in one process (which LMDB forbids) and two CPU tiers that cannot see each other's
chunks. ``acquire`` hands every caller in a process the same ``TieredStore`` for the same
configuration and ``release`` closes it after its last user.

With ``connector.server`` the store is the daemon alone (a ``RemoteTier``; its token,
timeout and codec from ``store.remote``): every engine instance on the node shares the
daemon's CPU memory and disk, and a ``unix://`` URL reads the daemon's memory directly.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.tiered_store import TieredStore, open_remote_tier

_lock = threading.Lock()
_stores: dict[str, tuple[TieredStore, int]] = {}


def connector_config(extra: Mapping[str, Any]) -> KVCacheConfig:
    """Our config from an engine's connector options: kvcache config keys, as nested tables
    or dotted keys, over ``$KVCACHE_CONFIG`` and ``KVCACHE_*`` variables; ``"config": PATH``
    names a config file instead of ``$KVCACHE_CONFIG``. Unknown keys are refused with the
    nearest known one (``ConfigError``)."""
    extra = dict(extra)
    path = extra.pop("config", None)
    return KVCacheConfig.load(path).with_overrides(extra)


def open_engine_store(config: KVCacheConfig) -> TieredStore:
    """A new store as ``config`` describes it (see the module docstring)."""
    if config.connector.server is None:
        # Copies to disk wait for the cores the engine leaves idle (background.py).
        return TieredStore.open(config.store, idle_writer=True)
    remote = dataclasses.replace(config.store.remote, url=config.connector.server)
    return TieredStore([open_remote_tier(remote, store_ttl=config.store.ttl)],
                       codecs=[remote.codec], ttl_s=config.store.ttl)


def acquire(config: KVCacheConfig) -> TieredStore:
    """This process's store for ``config`` (opened on first use)."""
    key = config.to_json()
    with _lock:
        store, users = _stores.get(key, (None, 0))
        if store is None:
            store = open_engine_store(config)
        _stores[key] = (store, users + 1)
        return store


def release(store: TieredStore) -> None:
    """One user is done with ``store``; the last one closes it."""
    with _lock:
        for key, (s, users) in list(_stores.items()):
            if s is store:
                if users > 1:
                    _stores[key] = (s, users - 1)
                    return
                del _stores[key]
                break
        else:
            return
    store.close()
