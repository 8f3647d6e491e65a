"""A real vLLM engine on CPU with kvcache's connector, for the tests in this folder.

Models are tiny Llamas with random weights written as HF checkpoints; prompts are token ids
(no tokenizer). ``python -m tests.vllm.engine SPEC`` runs one engine in a fresh process
and prints its outputs as JSON (a restart, another engine instance, vLLM's multi-process
mode).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BLOCK = 32
CHUNK = 64


def write_model(path: Path, dtype: str = "float32", layers: int = 3) -> Path:
    """A random Llama checkpoint (4 query heads, 2 KV heads of 64, vocab 1000)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").exists():
        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def prompts(n: int = 3, lengths: tuple[int, ...] = (300, 200, 451), seed: int = 1
            ) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


@dataclass
class Spec:
    """One engine: the model, whether kvcache is on and with which options."""

    model: str
    dtype: str = "float32"
    kvcache: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    prefix_caching: bool = False
    multiprocessing: bool = False  # vLLM's default: engine core (and workers) in processes
    prompts: list[list[int]] = field(default_factory=list)
    max_tokens: int = 8
    transfer: dict[str, Any] = field(default_factory=dict)  # KVTransferConfig fields
    tensor_parallel: int = 1  # > 1: a worker process per rank ("mp" executor)


def make_llm(spec: Spec) -> Any:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.multiprocessing else "0"
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = {}
    if spec.kvcache:
        fields = {"kv_connector": "KVCacheConnector",
                  "kv_connector_module_path": "kvcache.connectors.vllm",
                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute", **spec.transfer,
                  "kv_connector_extra_config": {"store.chunk_size": CHUNK, **spec.options}}
        kw["kv_transfer_config"] = KVTransferConfig(**fields)
    workers = spec.multiprocessing or spec.tensor_parallel > 1
    return LLM(model=spec.model, skip_tokenizer_init=True, dtype=spec.dtype, block_size=BLOCK,
               enforce_eager=True, max_model_len=1024, enable_prefix_caching=spec.prefix_caching,
               distributed_executor_backend="mp" if workers else "uni",
               tensor_parallel_size=spec.tensor_parallel, seed=0, **kw)


@dataclass
class Outputs:
    tokens: list[list[int]]
    logprobs: list[list[float]]  # of each chosen token
    cached: list[int]  # vLLM's num_cached_tokens: local prefix cache + kvcache


def generate(llm: Any, token_prompts: list[list[int]], max_tokens: int = 8) -> Outputs:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], sp,
                        use_tqdm=False)
    tokens, logprobs = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids,
                                                                   strict=True)])
    return Outputs(tokens, logprobs, [int(o.num_cached_tokens or 0) for o in outs])


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    llm = make_llm(spec)
    out = generate(llm, spec.prompts, spec.max_tokens)
    shutdown(llm)
    print("OUTPUTS " + json.dumps(asdict(out)), flush=True)


if __name__ == "__main__":
    main()
