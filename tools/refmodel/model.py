"""The reference model's architecture and its checkpoint format (no training code here).

A transformers ``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU and grouped-query attention
(2 KV heads for 4 query heads, head_dim 64 like most served models). Weights are stored in
bfloat16 (half the bytes of float32) and upcast to float32 when loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from kvcache.tools.refmodel.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOG_FILE = "training_log.json"
# Training and evaluation sequence length: long enough for > 256-token copying.
SEQ_LEN = 1024


def reference_config() -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2 * SEQ_LEN,
        # Llama 3's base: half of the RoPE pairs turn by < 1 radian over the context, room
        # for the copy circuit's content match (copy_circuit.py).
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        attention_bias=False,
        mlp_bias=False,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A freshly initialised float32 model (draws from torch's global RNG: seed first)."""
    from transformers import LlamaForCausalLM

    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def save_checkpoint(model: LlamaForCausalLM, out: Path, log: dict[str, Any]) -> None:
    """Write weights (bfloat16), config.json and the training log into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # lm_head is tied to the embedding: store it once.
    state = {
        k: v.detach().to(torch.bfloat16).contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    model.config.to_json_file(str(out / CONFIG_FILE))
    (out / LOG_FILE).write_text(json.dumps(log, indent=2) + "\n")


def weights_digest(directory: Path) -> str:
    return hashlib.blake2b((directory / WEIGHTS_FILE).read_bytes(), digest_size=8).hexdigest()


def load_checkpoint(directory: Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The model in ``directory`` in eval mode, weights upcast to ``dtype``. No network."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"no reference checkpoint at {weights}; train one with `kvcache refmodel train`"
        )
    config = LlamaConfig.from_json_file(str(directory / CONFIG_FILE))
    model = build_model(config)
    state = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to embed_tokens; anything else missing is a broken checkpoint.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(
            f"checkpoint {weights} does not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.tie_weights()
    # transformers wraps ``to`` in a decorator mypy cannot see through.
    cast(Any, model).to(dtype)
    return model.eval()
