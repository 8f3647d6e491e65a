"""``kvcache bench codecs``: every codec and level on KV from the reference model.

Fidelity is measured on the evaluation split of the fidelity set
(``kvcache.tools.refmodel.fidelity_set``: Python code, English documentation and C/C++
headers shipped with kvcache's dependencies, text the model was not trained on; codec
defaults are chosen on its separate tuning split, ``--split tune``). Each window is 1024
tokens of KV stored as four 256-token bf16 chunks, each encoded and decoded on its own,
then the next 64 tokens are scored on the exact and on the decoded cache
(``kvcache.tools.refmodel.codec_fidelity``): next-token KL(exact || decoded), top-1
agreement, the continuation-loss gap and K/V NMSE, each a mean over windows with a 90%
bootstrap interval over windows, with all planes coded and with the copy circuit's
hand-set planes kept exact. Sizes count every stored byte: all tensors plus the JSON
params. Baselines in the same run: bf16 (16 bits), int8 per-token (``8 + 32 / head_dim``
bits: an fp16 scale and zero per token and head), ``raw`` for load bandwidth, a plain
file read for the disk "link".

Without the reference checkpoint the bench runs on a randomly initialised model of the
same shape and says so (fidelity figures are then not meaningful). LMCache's CacheGen runs
in a separate virtualenv (``--lmcache-python PATH`` or ``$KVCACHE_LMCACHE_PYTHON``; build
one with ``tools/lmcache_venv.sh DIR``) as a subprocess
(``tools/lmcache_cachegen_runner.py``) on the same chunks, exchanging safetensors and JSON
files; its decoded KV is scored with the same code as ours; it is skipped with a note when
no interpreter is given. ``anchor_delta``: CacheGen's anchor/delta token groups built from
our ``cachegen`` codec, beside plain ``cachegen`` at equal NMSE.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcache.codecs.base import Codec
from kvcache.codecs.cachegen import DEFAULT_LEVEL
from kvcache.codecs.registry import get_codec
from kvcache.codecs.zstd import ZstdCodec
from kvcache.connectors.hf import layout_from_hf_config
from kvcache.kernels import cpu_native
from kvcache.kernels.rope_shift import rope_reference
from kvcache.kvstore.config import ENV_LMCACHE_PYTHON
from kvcache.kvstore.layout import KVLayout, RopeSpec
from kvcache.tools.cold_cache import evict
from kvcache.tools.fidelity import bootstrap_interval
from kvcache.tools.refmodel.codec_fidelity import (
    CodecRun,
    ServedWindow,
    prepare_windows,
    run_codec,
    score,
    stored_bytes,
    summarize,
    timed,
)
from kvcache.tools.refmodel.fidelity_set import CHUNK_TOKENS, CONTINUATION, SPLITS
from kvcache.tools.refmodel.hand_set import HAND_SET_KV_PLANES
from kvcache.tools.synthetic_kv import synthetic_kv

LINKS_GBIT = {"1gbit": 1.0, "10gbit": 10.0, "100gbit": 100.0}
CODECS = [
    "raw", "zstd", "quant-int8", "quant", "quant-int4-hadamard", "quant-int2", "fp8",
    *[f"cachegen-{i}" for i in range(1, 7)], "cachegen-rans",
]
ANCHOR_GROUP = 10  # CacheGen's token group size
# Goals on the evaluation split (BENCHMARKS.md): the default cachegen level >= 4x smaller
# than int8 per-token at top-1 >= 0.97; >= 20% fewer bytes than LMCache's CacheGen at <= its
# KL (circuit planes exact); quant int4 top-1 >= 0.99.
GOAL_CACHEGEN_VS_INT8, GOAL_CACHEGEN_TOP1 = 4.0, 0.97
GOAL_VS_LMCACHE_BYTES = 0.8
GOAL_QUANT_TOP1 = 0.99


def _model(notes: list[str]) -> tuple[Any, str]:
    from kvcache.tools.refmodel import load_reference_model, reference_model_id

    try:
        model, _ = load_reference_model()
        return model, reference_model_id()
    except Exception as e:  # no checkpoint yet: same shape, random weights
        from kvcache.tools.refmodel.model import build_model, reference_config

        torch.manual_seed(0)
        notes.append(f"reference checkpoint unavailable ({e}); fidelity is on random weights")
        return build_model(reference_config()).eval(), "random-init-refmodel-shape"


def _disk_read_gbps(nbytes: int) -> float:
    """Plain sequential read of ``nbytes`` from the temp dir's disk, page cache dropped."""
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR")) as f:
        block = os.urandom(1 << 20)
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        evict(f.name)
        t = time.perf_counter()
        with open(f.name, "rb", buffering=0) as r:
            while r.read(4 << 20):
                pass
        return max(1, nbytes >> 20) * (1 << 20) / (time.perf_counter() - t) / 1e9


def _effective_bw(records: list[dict[str, Any]], links_gbps: dict[str, float]) -> None:
    """``raw_bytes / (encoded_bytes / link + decode_time)``, and its ratio to raw's."""
    raw = next(r for r in records if r["name"] == "raw")
    for r in records:
        eff, vs = {}, {}
        for link, gbps in links_gbps.items():
            bps = gbps * 1e9 / 8 if link != "disk" else gbps * 1e9
            e = r["_raw_bytes"] / (r["_enc_bytes"] / bps + r["_dec_s"])
            base = raw["_raw_bytes"] / (raw["_enc_bytes"] / bps + raw["_dec_s"])
            eff[link], vs[link] = e / 1e9, e / base
        r["effective_bw_gb_s"], r["effective_bw_vs_raw"] = eff, vs


def lmcache_python(explicit: str | Path | None = None) -> Path | None:
    """The LMCache venv's interpreter: ``explicit`` (``--lmcache-python``), else
    ``$KVCACHE_LMCACHE_PYTHON``, else None (the side-by-side is skipped)."""
    if explicit is not None and str(explicit):
        return Path(explicit)
    env = os.environ.get(ENV_LMCACHE_PYTHON)
    return Path(env) if env else None


def _lmcache(windows: list[ServedWindow], model: Any, layout: KVLayout, notes: list[str],
             python: Path | None = None) -> dict[str, Any] | None:
    """LMCache's CacheGen on the same served chunks, scored as ours; None (with a note)
    when no LMCache interpreter is given or it fails."""
    python = python if python is not None else lmcache_python()
    runner = Path(__file__).with_name("lmcache_cachegen_runner.py")
    if python is None:
        notes.append("LMCache side-by-side skipped: no LMCache interpreter given (build its "
                     "venv with tools/lmcache_venv.sh DIR, then pass --lmcache-python "
                     f"DIR/bin/python or set {ENV_LMCACHE_PYTHON})")
        return None
    if not python.exists():
        notes.append(f"LMCache side-by-side skipped: no interpreter at {python} (build the "
                     "venv with tools/lmcache_venv.sh DIR)")
        return None
    from safetensors.torch import load_file, save_file

    chunks = [c for w in windows for _, c in w.chunks()]
    with tempfile.TemporaryDirectory() as d:
        save_file({f"chunk{i}": c for i, c in enumerate(chunks)}, f"{d}/in.st")
        proc = subprocess.run([str(python), str(runner), d], capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode:
            notes.append(f"LMCache side-by-side failed: {proc.stderr.strip()[-500:]}")
            return None
        info = json.loads(Path(d, "out.json").read_text())
        decoded = load_file(f"{d}/out.st")
    run = CodecRun("lmcache-cachegen", raw_bytes=info["raw_bytes"],
                   enc_bytes=info["encoded_bytes"], numel=sum(c.numel() for c in chunks),
                   enc_s=info["encode_s"], dec_s=info["decode_s"])
    i = 0
    for w in windows:
        n = len(w.chunks())
        kv = torch.cat([decoded[f"chunk{j}"] for j in range(i, i + n)], 2)
        i += n
        full, excl = score(model, w, kv.to(torch.bfloat16))
        run.domains.append(w.domain)
        run.full.append(full)
        run.excl.append(excl)
    rec = summarize(run, layout)
    rec["codec"] = "lmcache-cachegen"
    rec["note"] = info.get("note")
    return rec


def _paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of ``a - b`` over the same windows, with its bootstrap interval."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {"mean": sum(d) / len(d), "ci90": list(bootstrap_interval(d))}


def _goals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation-split goals, each with the figures that decide it."""
    by = {r["name"]: r for r in records}
    default = by[f"cachegen-{DEFAULT_LEVEL}"]
    out: dict[str, Any] = {
        "cachegen_default": {
            "level": DEFAULT_LEVEL, "ratio_vs_int8": default["ratio_vs_int8"],
            "top1": default["top1_agreement"], "top1_ci90": default["top1_agreement_ci90"],
            "top1_excl_circuit": default["excl_circuit"]["top1_agreement"],
            "top1_excl_circuit_ci90": default["excl_circuit"]["top1_agreement_ci90"],
            "met": default["ratio_vs_int8"] >= GOAL_CACHEGEN_VS_INT8
            and default["top1_agreement"] >= GOAL_CACHEGEN_TOP1,
        },
        "quant_int4": {
            "top1": by["quant"]["top1_agreement"], "top1_ci90": by["quant"]["top1_agreement_ci90"],
            "top1_excl_circuit": by["quant"]["excl_circuit"]["top1_agreement"],
            "fp8_top1": by["fp8"]["top1_agreement"],
            "quant_int8_top1": by["quant-int8"]["top1_agreement"],
            "met": by["quant"]["top1_agreement"] >= GOAL_QUANT_TOP1,
        },
    }
    lm = by.get("lmcache-cachegen")
    if lm is not None:
        levels = []
        for r in records:
            if r["codec"] != "cachegen" or r["level"] is None:
                continue
            kl_diff = _paired(r["_kl_excl"], lm["_kl_excl"])
            levels.append({
                "name": r["name"], "bytes_vs_lmcache": r["_enc_bytes"] / lm["_enc_bytes"],
                "kl_excl_circuit": r["excl_circuit"]["next_token_kl"],
                "kl_excl_minus_lmcache": kl_diff,
                "kl_all_planes_minus_lmcache": _paired(r["_kl"], lm["_kl"]),
                "top1_excl_minus_lmcache": _paired(r["_top1_excl"], lm["_top1_excl"]),
            })
        # the smallest level whose KL (circuit planes exact) is at most LMCache's
        ok = [x for x in levels if x["kl_excl_minus_lmcache"]["mean"] <= 0]
        best = min(ok, key=lambda x: x["bytes_vs_lmcache"]) if ok else None
        out["vs_lmcache"] = {
            "lmcache_kl_excl_circuit": lm["excl_circuit"]["next_token_kl"],
            "lmcache_kl_excl_circuit_ci90": lm["excl_circuit"]["next_token_kl_ci90"],
            "levels": levels,
            "smallest_level_at_or_below_its_kl": None if best is None else best["name"],
            "met": best is not None and best["bytes_vs_lmcache"] <= GOAL_VS_LMCACHE_BYTES,
        }
    return out


def _anchor_delta_study(chunks: list[torch.Tensor], layout: KVLayout,
                        group: int = ANCHOR_GROUP) -> list[dict[str, Any]]:
    """CacheGen's anchor/delta tokens, built from the ``cachegen`` codec itself: per level,
    the anchors (every ``group``-th token) are encoded as a chunk; the other tokens are
    encoded as their difference from their group's *decoded* anchor. Sizes count both
    objects in full. Compared with plain ``cachegen`` at equal NMSE (plain's bits
    interpolated, log-log, between its levels)."""
    from kvcache.codecs.cachegen import CacheGenCodec

    rows = []
    for level in CacheGenCodec.levels:
        codec = CacheGenCodec(level)
        plain_b = delta_b = 0
        plain_e = delta_e = ref = 0.0
        for chunk in chunks:
            T = chunk.shape[2]
            t, p = codec.encode(chunk, layout)
            plain_b += stored_bytes(t, p)
            plain_e += float(((codec.decode(t, p, layout, T).float() - chunk.float()) ** 2).sum())
            ref += float((chunk.float() ** 2).sum())
            anchors = chunk[:, :, ::group].contiguous()
            ta, pa = codec.encode(anchors, layout)
            base = codec.decode(ta, pa, layout, anchors.shape[2]).float()
            base = base.repeat_interleave(group, 2)[:, :, :T]
            rest = torch.ones(T, dtype=torch.bool)
            rest[::group] = False
            resid = (chunk.float() - base)[:, :, rest].to(chunk.dtype).contiguous()
            tr, pr = codec.encode(resid, layout)
            out = base.clone()  # anchors: their decoded value
            out[:, :, rest] += codec.decode(tr, pr, layout, resid.shape[2]).float()
            delta_b += stored_bytes(ta, pa) + stored_bytes(tr, pr)
            delta_e += float(((out - chunk.float()) ** 2).sum())
        numel = sum(c.numel() for c in chunks)
        rows.append({"level": level, "plain_bits": plain_b * 8 / numel, "plain_nmse": plain_e / ref,
                     "delta_bits": delta_b * 8 / numel, "delta_nmse": delta_e / ref})
    for r in rows:
        r["plain_bits_at_delta_nmse"] = _interp_bits(rows, r["delta_nmse"])
    return rows


def _interp_bits(rows: list[dict[str, Any]], nmse: float) -> float | None:
    """Plain cachegen's bits/element at ``nmse`` (log-log between neighbouring levels)."""
    pts = sorted((math.log(r["plain_nmse"]), math.log(r["plain_bits"])) for r in rows)
    x = math.log(nmse)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1 and x1 > x0:
            return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return None


# The served shape: Llama-3-8B (32 layers, 8 KV heads of 128, RoPE theta 500000), one
# 256-token chunk (32 MiB).
LLAMA_LAYOUT = KVLayout("llama-3-8b-shaped", num_layers=32, num_kv_heads=8, head_dim=128,
                        dtype="bfloat16", rope=RopeSpec(theta=500000.0))
LOAD_CODECS = ("cachegen", "cachegen-1", "cachegen-rans", "quant")


def _llama_chunk() -> torch.Tensor:
    """256 tokens of synthetic KV of ``LLAMA_LAYOUT`` (32 MiB), keys rotated at positions
    0..255 as an engine's are."""
    big = synthetic_kv(LLAMA_LAYOUT, 256)
    assert LLAMA_LAYOUT.rope is not None
    big[:, 0] = rope_reference(big[:, 0], 0, LLAMA_LAYOUT.rope)
    return big


def _served_chunk_load(disk_gbps: float, repeat: int) -> list[dict[str, Any]]:
    """Load of one Llama-3-8B-sized chunk from local disk per codec: read the encoded bytes
    at the measured disk bandwidth, then decode into a reused buffer (how the layer loader
    and the store decode); ``raw`` is the read alone. One and two decode threads.

    The KV is synthetic (heavy-tailed, outlier channels, a sink token: ``synthetic_kv``):
    tiling the reference model's small KV up to this size would repeat byte strings that
    zstd's match finder exploits, flattering the sizes. Its keys are rotated at positions
    0..255 as an engine's would be, and the store says so (``rope_start=0``): cachegen's
    decode includes turning its pre-RoPE keys back."""
    big = _llama_chunk()
    raw_bytes = big.numel() * big.element_size()
    raw_s = raw_bytes / (disk_gbps * 1e9)
    out = torch.empty_like(big)
    recs = [{"codec": "raw", "threads": 1, "bits_per_element": 16.0, "decode_ms": 0.0,
             "load_ms": raw_s * 1e3, "effective_gb_s": disk_gbps, "vs_raw": 1.0}]
    for name in LOAD_CODECS:
        codec = get_codec(name)
        tensors, params = codec.encode(big, LLAMA_LAYOUT, rope_start=0)
        enc = stored_bytes(tensors, params)
        into = getattr(codec, "decode_into", None)
        for threads in (1, 2) if into is not None else (1,):
            fn: Callable[[], Any] = (
                functools.partial(into, tensors, params, LLAMA_LAYOUT, big.shape[2],
                                  range(big.shape[0]), out, threads=threads)
                if into is not None
                else functools.partial(codec.decode, tensors, params, LLAMA_LAYOUT,
                                       big.shape[2])
            )
            _, dec_s = timed(fn, repeat)
            load_s = enc / (disk_gbps * 1e9) + dec_s
            recs.append({"codec": name, "threads": threads,
                         "bits_per_element": enc * 8 / big.numel(), "decode_ms": dec_s * 1e3,
                         "load_ms": load_s * 1e3, "effective_gb_s": raw_bytes / load_s / 1e9,
                         "vs_raw": raw_s / load_s,
                         # the disk speed at which this codec loads as fast as raw: slower
                         # disks favour the codec, faster ones raw
                         "raw_equal_disk_gb_s": (raw_bytes - enc) / dec_s / 1e9})
    return recs


def _gpu_decode(repeat: int) -> list[dict[str, Any]]:
    """On a CUDA GPU: the Llama-3-8B-shaped chunk (as in ``_served_chunk_load``) decoded
    into GPU memory, in GB/s of bf16 output. ``cachegen-rans`` from a GPU-resident object:
    the Triton kernel alone (tables and factors prepared), and all of ``decode_into``
    (validation and tables on the CPU, escapes, the keys' rotation); ``cachegen`` (Huffman)
    decodes on the CPU and copies its output, its only way onto a GPU. Empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    from kvcache.codecs.cachegen import _Factors
    from kvcache.kernels import rans

    big = _llama_chunk()
    T, L = big.shape[2], big.shape[0]
    out = torch.empty(big.shape, dtype=big.dtype, device="cuda")
    raw_bytes = big.numel() * big.element_size()

    def cuda_timed(fn: Callable[[], Any]) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    recs = []
    for name in ("cachegen-rans", "cachegen"):
        codec = get_codec(name)
        tensors, params = codec.encode(big, LLAMA_LAYOUT, rope_start=0)
        on_gpu = {k: v.cuda() for k, v in tensors.items()} if name == "cachegen-rans" \
            else tensors
        into = codec.decode_into
        s = cuda_timed(lambda: into(on_gpu, params, LLAMA_LAYOUT, T, range(L), out))  # noqa: B023
        recs.append({"codec": name, "stage": "decode_into", "decode_ms": s * 1e3,
                     "gb_s": raw_bytes / s / 1e9})
        if name == "cachegen-rans":
            p = codec._parse(on_gpu, params, LLAMA_LAYOUT, T)
            f = _Factors.of(p, range(L))
            assert p.rans is not None
            planes = list(range(2 * L))
            C, n = p.H * p.D, T * p.H * p.D
            words, states, offsets, first, ns = p.rans.selection(planes)
            args = (words, states, offsets, first, ns, p.rans.steps,
                    torch.from_numpy(rans.lut_of(p.rans.freq)).cuda(),
                    f.mu.reshape(2 * L, C).cuda(), f.k_delta.cuda(), f.v_delta[..., 0].cuda(),
                    p.D, out.view(2 * L, n))
            s = cuda_timed(lambda: rans.decode_dequant(*args))  # noqa: B023
            recs.append({"codec": name, "stage": "kernel", "decode_ms": s * 1e3,
                         "gb_s": raw_bytes / s / 1e9})
    return recs




def run(quick: bool = False, split: str = "eval",
        lmcache_python_path: str | Path | None = None) -> dict[str, Any]:
    """split: ``"eval"`` (the figures to report) or ``"tune"`` (where defaults are
    chosen); lmcache_python_path: the LMCache venv's interpreter (else
    ``$KVCACHE_LMCACHE_PYTHON``; neither: no side-by-side)."""
    from kvcache.tools.refmodel.fidelity_set import load_fidelity_set

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # On a shared machine one thread keeps timings stable (torch's intra-op
    # pool degrades badly when the cores are busy) and is the per-stream figure anyway.
    torch.set_num_threads(1)
    notes: list[str] = []
    model, model_id = _model(notes)
    fset = load_fidelity_set(split, quick=quick)
    layout = layout_from_hf_config(model.config, torch.bfloat16, model_id)  # its RoPE too
    wins = prepare_windows(model, fset)
    chunks = [c for w in wins for _, c in w.chunks()]
    repeat = 2 if quick else 3
    codecs: list[tuple[str, Codec]] = [(n, get_codec(n)) for n in CODECS]
    codecs.insert(2, ("zstd-noshuffle", ZstdCodec(shuffle=False)))
    records = [summarize(run_codec(n, c, wins, layout, model, repeat), layout)
               for n, c in codecs]
    # the default level with keys coded after RoPE, as before format 3: what pre-RoPE buys
    records.append(summarize(run_codec("cachegen-keys-after-rope", get_codec("cachegen"),
                                       wins, layout, model, repeat, tell_rope=False), layout))
    lm = _lmcache(wins, model, layout, notes, lmcache_python(lmcache_python_path))
    if lm is not None:
        records.append(lm)
    goals = _goals(records)
    anchor_delta = _anchor_delta_study(chunks, layout)
    disk = _disk_read_gbps((64 if quick else 256) << 20)
    _effective_bw(records, {**LINKS_GBIT, "disk": disk})
    served = _served_chunk_load(disk, 3 if quick else 10)
    gpu = _gpu_decode(3 if quick else 10)
    for r in records:
        for k in [k for k in r if k.startswith("_")]:
            del r[k]
    shape = f"{len(wins)}x{len(chunks) // len(wins)}x{CHUNK_TOKENS} tok"
    rows = []
    for r in records:
        goal_ratio = GOAL_CACHEGEN_VS_INT8 if r["name"] == f"cachegen-{DEFAULT_LEVEL}" else None
        rows.append({"figure": "size vs int8/token", "shape": shape,
                     "variant": r["name"], "unit": "bits/elem", "value": r["bits_per_element"],
                     "baseline": "int8 per-token", "baseline_value": 8 + 32 / layout.head_dim,
                     "ratio": r["ratio_vs_int8"], "goal": goal_ratio})
        lo, hi = r["top1_agreement_ci90"]
        goal_top1 = {f"cachegen-{DEFAULT_LEVEL}": GOAL_CACHEGEN_TOP1,
                     "quant": GOAL_QUANT_TOP1}.get(r["name"])
        rows.append({"figure": f"top-1 agreement ({split} split)", "shape": shape,
                     "variant": f"{r['name']} [90%: {lo:.3f}-{hi:.3f}]", "unit": "fraction",
                     "value": r["top1_agreement"], "baseline": "exact cache",
                     "baseline_value": 1.0, "ratio": r["top1_agreement"], "goal": goal_top1})
        rows.append({"figure": "disk load bw vs raw", "shape": shape,
                     "variant": r["name"], "unit": "GB/s",
                     "value": r["effective_bw_gb_s"]["disk"], "baseline": "raw",
                     "baseline_value": records[0]["effective_bw_gb_s"]["disk"],
                     "ratio": r["effective_bw_vs_raw"]["disk"], "goal": None})
    for r in served[1:]:
        rows.append({"figure": "Llama-3-8B chunk disk load vs raw", "shape": "32 MiB",
                     "variant": f"{r['codec']}, {r['threads']} thread(s)", "unit": "GB/s",
                     "value": r["effective_gb_s"], "baseline": "raw",
                     "baseline_value": served[0]["effective_gb_s"], "ratio": r["vs_raw"],
                     "goal": 1.0 if r["codec"] == "cachegen" else None})
    for r in gpu:
        rows.append({"figure": "Llama-3-8B chunk GPU decode", "shape": "32 MiB",
                     "variant": f"{r['codec']}, {r['stage']}", "unit": "GB/s",
                     "value": r["gb_s"], "baseline": "goal", "baseline_value": 50.0,
                     "ratio": r["gb_s"] / 50.0, "goal": 50.0 if r["stage"] == "kernel"
                     else None})
    for a in anchor_delta:
        if a["plain_bits_at_delta_nmse"] is not None:
            rows.append({"figure": "anchor/delta bits at equal NMSE", "shape": shape,
                         "variant": f"level {a['level']}",
                         "unit": "bits/elem", "value": a["delta_bits"],
                         "baseline": "plain cachegen", "baseline_value":
                         a["plain_bits_at_delta_nmse"],
                         "ratio": a["delta_bits"] / a["plain_bits_at_delta_nmse"], "goal": None})
    return {
        "benchmark": "codecs",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"hostname": platform.node(), "cpu": platform.processor() or "?",
                    "cpus": os.cpu_count()},
        "method": {
            "kv": f"{model_id}: {split} split of the fidelity set ({fset.set_hash}), "
                  f"{len(wins)} windows of {len(chunks) // len(wins)} bf16 chunks of "
                  f"{CHUNK_TOKENS} tokens, each coded on its own; fidelity over the next "
                  f"{CONTINUATION} tokens",
            "intervals": "mean over windows, 90% percentile bootstrap over windows "
                         "(2000 resamples, seed 0)",
            "excl_circuit": "the same decoded cache with the copy circuit's hand-set planes "
                            "(layer, K/V, KV head) "
                            f"{', '.join(map(str, HAND_SET_KV_PLANES))} put back exact; "
                            "bytes unchanged",
            "sizes": "all tensors + JSON params; int8 per-token = 8 + 32/head_dim bits",
            "rope": "codecs are told each chunk's key positions (rope_start = its offset), "
                    "as the store does; cachegen codes keys before RoPE "
                    "(cachegen-keys-after-rope: not told). The anchor/delta study codes "
                    "keys as given on both sides",
            "timing": "best of N, one thread, CPU; decode = whole chunk",
            "disk": f"plain sequential read, page cache dropped: {disk:.2f} GB/s",
            "served_chunk": "synthetic heavy-tailed KV of Llama-3-8B's shape (32 MiB); load "
                            "= encoded bytes at the disk bandwidth + decode into a reused "
                            "buffer (quant: fresh output), best of N",
            "cpu_decode_kernel": "native C" if cpu_native.library() is not None
                                 else "torch (no C compiler)",
        },
        "fidelity_set": fset.describe(),
        "notes": notes,
        "goals": goals,
        "rows": rows,
        "records": records,
        "anchor_delta": anchor_delta,
        "served_chunk_load": served,
        "gpu_decode": gpu,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m kvcache.tools.bench_codecs``: the bench with its own options."""
    from kvcache.tools.bench import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one window per domain")
    p.add_argument("--split", choices=SPLITS, default="eval",
                   help="fidelity set split: eval (report) or tune (choose defaults)")
    p.add_argument("--lmcache-python", metavar="PATH",
                   help=f"LMCache venv interpreter (default: ${ENV_LMCACHE_PYTHON}); build one "
                        "with tools/lmcache_venv.sh DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", metavar="DIR", type=Path, help="also draw a PNG plot into DIR")
    args = p.parse_args(argv)
    result = run(quick=args.quick, split=args.split, lmcache_python_path=args.lmcache_python)
    if args.out is not None:
        path = plot(result, args.out)
        result["plot"] = None if path is None else str(path)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0


def plot(result: dict[str, Any], out_dir: Path) -> Path | None:
    """Bits per element against fidelity (next-token KL, top-1 agreement with its 90%
    interval) for every codec and level, with all planes coded (solid) and with the copy
    circuit's hand-set planes exact (dashed), to ``out_dir/bench-codecs.png``."""
    from kvcache.tools.bench import pyplot

    plt = pyplot(result)
    if plt is None:
        return None
    recs = [r for r in result["records"] if r.get("top1_agreement") is not None]
    fig, (ax_kl, ax_top1) = plt.subplots(1, 2, figsize=(13.0, 5.0))
    families = sorted({r["codec"] for r in recs})
    palette = plt.get_cmap("tab20").colors  # more families than the default 10 colours
    for i, fam in enumerate(families):
        pts = sorted((r for r in recs if r["codec"] == fam), key=lambda r: r["bits_per_element"])
        xs = [r["bits_per_element"] for r in pts]
        color = palette[(2 * i) % 20 + (2 * i) // 20 % 2]
        # KL of a lossless codec is 0: plot it at a floor so the log axis can show it.
        ax_kl.plot(xs, [max(r["next_token_kl"], 1e-7) for r in pts], "o-", color=color,
                   label=fam)
        ax_kl.plot(xs, [max(r["excl_circuit"]["next_token_kl"], 1e-7) for r in pts], "o--",
                   color=color, alpha=0.6)
        top1 = [r["top1_agreement"] for r in pts]
        err = [[t - r["top1_agreement_ci90"][0] for t, r in zip(top1, pts, strict=True)],
               [r["top1_agreement_ci90"][1] - t for t, r in zip(top1, pts, strict=True)]]
        ax_top1.errorbar(xs, top1, yerr=err, fmt="o-", color=color, capsize=2, label=fam)
        ax_top1.plot(xs, [r["excl_circuit"]["top1_agreement"] for r in pts], "o--",
                     color=color, alpha=0.6)
        for r in pts:
            tag = str(r.get("level") or "")
            ax_top1.annotate(tag, (r["bits_per_element"], r["top1_agreement"]), fontsize=7)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("next-token KL vs exact (nats, log; 1e-7 = lossless)")
    ax_top1.set_ylabel("top-1 agreement with exact (90% interval)")
    for ax in (ax_kl, ax_top1):
        ax.set_xlabel("bits per element, all metadata included")
        ax.grid(alpha=0.3)
    ax_top1.axhline(GOAL_CACHEGEN_TOP1, color="gray", linestyle="dashed", linewidth=0.8)
    ax_top1.legend(fontsize=8)
    fig.suptitle(f"kvcache bench codecs — {result.get('date', '')} — "
                 f"{result.get('method', {}).get('kv', '')[:90]} — dashed: circuit planes exact",
                 fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench-codecs.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
