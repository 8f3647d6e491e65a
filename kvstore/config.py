"""The typed configuration tree: defaults ← file (TOML/YAML) ← ``KVCACHE_*`` environment.

Every section is a dataclass whose ``__post_init__`` coerces and validates its fields, so a
config object that exists is a valid one, however it was built. Coercion is driven by the
field annotations (plus ``metadata={"unit": "size" | "duration"}``), which lets files,
environment variables and code all pass human strings ("8GiB", "1h", "true") and get int
bytes, float seconds and bools. Errors name the key path and what to write instead.

The environment map is derived from the fields: store fields are ``KVCACHE_<FIELD>``
(``KVCACHE_DIR``, ``KVCACHE_CHUNK_SIZE``), tier fields ``KVCACHE_<TIER>_<FIELD>``
(``KVCACHE_CPU_CAPACITY``), top-level fields ``KVCACHE_<FIELD>`` (``KVCACHE_LOG_LEVEL``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kvcache.codecs.registry import codec_names
from kvcache.kvstore.errors import ConfigError
from kvcache.kvstore.eviction import policy_names
from kvcache.kvstore.units import GiB, parse_duration, parse_size

ENV_PREFIX = "KVCACHE_"
# Names under ENV_PREFIX that are not config fields but are still ours. Anything else
# under the prefix is rejected so a typo ("KVCACHE_CPU_CAPACTY") never goes unnoticed.
ENV_CONFIG_FILE = "KVCACHE_CONFIG"
ENV_NATIVE = "KVCACHE_NATIVE"  # 0: never compile/use the C kernels (kernels/cpu_native.py)
ENV_LMCACHE_PYTHON = "KVCACHE_LMCACHE_PYTHON"  # bench codecs: LMCache's venv interpreter
EXTRA_ENV_VARS: frozenset[str] = frozenset({ENV_CONFIG_FILE, ENV_NATIVE, ENV_LMCACHE_PYTHON})

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Strings that mean "unset" for optional fields (env vars cannot express null otherwise).
_NONE = {"", "none", "null", "auto"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

S = TypeVar("S", bound="_Section")


MIN_TIER_CAPACITY = 1 << 20  # below this a tier cannot hold one chunk of any real model
REMOTE_SCHEMES = ("http", "unix", "redis", "rediss", "redis+cluster")
TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def physical_memory() -> int | None:
    """Bytes of physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_store_dir() -> Path:
    """``$KVCACHE_DIR`` if set, else ``~/.cache/kvcache``."""
    env = os.environ.get(f"{ENV_PREFIX}DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvcache"


def _size(default: int) -> Any:
    return field(default=default, metadata={"unit": "size"})


def _choice(default: str, choices: Callable[[], Iterable[str]] | tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations (they are strings under ``from __future__``), cached."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, _Section)


def _coerce(value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` converted to annotation ``tp``; raises ConfigError without the key path."""
    base, optional = _split_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
        return None
    if value is None:
        raise ConfigError("must be set (null is not allowed here)")
    unit = meta.get("unit")
    if unit == "size":
        return parse_size(value)
    if unit == "duration":
        return parse_duration(value)
    if _is_section(base):
        if isinstance(value, base):
            return value
        if isinstance(value, Mapping):
            return base.from_dict(value)
        raise ConfigError(
            f"{base.PATH}: must be a table of keys ({', '.join(base.field_names())}), "
            f"got {type(value).__name__}"
        )
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        hint = "true, false or auto" if optional else "true or false"
        raise ConfigError(f"{value!r} is not a boolean; use {hint}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ConfigError(f"{value!r} is not an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{value!r} is not a number") from None
    if base is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value).expanduser()
        raise ConfigError(f"{value!r} is not a path")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{value!r} is not a string")
    raise TypeError(f"config field type {tp!r} has no coercion rule")  # a bug in this module


class _Section:
    """Base of every config dataclass: field coercion, validation, dict/env plumbing."""

    # Dotted path of the section in the tree, for error messages ("" at the top level).
    PATH: ClassVar[str] = ""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.PATH}.{name}" if cls.PATH else name

    @classmethod
    def field_names(cls) -> list[str]:
        return sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            raw = getattr(self, f.name)
            try:
                value = _coerce(raw, hints[f.name], f.metadata)
                choices = f.metadata.get("choices")
                if choices is not None:
                    known = list(choices() if callable(choices) else choices)
                    if value not in known:
                        raise ConfigError(f"{value!r} is not one of: {', '.join(known)}")
            except ConfigError as e:
                # Nested sections already name their own full path.
                msg = (
                    str(e)
                    if _is_section(_split_optional(hints[f.name])[0])
                    else (f"{self.key(f.name)}: {e}")
                )
                raise ConfigError(msg) from None
            setattr(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Checks beyond one field's type; subclasses raise ConfigError naming the key."""

    def _fail(self, name: str, problem: str) -> None:
        raise ConfigError(f"{self.key(name)}: {problem}")

    @classmethod
    def from_dict(cls: type[S], d: Mapping[str, Any]) -> S:
        """Build from a (possibly partial) mapping; unknown keys are errors."""
        if not isinstance(d, Mapping):
            where = cls.PATH or "the config"
            raise ConfigError(f"{where} must be a table of keys, got {type(d).__name__}")
        known = cls.field_names()
        kwargs: dict[str, Any] = {}
        for raw_key, value in d.items():
            # YAML and TOML users write both "chunk-size" and "chunk_size".
            name = str(raw_key).replace("-", "_")
            if name not in known:
                where = f"section '{cls.PATH}'" if cls.PATH else "the top level"
                raise ConfigError(
                    f"unknown config key {cls.key(str(raw_key))!r} in {where}"
                    f"{did_you_mean(name, known)}; known keys: {', '.join(known)}"
                )
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (paths as strings), nested by section."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out


@dataclass
class CpuTierConfig(_Section):
    """The CPU-memory tier: one preallocated pool per process."""

    PATH: ClassVar[str] = "store.cpu"

    capacity: int = _size(4 * GiB)
    codec: str = _choice("raw", codec_names)
    policy: str = _choice("lru", policy_names)
    # None: pin the pool when CUDA is available (pinning without CUDA only costs memory).
    pin_memory: bool | None = None

    def _validate(self) -> None:
        if self.capacity < MIN_TIER_CAPACITY:
            self._fail("capacity", f"{self.capacity} bytes is too small for a tier (at least "
                                   "1MiB); use e.g. '4GiB'")
        total = physical_memory()
        if total is not None and self.capacity > total:
            self._fail("capacity", f"{self.capacity} bytes is more than this machine's "
                                   f"{total} bytes of memory; use e.g. '4GiB'")


@dataclass
class DiskTierConfig(_Section):
    """The local-disk tier: an LMDB index with blobs in files or in LMDB."""

    PATH: ClassVar[str] = "store.disk"

    enabled: bool = True
    capacity: int = _size(64 * GiB)
    codec: str = _choice("raw", codec_names)
    policy: str = _choice("lru", policy_names)
    blob_storage: str = _choice("files", ("files", "lmdb"))
    # None: <store.dir>/disk. A relative path is relative to store.dir.
    path: Path | None = None

    def _validate(self) -> None:
        if self.capacity < MIN_TIER_CAPACITY:
            self._fail("capacity", f"{self.capacity} bytes is too small for a tier (at least "
                                   "1MiB); use e.g. '64GiB'")

    def resolved_path(self, store_dir: Path) -> Path:
        """Where the disk tier lives for a store at ``store_dir``."""
        return store_dir / (self.path if self.path is not None else "disk")


@dataclass
class RemoteTierConfig(_Section):
    """A tier below the disk, shared by many processes or nodes: the cache daemon
    (``http://host:port``, ``unix:///path/to.sock``) or Redis (``redis://host:port/db``,
    ``redis+cluster://host:port``). Unset ``url``: no remote tier. Remote tiers fail open:
    a server that is down or slow costs a miss within ``timeout``, never an error."""

    PATH: ClassVar[str] = "store.remote"
    url: str | None = None
    codec: str = _choice("raw", codec_names)
    # One request's whole budget, retries included.
    timeout: float = field(default=2.0, metadata={"unit": "duration"})
    retries: int = 1
    # Bearer token for the daemon (or a file holding it, mode 0600); Redis takes its
    # password in the URL (redis://:password@host:port/0).
    token: str | None = None
    token_file: Path | None = None
    tenant: str = "default"
    # Per-key expiry on the remote side; None: the store's ttl, else until evicted there.
    ttl: float | None = field(default=None, metadata={"unit": "duration"})

    def _validate(self) -> None:
        if self.url is not None:
            scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
            if scheme not in REMOTE_SCHEMES:
                self._fail("url", f"{self.url!r} is not a remote tier URL; use one of "
                                  + ", ".join(f"{s}://..." for s in REMOTE_SCHEMES))
        if self.timeout <= 0:
            self._fail("timeout", f"{self.timeout} must be > 0; use e.g. '2s'")
        if not 0 <= self.retries <= 10:
            self._fail("retries", f"{self.retries} must be between 0 and 10")
        if self.ttl is not None and self.ttl <= 0:
            self._fail("ttl", f"{self.ttl} must be > 0; use e.g. '1h', or leave it unset")
        if not TENANT_RE.match(self.tenant):
            self._fail("tenant", f"{self.tenant!r} must be 1-64 letters, digits, '.', '_', '-'")


@dataclass
class StoreConfig(_Section):
    """The tiered store: where it lives, how KV is chunked, how tiers are written."""

    PATH: ClassVar[str] = "store"

    dir: Path = field(default_factory=default_store_dir)
    chunk_size: int = 256
    # How prefix keys chain (kvstore/keys.py). "sglang": SGLang's page-hash chain over
    # pages of chunk_size tokens, so that vLLM and transformers share entries with an
    # SGLang engine (--page-size = chunk_size) using kvcache as its HiCache backend.
    key_scheme: str = _choice("kvcache", ("kvcache", "sglang"))
    write_mode: str = _choice("write-through", ("write-through", "write-back"))
    # Entries stored longer ago than this are misses (and removed); None: until evicted.
    ttl: float | None = field(default=None, metadata={"unit": "duration"})
    # Open the disk tier read-only: reads only, nothing written, removed or repaired there
    # (a read-only medium, or a process that must not change a shared store).
    readonly: bool = False
    cpu: CpuTierConfig = field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = field(default_factory=DiskTierConfig)
    remote: RemoteTierConfig = field(default_factory=RemoteTierConfig)

    def _validate(self) -> None:
        if self.chunk_size <= 0:
            self._fail("chunk_size", f"{self.chunk_size} must be > 0 tokens; the default is 256")
        if self.ttl is not None and self.ttl <= 0:
            self._fail("ttl", f"{self.ttl} must be > 0; use e.g. '1h', or leave it unset")

    @property
    def disk_path(self) -> Path:
        return self.disk.resolved_path(self.dir)

    def with_dir(self, store_dir: str | os.PathLike[str]) -> StoreConfig:
        """This config for the store at ``store_dir`` (what ``--store DIR`` means).

        A directory names a whole store, so an absolute ``disk.path`` configured for
        another store is dropped; a relative one is relative to the store and still applies.
        """
        disk = self.disk
        if disk.path is not None and disk.path.is_absolute():
            disk = dataclasses.replace(disk, path=None)
        return dataclasses.replace(self, dir=Path(store_dir).expanduser(), disk=disk)


@dataclass
class ServerConfig(_Section):
    """``kvcache serve``: the node's cache daemon (``docs/operations.md``)."""

    PATH: ClassVar[str] = "server"
    host: str = "127.0.0.1"
    port: int = 8470
    # A Unix socket to listen on as well (same-node clients; the shared-memory fast path).
    socket: Path | None = None
    # Bearer token for writes, pins, evictions and admin; or a file holding it (0600).
    token: str | None = None
    token_file: Path | None = None
    # "open": anyone who can connect may look up and read; "token": reads need it too.
    read_auth: str = _choice("open", ("open", "token"))
    max_body: int = _size(1 * GiB)
    max_batch: int = 1024
    # Requests one client address may have in flight at once (more get 429).
    max_client_requests: int = 64
    request_timeout: float = field(default=60.0, metadata={"unit": "duration"})
    # Leases pin chunks while a client reads them; one not renewed in time unpins.
    lease_ttl: float = field(default=30.0, metadata={"unit": "duration"})
    max_lease_ttl: float = field(default=600.0, metadata={"unit": "duration"})
    # Bytes each tenant may keep stored (its oldest entries go first); None: no quota.
    tenant_quota: int | None = field(default=None, metadata={"unit": "size"})

    def _validate(self) -> None:
        if not 0 <= self.port <= 65535:
            self._fail("port", f"{self.port} is not a TCP port (0-65535; 0 picks a free one)")
        for name in ("max_body", "max_batch", "max_client_requests"):
            if getattr(self, name) < 1:
                self._fail(name, f"{getattr(self, name)} must be >= 1")
        for name in ("request_timeout", "lease_ttl", "max_lease_ttl"):
            if getattr(self, name) <= 0:
                self._fail(name, f"{getattr(self, name)} must be > 0")
        if self.lease_ttl > self.max_lease_ttl:
            self._fail("lease_ttl", f"{self.lease_ttl} is above max_lease_ttl")
        if self.tenant_quota is not None and self.tenant_quota < MIN_TIER_CAPACITY:
            self._fail("tenant_quota", f"{self.tenant_quota} bytes is below 1MiB")


@dataclass
class ConnectorConfig(_Section):
    """The engine connectors (vLLM, SGLang, transformers): where an engine's KV goes and
    how long it may wait for it (``docs/architecture.md``, "Connectors")."""

    PATH: ClassVar[str] = "connector"
    # A ``kvcache serve`` daemon (http://host:port, unix:///path.sock): the engine's store is
    # that daemon alone, shared by every engine on the node (token, timeout and codec from
    # store.remote). Unset: an embedded store (store.cpu, store.disk, store.remote).
    server: str | None = None
    # Names the weights in every key; unset: the path or hub id the engine loaded.
    model_id: str | None = None
    # Reuse stored KV / store the KV of new prompts.
    load: bool = True
    save: bool = True
    # The longest a step waits for one layer of a load before it gives the load up and
    # lets the engine recompute those tokens.
    load_timeout: float = field(default=10.0, metadata={"unit": "duration"})
    # KV copied out of the engine and waiting to be encoded and stored. It is stored on
    # CPU time the engine leaves idle (a CPU engine's: once its steps pause); past half
    # of this, at once and at normal priority too; past all of it, new saves are skipped
    # (counted) so the engine never waits for the store.
    max_pending_saves: int = _size(1 * GiB)
    # "auto": read the engine's pages into canonical chunks where kvcache knows their
    # format, store them as they are otherwise; "opaque": always as they are (exact and
    # cheapest, but lossless codecs only and reusable only by the same page format).
    pages: str = _choice("auto", ("auto", "opaque"))
    # How a paged engine (vLLM) loads a hit. "sync": layer by layer inside the step that
    # computes the rest of the prompt (the load overlaps that compute; every request
    # batched into the step waits for it). "async": in the background while the engine
    # runs other requests; the request is scheduled once its KV is in (one step later).
    # "auto": async while the engine is running other requests, sync when it is idle.
    load_mode: str = _choice("auto", ("auto", "sync", "async"))

    def _validate(self) -> None:
        if self.server is not None:
            scheme = self.server.split("://", 1)[0] if "://" in self.server else ""
            if scheme not in ("http", "unix"):
                self._fail("server", f"{self.server!r} is not a daemon URL; use "
                                     "http://host:port or unix:///path/to.sock")
        if self.load_timeout <= 0:
            self._fail("load_timeout", f"{self.load_timeout} must be > 0; use e.g. '10s'")
        if self.max_pending_saves <= 0:
            self._fail("max_pending_saves", "must be > 0; use e.g. '1GiB'")


@dataclass
class KVCacheConfig(_Section):
    """The whole configuration. Build with ``load()`` unless you have a reason not to."""

    PATH: ClassVar[str] = ""

    store: StoreConfig = field(default_factory=StoreConfig, metadata={"env_prefix": ""})
    server: ServerConfig = field(default_factory=ServerConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    log_level: str = "INFO"

    def _validate(self) -> None:
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            self._fail("log_level", f"{self.log_level!r} is not one of: {', '.join(LOG_LEVELS)}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KVCacheConfig:
        """Read a ``.toml``, ``.yaml`` or ``.yml`` file over the defaults."""
        p = Path(path).expanduser()
        data = _read_config_file(p)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: KVCacheConfig | None = None
    ) -> KVCacheConfig:
        """``base`` (default: the defaults) with every ``KVCACHE_*`` variable applied."""
        environ = os.environ if environ is None else environ
        cfg = cls() if base is None else base
        env_map = env_vars()
        ours = sorted(k for k in environ if k.startswith(ENV_PREFIX))
        unknown = [k for k in ours if k not in env_map and k not in EXTRA_ENV_VARS]
        if unknown:
            known = sorted([*env_map, *EXTRA_ENV_VARS])
            raise ConfigError(
                f"unknown environment variable{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}{did_you_mean(unknown[0], known)}; "
                f"known: {', '.join(known)}"
            )
        for var in ours:
            if var in env_map:
                try:
                    cfg = _replace_at(cfg, env_map[var], environ[var])
                except ConfigError as e:
                    raise ConfigError(f"{var}={environ[var]!r}: {e}") from None
        return cfg

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> KVCacheConfig:
        """Defaults ← file (``path`` or ``$KVCACHE_CONFIG``) ← ``KVCACHE_*`` variables."""
        environ = os.environ if environ is None else environ
        if path is None:
            path = environ.get(ENV_CONFIG_FILE) or None
        base = cls.from_file(path) if path is not None else cls()
        return cls.from_env(environ, base=base)

    def with_overrides(self, overrides: Mapping[str, Any]) -> KVCacheConfig:
        """This config with ``overrides`` applied: nested tables
        (``{"store": {"cpu": {"capacity": "8GiB"}}}``) or dotted keys
        (``{"store.cpu.capacity": "8GiB"}``), as an engine's connector options pass them.
        Unknown keys are errors that suggest the nearest known one."""
        merged = self.to_dict()
        for raw_key, value in overrides.items():
            *parents, leaf = str(raw_key).split(".")
            node = merged
            for i, part in enumerate(parents):
                sub = node.setdefault(part, {})  # an unknown name: from_dict says so
                if not isinstance(sub, dict):
                    raise ConfigError(f"{'.'.join(parents[:i + 1])} is a value, not a table "
                                      f"of keys: cannot set {raw_key!r}")
                node = sub
            node[leaf] = _merge(node.get(leaf), value)
        return type(self).from_dict(merged)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _merge(base: Any, value: Any) -> Any:
    """``value`` over ``base``, table by table."""
    if isinstance(base, dict) and isinstance(value, Mapping):
        out = dict(base)
        for k, v in value.items():
            out[k] = _merge(out.get(k), v)
        return out
    return value


def _read_config_file(p: Path) -> Mapping[str, Any]:
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(
            f"{p}: unsupported config file type {suffix or '(none)'!r}; "
            "use a .toml, .yaml or .yml file"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigError(
                    f"{p}: reading TOML on Python 3.10 needs `pip install tomli`; "
                    "or use a YAML config file"
                ) from None
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: the top level must be a table of keys, got {type(data).__name__}")
    return data


@cache
def env_vars() -> dict[str, tuple[str, ...]]:
    """Every ``KVCACHE_*`` variable and the field path it sets, derived from the dataclasses."""
    out: dict[str, tuple[str, ...]] = {}

    def walk(cls: type[_Section], prefix: str, path: tuple[str, ...]) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = _split_optional(hints[f.name])[0]
            if _is_section(tp):
                sub_prefix = f.metadata.get("env_prefix", f"{f.name.upper()}_")
                walk(tp, prefix + sub_prefix, (*path, f.name))
                continue
            var = f"{ENV_PREFIX}{prefix}{f.name.upper()}"
            if var in out or var in EXTRA_ENV_VARS:  # two fields would share one variable
                raise AssertionError(f"config fields collide on environment variable {var}")
            out[var] = (*path, f.name)

    walk(KVCacheConfig, "", ())
    return out


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to a mistyped one, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _replace_at(section: S, path: tuple[str, ...], value: Any) -> S:
    """A copy of ``section`` with the field at ``path`` set (re-validated on the way up)."""
    name, rest = path[0], path[1:]
    if rest:
        value = _replace_at(getattr(section, name), rest, value)
    return dataclasses.replace(section, **{name: value})  # type: ignore[type-var]
