"""kvcache as SGLang's HiCache storage backend, driven through SGLang's own classes:
``StorageBackendFactory``, ``HiCacheStorageConfig``, ``HiCacheStorageExtraInfo``,
``PoolTransfer`` and SGLang's page hashes (``get_hash_str``). Host pools are shaped as
SGLang's (``tests/sglang/pools.py``).

Runs in a venv with sglang installed ``--no-deps`` (``.ci/run``'s SGLang stage); skipped
elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                    reason="needs sglang (the CI's SGLang stage)")

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from sglang.srt.mem_cache.utils import get_hash_str
from transformers import AutoModelForCausalLM, LlamaConfig

from kvcache.connectors.hf import HFConnector, cache_to_canonical
from kvcache.connectors.sglang import KVCacheHiCacheStorage
from kvcache.kvstore.config import StoreConfig
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.keys import page_chain_key
from kvcache.kvstore.tiered_store import TieredStore
from tests.daemon import daemon
from tests.sglang.pools import LAYOUTS, HostPool

BACKEND = {"backend_name": "kvcache", "module_path": "kvcache.connectors.sglang",
           "class_name": "KVCacheHiCacheStorage", "interface_v1": 1}
P = 4  # SGLang page size of most tests


def storage_config(extra: dict, *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False,
                   layout: str = "page_first", model: str | None = "test-model"
                   ) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
        is_page_first_layout=layout == "page_first", model_name=model,
        extra_config={**BACKEND, **extra})


def backend(tmp_path: Path, pool: HostPool, *, extra: dict | None = None, **cfg
            ) -> KVCacheHiCacheStorage:
    """Our backend as SGLang creates it (the factory, the dynamic extra config), with its
    host pool registered, on a store of its own under ``tmp_path``."""
    extra = {"store.dir": str(tmp_path / "store"), "store.cpu.capacity": "16MiB",
             **(extra or {})}
    sc = storage_config(extra, layout=pool.layout, mla=pool.mla, **cfg)
    b = StorageBackendFactory.create_backend("dynamic", sc, pool)
    assert isinstance(b, KVCacheHiCacheStorage)
    b.register_mem_pool_host(pool)
    return b


def open_backend(backends: list[KVCacheHiCacheStorage], tmp_path: Path, pool: HostPool,
                 **kw: Any) -> KVCacheHiCacheStorage:
    """``backend(tmp_path, pool, **kw)``, closed by the ``backends`` fixture after the test."""
    b = backend(tmp_path, pool, **kw)
    backends.append(b)
    return b


def assert_refused_at_registration(sc: HiCacheStorageConfig, pool: HostPool, match: str
                                   ) -> None:
    """SGLang creates the backend from ``sc``; registering ``pool`` fails, saying ``match``."""
    b = StorageBackendFactory.create_backend("dynamic", sc, pool)
    try:
        with pytest.raises(Exception, match=match):
            b.register_mem_pool_host(pool)
    finally:
        b.close()


@pytest.fixture
def backends():
    made: list[KVCacheHiCacheStorage] = []
    yield made
    for b in made:
        b.close()


def page_hashes(tokens: list[int], page_size: int = P) -> list[str]:
    return get_hash_str(tokens, None, page_size=page_size)


def tokens(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (n,), generator=g).tolist()


def same_pages(a: HostPool, a_pages: list[int], b: HostPool, b_pages: list[int]) -> bool:
    P = a.page_size
    return all(torch.equal(a.token(pa * P + t), b.token(pb * P + t))
               for pa, pb in zip(a_pages, b_pages, strict=True) for t in range(P))


# -- creation and config -------------------------------------------------------------------
def test_the_factory_creates_the_backend_from_the_dynamic_extra_config(tmp_path, backends):
    b = open_backend(backends, tmp_path, HostPool("page_first"))
    assert b.layout.tp_size == 1 and b.pages.page_size == P
    assert b.store.tiers[0].name == "cpu"


def test_the_readmes_extra_config_creates_the_backend(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    m = re.search(r"--hicache-storage-backend-extra-config '(\{.*?\})'", readme, re.S)
    extra = json.loads(m.group(1))
    assert extra["class_name"] == "KVCacheHiCacheStorage" and extra["interface_v1"] == 1
    # this machine's memory and disk, not the example's
    extra |= {"store.dir": str(tmp_path), "store.cpu.capacity": "16MiB",
              "store.disk.capacity": "1GiB"}
    sc = storage_config({}, model=None)
    sc.extra_config = extra
    b = StorageBackendFactory.create_backend("dynamic", sc, None)
    try:
        assert isinstance(b, KVCacheHiCacheStorage)
        assert b.model_path == "meta-llama/Llama-3.1-8B-Instruct"
    finally:
        b.close()


def test_unknown_extra_config_keys_are_refused_with_the_nearest_one(tmp_path):
    sc = storage_config({"store.dir": str(tmp_path), "store.cpu.capacty": "1GiB"})
    with pytest.raises(ConfigError, match="capacity"):
        StorageBackendFactory.create_backend("dynamic", sc, HostPool("page_first"))


@pytest.mark.parametrize("split", ["pp_size", "attn_cp_size", "dcp_size"])
def test_pages_split_across_ranks_it_cannot_name_are_refused(tmp_path, split):
    sc = storage_config({"store.dir": str(tmp_path)})
    setattr(sc, split, 2)
    pool = HostPool("page_first")
    assert_refused_at_registration(sc, pool, split)


def test_pools_kvcache_cannot_hold_are_refused_at_attach(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    b.register_mem_host_pool_v2(pool, PoolName.KV)
    b.on_host_pools_registered()  # the KV pool alone: fine
    b.register_mem_host_pool_v2(HostPool("page_first"), PoolName.MAMBA)
    with pytest.raises(ConfigError, match="mamba"):
        b.on_host_pools_registered()


@pytest.mark.parametrize("what", ["split K and V buffers", "fp8 bytes"])
def test_host_pools_of_other_kinds_are_refused_with_the_reason(tmp_path, what):
    pool = HostPool("page_first")
    if what == "fp8 bytes":
        pool.kv_buffer, pool.dtype = pool.kv_buffer.view(torch.uint8), torch.uint8
        reason = "fp8"
    else:
        pool.kv_buffer, reason = (pool.kv_buffer[0], pool.kv_buffer[1]), "K and V apart"
    sc = storage_config({"store.dir": str(tmp_path)})
    assert_refused_at_registration(sc, pool, reason)


def test_a_host_layout_kvcache_cannot_read_is_refused(tmp_path):
    pool = HostPool("page_first")
    pool.layout = "page_head"
    sc = storage_config({"store.dir": str(tmp_path)})
    assert_refused_at_registration(sc, pool, "page_first")


# -- v1 zero-copy pages ----------------------------------------------------------------------
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_v1_pages_round_trip_between_pools(tmp_path, backends, layout, mla):
    src, dst = HostPool(layout, mla=mla, seed=1), HostPool(layout, mla=mla, seed=2)
    writer, reader = backend(tmp_path, src), backend(tmp_path, dst)
    backends += [writer, reader]
    keys = page_hashes(tokens(6 * P))
    assert writer.batch_set_v1(keys, src.slots([3, 0, 7, 1, 5, 2])) == [True] * 6
    assert reader.batch_exists(keys) == 6
    # read into other slots, in another order of pages
    assert reader.batch_get_v1(keys, dst.slots([9, 12, 4, 15, 8, 10])) == [True] * 6
    assert same_pages(src, [3, 0, 7, 1, 5, 2], dst, [9, 12, 4, 15, 8, 10])
    untouched = HostPool(layout, mla=mla, seed=2)
    assert same_pages(untouched, [0, 1, 2, 3], dst, [0, 1, 2, 3])


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize(("written", "read"), [("page_first", "layer_first"),
                                               ("layer_first", "page_first"),
                                               ("page_first", "page_first_direct")])
def test_pages_move_between_host_layouts(tmp_path, backends, written, read, mla):
    """kvcache stores page_first pages by token (one copy each way for that layout) and the
    others layer by layer; a pool of any layout reads either."""
    src, dst = HostPool(written, mla=mla, seed=1), HostPool(read, mla=mla, seed=2)
    writer, reader = backend(tmp_path, src), backend(tmp_path, dst)
    backends += [writer, reader]
    keys = page_hashes(tokens(3 * P))
    assert writer.batch_set_v1(keys, src.slots([2, 0, 5])) == [True] * 3
    stored = writer.store.tiers[0].get(writer._keys(keys[:1])[0])
    assert list(stored.tensors) == ["kv_by_token" if written == "page_first" else "kv"]
    assert reader.batch_get_v1(keys, dst.slots([7, 1, 3])) == [True] * 3
    assert same_pages(src, [2, 0, 5], dst, [7, 1, 3])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flat_page_calls_round_trip(tmp_path, backends, layout):
    """Without interface_v1, SGLang moves flat data pages (get_data_page / batch_get)."""
    src, dst = HostPool(layout, seed=1), HostPool(layout, seed=2)
    b = open_backend(backends, tmp_path, src)
    keys = page_hashes(tokens(3 * P))
    assert b.batch_set(keys, [src.get_data_page(i * P) for i in (2, 4, 6)])
    assert b.exists(keys[1]) and not b.exists(page_hashes(tokens(P, seed=9))[0])
    got = b.batch_get(keys, [torch.zeros_like(dst.get_data_page(0)) for _ in keys])
    for i, flat in zip((2, 4, 6), got, strict=True):
        assert torch.equal(flat, src.get_data_page(i * P))
    single = b.get(keys[0])
    assert torch.equal(single, src.get_data_page(2 * P))
    assert b.set(page_hashes(tokens(P, seed=3))[0], src.get_data_page(0))


def test_batch_exists_answers_the_stored_prefix(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(8 * P))
    b.batch_set_v1(keys[:5], pool.slots(range(5)))
    assert b.batch_exists(keys) == 5
    assert b.batch_exists(keys[:3]) == 3
    b.store.delete(b._keys([keys[2]])[0])
    assert b.batch_exists(keys) == 2  # a gap ends the prefix
    assert b.batch_exists(keys[3:]) == 2  # a later batch answers for its own pages
    assert b.batch_exists([]) == 0


def test_prefix_keys_record_where_pages_sit(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(4 * P))
    info = HiCacheStorageExtraInfo(prefix_keys=keys[:2])
    assert b.batch_set_v1(keys[2:], pool.slots([0, 1]), info) == [True, True]
    obj = b.store.get_object(b._keys([keys[3]])[0])
    assert obj.header.rope_start == 3 * P


def test_clear_removes_this_models_entries_only(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(3 * P))
    b.batch_set_v1(keys, pool.slots([0, 1, 2]))
    other = dataclasses.replace(b.layout, model_id="another-model")
    kept = page_chain_key(other.fingerprint, keys[0])
    b.store.put(kept, torch.zeros(other.chunk_shape(P)), other)
    b.store.flush()
    b.clear()
    assert b.batch_exists(keys) == 0
    assert b.store.contains(kept)


# -- tensor parallelism and MLA ------------------------------------------------------------
def test_mha_ranks_store_and_find_their_own_pages(tmp_path, backends):
    pools = [HostPool("page_first", seed=r) for r in range(2)]
    ranks = [backend(tmp_path, pools[r], tp_rank=r, tp_size=2) for r in range(2)]
    backends += ranks
    keys = page_hashes(tokens(2 * P))
    ranks[0].batch_set_v1(keys, pools[0].slots([0, 1]))
    assert ranks[0].batch_exists(keys) == 2
    assert ranks[1].batch_exists(keys) == 0  # rank 1's heads are not rank 0's
    ranks[1].batch_set_v1(keys, pools[1].slots([0, 1]))
    out = HostPool("page_first", seed=5)
    reader = open_backend(backends, tmp_path, out, tp_rank=1, tp_size=2)
    assert reader.batch_get_v1(keys, out.slots([2, 3])) == [True, True]
    assert same_pages(pools[1], [0, 1], out, [2, 3])


def test_mla_pages_are_stored_once_and_read_by_every_rank(tmp_path, backends):
    pools = [HostPool("page_first", mla=True, seed=r) for r in range(2)]
    ranks = [backend(tmp_path, pools[r], tp_rank=r, tp_size=2) for r in range(2)]
    backends += ranks
    keys = page_hashes(tokens(2 * P))
    assert ranks[1].batch_set_v1(keys, pools[1].slots([0, 1])) == [True, True]
    # not the storage writer: nothing stored
    assert ranks[1].batch_exists(keys) == 0
    assert sum(t.entries for t in ranks[0].store.stats().values()) == 0
    assert ranks[0].batch_set_v1(keys, pools[0].slots([0, 1])) == [True, True]
    assert ranks[1].batch_exists(keys) == 2
    assert ranks[1].batch_get_v1(keys, pools[1].slots([4, 5])) == [True, True]
    assert same_pages(pools[0], [0, 1], pools[1], [4, 5])


# -- v2 (multi-pool) calls -----------------------------------------------------------------
def test_v2_calls_move_the_kv_pool_and_miss_the_others(tmp_path, backends):
    pool, before = HostPool("page_first", seed=1), HostPool("page_first", seed=1)
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(2 * P))
    kv = PoolTransfer(name=PoolName.KV, host_indices=pool.slots([0, 1]), keys=keys)
    mamba = PoolTransfer(name=PoolName.MAMBA, host_indices=torch.arange(2), keys=keys[1:])
    assert b.batch_set_v2([kv, mamba]) == {"kv": [True, True], "mamba": [False]}
    assert b.batch_exists_v2(keys).kv_hit_pages == 2
    assert b.batch_exists_v2(keys, [mamba]).kv_hit_pages == 0
    got = b.batch_get_v2([PoolTransfer(name=PoolName.KV, host_indices=pool.slots([3, 2]),
                                       keys=keys)])
    assert got == {"kv": [True, True]}
    assert same_pages(before, [0, 1], pool, [3, 2])


# -- failures: misses, never exceptions ----------------------------------------------------
def test_bad_calls_are_misses_and_store_nothing(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(3 * P))
    assert b.batch_set_v1(keys, pool.slots([0, 1])) == [False] * 3  # too few slots
    assert b.batch_set_v1(keys, pool.slots([0, 1, 99])) == [False] * 3  # past the pool
    assert b.batch_set_v1(["not-a-hash"], pool.slots([0])) == [False]
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, pool.slots([0, 1, 2])) == [False] * 3  # not stored
    assert b.batch_set(keys, [pool.get_data_page(0)]) is False
    assert b.counters.errors >= 4 and b.counters.failed_sets >= 6


def test_calls_before_the_host_pool_is_registered_are_misses(tmp_path):
    sc = storage_config({"store.dir": str(tmp_path)})
    b = StorageBackendFactory.create_backend("dynamic", sc, None)
    try:
        keys = page_hashes(tokens(P))
        assert b.batch_exists(keys) == 0
        assert b.batch_get_v1(keys, torch.arange(P)) == [False]
        assert b.batch_set_v1(keys, torch.arange(P)) == [False]
    finally:
        b.close()


def test_a_corrupt_page_on_disk_is_a_miss(tmp_path, backends):
    pool, out = HostPool("page_first", seed=1), HostPool("page_first", seed=2)
    extra = {"store.cpu.capacity": "1MiB"}
    b = backend(tmp_path, pool, extra=extra)
    keys = page_hashes(tokens(2 * P))
    b.batch_set_v1(keys, pool.slots([0, 1]))
    b.store.flush()
    b.close()  # its last user: the store closes, its CPU tier is gone
    blobs = sorted((tmp_path / "store").rglob("*.kvo"))
    assert blobs
    for blob in blobs:  # a flipped byte in every stored object
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    b = open_backend(backends, tmp_path, out, extra=extra)
    got = b.batch_get_v1(keys, out.slots([0, 1]))
    assert got == [False, False]
    assert same_pages(HostPool("page_first", seed=2), [0, 1], out, [0, 1])


def test_another_objects_bytes_under_a_page_key_are_a_miss(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    key = page_hashes(tokens(P))
    wrong = torch.zeros(b.layout.chunk_shape(2 * P))  # two pages' worth under one key
    b.store.put(b._keys(key)[0], wrong, b.layout)
    assert b.batch_get_v1(key, pool.slots([0])) == [False]


def test_a_dead_daemon_is_misses_within_the_deadline(tmp_path, backends):
    pool = HostPool("page_first")
    b = backend(tmp_path, pool, extra={"connector.server": "http://127.0.0.1:9",
                                       "store.remote.timeout": "0.5s",
                                       "store.remote.retries": 0})
    backends.append(b)
    keys = page_hashes(tokens(4 * P))
    t0 = time.monotonic()
    assert b.batch_set_v1(keys, pool.slots(range(4))) == [False] * 4
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, pool.slots(range(4))) == [False] * 4
    assert time.monotonic() - t0 < 10
    assert b.counters.failed_gets == 4 and b.counters.failed_sets == 4


# -- the daemon: engine instances share one cache --------------------------------------------
@pytest.mark.slow
def test_two_instances_share_pages_through_the_daemon(tmp_path, backends):
    """One engine writes over HTTP, the other reads over the Unix socket (the daemon's
    shared memory): page_first pages, stored by token, arrive as they left."""
    src, dst = HostPool("page_first", seed=1), HostPool("page_first", seed=2)
    sock = tmp_path / "kv.sock"
    with daemon(tmp_path / "daemon-store", "--socket", str(sock)) as d:
        a = backend(tmp_path / "a", src, extra={"connector.server": d.url})
        b = backend(tmp_path / "b", dst, extra={"connector.server": f"unix://{sock}"})
        backends += [a, b]
        keys = page_hashes(tokens(5 * P))
        assert a.batch_set_v1(keys, src.slots(range(5))) == [True] * 5
        assert b.batch_exists(keys) == 5
        assert b.batch_get_v1(keys, dst.slots([10, 11, 12, 13, 14])) == [True] * 5
        assert same_pages(src, list(range(5)), dst, [10, 11, 12, 13, 14])
        assert b.store.tiers[0].client.uses_fast_path
        d.kill()
        d.wait()
        # Over HTTP: misses within the deadline. Through shared memory the reader may still
        # find the pages the dead daemon left mapped; what it finds is what was stored.
        t0 = time.monotonic()
        assert a.batch_get_v1(keys, src.slots(range(5, 10))) == [False] * 5
        got = b.batch_get_v1(keys, dst.slots(range(5)))
        assert time.monotonic() - t0 < 30
        hit = [i for i, ok in enumerate(got) if ok]
        assert same_pages(src, hit, dst, hit)


# -- stats ---------------------------------------------------------------------------------
def test_stats_count_pages_and_tiers(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(3 * P))
    b.batch_set_v1(keys, pool.slots([0, 1, 2]))
    b.batch_get_v1(keys + page_hashes(tokens(P, seed=4)), pool.slots([3, 4, 5, 6]))
    s = b.stats()
    assert s["set_pages"] == 3 and s["get_pages"] == 4 and s["get_hit_pages"] == 3
    assert s["set_bytes"] == 3 * b.pages.page_bytes
    assert s["tiers"]["cpu"]["entries"] == 3
    # What get_stats hands SGLang's StorageMetrics (which needs torchvision to import)
    read, written, read_bw, write_bw = b.metrics_since_last()
    assert read == [3] and written == [3] and read_bw[0] > 0 and write_bw[0] > 0
    assert b.metrics_since_last() == ([], [], [], [])  # nothing moved since
    b.batch_get_v1(keys[:1], pool.slots([7]))
    assert b.metrics_since_last()[0] == [1]


def test_pages_already_stored_are_not_written_again(tmp_path, backends):
    pool = HostPool("page_first")
    b = open_backend(backends, tmp_path, pool)
    keys = page_hashes(tokens(4 * P))
    assert b.batch_set_v1(keys[:2], pool.slots([0, 1])) == [True, True]
    puts = b.store.stats()["cpu"].puts
    assert b.batch_set_v1(keys, pool.slots([0, 1, 2, 3])) == [True] * 4
    assert b.store.stats()["cpu"].puts == puts + 2
    assert b.counters.set_skipped_pages == 2 and b.counters.set_pages == 4


# -- keys shared with the transformers connector --------------------------------------------
TINY = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY).eval()
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    model.save_pretrained(path)
    return model, str(path)


def hf_pool(layout: str, pages: int = 16, page_size: int = P) -> HostPool:
    return HostPool(layout, pages=pages, page_size=page_size, layers=2, heads=2, head_dim=16)


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_sglang_loads_what_transformers_stored(tmp_path, backends, tiny_model, layout):
    model, path = tiny_model
    extra = {"model_path": path, "connector.model_id": "tiny-llama"}
    pool = hf_pool(layout)
    b = open_backend(backends, tmp_path, pool, extra=extra)
    hf = HFConnector(model, b.store, chunk_size=P, model_id="tiny-llama",
                     key_scheme="sglang")
    assert hf.layout.fingerprint == b.layout.fingerprint
    prompt = tokens(5 * P + 2)
    result = hf.prefill(prompt)
    keys = page_hashes(prompt[: 5 * P])  # SGLang stores whole pages
    assert len(keys) == 5 and b.batch_exists(keys) == 5
    assert b.batch_get_v1(keys, pool.slots([8, 9, 10, 11, 12])) == [True] * 5
    want = cache_to_canonical(result.cache, 0, 5 * P)  # [layers, 2, tokens, heads, dim]
    for i in range(5):
        got = b.pages.chunk_view((8 + i) * P)
        assert torch.equal(got, want[:, :, i * P : (i + 1) * P])


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_transformers_reuses_what_sglang_stored(tmp_path, backends, tiny_model, layout):
    model, path = tiny_model
    pool = hf_pool(layout)
    b = open_backend(backends, tmp_path, pool,
                     extra={"model_path": path, "connector.model_id": "tiny-llama"})
    prompt = tokens(6 * P + 3)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt]))
    kv = cache_to_canonical(out.past_key_values, 0, 6 * P)
    slots = [3, 1, 4, 0, 5, 2]  # SGLang's pages sit anywhere in its pool
    for i, page in enumerate(slots):
        b.pages.chunk_view(page * P).copy_(kv[:, :, i * P : (i + 1) * P])
    keys = page_hashes(prompt[: 6 * P])
    assert b.batch_set_v1(keys, pool.slots(slots)) == [True] * 6
    hf = HFConnector(model, b.store, chunk_size=P, model_id="tiny-llama",
                     key_scheme="sglang")
    result = hf.prefill(prompt)
    assert result.reused_tokens == 6 * P
    torch.testing.assert_close(result.logits, out.logits[:, -1:].float(), atol=1e-4, rtol=1e-4)
    # The default key scheme does not see SGLang's pages.
    other = HFConnector(model, TieredStore.open(StoreConfig(dir=tmp_path / "other")),
                        chunk_size=P, model_id="tiny-llama")
    assert other.chunks(prompt)[0].prefix_key != b._keys(keys[:1])[0]
    other.store.close()


def test_a_model_path_that_disagrees_with_the_pool_is_refused(tmp_path, tiny_model):
    _, path = tiny_model
    pool = HostPool("page_first", layers=3, heads=2, head_dim=16)
    sc = storage_config({"store.dir": str(tmp_path), "model_path": path})
    assert_refused_at_registration(sc, pool, "3 layers")
