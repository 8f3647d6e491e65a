"""Codec fidelity on the reference model, measured on served windows of the fidelity set.

For each window (``fidelity_set.Window``): prefill its ``CONTEXT`` tokens, take their KV as
bf16 (the dtype engines store) and cut it into ``CHUNK_TOKENS``-token chunks, as the store
keeps it. A codec encodes and decodes every chunk on its own, told the positions its keys
were rotated at (``rope_start`` = the chunk's offset), as the store does. The decoded
chunks, put back together, are scored against the bf16 KV with ``kvcache.tools.fidelity``
(so bf16 rounding is not counted as codec error) on the window's continuation, twice:

- **all planes**: the whole decoded cache;
- **circuit planes exact**: the same decoded cache with the copy circuit's hand-set planes
  (``hand_set.HAND_SET_KV_PLANES``) put back exact: the error of the trained planes alone.
  The bytes are the same (the whole chunk is coded either way).

Every figure is the mean over windows with a 90% bootstrap interval over windows
(``fidelity.bootstrap_interval``), overall and per domain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvcache.codecs.base import Codec
from kvcache.connectors.hf import cache_to_canonical, output_cache
from kvcache.kvstore.layout import KVLayout
from kvcache.tools.fidelity import (
    FidelityResult,
    bootstrap_interval,
    continuation_logits,
    measure_fidelity,
)
from kvcache.tools.refmodel.fidelity_set import CHUNK_TOKENS, FidelitySet
from kvcache.tools.refmodel.hand_set import keep_planes_exact

CONFIDENCE = 0.9


@dataclass(frozen=True)
class ServedWindow:
    """A window's exact KV as the store holds it, and the exact continuation logits."""

    domain: str
    context: torch.Tensor  # [T] token ids
    continuation: torch.Tensor  # [C] token ids
    exact: torch.Tensor  # [layers, 2, T, kv_heads, head_dim] bf16
    exact_logits: torch.Tensor  # [C, vocab]

    def chunks(self) -> list[tuple[int, torch.Tensor]]:
        """``(start, [layers, 2, CHUNK_TOKENS, kv_heads, head_dim])`` per served chunk."""
        return [(s, self.exact[:, :, s : s + CHUNK_TOKENS].contiguous())
                for s in range(0, self.exact.shape[2], CHUNK_TOKENS)]


def prepare_windows(model: Any, fset: FidelitySet) -> list[ServedWindow]:
    out = []
    for w in fset.windows:
        ctx, cont = w.context_tensor(), w.continuation_tensor()
        with torch.no_grad():
            cache = output_cache(model(ctx[None], use_cache=True))
        exact = cache_to_canonical(cache, 0, ctx.shape[0]).to(torch.bfloat16)
        out.append(ServedWindow(w.domain, ctx, cont, exact,
                                continuation_logits(model, exact, cont)))
    return out


@dataclass
class CodecRun:
    """One codec over every window: sizes, best-of-N times, per-window fidelity."""

    name: str
    domains: list[str] = field(default_factory=list)
    raw_bytes: int = 0
    enc_bytes: int = 0
    numel: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    full: list[FidelityResult] = field(default_factory=list)
    excl: list[FidelityResult] = field(default_factory=list)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """``fn()``'s result and its best time of ``repeat`` runs (seconds)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def stored_bytes(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> int:
    """Every byte an object stores: all tensors plus the JSON params."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + len(
        json.dumps(params, separators=(",", ":")))


def score(model: Any, win: ServedWindow, decoded: torch.Tensor
          ) -> tuple[FidelityResult, FidelityResult]:
    """(all planes, circuit planes exact) fidelity of ``decoded``
    ``[layers, 2, T, kv_heads, head_dim]`` against the window's bf16 KV."""

    def one(kv: torch.Tensor) -> FidelityResult:
        return measure_fidelity(model, win.context, win.continuation, kv,
                                exact=win.exact, exact_logits=win.exact_logits)

    return one(decoded), one(keep_planes_exact(decoded, win.exact))


def run_codec(name: str, codec: Codec, windows: Sequence[ServedWindow], layout: KVLayout,
              model: Any, repeat: int, *, tell_rope: bool = True) -> CodecRun:
    """Encode + decode every served chunk of every window; score each window.

    tell_rope: pass each chunk's ``rope_start`` (its offset) as the store does; False
    withholds it (cachegen then codes keys after RoPE)."""
    run = CodecRun(name)
    for win in windows:
        parts = []
        for start, chunk in win.chunks():
            rope_start = start if tell_rope else None
            (tensors, params), te = timed(
                lambda: codec.encode(chunk, layout, rope_start=rope_start), repeat  # noqa: B023
            )
            out, td = timed(
                lambda: codec.decode(tensors, params, layout, chunk.shape[2]),  # noqa: B023
                repeat,
            )
            parts.append(out)
            run.enc_bytes += stored_bytes(tensors, params)
            run.raw_bytes += chunk.numel() * chunk.element_size()
            run.numel += chunk.numel()
            run.enc_s += te
            run.dec_s += td
        full, excl = score(model, win, torch.cat(parts, 2))
        run.domains.append(win.domain)
        run.full.append(full)
        run.excl.append(excl)
    return run


def figures(results: Sequence[FidelityResult]) -> dict[str, Any]:
    """Means over windows with their bootstrap intervals (``<key>_ci90``)."""
    per_window = {
        "next_token_kl": [r.kl_mean for r in results],
        "top1_agreement": [r.top1_agreement for r in results],
        "loss_gap": [r.bpb_gap for r in results],
        "k_nmse": [r.k_nmse_mean for r in results],
        "v_nmse": [r.v_nmse_mean for r in results],
    }
    out: dict[str, Any] = {}
    for key, xs in per_window.items():
        out[key] = sum(xs) / len(xs)
        out[f"{key}_ci90"] = list(bootstrap_interval(xs, confidence=CONFIDENCE))
    return out


def _domain_figures(run: CodecRun, results: Sequence[FidelityResult]) -> dict[str, Any]:
    out = {}
    for d in dict.fromkeys(run.domains):
        sel = [r for r, dom in zip(results, run.domains, strict=True) if dom == d]
        f = figures(sel)
        out[d] = {k: f[k] for k in ("next_token_kl", "next_token_kl_ci90",
                                    "top1_agreement", "top1_agreement_ci90")}
    return out


def summarize(run: CodecRun, layout: KVLayout) -> dict[str, Any]:
    """The bench record of one codec: sizes, speeds, fidelity (all planes at the top level,
    ``excl_circuit``: circuit planes exact), per domain (``by_domain``). Keys starting with
    ``_`` are for the bench's own arithmetic."""
    bpe = run.enc_bytes * 8 / run.numel
    int8_bits = 8 + 32 / layout.head_dim
    codec, _, level = run.name.partition("-")
    rec: dict[str, Any] = {
        "codec": codec if codec in ("cachegen", "quant") and level.isdigit() else run.name,
        "level": level if level.isdigit() else None,
        "name": run.name,
        "bits_per_element": bpe,
        "ratio_vs_bf16": 16 / bpe,
        "ratio_vs_int8": int8_bits / bpe,
        "encode_mb_s": run.raw_bytes / run.enc_s / 1e6 if run.enc_s else None,
        "decode_mb_s": run.raw_bytes / run.dec_s / 1e6 if run.dec_s else None,
        **figures(run.full),
        "excl_circuit": figures(run.excl),
        "by_domain": {"all_planes": _domain_figures(run, run.full),
                      "excl_circuit": _domain_figures(run, run.excl)},
        "_raw_bytes": run.raw_bytes, "_enc_bytes": run.enc_bytes, "_dec_s": run.dec_s,
        "_kl": [r.kl_mean for r in run.full], "_kl_excl": [r.kl_mean for r in run.excl],
        "_top1": [r.top1_agreement for r in run.full],
        "_top1_excl": [r.top1_agreement for r in run.excl],
    }
    return rec
