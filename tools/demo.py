"""``kvcache demo``: prefix reuse on a small Llama-shaped model, cold vs warm TTFT.

The workload is what prefix caching is for: a long shared system prompt followed by
different user questions, then a multi-round chat whose every round extends the previous
prompt. Each request is prefilled twice in the same run: once in full without the store
(the baseline) and once through ``HFConnector`` with the store, and the next-token logits
of both are compared. The model is random (built from a config, seeded): no weights are
downloaded, and its KV is keyed by a model id naming the seed, so runs agree.

The store is the configured one (``$KVCACHE_DIR`` or ``~/.cache/kvcache`` unless
``--store``), so a second run serves the first run's chunks from disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvcache.kvstore.config import StoreConfig

DEFAULT_REQUESTS = 8
SYSTEM_PROMPT_TOKENS = 1024
QUESTION_TOKENS = 48
ANSWER_TOKENS = 96
VOCAB = 4096


def _model(seed: int) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # The seed determines the weights, so it must be part of the id the KV is keyed by.
    return model, f"kvcache-demo/llama-4L-512-seed{seed}"


def _workload(requests: int, seed: int) -> list[tuple[str, list[int]]]:
    """(kind, token ids): questions on a shared system prompt, then chat rounds."""
    g = torch.Generator().manual_seed(seed + 1)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=g).tolist()

    system = tokens(SYSTEM_PROMPT_TOKENS)
    n_questions = (requests + 1) // 2
    out = [("question", system + tokens(QUESTION_TOKENS)) for _ in range(n_questions)]
    chat = list(system)
    for _ in range(requests - n_questions):
        chat = chat + tokens(QUESTION_TOKENS)
        out.append(("chat", list(chat)))
        chat = chat + tokens(ANSWER_TOKENS)  # the reply the next round carries along
    return out


def _full_prefill(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, float]:
    """Baseline: last-position logits ``[1, 1, vocab]`` of a full prefill and its time
    (the shape ``HFConnector.prefill`` returns them in)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), logits_to_keep=1)
        logits = out.logits[:, -1:].float()
    return logits, time.perf_counter() - t0


def _store_config(store_dir: Path | None, config_file: str | None) -> StoreConfig:
    """Defaults ← config file ← environment ← ``store_dir``, as the other CLI commands."""
    from kvcache.kvstore.config import KVCacheConfig

    config = KVCacheConfig.load(config_file).store
    return config if store_dir is None else config.with_dir(store_dir)


def run_demo(
    store_dir: Path | None,
    *,
    requests: int = DEFAULT_REQUESTS,
    seed: int = 0,
    config_file: str | None = None,
) -> dict[str, Any]:
    """Run the workload against the store at ``store_dir`` (None: the configured one).

    Returns the JSON-able summary: ``ttft_cold_s`` / ``ttft_warm_s`` (mean per request),
    ``reused_tokens`` (total), ``max_abs_logit_diff``, ``hits_by_tier`` (chunks), and
    one row per request under ``"requests"``.
    """
    from kvcache.connectors.hf import HFConnector
    from kvcache.kvstore.tiered_store import TieredStore

    if requests <= 0:
        raise ValueError(f"requests must be > 0, got {requests}")
    config = _store_config(store_dir, config_file)
    model, model_id = _model(seed)
    workload = _workload(requests, seed)
    # First-call overheads (allocator growth, kernel selection) belong to neither side.
    _full_prefill(model, workload[0][1])

    rows: list[dict[str, Any]] = []
    hits: dict[str, int] = {}
    max_diff = 0.0
    with TieredStore.open(config) as store:
        connector = HFConnector(model, store, chunk_size=config.chunk_size, model_id=model_id)
        for kind, ids in workload:
            ref, cold_s = _full_prefill(model, ids)
            res = connector.prefill(ids)
            diff = float((res.logits - ref).abs().max())
            max_diff = max(max_diff, diff)
            for tier, n in res.hits_by_tier.items():
                hits[tier] = hits.get(tier, 0) + n
            rows.append(
                {
                    "kind": kind,
                    "prompt_tokens": len(ids),
                    "reused_tokens": res.reused_tokens,
                    "computed_tokens": res.computed_tokens,
                    "ttft_cold_s": cold_s,
                    "ttft_warm_s": res.ttft_s,
                    "store_s": res.store_s,  # after the first token: not part of TTFT
                    "hits_by_tier": res.hits_by_tier,
                    "max_abs_logit_diff": diff,
                }
            )
    cold = sum(r["ttft_cold_s"] for r in rows) / len(rows)
    warm = sum(r["ttft_warm_s"] for r in rows) / len(rows)
    return {
        "store_dir": str(config.dir),
        "model_id": model_id,
        "chunk_size": config.chunk_size,
        "num_requests": len(rows),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "reused_tokens": sum(r["reused_tokens"] for r in rows),
        "computed_tokens": sum(r["computed_tokens"] for r in rows),
        "ttft_cold_s": cold,
        "ttft_warm_s": warm,
        "speedup": cold / warm if warm > 0 else None,
        "store_s": sum(r["store_s"] for r in rows) / len(rows),
        "max_abs_logit_diff": max_diff,
        "hits_by_tier": hits,
        "requests": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report of ``run_demo``'s result."""
    lines = [
        f"kvcache demo: {result['model_id']}, chunk {result['chunk_size']} tokens, "
        f"store {result['store_dir']}",
        f"{'#':>3} {'kind':<8} {'prompt':>6} {'reused':>6} {'computed':>8} "
        f"{'cold ms':>8} {'warm ms':>8}  hits",
    ]
    for i, r in enumerate(result["requests"], 1):
        where = ", ".join(f"{t} {n}" for t, n in sorted(r["hits_by_tier"].items())) or "-"
        lines.append(
            f"{i:>3} {r['kind']:<8} {r['prompt_tokens']:>6} {r['reused_tokens']:>6} "
            f"{r['computed_tokens']:>8} {1e3 * r['ttft_cold_s']:>8.1f} "
            f"{1e3 * r['ttft_warm_s']:>8.1f}  {where}"
        )
    speedup = result["speedup"]
    hits = ", ".join(f"{t} {n}" for t, n in sorted(result["hits_by_tier"].items())) or "none"
    lines += [
        f"TTFT per request: full prefill {1e3 * result['ttft_cold_s']:.1f} ms, "
        f"with reuse {1e3 * result['ttft_warm_s']:.1f} ms"
        + (f" ({speedup:.1f}x)" if speedup else ""),
        f"reused {result['reused_tokens']} of {result['prompt_tokens']} prompt tokens; "
        f"chunk hits: {hits}",
        f"max |logit difference| vs full prefill: {result['max_abs_logit_diff']:.2e}",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``kvcache demo [--store DIR] [--json]``."""
    store = getattr(args, "store", None)
    requests = getattr(args, "requests", None) or DEFAULT_REQUESTS
    where = Path(store) if store else None
    config_file = getattr(args, "config", None)
    if getattr(args, "blend", False):
        from kvcache.tools import demo_blend

        result = demo_blend.run_blend_demo(where, requests=requests, config_file=config_file)
        table = demo_blend.format_table
    else:
        result = run_demo(where, requests=requests, config_file=config_file)
        table = format_table
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store directory (default: the configured one)")
    parser.add_argument("--config", help="config file, .toml or .yaml")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--blend", action="store_true", help="the blending demo")
    sys.exit(main(parser.parse_args()))
