"""Admin operations on a store directory: inspect, evict, stats, fsck. Plain dicts out, no
printing.

They work on the store's *disk tier*, the only tier that outlives a process: the CPU and
GPU tiers live inside serving processes and are not visible from here. A serving process
may have the same directory open (LMDB is multi-process), so the tier is opened shared,
and read-only for everything that only looks. Nothing here creates a store by accident.

Entries are reported as flat dicts with short, stable names (``key``, ``tier``, ``bytes``,
``tokens``, ``codec``, ``model``, ``created``, ``last_access``, ``hits``, ``pinned``; times
in seconds since the epoch) because scripts read them through ``--json``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.errors import (
    ConfigError,
    EntryPinnedError,
    KVCacheError,
    NoMatchError,
    StoreCorruptError,
    StoreUnavailableError,
)
from kvcache.kvstore.tier import EntryInfo, Tier
from kvcache.kvstore.units import format_duration

# Tiers an admin command can reach from outside the serving processes.
ADMIN_TIERS = ("disk",)


def missing_store_message(store_dir: Path) -> str:
    return (
        f"no kvcache store at {store_dir} (create one with `kvcache demo --store {store_dir}` "
        "or point --store/KVCACHE_DIR at an existing one)"
    )


def check_tier(tier: str | None) -> str:
    """The tier to operate on (default: disk); anything unreachable is a clear error."""
    if tier is None or tier in ADMIN_TIERS:
        return tier or ADMIN_TIERS[0]
    if tier in ("cpu", "gpu"):
        raise ConfigError(
            f"the {tier} tier lives inside the serving processes' memory and cannot be "
            f"inspected from outside; admin commands see: {', '.join(ADMIN_TIERS)}"
        )
    raise ConfigError(f"unknown tier {tier!r}; admin commands see: {', '.join(ADMIN_TIERS)}")


def _check_exists(cfg: KVCacheConfig) -> None:
    # Checked here, not left to DiskTier, so the message can say how to get a store.
    if not cfg.store.dir.is_dir() or not cfg.store.disk_path.exists():
        raise StoreUnavailableError(missing_store_message(cfg.store.dir))


@contextlib.contextmanager
def open_disk_tier(cfg: KVCacheConfig, *, readonly: bool) -> Iterator[Tier]:
    """The disk tier of ``cfg.store``, opened shared; never creates a store. Read-only
    when ``readonly`` or when the store is configured read-only. A damaged index is an
    error that says how to repair it (admin commands must not report an empty store)."""
    _check_exists(cfg)
    # Imported late: the CLI's other commands (and --help) must work without LMDB loaded.
    from kvcache.kvstore.disk_tier import DiskTier

    disk = cfg.store.disk
    tier = DiskTier(
        cfg.store.disk_path,
        disk.capacity,
        policy=disk.policy,
        blob_storage=disk.blob_storage,
        readonly=readonly or cfg.store.readonly,
        exclusive=False,
        create=False,
    )
    try:
        if tier.damage is not None:
            raise StoreCorruptError(
                f"{tier.damage} (e.g. `kvcache fsck --repair --store {cfg.store.dir}`, "
                "with the store's other users stopped)"
            )
        yield tier
    finally:
        tier.close()


def entry_dict(info: EntryInfo) -> dict[str, Any]:
    return {
        "key": info.key,
        "tier": info.tier,
        "bytes": info.nbytes,
        "tokens": info.num_tokens,
        "codec": info.codec,
        "model": info.model_id,
        "created": info.created_at,
        "last_access": info.last_access,
        "hits": info.hits,
        "pinned": info.pinned,
        "keying": info.keying,
    }


def _tier_totals(tier: Tier, infos: list[EntryInfo], path: Path) -> dict[str, Any]:
    return {
        "entries": len(infos),
        "bytes": sum(i.nbytes for i in infos),
        "capacity": tier.capacity_bytes,
        "used_bytes": tier.used_bytes,
        "path": str(path),
    }


def inspect(
    cfg: KVCacheConfig, *, tier: str | None = None, model: str | None = None
) -> dict[str, Any]:
    """Every entry (optionally of one model), most recently used first, with tier totals."""
    name = check_tier(tier)
    with open_disk_tier(cfg, readonly=True) as t:
        infos = [i for i in t.scan() if model is None or i.model_id == model]
        infos.sort(key=lambda i: (-i.last_access, i.key))
        totals = _tier_totals(t, infos, cfg.store.disk_path)
    return {
        "store": str(cfg.store.dir),
        "entries": [entry_dict(i) for i in infos],
        "tiers": {name: totals},
    }


def inspect_entry(cfg: KVCacheConfig, key: str, *, tier: str | None = None) -> dict[str, Any]:
    """One entry and its full stored header. ``key`` may be a unique prefix of a key."""
    check_tier(tier)
    with open_disk_tier(cfg, readonly=True) as t:
        info = t.info(key)
        if info is None:
            matches = [i for i in t.scan() if i.key.startswith(key)] if key else []
            if not matches:
                raise NoMatchError(f"no entry with key {key!r} in {cfg.store.dir}")
            if len(matches) > 1:
                raise KVCacheError(
                    f"key prefix {key!r} matches {len(matches)} entries; give more of the key"
                )
            info = matches[0]
        header = t.header(info.key)
        still_listed = t.info(info.key) is not None
    if header is None:
        if still_listed:  # read-only: the unusable entry is reported, not removed
            raise KVCacheError(
                f"entry {info.key} is in the index but its object is missing, corrupt or "
                f"another key's; `kvcache fsck --store {cfg.store.dir}` shows what is wrong "
                "and `kvcache fsck --repair` removes it"
            )
        raise NoMatchError(
            f"entry {info.key} was removed by another process (or found corrupt and "
            "removed) while it was being read"
        )
    return {"entry": entry_dict(info), "header": header.to_json()}


@dataclass(frozen=True)
class Selection:
    """What ``evict`` removes. Filters combine with AND; ``to_size`` then bounds how many.

    ``older_than``: seconds since last access. ``to_size``: evict least recently accessed
    first until the tier uses at most this many bytes.
    """

    key: str | None = None
    prefix: str | None = None
    model: str | None = None
    older_than: float | None = None
    to_size: int | None = None
    all: bool = False

    def __post_init__(self) -> None:
        # A daemon builds this from a request: every field is checked, not trusted.
        for name in ("key", "prefix", "model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string")
        for name in ("older_than", "to_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or v < 0):
                raise ConfigError(f"{name} must be a number >= 0")
        if not isinstance(self.all, bool):
            raise ConfigError("all must be true or false")
        filters = self.filters()
        if self.all and (filters or self.to_size is not None):
            raise ConfigError("--all removes everything; it cannot be combined with other filters")
        if not (self.all or filters or self.to_size is not None):
            raise ConfigError(
                "say what to evict: --key, --prefix, --model, --older-than, --to-size or --all"
            )

    def filters(self) -> list[str]:
        """The filters given, as command-line options (for messages)."""
        out = []
        if self.key is not None:
            out.append(f"--key {self.key}")
        if self.prefix is not None:
            out.append(f"--prefix {self.prefix}")
        if self.model is not None:
            out.append(f"--model {self.model}")
        if self.older_than is not None:
            out.append(f"--older-than {format_duration(self.older_than)}")
        return out

    def describe(self) -> str:
        return "--all" if self.all else " ".join(self.filters()) or "(all entries)"

    def matches(self, info: EntryInfo, now: float) -> bool:
        return (
            (self.key is None or info.key == self.key)
            and (self.prefix is None or info.key.startswith(self.prefix.lower()))
            and (self.model is None or info.model_id == self.model)
            and (self.older_than is None or now - info.last_access > self.older_than)
        )


def evict(
    cfg: KVCacheConfig,
    selection: Selection,
    *,
    tier: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Remove what ``selection`` matches from the disk tier; pinned entries only with ``force``.

    Returns ``removed`` (or would-remove, under ``dry_run``), ``skipped_pinned``, ``vanished``
    (removed by another process meanwhile), ``freed_bytes`` and ``used_bytes`` after.
    Raises ``NoMatchError`` when the filters match nothing (a ``to_size`` already met is
    not an error: there is simply nothing to do).
    """
    name = check_tier(tier)
    # A dry run only reads: open read-only so it works beside a writer and on read-only media.
    with open_disk_tier(cfg, readonly=dry_run) as t:
        report = evict_from(t, selection, dry_run=dry_run, force=force, now=now)
    # A bare --to-size on a small or empty tier has simply nothing to do.
    if not report.pop("matched") and not (selection.to_size is not None
                                          and not selection.filters()):
        what = ("the disk tier is empty" if selection.all
                else f"no entry matches {selection.describe()}")
        raise NoMatchError(f"{what} in {cfg.store.dir}; nothing evicted")
    return {"store": str(cfg.store.dir), "tier": name, **report}


def evict_from(
    t: Tier, selection: Selection, *, dry_run: bool = False, force: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """``evict``'s work on one open tier (the CLI's disk tier, or a daemon's tiers)."""
    now = time.time() if now is None else now
    candidates = [i for i in t.scan() if selection.matches(i, now)]
    # The admin's policy order is plain LRU by recorded last access, whatever policy
    # the tier runs: it is the order a person can predict from `kvcache inspect`.
    candidates.sort(key=lambda i: (i.last_access, i.created_at, i.key))
    used = t.used_bytes
    removed: list[EntryInfo] = []
    skipped: list[EntryInfo] = []
    vanished: list[EntryInfo] = []
    for info in candidates:
        if selection.to_size is not None and used <= selection.to_size:
            break
        if info.pinned and not force:
            skipped.append(info)
            continue
        if not dry_run:
            try:
                if not t.delete(info.key, force=force, cause="admin"):
                    vanished.append(info)
                    continue
            except EntryPinnedError:  # pinned by a serving process since the scan
                skipped.append(info)
                continue
        removed.append(info)
        used -= info.nbytes
    return {
        "matched": len(candidates),
        "selection": selection.describe(),
        "dry_run": dry_run,
        "removed": [entry_dict(i) for i in removed],
        "skipped_pinned": [entry_dict(i) for i in skipped],
        "vanished": [entry_dict(i) for i in vanished],
        "freed_bytes": sum(i.nbytes for i in removed),
        "used_bytes": used if dry_run else t.used_bytes,
        "capacity": t.capacity_bytes,
        "target_bytes": selection.to_size,
    }


def stats(cfg: KVCacheConfig) -> dict[str, Any]:
    """Each reachable tier's ``TierStats`` (plus its hit rate) and a summary of the
    store's configuration."""
    with open_disk_tier(cfg, readonly=True) as t:
        s = t.stats()
    disk_stats = s.to_dict() | {"hit_rate": s.hit_rate}
    store = cfg.store.to_dict()
    store["disk"]["resolved_path"] = str(cfg.store.disk_path)
    return {"store": store, "tiers": {"disk": disk_stats}}


def fsck(cfg: KVCacheConfig, *, repair: bool = False, verify: bool = True) -> dict[str, Any]:
    """Check the disk tier's index against its objects (``kvcache.kvstore.fsck``); with
    ``repair``, fix what is wrong (needs the store to itself)."""
    _check_exists(cfg)
    if repair and cfg.store.readonly:
        raise ConfigError("the store is configured read-only; a repair writes to it")
    from kvcache.kvstore.fsck import fsck as run_fsck

    disk = cfg.store.disk
    report = run_fsck(cfg.store.disk_path, capacity_bytes=disk.capacity,
                      blob_storage=disk.blob_storage, repair=repair, verify=verify)
    return {"store": str(cfg.store.dir)} | report.to_dict() | {"summary": report.summary()}
