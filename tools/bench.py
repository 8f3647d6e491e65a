"""``kvcache bench NAME [--json] [--quick] [--out DIR]``: run one benchmark, print, plot.

Each benchmark is a module with ``run(quick: bool) -> dict``, registered by name in
``BENCHMARKS`` and imported only when it runs. The dict it returns is JSON-ready and has:

- ``benchmark`` (its name), ``date``, ``machine`` (dict), ``method`` (dict of how each
  figure was measured), ``notes`` (list of str);
- ``rows``: one dict per figure with ``figure``, ``shape``, ``variant`` (or None),
  ``unit``, ``value``, ``baseline``, ``baseline_value``, ``ratio`` and ``goal`` (or None),
  so that this module can print every figure beside its baseline and plot the ratios
  without knowing the benchmark;
- any headline keys the benchmark documents (e.g. ``cpu_get_vs_copy``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from kvcache.kvstore.errors import KVCacheError

# name -> module that implements it; add new benchmarks here.
BENCHMARKS: dict[str, str] = {
    "store": "kvcache.tools.bench_store",
    "transfer": "kvcache.tools.bench_transfer",
    "codecs": "kvcache.tools.bench_codecs",
    "remote": "kvcache.tools.bench_remote",
    "e2e": "kvcache.tools.bench_e2e",
    "blend": "kvcache.tools.bench_blend",
    "sglang": "kvcache.tools.bench_sglang",
}


def load(name: str) -> ModuleType:
    """The module of benchmark ``name``; raises ``KVCacheError`` listing the known names."""
    module = BENCHMARKS.get(name)
    if module is None:
        raise KVCacheError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(BENCHMARKS))}"
        )
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in ("redis", "hiredis"):
            raise
        raise KVCacheError(
            f"`kvcache bench {name}` compares with redis-server and needs redis-py: "
            "pip install 'kvcache[redis]'") from None


# Options a benchmark takes beyond ``quick``: CLI flag -> keyword of its ``run``.
OPTIONS: dict[str, dict[str, str]] = {
    "store": {"--store": "store", "--drop-caches": "drop_caches"},
    "codecs": {"--split": "split", "--lmcache-python": "lmcache_python_path"},
    "transfer": {},
    "remote": {"--duration": "duration"},
    "e2e": {"--dtype": "dtype"},
    "blend": {},
    "sglang": {},
}


def run(name: str, quick: bool = False, **options: Any) -> dict[str, Any]:
    """Run benchmark ``name``; ``options`` (``OPTIONS[name]``'s keywords) go to its ``run``."""
    module = load(name)
    known = set(OPTIONS.get(name, {}).values())
    unknown = sorted(set(options) - known)
    if unknown:
        flags = {kw: flag for opts in OPTIONS.values() for flag, kw in opts.items()}
        raise KVCacheError(
            f"{', '.join(flags.get(k, k) for k in unknown)} does not apply to "
            f"`kvcache bench {name}`; it takes: "
            f"{', '.join(OPTIONS.get(name, {})) or 'no options but --quick'}"
        )
    result: dict[str, Any] = module.run(quick=quick, **options)
    return result


# -- presentation ----------------------------------------------------------------------------


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: dict[str, Any]) -> str:
    """Every figure beside its baseline and their ratio, then method notes (or the
    benchmark's own table, if its module has ``format_table(result)``)."""
    module = BENCHMARKS.get(result.get("benchmark", ""))
    own = getattr(importlib.import_module(module), "format_table", None) if module else None
    if own is not None:
        table: str = own(result)
        return table
    headers = ["FIGURE", "SHAPE", "VARIANT", "GB/S", "BASELINE", "BASE GB/S", "RATIO", "GOAL"]
    cells = [headers]
    for r in result["rows"]:
        goal = r.get("goal")
        verdict = "" if goal is None else (" ok" if r["ratio"] >= goal else " MISS")
        cells.append([
            r["figure"], r["shape"], r.get("variant") or "", _num(r["value"]), r["baseline"],
            _num(r["baseline_value"]), _num(r["ratio"]),
            "" if goal is None else f">= {goal:.2f}{verdict}",
        ])
    right = {3, 5, 6}
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in cells
    ]
    m = result.get("machine", {})
    out = [
        f"kvcache bench {result['benchmark']}  {result.get('date', '')}  "
        f"{m.get('hostname', '')}: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, "
        f"{m.get('memory_gib', '?')} GiB, {m.get('workdir_fs', '?')} on "
        f"{m.get('workdir_device', '?')}",
        "",
        *lines,
    ]
    method = result.get("method", {})
    if method:
        out.append("")
        out += [f"{k}: {v}" for k, v in method.items() if isinstance(v, str)]
    profile = result.get("profile_gbps")
    if profile:
        out.append("")
        out.append("steps on warm memory (GB/s): "
                   + ", ".join(f"{k} {v:.2f}" for k, v in profile.items()))
    for note in result.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


def pyplot(result: dict[str, Any]) -> Any:
    """matplotlib's pyplot on a headless backend, or None (with a note in
    ``result["notes"]``) when matplotlib is not installed: it is deliberately not a
    dependency of kvcache (``pip install matplotlib`` to get plots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        result.setdefault("notes", []).append(
            "plot skipped: matplotlib is not installed (pip install matplotlib)"
        )
        return None
    return plt


def plot(result: dict[str, Any], out_dir: Path) -> Path | None:
    """The benchmark's own plot if its module has one (``plot(result, out_dir)``), else a
    bar chart of every ratio with its goal, to ``out_dir/bench-<name>.png``."""
    own = getattr(load(result["benchmark"]), "plot", None)
    if own is not None:
        path: Path | None = own(result, out_dir)
        return path
    plt = pyplot(result)
    if plt is None:
        return None
    rows = [r for r in result["rows"] if r.get("ratio") is not None]  # None: not available
    labels = [
        f"{r['figure']}\n{r['shape']}" + (f" [{r['variant']}]" if r.get("variant") else "")
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(rows)), 6.0))
    colors = ["tab:green" if r.get("goal") is None or r["ratio"] >= r["goal"] else "tab:red"
              for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [r["ratio"] for r in rows], color=colors)
    for x, r in zip(xs, rows, strict=True):
        if r.get("goal") is not None:
            ax.hlines(r["goal"], x - 0.4, x + 0.4, colors="black", linestyles="dashed")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ratio to baseline (same run)")
    ax.set_title(f"kvcache bench {result['benchmark']} — {result.get('date', '')} "
                 "(dashed: goal)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{result['benchmark']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- entry point -----------------------------------------------------------------------------


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark options given on the command line (unset ones left out)."""
    given = {
        "store": None if getattr(args, "store", None) is None else Path(args.store),
        "drop_caches": getattr(args, "drop_caches", False) or None,
        "split": getattr(args, "split", None),
        "lmcache_python_path": getattr(args, "lmcache_python", None),
        "duration": getattr(args, "duration", None),
        "dtype": getattr(args, "dtype", None),
    }
    return {k: v for k, v in given.items() if v is not None}


def main(args: argparse.Namespace) -> int:
    result = run(args.name, quick=args.quick, **_options(args))
    if args.out is not None:
        path = plot(result, Path(args.out))
        result["plot"] = None if path is None else str(path)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
        if result.get("plot"):
            print(f"plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path)
    p.add_argument("--store", type=Path)
    p.add_argument("--drop-caches", action="store_true")
    p.add_argument("--split", choices=("eval", "tune"))
    p.add_argument("--lmcache-python", type=Path)
    p.add_argument("--duration", type=float)
    sys.exit(main(p.parse_args()))
