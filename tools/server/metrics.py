"""``/metrics``: the daemon's state in Prometheus' text format.

Request counters and latency histograms are updated as requests finish; everything the
store, the leases and the tenants already count is read at scrape time by a collector,
so there is one source of truth for each number (``TierStats``, ``StoreCounters``).
Series are listed, for dashboards, in ``docs/operations.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvcache.kvstore.tiered_store import TieredStore
    from kvcache.tools.server.leases import LeaseTable
    from kvcache.tools.server.tenants import TenantBook

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# TierStats counters exported as <prefix>_<name>_total{tier=...}.
_TIER_COUNTERS = ("hits", "misses", "hit_tokens", "miss_tokens", "puts", "bytes_read",
                  "bytes_written", "corrupt", "errors")
# Removal counters of TierStats, by the cause label they are exported under.
_REMOVALS = {"evictions": "capacity", "expired": "ttl", "admin_evictions": "admin",
             "deletes": "delete"}
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)


class _StateCollector(Collector):
    def __init__(self, store: TieredStore, leases: LeaseTable, tenants: TenantBook,
                 open_connections: Callable[[], int]) -> None:
        self.store, self.leases, self.tenants = store, leases, tenants
        self.open_connections = open_connections

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        for name in _TIER_COUNTERS:
            c = CounterMetricFamily(f"kvcache_tier_{name}", f"TierStats.{name} per tier",
                                    labels=["tier"])
            for tier, s in stats.items():
                c.add_metric([tier], getattr(s, name))
            yield c
        removed = CounterMetricFamily("kvcache_tier_removals", "entries removed, by cause",
                                      labels=["tier", "cause"])
        for tier, s in stats.items():
            for field, cause in _REMOVALS.items():
                removed.add_metric([tier, cause], getattr(s, field))
        yield removed
        for name, doc in (("used_bytes", "bytes stored"), ("capacity_bytes", "tier capacity"),
                          ("entries", "entries stored")):
            g = GaugeMetricFamily(f"kvcache_tier_{name}", doc, labels=["tier"])
            for tier, s in stats.items():
                g.add_metric([tier], getattr(s, name))
            yield g
        for name, value in vars(self.store.counters).items():
            yield CounterMetricFamily(f"kvcache_store_{name}", f"StoreCounters.{name}",
                                      value=value)
        yield GaugeMetricFamily("kvcache_leases_active", "leases held", value=self.leases.active)
        yield GaugeMetricFamily("kvcache_pinned_keys", "keys pinned by leases",
                                value=self.leases.pinned_keys)
        yield CounterMetricFamily("kvcache_leases_expired", "leases that ran out unrenewed",
                                  value=self.leases.expired)
        yield CounterMetricFamily("kvcache_leases_granted", "leases granted",
                                  value=self.leases.granted)
        yield GaugeMetricFamily("kvcache_open_connections", "client connections open",
                                value=self.open_connections())
        tenants = self.tenants.snapshot()
        for name in ("hits", "misses", "bytes_in", "bytes_out", "quota_evictions"):
            c = CounterMetricFamily(f"kvcache_tenant_{name}", f"per-tenant {name}",
                                    labels=["tenant"])
            for tenant, t in tenants.items():
                c.add_metric([tenant], t[name])
            yield c
        g = GaugeMetricFamily("kvcache_tenant_used_bytes", "bytes a tenant wrote and the "
                              "daemon still counts against its quota", labels=["tenant"])
        for tenant, t in tenants.items():
            g.add_metric([tenant], t["used_bytes"])
        yield g


class ServerMetrics:
    """The daemon's registry (its own, not the process-global one)."""

    def __init__(self, store: TieredStore, leases: LeaseTable, tenants: TenantBook,
                 open_connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("kvcache_request_seconds", "request latency by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("kvcache_requests", "requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("kvcache_request_errors", "failed requests by error type",
                              ["endpoint", "type"], registry=self.registry)
        self.registry.register(_StateCollector(store, leases, tenants, open_connections))

    def render(self) -> bytes:
        return generate_latest(self.registry)
