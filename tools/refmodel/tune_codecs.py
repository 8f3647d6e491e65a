"""Choose codec defaults on the fidelity set's tuning split — never on the evaluation split.

``python -m kvcache.tools.refmodel.tune_codecs [--json] [--quick]`` sweeps, on the
reference model and the served windows of ``codec_fidelity``:

- ``cachegen``'s layer-group allocation (``EARLY_MULT``: the key step of the first
  ``EARLY_FRACTION`` of the layers relative to the rest; ``V_MULT``: the value step
  relative to the key step), each at several base steps, so allocations compare at equal
  bits (KL interpolated log-log at ``TARGET_BITS``);
- the base step of the default level (``LEVEL_STEPS[DEFAULT_LEVEL]``) under the current
  allocation;
- ``quant`` int4 group sizes, beside ``quant-int8`` and ``fp8`` (what the model resolves at
  8 bits).

Every point is scored with all planes coded and with the copy circuit's hand-set planes
exact. The constants are set on the ``cachegen`` module for the duration of one point
only (the codec reads them when it encodes; the steps it used are stored in each object,
so decoding does not depend on them). Prints the points; choosing among them is left to
the person changing a default, who records the choice in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from kvcache.codecs import cachegen
from kvcache.codecs.base import Codec
from kvcache.codecs.quant import QuantCodec
from kvcache.codecs.registry import get_codec
from kvcache.connectors.hf import layout_from_hf_config
from kvcache.kvstore.layout import KVLayout
from kvcache.tools.refmodel.codec_fidelity import (
    ServedWindow,
    prepare_windows,
    run_codec,
    summarize,
)
from kvcache.tools.refmodel.fidelity_set import load_fidelity_set

EARLY_MULTS = (0.35, 0.5, 0.7, 1.0)
V_MULTS = (1.0, 1.6, 2.5)
ALLOCATION_STEPS = (0.5, 0.7, 1.0)
LEVEL_STEP_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
QUANT_GROUPS = (32, 64, 128)
# int8 per-token is 8 + 32/64 = 8.5 bits on the reference model: 4x smaller is 2.125 bits;
# allocations are compared at 4.5x (some room for other text to code larger).
TARGET_BITS = 1.9


@contextmanager
def cachegen_constants(**values: Any) -> Iterator[None]:
    """Set ``cachegen`` module constants (``EARLY_MULT``, ``V_MULT``, ``LEVEL_STEPS``...)
    for the duration of the block."""
    old = {k: getattr(cachegen, k) for k in values}
    try:
        for k, v in values.items():
            setattr(cachegen, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(cachegen, k, v)


def _point(name: str, codec: Codec, windows: list[ServedWindow], layout: KVLayout,
           model: Any, **extra: Any) -> dict[str, Any]:
    rec = summarize(run_codec(name, codec, windows, layout, model, repeat=1), layout)
    e = rec["excl_circuit"]
    return {"name": name, **extra, "bits": rec["bits_per_element"],
            "ratio_vs_int8": rec["ratio_vs_int8"],
            "kl": rec["next_token_kl"], "kl_ci90": rec["next_token_kl_ci90"],
            "top1": rec["top1_agreement"], "top1_ci90": rec["top1_agreement_ci90"],
            "kl_excl": e["next_token_kl"], "top1_excl": e["top1_agreement"],
            "top1_excl_ci90": e["top1_agreement_ci90"]}


def _at_bits(points: list[dict[str, Any]], key: str, bits: float) -> float | None:
    """``key`` interpolated log-log at ``bits`` between the nearest points around it."""
    pts = sorted((p["bits"], p[key]) for p in points if p[key] > 0)
    for (b0, y0), (b1, y1) in itertools.pairwise(pts):
        if b0 <= bits <= b1 and b1 > b0:
            t = (math.log(bits) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return None


def sweep(quick: bool = False) -> dict[str, Any]:
    """Every point of the sweep on the tuning split (see the module docstring)."""
    from kvcache.tools.refmodel import load_reference_model, reference_model_id

    torch.set_num_threads(1)
    model, _ = load_reference_model()
    fset = load_fidelity_set("tune", quick=quick)
    layout = layout_from_hf_config(model.config, torch.bfloat16, reference_model_id())
    wins = prepare_windows(model, fset)
    level = cachegen.DEFAULT_LEVEL
    allocations = []
    for em in EARLY_MULTS:
        for vm in V_MULTS:
            pts = []
            for step in ALLOCATION_STEPS:
                with cachegen_constants(EARLY_MULT=em, V_MULT=vm,
                                        LEVEL_STEPS={**cachegen.LEVEL_STEPS, level: step}):
                    pts.append(_point(f"cachegen em={em} vm={vm} step={step}",
                                      cachegen.CacheGenCodec(level), wins, layout, model,
                                      early_mult=em, v_mult=vm, step=step))
            allocations.append({
                "early_mult": em, "v_mult": vm, "points": pts,
                f"kl_at_{TARGET_BITS}_bits": _at_bits(pts, "kl", TARGET_BITS),
                f"kl_excl_at_{TARGET_BITS}_bits": _at_bits(pts, "kl_excl", TARGET_BITS),
            })
    steps = []
    for step in LEVEL_STEP_CANDIDATES:
        with cachegen_constants(LEVEL_STEPS={**cachegen.LEVEL_STEPS, level: step}):
            steps.append(_point(f"cachegen-{level} step={step}", cachegen.CacheGenCodec(level),
                                wins, layout, model, step=step))
    quant = [_point(f"quant int4 g{g}", QuantCodec(4, g), wins, layout, model, group=g)
             for g in QUANT_GROUPS]
    quant += [_point(n, get_codec(n), wins, layout, model) for n in ("quant-int8", "fp8")]
    return {
        "split": "tune",
        "fidelity_set": fset.describe(),
        "current": {"LEVEL_STEPS": cachegen.LEVEL_STEPS, "EARLY_FRACTION": cachegen.EARLY_FRACTION,
                    "EARLY_MULT": cachegen.EARLY_MULT, "V_MULT": cachegen.V_MULT},
        "target_bits": TARGET_BITS,
        "allocations": allocations,
        "level_steps": steps,
        "quant": quant,
    }


def format_sweep(r: dict[str, Any]) -> str:
    t = r["target_bits"]
    lines = [f"split {r['split']} ({r['fidelity_set']['set_hash']}, "
             f"{r['fidelity_set']['windows']} windows); current {r['current']}", "",
             f"allocation: KL at {t} bits (all planes / circuit planes exact)"]
    for a in sorted(r["allocations"], key=lambda a: a[f"kl_at_{t}_bits"] or math.inf):
        kl, kle = a[f"kl_at_{t}_bits"], a[f"kl_excl_at_{t}_bits"]
        lines.append(f"  early_mult {a['early_mult']:<5} v_mult {a['v_mult']:<4} "
                     f"{kl if kl is None else f'{kl:.2e}'} / "
                     f"{kle if kle is None else f'{kle:.2e}'}")
    lines += ["", "points: bits  x int8  KL  top-1 [90%]  |  circuit planes exact: KL  top-1"]
    for p in r["level_steps"] + r["quant"]:
        lo, hi = p["top1_ci90"]
        lines.append(f"  {p['name']:<24} {p['bits']:5.2f} {p['ratio_vs_int8']:5.2f}x "
                     f"{p['kl']:.2e} {p['top1']:.3f} [{lo:.3f}, {hi:.3f}]  |  "
                     f"{p['kl_excl']:.2e} {p['top1_excl']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = sweep(quick=args.quick)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_sweep(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
