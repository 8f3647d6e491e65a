"""A hand-set copy (induction) circuit, installed into the reference model before training.

Why: long-range copying is what makes KV reuse hard to get right (a blended or lossy chunk
is harmful exactly where later tokens attend back into it), but gradient descent did not
find it within the training budget (15 minutes on 2 cores; the attempts are recorded in
docs/reference-model.md). So the circuit that trained LLMs grow — a previous-token head
feeding an induction head — is written into the weights, held fixed, and everything else
(~92% of the parameters) is trained around it.

The circuit lives in reserved residual dimensions and in head 0 of layers 0 and 1:

- ``BIAS_DIM``: a constant ``BIAS`` in every token's embedding, a position-only signal (like
  the massive constant activations of trained LLMs) that lets layer 0 attend by offset.
- ``CODE_DIMS``: a fixed random unit code per token (``CODE`` dims).
- ``PREV_DIMS`` / ``CURR_DIMS``: written only by the circuit's layer-0 heads.

Layer 0, KV head 0 (shared by query heads 0 and 1): key = a constant vector from
``BIAS_DIM``, value = the token's code. Query head 0 attends to tokens ``i-1, i-2, i-3``
with weights ``WINDOW`` and writes their codes' weighted sum into ``PREV_DIMS``; query
head 1 does the same for ``i, i-1, i-2`` into ``CURR_DIMS``. Their queries are fitted
numerically against the model's own RoPE so the pattern holds at every position up to
``max_position_embeddings``.

Layer 1, KV head 0 / query head 0 (the induction head): key = ``PREV_DIMS`` placed on the
slowest RoPE pairs (which turn by less than a radian over the 1024-token training context,
so the match is by content, not distance), query = ``CURR_DIMS`` × ``MATCH_SCALE``:
position ``s`` scores highest where the three tokens before it equal the three tokens
ending at ``i``. Its value
is the code of token ``s``, written into ``CODE_DIMS``, where the tied unembedding turns it
into a higher logit for token ``s``: the next token after the earlier occurrence.

``install_copy_circuit`` writes all of this into a freshly built model and returns the
written entries; ``CopyCircuit.restore`` puts them back after each optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

CODE = 28
BIAS_DIM = 0
CODE_DIMS = list(range(1, 1 + CODE))
PREV_DIMS = list(range(1 + CODE, 1 + 2 * CODE))
CURR_DIMS = list(range(1 + 2 * CODE, 1 + 3 * CODE))
RESERVED_DIMS = [BIAS_DIM, *CODE_DIMS, *PREV_DIMS, *CURR_DIMS]
BIAS = 4.0
# Attention weights on the three tokens a layer-0 head reads (nearest first).
WINDOW = (0.4, 0.3, 0.3)
# Nats per unit of <CURR, PREV>: a full three-token match scores 0.34 * 40 = 13.6 nats, two
# of three 10, one 6.4. Sharper matching copies more surely but makes the model's output
# hinge on small errors in the cached keys (see fit_offset_query).
MATCH_SCALE = 40.0
# Cached K/V magnitudes of the circuit's heads, moved between key and query (value and
# output) by powers of two — the function is the same — so that the cached planes have RMS
# like the trained heads' (K ~1, V ~0.2). Without this the induction head's keys were 20x
# smaller than its neighbour's, and any error scaled to a layer's RMS (a codec's step,
# noise) hit them 20x harder than a trained head's.
KEY_GAIN_0 = 2.0
KEY_GAIN_1 = 16.0
VALUE_GAIN_1 = 2.0
# Context lengths the positional fit checks (softmax over keys 0..L-1).
_FIT_LENGTHS = (4, 8, 16, 64, 256, 1024, 2048)


@dataclass
class CopyCircuit:
    """The circuit's entries: per parameter name, a bool mask and the values under it."""

    masks: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        """Write the circuit back (after an optimizer step moved or decayed it)."""
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            params[name][mask] = self.values[name]

    def frozen_entries(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())


class _Recorder:
    """Sets parameter entries and remembers which ones were set."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.masks: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def set(self, name: str, index: tuple, value: torch.Tensor | float) -> None:
        p = self.params[name]
        p[index] = value
        mask = self.masks.setdefault(name, torch.zeros_like(p, dtype=torch.bool))
        mask[index] = True

    def circuit(self) -> CopyCircuit:
        values = {n: self.params[n].detach()[m].clone() for n, m in self.masks.items()}
        return CopyCircuit(masks=self.masks, values=values)


def rope_offset_design(config: LlamaConfig, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed key ``[head_dim]`` and ``X`` ``[N, head_dim]``: row ``d`` maps a query to
    its score against that key ``d`` positions back (``N = max_position_embeddings``)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    n = config.max_position_embeddings
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, n, head_dim), torch.arange(n)[None])
    cos, sin = cos[0], sin[0]
    half = head_dim // 2

    def rotate(v: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return v * c + torch.cat([-v[..., half:], v[..., :half]], -1) * s

    key = torch.zeros(head_dim)
    key[:half] = 1.0
    keys = rotate(key.expand(n, head_dim), cos, sin)  # [n, head_dim] at positions 0..n-1
    queries = rotate(torch.eye(head_dim), cos[n - 1], sin[n - 1])  # basis queries at n-1
    return key, (queries @ keys.T).T.flip(0)


def fit_offset_query(design: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
    """A query ``[head_dim]`` whose softmax over offsets puts ``weights`` on those offsets
    for every context length in ``_FIT_LENGTHS``: a weighted least-squares start (log
    weights in the window, -20 elsewhere), then a cross-entropy fit with Adam.

    The window's scores are also pinned to the log weights themselves: softmax ignores a
    common shift, but the real scores get multiplied by each token's normalised bias (which
    varies a little from token to token), so window scores far from 0 would turn that
    variation into large swings of the weights."""
    n = design.shape[0]
    target = torch.zeros(n)
    log_target = torch.full((n,), -20.0)
    row_weight = torch.ones(n)
    row_weight[:64] = 3.0  # the offsets next to the window are the hardest to push down
    for offset, w in weights.items():
        target[offset] = w
        log_target[offset] = math.log(w)
        row_weight[offset] = 30.0
    # Ridge terms keep the query small. A large one (a first version had norm 40) places the
    # window through fine cancellations between RoPE pairs, so small errors in the cached
    # keys (a lossy codec) move it: that model lost 10x more next-token agreement to int4
    # keys in these two heads than to int4 keys in all its trained heads together. The
    # price of the small norm is a softer window (~2% of the weight on each neighbour).
    a = design * row_weight[:, None]
    gram = a.T @ a + 10.0 * torch.eye(design.shape[1])
    start = torch.linalg.solve(gram, a.T @ (log_target * row_weight))
    query = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([query], lr=0.05)
    lengths = [m for m in _FIT_LENGTHS if m <= n]
    window = torch.tensor(sorted(weights))
    with torch.enable_grad():
        for _ in range(1500):
            scores = design @ query
            loss = sum(-(target[:m] * torch.log_softmax(scores[:m], 0)).sum() for m in lengths)
            loss = loss + 0.01 * (scores[window] - log_target[window]).pow(2).sum()
            loss = loss + 1e-3 * query.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return query.detach()


def slow_rope_dims(config: LlamaConfig, head_dim: int, count: int) -> list[int]:
    """The ``count`` head dims of the slowest-turning RoPE pairs (both halves of each), by
    the model's own rotary frequencies."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    half = head_dim // 2
    inv_freq = LlamaRotaryEmbedding(config).inv_freq  # [half]
    slow = torch.argsort(inv_freq)[: count // 2].tolist()
    return sorted(slow) + sorted(j + half for j in slow)


@torch.no_grad()
def install_copy_circuit(model: LlamaForCausalLM, seed: int = 0) -> CopyCircuit:
    """Write the circuit into ``model`` (a freshly initialised reference model)."""
    cfg = model.config
    hd = int(cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    if cfg.num_hidden_layers < 2 or hidden < len(RESERVED_DIMS) or hd < CODE:
        raise ValueError("the copy circuit needs >= 2 layers and room for its dimensions")
    if cfg.num_attention_heads // int(cfg.num_key_value_heads or 1) < 2:
        raise ValueError("the copy circuit needs two query heads per KV head")
    rec = _Recorder(model)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randn(cfg.vocab_size, CODE, generator=gen)
    codes = codes / codes.norm(dim=1, keepdim=True)
    emb = "model.embed_tokens.weight"
    rec.set(emb, (slice(None), BIAS_DIM), BIAS)
    rec.set(emb, (slice(None), CODE_DIMS), codes)
    rec.set(emb, (slice(None), PREV_DIMS + CURR_DIMS), 0.0)
    # RMSNorm divides by the root mean square of the embedding, dominated by BIAS and the
    # code; the free dims add their initial share (they grow a little in training).
    free = [d for d in range(hidden) if d not in RESERVED_DIMS]
    free_sq = float(rec.params[emb].detach()[:, free].pow(2).sum(1).mean())
    rms = math.sqrt((BIAS**2 + 1.0 + free_sq) / hidden)
    bias_normed = BIAS / rms
    code_normed = 1.0 / rms
    for layer in (0, 1):
        rec.set(f"model.layers.{layer}.input_layernorm.weight", (RESERVED_DIMS,), 1.0)

    # Layer 0: two offset heads on KV head 0.
    key, design = rope_offset_design(cfg, hd)
    w = WINDOW
    q_prev = fit_offset_query(design, {1: w[0], 2: w[1], 3: w[2]})
    q_curr = fit_offset_query(design, {0: w[0], 1: w[1], 2: w[2]})
    a0 = "model.layers.0.self_attn"
    all_cols = slice(None)
    rec.set(f"{a0}.k_proj.weight", (slice(0, hd), all_cols), 0.0)
    rec.set(f"{a0}.k_proj.weight", (slice(0, hd), BIAS_DIM), key * KEY_GAIN_0 / bias_normed)
    rec.set(f"{a0}.v_proj.weight", (slice(0, hd), all_cols), 0.0)
    eye = torch.eye(CODE)
    rec.set(f"{a0}.v_proj.weight", (slice(0, CODE), CODE_DIMS), eye / code_normed)
    # sdpa divides scores by sqrt(head_dim): the fitted scores are pre-scaled to undo it.
    q_scale = math.sqrt(hd) / bias_normed / KEY_GAIN_0
    rec.set(f"{a0}.q_proj.weight", (slice(0, 2 * hd), all_cols), 0.0)
    rec.set(f"{a0}.q_proj.weight", (slice(0, hd), BIAS_DIM), q_prev * q_scale)
    rec.set(f"{a0}.q_proj.weight", (slice(hd, 2 * hd), BIAS_DIM), q_curr * q_scale)
    o0 = f"{a0}.o_proj.weight"
    rec.set(o0, (slice(None), slice(0, 2 * hd)), 0.0)
    rec.set(o0, (PREV_DIMS, slice(0, CODE)), eye)
    rec.set(o0, (CURR_DIMS, slice(hd, hd + CODE)), eye)
    # Nothing else in layer 0 writes into the reserved dims, so layer 1 reads them clean.
    rec.set(o0, (RESERVED_DIMS, slice(2 * hd, None)), 0.0)
    rec.set("model.layers.0.mlp.down_proj.weight", (RESERVED_DIMS, all_cols), 0.0)

    # Layer 1: the induction head (query head 0 on KV head 0).
    a1 = "model.layers.1.self_attn"
    slow = slow_rope_dims(cfg, hd, CODE)
    for name in ("k_proj", "q_proj", "v_proj"):
        rec.set(f"{a1}.{name}.weight", (slice(0, hd), all_cols), 0.0)
    for j in range(CODE):
        rec.set(f"{a1}.k_proj.weight", (slow[j], PREV_DIMS[j]), rms * KEY_GAIN_1)
        q_gain = MATCH_SCALE * rms * math.sqrt(hd) / KEY_GAIN_1
        rec.set(f"{a1}.q_proj.weight", (slow[j], CURR_DIMS[j]), q_gain)
    rec.set(f"{a1}.v_proj.weight", (slice(0, CODE), CODE_DIMS), eye * rms * VALUE_GAIN_1)
    o1 = f"{a1}.o_proj.weight"
    rec.set(o1, (slice(None), slice(0, hd)), 0.0)
    rec.set(o1, (CODE_DIMS, slice(0, CODE)), eye / VALUE_GAIN_1)
    return rec.circuit()
